"""A whole CNN as a GNN on PyG batches of pixel graphs (:func:`gridgraph.to_gnn`).

The reference is always the CNN itself: float64 outputs, input gradients and parameter gradients of the GNN
on a batch of pixel graphs equal the CNN's on the stacked images (eval and train; BatchNorm's running
statistics too), with no torch convolution, pooling or interpolation operator in the ATen trace of forward
and backward. Graphs of different sizes in one batch each equal the CNN on their own image; masked graphs
equal the CNN with the mask re-applied after every layer; a PyG layer between two stages trains.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch_geometric.data import Batch

import gridgraph as gg
from gridgraph import models

D = torch.float64
NETWORKS = ["ResNetish", "MobileNetish", "UNet", "SqueezeExciteNet", "DilatedSegmenter"]
FORBIDDEN = ("conv", "pool", "upsample", "interp", "im2col", "col2im", "unfold")


class _Ops(TorchDispatchMode):
    """The ATen operators that run (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def forbidden(self) -> list[str]:
        return sorted(op for op in self.ops if not op.startswith("gridgraph.") and any(k in op for k in FORBIDDEN))


def _network(name: str, device) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(models, name)().to(device, D)
    for m in model.modules():  # non-trivial BatchNorm state
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight, 1.0, 0.2)
            nn.init.normal_(m.bias, 0.0, 0.2)
    return model


def _images(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else gg.graph_to_image(out.x, out)


def _close(got, want, tol=1e-10):
    scale = max(1.0, want.abs().max().item())
    assert got.shape == want.shape, (got.shape, want.shape)
    assert (got - want).abs().max().item() <= tol * scale, (got - want).abs().max().item()


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", NETWORKS)
def test_network_equals_cnn(name, mode, device):
    model = getattr(_network(name, device), mode)()
    gnn = getattr(gg.to_gnn(model), mode)()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 24, 28, dtype=D, device=device)

    xr = x.clone().requires_grad_()
    want = reference(xr)
    xg = x.clone().requires_grad_()
    batch = Batch.from_data_list([gg.image_to_graph(xg[i:i + 1], kernel_size=1) for i in range(2)])
    with _Ops() as ops:
        got = _images(gnn(batch))
        grad = torch.randn_like(want)
        (got * grad).sum().backward()
    (want * grad).sum().backward()

    assert ops.forbidden() == []
    assert any(op.startswith("gridgraph.") for op in ops.ops)  # convolutions ran as message passing
    _close(got, want.detach())
    _close(xg.grad, xr.grad)
    mine = dict(gnn.module.named_parameters())
    for pname, p in reference.named_parameters():
        _close(mine[pname].grad, p.grad)
    for bname, b in reference.named_buffers():  # running statistics (train) and counters
        _close(dict(gnn.module.named_buffers())[bname].to(D), b.to(D))


@pytest.mark.parametrize("name", NETWORKS)
def test_mixed_sizes_each_graph_equals_cnn(name, device):
    model = _network(name, device).eval()
    gnn = gg.to_gnn(model).eval()
    sizes = [(24, 24), (16, 32), (24, 24), (32, 16)]
    images = [torch.randn(1, 3, *s, dtype=D, device=device) for s in sizes]
    batch = Batch.from_data_list([gg.image_to_graph(im, kernel_size=3) for im in images])
    batch.x.requires_grad_()
    with _Ops() as ops:
        out = gnn(batch)
        results = out if isinstance(out, torch.Tensor) else gg.graph_to_image(out.x, out)
        total = sum((r.square().sum() for r in results), torch.zeros((), dtype=D, device=device))
        total.backward()
    assert ops.forbidden() == []
    for i, image in enumerate(images):
        want = model(image)
        got = results[i:i + 1] if isinstance(results, torch.Tensor) else results[i].reshape(want.shape)
        _close(got, want.detach())
    # input gradient of one graph equals the CNN's on its image alone
    image = images[1].clone().requires_grad_()
    want = model(image)
    want.square().sum().backward()
    lo, hi = batch.ptr[1].item(), batch.ptr[2].item()
    _close(batch.x.grad[lo:hi], image.grad[0].permute(1, 2, 0).reshape(-1, 3))


