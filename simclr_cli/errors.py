"""User-facing errors: the CLI prints their message on one line and exits with code 1 (130: Interrupted)."""


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
