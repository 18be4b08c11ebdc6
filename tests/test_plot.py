"""Headless smoke tests of gridgraph.plot: every function returns a Figure that renders with Agg."""
import io

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection, PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from gridgraph import GridConv2d, SeparableConv2d, image_to_graph, to_networkx  # noqa: E402
from gridgraph.analysis import (mixing_matrices, mixing_matrix, patch_operator, receptive_field,  # noqa: E402
                                receptive_field_window)
from gridgraph.plot import (draw_messages, draw_pixel_graph, plot_channels, plot_cost_ratio,  # noqa: E402
                            plot_mixing_matrices, plot_mixing_matrix, plot_receptive_field, plot_singular_values)


def _renders(fig):
    assert isinstance(fig, Figure)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    return fig


def _edges_drawn(ax, min_width: float = 0.0) -> Counter:
    """``(tap, dx, dy)`` of every drawn edge (self-loops as ``dx = dy = 0``), counted: a straight edge is a
    segment of its tap's LineCollection running from source to target, a self-loop a ring."""
    drawn: Counter = Counter()
    for c in ax.collections:
        if not isinstance(c, LineCollection) or not c.get_label().startswith("tap "):
            continue
        if max(c.get_linewidths()) < min_width:
            continue
        tap = int(c.get_label().split()[1])
        for path in c.get_segments():
            if c.get_label().endswith("self-loops"):
                assert len(path) > 2 and np.allclose(path[0], path[-1])  # a closed ring
                drawn[(tap, 0.0, 0.0)] += 1
            else:
                (x0, y0), (x1, y1) = path
                drawn[(tap, round(x1 - x0, 6), round(y1 - y0, 6))] += 1
    return drawn


def _edges_of(graph, targets=None) -> Counter:
    """The same, read from ``to_networkx`` (node positions, tap of every edge)."""
    nxg = to_networkx(graph)
    pos = dict(nxg.nodes(data="pos"))
    shift = 0 if tuple(graph.in_size) == tuple(graph.out_size) else graph.num_src
    return Counter((d["tap"], round(pos[i][0] - pos[j][0], 6), round(pos[i][1] - pos[j][1], 6))
                   for j, i, d in nxg.edges(data=True) if targets is None or i - shift in targets)


GRAPHS = [dict(kernel_size=1, padding=0), dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2),
          dict(kernel_size=(2, 3), padding_mode="circular", padding=1),
          dict(kernel_size=3, padding=2, dilation=2, padding_mode="reflect")]


@pytest.mark.parametrize("kw", GRAPHS, ids=str)
def test_draw_pixel_graph_draws_every_edge_once_with_its_tap(kw):
    graph = image_to_graph(torch.zeros(1, 4, 5), **kw)
    fig = _renders(draw_pixel_graph(graph))
    ax = fig.axes[0]
    drawn = _edges_drawn(ax)
    assert sum(drawn.values()) == graph.edge_index.size(1)
    assert drawn == _edges_of(graph)
    arrowheads = sum(len(c.get_paths()) for c in ax.collections if isinstance(c, PolyCollection))
    assert arrowheads == sum(n for (_, dx, dy), n in drawn.items() if (dx, dy) != (0, 0))
    taps = sorted(set(graph.edge_type.tolist()))
    assert len(ax.get_legend().get_texts()) == len(taps)


def test_draw_pixel_graph_uses_a_bounded_number_of_artists():
    """One collection of lines (and of arrowheads) per tap: the artists do not grow with the edges."""
    small = draw_pixel_graph(image_to_graph(torch.zeros(1, 8, 8), kernel_size=3, padding=1)).axes[0]
    graph = image_to_graph(torch.zeros(1, 64, 64), kernel_size=3, padding=1)
    big = draw_pixel_graph(graph).axes[0]
    assert len(big.get_children()) == len(small.get_children())
    assert len(big.collections) <= 2 * graph.geometry.num_taps + 1  # lines and arrowheads per tap, the pixels
    assert sum(_edges_drawn(big).values()) == graph.edge_index.size(1) == 36100
    _renders(big.figure)


