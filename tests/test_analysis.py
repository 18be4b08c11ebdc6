"""Tests of gridgraph.analysis: each result checked against torch itself or an independent computation."""
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from gridgraph import (ConvGeometry, DepthwiseConv2d, GridConv2d, PointwiseConv2d, SeparableConv2d,
                       image_to_graph)
from gridgraph.analysis import (Cost, collapsed_separable, composed_adjacency, conv_cost, count_flops,
                                depthwise_cost, effective_weight, graph_apply, layer_cost, layer_geometries,
                                linear_operator, matrix_rank, mixing_matrices, mixing_matrix, patch_operator,
                                pixel_adjacency, pointwise_cost, rank_bound, receptive_field,
                                receptive_field_size, receptive_field_window, separable_approximation,
                                separable_cost, separable_ratio, separable_slice_ranks, spatial_layers)


def _conv_stack(specs, channels=1):
    return nn.Sequential(*[nn.Conv2d(channels, channels, **spec) for spec in specs])


def _autograd_field(stack, input_size, target):
    """Reference receptive field: which inputs the real nn.Conv2d stack's output pixel depends on.

    All weights are positive, so no dependency can cancel: d out[target] / d x != 0 exactly on the field.
    """
    stack = stack.double()
    with torch.no_grad():
        for p in stack.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.zeros(1, stack[0].in_channels, *input_size, dtype=torch.float64, requires_grad=True)
    out = stack(x)
    out[0, 0, target[0], target[1]].backward()
    return x.grad[0].abs().sum(0) > 0


