"""Where a pretraining run is, and what it gives back: kept apart from the training code so that a
`--devices` launcher unpickles rank 0's result without importing it (torchvision alone took 4 s and more
on a 2-core CPU, at the end of every run)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from simclr_cli.images import Skipped


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    step_in_epoch: int = 0  # steps of the current epoch completed (non-zero after an interrupt)
    elapsed: float = 0.0  # seconds of training, summed over sessions
    images_seen: int = 0
    finished: bool = False
    # --max-time: a typical step's seconds (two are kept in reserve; PretrainRun._note_step) and the fraction of
    # the budget the schedule has reached (it never moves back), kept so that a resumed run goes on as it was.
    step_seconds: float = 0.0
    time_progress: float = 0.0
    loss_sum: float = 0.0  # the current epoch's losses and their steps, kept across an interrupt
    loss_steps: int = 0
    # Steps of the epochs completed, each in its own session's steps per epoch: a folder that gained or lost images
    # since gives the epochs left other steps, and the schedule's length follows.
    past_epoch_steps: int = 0


@dataclass
class PretrainResult:
    run_dir: Path
    encoder_path: Path | None
    state: LoopState
    final_loss: float | None  # the last epoch's mean loss (over the steps it took), not the last step's
    skipped: list[Skipped] = field(default_factory=list)
    interrupted: bool = False
