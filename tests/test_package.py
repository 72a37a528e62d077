"""Package-level contracts: layering, public names, README/CI consistency."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_lower_layers_do_not_import_lightning():
    code = (
        "import sys, antimemo.functional, antimemo.metrics\n"
        "bad = sorted(m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"lower layers imported Lightning modules: {out.stdout.strip()}"


@pytest.mark.parametrize(
    "name",
    [
        "GoldfishTokenDropout",
        "GOLDFISH_PRETRAINING_PRESET",
        "MemorizationMonitor",
        "ExtractableMemorization",
        "CanaryExposure",
        "MembershipInference",
    ],
)
def test_public_names_resolve(name):
    import antimemo

    assert getattr(antimemo, name) is not None


def test_unknown_attribute_raises():
    import antimemo

    with pytest.raises(AttributeError, match="no attribute"):
        antimemo.does_not_exist  # noqa: B018


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [c.strip() for c in re.findall(r"```bash\n(.+?)\n\s*```", quick, flags=re.S)]


def test_readme_quickstart_has_exactly_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "antimemo fit --config recipes/lm_goldfish.yaml" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    test_cmd = _readme_commands()[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), f"{test_cmd!r} not found as a line of .ci/run"
    assert "exit 1" in ci and '"$rc" -eq 5' in ci, ".ci/run must fail when pytest collects no tests"
