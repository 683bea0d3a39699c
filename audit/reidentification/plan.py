"""Who plays which role in the re-identification attack: identities, gallery, training, calibration, probes.

See :mod:`audit.reidentification.check` for what each role is for.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from synthgate.imageset import ImageSet
from synthgate.privacy import hash_id

#: fewest identities that can train a metric (2) and be calibrated with a two-fold negative control (2)
MIN_IDENTITIES = 2


@dataclass(frozen=True)
class Queries:
    """Images of one set matched against the gallery."""

    imageset: ImageSet
    indices: np.ndarray  # into ``imageset``
    ids: np.ndarray  # identity codes, shared with the gallery's
    self_index: np.ndarray  # the same image's gallery index, or -1 when it is not in the gallery

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def keys(self) -> list[str]:
        return [self.imageset.records[int(i)].key for i in self.indices]


@dataclass(frozen=True)
class Plan:
    """Who plays which role (see the module docstring)."""

    mode: str  # "patient" | "image"
    gallery_ids: np.ndarray
    gallery_patients: tuple[str | None, ...]  # salted hashes
    train: np.ndarray  # gallery indices the network trains on
    calibration: Queries
    probes: tuple[Queries, ...]
    source: str  # "holdout" | "split"
    notes: tuple[str, ...] = ()


@dataclass
class Embedded:
    emb: np.ndarray
    ids: np.ndarray
    self_index: np.ndarray

    @staticmethod
    def concat(parts: list["Embedded"]) -> "Embedded":
        return Embedded(np.concatenate([p.emb for p in parts]), np.concatenate([p.ids for p in parts]),
                        np.concatenate([p.self_index for p in parts]))


class NotEnoughData(Exception):
    """The inputs cannot train or calibrate a re-identification attack (the message says why)."""


def _codes(values: list[str]) -> dict[str, int]:
    return {v: i for i, v in enumerate(sorted(set(values)))}


def make_plan(real: ImageSet, holdout: ImageSet | None, calibration_fraction: float, control_images: int,
              rng: np.random.Generator) -> Plan:
    """Assign identities and roles; raises :class:`NotEnoughData` with the reason when impossible."""
    notes: list[str] = []
    pids = real.patient_ids
    counts = Counter(p for p in pids if p is not None)
    if real.has_patients and len(counts) == 1:
        raise NotEnoughData(f"the real set holds a single patient ({len(real)} images): whom a synthetic image "
                            "resembles cannot be told apart from chance without other patients; re-identification "
                            f"needs at least {2 * MIN_IDENTITIES} patients (or {MIN_IDENTITIES} plus a holdout of "
                            "other patients)")
    if real.has_patients and sum(c >= 2 for c in counts.values()) >= MIN_IDENTITIES:
        mode = "patient"
    else:
        mode = "image"
        why = ("the real set has no patient IDs" if not counts
               else f"patient IDs are missing on {sum(p is None for p in pids)} of {len(real)} images"
               if not real.has_patients else "almost every patient has a single image")
        notes.append(f"image-level identity: {why}, so each training image is its own identity, learned under "
                     "augmentation; a flag means a synthetic image is recognisably one particular training image")
    hold_pids = holdout.patient_ids if holdout is not None else []
    if mode == "patient":
        code = _codes(list(counts) + [p for p in hold_pids if p is not None])
        gallery_ids = np.array([code[p] for p in pids])
    else:
        code = {}
        gallery_ids = np.arange(len(real))
    patients = tuple(hash_id(p) if p is not None else None for p in pids)

    calibration, probes, source = _calibration_from_holdout(real, holdout, mode, code, counts, notes)
    withheld = np.zeros(len(real), bool)
    if calibration is None:
        calibration = _calibration_split(real, gallery_ids, mode, calibration_fraction, rng, notes)
        source = "split"
        withheld[calibration.indices] = True
    if mode == "patient":
        own = _probes_from_real(gallery_ids, withheld, control_images, rng)
        if len(own):
            probes = (Queries(real, own, gallery_ids[own], own),) + probes
            withheld[own] = True
    train = np.flatnonzero(~withheld)
    if len(np.unique(gallery_ids[train])) < MIN_IDENTITIES:
        raise NotEnoughData(f"only {len(np.unique(gallery_ids[train]))} identity is left to train the "
                            "re-identification network after setting calibration images aside")
    return Plan(mode, gallery_ids, patients, train, calibration, probes, source, tuple(notes))


def _calibration_from_holdout(real, holdout, mode, code, counts, notes):
    """``(calibration, probes, source)`` from the holdout set, or ``(None, (), "")`` when it cannot serve."""
    if holdout is None:
        return None, (), ""
    hold_pids = holdout.patient_ids
    if mode == "patient" and not holdout.has_patients:
        notes.append("the holdout has no patient IDs, so its patients cannot be shown to be unseen; it is not used "
                     "here, and the threshold is calibrated on a patient-disjoint split of the real set")
        return None, (), ""
    known = np.array([p is not None and p in counts for p in hold_pids], bool)
    probes: tuple[Queries, ...] = ()
    if known.any():
        shared = len({p for p, k in zip(hold_pids, known) if k})
        if mode == "patient":
            idx = np.flatnonzero(known)
            probes = (Queries(holdout, idx, np.array([code[hold_pids[i]] for i in idx]), np.full(len(idx), -1)),)
            notes.append(f"the holdout shares {shared} patient(s) with the training set ({int(known.sum())} images): "
                         "they are not unseen patients, so they serve as new images of training patients "
                         "(positive control), not for calibration")
        else:
            notes.append(f"the holdout shares {shared} patient(s) with the training set ({int(known.sum())} images); "
                         "those images are left out of calibration")
    unseen = np.flatnonzero(~known)
    if mode == "patient":
        ids = np.array([code[hold_pids[i]] for i in unseen], dtype=np.int64)
        if len(np.unique(ids)) < MIN_IDENTITIES:
            notes.append(f"the holdout has {len(np.unique(ids))} patient(s) not in the training set; calibrated on a "
                         "patient-disjoint split of the real set instead")
            return None, probes, ""
    else:
        ids = len(real) + unseen
        if len(unseen) < MIN_IDENTITIES:
            return None, probes, ""
        if not holdout.has_patients:
            notes.append("holdout images are taken to show people who are not in the training set (they carry no "
                         "patient IDs to check that)")
    return Queries(holdout, unseen, ids, np.full(len(unseen), -1)), probes, "holdout"


def _calibration_split(real, gallery_ids, mode, fraction, rng, notes) -> Queries:
    """A patient-disjoint (or image-disjoint) part of the real set, kept from network training."""
    identities = np.unique(gallery_ids)
    n_cal = max(MIN_IDENTITIES, int(round(fraction * len(identities))))
    if len(identities) - n_cal < MIN_IDENTITIES:
        what = "patients" if mode == "patient" else "images"
        raise NotEnoughData(f"the real set has {len(identities)} {what}: too few to split into a part that trains "
                            f"the network and a part that calibrates it (needs at least {2 * MIN_IDENTITIES}); "
                            "give a holdout set of other patients (--holdout)")
    chosen = rng.choice(identities, n_cal, replace=False)
    idx = np.flatnonzero(np.isin(gallery_ids, chosen))
    who = "patients" if mode == "patient" else "images"
    notes.append(f"no usable holdout: {n_cal} of {len(identities)} training {who} ({len(idx)} images) were set aside "
                 f"from network training to calibrate the threshold and check the network ({who[:-1]}-disjoint); "
                 "they stay in the gallery, and their own images are left out of their matches")
    return Queries(real, idx, gallery_ids[idx], idx)


def _probes_from_real(gallery_ids, withheld, limit, rng) -> np.ndarray:
    """One image each of up to ``limit`` training patients who keep at least one other training image."""
    free = ~withheld
    counts = Counter(gallery_ids[free].tolist())
    eligible = sorted(p for p, c in counts.items() if c >= 2)
    if not eligible or limit <= 0:
        return np.zeros(0, np.int64)
    chosen = rng.choice(eligible, min(limit, len(eligible)), replace=False)
    return np.sort([int(rng.choice(np.flatnonzero(free & (gallery_ids == p)))) for p in chosen]).astype(np.int64)


# ------------------------------------------------------------------ what the network trains and validates on


@dataclass(frozen=True)
class Part:
    """Images of one set that the network trains or validates on, with their identity codes."""

    imageset: ImageSet
    indices: np.ndarray
    ids: np.ndarray
    role: str  # "real" | "attacker"


@dataclass(frozen=True)
class TrainingData:
    """The network's training and validation images: the real training images and any attacker data.

    ``validation`` identities are disjoint from ``train``'s and from the
    unseen patients the check is judged on; they only decide when training
    stops.
    """

    train: tuple[Part, ...]
    validation: tuple[Part, ...]
    validation_source: str | None  # "attacker data" | "real training set" | None (no early stopping)
    attacker: dict  # counts only: never an attacker patient ID

    def identities(self, which: str) -> np.ndarray:
        parts = getattr(self, which)
        return np.concatenate([p.ids for p in parts]) if parts else np.zeros(0, np.int64)

    def keys(self, which: str) -> list[str]:
        return [f"{p.role}:{p.imageset.digest[:16]}:{p.imageset.records[int(i)].key}"
                for p in getattr(self, which) for i in p.indices]


def training_data(plan: Plan, real: ImageSet, attacker: tuple[ImageSet, ...] = (), validate: bool = True,
                  fraction: float = 0.2, max_identities: int = 100, rng: np.random.Generator | None = None,
                  ) -> TrainingData:
    """Split the network's data into training and validation identities.

    Attacker data (public images with patient IDs) adds identities: its
    patients are coded after every real identity, one namespace per set
    (patient IDs of two public sets are unrelated).  Validation identities
    come from the attacker data when there is any -- the hospital's own
    patients are the scarce data, and all of them train -- else from the
    real training identities: ``fraction`` of them, at least 2 and at most
    ``max_identities``, leaving at least 2 to train on.  ``validate=False``
    (or too few identities) sets none aside.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    real_part = Part(real, plan.train, plan.gallery_ids[plan.train], "real")
    offset = int(max(plan.gallery_ids.max(initial=-1), plan.calibration.ids.max(initial=-1))) + 1
    att_parts = []
    for s in attacker:
        code = _codes([p for p in s.patient_ids if p is not None])
        ids = np.array([offset + code[p] for p in s.patient_ids], dtype=np.int64)
        att_parts.append(Part(s, np.arange(len(s)), ids, "attacker"))
        offset += len(code)
    counts = {"sets": len(attacker), "images": int(sum(len(s) for s in attacker)),
              "patients": int(sum(s.n_patients for s in attacker))}
    if not validate:
        return TrainingData((real_part, *att_parts), (), None, counts)
    source, pool = ("attacker data", att_parts) if att_parts else ("real training set", [real_part])
    identities = np.unique(np.concatenate([p.ids for p in pool]))
    n_val = min(max_identities, max(MIN_IDENTITIES, int(round(fraction * len(identities)))))
    if len(identities) - n_val < (0 if att_parts else MIN_IDENTITIES):
        return TrainingData((real_part, *att_parts), (), None, counts)
    chosen = rng.choice(identities, n_val, replace=False)
    train, val = [real_part] if att_parts else [], []
    for p in pool:
        held = np.isin(p.ids, chosen)
        if (~held).any():
            train.append(Part(p.imageset, p.indices[~held], p.ids[~held], p.role))
        if held.any():
            val.append(Part(p.imageset, p.indices[held], p.ids[held], p.role))
    return TrainingData(tuple(train), tuple(val), source, counts)
