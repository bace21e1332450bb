"""The shared SDS loop (`stages.loop.run_loop`) with a toy step function: a parameter pulled towards 3."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from guidance.sds import NonFiniteError
from stages.common import Cancelled, StageError
from stages.loop import ADAM_BETAS, ADAM_EPS, Step, adam, run_loop
from stages.runs import STOP_FILE, stop_requested

PARTS = ("forward", "backward", "optimizer")


@dataclass
class ToyConfig:
    iters: int = 6
    preview_every: int = 2
    max_nonfinite_steps: int = 3


class Toy:
    """A one-parameter stage: loss (x - 3)^2, NaN at the steps in `nan_at` (0-based)."""

    def __init__(self, nan_at=(), grad_nan_at=()):
        self.x = torch.zeros(1, requires_grad=True)
        self.optimizer = adam([{"params": [self.x], "lr": 0.1}])
        self.nan_at, self.grad_nan_at = set(nan_at), set(grad_nan_at)
        self.calls, self.previewed, self.updated = [], [], []

    def step(self, i, timer):
        self.calls.append(i)
        loss = ((self.x - 3.0) ** 2).sum()
        if i in self.nan_at:
            loss = loss * float("nan")
        timer.mark("forward")

        def finish_grads():
            if i in self.grad_nan_at:
                raise NonFiniteError("non-finite extra gradients")

        return Step(loss, lambda value: f"toy step {i + 1}, loss {value:.3g}", finish_grads=finish_grads, view=i)

    def preview(self, out):
        self.previewed.append(out.view)
        return np.full((2, 2, 3), out.view, dtype=np.uint8)

    def run(self, config=None, **kwargs):
        return run_loop("toy", config or ToyConfig(), self.optimizer, torch.device("cpu"), self.step, self.preview,
                        PARTS, after_update=self.updated.append, **kwargs)


def test_every_step_updates_and_reports_in_order_with_previews_at_the_cadence_and_the_end():
    toy, events = Toy(), []
    result = toy.run(ToyConfig(iters=7, preview_every=3), callback=events.append)
    assert [e.step for e in events] == list(range(1, 8)) and {e.total for e in events} == {7}
    assert toy.previewed == [2, 5, 6]  # every 3rd step and the last one
    assert [e.preview is not None for e in events] == [False, False, True, False, False, True, True]
    assert [int(p[0, 0, 0]) for p in result.previews] == [2, 5, 6]
    assert toy.updated == list(range(7))
    assert events[-1].message == f"toy step 7, loss {events[-1].loss:.3g}" and result.loss == events[-1].loss
    assert list(events[0].timings) == list(PARTS) and list(result.totals) == list(PARTS)
    assert result.nonfinite_skipped == 0 and 0 < toy.x.item() < 3  # trained towards 3
    assert ADAM_BETAS == (0.9, 0.99) and toy.optimizer.defaults["eps"] == ADAM_EPS


def test_no_periodic_previews_when_the_cadence_is_zero_but_one_at_the_end():
    toy = Toy()
    result = toy.run(ToyConfig(iters=4, preview_every=0))
    assert toy.previewed == [3] and len(result.previews) == 1


def test_a_non_finite_step_is_skipped_without_update_preview_or_step_event():
    toy, events = Toy(nan_at={1}, grad_nan_at={3}), []
    result = toy.run(ToyConfig(iters=6, preview_every=2), callback=events.append)
    assert toy.calls == list(range(6))
    assert toy.updated == [0, 2, 4, 5]  # steps 1 and 3 (0-based) changed nothing
    assert toy.previewed == [5]  # the cadence's steps 2 and 4 (1-based) were skipped
    assert [e.message for e in events if "skipped" in e.message] == [
        "toy step 2/6 skipped: the loss is not finite (nan)", "toy step 4/6 skipped: non-finite extra gradients"]
    assert [e.step for e in events if e.loss is not None] == [1, 3, 5, 6]
    assert result.nonfinite_skipped == 2 and np.isfinite(result.loss)


def test_the_non_finite_limit_ends_the_stage_at_the_step_it_is_reached():
    toy = Toy(nan_at={2, 3, 4})
    with pytest.raises(StageError, match=r"toy stage failed at step 5: .*3 steps in a row were not finite"):
        toy.run(ToyConfig(iters=8, max_nonfinite_steps=3))
    assert toy.calls == [0, 1, 2, 3, 4] and toy.updated == [0, 1]


def test_a_good_step_resets_the_count_in_a_row_but_all_steps_skipped_fail():
    toy = Toy(nan_at={0, 1, 3, 4})
    assert toy.run(ToyConfig(iters=6, max_nonfinite_steps=3)).nonfinite_skipped == 4
    toy = Toy(nan_at={0, 1})
    with pytest.raises(StageError, match="all 2 steps were not finite"):
        toy.run(ToyConfig(iters=2, max_nonfinite_steps=10))


def test_the_stop_check_runs_before_each_step_in_process():
    toy, asked = Toy(), []

    def should_stop():
        asked.append(len(toy.calls))
        return len(toy.calls) == 3

    with pytest.raises(Cancelled, match="toy stage cancelled at step 3"):
        toy.run(should_stop=should_stop)
    assert asked == [0, 1, 2, 3] and toy.calls == [0, 1, 2] and toy.updated == [0, 1, 2]


def test_the_stop_file_in_the_run_folder_stops_the_loop(tmp_path):
    toy = Toy()

    def step(i, timer):  # another process's Cancel: the run folder's stop file appears during step 1
        if i == 1:
            (tmp_path / STOP_FILE).write_text("")
        return Toy.step(toy, i, timer)

    with pytest.raises(Cancelled, match="at step 2"):
        run_loop("toy", ToyConfig(), toy.optimizer, torch.device("cpu"), step, toy.preview, PARTS,
                 should_stop=lambda: stop_requested(tmp_path))
    assert toy.calls == [0, 1]


def test_intermediate_models_at_their_cadence_but_not_at_the_last_step():
    toy, events = Toy(), []
    result = toy.run(ToyConfig(iters=6, preview_every=0), callback=events.append,
                     model=lambda i, out: (f"model-{i + 1}.glb", f"step {i + 1}"), model_every=2)
    assert [(e.step, e.model, e.model_label) for e in events if e.model] == [(2, "model-2.glb", "step 2"),
                                                                             (4, "model-4.glb", "step 4")]
    assert result.model_seconds >= 0 and events[-1].model is None and events[-1].model_label == ""
