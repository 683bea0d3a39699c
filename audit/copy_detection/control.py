"""The copy check's positive control: planted near-copies of training images that the rule in force must catch.

Under the ratio rule (and ``any`` with it) every counted kind of copy is
planted (:data:`audit.core.controls.COPY_TRANSFORMS`: exact, noise 0.01 and
0.05, brightness, contrast, JPEG 80, gamma 0.85, blur 0.8, shifts of 1, 2
and 3 px, rescales of 1-5 %), at least one of each, and every one must be
caught.  Sources are drawn among training images the rule claims power on:

* content at least ``control_min_content`` (the RMS of the pooled image,
  mean removed, at the analysis size): a copy of a near-constant image cannot
  be told from a novel near-constant image by any pixel rule;
* no near-duplicate in the training set (when the training duplicate search
  ran): a copy of such an image is as near the duplicate as the source, so
  the ratio has no evidence (a stated limitation of the rule).

How many training images each criterion excluded is reported.  The tiled
rules plant their historical pixel-aligned set
(:data:`audit.core.controls.TRANSFORMS`) from any training image, as before.
The plants live in memory only.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from audit.core.base import Control
from audit.core.controls import COPY_TRANSFORMS, TRANSFORMS, plant

NAME = "planted near-copies"

#: ``catch(planted images at the audit geometry, source indices) -> (caught, nearest index, score text)``
Catch = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, list[str]]]


def planted_control(ctx, n_copies: int, real_loader, catch: Catch, shift_tolerant: bool,
                    content: np.ndarray | None = None, min_content: float = 0.0,
                    duplicated: set[int] | None = None, searched: list[int] | None = None) -> Control:
    """Plant near-copies of training images, decide them with ``catch``, require every one caught.

    ``duplicated`` holds the training images found in a near-duplicate pair;
    ``searched``, when the duplicate search queried only a sample, the
    images it queried (only those are known not to have a duplicate).
    """
    if n_copies <= 0:
        return Control(NAME, "positive", False, "control disabled (control_copies = 0)")
    n_real = len(ctx.real)
    rng = ctx.rng("copy_detection.control")
    if not shift_tolerant:  # the tiled rules' historical control
        transforms = TRANSFORMS
        sources = rng.choice(n_real, size=min(n_copies, n_real), replace=False)
        skipped: dict[str, int] = {}
        eligible = np.arange(n_real)
    else:
        transforms = COPY_TRANSFORMS
        ok = np.ones(n_real, bool)
        skipped = {}
        if content is not None:
            low = content < min_content
            skipped["content_below_floor"] = int(low.sum())
            ok &= ~low
        if duplicated:
            dup = np.zeros(n_real, bool)
            dup[list(duplicated)] = True
            skipped["near_duplicate_in_training"] = int((dup & ok).sum())
            ok &= ~dup
        if searched is not None:
            unknown = np.ones(n_real, bool)
            unknown[list(searched)] = False
            skipped["not_searched_for_duplicates"] = int((unknown & ok).sum())
            ok &= ~unknown
        eligible = np.nonzero(ok)[0]
        if len(eligible) == 0:
            return Control(NAME, "positive", False,
                           f"no training image qualifies as a control source ({_skips(skipped, min_content)}): the "
                           "rule cannot show that it catches a copy of any of them",
                           {"planted": 0, "caught": 0, "skipped_sources": skipped, "source_rule": _rule(min_content)})
        n = max(n_copies, len(transforms))
        sources = rng.choice(eligible, size=n, replace=len(eligible) < n)
    kinds = [transforms[i % len(transforms)] for i in range(len(sources))]
    planted = np.stack([plant(real_loader.one(int(src)), t, rng) for src, t in zip(sources, kinds)])
    caught, nearest, scores = catch(planted, np.asarray(sources))
    found_source = nearest == sources
    missed = [f"{t} ({sc})" for t, sc, c in zip(kinds, scores, caught) if not c]
    by_transform = {t: {"caught": int(sum(c for tt, c in zip(kinds, caught) if tt == t)), "planted": kinds.count(t)}
                    for t in dict.fromkeys(kinds)}
    detail = (f"caught {int(caught.sum())} of {len(caught)} planted near-copies"
              + (f"; missed {', '.join(missed)}" if missed else "")
              + f"; nearest training image was the source for {int(found_source.sum())} of {len(caught)}")
    metrics = {"planted": len(caught), "caught": int(caught.sum()), "by_transform": by_transform,
               "scores": scores}
    if shift_tolerant:
        detail += f"; sources: {_rule(min_content)} ({_skips(skipped, min_content)})"
        metrics.update({"skipped_sources": skipped, "source_rule": _rule(min_content),
                        "eligible_sources": len(eligible)})
    return Control(NAME, "positive", bool(caught.all()), detail, metrics)


def _rule(min_content: float) -> str:
    return (f"training images with content >= {min_content:g} (RMS of the pooled image, mean removed) and no "
            "near-duplicate in the training set")


def _skips(skipped: dict[str, int], min_content: float) -> str:
    if not skipped:
        return "none skipped"
    parts = []
    if "content_below_floor" in skipped:
        parts.append(f"{skipped['content_below_floor']} skipped for content < {min_content:g}")
    if "near_duplicate_in_training" in skipped:
        parts.append(f"{skipped['near_duplicate_in_training']} for a near-duplicate in training")
    if "not_searched_for_duplicates" in skipped:
        parts.append(f"{skipped['not_searched_for_duplicates']} outside the duplicate search's sample")
    return ", ".join(parts)
