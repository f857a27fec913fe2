"""Plots the chapters share: 2-D scatters, densities, vector fields and energy surfaces,
image grids, loss curves, and a helper that turns a list of frames into a slider widget.

Every function draws on a given matplotlib ``Axes`` (or makes one) and returns it, so
figures compose; nothing here calls ``plt.show()``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from genlib.data import to_uint8

if TYPE_CHECKING:
    import ipywidgets as widgets
    from matplotlib.image import AxesImage

Grid = tuple[np.ndarray, np.ndarray, torch.Tensor]


def _axes(ax: plt.Axes | None, size: float = 4.0) -> plt.Axes:
    """``ax`` or a fresh square axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(size, size))
    return ax


def as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A detached float CPU numpy copy of ``x``."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def grid_points(lim: float | tuple[float, float, float, float], n: int = 200) -> Grid:
    """A square grid: (X [n,n], Y [n,n], points ``[n*n, 2]``) over ``lim`` (half-width or x0, x1, y0, y1)."""
    x0, x1, y0, y1 = (-lim, lim, -lim, lim) if np.isscalar(lim) else lim
    xs, ys = np.meshgrid(np.linspace(x0, x1, n), np.linspace(y0, y1, n))
    points = torch.from_numpy(np.stack([xs.ravel(), ys.ravel()], 1)).float()
    return xs, ys, points


def view_half_width(modes: torch.Tensor, margin: float = 1.0) -> float:
    """Half-width of the square view [-w, w]^2 that shows every mode [k, 2] of a 2-D mixture with ``margin``
    to spare for its spread."""
    return float(modes.abs().max()) + margin


def scatter2d(points: torch.Tensor | np.ndarray, ax: plt.Axes | None = None, lim: float | None = None,
              title: str | None = None, **kw: Any) -> plt.Axes:
    """Scatter [n, 2] points with small markers; ``lim`` fixes a square view."""
    ax = _axes(ax)
    pts = as_numpy(points)
    ax.scatter(pts[:, 0], pts[:, 1], s=kw.pop("s", 2), alpha=kw.pop("alpha", 0.5), **kw)
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return ax


def field2d(fn: Callable[[torch.Tensor], torch.Tensor], lim: float, ax: plt.Axes | None = None, n: int = 150,
            cmap: str = "viridis", title: str | None = None, contours: int = 0) -> plt.Axes:
    """Image of a scalar function ``fn([m,2]) -> [m]`` (a density, log-density or energy) over a square (panels
    compare on one colour scale after :func:`shared_colour_scale`)."""
    ax = _axes(ax)
    xs, ys, points = grid_points(lim, n)
    with torch.no_grad():
        values = as_numpy(fn(points)).reshape(xs.shape)
    ax.imshow(values, origin="lower", extent=(-lim, lim, -lim, lim), cmap=cmap, aspect="equal")
    if contours:
        ax.contour(xs, ys, values, contours, colors="white", linewidths=0.5, alpha=0.6)
    if title:
        ax.set_title(title)
    return ax


def shared_colour_scale(axes: Iterable[plt.Axes], vmin: float | None = None,
                        vmax: float | None = None) -> AxesImage:
    """Put the last image drawn on each of ``axes`` on one colour scale, from ``vmin`` (default: the lowest value
    of any of them) to ``vmax`` (default: the highest); return one image, for ``fig.colorbar``."""
    images = [ax.images[-1] for ax in axes]
    low = min(float(np.min(image.get_array())) for image in images) if vmin is None else vmin
    high = max(float(np.max(image.get_array())) for image in images) if vmax is None else vmax
    for image in images:
        image.set_clim(low, high)
    return images[-1]


def quiver2d(fn: Callable[[torch.Tensor], torch.Tensor], lim: float, ax: plt.Axes | None = None, n: int = 20,
             title: str | None = None, **kw: Any) -> plt.Axes:
    """Arrows of a vector field ``fn([m,2]) -> [m,2]`` (a score, or r(x) - x) on an n x n grid."""
    ax = _axes(ax)
    xs, ys, points = grid_points(lim, n)
    with torch.no_grad():
        vec = as_numpy(fn(points))
    ax.quiver(xs, ys, vec[:, 0].reshape(xs.shape), vec[:, 1].reshape(xs.shape), **kw)
    ax.set_xlim(-lim, lim)  # the arrows' tips would widen the view, differently for each field
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return ax


