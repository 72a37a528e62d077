"""One flag convention across the ``antimemo`` verbs (stdlib only).

Options are spelled with underscores, as LightningCLI spells them (``--trainer.max_epochs``,
``--report_path``, ``--dry_run``); the dashed spelling (``--dry-run``, ``--no-progress``) is
accepted as an alias by every verb.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["canonical_flags"]


def canonical_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--a-b`` / ``--a_b`` rewritten to the spelling ``parser`` defines.

    Arguments after ``--`` and values are left alone; unknown options stay as they are (argparse
    then reports them).

    Example:
        >>> p = argparse.ArgumentParser(); _ = p.add_argument("--dry_run", action="store_true")
        >>> _ = p.add_argument("--num-perm", type=int)
        >>> canonical_flags(p, ["--dry-run", "--num_perm=64", "--", "--dry-run"])
        ['--dry_run', '--num-perm=64', '--', '--dry-run']
    """
    known = {s for action in parser._actions for s in action.option_strings if s.startswith("--")}
    out: list[str] = []
    rest = False
    for arg in argv:
        if rest or not arg.startswith("--") or arg == "--":
            rest = rest or arg == "--"
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name not in known:
            for alt in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                if alt in known:
                    name = alt
                    break
        out.append(name + eq + value)
    return out