def test_draw_pixel_graph_window_zooms_on_part_of_the_grid():
    graph = image_to_graph(torch.zeros(1, 64, 64), kernel_size=3, padding=1)
    ax = _renders(draw_pixel_graph(graph, window=((10, 14), (20, 25)))).axes[0]
    targets = {r * 64 + c for r in range(10, 14) for c in range(20, 25)}
    assert _edges_drawn(ax) == _edges_of(graph, targets)  # the edges into the pixels of the window
    (pixels,) = [c for c in ax.collections if c.get_label() == "input pixels"]
    assert len(pixels.get_offsets()) == 4 * 5
    assert ax.get_title().endswith("36100 edges; rows 10:14, cols 20:25 shown")
    assert ax.get_xlim()[0] < 20 < 24 < ax.get_xlim()[1] and ax.get_ylim()[0] < -13 < -10 < ax.get_ylim()[1]
    with pytest.raises(ValueError, match=r"window \(\(0, 65\), \(0, 4\)\) must be non-empty and lie inside the "
                                         r"input grid \(64, 64\)"):
        draw_pixel_graph(graph, window=((0, 65), (0, 4)))
    with pytest.raises(ValueError, match=r"window must be \(\(row_start, row_stop\), \(col_start, col_stop\)\) "
                                         r"\(got 3\)"):
        draw_pixel_graph(graph, window=3)


def test_self_loop_graph_has_only_self_loops_drawn():
    graph = image_to_graph(torch.zeros(1, 3, 3), kernel_size=1, padding=0)
    fig = _renders(draw_pixel_graph(graph, legend=False))
    assert _edges_drawn(fig.axes[0]) == Counter({(0, 0.0, 0.0): 9}) and fig.axes[0].get_legend() is None


def test_highlighted_target_and_messages():
    graph = image_to_graph(torch.zeros(1, 5, 5), kernel_size=3, padding=1)
    fig = _renders(draw_pixel_graph(graph, target=(0, 0)))
    assert sum(_edges_drawn(fig.axes[0]).values()) == graph.edge_index.size(1)
    # a corner pixel receives 4 messages with zero padding: drawn thick, the rest faded
    assert _edges_drawn(fig.axes[0], min_width=2) == _edges_of(graph, targets={0})
    assert sum(_edges_of(graph, targets={0}).values()) == 4
    fig = _renders(draw_messages(graph, (2, 2)))
    assert _edges_drawn(fig.axes[0]) == _edges_of(graph, targets={12})
    assert fig.axes[0].get_title() == "messages into (2, 2): 9 edges"
    strided = image_to_graph(torch.zeros(1, 6, 6), kernel_size=3, stride=2)
    assert _edges_drawn(_renders(draw_messages(strided, (1, 1))).axes[0]) == _edges_of(strided, targets={4})


def test_draw_pixel_graph_draws_into_a_given_axes():
    fig = Figure()
    ax = fig.add_subplot(1, 2, 2)
    graph = image_to_graph(torch.zeros(1, 3, 3), kernel_size=3, padding=1)
    assert draw_pixel_graph(graph, ax) is fig


