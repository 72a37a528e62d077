"""A missing optional package gives one line naming the antimemo extra that installs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from antimemo._extras import missing_extra_message, require

ROOT = Path(__file__).resolve().parents[1]


def test_require_names_the_extra():
    with pytest.raises(ImportError, match=r"^DiffusionModule needs antimemo_no_such_pkg, which is not installed: "
                                          r"pip install antimemo_no_such_pkg$"):  # fmt: skip
        require("antimemo_no_such_pkg", "DiffusionModule")
    assert missing_extra_message("faiss", "x").endswith("pip install 'antimemo[dedup]'")
    assert missing_extra_message("opacus", "x").endswith("pip install 'antimemo[dp]'")


BLOCK_DIFFUSERS = (
    "import sys; sys.modules['diffusers'] = None\n"  # importing diffusers now raises ModuleNotFoundError
    "from antimemo.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize("entry", ["module", "recipe"])
def test_diffusion_without_diffusers_is_one_line_naming_the_extra(entry, tmp_path):
    if entry == "module":
        code = "import sys; sys.modules['diffusers'] = None\nfrom antimemo.diffusion import DiffusionModule\nDiffusionModule()\n"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 1
        assert "ImportError: DiffusionModule needs diffusers, which is not installed: pip install 'antimemo[diffusion]'" in proc.stderr
        return
    env = {**os.environ, "ANTIMEMO_DEBUG": ""}
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_DIFFUSERS, "fit", "--config", "recipes/diffusion_ddpm.yaml", "--trainer.max_epochs", "1",
         "--trainer.default_root_dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("antimemo fit: error:")]
    assert err and "pip install 'antimemo[diffusion]'" in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
