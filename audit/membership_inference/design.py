"""The membership-inference design: which members and non-members are drawn, their folds, halves and groups.

Members are training images (the real set), non-members holdout images
(real, never trained on).  Images of one patient are alike, so everything
that splits the sample splits it by patient: the DOMIAS cross-fitting folds,
the selection / evaluation halves of the attack choice, the null control's
relabellings and the bootstrap's resampling units.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synthgate.imageset import ImageSet


@dataclass(frozen=True)
class Sample:
    """The balanced, seeded evaluation sample and its splits (members first, then non-members)."""

    members: np.ndarray  # indices into the real set
    nonmembers: np.ndarray  # indices into the holdout
    fold: np.ndarray  # (2n,) DOMIAS cross-fitting fold of each evaluated image
    select: np.ndarray  # (2n,) True: in the half that chooses the deciding attack
    holdout_fold: np.ndarray  # fold of every holdout image (its patient's)
    groups: np.ndarray  # (2n,) patient (or image) of each evaluated image: the bootstrap resamples these

    @property
    def labels(self) -> np.ndarray:
        return np.r_[np.ones(len(self.members), np.int8), np.zeros(len(self.nonmembers), np.int8)]

    @property
    def n(self) -> int:
        return len(self.members)


def group_split(groups: list, rng: np.random.Generator) -> np.ndarray:
    """Split items into two halves of (nearly) equal size without splitting a group; True = first half."""
    order: dict = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    keys = list(order)
    out = np.zeros(len(groups), bool)
    size = [0, 0]
    shuffled = rng.permutation(len(keys))
    # largest groups first (random order among equals), each to the smaller half: balanced halves
    for j in sorted(shuffled, key=lambda j: -len(order[keys[j]])):
        part = 0 if size[0] <= size[1] else 1
        idx = order[keys[j]]
        out[idx] = part == 0
        size[part] += len(idx)
    return out


def groups_of(imageset: ImageSet) -> list:
    return [r.patient_id if r.patient_id else f"image:{i}" for i, r in enumerate(imageset.records)]


def shared_patients(real: ImageSet, hold: ImageSet) -> int:
    a = {r.patient_id for r in real.records if r.patient_id}
    b = {r.patient_id for r in hold.records if r.patient_id}
    return len(a & b)


def make_sample(real: ImageSet, hold: ImageSet, n_samples: int, rng: np.random.Generator) -> Sample:
    """A balanced sample of members (real) and non-members (holdout) with its folds, halves and groups."""
    n = min(n_samples, len(real), len(hold))
    hold_groups = groups_of(hold)
    holdout_fold = (~group_split(hold_groups, rng)).astype(np.int8)
    nonmembers = np.sort(rng.choice(len(hold), size=n, replace=False))
    members = np.sort(rng.choice(len(real), size=n, replace=False))
    nm_fold = holdout_fold[nonmembers]
    m_fold = rng.permutation(np.sort(nm_fold))  # the same fold sizes for members
    real_groups = groups_of(real)
    m_select = group_split([real_groups[i] for i in members], rng)
    nm_select = group_split([hold_groups[i] for i in nonmembers], rng)
    groups = np.array([f"m:{real_groups[i]}" for i in members] + [f"h:{hold_groups[i]}" for i in nonmembers],
                      object)
    return Sample(members, nonmembers, np.r_[m_fold, nm_fold], np.r_[m_select, nm_select],
                  holdout_fold, groups)
