"""The audit: does a synthetic image set leak its training data, and is it worth releasing?

``audit.check(synthetic, real=..., holdout=..., model=..., policy=..., out=...)`` is the library
entry point (:mod:`audit.api`); it returns a typed :class:`~audit.core.result.Audit`.
``audit.read_audit(path)`` reads an ``audit.json`` back as a typed record (:mod:`audit.record`).
Importing this package is light (no torch): the checks load when they run.
"""
from __future__ import annotations

__all__ = ["check", "read_audit"]


def check(synthetic, **kwargs):
    """Audit a synthetic set; see :func:`audit.api.check`."""
    from .api import check as _check

    return _check(synthetic, **kwargs)


def read_audit(path):
    """Read an ``audit.json``; see :func:`audit.record.read_audit`."""
    from .record import read_audit as _read

    return _read(path)
