"""Drawings of the analogy (matplotlib); every function returns its ``matplotlib`` Figure.

* :func:`draw_pixel_graph`: a pixel graph on its grid, edges coloured by kernel tap, optionally
  with one target pixel and its incoming messages highlighted (:func:`draw_messages`);
* :func:`plot_receptive_field`: a receptive-field mask (or path counts) with its analytic window;
* :func:`plot_mixing_matrix` / :func:`plot_mixing_matrices`: the channel-mixing matrices of a layer;
* :func:`plot_cost_ratio`: the separable/standard cost ratio against ``k`` and ``C_out``;
* :func:`plot_singular_values`: the spectra (and so the ranks) of linear operators;
* :func:`plot_channels`: the channels of an image side by side.

Each function draws into ``ax`` when one is given (and returns ``ax.figure``), else into a new
:class:`matplotlib.figure.Figure` that is not registered with ``pyplot``: nothing is shown or kept
open behind your back, it works headless (Agg), and a notebook displays the returned Figure once.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .graph import PixelGraph

__all__ = ["draw_pixel_graph", "draw_messages", "plot_receptive_field", "plot_mixing_matrix",
           "plot_mixing_matrices", "plot_cost_ratio", "plot_singular_values", "plot_channels"]


def _new_axes(ax: Any, figsize: tuple[float, float]):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=80, layout="constrained")
    return fig, fig.add_subplot()


def _tap_colours(num_taps: int) -> list:
    import matplotlib

    if num_taps <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(t) for t in range(num_taps)]
    if num_taps <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return [cmap(t) for t in range(num_taps)]
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(t / (num_taps - 1)) for t in range(num_taps)]


def _node_xy(graph: PixelGraph):
    """Drawing positions ``(x, y) = (col, -row)`` of the input and output nodes (numpy arrays), as
    :func:`~gridgraph.to_networkx` places them: outputs on the input grid when both grids agree, else at
    their anchors ``(col * stride_w + 0.3, -(row * stride_h) - 0.3)``."""
    import numpy as np

    rows_cols = graph.pos.detach().cpu().numpy().astype(float)
    src_xy = np.stack([rows_cols[:, 1], -rows_cols[:, 0]], axis=1)
    if tuple(graph.in_size) == tuple(graph.out_size):
        return src_xy, src_xy, True
    h_out, w_out = graph.out_size
    s_h, s_w = graph.geometry.stride
    out_pos = getattr(graph, "out_pos", None)  # a masked graph's active outputs
    if out_pos is not None:
        out_rc = out_pos.detach().cpu().numpy().astype(float)
    else:
        ids = np.arange(graph.num_dst)
        out_rc = np.stack([(ids % (h_out * w_out)) // w_out, ids % w_out], axis=1).astype(float)
    return np.stack([out_rc[:, 1] * s_w + 0.3, -(out_rc[:, 0] * s_h) - 0.3], axis=1), src_xy, False


def _check_window(window: Any, size: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    try:
        (r0, r1), (c0, c1) = ((int(a), int(b)) for a, b in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be ((row_start, row_stop), (col_start, col_stop)) (got {window!r})") from None
    h, w = size
    if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
        raise ValueError(f"window {((r0, r1), (c0, c1))} must be non-empty and lie inside the input grid "
                         f"{(h, w)}: 0 <= row_start < row_stop <= {h}, 0 <= col_start < col_stop <= {w}")
    return (r0, r1), (c0, c1)


def draw_pixel_graph(graph: PixelGraph, ax: Any = None, *, target: Optional[Sequence[int]] = None,
                     only_target: bool = False, legend: bool = True, title: Optional[str] = None,
                     node_size: Optional[float] = None, window: Optional[Sequence[Sequence[int]]] = None):
    """Draw a pixel graph on its grid, each edge ``j -> i`` coloured by its kernel tap.

    Input pixels are circles at ``(col, -row)``; when the output grid differs (stride, no padding)
    output pixels are squares at their anchors. An edge is a straight line from source to target,
    shifted a little to its left (so that ``j -> i`` and ``i -> j`` stay apart) and ending in an
    arrowhead; a self-loop (the only edges of a 1x1 graph) is a small ring above its pixel.

    The edges of one tap are one :class:`~matplotlib.collections.LineCollection` (and one collection
    of arrowheads), so the number of artists grows with the taps, not the edges: a 64x64 graph with a
    3x3 kernel (36,100 edges) draws in well under two seconds. To read a large graph, zoom with
    ``window``: only the pixels inside it and the edges into them are drawn (edges from outside the
    window run to its border).

    Args:
        graph (PixelGraph): from :func:`~gridgraph.image_to_graph`, one image.
        ax (matplotlib Axes, optional): draw here (default: a new Figure).
        target (tuple, optional): an output pixel ``(row, col)`` to highlight with its incoming messages.
        only_target (bool, optional): draw only the target's incoming edges (default: ``False``:
            every other edge is drawn faded).
        legend (bool, optional): a legend of taps and their offsets ``(dy, dx)`` (default: ``True``).
        title (str, optional): the axes title (default: the geometry, the edge count and the window).
        node_size (float, optional): marker area of a pixel in points^2 (default: scaled to the grid,
            a pixel's disc about a third of the spacing between pixels).
        window (tuple, optional): ``((row_start, row_stop), (col_start, col_stop))`` of the input
            grid to draw (default: all of it).

    Returns:
        matplotlib.figure.Figure

    Example:
        >>> fig = draw_pixel_graph(image_to_graph(torch.zeros(1, 3, 3), kernel_size=1, padding=0))
        >>> type(fig).__name__, len(fig.axes)
        ('Figure', 1)
        >>> big = image_to_graph(torch.zeros(1, 64, 64), kernel_size=3, padding=1)
        >>> fig = draw_pixel_graph(big, window=((0, 8), (0, 8)))
        >>> fig.axes[0].get_title()
        'pixel graph k3x3 s1x1 p1x1 d1x1 zeros, 36100 edges; rows 0:8, cols 0:8 shown'
    """
    import numpy as np
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.patches import Patch

    if not isinstance(graph, PixelGraph) or getattr(graph, "in_size", None) is None:
        raise TypeError(f"graph must be a PixelGraph from image_to_graph (got {type(graph).__name__})")
    if graph.num_images != 1:
        raise ValueError(f"draw one image at a time (got a graph of {graph.num_images} images)")
    if graph.geometry.ndim != 2:
        raise ValueError(f"only 2-d pixel graphs can be drawn (got a {graph.geometry.ndim}-d one)")
    if node_size is not None and not (isinstance(node_size, (int, float)) and node_size > 0):
        raise ValueError(f"node_size must be a positive number (got {node_size!r})")
    fig, ax = _new_axes(ax, (5.8, 4.0) if legend else (4.0, 4.0))
    dst_xy, src_xy, same_grid = _node_xy(graph)
    if window is not None:
        (r0, r1), (c0, c1) = _check_window(window, graph.in_size)
    else:  # everything: the output grid may reach past the input grid (padding)
        every = np.concatenate([src_xy, dst_xy]) if len(src_xy) + len(dst_xy) else np.zeros((1, 2))
        r0, r1 = int(math.floor(-every[:, 1].max() + 0.5)), int(math.ceil(-every[:, 1].min() + 0.5))
        c0, c1 = int(math.floor(every[:, 0].min() + 0.5)), int(math.ceil(every[:, 0].max() + 0.5))

    def inside(xy):
        if window is None:
            return np.ones(len(xy), dtype=bool)
        return (xy[:, 0] > c0 - 0.5) & (xy[:, 0] < c1 - 0.5) & (-xy[:, 1] > r0 - 0.5) & (-xy[:, 1] < r1 - 0.5)

    target_node = None
    if target is not None:
        h_out, w_out = graph.out_size
        r, c = (int(t) for t in target)
        if not (0 <= r < h_out and 0 <= c < w_out):
            raise ValueError(f"target {tuple(target)} lies outside the output grid {tuple(graph.out_size)}")
        target_node = r * w_out + c
    src, dst = graph.edge_index.detach().cpu().numpy()
    taps = graph.edge_type.detach().cpu().numpy()
    shown = inside(dst_xy)[dst]
    focus = dst == target_node if target_node is not None else np.zeros_like(shown)
    if only_target and target_node is not None:
        shown &= focus

    # Sizes in data units: a pixel's disc spans about a third of the spacing between pixels.
    fig_w, fig_h = fig.get_size_inches()
    box = ax.get_position()
    points_per_unit = 72 * min(fig_w * box.width / (c1 - c0 + 0.6), fig_h * box.height / (r1 - r0 + 0.6))
    if node_size is None:
        node_size = (0.34 * points_per_unit) ** 2
    radius = math.sqrt(node_size) / 2 / points_per_unit
    width = float(np.clip(points_per_unit / 40, 0.25, 1.0))

    p, q = src_xy[src], dst_xy[dst]
    d = q - p
    length = np.hypot(d[:, 0], d[:, 1])
    loop = length == 0
    unit = np.divide(d, length[:, None], out=np.zeros_like(d), where=~loop[:, None])
    normal = np.stack([-unit[:, 1], unit[:, 0]], axis=1)
    shift = 0.08 * normal
    head = np.minimum(0.16, 0.3 * np.maximum(length - 2 * radius, 0.1))[:, None]
    tip = q + shift - unit * radius
    heads = np.stack([tip, tip - unit * head + normal * head * 0.35, tip - unit * head - normal * head * 0.35], axis=1)
    ring = np.linspace(0, 2 * np.pi, 17)
    ring = 0.12 * np.stack([np.cos(ring), np.sin(ring)], axis=1) + [0.0, radius + 0.12]

    colours = _tap_colours(graph.geometry.num_taps)
    faded = target_node is not None
    for group, line_width, alpha in ((shown & ~focus, width, 0.18 if faded else 0.9), (shown & focus, 2.6, 1.0)):
        for t in np.unique(taps[group]):
            colour = (*colours[t][:3], alpha)
            edges = group & (taps == t)
            straight, loops = edges & ~loop, edges & loop
            if straight.any():
                segments = np.stack([p[straight] + shift[straight], q[straight] + shift[straight]], axis=1)
                ax.add_collection(LineCollection(segments, colors=[colour], linewidths=line_width, zorder=1,
                                                 label=f"tap {t}"))
                ax.add_collection(PolyCollection(heads[straight], facecolors=[colour], edgecolors="none", zorder=1,
                                                 label=f"tap {t} arrowheads"))
            if loops.any():
                rings = p[loops][:, None, :] + ring[None, :, :]
                ax.add_collection(LineCollection(rings, colors=[colour], linewidths=line_width, zorder=1,
                                                 label=f"tap {t} self-loops"))

    show_in = inside(src_xy)
    ax.scatter(src_xy[show_in, 0], src_xy[show_in, 1], s=node_size, c="#9fb7cf", edgecolors="#34495e",
               linewidths=min(1.0, width), zorder=2, label="input pixels")
    if not same_grid:
        show_out = inside(dst_xy)
        ax.scatter(dst_xy[show_out, 0], dst_xy[show_out, 1], s=node_size * 0.7, marker="s", c="#f5cba7",
                   edgecolors="#a04000", linewidths=min(1.0, width), zorder=2, label="output pixels")
    if target_node is not None:
        ax.scatter(dst_xy[target_node, :1], dst_xy[target_node, 1:], s=node_size * 1.8, facecolors="none",
                   edgecolors="#c0392b", linewidths=2.5, zorder=3, label="target")
    if legend:
        offsets = graph.geometry.offsets().tolist()
        k_w = graph.geometry.kernel_size[1]
        handles = [Patch(color=colours[t], label=f"tap ({t // k_w},{t % k_w}): ({offsets[t][0]:+d},{offsets[t][1]:+d})")
                   for t in np.unique(taps[shown]).tolist()]
        if handles:
            ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False,
                      title="tap (u,v): offset (dy,dx)", title_fontsize=6)
    if title is None:
        title = f"pixel graph {graph.geometry.describe()}, {graph.edge_index.size(1)} edges"
        if window is not None:
            title += f"; rows {r0}:{r1}, cols {c0}:{c1} shown"
    ax.set_title(title, fontsize=8)
    ax.set_xlim(c0 - 0.8, c1 - 0.2)
    ax.set_ylim(-(r1 - 0.2), -(r0 - 0.8))
    ax.set_aspect("equal")
    ax.set_axis_off()
    return fig


def draw_messages(graph: PixelGraph, target: Sequence[int], ax: Any = None, *, title: Optional[str] = None):
    """Draw only the messages into one output pixel: its incoming edges, coloured and labelled by tap.

    Example:
        >>> g = image_to_graph(torch.zeros(1, 5, 5), kernel_size=3, dilation=2, padding=2)
        >>> fig = draw_messages(g, target=(2, 2))
        >>> fig.axes[0].get_title()
        'messages into (2, 2): 9 edges'
    """
    w_out = graph.out_size[1]
    count = int((graph.edge_index[1] == int(target[0]) * w_out + int(target[1])).sum())
    return draw_pixel_graph(graph, ax, target=target, only_target=True,
                            title=title if title is not None else
                            f"messages into {tuple(int(t) for t in target)}: {count} edges")


def plot_receptive_field(field: Tensor, ax: Any = None, *, target: Optional[Sequence[int]] = None,
                         window: Optional[Sequence[Sequence[int]]] = None, title: Optional[str] = None):
    """Show a receptive field (a boolean mask, or path counts) on the input grid.

    Args:
        field (Tensor): ``(H, W)`` from :func:`~gridgraph.analysis.receptive_field`.
        ax (matplotlib Axes, optional): draw here (default: a new Figure).
        target (tuple, optional): input coordinates ``(row, col)`` to mark (the target's anchor).
        window (tuple, optional): ``((r0, r1), (c0, c1))`` from
            :func:`~gridgraph.analysis.receptive_field_window`, drawn as a dashed box.
        title (str, optional): the axes title (default: the number of pixels reached).

    Example:
        >>> fig = plot_receptive_field(torch.eye(3, dtype=torch.bool), window=((0, 3), (0, 3)))
        >>> fig.axes[0].get_title()
        'receptive field: 3 pixels'
    """
    from matplotlib.patches import Rectangle

    if not isinstance(field, Tensor) or field.dim() != 2:
        raise ValueError(f"field must be a 2-d tensor (H, W) (got {getattr(field, 'shape', type(field).__name__)})")
    fig, ax = _new_axes(ax, (3.2, 3.2))
    data = field.detach().to(torch.float64).cpu()
    is_mask = field.dtype == torch.bool
    image = ax.imshow(data.numpy(), cmap="Blues" if is_mask else "viridis", vmin=0,
                      vmax=1 if is_mask else max(float(data.max()), 1e-12), interpolation="nearest")
    if not is_mask:
        fig.colorbar(image, ax=ax, shrink=0.8, label="paths")
    h, w = data.shape
    ax.set_xticks(range(w), minor=True)
    ax.set_yticks(range(h), minor=True)
    ax.grid(which="minor", color="#cccccc", linewidth=0.3)
    ax.tick_params(which="both", length=0, labelsize=6)
    ax.set_xticks([-0.5 + x for x in range(w + 1)], minor=False, labels=[])
    ax.set_yticks([-0.5 + y for y in range(h + 1)], minor=False, labels=[])
    if target is not None:
        ax.plot([target[1]], [target[0]], marker="x", color="#c0392b", markersize=8, mew=2)
    if window is not None:
        (r0, r1), (c0, c1) = window
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, edgecolor="#c0392b",
                               linestyle="--", linewidth=1.5))
        ax.set_xlim(min(-0.5, c0 - 0.7), max(w - 0.5, c1 - 0.3))
        ax.set_ylim(max(h - 0.5, r1 - 0.3), min(-0.5, r0 - 0.7))
    count = int((data > 0).sum())
    ax.set_title(title if title is not None else f"receptive field: {count} pixel{'s' * (count != 1)}", fontsize=8)
    return fig


def plot_mixing_matrix(matrix: Tensor, ax: Any = None, *, groups: Optional[int] = None,
                       title: Optional[str] = None, annotate: Optional[bool] = None, colorbar: bool = True,
                       vmax: Optional[float] = None):
    """A ``C_out x C_in`` mixing matrix as a heat map (red positive, blue negative, white zero).

    Args:
        matrix (Tensor): ``(C_out, C_in)``, e.g. from :func:`~gridgraph.analysis.mixing_matrix`.
        ax (matplotlib Axes, optional): draw here (default: a new Figure).
        groups (int, optional): draw the ``groups`` diagonal blocks' borders.
        title (str, optional): the axes title.
        annotate (bool, optional): write each value in its cell (default: when at most 8x8).
        colorbar (bool, optional): a colour bar beside the matrix (default: ``True``).
        vmax (float, optional): the colour scale runs from ``-vmax`` to ``vmax`` (default: the largest
            absolute entry), so that several matrices can share one scale.

    Example:
        >>> fig = plot_mixing_matrix(torch.tensor([[1., -1.]]), title="channel 1 minus channel 2")
        >>> [ax.get_title() or ax.get_label() for ax in fig.axes]
        ['channel 1 minus channel 2', '<colorbar>']
    """
    from matplotlib.patches import Rectangle

    if not isinstance(matrix, Tensor) or matrix.dim() != 2:
        raise ValueError(f"matrix must be a 2-d tensor (C_out, C_in) (got "
                         f"{getattr(matrix, 'shape', type(matrix).__name__)})")
    if vmax is not None and not (isinstance(vmax, (int, float)) and vmax > 0):
        raise ValueError(f"vmax must be a positive number (got {vmax!r})")
    fig, ax = _new_axes(ax, (3.6, 3.0) if colorbar else (3.0, 3.0))
    data = matrix.detach().to(torch.float64).cpu()
    scale = vmax if vmax is not None else max(float(data.abs().max()) if data.numel() else 0.0, 1e-12)
    image = ax.imshow(data.numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
    if colorbar:
        bar = fig.colorbar(image, ax=ax, shrink=0.8)
        bar.ax.tick_params(labelsize=6)
    c_out, c_in = data.shape
    if annotate is None:
        annotate = c_out <= 8 and c_in <= 8
    if annotate:
        for o in range(c_out):
            for c in range(c_in):
                ax.text(c, o, f"{float(data[o, c]):.2g}", ha="center", va="center", fontsize=6)
    if groups:
        if c_out % groups or c_in % groups:
            raise ValueError(f"groups={groups} must divide C_out={c_out} and C_in={c_in}")
        bo, bi = c_out // groups, c_in // groups
        for g in range(groups):
            ax.add_patch(Rectangle((g * bi - 0.5, g * bo - 0.5), bi, bo, fill=False, edgecolor="#2c3e50",
                                   linewidth=1.2))
    ax.set_xlabel("input channel", fontsize=7)
    ax.set_ylabel("output channel", fontsize=7)
    ax.tick_params(labelsize=6)
    if title is not None:
        ax.set_title(title, fontsize=8)
    return fig


def plot_mixing_matrices(matrices: Tensor, kernel_size: Optional[Sequence[int]] = None, *,
                         groups: Optional[int] = None, title: Optional[str] = None):
    """The mixing matrix of every tap on the kernel's grid (one colour scale, its bar on the left), and
    their sum (with its own colour bar).

    Args:
        matrices (Tensor): ``(num_taps, C_out, C_in)`` from :func:`~gridgraph.analysis.mixing_matrices`.
        kernel_size (tuple, optional): ``(kH, kW)`` (default: square, ``sqrt(num_taps)``).
        groups (int, optional): mark the diagonal blocks of a grouped layer.
        title (str, optional): the figure title.

    Example:
        >>> fig = plot_mixing_matrices(torch.randn(9, 4, 4))
        >>> len(fig.axes)  # 9 taps, the sum and two colour bars
        12
    """
    from matplotlib.figure import Figure

    if not isinstance(matrices, Tensor) or matrices.dim() != 3:
        raise ValueError(f"matrices must be a 3-d tensor (num_taps, C_out, C_in) (got "
                         f"{getattr(matrices, 'shape', type(matrices).__name__)})")
    taps = matrices.size(0)
    if kernel_size is None:
        side = math.isqrt(taps)
        if side * side != taps:
            raise ValueError(f"pass kernel_size: {taps} taps do not make a square kernel")
        kernel_size = (side, side)
    k_h, k_w = kernel_size
    if k_h * k_w != taps:
        raise ValueError(f"kernel_size {tuple(kernel_size)} has {k_h * k_w} taps, matrices has {taps}")
    fig = Figure(figsize=(1.5 * (k_w + 2.2), 1.5 * k_h + 0.5), dpi=80, layout="constrained")
    grid = fig.add_gridspec(k_h, k_w + 2, width_ratios=[1] * k_w + [0.2, 1.3])
    scale = max(float(matrices.abs().max()) if matrices.numel() else 0.0, 1e-12)  # one scale for every tap
    tap_axes = []
    for t in range(taps):
        ax = fig.add_subplot(grid[t // k_w, t % k_w])
        plot_mixing_matrix(matrices[t], ax, groups=groups, annotate=False, colorbar=False, vmax=scale)
        ax.set_title(f"tap ({t // k_w},{t % k_w})", fontsize=7)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.set_xticks([])
        ax.set_yticks([])
        tap_axes.append(ax)
    bar = fig.colorbar(tap_axes[0].images[0], ax=tap_axes, shrink=0.8, location="left")
    bar.ax.tick_params(labelsize=6)
    bar.set_label("weight (every tap)", fontsize=7)
    ax = fig.add_subplot(grid[:, k_w + 1])
    plot_mixing_matrix(matrices.sum(0), ax, groups=groups, annotate=False, title="sum over taps")
    if title is not None:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_cost_ratio(kernel_sizes: Sequence[int] = (1, 2, 3, 4, 5, 6, 7),
                    out_channels: Sequence[int] = (8, 32, 128, 512), *, in_channels: int = 32,
                    input_size: Sequence[int] = (16, 16), title: Optional[str] = None):
    r"""The separable/standard cost ratio against ``k`` (left) and ``C_out`` (right).

    Lines are the formula ``1/C_out + 1/k^2``; markers are the MAC counts of
    :func:`~gridgraph.analysis.separable_cost` over :func:`~gridgraph.analysis.conv_cost` for
    ``in_channels`` on ``input_size`` ('same' padding, no bias), so the two can be compared.

    Example:
        >>> fig = plot_cost_ratio(kernel_sizes=(1, 3), out_channels=(8, 64))
        >>> len(fig.axes)
        2
    """
    from matplotlib.figure import Figure

    from .analysis import conv_cost, separable_cost, separable_ratio

    def counted(c_out: int, k: int) -> float:
        kwargs = dict(padding="same", bias=False)
        return separable_cost(in_channels, c_out, k, input_size, **kwargs).macs / \
            conv_cost(in_channels, c_out, k, input_size, **kwargs).macs

    fig = Figure(figsize=(8.0, 3.2), dpi=80, layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ks = list(kernel_sizes)
    for c_out in out_channels:
        line, = left.plot(ks, [float(separable_ratio(c_out, k)) for k in ks], label=f"C_out={c_out}")
        left.plot(ks, [counted(c_out, k) for k in ks], "o", color=line.get_color(), markersize=4)
    left.set_xlabel("kernel size k", fontsize=8)
    left.set_ylabel("separable / standard MACs", fontsize=8)
    left.set_yscale("log")
    left.legend(fontsize=7)
    left.set_title("ratio = 1/C_out + 1/k^2 (lines), counted (dots)", fontsize=8)
    cs = sorted(set(int(c) for c in out_channels) | {1, 2, 4, 16, 64, 256, 1024})
    for k in ks:
        line, = right.plot(cs, [float(separable_ratio(c, k)) for c in cs], label=f"k={k}")
        right.axhline(1 / k ** 2, color=line.get_color(), linestyle=":", linewidth=0.8)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("output channels C_out", fontsize=8)
    right.set_title("ratio against C_out; dotted: the floor 1/k^2", fontsize=8)
    right.legend(fontsize=7, ncol=2)
    for ax in (left, right):
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title is not None:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_singular_values(operators: Mapping[str, Tensor], ax: Any = None, *, title: Optional[str] = None):
    """Singular values (largest first, scaled to the largest) of named matrices, with their ranks.

    Args:
        operators (dict): ``name -> matrix``, e.g. from :func:`~gridgraph.analysis.patch_operator`.
        ax (matplotlib Axes, optional): draw here (default: a new Figure).
        title (str, optional): the axes title.

    Example:
        >>> fig = plot_singular_values({"rank 2": torch.diag(torch.tensor([2., 1., 0.]))})
        >>> fig.axes[0].get_legend().get_texts()[0].get_text()
        'rank 2 (rank 2)'
    """
    from .analysis import matrix_rank

    if not operators:
        raise ValueError("operators must name at least one matrix")
    fig, ax = _new_axes(ax, (4.5, 3.0))
    for name, matrix in operators.items():
        s = torch.linalg.svdvals(matrix.detach().to(torch.float64).cpu())
        s = s / s[0].clamp_min(1e-300)
        ax.plot(range(1, s.numel() + 1), s.clamp_min(1e-18).numpy(), marker=".", markersize=4,
                label=f"{name} (rank {matrix_rank(matrix)})")
    ax.set_yscale("log")
    ax.set_ylim(1e-18, 3)
    ax.set_xlabel("index", fontsize=8)
    ax.set_ylabel("singular value / largest", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title is not None:
        ax.set_title(title, fontsize=8)
    return fig


def plot_channels(image: Tensor, *, titles: Optional[Sequence[str]] = None, title: Optional[str] = None):
    """The channels of one image ``(C, H, W)`` side by side (grey scale, shared range, one colour bar).

    Example:
        >>> fig = plot_channels(torch.zeros(2, 4, 4), titles=["channel 1", "channel 2"])
        >>> [ax.get_title() or ax.get_label() for ax in fig.axes]
        ['channel 1', 'channel 2', '<colorbar>']
    """
    from matplotlib.figure import Figure

    if not isinstance(image, Tensor) or image.dim() != 3:
        raise ValueError(f"image must be a 3-d tensor (C, H, W) (got {getattr(image, 'shape', type(image).__name__)})")
    channels = image.size(0)
    if titles is not None and len(titles) != channels:
        raise ValueError(f"titles must name the {channels} channels (got {len(titles)})")
    data = image.detach().to(torch.float64).cpu()
    lo, hi = float(data.min()), float(data.max())
    fig = Figure(figsize=(1.9 * channels + 0.6, 2.1), dpi=80, layout="constrained")
    axes = []
    for c in range(channels):
        ax = fig.add_subplot(1, channels, c + 1)
        image = ax.imshow(data[c].numpy(), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1,
                          interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(titles[c] if titles is not None else f"channel {c + 1}", fontsize=8)
        axes.append(ax)
    bar = fig.colorbar(image, ax=axes, shrink=0.8)
    bar.ax.tick_params(labelsize=6)
    if title is not None:
        fig.suptitle(title, fontsize=9)
    return fig