def energy_surface(energy: Callable[[torch.Tensor], torch.Tensor], lim: float, ax: plt.Axes | None = None,
                   real: torch.Tensor | np.ndarray | None = None, fake: torch.Tensor | np.ndarray | None = None,
                   n: int = 150, title: str | None = None) -> plt.Axes:
    """Energy ``U`` as a filled contour map (low = dark pits), with reals and fakes on top."""
    ax = field2d(energy, lim, ax=ax, n=n, cmap="magma", contours=12)
    if real is not None:
        scatter2d(real, ax, lim, s=3, c="cyan", alpha=0.6, label="real")
    if fake is not None:
        scatter2d(fake, ax, lim, s=3, c="lime", alpha=0.6, label="fake")
    if real is not None or fake is not None:
        ax.legend(loc="upper right", fontsize=7, markerscale=3)
    if title:
        ax.set_title(title)
    return ax


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 1) -> np.ndarray:
    """Tile images [n, C, H, W] (uint8, or float in [-1, 1]) into one uint8 array
    ``[rows*(H+pad)+pad, nrow*(W+pad)+pad, C]``, ``nrow`` images a row, white margins ``pad`` pixels wide."""
    if images.dtype != torch.uint8:
        images = to_uint8(images.float())
    images = images.cpu()
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    # each tile is an image with a margin above and to its left; the grid is the tiles side by side plus one
    # margin below and to the right
    tiles = torch.full((rows * nrow, c, h + pad, w + pad), 255, dtype=torch.uint8)
    tiles[:n, :, pad:, pad:] = images
    grid = tiles.view(rows, nrow, c, h + pad, w + pad).permute(0, 3, 1, 4, 2).reshape(rows * (h + pad), -1, c)
    canvas = torch.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=torch.uint8)
    canvas[:-pad or None, :-pad or None] = grid
    return canvas.numpy()


def read_image_grid(path: str | Path, nrow: int = 8, pad: int = 1, channels: int = 1) -> torch.Tensor:
    """The square images uint8 ``[rows * nrow, channels, H, H]`` of a grid PNG that :func:`save_image_grid` wrote
    (e.g. a recorded run's ``samples.png``): exactly, or within one grey level for PNGs written before
    :func:`save_image_grid` stopped using a colormap (2026-11-30)."""
    canvas = torch.from_numpy(np.ascontiguousarray(plt.imread(path)[..., :channels]))
    canvas = (canvas * 255).round().to(torch.uint8) if canvas.is_floating_point() else canvas
    side, rest = divmod(canvas.shape[1] - pad, nrow)
    rows, rows_rest = divmod(canvas.shape[0] - pad, side)
    if rest or rows_rest or side <= pad:
        raise ValueError(f"{path}: a {tuple(canvas.shape[:2])} picture is not a grid of {nrow} square images a row "
                         f"with {pad}-pixel margins")
    grid = canvas[:-pad or None, :-pad or None].reshape(rows, side, nrow, side, channels)
    return grid.permute(0, 2, 4, 1, 3).reshape(rows * nrow, channels, side, side)[:, :, pad:, pad:].contiguous()


def show_images(images: torch.Tensor, nrow: int = 8, ax: plt.Axes | None = None, title: str | None = None,
                size: float = 4.0) -> plt.Axes:
    """Show a tiled grid of images on ``ax`` without ticks."""
    ax = _axes(ax, size)
    grid = image_grid(images, nrow)
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray" if grid.shape[-1] == 1 else None,
              vmin=0, vmax=255)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def show_pngs(panels: Sequence[tuple[str | Path | None, str]], figsize: tuple[float, float] | None = None
              ) -> np.ndarray:
    """Show saved pictures (a recorded run's ``samples.png``) side by side: each ``(path, title)`` is one panel
    without ticks; ``figsize`` defaults to 4.5 x 4.5 inches a panel. Returns the row of axes."""
    if not panels:
        raise ValueError("show_pngs needs at least one (path, title) panel")
    missing = [title for path, title in panels if path is None]
    if missing:
        raise ValueError(f"no picture to show for {missing} (the run has no samples.png)")
    _, axes = plt.subplots(1, len(panels), figsize=figsize or (4.5 * len(panels), 4.5), squeeze=False)
    for ax, (path, title) in zip(axes[0], panels):
        ax.imshow(plt.imread(path))
        ax.set(title=title, xticks=[], yticks=[])
    return axes[0]


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    """Write a tiled grid of images to a PNG file, grey levels exactly (as RGB: a colormap would round them)."""
    grid = image_grid(images, nrow)
    plt.imsave(path, np.repeat(grid, 3, axis=-1) if grid.shape[-1] == 1 else grid)


def save_scatter(samples: torch.Tensor, data: torch.Tensor, path: str | Path, lim: float | None = None) -> None:
    """Write a PNG of 2-D ``samples`` [n, 2] (blue) over ``data`` [m, 2] (grey), as a toy run's sample picture."""
    def draw(ax: plt.Axes) -> None:
        scatter2d(data, ax, lim, c="grey", alpha=0.3)
        scatter2d(samples, ax, lim, c="tab:blue", title=f"{len(samples)} samples over {len(data)} data points")

    Path(path).write_bytes(figure_png(draw, dpi=100))


