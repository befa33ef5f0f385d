"""The report's figures: matplotlib (Agg, no display, no global pyplot state) to PNG bytes.

Each function takes plain numbers (already computed from counts) and returns
the PNG of one figure; :func:`shared.report.html.figure` embeds it. Figures
are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas,
so nothing here touches pyplot's global state or needs a display, and
several reports can be drawn in one process.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Curve",
    "Panel",
    "Series",
    "bar_chart",
    "confusion_matrix",
    "histogram",
    "line_panels",
    "reliability_diagram",
    "roc_pr",
]

DPI = 100


@dataclass(frozen=True)
class Series:
    """One line of a line chart: ``x``, ``y`` (NaN = gap), legend label, emphasis."""

    x: Sequence[float]
    y: Sequence[float]
    label: str
    bold: bool = False
    dashed: bool = False


@dataclass(frozen=True)
class Panel:
    """One panel of :func:`line_panels`."""

    title: str
    xlabel: str
    ylabel: str
    series: Sequence[Series]
    ylim: tuple[float, float] | None = None


@dataclass(frozen=True)
class Curve:
    """A ROC and precision-recall curve of one evaluation set, with its operating point."""

    label: str
    fpr: Sequence[float]
    tpr: Sequence[float]
    recall: Sequence[float]
    precision: Sequence[float]
    auroc: float | None = None
    auprc: float | None = None
    operating: Mapping[str, float] | None = None  # fpr, tpr, precision, threshold
    prevalence: float | None = None
    extra_points: Sequence[Mapping[str, Any]] = field(default_factory=tuple)


def _new(width: float, height: float, ncols: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0].tolist()
    return fig, axes


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _finite(values: Sequence[float]) -> bool:
    return any(v is not None and math.isfinite(float(v)) for v in values)


def line_panels(panels: Sequence[Panel], *, width: float = 10.0, height: float = 3.6) -> bytes:
    """Side-by-side line charts (e.g. a metric and the training loss over rounds)."""
    fig, axes = _new(width, height, len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        shown = 0
        for s in panel.series:
            y = np.array([math.nan if v is None else float(v) for v in s.y], dtype=np.float64)
            if not np.isfinite(y).any():
                continue
            ax.plot(list(s.x), y, marker="o", markersize=4 if s.bold else 3, linewidth=2.6 if s.bold else 1.2,
                    linestyle="--" if s.dashed else "-", label=s.label)
            shown += 1
        if not shown:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#777777")
        ax.set_title(panel.title, fontsize=11)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if shown:
            ax.legend(fontsize=8, loc="best")
    return _png(fig)


def roc_pr(curves: Sequence[Curve]) -> bytes:
    """ROC (with the chance diagonal) and precision-recall curves, operating points marked."""
    fig, (roc, pr) = _new(10.0, 4.4, 2)
    roc.plot([0, 1], [0, 1], color="#999999", linewidth=1, linestyle=":", label="chance")
    for c in curves:
        label = c.label + (f" (AUROC {c.auroc:.3f})" if c.auroc is not None else "")
        line = roc.plot(c.fpr, c.tpr, linewidth=2, label=label)[0]
        color = line.get_color()
        pr.plot(c.recall, c.precision, linewidth=2, color=color,
                label=c.label + (f" (AP {c.auprc:.3f})" if c.auprc is not None else ""))
        if c.prevalence is not None:
            pr.axhline(c.prevalence, color=color, linewidth=1, linestyle=":")
        op = c.operating
        if op and _finite([op.get("fpr", math.nan), op.get("tpr", math.nan)]):
            roc.plot([op["fpr"]], [op["tpr"]], marker="*", markersize=15, color=color, markeredgecolor="black",
                     linestyle="none", label=f"operating point, threshold {op['threshold']:.3f}")
            if _finite([op.get("precision", math.nan)]):
                pr.plot([op["tpr"]], [op["precision"]], marker="*", markersize=15, color=color,
                        markeredgecolor="black", linestyle="none")
        for p in c.extra_points:
            roc.plot([p["fpr"]], [p["tpr"]], marker="o", markersize=7, color=color, markeredgecolor="black",
                     linestyle="none", fillstyle="none", label=p.get("label"))
    roc.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate (1 - specificity)",
            ylabel="true positive rate (sensitivity)", title="ROC")
    pr.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall (sensitivity)", ylabel="precision",
           title="precision-recall (dotted: prevalence)")
    for ax in (roc, pr):
        ax.grid(alpha=0.3)
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="lower right" if ax is roc else "lower left")
    return _png(fig)


def reliability_diagram(bins: Mapping[str, np.ndarray], ece: float | None, title: str) -> bytes:
    """Observed frequency against mean predicted probability per bin, with the bins' sizes below."""
    fig, (ax, counts) = _new(9.0, 4.0, 2)
    lower, upper = np.asarray(bins["lower"]), np.asarray(bins["upper"])
    n = np.asarray(bins["n"], dtype=np.float64)
    conf, obs = np.asarray(bins["confidence"]), np.asarray(bins["observed"])
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1, label="perfect calibration")
    ok = n > 0
    label = "this model" + (f" (ECE {ece:.3f})" if ece is not None else "")
    ax.plot(conf[ok], obs[ok], marker="o", linewidth=2, label=label)
    for c, o in zip(conf[ok], obs[ok], strict=True):
        ax.plot([c, c], [c, o], color="#d9534f", linewidth=1, alpha=0.7)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed frequency", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    counts.bar((lower + upper) / 2, n, width=(upper - lower) * 0.9, color="#8aa1c9")
    counts.set(xlim=(0, 1), xlabel="predicted probability", ylabel="images per bin", title="images per calibration bin")
    counts.grid(alpha=0.3)
    return _png(fig)


def confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> bytes:
    """A confusion matrix (rows: true class, columns: predicted class) with counts and row percentages."""
    m = np.asarray(matrix, dtype=np.float64)
    k = len(class_names)
    fig, (ax,) = _new(1.6 + 1.3 * k, 1.2 + 1.1 * k)
    rows = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(rows > 0, m / rows, 0.0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            pct = f"\n{100 * share[i, j]:.0f}% of row" if rows[i, 0] > 0 else ""
            ax.text(j, i, f"{int(m[i, j])}{pct}", ha="center", va="center", fontsize=9,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), [str(c) for c in class_names], rotation=20)
    ax.set_yticks(range(k), [str(c) for c in class_names])
    ax.set(xlabel="predicted", ylabel="true", title=title)
    ax.title.set_fontsize(10)
    return _png(fig)


def bar_chart(labels: Sequence[str], values: Sequence[float | None], *, ylabel: str, title: str,
              low: Sequence[float | None] | None = None, high: Sequence[float | None] | None = None,
              reference: float | None = None, reference_label: str = "pooled",
              ylim: tuple[float, float] | None = (0.0, 1.0)) -> bytes:
    """Bars (one per site or subgroup) with optional interval whiskers and a reference line."""
    fig, (ax,) = _new(max(4.5, 0.9 * len(labels) + 2.0), 3.6)
    y = np.array([math.nan if v is None else float(v) for v in values])
    x = np.arange(len(labels))
    ax.bar(x, np.nan_to_num(y), color=["#4c72b0" if math.isfinite(v) else "#dddddd" for v in y])
    if low is not None and high is not None:
        lo = np.array([math.nan if v is None else float(v) for v in low])
        hi = np.array([math.nan if v is None else float(v) for v in high])
        ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(y)
        ax.errorbar(x[ok], y[ok], yerr=[y[ok] - lo[ok], hi[ok] - y[ok]], fmt="none", ecolor="black", capsize=4,
                    label="95% interval")
    for xi, yi in zip(x, y, strict=True):
        ax.text(xi, (0 if not math.isfinite(yi) else yi) + 0.01, "n/a" if not math.isfinite(yi) else f"{yi:.3f}",
                ha="center", va="bottom", fontsize=8)
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="#d9534f", linestyle="--", linewidth=1.2,
                   label=f"{reference_label} {reference:.3f}")
    ax.set_xticks(x, list(labels), rotation=20 if len(labels) > 4 else 0)
    ax.set(ylabel=ylabel, title=title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3, axis="y")
    if (low is not None and high is not None) or reference is not None:
        ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def histogram(values: Sequence[float], *, xlabel: str, title: str, bins: int = 20,
              xlim: tuple[float, float] | None = (0.0, 1.0)) -> bytes:
    """The distribution of per-image values (e.g. Dice), with the mean marked."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(float(x))], dtype=np.float64)
    fig, (ax,) = _new(6.0, 3.4)
    if v.size:
        ax.hist(v, bins=bins, range=xlim, color="#4c72b0")
        ax.axvline(float(v.mean()), color="#d9534f", linestyle="--", label=f"mean {v.mean():.3f}")
        ax.legend(fontsize=8)
    ax.set(xlabel=xlabel, ylabel="images", title=title)
    ax.grid(alpha=0.3)
    return _png(fig)
