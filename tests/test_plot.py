"""Headless smoke tests of gridgraph.plot: every function returns a Figure that renders with Agg."""
import io

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from gridgraph import GridConv2d, SeparableConv2d, image_to_graph  # noqa: E402
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


def _arrows(ax):
    return [p for p in ax.patches if isinstance(p, FancyArrowPatch)]


@pytest.mark.parametrize("kw", [dict(kernel_size=1, padding=0), dict(kernel_size=3, padding=1),
                                dict(kernel_size=3, stride=2), dict(kernel_size=(2, 3), padding_mode="circular",
                                                                     padding=1)], ids=str)
def test_draw_pixel_graph_draws_one_arrow_per_edge(kw):
    graph = image_to_graph(torch.zeros(1, 4, 5), **kw)
    fig = _renders(draw_pixel_graph(graph))
    ax = fig.axes[0]
    assert len(_arrows(ax)) == graph.edge_index.size(1)
    taps = sorted(set(graph.edge_type.tolist()))
    assert len(ax.get_legend().get_texts()) == len(taps)


def test_self_loop_graph_has_only_self_loops_drawn():
    graph = image_to_graph(torch.zeros(1, 3, 3), kernel_size=1, padding=0)
    fig = _renders(draw_pixel_graph(graph, legend=False))
    assert len(_arrows(fig.axes[0])) == 9 and fig.axes[0].get_legend() is None


def test_highlighted_target_and_messages():
    graph = image_to_graph(torch.zeros(1, 5, 5), kernel_size=3, padding=1)
    fig = _renders(draw_pixel_graph(graph, target=(0, 0)))
    widths = sorted(p.get_linewidth() for p in _arrows(fig.axes[0]))
    assert sum(w > 2 for w in widths) == 4  # a corner pixel receives 4 messages with zero padding
    fig = _renders(draw_messages(graph, (2, 2)))
    assert len(_arrows(fig.axes[0])) == 9
    assert fig.axes[0].get_title() == "messages into (2, 2): 9 edges"
    strided = image_to_graph(torch.zeros(1, 6, 6), kernel_size=3, stride=2)
    assert len(_arrows(_renders(draw_messages(strided, (1, 1))).axes[0])) == 9


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
    fig = _renders(plot_mixing_matrices(mixing_matrices(layer), groups=2, title="per tap"))
    assert len(fig.axes) == 10
    fig = _renders(plot_mixing_matrices(mixing_matrices(GridConv2d(2, 3, (1, 3))), kernel_size=(1, 3)))
    assert len(fig.axes) == 4
    with pytest.raises(ValueError, match="pass kernel_size"):
        plot_mixing_matrices(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="groups=3 must divide"):
        plot_mixing_matrix(torch.zeros(4, 4), groups=3)


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
    fig = _renders(plot_channels(torch.rand(3, 5, 5), title="rgb"))
    assert [ax.get_title() for ax in fig.axes] == ["channel 1", "channel 2", "channel 3"]
    with pytest.raises(ValueError, match="operators must name at least one matrix"):
        plot_singular_values({})
    with pytest.raises(ValueError, match="titles must name the 3 channels"):
        plot_channels(torch.rand(3, 5, 5), titles=["a"])