def test_mixed_sizes_train_batchnorm_over_all_nodes(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).to(device, D).train()
    gnn = gg.to_gnn(model).train()
    images = [torch.randn(1, 3, 5, 7, dtype=D, device=device), torch.randn(1, 3, 8, 4, dtype=D, device=device)]
    out = gnn(Batch.from_data_list([gg.image_to_graph(im, kernel_size=1) for im in images]))
    conv = copy.deepcopy(model[0])
    nodes = torch.cat([conv(im)[0].flatten(1).t() for im in images])  # every node of the batch
    mean, var = nodes.mean(0), nodes.var(0, unbiased=False)
    _close(out.x, (nodes - mean) / torch.sqrt(var + 1e-5))
    bn = gnn.module[1]
    _close(bn.running_mean, 0.1 * mean)
    _close(bn.running_var, 0.9 + 0.1 * nodes.var(0, unbiased=True))


def test_masked_graphs_equal_cnn_with_mask_reapplied(device):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
            self.c = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            y = F.relu(self.bn(self.a(x)))
            return self.c(torch.cat([y, torch.sigmoid(self.b(y))], dim=1))

    torch.manual_seed(0)
    model = Net().to(device, D).eval()
    model.bn.running_mean.normal_()
    gnn = gg.to_gnn(model).eval()
    sizes = [(9, 11), (7, 7), (9, 11)]
    images = [torch.randn(1, 3, *s, dtype=D, device=device) for s in sizes]
    masks = [torch.rand(*s, device=device) > 0.4 for s in sizes]
    batch = Batch.from_data_list([gg.image_to_graph(im, kernel_size=3, mask=m) for im, m in zip(images, masks)])
    batch.x.requires_grad_()
    out = gnn(batch)
    assert isinstance(out, gg.MaskedPixelGraph)
    (out.x.square().sum()).backward()
    results = gg.graph_to_image(out.x, out)

    def reference(x, mask):
        k = mask.to(D)
        y = F.relu(model.bn(model.a(x * k))) * k
        return model.c(torch.cat([y, torch.sigmoid(model.b(y)) * k], dim=1)) * k

    lo = 0
    for image, mask, got in zip(images, masks, results):
        image = image.clone().requires_grad_()
        want = reference(image, mask)
        _close(got.reshape(want.shape), want.detach())
        want.square().sum().backward()
        n = int(mask.sum())
        _close(batch.x.grad[lo:lo + n], image.grad[0].permute(1, 2, 0)[mask])
        lo += n


def test_masked_graphs_refuse_grid_changes(device):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2)).to(device, D)
    gnn = gg.to_gnn(model)
    data = gg.image_to_graph(torch.randn(1, 3, 6, 6, dtype=D, device=device), kernel_size=3,
                             mask=torch.rand(6, 6, device=device) > 0.3)
    with pytest.raises(NotImplementedError, match=r"'1'.*masked pixel graphs.*6x6 -> 3x3"):
        gnn(data)


def test_masked_readout_is_mean_over_active_pixels(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).to(device, D)
    gnn = gg.to_gnn(model)
    image, mask = torch.randn(1, 3, 6, 5, dtype=D, device=device), torch.rand(6, 5, device=device) > 0.3
    out = gnn(gg.image_to_graph(image, kernel_size=3, mask=mask))
    dense = model[0](image * mask.to(D))[0]
    _close(out, dense[:, mask].mean(1)[None])


