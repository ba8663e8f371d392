"""SWAD's loss valley: which segment averages go into the final model (Cha et al., NeurIPS 2021).

The training loop averages every step's weights into a segment
(`torch.optim.swa_utils.AveragedModel`) and hands each segment to `LossValley` at a checkpoint,
with the training-domain validation loss measured there. `LossValley` follows the rule of
khanrc/swad (`domainbed/swad.py`, class `LossValley`) step for step, including its queue
arithmetic, so that a run selects the same segments as the original would.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from dataclasses import dataclass

from torch import nn
from torch.optim.swa_utils import AveragedModel

log = logging.getLogger(__name__)


@dataclass
class _Segment:
    """A frozen CPU copy of one segment's averaged weights and the loss at its checkpoint."""

    module: nn.Module
    start_step: int
    end_step: int
    loss: float


class LossValley:
    """Detect the validation-loss valley and average the segments inside it.

    Converged: the oldest of the last `n_converge` losses is the lowest; the threshold is then
    `(1 + tolerance_ratio)` × their mean. The valley ends (`dead_valley`) at the first checkpoint
    where the minimum of the last `n_tolerance` losses exceeds the threshold. While it lasts, each
    checkpoint adds the oldest of those `n_tolerance` segments to the final average, so the
    average lags `n_tolerance - 1` checkpoints behind training; `get_final_model` adds the tail.

    Differences from swad.py that do not change which segments are chosen: `get_final_model`
    leaves the state alone (it can be called again, or before a resume), returns a plain module
    on CPU, and buffers are copied rather than averaged (see `_new_average`).
    """

    def __init__(self, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3):
        if n_converge < 1 or n_tolerance < 1:
            raise ValueError(
                f"n_converge and n_tolerance must be >= 1, got {n_converge} and {n_tolerance}"
            )
        self.n_converge = n_converge
        self.n_tolerance = n_tolerance
        self.tolerance_ratio = tolerance_ratio
        # swad.py keeps two queues (last n_converge, last n_tolerance segments); both are suffixes
        # of the same stream, so one queue as long as the longer serves both and holds each
        # copy once.
        self._recent: deque[_Segment] = deque(maxlen=max(n_converge, n_tolerance))
        self._average: AveragedModel | None = None
        self.converge_step: int | None = None
        self.threshold: float | None = None
        self.dead_valley = False

    @property
    def is_converged(self) -> bool:
        return self.converge_step is not None

    def update_and_evaluate(
        self, segment: AveragedModel, val_loss: float, start_step: int, end_step: int
    ) -> None:
        """Record the segment that ended at this checkpoint and advance the valley."""
        if self.dead_valley:
            return
        self._recent.append(_freeze(segment, float(val_loss), int(start_step), int(end_step)))
        if self.is_converged:
            self._extend_valley()
        else:
            self._check_convergence()

    def get_final_model(self) -> nn.Module:
        """Returns: the equal-weight average of the valley's segments, on CPU.

        If the loss never converged, the last segment's average (with a warning).
        """
        if not self._recent:
            raise RuntimeError("LossValley has no segment yet: call update_and_evaluate first")
        if not self.is_converged:
            last = self._recent[-1]
            log.warning(
                "SWAD: the validation loss never converged; using the last segment "
                "(steps %d-%d) instead of a valley average",
                last.start_step,
                last.end_step,
            )
            return copy.deepcopy(last.module)
        average = copy.deepcopy(self._average)
        tail = [] if self.dead_valley else self._tail()
        for segment in tail:
            average.update_parameters(segment.module)
        log.info("SWAD: final model averages %d segments", int(average.n_averaged))
        return average.module

    def state_dict(self) -> dict:
        """Everything needed to resume; plain types only, loadable with `weights_only=True`."""
        state = {
            "n_converge": self.n_converge,
            "n_tolerance": self.n_tolerance,
            "tolerance_ratio": self.tolerance_ratio,
            "dead_valley": self.dead_valley,
            "segments": [
                {
                    "weights": s.module.state_dict(),
                    "start_step": s.start_step,
                    "end_step": s.end_step,
                    "loss": s.loss,
                }
                for s in self._recent
            ],
        }
        if self.is_converged:  # absent keys rather than None: plain types only
            state["converge_step"] = self.converge_step
            state["threshold"] = self.threshold
            state["average"] = self._average.state_dict()
        return state

    def load_state_dict(self, state: dict, template: nn.Module) -> None:
        """Restore from `state_dict()`; `template` has the architecture to rebuild copies from."""
        saved = (state["n_converge"], state["n_tolerance"], state["tolerance_ratio"])
        ours = (self.n_converge, self.n_tolerance, self.tolerance_ratio)
        if saved != ours:
            raise ValueError(
                f"LossValley state was saved with (n_converge, n_tolerance, tolerance_ratio)="
                f"{saved}, but this one has {ours}"
            )
        self._recent.clear()
        for s in state["segments"]:
            module = _rebuild(template, s["weights"])
            self._recent.append(_Segment(module, s["start_step"], s["end_step"], s["loss"]))
        self.dead_valley = bool(state["dead_valley"])
        self.converge_step = state.get("converge_step")
        self.threshold = state.get("threshold")
        self._average = None
        if "average" in state:
            self._average = _new_average(template)
            self._average.load_state_dict(state["average"])

    # -- the rule of swad.py ------------------------------------------------------------------

    def _window(self, n: int) -> list[_Segment]:
        """The last n segments recorded (fewer at the start), oldest first."""
        return list(self._recent)[-n:]

    def _check_convergence(self) -> None:
        window = self._window(self.n_converge)
        if len(window) < self.n_converge:
            return
        losses = [s.loss for s in window]
        if losses.index(min(losses)) != 0:
            return
        self.converge_step = window[0].end_step
        self.threshold = sum(losses) / len(losses) * (1.0 + self.tolerance_ratio)
        # swad.py seeds the average with the converge segment but a count of 0, so the first
        # segment added replaces it: it only survives if nothing is ever added.
        self._average = _new_average(window[0].module)
        for segment in self._initial_members(window):
            self._average.update_parameters(segment.module)
        log.info(
            "SWAD: validation loss converged at step %d; valley threshold %.6f",
            self.converge_step,
            self.threshold,
        )

    def _initial_members(self, converge_window: list[_Segment]) -> list[_Segment]:
        """Segments swad.py adds at the moment of convergence."""
        if self.n_tolerance < self.n_converge:
            return converge_window[1 : 1 + self.n_converge - self.n_tolerance]
        if self.n_tolerance == self.n_converge:
            return []
        # The n_tolerance - n_converge + 1 oldest of the smoothing window; when that window is
        # full, these end with the converge segment, otherwise they run past it.
        head = self._window(self.n_tolerance)[: self.n_tolerance - self.n_converge + 1]
        above = [i for i, s in enumerate(head) if s.loss > self.threshold]
        start = above[-1] + 1 if above else 0
        # swad.py slices from start + 1, so head[start] is never included.
        return head[start + 1 :]

    def _extend_valley(self) -> None:
        window = self._window(self.n_tolerance)
        oldest = window[0]
        # Segments older than the converge point were already handled at convergence; the
        # converge segment itself is not, so swad.py adds it a second time here.
        if oldest.end_step < self.converge_step:
            return
        if min(s.loss for s in window) > self.threshold:
            self.dead_valley = True
            log.info("SWAD: loss valley ended at step %d", window[-1].end_step)
            return
        # Until the window is full its oldest segment stays the same and is added again.
        self._average.update_parameters(oldest.module)

    def _tail(self) -> list[_Segment]:
        """Segments swad.py adds when training stops inside the valley."""
        # The oldest queued segment was added at the last checkpoint; of the rest, take them from
        # the oldest while the minimum loss of those remaining stays under the threshold.
        rest = self._window(self.n_tolerance)[1:]
        members = []
        while rest and min(s.loss for s in rest) <= self.threshold:
            members.append(rest.pop(0))
        return members


def _freeze(segment: nn.Module, loss: float, start_step: int, end_step: int) -> _Segment:
    """Copy the segment's averaged weights to CPU, so later training cannot change them."""
    # Keep the inner module: an AveragedModel carries an extra `n_averaged` buffer that would
    # misalign buffers when it is averaged into another AveragedModel.
    module = segment.module if isinstance(segment, AveragedModel) else segment
    return _Segment(copy.deepcopy(module).cpu(), start_step, end_step, loss)


def _rebuild(template: nn.Module, weights: dict) -> nn.Module:
    module = copy.deepcopy(template).cpu()
    module.load_state_dict(weights)
    return module


def _new_average(module: nn.Module) -> AveragedModel:
    # use_buffers=False: parameters are averaged, buffers are copied from the segment added
    # last. torch's use_buffers=True would average integer buffers such as BatchNorm's
    # num_batches_tracked with truncation (the mean of 1, 2, 3 comes out as 1). swad.py averages
    # parameters only too. With BatchNorm frozen the buffers are constant, so either is exact.
    return AveragedModel(module, device="cpu", use_buffers=False)
