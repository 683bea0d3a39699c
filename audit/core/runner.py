"""Run a policy's checks on an audit context: preflight every check, fit each once, score, drop, decide.

Every check first refuses unusable inputs (``preflight``) before any check
does work.  Each check is then *fitted* once on the real side (training
features, a trained attacker, holdout calibration, controls) and *scores*
the synthetic set; a ``drop`` round scores what remains with the same fitted
state, so re-auditing after a drop costs only the synthetic side.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from synthgate.errors import UsageError

from .base import Check, CheckResult, create_check
from .context import AuditContext
from .inputs import missing_requirements
from .policy import Policy


@dataclass
class Decision:
    """The gate's outcome: verdict, why, and which images were dropped by which check and why."""

    verdict: str
    reasons: list[str]
    dropped: dict[str, dict]  # synthetic key -> {"check": name, "reason": ...} (the finding that dropped it)
    rounds: list[dict]
    notes: list[str] = field(default_factory=list)  # e.g. real-side state restored from an earlier audit
    subgroups: dict | None = None  # the per-subgroup analysis, when the policy asks for one


def _files_of(keys: set[str], synthetic) -> set[str]:
    """Dropping one frame of a multi-frame file drops the whole file (a file is what ships)."""
    paths = {r.path for r in synthetic.records if r.key in keys}
    return {r.key for r in synthetic.records if r.path in paths}


def _without(ctx: AuditContext, dropped) -> AuditContext:
    keep = [i for i, r in enumerate(ctx.synthetic.records) if r.key not in dropped]
    sub = replace(ctx, synthetic=ctx.synthetic.subset(keep))
    sub.__dict__["geometry"] = ctx.geometry  # the same comparison geometry as the whole audit
    return sub


class _Checks:
    """The policy's checks, instantiated once, preflighted, and fitted at most once each."""

    def __init__(self, ctx: AuditContext, policy: Policy):
        self.rules = policy.checks
        self.names = list(policy.checks)
        try:
            self.checks: dict[str, Check] = {n: create_check(n, self.rules[n].settings) for n in self.names}
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        self.skipped: dict[str, CheckResult] = {}
        for n in self.names:  # every input problem is found before any check does work
            missing = missing_requirements(n, ctx)
            if missing and self.rules[n].required:
                raise UsageError(f"check {n} is required but needs {'; '.join(missing)}")
            if missing:
                self.skipped[n] = self.checks[n].result("skipped", "needs " + "; ".join(missing))
        for n in self.names:
            if n not in self.skipped:
                self.checks[n].preflight(ctx)
        self.ctx = ctx
        self.fitted: dict[str, Any] = {}
        self.fit_seconds: dict[str, float] = {}
        self.restored: list[str] = []  # checks whose real side came from the fitted-state store

    def _fit(self, check: Check) -> Any:
        """Fit on the real side, or restore a verified fitted state stored by an earlier audit."""
        ctx, store = self.ctx, self.ctx.fit_store
        key = None
        if store is not None:
            geo = ctx.geometry
            key = store.key(check.name, settings=check.params, seed=ctx.seed, device=ctx.torch_device.type,
                            geometry=[geo.height, geo.width, geo.channels],
                            real=ctx.real.digest if ctx.real is not None else None,
                            holdout=ctx.holdout.digest if ctx.holdout is not None else None,
                            attacker=[a.digest for a in ctx.attacker])
            state = store.load(key)
            if state is not None:
                self.restored.append(check.name)
                return check.from_state(ctx, state)
        fitted = check.fit(ctx)
        if store is not None and (state := check.fit_state(fitted)) is not None:
            store.save(key, state)
        return fitted

    def run(self, name: str, current: AuditContext) -> CheckResult:
        if name in self.skipped:
            return self.skipped[name]
        check = self.checks[name]
        if name not in self.fitted:
            start = time.perf_counter()
            self.fitted[name] = self._fit(check)
            self.fit_seconds[name] = time.perf_counter() - start
        start = time.perf_counter()
        result = check.score(current, self.fitted[name])
        return replace(result, seconds=self.fit_seconds[name] + time.perf_counter() - start)