STACKS = [
    [dict(kernel_size=3, padding=1)] * 3,
    [dict(kernel_size=3)] * 2,
    [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=3, padding=1)],
    [dict(kernel_size=5, padding=2), dict(kernel_size=3, stride=2), dict(kernel_size=3, dilation=2, padding=2)],
    [dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))],
    [dict(kernel_size=2, padding="same"), dict(kernel_size=4, padding="same")],
    [dict(kernel_size=3, dilation=2, padding=2)] * 2,
    [dict(kernel_size=3, padding=1, padding_mode="circular")] * 2,
    [dict(kernel_size=3, padding=1, padding_mode="reflect"), dict(kernel_size=3, padding=1, padding_mode="replicate")],
    [dict(kernel_size=1)] * 6,
]


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("specs", STACKS, ids=lambda s: "+".join(f"k{d['kernel_size']}" for d in s))
def test_receptive_field_equals_autograd_dependency_of_real_conv2d(specs):
    stack = _conv_stack(specs)
    size = (11, 12)
    out_size = _sizes(stack, size)[-1]
    for target in [(0, 0), (out_size[0] // 2, out_size[1] // 2), (out_size[0] - 1, out_size[1] - 1)]:
        mask = receptive_field(stack, size, target)
        assert mask.dtype == torch.bool and mask.shape == size
        torch.testing.assert_close(mask, _autograd_field(stack, size, target), rtol=0, atol=0)
        torch.testing.assert_close(receptive_field(stack, size, target, method="networkx"), mask, rtol=0, atol=0)


def _sizes(stack, size):
    sizes = [tuple(size)]
    for g in layer_geometries(stack):
        sizes.append(g.output_size(sizes[-1]))
    return sizes


@pytest.mark.parametrize("specs", STACKS[:7], ids=lambda s: "+".join(f"k{d['kernel_size']}" for d in s))
def test_receptive_field_matches_the_analytic_formula(specs):
    stack = _conv_stack(specs)
    size = (40, 41)
    geometries = layer_geometries(stack)
    # Analytic extent from the formula, computed here independently.
    expected = [1, 1]
    jump = [1, 1]
    for g in geometries:
        for a in range(2):
            expected[a] += (g.kernel_size[a] - 1) * g.dilation[a] * jump[a]
            jump[a] *= g.stride[a]
    assert receptive_field_size(stack) == tuple(expected)
    out_size = _sizes(stack, size)[-1]
    for target in [(out_size[0] // 2, out_size[1] // 2), (out_size[0] // 2 + 1, out_size[1] // 3)]:
        mask = receptive_field(stack, size, target)
        rows, cols = mask.nonzero(as_tuple=True)
        window = receptive_field_window(stack, target)
        assert window[0][0] >= 0 and window[1][0] >= 0, "pick interior targets"
        assert (int(rows.min()), int(rows.max()) + 1) == window[0]
        assert (int(cols.min()), int(cols.max()) + 1) == window[1]
        assert tuple(b - a for a, b in window) == tuple(expected)


def test_receptive_field_near_the_border_is_the_clipped_window():
    stack = _conv_stack([dict(kernel_size=3, padding=1)] * 3)
    mask = receptive_field(stack, (9, 9), target=(0, 8))
    (r0, r1), (c0, c1) = receptive_field_window(stack, (0, 8))
    assert ((r0, r1), (c0, c1)) == ((-3, 4), (5, 12))
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[max(r0, 0):min(r1, 9), max(c0, 0):min(c1, 9)] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("depth", [1, 2, 7, 40])
def test_a_stack_of_1x1_layers_sees_exactly_one_pixel(depth):
    layers = [PointwiseConv2d(3, 3) for _ in range(depth)]
    for target in [(0, 0), (3, 4), (5, 6)]:
        mask = receptive_field(layers, (6, 7), target)
        expected = torch.zeros(6, 7, dtype=torch.bool)
        expected[target] = True
        assert torch.equal(mask, expected)
    assert receptive_field_size(layers) == (1, 1)


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_a_stack_of_3x3_layers_grows_by_two_per_layer(depth):
    layers = [GridConv2d(2, 2, 3, padding=1) for _ in range(depth)]
    mask = receptive_field(layers, (15, 15), (7, 7))
    assert int(mask.sum()) == (2 * depth + 1) ** 2
    assert receptive_field_size(layers) == (2 * depth + 1,) * 2


def test_path_counts_are_products_of_tap_counts():
    # Two 3x3 layers: the number of paths from offset (dy, dx) factorises into (3 - |dy - ...|) counts.
    field = receptive_field([GridConv2d(1, 1, 3, padding=1)] * 2, (9, 9), (4, 4), counts=True)
    one_d = torch.tensor([1., 2., 3., 2., 1.], dtype=torch.float64)
    torch.testing.assert_close(field[2:7, 2:7], one_d[:, None] * one_d[None, :], rtol=0, atol=0)
    assert float(field.sum()) == 81.0  # 9 taps, twice


def test_composed_adjacency_is_the_product_of_layer_adjacencies_and_matches_receptive_fields():
    layers = [GridConv2d(1, 1, 3, padding=1), GridConv2d(1, 1, 3, stride=2), GridConv2d(1, 1, 2)]
    size = (10, 9)
    a = [pixel_adjacency(g, s).to_dense() for g, s in zip(layer_geometries(layers), _sizes(layers, size))]
    product = composed_adjacency(layers, size).to_dense()
    torch.testing.assert_close(product, a[2] @ a[1] @ a[0], rtol=0, atol=0)
    out_size = _sizes(layers, size)[-1]
    for i in range(math.prod(out_size)):
        target = (i // out_size[1], i % out_size[1])
        assert torch.equal(product[i].view(size) > 0, receptive_field(layers, size, target))


def test_pixel_adjacency_counts_every_edge_of_the_pixel_graph():
    for kw in [dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=2, padding_mode="replicate"),
               dict(kernel_size=(2, 3), stride=(2, 1), padding=1, padding_mode="circular")]:
        graph = image_to_graph(torch.zeros(1, 5, 6), **kw)
        a = pixel_adjacency(graph.geometry, (5, 6)).to_dense()
        assert a.shape == (graph.num_dst, graph.num_src)
        dense = torch.zeros_like(a)
        dense.index_put_((graph.edge_index[1], graph.edge_index[0]), torch.ones(graph.edge_index.size(1),
                                                                                 dtype=a.dtype), accumulate=True)
        torch.testing.assert_close(a, dense, rtol=0, atol=0)


def test_stacks_read_sequentials_models_and_pooling():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Sequential(nn.MaxPool2d(2), SeparableConv2d(8, 8, 3, padding=1)), nn.Dropout())
    kinds = [type(m).__name__ for m in spatial_layers(model)]
    assert kinds == ["Conv2d", "MaxPool2d", "SeparableConv2d"]
    assert receptive_field_size(model) == (3 + 1 + 2 * 2,) * 2
    reference = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(1, 1, 3, padding=1))
    mask = receptive_field(model, (12, 12), (3, 3))
    torch.testing.assert_close(mask, _autograd_field(reference, (12, 12), (3, 3)), rtol=0, atol=0)


def test_converted_models_read_like_the_originals():
    from gridgraph.conversion import convert

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.MaxPool2d(2), nn.Conv2d(8, 4, 1))
    converted = convert(model)
    assert all(type(m).__name__ != "Conv2d" for m in spatial_layers(converted))
    assert receptive_field_size(converted) == receptive_field_size(model) == (7, 7)
    for target in [(0, 0), (2, 3)]:
        assert torch.equal(receptive_field(converted, (16, 16), target), receptive_field(model, (16, 16), target))
    assert layer_cost(converted, (16, 16)) == layer_cost(model, (16, 16))
    linear = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, stride=2))
    torch.testing.assert_close(linear_operator(convert(linear), (6, 6)), linear_operator(linear, (6, 6)),
                               rtol=0, atol=0)


