"""One exception hierarchy for synthgate.

Every error a user can cause derives from :class:`SynthgateError`; the CLI maps
those to exit code 2 with their one-line message.  Subclasses also inherit the
closest built-in, so callers can catch ``ValueError`` or ``FileNotFoundError``
as they would anywhere else (scikit-learn's ``NotFittedError`` habit).
"""
from __future__ import annotations

from pathlib import Path


class SynthgateError(Exception):
    """Base of every error synthgate raises on purpose.

    Parameters
    ----------
    message
        What is wrong, in one line.
    path
        The file or folder concerned; prefixed to the message so the user
        sees which input to fix.
    """

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(str(self.message).split())  # never more than one line
        return f"{self.path}: {text}" if self.path else text


class UsageError(SynthgateError, ValueError):
    """A wrong flag, option value or combination of options."""


class ConfigError(SynthgateError, ValueError):
    """A policy, training config or other configuration file is invalid."""


class InputError(SynthgateError, ValueError):
    """An input file or folder cannot be used as given."""


class ImageReadError(InputError):
    """An image file is corrupt, truncated, unsupported or unsafe to decode."""


class EmptySetError(InputError):
    """An image set holds no images."""


class MetadataError(InputError):
    """``metadata.csv`` is malformed or disagrees with the files."""


class MissingInputError(SynthgateError, FileNotFoundError):
    """A path the user named does not exist."""


class IntegrityError(SynthgateError, ValueError):
    """Files changed since they were hashed (audit, manifest or bundle)."""


class MissingDependencyError(SynthgateError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


def require(module: str, extra: str | None = None, purpose: str = ""):
    """Import an optional module or raise :class:`MissingDependencyError`.

    Never swallow an ``ImportError`` silently: the user learns what to install.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on environment
        hint = f'pip install "synthgate[{extra}]"' if extra else f"pip install {module}"
        why = f" for {purpose}" if purpose else ""
        raise MissingDependencyError(f"{module} is needed{why} but is not importable ({exc}); {hint}") from exc
