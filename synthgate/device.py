"""Choose the compute device once, at the edge (``--device auto|cpu|cuda``)."""
from __future__ import annotations

import os

from .errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | None = None):
    """Return a ``torch.device``.

    ``auto`` (the default, or ``SYNTHGATE_DEVICE``) picks CUDA when available,
    else CPU.  ``cuda`` without a GPU is a usage error, never a silent CPU run.
    ``cuda:N`` selects a GPU.
    """
    import torch

    name = (name or os.environ.get("SYNTHGATE_DEVICE") or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu or auto")
        return torch.device(name)
    raise UsageError(f"--device {name!r} must be one of `auto`, `cpu` or `cuda` (or `cuda:N`)")


def prefer_passive_waiting() -> None:
    """Let OpenMP threads sleep rather than spin while they wait (``OMP_WAIT_POLICY=PASSIVE``), unless set.

    Must run before torch is imported (the OpenMP runtime reads it once, at
    load): the command-line entry points call it first.  On a busy machine a
    spinning worker steals the core its partner needs; bench/threads.py
    measures the difference.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """The CPU threads a command uses when neither ``--threads`` nor ``SYNTHGATE_THREADS`` says: the idle cores.

    That is ``cores`` minus the machine's one-minute load average (rounded),
    at least 1.  Small networks (every network of the ``tiny`` preset, the
    audit's attackers and classifiers) are synchronisation-bound: a thread
    that must wait for a core it shares with another process holds up every
    other thread at each operation, so asking for more threads than there are
    idle cores makes a run many times slower (bench/threads.py, on this
    project's 2-core machines: one thread about ten times faster than two
    while another process was busy), while on an idle machine every core is
    used.  The count is decided once, when the command starts.
    """
    cores = cores if cores is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # Windows: no load average; use every core
            load = 0.0
    return max(1, cores - round(load))


def set_threads(n: int | None) -> int:
    """Set torch's CPU thread count; returns the count in force.

    ``n`` (``--threads``), else ``SYNTHGATE_THREADS``, else
    :func:`default_threads` -- never torch's own default (every core, busy or
    not).  Small networks on a few loaded cores are memory- and
    synchronisation-bound: on this project's 2-core machines one thread was
    measured about ten times faster than two while another process was busy.
    """
    import torch

    value = n if n is not None else os.environ.get("SYNTHGATE_THREADS")
    if value is not None and str(value).strip():
        try:
            count = int(value)
        except ValueError:
            raise UsageError(f"--threads {value!r} must be a positive whole number") from None
        if count < 1:
            raise UsageError(f"--threads {count} must be at least 1")
    else:  # never more than torch's own default (physical cores, or OMP_NUM_THREADS)
        count = min(default_threads(), torch.get_num_threads())
    torch.set_num_threads(count)
    return torch.get_num_threads()