def test_bad_stacks_and_targets_are_refused():
    with pytest.raises(ValueError, match="Flatten does not act on the pixel grid"):
        receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten(), nn.Linear(4, 2)), (4, 4))
    with pytest.raises(ValueError, match="ConvTranspose2d: transposed convolutions are not supported"):
        receptive_field(nn.Sequential(nn.ConvTranspose2d(1, 1, 3)), (4, 4))

    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1, 1, 3, 3))

    with pytest.raises(ValueError, match="Mystery has a spatial kernel but no convolution geometry"):
        receptive_field([GridConv2d(1, 1, 3), Mystery()], (6, 6))
    with pytest.raises(ValueError, match="no convolution or pooling layer"):
        receptive_field(nn.Sequential(nn.ReLU()), (4, 4))
    with pytest.raises(TypeError, match="layers must be modules"):
        receptive_field([GridConv2d(1, 1, 3), "relu"], (4, 4))
    with pytest.raises(ValueError, match=r"target \(5, 0\) lies outside the output grid \(4, 4\)"):
        receptive_field([GridConv2d(1, 1, 3, padding=1)], (4, 4), target=(5, 0))
    with pytest.raises(ValueError, match="method must be 'sparse' or 'networkx'"):
        receptive_field([GridConv2d(1, 1, 3)], (4, 4), method="bfs")
    with pytest.raises(TypeError, match="input_size must be a tuple"):
        receptive_field([GridConv2d(1, 1, 3)], 4)
    with pytest.raises(ValueError, match="ceil_mode=True is not supported"):
        receptive_field(nn.Sequential(nn.MaxPool2d(2, ceil_mode=True)), (5, 5))


# ------------------------------------------------------------------------------------------- cost
COST_CONFIGS = [
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
    dict(in_channels=8, out_channels=16, kernel_size=3, stride=2),
    dict(in_channels=8, out_channels=16, kernel_size=(1, 5), dilation=2, padding=(0, 4)),
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, groups=4),       # grouped
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, groups=8),       # depthwise x2
    dict(in_channels=8, out_channels=8, kernel_size=5, padding="same", groups=8),   # depthwise
    dict(in_channels=8, out_channels=24, kernel_size=1),                             # pointwise
    dict(in_channels=8, out_channels=24, kernel_size=1, groups=2, bias=False),       # grouped pointwise
]


