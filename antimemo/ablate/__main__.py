"""``python -m antimemo.ablate ...`` = ``antimemo ablate ...``."""

import sys

from antimemo.ablate.cli import main

sys.exit(main())
