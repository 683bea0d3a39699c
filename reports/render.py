"""Render an ``audit.json`` as one self-contained HTML file (inline CSS, plots as data URIs).

Shareable by default: the report never shows real patient images, never
shows a synthetic image that a check flagged (by the audit's own finding it
is patient data), never prints a DICOM header value, and names real images
only by a salted hash of their path (hospital file names can carry MRNs).
``internal=True`` adds the flagged images next to their nearest training
image and the real paths, and marks every page as internal.

Check results feed plots through conventions in their ``data``:
``histograms`` (``{"edges", <series>: counts, "lines": {name: x}}`` or a
mapping of titles to such specs), ``roc`` (``{"fpr", "tpr"}`` or
``{name: {"fpr", "tpr"}}``) and
``table`` (``{"title", "columns", "rows"}``).
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import plots

if TYPE_CHECKING:  # pragma: no cover
    from audit.record import AuditRecord, CheckRecord, SetRecord

MAX_THUMBNAILS = 24
MAX_FLAGGED_ROWS = 200


def _is_estimate(value) -> bool:
    return isinstance(value, dict) and "value" in value and set(value) <= {"value", "ci", "n", "note"}


def _is_summary(value) -> bool:
    return isinstance(value, dict) and {"n", "min", "median", "max"} <= set(value)


def _fmt(value: Any) -> str:
    if _is_summary(value):
        return (f"median {_fmt(value['median'])} (5–95%: {_fmt(value.get('p05'))}–{_fmt(value.get('p95'))}; "
                f"range {_fmt(value['min'])}–{_fmt(value['max'])}; n={value['n']})")
    if _is_estimate(value):
        out = _fmt(value["value"])
        if value.get("ci"):
            out += f" [{_fmt(value['ci'][0])}, {_fmt(value['ci'][1])}]"
        if value.get("n") is not None:
            out += f" (n={value['n']})"
        if value.get("note"):
            out += f" — {value['note']}"
        return out
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "—"}[value]
    if isinstance(value, list):
        shown = ", ".join(_fmt(v) for v in value[:8])
        return f"[{shown}{', …' if len(value) > 8 else ''}]"
    return str(value)


def _rows(metrics: dict, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_estimate(value) and not _is_summary(value) and depth < 2:
            rows += _rows(value, name + " · ", depth + 1)
        else:
            rows.append((name, _fmt(value)))
    return rows


def _plots(data: dict, check: str) -> list[str]:
    out = []
    hist = data.get("histograms")
    if hist:
        specs = {check: hist} if "edges" in hist else hist
        out += [plots.histogram(spec, title) for title, spec in specs.items() if spec.get("edges")]
    if data.get("roc"):
        curves = {check: data["roc"]} if "fpr" in data["roc"] else data["roc"]  # one curve, or named curves
        out.append(plots.roc(curves, f"{check}: ROC (log-log)"))
    return out


def _table(table: dict | None) -> dict | None:
    """``{"title", "columns", "rows"}`` with rows as lists (a check may give rows as dicts)."""
    if not table or not table.get("rows"):
        return None
    rows = table["rows"]
    columns = table.get("columns") or (list(rows[0]) if isinstance(rows[0], dict) else [])
    return {"title": table.get("title") or "Results", "columns": columns,
            "rows": [[r.get(c) for c in columns] if isinstance(r, dict) else list(r) for r in rows]}


def _flagged(check: "CheckRecord") -> list[dict]:
    """Flagged images with their evidence (in the shareable edition real names are already hashed)."""
    rows = []
    for f in check.flagged[:MAX_FLAGGED_ROWS]:
        rows.append({"synthetic": f.synthetic, "reason": f.reason,
                     "evidence": ", ".join(f"{k}: {_fmt(v)}" for k, v in f.evidence.items() if v is not None)})
    return rows


def _subgroups(audit) -> dict | None:
    """The per-subgroup table (one row per column value) and its plots, or ``None`` without a subgroup analysis."""
    doc = getattr(audit, "model_extra", None) or {}
    sg = doc.get("subgroups")
    if not sg:
        return None
    rows, copy_points, reid_points = [], [], []

    def est(e):
        return "—" if not e else f"{_fmt(e.get('value'))} [{_fmt(e['ci'][0])}, {_fmt(e['ci'][1])}]" if e.get("ci") \
            else _fmt(e.get("value"))

    for column, values in (sg.get("table") or {}).items():
        for value, row in values.items():
            label = f"{column}={value}"
            comp = row.get("composition", {})
            cells = {"subgroup": label, "training": comp.get("training"), "synthetic": comp.get("synthetic", "—")}
            for part, key, points in (("copy", "rate", copy_points), ("reidentification", "rate", reid_points)):
                r = row.get(part)
                if r is None:
                    cells[part] = "—"
                    continue
                cells[part] = est(r.get(key)) + f" (n={r.get('n_synthetic_matched')})" if r.get("resolved") else \
                    "too small to resolve"
                e = r.get(key) or {}
                points.append({"label": label, "value": e.get("value"), "lo": (e.get("ci") or [0, 0])[0],
                               "hi": (e.get("ci") or [0, 0])[1], "resolved": r.get("resolved")})
            m = row.get("membership")
            cells["membership AUC"] = "—" if m is None else est(m.get("auc")) if m.get("resolved") else \
                "too small to resolve"
            u = row.get("utility")
            cells["utility drop"] = "—" if u is None else est(u.get("drop")) if u.get("resolved") else \
                "too small to resolve"
            rows.append(cells)
    limits = sg.get("limits") or {}
    figures = []
    if any(p["resolved"] for p in copy_points):
        figures.append(plots.subgroup_rates(copy_points, "copy rate by subgroup", limits.get("copy_rate")))
    if any(p["resolved"] for p in reid_points):
        figures.append(plots.subgroup_rates(reid_points, "re-identification rate by subgroup",
                                                   limits.get("reidentification_rate")))
    columns = ["subgroup", "training", "synthetic", "copy", "reidentification", "membership AUC", "utility drop"]
    return {"columns": columns, "rows": [[r[c] for c in columns] for r in rows], "plots": figures,
            "exceeded": sg.get("exceeded") or [], "unavailable": sg.get("unavailable") or [],
            "min_size": sg.get("min_size"), "judge": sg.get("judge")}


def _open_set(entry: "SetRecord | None"):
    from synthgate.imageset import ImageSet

    if entry is None or not Path(entry.path).is_dir():
        return None
    try:
        s = ImageSet(entry.path, skip_unreadable=True)
    except Exception:  # the report must render even if the data moved
        return None
    return s if s.digest == entry.sha256 else None


def _thumbnails(audit: "AuditRecord", synthetic, real, internal: bool) -> tuple[list[dict], list[dict], str | None]:
    """Released thumbnails (shareable) and flagged pairs (internal only)."""
    if synthetic is None:
        return [], [], "the synthetic set could not be opened (moved or changed since the audit); no thumbnails"
    index = {r.key: i for i, r in enumerate(synthetic.records)}
    # a flagged image is patient data by the audit's own finding, even when a 'warn' policy released it
    flagged = audit.flagged
    released = [k for k in audit.released if k in index and k not in flagged][:MAX_THUMBNAILS]
    thumbs = [{"key": k, "uri": plots.thumbnail_uri(synthetic.load(index[k]))} for k in released]
    pairs = []
    if internal:
        real_index = {r.key: i for i, r in enumerate(real.records)} if real is not None else {}
        for check in audit.checks:
            for f in check.flagged[:MAX_THUMBNAILS]:
                if f.synthetic not in index:
                    continue
                pair = {"check": check.name, "synthetic": f.synthetic,
                        "uri": plots.thumbnail_uri(synthetic.load(index[f.synthetic]))}
                if f.real in real_index:
                    pair["real"] = f.real
                    pair["real_uri"] = plots.thumbnail_uri(real.load(real_index[f.real]))
                pairs.append(pair)
    return thumbs, pairs, None


def build_context(audit: "AuditRecord | dict", internal: bool = False, synthetic=None, real=None,
                  sets: dict | None = None) -> dict:
    """Everything the template shows, already made safe for the chosen audience.

    The shareable edition is rendered from :func:`audit.shareable.shareable` of the document: every real
    name, patient ID and path in it is replaced, whatever field it sits in.
    """
    from audit.core.policy import policy_label
    from audit.record import AuditRecord, parse_audit

    original = audit if isinstance(audit, AuditRecord) else parse_audit(audit, "audit.json")
    if synthetic is None:
        synthetic = _open_set(original.inputs.synthetic)
    if real is None and internal:
        real = _open_set(original.inputs.real)
    if internal:
        audit = original
    else:
        from audit.shareable import shareable

        doc = original.to_dict()
        if (doc.get("edition") or {}).get("kind") != "shareable":
            doc = shareable(doc, sets)
        audit = parse_audit(doc, "audit.json")
    checks = []
    for c in audit.checks:
        checks.append({
            "name": c.name, "status": c.status, "reason": c.reason, "method": c.method,
            "references": c.references, "limitations": c.limitations,
            "thresholds": _rows(c.thresholds), "metrics": _rows(c.metrics),
            "controls": c.controls, "flagged": _flagged(c), "n_flagged": len(c.flagged),
            "plots": _plots(c.data, c.name), "table": _table(c.data.get("table")),
            "seconds": c.seconds,
        })
    thumbs, pairs, thumb_note = _thumbnails(audit, synthetic, real, internal)
    inputs = []
    for name in ("synthetic", "real", "holdout"):
        e = getattr(audit.inputs, name)
        if e is not None:  # the shareable edition names sets, never their paths (a path can name a patient)
            inputs.append({"name": name, "path": e.path if internal else f"the {name} set", "n": e.n_images,
                           "sha256": e.sha256, "skipped": e.skipped if internal else
                           [{"path": "(file name withheld)", "reason": s.get("reason", "")} for s in e.skipped]})
    for n, e in enumerate(audit.inputs.attacker_data, 1):  # public sets; counts and digest, never patient IDs
        extra = e.model_extra or {}
        inputs.append({"name": f"attacker data {n} ({extra.get('n_patients', '?')} patients)",
                       "path": e.path if internal else "the attacker data", "n": e.n_images, "sha256": e.sha256,
                       "skipped": e.skipped if internal else
                       [{"path": "(file name withheld)", "reason": s.get("reason", "")} for s in e.skipped]})
    model = audit.inputs.model
    if model is not None and not internal:
        model = {"path": "the audited model", "sha256": model.sha256}
    policy = audit.policy
    return {
        "audit": audit, "internal": internal, "checks": checks, "inputs": inputs, "model": model,
        "command": " ".join(audit.command or []) if internal else "(withheld from the shareable edition: it holds "
                                                                  "local paths)",
        "geometry": audit.inputs.geometry or {}, "policy": policy,
        "policy_label": policy_label(policy.name, policy.sha256) if policy is not None else "none",
        "policy_rules": list(policy.checks.items()) if policy is not None else [],
        "thumbnails": thumbs, "pairs": pairs, "thumb_note": thumb_note,
        "n_synthetic": audit.inputs.synthetic.n_images, "fmt": _fmt,
        "dropped": [{"key": k, "check": audit.dropped_evidence.get(k, {}).get("check", "")} for k in audit.dropped],
        "subgroups": _subgroups(audit),
    }


def render_html(audit: "AuditRecord | dict", internal: bool = False, synthetic=None, real=None,
                sets: dict | None = None) -> str:
    """The report as one HTML string."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("reports", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = _fmt
    css = (Path(__file__).parent / "templates" / "report.css").read_text()
    return env.get_template("report.html").render(css=css, esc=html.escape,
                                                  **build_context(audit, internal, synthetic, real, sets))
