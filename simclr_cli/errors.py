"""User-facing errors: the CLI prints their message on one line and exits with code 1 (130: Interrupted)."""

from __future__ import annotations

import re


class SimclrError(Exception):
    """A problem the user can fix; the message says what happened and what to do."""


class ConfigError(SimclrError):
    """A flag or option has a value we cannot use."""


class DataError(SimclrError):
    """An input folder or file cannot be used."""


class ModelFileError(SimclrError):
    """A model, checkpoint or index file is missing, foreign or damaged."""


class Interrupted(SimclrError):
    """Stopped by a signal after saving progress; the message says how to continue."""


# PyTorch's words for a loader worker that ended without a Python error: killed (the kernel's OOM killer, a segfault,
# SIGBUS with /dev/shm full) or exited (os._exit), from its SIGCHLD handler and from DataLoader._try_get_data. A
# worker's own exception reaches the main process as itself ("Caught ValueError in DataLoader worker ..."), not so.
_PYTORCH_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? [\d, ]+\) (?:is )?"
                                  r"(killed by signal: [^.]*|exited unexpectedly(?: with exit code -?\d+)?)")


class WorkerDied(SimclrError):
    """A loader worker process died without a Python error, killed (often for memory) or crashed."""

    @staticmethod
    def how(error: BaseException) -> str | None:
        """How the worker died ("killed by signal: Killed") where `error` is PyTorch's report of a dead loader
        worker; None for any other error. A SIGCHLD handled while the DataLoader waits for a batch comes out as
        "exited unexpectedly", from the handler's error that says how."""
        how = _pytorch_words(error)
        return how and (_pytorch_words(error.__cause__) or how)

    @classmethod
    def saying(cls, how: str, then: str) -> "WorkerDied":
        return cls(f"a loader worker died ({how}), perhaps out of memory; {then}")


def _pytorch_words(error: BaseException | None) -> str | None:
    found = _PYTORCH_WORKER_DIED.match(str(error)) if isinstance(error, RuntimeError) else None
    return found.group(1) if found else None


def os_error_message(error: OSError) -> str:
    """One line for an OSError no check foresaw (a folder this user cannot write, a full disk): the file, what
    happened, what to do."""
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}; fix that, or pass another path, and run the command again"
