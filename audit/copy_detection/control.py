"""The copy check's positive control: planted near-copies of training images that the rule in force must catch.

Under the ratio rule (and ``any`` with it) every counted kind of copy is
planted (:data:`audit.core.controls.COPY_TRANSFORMS`: exact, noise 0.01 and
0.05, brightness, contrast, JPEG 80, gamma 0.85, blur 0.8, shifts of 1, 2
and 3 px, rescales of 1-5 %; and the inverted image when the rule's
``inverted`` test is on), at least one of each, and every one must be
caught.  Sources are drawn among training images the rule claims power on:

* content at least ``control_min_content`` (the RMS of the pooled image,
  mean removed, at the analysis size): a copy of a near-constant image cannot
  be told from a novel near-constant image by any pixel rule;

and, when any of those has a near-duplicate in the training set (the same
patient scanned twice, a follow-up), one copy of every kind is made from
such *sibling* sources: a copy of one is as near its sibling as its source,
so a rule whose second distance did not look past the source's group would
miss it (the ratio rule's grouped second distance must catch it).  How many
training images the content floor excluded, and how the sibling plants
fared, is reported.  The tiled
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
                    duplicated: set[int] | None = None, extra: tuple[str, ...] = ()) -> Control:
    """Plant near-copies of training images, decide them with ``catch``, require every one caught.

    ``duplicated`` holds the training images found in a near-duplicate pair
    (the whole training set searched): one copy of each kind is planted from
    those among the eligible sources, when there are any.  ``extra`` adds
    kinds to the ratio rule's set (``inverted`` when that test is on).
    """
    if n_copies <= 0:
        return Control(NAME, "positive", False, "control disabled (control_copies = 0)")
    n_real = len(ctx.real)
    rng = ctx.rng("copy_detection.control")
    if not shift_tolerant:  # the tiled rules' historical control
        transforms = TRANSFORMS
        # every kind at least once: with control_copies 1 one exact copy was the whole control, which any
        # threshold above 0 catches (a red-team policy passed noisy copies with threshold 1e-6 that way)
        n = max(n_copies, len(transforms))
        sources = rng.choice(n_real, size=n, replace=n > n_real)
        sibling = np.zeros(len(sources), bool)
        skipped: dict[str, int] = {}
        eligible = np.arange(n_real)
    else:
        transforms = COPY_TRANSFORMS + tuple(extra)
        ok = np.ones(n_real, bool)
        skipped = {}
        if content is not None:
            low = content < min_content
            skipped["content_below_floor"] = int(low.sum())
            ok &= ~low
        eligible = np.nonzero(ok)[0]
        if len(eligible) == 0:
            return Control(NAME, "positive", False,
                           f"no training image qualifies as a control source ({_skips(skipped, min_content)}): the "
                           "rule cannot show that it catches a copy of any of them",
                           {"planted": 0, "caught": 0, "skipped_sources": skipped, "source_rule": _rule(min_content)})
        n = max(n_copies, len(transforms))
        siblings = np.array(sorted(set(eligible.tolist()) & (duplicated or set())), np.int64)
        first = rng.choice(siblings, size=len(transforms), replace=len(siblings) < len(transforms)) \
            if len(siblings) else np.zeros(0, np.int64)
        rest = rng.choice(eligible, size=n - len(first), replace=len(eligible) < n - len(first))
        sources = np.concatenate([first, rest])
        sibling = np.isin(sources, siblings)
    kinds = [transforms[i % len(transforms)] for i in range(len(sources))]
    planted = np.stack([plant(real_loader.one(int(src)), t, rng) for src, t in zip(sources, kinds)])
    caught, nearest, scores = catch(planted, np.asarray(sources))
    found_source = nearest == sources
    missed = [f"{t}{' of an image with a training near-duplicate' if sib else ''} ({sc})"
              for t, sc, c, sib in zip(kinds, scores, caught, sibling) if not c]
    by_transform = {t: {"caught": int(sum(c for tt, c in zip(kinds, caught) if tt == t)), "planted": kinds.count(t)}
                    for t in dict.fromkeys(kinds)}
    detail = (f"caught {int(caught.sum())} of {len(caught)} planted near-copies"
              + (f"; missed {', '.join(missed)}" if missed else ""))
    metrics = {"planted": len(caught), "caught": int(caught.sum()), "by_transform": by_transform,
               "scores": scores}
    if shift_tolerant:
        n_sib = int(sibling.sum())
        detail += (f" ({int(caught[sibling].sum())} of {n_sib} copies of images that have a near-duplicate in the "
                   "training set)" if n_sib else " (no eligible training image has a near-duplicate in the training "
                   "set, so none of the copies tests that case)")
    detail += f"; nearest training image was the source for {int(found_source.sum())} of {len(caught)}"
    if shift_tolerant:
        detail += f"; sources: {_rule(min_content)} ({_skips(skipped, min_content)})"
        metrics.update({"skipped_sources": skipped, "source_rule": _rule(min_content),
                        "eligible_sources": len(eligible),
                        "with_training_duplicate": {"planted": int(sibling.sum()),
                                                    "caught": int(caught[sibling].sum()),
                                                    "eligible_sources": int(len(siblings))}})
    return Control(NAME, "positive", bool(caught.all()), detail, metrics)


def _rule(min_content: float) -> str:
    return (f"training images with content >= {min_content:g} (RMS of the pooled image, mean removed), one copy "
            "of each kind from images that have a near-duplicate in the training set when there are any")


def _skips(skipped: dict[str, int], min_content: float) -> str:
    if not skipped:
        return "none skipped"
    parts = []
    if "content_below_floor" in skipped:
        parts.append(f"{skipped['content_below_floor']} skipped for content < {min_content:g}")
    return ", ".join(parts)
