"""The antimemo verbs print what the user needs: Lightning's tips, CPU-only accelerator lines,
repeated seed lines and library warnings the user cannot act on are dropped (issue 18)."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

from antimemo._fit_cli import _NoiseFilter, quiet_console

ROOT = Path(__file__).resolve().parents[1]


def _record(msg):
    return logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, __file__, 1, msg, None, None)


def test_noise_filter_drops_only_noise():
    f = _NoiseFilter()
    for noise in ("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud logging, try installing litlogger",
                  "Seed set to 0", "GPU available: False, used: False", "TPU available: False, using: 0 TPU cores"):  # fmt: skip
        assert not f.filter(_record(noise)), noise
    for kept in ("GPU available: True (cuda), used: True", "`Trainer.fit` stopped: `max_epochs=1` reached.",
                 "DifferentialPrivacy: noise_multiplier=1"):  # fmt: skip
        assert f.filter(_record(kept)), kept


def test_quiet_console_installs_once_and_silences_library_warnings():
    quiet_console()
    quiet_console()
    seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
    assert sum(isinstance(x, _NoiseFilter) for x in seed_logger.filters) == 1
    for h in logging.getLogger("lightning.pytorch").handlers:
        assert sum(isinstance(x, _NoiseFilter) for x in h.filters) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_console()  # re-adds its ignore filters in front
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning)
        warnings.warn("a warning about the user's own setup", UserWarning)
    assert [str(w.message) for w in caught] == ["a warning about the user's own setup"]


def test_ablate_dry_run_prints_no_seed_lines(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "antimemo.cli", "ablate", "--config", "recipes/lm_goldfish.yaml", "--grid",
         "goldfish.k=2,4", "--seeds", "2", "--out", str(tmp_path / "abl"), "--dry_run"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Seed set to" not in proc.stdout + proc.stderr
    assert "# 4 runs (2 cells x 2 seeds)" in proc.stdout
