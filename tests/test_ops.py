"""The kernels as torch operators: every transform torch offers works on the graph layers as on nn.Conv2d.

Double backward (gradgradcheck on every kernel path, a WGAN-GP penalty), complex gradients, torch.func
(per-sample gradients), autocast, meta tensors, torch.export, torch.compile (fullgraph, no graph break,
no recompile), NaN/Inf parity and DistributedDataParallel. The reference is always the torch module.
"""
from __future__ import annotations

import copy
import gc
import io
import os
import socket
import time

import pytest
import torch
from torch import nn

from gridgraph import (REFERENCE_MODELS, GridConv2d, GridConvTranspose2d, convert, graph_to_image, image_to_graph,
                       reference_model, sparse_to_graph)
from gridgraph.nn import functional as F
from gridgraph.nn.functional import EdgeList, kernel_trace

F64 = dict(rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------- every kernel path
def _path(name: str, dtype=torch.float64):
    """``(x, structure, weight, bias, groups, kernel)``: one small problem per kernel branch."""
    gen = torch.Generator().manual_seed(len(name))

    def rand(*shape):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return t.to(dtype) if not dtype.is_complex else torch.complex(t, torch.randn(*shape, generator=gen,
                                                                                     dtype=torch.float64))

    grid = dict(dense=(3, 4, 1, dict(kernel_size=3, padding=1)),
                transform_then_gather=(12, 1, 1, dict(kernel_size=3, padding=1)),
                depthwise=(3, 6, 3, dict(kernel_size=3, padding=1, padding_mode="circular")),
                grouped=(4, 4, 2, dict(kernel_size=(3, 2), padding="same", padding_mode="reflect")),
                strided=(3, 2, 1, dict(kernel_size=3, stride=2, padding=1, padding_mode="circular")),
                replicate=(2, 3, 1, dict(kernel_size=3, stride=2, padding=2, padding_mode="replicate")))
    if name in grid:
        c_in, c_out, groups, kwargs = grid[name]
        g = image_to_graph(torch.zeros(2, c_in, 5, 4), **kwargs)
        k = kwargs["kernel_size"]
        k = (k, k) if isinstance(k, int) else k
        return rand(g.num_src, c_in), g.edge_index, rand(c_out, c_in // groups, *k), rand(c_out), groups, "grid"
    if name == "transposed":
        g = image_to_graph(torch.zeros(2, 3, 3, 4), GridConvTranspose2d(3, 2, 3, stride=2, padding=1,
                                                                        output_padding=1))
        return rand(g.num_src, 3), g.edge_index, rand(2, 3, 3, 3), rand(2), 1, "grid"
    if name == "sparse":
        coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 2, 2], [1, 1, 1], [1, 3, 2], [1, 2, 2]])
        g = sparse_to_graph(coords, torch.zeros(6, 3), (4, 4), kernel_size=3, stride=2, padding=1)
        return rand(6, 3), g.edge_index, rand(4, 3, 3, 3), rand(4), 1, "sparse"
    if name == "edges":
        edge_index = torch.tensor([[0, 1, 2, 3, 1, 1], [1, 1, 0, 2, 3, 3]])
        edge_type = torch.tensor([0, 4, 8, 2, 2, 2])  # parallel edges of one tap: PyG sums them
        return rand(4, 3), EdgeList(edge_index, edge_type, 4, 4), rand(2, 3, 3, 3), rand(2), 1, "edges"
    raise ValueError(name)


PATHS = ["dense", "transform_then_gather", "depthwise", "grouped", "strided", "replicate", "transposed", "sparse",
         "edges"]


@pytest.mark.parametrize("name", PATHS)
def test_gradgradcheck_on_every_path(name):
    """First and second derivatives of F.conv in x, weight and bias, by finite differences (float64)."""
    x, structure, weight, bias, groups, kernel = _path(name)
    with kernel_trace() as trace:
        F.conv(x, structure, weight, bias, groups)
    assert trace == [kernel]
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))

    def f(x, w, b):
        return F.conv(x, structure, w, b, groups)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("name", ["dense", "depthwise", "transposed", "sparse", "edges"])
