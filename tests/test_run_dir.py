"""The training run directory's layout has one owner, pipelines/training/run_dir.py: no other module
of jobs/ or pipelines/ spells its names, and its functions (listing checkpoints, the latest step,
the budget rule, publishing the export) work on a plain directory, without Ray."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from pipelines import storage
from pipelines.training import run_dir as rd
from pipelines.training.run_plan import OVERRUN

ROOT = Path(__file__).resolve().parents[1]
OWNER = ROOT / "pipelines" / "training" / "run_dir.py"


def _layout_literals(path: Path) -> list[str]:
    """The string literals of `path` (docstrings and f-string parts included) that spell the run
    dir's layout: the state file's name, the HF export's subdirectory, a checkpoint's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                and str(node.values[0].value).startswith("checkpoint_"):
            found.append(f"{path.name}:{node.lineno} f-string {node.values[0].value!r}...")
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        v = node.value
        if "raybert_state.json" in v or re.search(r"(^|/)hf(/|$)", v) or re.match(r"checkpoint_(\d|$)", v):
            found.append(f"{path.name}:{node.lineno} {v[:60]!r}")
    return found


def test_only_the_run_dir_module_spells_the_layout():
    sources = sorted([*(ROOT / "jobs").glob("*.py"), *(ROOT / "pipelines").rglob("*.py")])
    assert OWNER in sources
    offenders = {str(f.relative_to(ROOT)): _layout_literals(f) for f in sources if f != OWNER}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(_layout_literals(OWNER)) >= 3  # the scan does see the literals where they live


def test_checkpoint_names_sort_by_step_and_are_listed(tmp_path):
    assert rd.checkpoint_name(12) == "checkpoint_00000012"
    assert sorted([rd.checkpoint_name(100), rd.checkpoint_name(9)]) == [rd.checkpoint_name(9), rd.checkpoint_name(100)]
    assert rd.checkpoint_names(tmp_path / "missing") == [] and not rd.has_checkpoints(tmp_path / "missing")
    for name in (rd.checkpoint_name(20), rd.checkpoint_name(10), "metrics.jsonl", "export"):
        (tmp_path / name).mkdir()
    assert rd.checkpoint_names(tmp_path) == [rd.checkpoint_name(10), rd.checkpoint_name(20)]
    assert rd.has_checkpoints(tmp_path)
    assert rd.checkpoint_names(tmp_path, ["a", rd.checkpoint_name(3)]) == [rd.checkpoint_name(3)]


def test_our_checkpoint_holds_a_state_file_or_an_hf_export(tmp_path):
    ckpt = tmp_path / rd.checkpoint_name(2)
    ckpt.mkdir()
    assert not rd.holds_our_checkpoint(tmp_path)  # another tool's checkpoint_* directory
    Path(rd.hf_dir(ckpt)).mkdir()
    assert rd.holds_our_checkpoint(tmp_path) and rd.holds_our_checkpoint(tmp_path, [ckpt.name])
    other = tmp_path / "other"
    (other / rd.checkpoint_name(4)).mkdir(parents=True)
    rd.write_state(other / rd.checkpoint_name(4), {"step": 4})
    assert rd.holds_our_checkpoint(other)


def test_state_file_round_trips_and_a_missing_one_is_named(tmp_path):
    state = {"step": 7, "epoch": 1, "consumed": 3}
    rd.write_state(tmp_path, state)
    assert rd.read_state(tmp_path) == state
    assert json.loads((tmp_path / rd.STATE_FILE).read_text()) == state
    with pytest.raises(FileNotFoundError, match=rd.STATE_FILE):
        rd.read_state(tmp_path / "empty")


def test_latest_step_is_the_registered_checkpoints(tmp_path, monkeypatch):
    """Ray Train's registered checkpoint, not the newest directory: a later one left by a killed
    invocation is ignored (the end-to-end case: tests/test_scheduled.py)."""
    for step in (5, 10):
        ckpt = tmp_path / rd.checkpoint_name(step)
        ckpt.mkdir()
        rd.write_state(ckpt, {"step": step, "epoch": 0, "consumed": step})
    monkeypatch.setattr(rd, "registered_checkpoint", lambda run_dir: None)
    assert rd.latest_state(tmp_path) == {"step": 0} and rd.latest_step(tmp_path) == 0
    monkeypatch.setattr(rd, "registered_checkpoint", lambda run_dir: str(tmp_path / rd.checkpoint_name(5)))
    assert rd.latest_step(tmp_path) == 5 and rd.latest_state(tmp_path)["consumed"] == 5


def test_checkpoint_location_rebuilds_rays_path_from_the_run_dir(tmp_path):
    moved = rd.checkpoint_location(tmp_path, "/elsewhere/run/checkpoint_00000003")
    assert moved == str(tmp_path / "checkpoint_00000003")
    # On an object store Ray's path has no scheme.
    assert rd.checkpoint_location("s3://b/run/", "b/run/checkpoint_00000003") == "s3://b/run/checkpoint_00000003"


def _budgeted(step: int, end: int, used_s: float) -> dict:
    return {"step": step, "lr_schedule": {"end": end, "anchor_step": 0, "anchor_progress": 0.0},
            "budget": {"total_s": 100.0, "used_s": used_s}}


def test_budget_rule():
    assert not rd.budget_spent({"step": 50}, 100.0)  # no plan: an unbudgeted run is never spent
    assert not rd.budget_spent({"step": 0}, None)
    assert not rd.budget_spent(_budgeted(step=40, end=100, used_s=50.0), 100.0)
    assert rd.budget_spent(_budgeted(step=100, end=100, used_s=50.0), 100.0)  # the LR plan ended
    assert rd.budget_spent(_budgeted(step=100, end=100, used_s=50.0), None)
    assert rd.budget_spent(_budgeted(step=40, end=100, used_s=OVERRUN * 100.0), 100.0)  # out of time
    assert not rd.budget_spent(_budgeted(step=40, end=100, used_s=OVERRUN * 100.0 - 0.01), 100.0)
    assert not rd.budget_spent(_budgeted(step=40, end=100, used_s=OVERRUN * 100.0), 200.0)  # a raised budget
    assert not rd.budget_spent(_budgeted(step=40, end=100, used_s=OVERRUN * 100.0), None)


def test_publish_export_copies_the_checkpoints_hf_export_whole(tmp_path):
    run = tmp_path / "run"
    ckpt = run / rd.checkpoint_name(3)
    Path(rd.hf_dir(ckpt)).mkdir(parents=True)
    Path(rd.hf_dir(ckpt), "config.json").write_text("{}")
    Path(rd.export_dir(run)).mkdir()
    Path(rd.export_dir(run), "stale.bin").write_text("old")
    assert rd.publish_export(str(ckpt), run) == rd.export_dir(run) == storage.join(str(run), "export")
    assert sorted(p.name for p in Path(rd.export_dir(run)).iterdir()) == ["config.json"]
    assert rd.publish_export(None, run) is None
    (run / rd.checkpoint_name(4)).mkdir()
    assert rd.publish_export(str(run / rd.checkpoint_name(4)), run) is None  # no export in it
