"""Plots for the report, rendered with matplotlib (Agg) to PNG data URIs: no files, no network."""
from __future__ import annotations

import base64
import io


def _fig():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=110)
    return plt, fig, ax


def _uri(plt, fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def histogram(spec: dict, title: str, xlabel: str = "") -> str:
    """``spec``: ``{"edges": [...], "<series>": [counts...], ..., "lines": {name: x}}``."""
    plt, fig, ax = _fig()
    edges = spec["edges"]
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    series = [k for k, v in spec.items() if k not in ("edges", "lines", "xlabel") and isinstance(v, list)]
    for i, name in enumerate(series):
        counts = spec[name]
        total = max(sum(counts), 1)
        ax.bar(edges[:-1], [c / total for c in counts], width=widths, align="edge", alpha=0.55,
               label=f"{name} (n={sum(counts)})", color=f"C{i}")
    for j, (name, x) in enumerate((spec.get("lines") or {}).items()):
        if x is not None:
            ax.axvline(x, color=f"C{j + 3}", linestyle="--", linewidth=1.5, label=f"{name} = {x:.4g}")
    ax.set_xlabel(spec.get("xlabel", xlabel))
    ax.set_ylabel("fraction")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _uri(plt, fig)


def roc(curves: dict, title: str) -> str:
    """``curves``: ``{name: {"fpr": [...], "tpr": [...]}}``; log-log axes as low-FPR reporting asks."""
    plt, fig, ax = _fig()
    # the smallest resolvable rate is 1 / (number of non-members): the axis starts there, not lower
    positive = [f for c in curves.values() for f in c.get("fpr", []) if f > 0]
    floor = min(positive) if positive else 1e-3
    for i, (name, c) in enumerate(curves.items()):
        if c.get("fpr"):
            ax.plot([max(f, floor) for f in c["fpr"]], [max(t, floor) for t in c["tpr"]], label=name, color=f"C{i}")
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _uri(plt, fig)


def subgroup_rates(points: list[dict], title: str, limit: float | None = None) -> str:
    """One point per subgroup with its interval: ``[{"label", "value", "lo", "hi", "resolved"}]``."""
    plt, fig, ax = _fig()
    shown = [p for p in points if p.get("resolved") and p.get("value") is not None]
    ys = list(range(len(shown)))
    for y, p in zip(ys, shown):
        ax.errorbar(p["value"], y, xerr=[[p["value"] - p["lo"]], [p["hi"] - p["value"]]], fmt="o", color="C0",
                    capsize=3)
    if limit is not None:
        ax.axvline(limit, color="C3", linestyle="--", linewidth=1.5, label=f"per-subgroup limit {limit:g}")
        ax.legend(fontsize=7)
    ax.set_yticks(ys)
    ax.set_yticklabels([p["label"] for p in shown], fontsize=7)
    ax.set_xlabel("rate (95% interval)")
    ax.set_title(title, fontsize=10)
    return _uri(plt, fig)


def thumbnail_uri(image, size: int = 96) -> str:
    """A float image ``(H, W, C)`` in [0, 1] as a small PNG data URI."""
    import numpy as np
    from PIL import Image

    x = np.asarray(image, np.float32)
    x = x[..., 0] if x.shape[-1] == 1 else x
    img = Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8))
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
