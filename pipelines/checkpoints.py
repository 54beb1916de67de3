"""Resumable training: checkpoints that are used only when written to the end.

A training saves into `Checkpoints.folder` at most every `every_s` seconds. Each
checkpoint is a `checkpoint-<step>` folder with a `complete` marker written last,
so a worker killed mid-save leaves a folder that `latest()` ignores. TRL's
trainers save and resume themselves (`resume_from_checkpoint`); `callback()`
makes them save on this schedule and mark what they saved. Our own loops save
with `save()`.
"""

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

COMPLETE = "complete"
PREFIX = "checkpoint-"


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(PREFIX))


@dataclass
class Checkpoints:
    """Where, and how often, a training saves what it needs to resume."""

    folder: Path
    every_s: float = 60.0
    # Told each step saved whole (the worker records it on the run).
    on_saved: Callable[[int], None] | None = None
    _last_save: float = field(default_factory=time.monotonic, init=False, repr=False)

    def due(self) -> bool:
        return time.monotonic() - self._last_save >= self.every_s

    def latest(self) -> Path | None:
        """The newest checkpoint written to the end, or None."""
        complete = [
            path
            for path in self.folder.glob(f"{PREFIX}*")
            if path.name.removeprefix(PREFIX).isdigit() and (path / COMPLETE).is_file()
        ]
        return max(complete, key=step_of, default=None)

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """`write(folder)` the state of `step` into a staging folder, mark it complete
        and rename it into place; then drop the older checkpoints."""
        target = self.folder / f"{PREFIX}{step}"
        staging = self.folder / f".{PREFIX}{step}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write(staging)
        (staging / COMPLETE).write_text(f"{step}\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        self._saved(step)
        return target

    def callback(self) -> TrainerCallback:
        """For a transformers/TRL trainer whose `output_dir` is `folder`: save when
        due, and mark each checkpoint complete once the trainer has written it."""
        return _SaveWhenDue(self)

    def _saved(self, step: int) -> None:
        self._last_save = time.monotonic()
        for older in self.folder.glob(f"{PREFIX}*"):
            if older.name.removeprefix(PREFIX).isdigit() and step_of(older) < step:
                shutil.rmtree(older, ignore_errors=True)
        if self.on_saved is not None:
            self.on_saved(step)


class _SaveWhenDue(TrainerCallback):
    def __init__(self, checkpoints: Checkpoints) -> None:
        self.checkpoints = checkpoints

    def on_step_end(self, args, state, control, **kwargs):
        if self.checkpoints.due() and state.global_step < state.max_steps:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        # Called once the trainer wrote checkpoint-<global_step> whole (weights,
        # optimizer, scheduler, RNG states, trainer state).
        saved = self.checkpoints.folder / f"{PREFIX}{state.global_step}"
        if saved.is_dir():
            (saved / COMPLETE).write_text(f"{state.global_step}\n")
            self.checkpoints._saved(state.global_step)
        return control


def save_args(checkpoints: Checkpoints | None) -> dict[str, Any]:
    """TrainingArguments for a trainer that saves when `checkpoints`' callback says
    (never by step count), or never."""
    if checkpoints is None:
        return {"save_strategy": "no"}  # the only save is the final model, by the caller
    return {"save_strategy": "steps", "save_steps": 10**9}