def test_pyg_layer_between_stages_trains(device):
    from torch_geometric.nn import GATConv

    torch.manual_seed(0)
    cnn = _network("ResNetish", device).train()
    stem = gg.to_gnn(nn.Sequential(cnn.stem, cnn.layer1, cnn.layer2), kernel_size=3)  # two stages ...
    head = gg.to_gnn(_Head(cnn.layer3, cnn.fc))                          # ... and the rest of the network
    width = 32
    attention = GATConv(width, width, heads=1).to(device, D)
    params = list(stem.parameters()) + list(attention.parameters()) + list(head.parameters())
    optimiser = torch.optim.SGD(params, lr=0.05)
    sizes = [(16, 16), (20, 12), (16, 16)]
    data = [gg.image_to_graph(torch.randn(1, 3, *s, dtype=D, device=device), kernel_size=1) for s in sizes]
    batch = Batch.from_data_list(data)
    target = torch.tensor([0, 1, 2], device=device)
    losses = []
    for _ in range(4):
        graphs = stem(batch)                                   # a PixelGraph batch on each graph's grid
        graphs.x = graphs.x + attention(graphs.x, graphs.edge_index)
        loss = F.cross_entropy(head(graphs), target)
        optimiser.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


class _Head(nn.Module):
    def __init__(self, layer, fc):
        super().__init__()
        self.layer, self.fc = layer, fc

    def forward(self, x):
        return self.fc(self.layer(x).mean((2, 3)))


def test_dataloader_of_pixel_graphs(device):
    from torch_geometric.loader import DataLoader

    model = _network("ResNetish", device).eval()
    gnn = gg.to_gnn(model, example_input=torch.randn(2, 3, 16, 16, dtype=D, device=device)).eval()
    images = [torch.randn(3, h, w, dtype=D, device=device) for h, w in [(16, 16), (12, 20), (16, 16), (24, 8)]]
    transform = gg.ToPixelGraph(kernel_size=3)
    from torch_geometric.data import Data

    loader = DataLoader([transform(Data(image=im)) for im in images], batch_size=2)
    got = torch.cat([gnn(batch) for batch in loader])
    want = torch.cat([model(im[None]) for im in images])
    _close(got, want)


def test_float32(device):
    model = _network("MobileNetish", device).float().eval()
    gnn = gg.to_gnn(model).eval()
    x = torch.randn(3, 3, 20, 20, device=device)
    want = model(x)
    got = gnn(gg.image_to_graph(x, kernel_size=1))
    _close(got, want, tol=1e-5)


def test_features_and_shapes(device):
    model = _network("UNet", device).eval()
    gnn = gg.to_gnn(model).eval()
    x = torch.randn(2, 3, 16, 16, dtype=D, device=device)
    graph = gg.image_to_graph(x, kernel_size=1)
    features = gnn.features(graph)
    assert isinstance(features, gg.Features) and features.grids == gg.Grids([(16, 16)] * 2)
    assert features.x.shape == (2 * 16 * 16, features.channels)
    _close(gnn.features(gg.features_of(graph)).x, features.x)  # Features in, the same result
    out = gnn(gg.image_to_graph(x, kernel_size=1))
    assert isinstance(out, gg.PixelGraph) and out.num_images == 2  # pixel graphs of the output grid
    _close(gg.graph_to_image(out.x, out), model(x))


def test_errors(device):
    with pytest.raises(TypeError, match="nn.Module"):
        gg.to_gnn(lambda x: x)

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(NotImplementedError, match="could not trace Branchy"):
        gg.to_gnn(Branchy())

    class Shuffle(nn.Module):
        def forward(self, x):
            return F.pixel_shuffle(x, 2)

    gnn = gg.to_gnn(Shuffle())
    with pytest.raises(NotImplementedError, match="pixel_shuffle.*node 'pixel_shuffle'"):
        gnn(gg.image_to_graph(torch.randn(1, 4, 4, 4, device=device), kernel_size=1))

    flat = gg.to_gnn(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(2 * 16, 2))).to(device)
    mixed = Batch.from_data_list([gg.image_to_graph(torch.randn(1, 3, 4, 4, device=device), kernel_size=1),
                                  gg.image_to_graph(torch.randn(1, 3, 2, 8, device=device), kernel_size=1)])
    with pytest.raises(NotImplementedError, match="flatten of grids of different sizes.*module '1'"):
        flat(mixed)
    with pytest.raises(ValueError, match="PixelEdgeIndex"):
        flat(Batch(x=torch.randn(4, 3, device=device), edge_index=torch.zeros(2, 0, dtype=torch.long,
                                                                              device=device)))
    with pytest.raises(TypeError, match="node features x"):
        flat(torch.randn(1, 3, 4, 4, device=device))
    with pytest.raises(ValueError, match="does not equal it"):
        gg.to_gnn(_Broken(), example_input=torch.randn(1, 3, 4, 4, dtype=D, device=device))