def test_opcheck_of_the_registered_operators(name):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration and dynamo support of
    every operator the path calls (forward, input gradient, weight gradient)."""
    from gridgraph.nn import ops

    x, structure, weight, bias, groups, kernel = _path(name)
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    g = torch.randn(F.conv(x, structure, weight, bias, groups).shape, dtype=torch.float64)
    if kernel == "grid":
        key = structure.structure.parts[0].key
        calls = [(ops.grid_conv, (x, weight, bias, key, groups)), (ops.grid_conv_input_grad, (g, weight, key, groups)),
                 (ops.grid_conv_weight_grad, (x, g, key, groups, list(weight.shape)))]
    else:
        if kernel == "sparse":
            ei, et, n_src, n_dst = structure.as_tensor(), structure.edge_type, x.size(0), g.size(0)
        else:
            ei, et, n_src, n_dst = structure
        calls = [(ops.edge_conv, (x, ei, et, weight, bias, n_dst, groups, kernel == "sparse", False)),
                 (ops.edge_conv_input_grad, (g, ei, et, weight, n_src, groups, False)),
                 (ops.edge_conv_weight_grad, (x, g, ei, et, groups, list(weight.shape), False))]
    for op, args in calls:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", PATHS)
def test_complex_gradients(name):
    """Complex features and weights: gradcheck (Wirtinger calculus, conjugates where needed)."""
    x, structure, weight, bias, groups, _ = _path(name, torch.complex128)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(lambda x, w, b: F.conv(x, structure, w, b, groups), inputs)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, groups=2),
                                    dict(kernel_size=3, padding=1, padding_mode="reflect")])
def test_complex_equals_conv2d(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, dtype=torch.complex128, **kwargs)
    layer = GridConv2d.from_conv2d(conv)
    images = torch.randn(2, 4, 6, 5, dtype=torch.complex128)
    xr, x = images.clone().requires_grad_(), images.clone().requires_grad_()
    ref = conv(xr)
    (ref.abs() ** 2).sum().backward()
    g = image_to_graph(x, layer)
    out = graph_to_image(layer(g.x, g.edge_index, g.edge_type, size=g.size()), g)
    (out.abs() ** 2).sum().backward()
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(x.grad, xr.grad, **F64)
    torch.testing.assert_close(layer.weight.grad, conv.weight.grad, **F64)
    torch.testing.assert_close(layer.bias.grad, conv.bias.grad, **F64)


def test_wgan_gp_penalty_equals_conv2d():
    """A gradient penalty ((|d D(x) / dx| - 1)^2) backpropagated to the critic's weights: double backward
    through a converted critic equals nn.Conv2d's (before, it silently returned a constant)."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(8, 4, 3, groups=2),
                           nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 1)).double()
    twin = convert(critic)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for net in (critic, twin):
        xi = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(net(xi).sum(), xi, create_graph=True)
        penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        penalty.backward()
    for (name, p), q in zip(critic.named_parameters(), twin.parameters()):
        if name == "5.bias":  # the penalty does not depend on the last bias
            assert p.grad is None and q.grad is None
            continue
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(q.grad, p.grad, **F64, msg=lambda m: f"{name}: {m}")


