"""Exception types. User errors are subclasses of :class:`SafePTQError`; the CLI prints their
message on one line and exits with code 2."""

__all__ = [
    "SafePTQError",
    "ConfigError",
    "UnknownNameError",
    "DataError",
    "ModelError",
    "CalibrationError",
    "ExportError",
]


class SafePTQError(Exception):
    """Base class of every error safeptq raises on purpose (bad input, bad config)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep one clean line instead
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConfigError(SafePTQError, ValueError):
    """An option, recipe field or scheme is invalid."""


class UnknownNameError(SafePTQError, KeyError):
    """A registry was asked for a name it does not know."""


class DataError(SafePTQError, ValueError):
    """A dataset file is missing, unreadable or lacks the needed column."""


class ModelError(SafePTQError, ValueError):
    """A model cannot be found or lacks something required (e.g. a chat template)."""


class CalibrationError(SafePTQError, RuntimeError):
    """Calibration failed, e.g. a non-finite loss (reported with block and step)."""


class ExportError(SafePTQError, RuntimeError):
    """A checkpoint could not be exported or verified."""
