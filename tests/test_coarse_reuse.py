"""bench.coarse_reuse: a benchmark run that starts from an earlier run's coarse checkpoint gives what a
whole run gives, and one whose coarse settings differ is refused with the settings named."""
import copy

import pytest

from bench.coarse_reuse import differing_settings, start_from_coarse
from stages.config import apply_overrides
from stages.pipeline import run_to_completion
from stages.plan import resolve
from stages.runs import RunRecord
from tests.helpers import tiny_run_config

PROMPT = "a red cube"


def test_a_run_from_an_earlier_coarse_stage_matches_a_whole_run(tmp_path):
    config = tiny_run_config()
    config.export.turntable = False
    whole = tmp_path / "whole"
    run_to_completion(PROMPT, copy.deepcopy(config), run_dir=whole)

    again = tmp_path / "again"
    start_from_coarse(whole, again, resolve(PROMPT, copy.deepcopy(config)))
    assert RunRecord.load(again).finished_stages == ["coarse"]
    run_to_completion(PROMPT, copy.deepcopy(config), run_dir=again, resume=True)
    assert (again / "model.obj").read_bytes() == (whole / "model.obj").read_bytes()
    assert (again / "coarse.pt").read_bytes() == (whole / "coarse.pt").read_bytes()
    record = RunRecord.load(again)
    assert record.finished_stages == ["coarse", "refine", "export"] and record.status == "finished"
    assert record.stage_seconds["coarse"] == RunRecord.load(whole).stage_seconds["coarse"]

    # A refine setting may differ (that is the point); the run then trains its own refine stage.
    changed = apply_overrides(copy.deepcopy(config), ["refine.iters=1"])
    other = tmp_path / "other"
    start_from_coarse(whole, other, resolve(PROMPT, copy.deepcopy(changed)))
    run_to_completion(PROMPT, changed, run_dir=other, resume=True)
    assert RunRecord.load(other).config["refine"]["iters"] == 1
    assert RunRecord.load(other).stage_stats["refine"]["steps"] == 1

    # A coarse setting, the seed or the prompt may not.
    for overrides in (["coarse.iters=5"], ["seed=9"], ["prior.resolution=24"]):
        plan = resolve(PROMPT, apply_overrides(copy.deepcopy(config), overrides))
        with pytest.raises(ValueError, match=overrides[0].split("=")[0].replace(".", r"\.")):
            start_from_coarse(whole, tmp_path / "refused", plan)
    with pytest.raises(ValueError, match="not 'a blue cube'"):
        start_from_coarse(whole, tmp_path / "refused", resolve("a blue cube", copy.deepcopy(config)))
    assert not (tmp_path / "refused").exists()
    bare = tmp_path / "bare"  # a run folder without its checkpoint
    bare.mkdir()
    (bare / "run.json").write_bytes((whole / "run.json").read_bytes())
    with pytest.raises(ValueError, match="no finished coarse stage"):
        start_from_coarse(bare, tmp_path / "x", resolve(PROMPT, copy.deepcopy(config)))


def test_differing_settings_names_only_the_coarse_stage_inputs():
    earlier = {"seed": 0, "coarse": {"iters": 4, "volume": {"ambient": 0.1}}, "refine": {"iters": 3}, "prior": {}}
    now = {"seed": 0, "coarse": {"iters": 4, "volume": {"ambient": 0.2}}, "refine": {"iters": 9}, "prior": {"x": 1}}
    assert differing_settings(earlier, now) == ["prior.x", "coarse.volume.ambient"]
    assert differing_settings(earlier, earlier) == []