def test_per_sample_gradients_with_torch_func():
    """vmap(grad(loss)) over a batch (differential privacy's per-sample gradients) equals a loop over
    samples with nn.Conv2d."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, groups=2)).double()
    twin = convert(net)
    x, y = torch.randn(5, 3, 7, 6, dtype=torch.float64), torch.randn(5, 4, 3, 2, dtype=torch.float64)

    def loss(model, params, xi, yi):
        return (functional_call(model, params, (xi[None],))[0] - yi).square().sum()

    params = {k: v.detach() for k, v in twin.named_parameters()}
    per_sample = vmap(grad(lambda p, xi, yi: loss(twin, p, xi, yi)), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        want = torch.autograd.grad(loss(net, dict(net.named_parameters()), x[i], y[i]), list(net.parameters()))
        for (name, got), w in zip(per_sample.items(), want):
            torch.testing.assert_close(got[i], w, **F64, msg=lambda m: f"{name} sample {i}: {m}")


def test_jacrev_of_a_graph_layer():
    x, structure, weight, bias, groups, _ = _path("dense")
    jac = torch.func.jacrev(lambda x: F.conv(x, structure, weight, bias, groups))(x)
    ref = torch.autograd.functional.jacobian(lambda x: F.conv(x, structure, weight, bias, groups), x)
    torch.testing.assert_close(jac, ref, **F64)


# --------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("converted", [True, False], ids=["converted", "graph-layer"])
def test_autocast_follows_conv2d(converted, device):
    """Under autocast the graph layers compute in the autocast dtype and return what nn.Conv2d returns."""
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).to(device)
    x = torch.randn(2, 4, 6, 6, device=device)
    with torch.autocast(device.type, dtype=dtype):
        ref = conv(x)
        if converted:
            out = convert(conv)(x)
        else:
            layer = GridConv2d.from_conv2d(conv)
            g = image_to_graph(x, layer)
            out = graph_to_image(layer(g.x, g.edge_index, g.edge_type, size=g.size()), g)
    assert ref.dtype == out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())
    lower = nn.Conv2d(4, 8, 3, padding=1).to(device, dtype)  # the same rounding: equal to a lower-precision Conv2d
    lower.load_state_dict(conv.state_dict())
    with torch.no_grad():
        exact = lower(x.to(dtype))
    assert (out.float() - exact.float()).abs().max() <= 4 * (ref.float() - exact.float()).abs().max() + 1e-2


def test_bf16_input_with_fp32_weights_outside_autocast_is_a_clear_error():
    layer = GridConv2d(2, 3, 3, padding=1)
    g = image_to_graph(torch.randn(1, 2, 4, 4), layer)
    with pytest.raises(TypeError, match="expected x of dtype torch.float32, the layer's dtype"):
        layer(g.x.bfloat16(), g.edge_index)


# ------------------------------------------------------------------------------ meta and export
def test_meta_device_shapes_of_a_converted_network():
    net = reference_model("resnet")
    twin = convert(net).to("meta")
    x = torch.empty(2, 3, 32, 32, device="meta")
    assert twin(x).shape == net.to("meta")(x).shape and twin(x).device.type == "meta"
    layer = GridConv2d(3, 5, 3, stride=2, padding=1, device="meta")
    from gridgraph.structure import GraphPart
    out = F.conv(torch.empty(2 * 36, 3, device="meta"), GraphPart.grid(layer.geometry, (6, 6), 2), layer.weight,
                 layer.bias)
    assert out.shape == (2 * 9, 5) and out.device.type == "meta"


def test_torch_export_round_trip():
    torch.manual_seed(0)
    net = reference_model("mobilenet").eval()
    twin = convert(net)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(twin, (x,))
    assert any("gridgraph" in str(node.target) for node in program.graph.nodes)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), net(x), rtol=1e-5, atol=1e-5)


def test_jit_trace_of_a_converted_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2)).eval()
    x = torch.randn(1, 3, 8, 8)
    traced = torch.jit.trace(convert(net), (x,))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x), rtol=1e-5, atol=1e-5)
    # the trace records the operators themselves, which carry their gradients
    assert "gridgraph::conv_image" in str(traced.inlined_graph)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    traced(xs[0]).square().sum().backward()
    net(xs[1]).square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- NaN parity
@pytest.mark.parametrize("case", ["gather", "transform_then_gather", "depthwise", "masked"])
def test_inf_weights_give_nans_where_conv2d_gives_them(case):
    """0 * Inf = NaN at zero-padded borders (and, on a masked domain, at inactive pixels) exactly where
    nn.Conv2d has it (before, transform-then-gather produced none)."""
    c_in, c_out, groups = {"gather": (3, 4, 1), "transform_then_gather": (24, 2, 1), "depthwise": (4, 4, 4),
                           "masked": (3, 4, 1)}[case]
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups).double()
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("inf")
        conv.weight[-1, -1, 2, 1] = float("-inf")
    layer = GridConv2d.from_conv2d(conv)
    images = torch.randn(2, c_in, 5, 6, dtype=torch.float64)
    mask = images[:, 0] > -0.2 if case == "masked" else None
    g = image_to_graph(images, layer, mask=mask)
    out = graph_to_image(layer(g.x, g.edge_index, g.edge_type, size=g.size()), g, side="output")
    ref = conv(images if mask is None else images * mask[:, None])
    if mask is not None:
        ref = torch.where(mask[:, None], ref, torch.zeros_like(ref))
        out = torch.where(mask[:, None], out, torch.zeros_like(out))
    assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    finite = ~(ref.isnan() | ref.isinf())
    torch.testing.assert_close(out[finite], ref[finite], **F64)


# -------------------------------------------------------------------------------- torch.compile
def _compile_counters():
    from torch._dynamo.utils import counters

    return counters


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_of_a_converted_network(backend):
    """A converted reference network compiles into one graph (fullgraph: no graph break), is exact forward and
    backward, and a second call recompiles nothing."""
    torch._dynamo.reset()
    counters = _compile_counters()
    counters.clear()
    torch.manual_seed(0)
    net = reference_model("resnext")
    twin = convert(net)
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    x = torch.randn(2, *REFERENCE_MODELS["resnext"].input_shape[1:])
    for _ in range(2):
        xi, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref = compiled(xi), net(xr)
        out.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(xi.grad, xr.grad, rtol=1e-4, atol=1e-4)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for p, q in zip(twin.parameters(), net.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * max(1.0, q.grad.abs().max().item()))


def test_compile_of_the_plain_graph_call_takes_the_table_path():
    """Under torch.compile the plain call runs the neighbour-table operator (before: the edge-list fallback)."""
    torch._dynamo.reset()
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    layer = GridConv2d.from_conv2d(conv)
    g = image_to_graph(torch.randn(2, 3, 7, 6, dtype=torch.float64), layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with kernel_trace() as trace:
        out = compiled(g.x, g.edge_index, g.edge_type, size=g.size())
    assert trace == ["grid"]
    torch.testing.assert_close(graph_to_image(out, g), conv(graph_to_image(g.x, g)), **F64)


# ----------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, state: dict, x: torch.Tensor, y: torch.Tensor, path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = convert(_ddp_net())
    model.load_state_dict(state)
    ddp = DistributedDataParallel(model)
    half = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    torch.nn.functional.mse_loss(ddp(x[half]), y[half]).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, path)
    # Tear down in order (all work done, the reducer gone, then the group): gloo's destructor otherwise
    # can wait for its worker thread while holding the GIL the thread needs.
    dist.barrier()
    del ddp
    gc.collect()
    dist.destroy_process_group()


def _ddp_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 2, 3, stride=2, groups=2)).double()


def test_distributed_data_parallel_step_equals_the_full_batch(tmp_path):
    """A converted model under DistributedDataParallel (gloo, 2 CPU processes) gets the gradients of the
    single-process full batch."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    net = _ddp_net()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    path = str(tmp_path / "grads.pt")
    context = mp.spawn(_ddp_worker, args=(2, _free_port(), copy.deepcopy(net.state_dict()), x, y, path), nprocs=2,
                       join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DistributedDataParallel workers did not finish within 120 s")
    got = torch.load(path)
    torch.nn.functional.mse_loss(net(x), y).backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(got[name], p.grad, **F64, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1, groups=2),
                                    dict(kernel_size=1)])
def test_flop_counter_counts_the_graph_layer_as_conv2d(kwargs):
    """FlopCounterMode sees the operators: a graph layer's forward counts what nn.Conv2d's does."""
    from torch.utils.flop_counter import FlopCounterMode

    conv = nn.Conv2d(4, 6, **kwargs)
    x = torch.randn(2, 4, 9, 8)
    counts = []
    for module in (conv, convert(conv)):
        with FlopCounterMode(display=False) as counter:
            module(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
