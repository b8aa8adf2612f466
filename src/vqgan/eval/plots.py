"""Report charts with matplotlib, returned as PIL images: line charts (training curves), bars (code histograms)
and histograms (per-image PSNR, one set or several overlaid).

Figures are drawn on the Agg canvas directly (no pyplot, so no global state, no display and no backend choice).
Legends sit outside the plotting area, to the right, where they never cover a line.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

DPI = 100


def _figure(size: tuple[int, int]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _image(fig) -> Image.Image:
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", color="grey", transform=ax.transAxes)


def _legend(ax) -> None:
    """The legend outside the axes, on the right: it never covers a line."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False, fontsize=8)


def _finite(xs: Sequence[float], ys: Sequence[float], log_y: bool) -> tuple[list[float], list[float]]:
    keep = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y) and (not log_y or y > 0)]
    return [x for x, _ in keep], [y for _, y in keep]


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, size=(640, 360),
              log_y: bool = False, xlabel: str = "step", ylabel: str = "",
              marks: Sequence[tuple[float, str]] = ()) -> Image.Image:
    """A line chart of {name: (xs, ys)}; points that are missing or not finite are left out. `log_y`: a log scale,
    or a symmetric log scale (linear near 0) where some values are <= 0 (losses with an entropy bonus, likelihoods),
    so that no curve loses its negative part. `marks`: (x, label) pairs drawn as labelled vertical lines (where a
    scene or a frame starts)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(size)
    ax.set_title(title, fontsize=10)
    finite = [y for _, ys in series.values() for y in ys if y is not None and math.isfinite(y)]
    signed = log_y and any(y <= 0 for y in finite)
    drawn, whole = 0, True
    for name, (xs, ys) in series.items():
        xs, ys = _finite(xs, ys, log_y and not signed)
        if xs:
            ax.plot(xs, ys, label=name, linewidth=1.5, marker="." if len(xs) < 20 else None)
            drawn += 1
            whole = whole and all(float(x).is_integer() for x in xs)
    if not drawn:
        _no_data(ax)
    else:
        if signed:
            ax.set_yscale("symlog", linthresh=max(1e-4, 0.01 * max(abs(y) for y in finite)))
            ax.axhline(0.0, color="grey", linewidth=0.8)
        elif log_y:
            ax.set_yscale("log")
        if whole:  # steps: no ticks at 1.25 or 2.5
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for x, label in marks:
            ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=7, color="dimgrey")
        _legend(ax)
        ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _image(fig)


def bar_plot(values: Sequence[float], title: str, size=(640, 200), xlabel: str = "rank", ylabel: str = "count",
             log_y: bool = False) -> Image.Image:
    """Bars for a histogram, one per value in order (e.g. how often each code is used, sorted)."""
    fig, ax = _figure(size)
    ax.set_title(title, fontsize=10)
    if len(values):
        ax.bar(np.arange(len(values)), values, width=1.0, color="tab:blue", linewidth=0)
        if log_y and max(values) > 0:
            ax.set_yscale("log")
        ax.set_xlim(-0.5, len(values) - 0.5)
    else:
        _no_data(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _image(fig)


def histogram_plot(values: Sequence[float] | dict[str, Sequence[float]], title: str, xlabel: str, bins: int = 30,
                   size=(640, 300), ylabel: str = "images") -> Image.Image:
    """A histogram of `values` (e.g. per-image PSNR), its mean marked; or of {name: values}: the sets overlaid as
    outlines on shared bins, each mean a dashed line of its colour."""
    fig, ax = _figure(size)
    ax.set_title(title, fontsize=10)
    sets = values if isinstance(values, dict) else {None: values}
    finite = {name: [v for v in vs if v is not None and math.isfinite(v)] for name, vs in sets.items()}
    pooled = [v for vs in finite.values() for v in vs]
    if pooled:
        edges = np.histogram_bin_edges(pooled, bins=bins)
        for i, (name, vs) in enumerate(finite.items()):
            if not vs:
                continue
            mean = float(np.mean(vs))
            if name is None:
                ax.hist(vs, bins=edges, color="tab:blue", alpha=0.85)
                ax.axvline(mean, color="tab:red", linewidth=1.5, label=f"mean {mean:.4g}")
            else:
                color = f"C{i % 10}"
                ax.hist(vs, bins=edges, histtype="step", linewidth=1.8, color=color, label=f"{name} (mean {mean:.4g})")
                ax.axvline(mean, color=color, linewidth=1.2, linestyle="--")
        _legend(ax)
    else:
        _no_data(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _image(fig)
