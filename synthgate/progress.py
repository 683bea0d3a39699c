"""Progress display: a bar on a terminal, silence in CI, pipes and ``--json`` mode."""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_quiet = False


def set_quiet(value: bool) -> None:
    """Silence every progress bar (``--json`` and ``--quiet`` call this)."""
    global _quiet
    _quiet = value


def enabled_by_default() -> bool:
    if _quiet or os.environ.get("SYNTHGATE_QUIET") or os.environ.get("CI"):
        return False
    return sys.stderr.isatty()


def progress_bar(iterable: Iterable[T], *, desc: str = "", unit: str = "it", total: int | None = None,
                 enabled: bool | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when enabled, else return it unchanged."""
    if enabled is None:
        enabled = enabled_by_default()
    if not enabled or _quiet:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, unit=unit, total=total, leave=False, dynamic_ncols=True, file=sys.stderr))


class Progress:
    """A manually advanced bar (for loops that are not over an iterable)."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", enabled: bool | None = None):
        self._bar = None
        if (enabled if enabled is not None else enabled_by_default()) and not _quiet:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