def save_scatter_panels(panels: Sequence[tuple[str, torch.Tensor, torch.Tensor, float]], path: str | Path,
                        columns: int | None = None, title: str | None = None) -> None:
    """Write a PNG of 2-D sample panels: each ``(title, samples [n, 2], modes [k, 2], lim)`` is one
    square axis with the samples (blue) and the mixture's modes (red rings, which leave the samples on a mode
    visible), ``columns`` panels a row (default:
    as square a grid as the panels allow), under the figure's ``title`` if given."""
    columns = columns or math.ceil(math.sqrt(len(panels)))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.0 * rows + (0.4 if title else 0)),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (panel_title, samples, modes, lim) in zip(axes.flat, panels):
        scatter2d(samples, ax, lim, c="tab:blue", s=1, alpha=0.3)
        scatter2d(modes, ax, lim, facecolors="none", edgecolors="red", s=60, linewidths=0.6, alpha=1, zorder=3)
        ax.set_title(textwrap.fill(panel_title, 36), fontsize=9)  # long method names would run into the next panel
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_palette_png(fig, path, dpi=110)
    plt.close(fig)


def save_palette_png(fig: plt.Figure, path: str | Path, dpi: int) -> None:
    """Write ``fig`` at ``dpi`` as the :func:`palette_png` of its PNG."""
    Path(path).write_bytes(figure_palette_png(fig, dpi))


def figure_palette_png(fig: plt.Figure, dpi: int) -> bytes:
    """``fig`` rendered at ``dpi`` as :func:`palette_png` bytes."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return palette_png(buffer.getvalue())


def palette_png(png: bytes, max_error: int = 16) -> bytes:
    """PNG bytes re-encoded with 256 palette colours (no dither), or ``png`` as it is when it already has a palette or
    when that would move some pixel's channel by more than ``max_error`` of 255 (smooth colour ramps would band).

    A plot of flat colours loses nothing visible, and the file (kept in the repository, embedded in the book) is a
    quarter to a third of the full-colour one."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png))
    if image.mode == "P":
        return png
    full = image.convert("RGB")  # figures have an opaque background: alpha carries nothing
    reduced = full.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    error = np.abs(np.asarray(reduced.convert("RGB"), dtype=np.int16) - np.asarray(full, dtype=np.int16)).max()
    if error > max_error:
        return png
    buffer = io.BytesIO()
    reduced.save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def loss_curves(history: dict[str, Sequence[float]], ax: plt.Axes | None = None, keys: Sequence[str] | None = None,
                title: str | None = None, ylabel: str = "loss") -> plt.Axes:
    """Plot each logged loss of a training history (or the ``keys`` named) against its step."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    for key in keys or [k for k in history if k != "step"]:
        ax.plot(history["step"], history[key], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def figure_png(draw: Callable[[plt.Axes], None], figsize: tuple[float, float] = (4.0, 4.0), dpi: int = 72) -> bytes:
    """Render ``draw(ax)`` into :func:`palette_png` bytes of ``figsize`` inches at ``dpi`` (the figure is closed, never
    shown)."""
    fig, ax = plt.subplots(figsize=figsize)
    draw(ax)
    fig.tight_layout()  # not bbox_inches="tight": a slider's frames must keep one size, whatever their titles
    png = figure_palette_png(fig, dpi)
    plt.close(fig)
    return png


def frame_slider(draw: Callable[[int, plt.Axes], None], frames: int, description: str = "frame",
                 figsize: tuple[float, float] = (4.0, 4.0), labels: Sequence[str] | None = None, dpi: int = 72
                 ) -> widgets.VBox:
    """A slider over ``frames`` pre-rendered figures ``draw(i, ax)``; returns the widget to display.

    The slider is linked to the pictures in the browser (``jslink``), so it keeps working in the
    static HTML book, where no Python kernel is running."""
    import ipywidgets as widgets

    pictures = [widgets.Image(value=figure_png(lambda ax, i=i: draw(i, ax), figsize, dpi), format="png")
                for i in range(frames)]
    stack = widgets.Stack(pictures, selected_index=0)
    slider = widgets.IntSlider(value=0, min=0, max=frames - 1, description=description, continuous_update=True)
    widgets.jslink((slider, "value"), (stack, "selected_index"))
    children = [slider, stack]
    if labels is not None:
        caption = widgets.Dropdown(options=list(labels), index=0, description="value")
        widgets.jslink((slider, "value"), (caption, "index"))
        children.insert(1, caption)
    return widgets.VBox(children)
