"""Resumable checkpoints: everything a run needs to continue bit for bit.

A checkpoint is one file ``step-NNNNNNNN.pt`` (``torch.save`` of tensors and
plain values, read back with ``weights_only=True``) in the run's checkpoint
folder, written atomically.  It holds the network, optimizer, LR schedule,
EMA, the data sampler and every random generator's state, the DP
accountant's history and noise multiplier, the loss history, and the config
and training-set digest it belongs to: resuming with another config or
another training set is refused.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

from synthgate.errors import InputError, UsageError
from synthgate.fsutil import atomic_write_bytes

FORMAT = 1
KEEP = 2  # the newest checkpoints kept; older ones are removed after a new one is written
RUN_ONLY = frozenset({"checkpoint_every"})  # may change between a run and its resumption
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def default_folder(out: str | Path) -> Path:
    """``MODEL-checkpoints`` next to the model directory."""
    out = Path(out)
    return out.parent / f"{out.name}-checkpoints"


def save(folder: str | Path, step: int, state: dict) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and prune the oldest."""
    import torch

    folder = Path(folder)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "step": int(step), **state}, buf)
    path = atomic_write_bytes(folder / f"step-{step:08d}.pt", buf.getvalue())
    for old in list_checkpoints(folder)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def load(path: str | Path, config: dict, training_sha256: str) -> dict:
    """Read a checkpoint, checking it belongs to this config and training set."""
    import torch

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike mean: not a usable checkpoint
        raise InputError(f"cannot read the checkpoint ({' '.join(str(exc).split())[:160]})", path) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError("is not a synthgate training checkpoint", path)
    if state.get("training_sha256") != training_sha256:
        raise UsageError("was made from a different training set (digest differs); resume with the same set "
                         "or start a new run", path)
    saved = state.get("config") or {}
    changed = sorted(k for k in set(config) | set(saved) if k not in RUN_ONLY and config.get(k) != saved.get(k))
    if changed:
        raise UsageError(f"was made with a different training config ({', '.join(changed)} differ); resume with "
                         "the same settings or start a new run", path)
    return state