class _Broken(nn.Module):
    """Runs differently when traced (as code that reads Python state the trace bakes in)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1).double()

    def forward(self, x):
        return self.conv(x) * (2.0 if torch.fx._symbolic_trace.is_fx_tracing() else 1.0)


class _Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.scale, self.fn = nn.Parameter(torch.ones(3, 1, 1)), fn  # a per-channel scale keeps ties exact

    def forward(self, x):
        return self.fn(x * self.scale)


OPS = {
    "max3s2p1ceil": nn.MaxPool2d(3, 2, 1, ceil_mode=True),
    "max2dil2": nn.MaxPool2d(2, 1, dilation=2),
    "avg3s2p1": nn.AvgPool2d(3, 2, 1),
    "avg3s2p1_nopad_ceil": nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
    "avg2_divisor": nn.AvgPool2d(2, divisor_override=3),
    "adaptive_avg_3x2": nn.AdaptiveAvgPool2d((3, 2)),
    "adaptive_max_4": nn.AdaptiveMaxPool2d(4),
    "nearest_x2": nn.Upsample(scale_factor=2, mode="nearest"),
    "nearest_size": nn.Upsample(size=(11, 6), mode="nearest"),
    "bilinear": nn.Upsample(scale_factor=1.5, mode="bilinear"),
    "bilinear_align": nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
    "bilinear_size": nn.Upsample(size=(5, 13), mode="bilinear"),
}


@pytest.mark.parametrize("name", list(OPS))
def test_pooling_and_upsampling_follow_torch(name, device):
    torch.manual_seed(0)
    model = _Op(OPS[name]).to(device, D)
    gnn = gg.to_gnn(model)
    x = torch.randn(2, 3, 7, 9, dtype=D, device=device)
    x = x.round(decimals=0)  # ties in max pooling: the gradient goes to the first maximal element, as torch's
    xr, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = model(xr)
    with _Ops() as ops:
        got = _images(gnn(gg.image_to_graph(xg, kernel_size=1)))
        grad = torch.randn_like(want)
        (got * grad).sum().backward()
    (want * grad).sum().backward()
    assert ops.forbidden() == []
    _close(got, want.detach())
    _close(xg.grad, xr.grad)


class _ModeBranch(nn.Module):
    """Dataflow that depends on the mode (``if self.training``), as timm's blocks have."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            y = y * 2.0
        return y.mean((2, 3))


def test_module_survives_copy_pickle_mode_and_swaps(device):
    import io

    torch.manual_seed(0)
    model = _ModeBranch().to(device, D)
    gnn = gg.to_gnn(model)
    data = gg.image_to_graph(torch.randn(2, 3, 5, 6, dtype=D, device=device), kernel_size=1)
    images = gg.graph_to_image(data.x, data)
    for mode in (True, False, True):
        model.train(mode), gnn.train(mode)
        _close(gnn(data), model(images))
    assert set(gnn.state_dict()) == {f"module.{k}" for k in model.state_dict()}
    buffer = io.BytesIO()
    torch.save(gnn, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copy.deepcopy(gnn), loaded):
        _close(other(data), gnn(data))
    gnn.module.conv = gg.convert(nn.Conv2d(3, 4, 1)).to(device, D)  # a module swapped after to_gnn is the one used
    _close(gnn(data), gnn.module.conv(images).mean((2, 3)) * 2.0)


