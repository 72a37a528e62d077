"""``antimemo ablate`` grid: parsing, product, cell overrides, validation against the real parser."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from antimemo.ablate.grid import (
    cell_overrides,
    expand_grid,
    parse_axis,
    parse_fit_args,
    parse_grid,
    seed_keys,
    validate_grid,
)

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "lm_goldfish.yaml")
SECTIONS = {
    "goldfish": "antimemo.callbacks.goldfish.GoldfishTokenDropout",
    "loss_floor": "antimemo.callbacks.loss_floor.LossFloor",
}


# ------------------------------------------------------------------------------ parsing


def test_parse_axis_values_and_key():
    axis = parse_axis(" goldfish.k = 2, 4 ,8,none")
    assert axis.key == "goldfish.k" and axis.values == ("2", "4", "8", "none") and axis.section == "goldfish"
    assert parse_axis("--model.lr=1e-3").key == "model.lr"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("goldfish.k", ["goldfish.k", "KEY=V1,V2"]),
        ("goldfish..k=2", ["'goldfish..k'", "dotted config key"]),
        ("1abc=2", ["'1abc'"]),
        ("goldfish.k=", ["'goldfish.k'", "empty value"]),
        ("goldfish.k=2,,4", ["'goldfish.k'", "empty value"]),
        ("goldfish.k=2,4,2", ["'goldfish.k'", "['2']", "once"]),
    ],
)
def test_parse_axis_errors_name_the_spec(spec, words):
    with pytest.raises(ValueError) as err:
        parse_axis(spec)
    for word in words:
        assert word in str(err.value)


def test_parse_grid_rejects_repeated_and_nested_keys():
    with pytest.raises(ValueError, match=r"\['goldfish.k'\].*more than once"):
        parse_grid(["goldfish.k=2", "goldfish.k=4"])
    with pytest.raises(ValueError, match="'goldfish' and its sub-key 'goldfish.k'"):
        parse_grid(["goldfish=on,none", "goldfish.k=2"])


def test_expand_grid_is_the_product_first_axis_slowest():
    cells = expand_grid(parse_grid(["goldfish.k=2,none", "model.lr=1e-3,2e-3,3e-3"]))
    assert len(cells) == 6
    assert [c.as_dict() for c in cells[:3]] == [
        {"goldfish.k": "2", "model.lr": v} for v in ("1e-3", "2e-3", "3e-3")
    ]
    assert cells[3].id == "goldfish.k-none_model.lr-1e-3"
    assert len({c.id for c in cells}) == 6
    assert [c.id for c in expand_grid([])] == ["base"]


def test_expand_grid_rejects_ids_that_collide_after_sanitizing():
    with pytest.raises(ValueError, match="same run directory"):
        expand_grid([parse_axis("data.corpus=a/b,a:b")])


def test_cell_overrides_none_enable_and_plain():
    (cell,) = expand_grid(parse_grid(["goldfish.k=8", "loss_floor.floor=0.5", "model.lr=1e-3"]))
    # goldfish is on in the recipe: only the value; loss_floor is off: enabled first, then the value
    assert cell_overrides(cell, SECTIONS, null_sections={"loss_floor"}) == [
        "--goldfish.k=8",
        f"--loss_floor={SECTIONS['loss_floor']}",
        "--loss_floor.floor=0.5",
        "--model.lr=1e-3",
    ]
    none = expand_grid(parse_grid(["goldfish.k=none", "goldfish.h=7"]))[0]
    assert cell_overrides(none, SECTIONS, null_sections=()) == ["--goldfish=null"]
    # the mapping decides what is a callback section: without it goldfish.k is a plain override
    assert cell_overrides(expand_grid([parse_axis("goldfish.k=8")])[0], {}, ()) == ["--goldfish.k=8"]
    on = expand_grid([parse_axis("loss_floor=on,none")])
    assert cell_overrides(on[0], SECTIONS, {"loss_floor"}) == [f"--loss_floor={SECTIONS['loss_floor']}"]
    assert cell_overrides(on[0], SECTIONS, ()) == []
    assert cell_overrides(on[1], SECTIONS, ()) == ["--loss_floor=null"]


# ------------------------------------------------------------- the real antimemo fit parser


def test_validate_grid_against_the_real_parser(tmp_path):
    """One test for all real-parser checks (the parser import is the slow part)."""
    # bad keys and values name the key, the value and what is accepted
    cases = [
        ("nosuch.x=1", ["--grid nosuch.x", "'nosuch'", "top-level keys"]),
        ("goldfish.kk=3", ["--grid goldfish.kk", "no argument 'kk'", "'k'", "'h'"]),
        ("loss_floor.flor=0.5", ["--grid loss_floor.flor", "no argument 'flor'", "'floor'"]),
        ("goldfish.k=1", ["--grid goldfish.k=1", "GoldfishTokenDropout rejects it", "k must be an integer >= 2"]),
        ("goldfish.k=abc", ["--grid goldfish.k=abc", "rejected by the config parser"]),
        ("model.lr=abc", ["--grid model.lr=abc", "lr"]),
        ("model.lr=none", ["--grid model.lr=none", "not one", "callback sections"]),
        ("trainer.max_epochss=3", ["--grid trainer.max_epochss", "no argument 'max_epochss'", "max_epochs"]),
        ("goldfish=4", ["--grid goldfish=4", "'on' or 'none'"]),
        ("model=1", ["--grid model", "whole config section"]),
        ("loss_floor.floor=-1", ["--grid loss_floor.floor=-1", "LossFloor rejects it"]),
    ]
    for spec, words in cases:
        with pytest.raises(ValueError) as err:
            validate_grid(RECIPE, [parse_axis(spec)])
        for word in words:
            assert word in str(err.value), (spec, str(err.value))

    # good grids pass and return the parsed recipe
    base = validate_grid(
        RECIPE,
        parse_grid(["goldfish.k=2,8,none", "loss_floor.floor=0.5,none", "model.lr=1e-3", "trainer.max_epochs=2"]),
    )
    assert base.goldfish.init_args.k == 4 and base.loss_floor is None

    # enabling a section that is null in the recipe (class path first, then the value) works, and a
    # section already on keeps its other recipe arguments
    recipe = yaml.safe_load(Path(RECIPE).read_text())
    recipe["goldfish"]["h"] = 7
    custom = tmp_path / "r.yaml"
    custom.write_text(yaml.safe_dump(recipe))
    sections = {"goldfish": SECTIONS["goldfish"], "loss_floor": SECTIONS["loss_floor"]}
    (cell,) = expand_grid(parse_grid(["goldfish.k=8", "loss_floor.floor=0.25"]))
    args = cell_overrides(cell, sections, null_sections={"loss_floor"})
    cfg = parse_fit_args(["--config", str(custom), *args])
    assert cfg.goldfish.init_args.k == 8 and cfg.goldfish.init_args.h == 7  # recipe's h kept
    assert cfg.loss_floor.class_path.endswith("LossFloor") and cfg.loss_floor.init_args.floor == 0.25
    assert cfg.loss_floor.init_args.module_name == "model"  # the callback's defaults
    # seeds: every seed key of the config, callback sections only when on
    assert seed_keys(cfg, sections) == ["seed_everything", "model.seed", "data.seed", "goldfish.seed"]
    off = parse_fit_args(["--config", str(custom), "--goldfish=null"])
    assert seed_keys(off, sections) == ["seed_everything", "model.seed", "data.seed"]