def run_policy(ctx: AuditContext, policy: Policy, max_rounds: int = 3):
    """Run a policy's checks, apply its actions, and decide.

    Per-image checks run first on the whole set.  Images flagged by a check
    whose action is ``drop`` are removed and the per-image checks score what
    remains (privacy-enhancing sampling, as Packhäuser et al. 2023 filter
    synthetic chest X-rays), up to ``max_rounds``, each with the state it
    fitted on the real side once; set-level checks then run once on the final
    set.  If drops would remove more than the policy's ``max_drop_fraction``,
    the release is blocked instead.

    Returns ``(results, decision, final_context)``.
    """
    checks = _Checks(ctx, policy)
    names, rules = checks.names, checks.rules
    per_image = [n for n in names if checks.checks[n].per_image]
    set_level = [n for n in names if not checks.checks[n].per_image]
    n_total = len(ctx.synthetic)
    limit = policy.max_drop_fraction * n_total
    dropped: dict[str, dict] = {}
    rounds: list[dict] = []
    results: dict[str, CheckResult] = {}
    first: dict[str, CheckResult] = {}  # round 1 saw every synthetic image: the subgroup analysis reads it
    current = ctx
    for round_no in range(1, max_rounds + 1):
        new: dict[str, dict] = {}
        for n in per_image:
            r = results[n] = checks.run(n, current)
            first.setdefault(n, r)
            # a drop action removes every flagged image, also when the check only warns (e.g. matches within
            # the false-match rate): privacy-enhancing sampling filters each match, not only a significant excess
            if r.status in ("fail", "warn") and r.flagged and rules[n].action == "drop":
                why = {f.synthetic: f.reason for f in r.flagged}
                for key in sorted(_files_of(set(why), current.synthetic)):
                    new.setdefault(key, {"check": n, "reason": why.get(key, "another frame of this file was flagged")})
        rounds.append({"round": round_no, "images": len(current.synthetic), "dropped": len(new)})
        if not new:
            break
        dropped.update(new)
        if len(dropped) > limit or len(dropped) == n_total:
            break  # too much to filter: the last results stand and the gate blocks
        current = _without(ctx, dropped)
    over = len(dropped) > limit or (bool(dropped) and len(dropped) == n_total)
    if not over:
        for n in set_level:
            results[n] = checks.run(n, current)
    ordered = [results[n] for n in names if n in results]
    decision = _decide(ordered, rules, dropped, n_total, policy.max_drop_fraction, rounds)
    if policy.subgroups is not None:
        from .subgroups import analyse, reasons

        decision.subgroups = analyse(policy.subgroups, ctx, first, results)
        extra = reasons(decision.subgroups)
        if extra:
            decision.reasons += extra
            decision.verdict = "fail"
    decision.notes += [f"{n}: the real side (training features, calibration, controls) was restored from a "
                       "verified earlier audit of the same real data and settings" for n in checks.restored]
    if ctx.fit_store is not None:
        decision.notes += ctx.fit_store.notes
    return ordered, decision, current


#: statuses that carry evidence: the check ran and could vouch for its finding
CONCLUSIVE = ("pass", "warn", "fail")


def _decide(results, rules, dropped, n_total, max_drop, rounds) -> Decision:
    """Fail on any finding the policy blocks, any invalid check, and any required check without evidence.

    A required check must have run and been conclusive: ``skipped``,
    ``inconclusive`` or ``error`` is never part of a pass, whatever else the
    policy says.
    """
    reasons = []
    if dropped and (len(dropped) > max_drop * n_total or len(dropped) == n_total):
        reasons.append(f"drop actions would remove {len(dropped)} of {n_total} images, more than the policy's "
                       f"max_drop_fraction {max_drop:g}: the model leaks too much to filter")
    for r in results:
        rule = rules[r.name]
        if r.status == "error":
            reasons.append(f"{r.name}: invalid ({r.reason})")
        elif r.status == "fail" and rule.action in ("block", "drop"):
            reasons.append(f"{r.name}: fail ({r.reason})")
        elif r.status == "inconclusive" and (rule.on_inconclusive == "fail" or rule.required):
            reasons.append(f"{r.name}: inconclusive ({r.reason})")
        elif r.status not in CONCLUSIVE and rule.required:
            reasons.append(f"{r.name}: required but {r.status} ({r.reason}): a pass needs its evidence")
    return Decision("fail" if reasons else "pass", reasons, dropped, rounds)
