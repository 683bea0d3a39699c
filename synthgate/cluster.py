"""Running work on a Ray cluster, when one machine is not enough.

``--cluster ray://HOST:PORT`` (or ``HOST:PORT`` of a Ray head, or the
environment variable ``SYNTHGATE_RAY_ADDRESS``) connects to an existing Ray
cluster; ``--cluster local`` starts a Ray instance on this machine (for
trying it out).  Ray is an optional extra (``pip install "synthgate[cluster]"``);
without it the commands say how to install it and exit 2.

What runs where is decided by the caller; this module only connects, maps a
function over shards of work with Ray's retries (a task whose worker dies is
re-run), and gives results back in order, so that a cluster run produces
exactly what a single process would.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Sequence

from .errors import MissingDependencyError, UsageError

ENV = "SYNTHGATE_RAY_ADDRESS"
#: retries of a task whose worker died (Ray re-runs it; results are identical by construction)
RETRIES = 3


def address(flag: str | None) -> str | None:
    """The cluster address from ``--cluster`` or ``SYNTHGATE_RAY_ADDRESS`` (``None``: run here, no Ray)."""
    value = flag if flag is not None else os.environ.get(ENV)
    if value is None or not str(value).strip():
        return None
    value = str(value).strip()
    if value != "local" and not (value.startswith("ray://") or ":" in value or value == "auto"):
        raise UsageError(f"--cluster {value!r} must be ray://HOST:PORT, HOST:PORT of a Ray head, auto or local")
    return value


def require_ray():
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError(f"--cluster needs Ray, which is not installed ({exc}); install it with "
                                     'pip install "synthgate[cluster]"') from None
    return ray


def connect(where: str):
    """Connect to the cluster at ``where`` (or start a local instance for ``local``); returns the ray module."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
    try:
        if where == "local":
            ray.init(**kwargs)
        else:
            ray.init(address=where, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"cannot connect to the Ray cluster at {where} ({' '.join(str(exc).split())[:200]})") from None
    return ray


def imap_ordered(ray, fn: Callable, shards: Sequence, *, num_cpus: float = 1, num_gpus: float = 0,
                 shared: Iterable = ()) -> Iterator:
    """``fn(*shared, shard)`` for every shard as Ray tasks (retried on worker death), yielded in order.

    ``shared`` values are put in the object store once and passed to every
    task (a model folder's path, a sampler's settings).  Results are fetched
    one at a time, in order, so the driver holds one shard's result at once.
    """
    refs_shared = [ray.put(v) for v in shared]
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=RETRIES,
                        retry_exceptions=False)(_call)
    futures = [remote.remote(fn, *refs_shared, shard) for shard in shards]
    for future in futures:
        yield ray.get(future)


FAULT_ENV = "SYNTHGATE_FAULT_ONCE"


def _call(fn, *args):
    # Fault injection for the test suite: with SYNTHGATE_FAULT_ONCE=PATH set on the workers, the first task to
    # run creates PATH and kills its own worker process, as a crashed node would; Ray re-runs the task.
    marker = os.environ.get(FAULT_ENV)
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os._exit(1)
    return fn(*args)
