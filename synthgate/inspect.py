"""``synthgate inspect``: what does this folder hold, before anyone audits it?"""
from __future__ import annotations

from collections import Counter
from statistics import median

from .imageset import ImageSet


def summarize(imageset: ImageSet) -> dict:
    """A JSON-ready summary of a set; patients are counted, never named."""
    recs = imageset.records
    files = {r.path: r for r in recs}
    per_patient = Counter(r.patient_id for r in recs if r.patient_id is not None)
    notes = sorted({f"{r.path}: {n}" for r in recs for n in r.notes})
    return {
        "path": str(imageset.root),
        "digest": imageset.digest,
        "files": len(files),
        "images": len(recs),
        "formats": _count(r.format for r in files.values()),
        "sizes": _count(f"{r.height}x{r.width}" for r in recs),
        "channels": _count(str(r.channels) for r in recs),
        "bit_depths": _count(str(r.bit_depth) for r in recs),
        "source_modes": _count(r.source_mode for r in recs),
        "modalities": _count(r.modality for r in recs if r.modality),
        "transfer_syntaxes": _count(r.transfer_syntax for r in files.values() if r.transfer_syntax),
        "multi_frame_files": sum(1 for r in files.values() if r.n_frames > 1),
        "labels": {
            "source": imageset.label_source,
            "counts": _count(r.label for r in recs if r.label is not None),
            "unlabelled": sum(1 for r in recs if r.label is None),
        },
        "patients": {
            "source": imageset.patient_source,
            "count": len(per_patient),
            "images_without_patient": sum(1 for r in recs if r.patient_id is None),
            "images_per_patient": (
                {"min": min(per_patient.values()), "median": _num(median(per_patient.values())),
                 "max": max(per_patient.values())} if per_patient else None
            ),
        },
        "unreadable": [{"path": s.path, "reason": s.reason} for s in imageset.skipped],
        "conversion_notes": notes[:50] + ([f"... and {len(notes) - 50} more"] if len(notes) > 50 else []),
    }


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _count(values) -> dict[str, int]:
    return dict(sorted(Counter(values).items(), key=lambda kv: (-kv[1], kv[0])))


def format_text(summary: dict) -> str:
    def line(name: str, counts: dict) -> str:
        return f"  {name:<22} " + (", ".join(f"{k}: {v}" for k, v in counts.items()) or "-")

    s = summary
    out = [
        f"{s['path']}",
        f"  {'digest':<22} {s['digest']}",
        f"  {'images':<22} {s['images']} in {s['files']} file(s)"
        + (f" ({s['multi_frame_files']} multi-frame)" if s["multi_frame_files"] else ""),
        line("formats", s["formats"]),
        line("sizes", s["sizes"]),
        line("channels", s["channels"]),
        line("bit depths", s["bit_depths"]),
        line("pixel modes", s["source_modes"]),
    ]
    if s["modalities"]:
        out.append(line("modalities", s["modalities"]))
    if s["transfer_syntaxes"]:
        out.append(line("transfer syntaxes", s["transfer_syntaxes"]))
    lab = s["labels"]
    out.append(line(f"labels ({lab['source']})", lab["counts"])
               + (f"; {lab['unlabelled']} unlabelled" if lab["unlabelled"] else ""))
    pat = s["patients"]
    if pat["count"]:
        ipp = pat["images_per_patient"]
        out.append(f"  {'patients':<22} {pat['count']} (from {pat['source']}; images per patient "
                   f"min {ipp['min']}, median {ipp['median']}, max {ipp['max']}; IDs not shown)")
    else:
        out.append(f"  {'patients':<22} none recorded")
    if pat["images_without_patient"] and pat["count"]:
        out.append(f"  {'':<22} {pat['images_without_patient']} image(s) without a patient ID")
    if s["unreadable"]:
        out.append(f"  {'unreadable':<22} {len(s['unreadable'])} file(s) skipped:")
        out.extend(f"    {u['path']}: {u['reason']}" for u in s["unreadable"])
    if s["conversion_notes"]:
        out.append(f"  {'conversions':<22} {len(s['conversion_notes'])}:")
        out.extend(f"    {n}" for n in s["conversion_notes"])
    return "\n".join(out)
