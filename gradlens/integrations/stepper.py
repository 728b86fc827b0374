"""One optimizer step's chosen/rejected split, spanning all its micro-batches.

Trainers call ``begin_micro_batch`` before each micro-batch's forward (hooks must
see it) and ``end_micro_batch`` after its backward. The capture opens with the
first micro-batch of a step, moves to each later micro-batch's rows with
``set_groups`` (the last micro-batch may be smaller), and is finished right
after the last backward: before the trainer clips ``p.grad`` in place, because
the recorder reads the accumulated ``p.grad`` as the step's total gradient.

Knows nothing about transformers or TRL; it only needs a model and row groups.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from ..gradients import Capture, GradientRecorder


@dataclass
class MicroBatch:
    """What one micro-batch left behind: its (GA-scaled) loss and trainer-specific notes."""

    loss: Optional[torch.Tensor]
    notes: dict = field(default_factory=dict)


@dataclass
class StepResult:
    """A finished optimizer step: the capture (None when the step was not recorded)."""

    step: int
    capture: Optional[Capture]
    micro_batches: list[MicroBatch]
    # rows each group had over the step's micro-batches; a group with none has an exactly zero
    # gradient (the recorder may still report float rounding for a group taken as the remainder)
    group_rows: dict[str, int] = field(default_factory=dict)


class StepCapture:
    """Owns a ``GradientRecorder`` and opens one capture per recorded optimizer step."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        record_every: int = 1,
        capture_options: Mapping[str, Any] | None = None,
        attach_per_step: bool = False,
    ):
        """``attach_per_step``: hooks only during recorded steps (a compiled model: unrecorded steps run
        compiled, and hooks there would break its graph); otherwise attached once, for the whole run."""
        if record_every < 1:
            raise ValueError(f"record_every must be >= 1, got {record_every}")
        self.model, self.attach_per_step = model, attach_per_step
        self.recorder: Optional[GradientRecorder] = None if attach_per_step else GradientRecorder(model)
        self.record_every = record_every
        # extra GradientRecorder.capture() arguments; a step may span several micro-batches
        self.capture_options = {"accumulate": True, **(capture_options or {})}
        self.micro_batches_seen = 0
        self._stack: Optional[contextlib.ExitStack] = None
        self._capture: Optional[Capture] = None
        self._step: Optional[int] = None
        self._micro: list[MicroBatch] = []
        self._notes: dict = {}
        self._group_rows: dict[str, int] = {}
        self._done: Optional[StepResult] = None

    def will_record(self, step: int) -> bool:
        return step % self.record_every == 0

    @property
    def recording(self) -> bool:
        """True while a capture is open (between the first micro-batch and the last backward)."""
        return self._capture is not None

    def begin_micro_batch(self, step: int, groups: Mapping[str, Any], *, num_rows: int | None = None) -> None:
        if self._step is not None and step != self._step:
            self.abort()
            raise RuntimeError(
                f"optimizer step {step} started before step {self._step} ended: the trainer never reported the last "
                "micro-batch of that step (is `accelerator.sync_gradients` set on the last micro-batch?)"
            )
        if self._step is None:
            self._step, self._micro, self._done, self._group_rows = step, [], None, {}
            if self.will_record(step):
                self._stack = contextlib.ExitStack()
                if self.attach_per_step:
                    self.recorder = GradientRecorder(self.model)
                    self._stack.callback(self._detach)  # closed after the capture: LIFO
                self._capture = self._stack.enter_context(self.recorder.capture(groups=groups, num_rows=num_rows, **self.capture_options))
        elif self._capture is not None:
            self._capture.set_groups(groups, num_rows=num_rows)
        for name, rows in groups.items():
            self._group_rows[str(name)] = self._group_rows.get(str(name), 0) + _count(rows)
        self._notes = {}
        self.micro_batches_seen += 1

    def note(self, **values: Any) -> None:
        """Attach values to the current micro-batch (e.g. per-pair log-probs for the run log)."""
        self._notes.update(values)

    def end_micro_batch(self, loss: Optional[torch.Tensor], *, last: bool) -> Optional[StepResult]:
        if self._step is None:
            raise RuntimeError("end_micro_batch without begin_micro_batch")
        self._micro.append(MicroBatch(None if loss is None else loss.detach(), self._notes))
        self._notes = {}
        if not last:
            return None
        if self._stack is not None:
            self._stack.close()  # finishes the capture: reads p.grad before anyone clips it
        self._done = StepResult(self._step, self._capture, self._micro, self._group_rows)
        self._stack, self._capture, self._step, self._micro = None, None, None, []
        return self._done

    def abort(self) -> None:
        """Drop an unfinished step (an exception in the forward or backward)."""
        if self._stack is not None:
            self._stack.__exit__(RuntimeError, RuntimeError("step aborted"), None)
        self._stack, self._capture, self._step, self._micro, self._notes = None, None, None, [], {}

    def pop(self) -> Optional[StepResult]:
        """The last finished step, once; None if no step finished since the last call."""
        done, self._done = self._done, None
        return done

    def _detach(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    def close(self) -> None:
        self.abort()
        if self.recorder is not None:
            self.recorder.close()


def _count(rows: Any) -> int:
    """Rows in one group spec (a slice or indices), without validating it (the capture does)."""
    if isinstance(rows, slice):
        return max(0, (rows.stop or 0) - (rows.start or 0))
    return len(rows)
