"""Figures: sample grids, denoising animations, 1-D/2-D sample plots, curves.

Everything here writes a file and returns its path; nothing is shown on screen
(matplotlib runs on the Agg backend). Images are channels-last arrays in
[-1, 1] ([N, H, W, C], C = 1 or 3); toy samples are [N] or [N, D].

The figures follow the source documents: the sample grid and the two
denoising animations of seed 000 (the noisy z_t and the model's prediction of
x_0 at every step, here side by side in one GIF), and the histogram and
trajectory plots of seed 002 (paths coloured by the mode they end in).
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

PathLike = str | os.PathLike


def _makedirs_for(path: PathLike) -> None:
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)


def _save_figure(fig, path: PathLike) -> str:
    _makedirs_for(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return os.fspath(path)


# ---------------------------------------------------------------------------
# Image grids and animations.
# ---------------------------------------------------------------------------


def to_uint8(images) -> np.ndarray:
    """Map images in [-1, 1] to uint8 in [0, 255] (values outside are clipped)."""
    x = np.asarray(images, dtype=np.float32)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def image_grid(images, nrow: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile images [N, H, W, C] in [-1, 1] into one uint8 array [H', W', C].

    ``nrow`` is the number of images per row (default ceil(sqrt(N))); images
    are separated by ``pad`` white pixels, and empty cells are white. Each
    image is first enlarged ``scale`` times (nearest neighbour; for tiny
    images such as the 8x8 digits).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape [N, H, W, C] with C in (1, 3), got {images.shape}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    ncol_rows = math.ceil(n / nrow)
    grid = np.full((pad + ncol_rows * (h + pad), pad + nrow * (w + pad), c), 255, np.uint8)
    for i, img in enumerate(to_uint8(images)):
        r, k = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[top:top + h, left:left + w] = img
    return grid


def _to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def display_scale(height: int, min_pixels: int = 32) -> int:
    """The nearest-neighbour enlargement that shows images of ``height`` rows at >= min_pixels
    (8x8 digits x4; 32x32 images and larger x1)."""
    return max(1, min_pixels // height)


def save_image_grid(path: PathLike, images, nrow: int | None = None, pad: int = 2, scale: int = 1) -> str:
    """Write images [N, H, W, C] in [-1, 1] as one PNG grid (see ``image_grid``)."""
    _makedirs_for(path)
    _to_pil(image_grid(images, nrow, pad, scale)).save(path)
    return os.fspath(path)


def _palette_frames(arrays: list[np.ndarray]) -> list[Image.Image]:
    """uint8 frames [H, W, C] as palette images sharing one palette.

    Per-frame palettes make delta-encoded GIF frames decode wrongly, so every
    frame gets the same one: the 256 grey levels (exact) for C = 1, or 256
    colours fitted to the first, middle and last frames for C = 3.
    """
    if arrays[0].shape[-1] == 1:
        grey = np.repeat(np.arange(256, dtype=np.uint8), 3).tolist()
        frames = [Image.fromarray(a[..., 0]) for a in arrays]
        for f in frames:
            f.putpalette(grey)
        return frames
    palette = Image.fromarray(np.concatenate([arrays[0], arrays[len(arrays) // 2], arrays[-1]])).quantize(256)
    return [Image.fromarray(a).quantize(palette=palette, dither=Image.Dither.NONE) for a in arrays]


def save_denoising_gif(path: PathLike, xt_traj, x0_traj, nrow: int | None = None,
                       max_frames: int = 100, frame_ms: int = 60, hold_last_ms: int = 1500,
                       pad: int = 2, scale: int = 1) -> str:
    """The two denoising animations of seed 000 side by side in one GIF.

    ``xt_traj`` and ``x0_traj`` have shape [S, N, H, W, C] (step-major, from
    pure noise to the end of sampling): the noisy x_t at each step and the
    model's prediction of x_0 from it. Each frame shows the x_t grid on the
    left and the x_0-prediction grid on the right. Long trajectories are
    thinned to at most ``max_frames`` evenly spaced steps, always keeping the
    first and the last; the last frame is held for ``hold_last_ms``. ``nrow``,
    ``pad`` and ``scale`` lay out each grid (``image_grid``).
    """
    xt_traj, x0_traj = np.asarray(xt_traj), np.asarray(x0_traj)
    if xt_traj.shape != x0_traj.shape or xt_traj.ndim != 5:
        raise ValueError("xt_traj and x0_traj must both have shape [S, N, H, W, C], got "
                         f"{xt_traj.shape} and {x0_traj.shape}")
    if max_frames < 2:
        raise ValueError(f"max_frames must be >= 2, got {max_frames}")
    steps = xt_traj.shape[0]
    idx = np.unique(np.round(np.linspace(0, steps - 1, min(steps, max_frames))).astype(int))
    arrays = []
    for i in idx:
        left, right = image_grid(xt_traj[i], nrow, pad, scale), image_grid(x0_traj[i], nrow, pad, scale)
        gap = np.full((left.shape[0], 4 * pad, left.shape[2]), 255, np.uint8)
        arrays.append(np.concatenate([left, gap, right], axis=1))
    frames = _palette_frames(arrays)
    durations = [frame_ms] * (len(frames) - 1) + [hold_last_ms]
    _makedirs_for(path)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0,
                   optimize=False)
    return os.fspath(path)


# ---------------------------------------------------------------------------
# Toy data: 1-D histograms, 2-D scatter plots, trajectories.
# ---------------------------------------------------------------------------


def _as_1d(samples, name: str = "samples") -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape [N] or [N, 1], got {x.shape}")
    return x


def plot_1d_samples(path: PathLike, samples, log_prob_fn: Callable | None = None,
                    bins: int = 100, title: str | None = None) -> str:
    """Histogram (as a density) of 1-D samples, with the data density exp(log_prob_fn) on top.

    ``log_prob_fn`` maps an array [M, 1] to log-densities [M] (the toy data
    sets' exact ``log_prob``).
    """
    x = _as_1d(samples)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(x, bins=bins, density=True, color="C0", alpha=0.6, label=f"samples (n={len(x)})")
    if log_prob_fn is not None:
        lo, hi = np.min(x), np.max(x)
        margin = 0.1 * (hi - lo + 1e-6)
        grid = np.linspace(lo - margin, hi + margin, 500)
        density = np.exp(np.asarray(log_prob_fn(grid[:, None].astype(np.float32))))
        ax.plot(grid, density, color="k", lw=1.5, label="data density")
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)


def _as_2d(samples, name: str) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"{name} must have shape [N, 2], got {x.shape}")
    return x


def plot_2d_samples(path: PathLike, samples, data=None, log_prob_fn: Callable | None = None,
                    title: str | None = None, max_points: int = 5000) -> str:
    """Scatter of 2-D samples over the data: contours of exp(log_prob_fn) and/or data points.

    ``data`` is an array [M, 2] of data samples drawn in grey under the model's
    samples; ``log_prob_fn`` maps [K, 2] to log-densities [K]. At most
    ``max_points`` points of each are drawn. The axes frame the data when
    given (samples outside are counted in the legend), else the samples.
    """
    x = _as_2d(samples, "samples")[:max_points]
    d = None if data is None else _as_2d(data, "data")[:max_points]
    fig, ax = plt.subplots(figsize=(5, 5))
    pts = x if d is None else d
    lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    margin = (0.15 if d is None else 0.3) * (hi - lo + 1e-6)
    lo, hi = lo - margin, hi + margin
    outside = int(np.sum(np.any((x < lo) | (x > hi), axis=1)))
    if log_prob_fn is not None:
        gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
        grid = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)
        density = np.exp(np.asarray(log_prob_fn(grid))).reshape(gx.shape)
        ax.contour(gx, gy, density, levels=8, cmap="viridis", linewidths=1.0, zorder=3)
    if d is not None:
        ax.scatter(d[:, 0], d[:, 1], s=3, c="0.6", alpha=0.5, label=f"data (n={len(d)})")
    label = f"samples (n={len(x)}" + (f", {outside} outside the frame)" if outside else ")")
    ax.scatter(x[:, 0], x[:, 1], s=3, c="C3", alpha=0.6, label=label)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=8, markerscale=3)
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)


def plot_trajectories(path: PathLike, traj, modes: Sequence[float] | None = None,
                      steps=None, num_paths: int = 200, xlabel: str = "generation step",
                      title: str | None = None) -> str:
    """Paths of 1-D samples through time, as in seed 002.

    ``traj`` has shape [S, N] or [S, N, 1] (step-major), recorded at the
    x-axis values ``steps`` [S] (default 0..S-1). Each path is coloured by the
    mode its final value is nearest to (``modes``, a list of centres); without
    ``modes`` by the sign of the final value, as in seed 002.
    """
    traj = np.asarray(traj, dtype=np.float64)
    if traj.ndim == 3 and traj.shape[-1] == 1:
        traj = traj[..., 0]
    if traj.ndim != 2:
        raise ValueError(f"traj must have shape [S, N] or [S, N, 1], got {traj.shape}")
    paths = traj[:, :num_paths]
    final = paths[-1]
    if modes is None:
        colour = (final > 0).astype(int)
    else:
        colour = np.argmin(np.abs(final[:, None] - np.asarray(modes, dtype=np.float64)[None]), axis=1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = np.arange(paths.shape[0]) if steps is None else np.asarray(steps)
    if steps.shape != (paths.shape[0],):
        raise ValueError(f"steps must have one value per record, shape ({paths.shape[0]},), got {steps.shape}")
    for j in range(paths.shape[1]):
        ax.plot(steps, paths[:, j], c=f"C{colour[j] % 10}", alpha=0.15, lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("x")
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------
# Training curves and ablation charts.
# ---------------------------------------------------------------------------


def read_jsonl(path: PathLike) -> list[dict]:
    """The records of a JSON-lines file (one JSON object per line; blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _curves(metrics) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Normalise metrics into {name: (steps, values)}.

    Accepts a JSONL path, a list of records (dicts with a ``step`` field and
    scalar metrics; a metric missing from a record is skipped there), or a dict
    {name: values} / {name: (steps, values)}.
    """
    if isinstance(metrics, (str, os.PathLike)):
        metrics = read_jsonl(metrics)
    if isinstance(metrics, Mapping):
        out = {}
        for name, v in metrics.items():
            if isinstance(v, tuple) and len(v) == 2:
                out[name] = (np.asarray(v[0], np.float64), np.asarray(v[1], np.float64))
            else:
                vals = np.asarray(v, np.float64)
                out[name] = (np.arange(len(vals), dtype=np.float64), vals)
        return out
    series: dict[str, tuple[list, list]] = {}
    for i, rec in enumerate(metrics):
        step = rec.get("step", i)
        for name, v in rec.items():
            if name == "step" or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            series.setdefault(name, ([], []))
            series[name][0].append(step)
            series[name][1].append(v)
    return {k: (np.asarray(s, np.float64), np.asarray(v, np.float64)) for k, (s, v) in series.items()}


def plot_loss_curves(path: PathLike, metrics, keys: Sequence[str] | None = None,
                     log_y: bool | None = None, title: str | None = None) -> str:
    """One panel per metric against the training step.

    ``metrics`` is a metrics JSONL file, a list of records, or a dict (see
    ``_curves``); ``keys`` selects metrics (default: all). ``log_y`` uses a log
    axis (default: when a curve is positive and spans more than a decade).
    """
    curves = _curves(metrics)
    keys = list(keys) if keys is not None else sorted(curves)
    missing = [k for k in keys if k not in curves]
    if missing or not keys:
        raise ValueError(f"keys {missing or keys} not found; available metrics: {sorted(curves)}")
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, k in zip(axes.ravel(), keys):
        steps, vals = curves[k]
        ax.plot(steps, vals, lw=1.0)
        finite = vals[np.isfinite(vals)]
        use_log = log_y if log_y is not None else bool(
            finite.size and finite.min() > 0 and finite.max() > 10 * finite.min())
        if use_log:
            ax.set_yscale("log")
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("step")
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_ablation(path: PathLike, rows: Iterable[Mapping], metrics: Sequence[str],
                  label: str = "name", x: str | None = None, log_x: bool = False,
                  title: str | None = None) -> str:
    """Chart an ablation table given as rows (dicts), one panel per metric.

    Without ``x``: a horizontal bar per row, labelled by ``rows[i][label]`` on the
    shared y axis, in the rows' order; a panel whose values are all positive and
    span more than a factor of 10 gets a log axis. With ``x`` (e.g. the number of
    sampling steps): one line per distinct ``label`` value, the metric against
    ``x`` (on a log axis with ``log_x``). Rows missing a metric (or with a
    non-finite value) are left out of that panel.
    """
    rows = list(rows)
    if not rows or not metrics:
        raise ValueError("plot_ablation needs at least one row and one metric")
    for key in [label] + ([x] if x else []):
        if any(key not in r for r in rows):
            raise ValueError(f"every row needs the field {key!r}; fields of the first row: {sorted(rows[0])}")
    if x is None:
        names = [str(r[label]) for r in rows]
        size = (2.0 + 0.07 * max(map(len, names)) + 3.2 * len(metrics), 1.2 + 0.3 * len(rows))
        fig, axes = plt.subplots(1, len(metrics), figsize=size, sharey=True, squeeze=False)
    else:
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        ok = [(i, r) for i, r in enumerate(rows) if isinstance(r.get(m), (int, float)) and np.isfinite(r[m])]
        if x is None:
            values = [r[m] for _, r in ok]
            ax.barh([i for i, _ in ok], values, color=[f"C{i % 10}" for i, _ in ok])
            ax.set_yticks(range(len(rows)), names, fontsize=8)
            if values and min(values) > 0 and max(values) > 10 * min(values):
                ax.set_xscale("log")
        else:
            groups: dict[str, list] = {}
            for _, r in ok:
                groups.setdefault(str(r[label]), []).append((r[x], r[m]))
            for g, pts in groups.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=g)
            ax.set_xlabel(x)
            if log_x:
                ax.set_xscale("log")
            ax.legend(fontsize=8)
        ax.set_title(m, fontsize=10)
    if x is None:
        axes[0][0].invert_yaxis()  # first row on top
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, path)