def test_describe_names_each_stage(device):
    model = _network("ResNetish", device).eval()
    gnn = gg.to_gnn(model).eval()
    rows = gnn.describe(gg.image_to_graph(torch.randn(2, 3, 24, 24, dtype=D, device=device), kernel_size=1))
    convs = [r for r in rows if r["aggregation"].startswith("sum over taps")]
    assert [r["module"] for r in convs][:2] == ["stem.0", "layer1.conv1.0"]
    stem = convs[0]
    assert stem["grid_in"] == stem["grid_out"] == (24, 24) and stem["edges"] == (3 * 24 - 2) ** 2
    assert {r["grid_out"] for r in convs} == {(24, 24), (12, 12), (6, 6)}
    assert rows[-1]["aggregation"] == "mean (readout per graph)" or rows[-2]["aggregation"].startswith("mean")


class StochasticDepth(nn.Module):
    """torchvision's / timm's stochastic depth (a module reading self.training), replicated."""

    def __init__(self, p):
        super().__init__()
        self.p, self.mode = p, "row"

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.size(0), 1, 1, 1).bernoulli_(1 - self.p) / (1 - self.p)
        return x * keep


def test_stochastic_depth_per_graph(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), StochasticDepth(0.5)).to(device, D)
    gnn = gg.to_gnn(model)
    x = torch.randn(8, 3, 5, 5, dtype=D, device=device)
    data = gg.image_to_graph(x, kernel_size=1)
    gnn.eval()
    out = gnn(data)
    _close(gg.graph_to_image(out.x, out), model.eval()(x))  # eval: the identity
    gnn.train()
    out = gnn.features(data)
    conv = model[0](x).permute(0, 2, 3, 1).reshape(8, -1, 4)
    per_graph = out.x.view(8, -1, 4)
    kept = [bool(torch.allclose(per_graph[g], 2 * conv[g])) for g in range(8)]
    dropped = [bool((per_graph[g] == 0).all()) for g in range(8)]
    assert all(k or d for k, d in zip(kept, dropped)) and any(kept) and any(dropped)  # whole graphs, scaled


class _LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d: a LayerNorm over the channels of an image, by permuting."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7, channels-last LayerNorm and MLP, layer scale, residual."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm, self.up, self.down = nn.LayerNorm(c, eps=1e-6), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.scale = nn.Parameter(torch.rand(c, 1, 1))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.down(F.gelu(self.up(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.scale * y


def test_convnext_style_channels_last_layers(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), _LayerNorm2d(8), _ConvNeXtBlock(8),
                          _LayerNorm2d(8), nn.Conv2d(8, 16, 2, stride=2), _ConvNeXtBlock(16),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).to(device, D)
    gnn = gg.to_gnn(model)
    x = torch.randn(2, 3, 32, 24, dtype=D, device=device)
    xr, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = model(xr)
    with _Ops() as ops:
        got = gnn(gg.image_to_graph(xg, kernel_size=1))
        got.square().sum().backward()
    want.square().sum().backward()
    assert ops.forbidden() == []
    _close(got, want.detach())
    _close(xg.grad, xr.grad)
    bad = gg.to_gnn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm(4)))   # LayerNorm over the width of an image
    with pytest.raises(NotImplementedError, match="LayerNorm over the last dim of an image batch"):
        bad(gg.image_to_graph(torch.randn(1, 3, 4, 4, device=device), kernel_size=1))


def test_compiled_gnn_equals_eager_and_runs_message_passing():
    """torch.compile of a GNN: the same numbers, gradients included, and the convolutions still run as
    gridgraph's kernels (recorded by kernel_trace), not as torch's."""
    from gridgraph.nn.functional import kernel_trace

    torch.manual_seed(0)
    model = _network("ResNetish", "cpu").eval()
    gnn = gg.to_gnn(model).eval()
    compiled = torch.compile(gnn)
    data = gg.image_to_graph(torch.randn(2, 3, 16, 16, dtype=D), kernel_size=1)
    x = data.x.clone().requires_grad_()
    data.x = x
    want = gnn(data)
    (gx,) = torch.autograd.grad(want.sum(), x)
    with kernel_trace() as trace, _Ops() as ops:
        got = compiled(data)
        (cx,) = torch.autograd.grad(got.sum(), x)
    _close(got, want.detach())
    _close(cx, gx)
    assert trace and set(trace) <= {"image", "image-op"}
    assert ops.forbidden() == []