@pytest.mark.parametrize("config", COST_CONFIGS, ids=str)
def test_conv_cost_matches_torch_flop_counter_and_parameter_count(config):
    conv = nn.Conv2d(**config)
    x = torch.zeros(3, config["in_channels"], 13, 10)
    cost = conv_cost(config["in_channels"], config["out_channels"], config["kernel_size"], (13, 10),
                     stride=config.get("stride", 1), padding=config.get("padding", 0),
                     dilation=config.get("dilation", 1), groups=config.get("groups", 1),
                     bias=config.get("bias", True))
    assert 3 * cost.flops == count_flops(conv, x)
    assert cost.params == sum(p.numel() for p in conv.parameters())
    assert layer_cost(conv, (13, 10)) == cost
    assert layer_cost(GridConv2d.from_conv2d(conv), (13, 10)) == cost


@pytest.mark.parametrize("c_in,c_out,k", [(192, 384, 3), (3, 16, 3), (32, 64, 5), (16, 7, (1, 7)), (8, 8, 1)])
def test_separable_ratio_is_exactly_one_over_c_out_plus_one_over_k_squared(c_in, c_out, k):
    size = (12, 12)
    sep = separable_cost(c_in, c_out, k, size, padding="same", bias=False)
    full = conv_cost(c_in, c_out, k, size, padding="same", bias=False)
    ratio = separable_ratio(c_out, k)
    assert Fraction(sep.macs, full.macs) == ratio
    assert Fraction(sep.params, full.params) == ratio
    # The same figures counted by torch on the real layers.
    dw = nn.Conv2d(c_in, c_in, k, padding="same", groups=c_in, bias=False)
    pw = nn.Conv2d(c_in, c_out, 1, bias=False)
    std = nn.Conv2d(c_in, c_out, k, padding="same", bias=False)
    x = torch.zeros(1, c_in, *size)
    assert Fraction(count_flops(nn.Sequential(dw, pw), x), count_flops(std, x)) == ratio
    assert layer_cost(SeparableConv2d.from_conv2d(dw, pw), size) == sep


def test_the_worked_example_reduction_is_0_8863():
    ratio = separable_ratio(384, 3)
    assert ratio == Fraction(1, 384) + Fraction(1, 9) == Fraction(131, 1152)
    assert round(float(1 - ratio), 4) == 0.8863
    assert abs(float(1 - ratio) - 0.886284722) < 1e-9


def test_cost_helpers_agree_with_each_other_and_with_modules():
    size = (9, 7)
    assert depthwise_cost(6, 3, size, padding=1, depth_multiplier=2) == layer_cost(
        DepthwiseConv2d(6, 3, padding=1, depth_multiplier=2), size)
    assert pointwise_cost(6, 10, size) == layer_cost(PointwiseConv2d(6, 10), size)
    assert separable_cost(6, 10, 3, size, stride=2, depth_multiplier=2) == layer_cost(
        SeparableConv2d(6, 10, 3, stride=2, depth_multiplier=2), size)
    stack = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 4, 1))
    x = torch.zeros(1, 3, 17, 17)
    assert layer_cost(stack, (17, 17)).flops == count_flops(stack, x)
    assert layer_cost(stack, (17, 17)).params == sum(p.numel() for p in stack.parameters())
    assert Cost(1, 2) + Cost(3, 4) == Cost(4, 6) and Cost(1, 2).flops == 4
    with pytest.raises(ValueError, match="must be divisible by groups"):
        conv_cost(6, 4, 3, size, groups=4)
    with pytest.raises(ValueError, match="out_channels must be a positive int"):
        separable_ratio(0, 3)


# -------------------------------------------------------------------------------------- operators
def _reference_operator(conv, size):
    """The matrix of the real nn.Conv2d, column by column, in float64."""
    conv = conv.double()
    n = conv.in_channels * math.prod(size)
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).view(n, conv.in_channels, *size)
        out = conv(basis) - conv(torch.zeros_like(basis[:1]))
    return out.reshape(n, -1).t()


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2),
                                dict(kernel_size=2, dilation=2, padding=1, padding_mode="reflect"),
                                dict(kernel_size=3, padding=1, groups=2, padding_mode="circular"),
                                dict(kernel_size=(1, 3), padding=(0, 1), padding_mode="replicate")], ids=str)
