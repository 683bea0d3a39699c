"""The library entry point: :func:`check` audits a synthetic set against the real data under a policy.

The ``audit check`` command, the demo and the tests all call it::

    import audit

    result = audit.check("synthetic/", real="real/train", holdout="real/holdout", policy="default",
                         out="synthetic-audit")
    result.verdict          # "pass" | "fail"
    result.released         # the images that may ship
    result.to_dict()        # the audit.json document
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from synthgate.errors import EmptySetError, InputError, MissingInputError
from synthgate.imageset import ImageSet
from synthgate.outputs import OutputFolder, refuse_overlap

from .core.context import AuditContext
from .core.fitstore import FitStore
from .core.inputs import check_attacker_data, check_model_training_set, check_overlap, resolve_inputs
from .core.policy import Policy, load_policy
from .core.result import Audit, write_outputs
from .core.runner import run_policy


def _load_attacker(load, path: Path) -> ImageSet:
    try:
        return load(path)
    except EmptySetError:
        raise InputError("attacker data holds no images (--attacker-data)", path) from None


def default_out(synthetic: str | Path) -> Path:
    """``SYNTHETIC-audit`` next to the synthetic set."""
    s = Path(synthetic).resolve()
    return s.parent / f"{s.name}-audit"


def check(synthetic: str | Path, *, real: str | Path | None = None, holdout: str | Path | None = None,
          model: str | Path | None = None, policy: str | Path | Policy = "default",
          checks: Sequence[str] | None = None, params: Mapping[str, Mapping[str, Any]] | None = None,
          out: str | Path | None = None, seed: int = 0, device: str = "auto", skip_unreadable: bool = False,
          max_pixels: int | None = None, progress: bool | None = None, command: Sequence[str] | None = None,
          report: Callable[[dict, Path, ImageSet, dict], None] | None = None, cluster: str | None = None,
          attacker_data: Sequence[str | Path] | None = None) -> Audit:
    """Audit ``synthetic`` and return the typed :class:`~audit.core.result.Audit`.

    Parameters
    ----------
    synthetic
        The synthetic image set.  Its ``manifest.json`` names the real set
        and the model when ``real`` / ``model`` are not given.
    real, holdout, model
        The real training set, unseen real images (calibration, false-alarm
        rates, membership non-members) and the model directory.
    policy
        A built-in policy name, a policy file, or an already validated
        :class:`~audit.core.policy.Policy`.
    checks, params
        Run only these checks (each then required), and override check
        settings (``{"copy_detection": {"rule": "holdout"}}``); both are
        validated with the policy, before any work.
    attacker_data
        Public labelled image sets with patient IDs (same modality) that the
        re-identification attacker trains and validates on together with the
        real training set, as a real attacker would (Packhaeuser et al. 2022
        trained on ChestX-ray14).  Refused when empty, without patient IDs,
        or overlapping the audited sets.
    out
        When given, write ``audit.json``, the checks' own files and (with
        ``report``) the report there, atomically.
    report
        ``report(document, path, synthetic_set, real_sets)`` renders the
        report into the output folder (``reports.cli.write_report`` does);
        ``real_sets`` (``{"real": ..., "holdout": ...}``) tell the shareable
        edition which names to hide.
    cluster
        A Ray cluster's address (``ray://HOST:PORT``, ``HOST:PORT``, ``auto``
        or ``local``; default: ``SYNTHGATE_RAY_ADDRESS``, else none): copy
        detection's ratio rule then decodes, featurises and searches the
        training set on its workers, with results identical to one process.
    """
    if not isinstance(policy, Policy):
        policy = load_policy(policy, only=list(checks) if checks else None, overrides=params)
    inputs = resolve_inputs(synthetic, real, holdout, model)
    from synthgate.cluster import address, connect

    where = address(cluster)
    ray = connect(where) if where else None  # a missing Ray or an unreachable cluster: an error before any work
    attacker_paths = [Path(p) for p in attacker_data or ()]
    for p in attacker_paths:
        if not p.exists():
            raise MissingInputError("attacker data folder does not exist (--attacker-data)", p)
    if out is not None:  # before any work: an output never equals, contains or lies inside an input
        refuse_overlap(out, {"synthetic": inputs.synthetic, "real": inputs.real, "holdout": inputs.holdout,
                             "model": inputs.model, "policy": policy.path,
                             **{f"attacker data {p}": p for p in attacker_paths}})
        OutputFolder(out, "audit check").check()
        from synthgate.signing import load_signing_key

        load_signing_key()  # a missing or unsafe key file fails now, not after hours of work

    def load(path):
        if path is None:
            return None
        s = ImageSet(path, skip_unreadable=skip_unreadable, max_pixels=max_pixels)
        s.verify()  # every unreadable image is found now, before hours of work
        return s

    synth, real_set, hold_set = load(inputs.synthetic), load(inputs.real), load(inputs.holdout)
    attacker = tuple(_load_attacker(load, p) for p in attacker_paths)
    with tempfile.TemporaryDirectory(prefix="synthgate-audit-") as work:
        workdir = Path(work) / "files"
        ctx = AuditContext(synthetic=synth, real=real_set, holdout=hold_set, model=inputs.model, device=device,
                           seed=seed, workdir=workdir if out is not None else None, progress=progress,
                           fit_store=FitStore.default(), cluster=ray, attacker=attacker)
        check_overlap(ctx)
        check_model_training_set(ctx)
        check_attacker_data(ctx, {"synthetic": inputs.synthetic, "real": inputs.real, "holdout": inputs.holdout})
        results, decision, _ = run_policy(ctx, policy)
        result = Audit(synthetic=synth, real=real_set, holdout=hold_set, model=inputs.model,
                       geometry=ctx.geometry, policy=policy, results=tuple(results), decision=decision, seed=seed,
                       device=device, command=command, notes=tuple(inputs.notes), attacker=attacker)
        if out is not None:
            document = result.to_dict()
            workdir.mkdir(parents=True, exist_ok=True)
            if report is not None:
                report(document, workdir / "report.html", synth, {"real": real_set, "holdout": hold_set})
            left_alone, written = write_outputs(Path(out), document, workdir)
            result = replace(result, left_alone=tuple(left_alone), written=written)
    return result
