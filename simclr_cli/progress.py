"""Draws the engine's progress reports: rich bars on a terminal, plain lines otherwise."""

from __future__ import annotations

import math
import os
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.text import Text

from simclr_cli.config import format_duration

# Long paths stay on one line; no markup, so that a path like "photo [edited].jpg" prints as it is.
class _Console(Console):
    def on_broken_pipe(self) -> None:
        """A reader that went away (`simclr similar ... | head`, a `tee` killed) silences the output and the work
        goes on: rich's own exits with 1, in the middle of a training run too."""
        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.file.fileno())


console = _Console(highlight=False, soft_wrap=True, markup=False)
err_console = _Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def labelled(label: str, style: str, text: str) -> Text:
    """`label` in `style` ("red"), then `text` exactly as it is: "error: ...", "warning: ..."."""
    return Text.assemble((label, style), " ", text)


# Without a live bar, a log gets a progress line at most this often: one line per epoch made 800 of them for
# `--epochs 800` on a small folder.
PLAIN_SECONDS = 30.0
# The window rich estimates the speed over, far longer than any step: with rich's default of 30 s it kept one sample
# per window, so steps longer than that (resnet50 at 224 px on a small CPU) had no speed, and no time remaining all run.
SPEED_WINDOW_SECONDS = 4 * 3600.0


def draws_live(console: Console) -> bool:
    """Whether a live bar can redraw itself on `console`: an interactive terminal, and one for real.

    On a dumb terminal (TERM=dumb: Emacs' shell, IDE consoles) rich's Live never refreshes, so a bar showed nothing
    until the end; and FORCE_COLOR=1 (set in many CIs) makes a log file pass for a terminal, where the bar wrote its
    cursor codes into the log ten times a second.
    """
    if not console.is_interactive:  # False on a dumb terminal
        return False
    try:
        return os.isatty(console.file.fileno())
    except (AttributeError, OSError, ValueError):  # no descriptor (io.StringIO, a test runner's capture), or closed
        return False


def _expected_total(step: int, total_steps: int, progress: float) -> int:
    """The steps the run will take: `total_steps`, or under a time budget, fewer at the pace so far (progress is
    (step + 0.5) / total_steps when the steps are further along than the time)."""
    return min(total_steps, max(step, round((step + 0.5) / max(progress, 1e-9))))


class Reporter:
    """A `report(kind, **fields)` callable for the engine. `quiet` keeps errors and warnings only."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.live = draws_live(console) and not quiet
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.loss: float | None = None
        self._line_at = -math.inf  # when plain output last printed a progress line
        self._epoch_at = -math.inf  # when the epoch under way started: a long epoch always gets its line
        self._held: str | None = None  # the latest epoch line left out, printed at the end if no line came after it
        self._epochs_seen = 0

    def __call__(self, kind: str, **fields: Any) -> None:
        getattr(self, f"on_{kind}", self.on_other)(**fields)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self._held is not None:  # the last epoch a time budget, an interrupt or an error ended on
            self._line(self._held)

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _print(self, text: str) -> None:
        (self.progress.console if self.progress else console).print(text)

    def _line(self, text: str) -> None:
        """A progress line of plain output; `console.get_time` (time.monotonic) times them."""
        console.print(text)
        self._line_at, self._held = console.get_time(), None

    def _waited(self, since: float) -> bool:
        return console.get_time() - since >= PLAIN_SECONDS

    def on_other(self, **fields: Any) -> None:
        pass

    def on_message(self, text: str) -> None:
        if not self.quiet:
            self._print(text)

    def on_stopping(self, text: str) -> None:
        """The answer to a first Ctrl-C or SIGTERM, from another thread (rich's console is safe there); said even
        when quiet, as the error it stands in for would be."""
        progress = self.progress  # read once: close() may set it to None in between
        (progress.console if progress else err_console).print(text)

    def on_budget(self, text: str) -> None:
        """Why a time budget ends the run: after the epoch line held back, which tells of the steps before it."""
        if self._held is not None:
            self._line(self._held)
        self.on_message(text)

    def on_warning(self, text: str) -> None:
        if self.progress:
            self.progress.console.print(labelled("warning:", "yellow", text))
        else:
            err_console.print(labelled("warning:", "yellow", text))

    def on_start(self, total_steps: int, start_step: int = 0, max_time: float | None = None, **_: Any) -> None:
        if self.quiet:
            return
        if not self.live:
            # A time budget ends most runs before their step count: that is only the most they could take.
            steps = f"up to {total_steps - start_step} steps (time budget {format_duration(max_time)})" if max_time \
                else f"{total_steps - start_step} steps"
            self._line(f"training for {steps}")
            self._epoch_at = self._line_at
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
            speed_estimate_period=SPEED_WINDOW_SECONDS,
        )
        self.progress.start()
        self.task = self.progress.add_task("pretrain", total=total_steps, completed=start_step, stats="")

    def on_step(self, step: int, epoch: int, lr: float, images_per_s: float, total_steps: int,
                progress: float, loss: float | None = None, **_: Any) -> None:
        if loss is not None:
            self.loss = loss
        if self.quiet:
            return
        loss_text = f"loss {self.loss:.4f}" if self.loss is not None else "loss …"
        stats = f"epoch {epoch}  {loss_text}  lr {lr:.3g}  {images_per_s:,.0f} img/s"
        total = _expected_total(step, total_steps, progress)  # with a time budget, the steps it leaves at this pace
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=step, total=total, stats=stats)
        elif self._waited(max(self._line_at, self._epoch_at)):  # in an epoch too long for its line to be enough
            self._line(f"step {step}/{total_steps}  {stats}" if total == total_steps
                       else f"step {step} of about {total}  {stats}")

    def on_epoch(self, epoch: int, epochs: int, loss: float, images_per_s: float, **_: Any) -> None:
        if self.quiet:
            return
        text = f"epoch {epoch}/{epochs}: loss {loss:.4f}, {images_per_s:,.1f} images/s"
        self._epochs_seen += 1
        if self.live:
            self._print(text)
        elif self._epochs_seen == 1 or epoch >= epochs or self._waited(min(self._line_at, self._epoch_at)):
            self._line(text)
        else:
            self._held = text
        self._epoch_at = console.get_time()

    def on_done(self, **_: Any) -> None:
        self.close()