def test_linear_operator_from_the_graph_layer_equals_nn_conv2d(kw):
    conv = nn.Conv2d(2, 4, **kw)
    layer = GridConv2d.from_conv2d(conv)
    op = linear_operator(layer, (5, 6))
    torch.testing.assert_close(op, _reference_operator(conv, (5, 6)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linear_operator(conv, (5, 6)), op, rtol=0, atol=0)
    # The operator reproduces the layer: W vec(x) + b = vec(conv(x)).
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = conv.double()(x[None])[0].reshape(-1) - conv.bias.double().repeat_interleave(
            op.size(0) // 4)
    torch.testing.assert_close(op @ x.reshape(-1), expected, rtol=1e-10, atol=1e-10)


def test_patch_operator_is_the_weight_written_as_a_full_kernel():
    conv = nn.Conv2d(3, 5, (2, 3), stride=2, dilation=(1, 2), padding=1)
    torch.testing.assert_close(patch_operator(conv), conv.weight.detach().double().reshape(5, -1), rtol=0, atol=0)
    grouped = GridConv2d(4, 6, 3, groups=2)
    full = torch.zeros(6, 4, 3, 3, dtype=torch.float64)
    full[:3, :2] = grouped.weight.detach()[:3]
    full[3:, 2:] = grouped.weight.detach()[3:]
    torch.testing.assert_close(effective_weight(grouped), full, rtol=0, atol=0)
    sep = SeparableConv2d(3, 4, 3, depth_multiplier=2)
    d = sep.depthwise.weight.detach().double()[:, 0]              # [6, 3, 3]
    p = sep.pointwise.weight.detach().double()[:, :, 0, 0]        # [4, 6]
    expected = torch.einsum("om,mkl->omkl", p, d).view(4, 3, 2, 3, 3).sum(2)
    torch.testing.assert_close(effective_weight(sep), expected, rtol=1e-12, atol=1e-12)


def test_ranks_of_full_separable_and_collapsed_blocks():
    torch.manual_seed(0)
    for c_in, c_out, k in [(2, 32, 3), (4, 16, 3), (8, 8, 3), (3, 40, 5)]:
        full = GridConv2d(c_in, c_out, k)
        sep = SeparableConv2d(c_in, c_out, k, padding=k // 2)
        collapsed = collapsed_separable(sep)
        assert matrix_rank(patch_operator(full)) == rank_bound(full) == min(c_out, c_in * k * k)
        assert matrix_rank(patch_operator(sep)) == rank_bound(sep) == min(c_out, c_in)
        op = patch_operator(collapsed).view(c_out, c_in, k * k)
        assert matrix_rank(patch_operator(collapsed)) == min(c_out, c_in)
        centre = (k * k) // 2
        assert torch.count_nonzero(op[:, :, [t for t in range(k * k) if t != centre]]) == 0
        torch.testing.assert_close(op[:, :, centre], sep.pointwise.weight.detach().double()[:, :, 0, 0],
                                   rtol=0, atol=0)
    assert rank_bound(SeparableConv2d(4, 32, 3, depth_multiplier=3)) == 12
    assert matrix_rank(patch_operator(SeparableConv2d(4, 32, 3, depth_multiplier=3))) == 12


def test_whole_image_operator_ranks():
    torch.manual_seed(1)
    size = (5, 5)
    full = GridConv2d(2, 8, 3, padding=1)
    sep = SeparableConv2d(2, 8, 3, padding=1)
    collapsed = collapsed_separable(sep)
    assert matrix_rank(linear_operator(full, size)) == 2 * 25            # injective: full column rank
    assert matrix_rank(linear_operator(collapsed, size)) == 2 * 25        # the pointwise part is injective
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(graph_apply(collapsed, x), graph_apply(collapsed.pointwise, x), rtol=1e-5, atol=1e-6)
    # Separable output lives in the image of a 2-channel intermediate: rank <= 2 * 25 < 8 * 25.
    assert matrix_rank(linear_operator(sep, size)) <= 2 * 25


def test_separable_reach_is_exactly_low_rank_channel_slices():
    torch.manual_seed(2)
    sep = SeparableConv2d(3, 8, 3, bias=False)
    w = effective_weight(sep)
    assert separable_slice_ranks(w) == [1, 1, 1]
    dw, pw, err = separable_approximation(w)
    assert err < 1e-12
    rebuilt = SeparableConv2d(3, 8, 3, bias=False).double()
    with torch.no_grad():
        rebuilt.depthwise.weight.copy_(dw)
        rebuilt.pointwise.weight.copy_(pw)
    torch.testing.assert_close(effective_weight(rebuilt), w, rtol=1e-10, atol=1e-12)
    full = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    assert separable_slice_ranks(full) == [8, 8, 8]
    errors = [separable_approximation(full, m)[2] for m in range(1, 10)]
    assert errors[0] > 0.3
    assert all(a > b for a, b in zip(errors[:7], errors[1:8]))   # strictly better with each filter
    assert errors[7] < 1e-12 and errors[8] < 1e-12                # m = min(C_out, k^2) = 8 reaches everything
    # Eckart-Young: the error is the tail of each slice's spectrum.
    s = torch.linalg.svdvals(full.reshape(8, 3, 9).permute(1, 0, 2))
    assert abs(errors[1] - float(s[:, 2:].pow(2).sum().sqrt() / full.norm())) < 1e-12


# ----------------------------------------------------------------------------------------- mixing
def test_mixing_matrices_dense_block_diagonal_diagonal_and_separable():
    torch.manual_seed(3)
    pw = PointwiseConv2d(4, 6)
    torch.testing.assert_close(mixing_matrix(pw), pw.weight.detach().double()[:, :, 0, 0], rtol=0, atol=0)
    assert torch.count_nonzero(mixing_matrix(pw)) == 24
    grouped = GridConv2d(6, 6, 3, groups=3)
    m = mixing_matrices(grouped)
    assert m.shape == (9, 6, 6)
    blocks = torch.block_diag(*[torch.ones(2, 2)] * 3).bool()
    assert torch.count_nonzero(m[:, ~blocks]) == 0 and torch.count_nonzero(m[:, blocks]) == 9 * 12
    torch.testing.assert_close(mixing_matrix(grouped), m.sum(0), rtol=0, atol=0)
    dw = DepthwiseConv2d(5, 3)
    assert torch.count_nonzero(mixing_matrices(dw)[:, ~torch.eye(5, dtype=torch.bool)]) == 0
    sep = SeparableConv2d(3, 4, 3)
    p = sep.pointwise.weight.detach().double()[:, :, 0, 0]
    d = sep.depthwise.weight.detach().double().reshape(3, 9)
    for t in range(9):
        torch.testing.assert_close(mixing_matrices(sep)[t], p @ torch.diag(d[:, t]), rtol=1e-12, atol=1e-14)


def test_operator_functions_refuse_nonlinear_or_unknown_layers():
    with pytest.raises(TypeError, match="ReLU is not a convolution layer"):
        linear_operator(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU()), (4, 4))
    with pytest.raises(TypeError, match="expected one gridgraph layer or nn.Conv2d"):
        patch_operator(nn.Sequential(nn.Conv2d(1, 1, 3)))
    with pytest.raises(TypeError, match="must be a SeparableConv2d"):
        collapsed_separable(GridConv2d(1, 1, 3))
    with pytest.raises(ValueError, match="needs an odd kernel"):
        collapsed_separable(SeparableConv2d(2, 2, 2))
    with pytest.raises(ValueError, match="expected a 2-d tensor"):
        matrix_rank(torch.zeros(3))
    with pytest.raises(ValueError, match="depth_multiplier must be a positive int"):
        separable_approximation(torch.zeros(2, 2, 3, 3), 0)
    assert isinstance(ConvGeometry.from_module(nn.Conv2d(1, 1, 3)), ConvGeometry)