def test_draw_pixel_graph_refuses_bad_input():
    with pytest.raises(TypeError, match="graph must be a PixelGraph"):
        draw_pixel_graph(torch.zeros(3))
    with pytest.raises(ValueError, match="draw one image at a time"):
        draw_pixel_graph(image_to_graph(torch.zeros(2, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"target \(3, 0\) lies outside the output grid \(3, 3\)"):
        draw_pixel_graph(image_to_graph(torch.zeros(1, 3, 3)), target=(3, 0))
    with pytest.raises(ValueError, match=r"node_size must be a positive number \(got -1\)"):
        draw_pixel_graph(image_to_graph(torch.zeros(1, 3, 3)), node_size=-1)


def test_plot_receptive_field_mask_and_counts():
    layers = [GridConv2d(1, 1, 3, padding=1)] * 2
    mask = receptive_field(layers, (9, 9), (4, 4))
    fig = _renders(plot_receptive_field(mask, target=(4, 4), window=receptive_field_window(layers, (4, 4))))
    assert fig.axes[0].get_title() == "receptive field: 25 pixels"
    counts = receptive_field(layers, (9, 9), (4, 4), counts=True)
    fig = _renders(plot_receptive_field(counts, title="paths"))
    assert len(fig.axes) == 2  # with its colour bar
    with pytest.raises(ValueError, match="field must be a 2-d tensor"):
        plot_receptive_field(torch.zeros(3))


def test_plot_mixing_matrix_and_matrices():
    layer = GridConv2d(4, 4, 3, groups=2)
    fig = _renders(plot_mixing_matrix(mixing_matrix(layer), groups=2, title="grouped"))
    assert fig.axes[0].get_title() == "grouped" and len(fig.axes[0].texts) == 16
    assert _colour_bars(fig) == [fig.axes[0].images[0].get_clim()]
    assert len(_renders(plot_mixing_matrix(mixing_matrix(layer), colorbar=False)).axes) == 1
    matrices = mixing_matrices(layer)
    fig = _renders(plot_mixing_matrices(matrices, groups=2, title="per tap"))
    heat_maps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(heat_maps) == 10
    # every tap on one scale, whose bar is drawn; the sum with a bar of its own
    scale = float(matrices.abs().max())
    assert {ax.images[0].get_clim() for ax in heat_maps[:9]} == {(-scale, scale)}
    assert _colour_bars(fig) == [(-scale, scale), heat_maps[9].images[0].get_clim()]
    fig = _renders(plot_mixing_matrices(mixing_matrices(GridConv2d(2, 3, (1, 3))), kernel_size=(1, 3)))
    assert len(fig.axes) == 4 + 2
    with pytest.raises(ValueError, match="pass kernel_size"):
        plot_mixing_matrices(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="groups=3 must divide"):
        plot_mixing_matrix(torch.zeros(4, 4), groups=3)
    with pytest.raises(ValueError, match=r"vmax must be a positive number \(got 0\)"):
        plot_mixing_matrix(torch.zeros(4, 4), vmax=0)


def _colour_bars(fig) -> list:
    """The value range of each (vertical) colour bar of ``fig``, in drawing order."""
    return [tuple(float(v) for v in ax.get_ylim()) for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_plot_cost_ratio_lines_follow_the_formula():
    fig = _renders(plot_cost_ratio(kernel_sizes=(1, 3, 5), out_channels=(8, 384)))
    left = fig.axes[0]
    ys = [list(line.get_ydata()) for line in left.get_lines()]
    assert ys[2] == pytest.approx([1 / 384 + 1, 1 / 384 + 1 / 9, 1 / 384 + 1 / 25])  # formula line, C_out=384
    assert ys[3] == pytest.approx(ys[2])                                             # counted dots


def test_plot_singular_values_and_channels():
    ops = {"full": patch_operator(GridConv2d(2, 8, 3)), "separable": patch_operator(SeparableConv2d(2, 8, 3))}
    fig = _renders(plot_singular_values(ops, title="spectra"))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["full (rank 8)", "separable (rank 2)"]
    image = torch.rand(3, 5, 5)
    fig = _renders(plot_channels(image, title="rgb"))
    assert [ax.get_title() for ax in fig.axes[:3]] == ["channel 1", "channel 2", "channel 3"]
    assert _colour_bars(fig) == [(float(image.min()), float(image.max()))]  # one bar, the shared range
    with pytest.raises(ValueError, match="operators must name at least one matrix"):
        plot_singular_values({})
    with pytest.raises(ValueError, match="titles must name the 3 channels"):
        plot_channels(torch.rand(3, 5, 5), titles=["a"])
