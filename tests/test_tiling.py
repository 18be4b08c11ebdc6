"""Tiled and spatially parallel execution (:func:`gridgraph.tiled`, :func:`gridgraph.spatial_parallel`).

The reference is the whole-image run of the same converted network (itself equal to torch's, tested
elsewhere) and, for the parallel runs, training on the whole image in one process: float64 outputs, input
gradients and weight gradients agree to 1e-12 relative, over every padding mode, strides, dilations,
depthwise, pointwise and transposed layers, uneven tiles and bands (empty bands included).
"""
from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import gridgraph as gg
from gridgraph.tiling import TilingError, receptive_halo, spatial_parallel, tiled

D = torch.float64
MODES = ["zeros", "reflect", "replicate", "circular"]


def _chain(mode: str) -> nn.Module:
    """Strides, dilations, depthwise, pointwise, transposed and elementwise layers between them."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode), nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2, padding_mode=mode), nn.Tanh(),
        nn.Conv2d(6, 6, (3, 5), padding=(1, 2), groups=6, padding_mode=mode), nn.BatchNorm2d(6),
        nn.Conv2d(6, 4, 1), nn.SiLU(),
        nn.ConvTranspose2d(4, 5, 3, stride=2, padding=1, output_padding=1))


class Residual(nn.Module):
    """A ResNet-style network: residual blocks, a strided projection, max pooling, a global average pooling
    and a linear head."""

    def __init__(self, classes: int = 3, mode: str = "zeros"):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.a = nn.Conv2d(8, 8, 3, padding=1, padding_mode=mode)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.project = nn.Conv2d(8, 16, 1, stride=2)
        self.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(x + self.b(torch.relu(self.a(x))))
        x = torch.relu(self.down(x) + self.project(x))
        return self.fc(self.avg(x).mean((2, 3)))


def _net(module: nn.Module, device) -> nn.Module:
    """The converted network with parameters and statistics drawn from a fixed seed (the same in every process)."""
    generator = torch.Generator().manual_seed(0)
    net = gg.convert(module).to(device, D).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.4 * torch.randn(p.shape, dtype=D, generator=generator))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, dtype=D, generator=generator))
                m.running_var.copy_(torch.rand(m.running_var.shape, dtype=D, generator=generator) + 0.5)
    return net


def _grads(net, x, run):
    x = x.clone().requires_grad_()
    y = run(x)
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    grads = torch.autograd.grad((y * g).sum(), [x] + list(net.parameters()))
    return y.detach(), grads


def _assert_equal(a, b):
    (ya, ga), (yb, gb) = a, b
    assert ya.shape == yb.shape
    for u, v in zip((ya,) + tuple(ga), (yb,) + tuple(gb)):
        scale = max(1.0, v.abs().max().item())
        assert (u - v).abs().max().item() <= 1e-12 * scale


@pytest.mark.parametrize("tile", [5, (7, 4), (64, 3), 1000])
@pytest.mark.parametrize("mode", MODES)
def test_tiled_equals_whole(mode, tile, device):
    net = _net(_chain(mode), device)
    x = torch.randn(2, 3, 23, 31, dtype=D, device=device)
    _assert_equal(_grads(net, x, tiled(net, tile)), _grads(net, x, net))


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_tiled_residual_network_with_global_pooling(mode, device):
    net = _net(Residual(mode=mode), device)
    x = torch.randn(2, 3, 29, 26, dtype=D, device=device)
    _assert_equal(_grads(net, x, tiled(net, 3)), _grads(net, x, net))


def test_tiled_single_layer_1d_and_3d(device):
    for conv, shape, tile in [(nn.Conv1d(3, 4, 5, stride=2, padding=2, padding_mode="reflect"), (2, 3, 40), 6),
                              (nn.Conv3d(2, 3, 3, padding=1, dilation=(1, 2, 1), padding_mode="circular"),
                               (1, 2, 7, 9, 8), (3, 4, 5))]:
        layer = _net(conv, device)
        x = torch.randn(*shape, dtype=D, device=device)
        _assert_equal(_grads(layer, x, tiled(layer, tile)), _grads(layer, x, layer))


def test_halo_is_the_receptive_field():
    net = gg.convert(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=2, dilation=2)))
    region = receptive_halo(net, (32, 32), (((10, 12),), ((0, 1),)))
    assert region == (((7, 15),), ((0, 4),))  # 3 pixels of halo each way, clipped at the border
    circular = gg.convert(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"))
    assert receptive_halo(circular, (8, 8), (((0, 1),), ((3, 4),))) == (((0, 2), (7, 8)), ((2, 5),))


def test_tiled_errors():
    with pytest.raises(TypeError, match="converted model"):
        tiled(nn.Sequential(nn.Conv2d(3, 3, 3)), 8)
    with pytest.raises(ValueError, match="tile_size"):
        tiled(gg.convert(nn.Conv2d(3, 3, 3)), 0)
    train_bn = gg.convert(nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3))).train()
    with pytest.raises(NotImplementedError, match="'1'.*BatchNorm in training mode"):
        tiled(train_bn, 4)(torch.randn(1, 3, 8, 8))

    class SqueezeExcite(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = gg.convert(nn.Conv2d(3, 3, 3, padding=1))

        def forward(self, x):
            y = self.conv(x)
            return y * torch.sigmoid(y.mean((2, 3), keepdim=True))

    with pytest.raises(NotImplementedError, match="global pooling in the middle"):
        tiled(SqueezeExcite(), 4)(torch.randn(1, 3, 8, 8))

    class Attention(nn.Module):
        def forward(self, x):
            return torch.softmax(x.flatten(2), -1).view_as(x)

    with pytest.raises(NotImplementedError, match="'flatten'.*cannot be computed tile by tile"):
        tiled(Attention(), 4)(torch.randn(1, 3, 8, 8))


# ------------------------------------------------------------------------------------ spatial parallel
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, case: str, queue) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        if case == "residual":
            net = _net(Residual(mode="circular"), "cpu")
            x = torch.randn(2, 3, 21, 18, dtype=D, generator=torch.Generator().manual_seed(1))
        else:
            net = _net(_chain(case), "cpu")
            x = torch.randn(2, 3, 2 if case == "zeros" else 17, 13, dtype=D,
                            generator=torch.Generator().manual_seed(1))
        band = torch.tensor_split(x, world, dim=2)[rank].clone().requires_grad_()
        parallel = spatial_parallel(net)
        y = parallel(band)
        # each rank's loss: its share of the whole-image loss (for a global output, returned whole on every
        # rank: the same loss on every rank)
        if y.dim() > 2:
            full = net(x)
            g = torch.linspace(-1, 1, full.numel(), dtype=D).view_as(full)
            g = torch.tensor_split(g, world, dim=2)[rank]
            loss = (y * g).sum()
        else:
            g = torch.linspace(-1, 1, y.numel(), dtype=D).view_as(y)
            loss = (y * g).sum()
        grads = torch.autograd.grad(loss, [band] + list(net.parameters()))
        # numpy arrays travel by value (a shared tensor's memory would vanish with this process)
        queue.put((rank, y.detach().numpy(), [t.detach().numpy() for t in grads]))
    except BaseException:  # report instead of leaving the parent waiting
        import traceback

        queue.put((rank, None, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,case", [(2, "reflect"), (3, "circular"), (3, "zeros"), (2, "residual"),
                                        (3, "residual")])
def test_spatial_parallel_equals_whole(world, case):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, case, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=240) for _ in range(world)), key=lambda r: r[0])
    failures = [r[2] for r in results if r[1] is None]
    assert not failures, failures[0]
    results = [(r, torch.from_numpy(y), [torch.from_numpy(g) for g in grads]) for r, y, grads in results]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    if case == "residual":
        net = _net(Residual(mode="circular"), "cpu")
        x = torch.randn(2, 3, 21, 18, dtype=D, generator=torch.Generator().manual_seed(1))
    else:
        net = _net(_chain(case), "cpu")
        x = torch.randn(2, 3, 2 if case == "zeros" else 17, 13, dtype=D, generator=torch.Generator().manual_seed(1))
    whole = _grads(net, x, net)
    y = torch.cat([r[1] for r in results], dim=2) if whole[0].dim() > 2 else results[0][1]
    grad_x = torch.cat([r[2][0] for r in results], dim=2)
    weights = list(results[0][2][1:])
    for r in results:  # the weight gradients are the whole-image ones on every rank
        for a, b in zip(r[2][1:], weights):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
        if whole[0].dim() <= 2:  # and a global output is whole on every rank
            assert torch.allclose(r[1], results[0][1], rtol=0, atol=1e-12)
    _assert_equal((y, [grad_x] + weights), whole)


class _Decoder(nn.Module):
    """Upsampling as U-Nets and segmentation heads do it: nn.Upsample (nearest, bilinear both ways) and
    F.interpolate back to the input's size."""

    def __init__(self, mode: str):
        super().__init__()
        self.down = nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode=mode)
        self.deeper = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.near = nn.Upsample(scale_factor=2, mode="nearest")
        self.bilinear = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.mix = nn.Conv2d(12, 4, 3, padding=1, padding_mode=mode)

    def forward(self, x):
        size = x.shape[-2:]
        a = torch.relu(self.down(x))                                   # 15x18
        b = torch.relu(self.deeper(a))                                 # 8x9
        c = nn.functional.interpolate(self.near(b), size=a.shape[-2:], mode="bilinear")   # 16x18 -> 15x18
        y = self.bilinear(self.mix(torch.cat([a, c], dim=1)))          # 30x36, align_corners=True
        return nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)   # 29x35


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_tiled_upsampling(mode, device):
    net = _net(_Decoder(mode), device)
    x = torch.randn(2, 3, 29, 35, dtype=D, device=device)
    _assert_equal(_grads(net, x, tiled(net, (6, 9))), _grads(net, x, net))


@pytest.mark.parametrize("name", ["UNet", "ResNetish", "MobileNetish"])
def test_tiled_reference_networks(name, device):
    """Max pooling, transposed convolutions and skip concatenations (U-Net), residual blocks and a global pooling
    head (ResNet), depthwise inverted residuals with ReLU6 (MobileNetV2): tiled equals whole."""
    from gridgraph import models

    net = _net(getattr(models, name)(), device)
    x = torch.randn(2, 3, 40, 36, dtype=D, device=device)
    _assert_equal(_grads(net, x, tiled(net, 7)), _grads(net, x, net))


def test_tiled_names_squeeze_excitation():
    from gridgraph import models

    net = _net(models.SqueezeExciteNet(), "cpu")
    with pytest.raises(NotImplementedError, match="global pooling in the middle"):
        tiled(net, 8)(torch.randn(1, 3, 24, 24, dtype=D))


def test_tiled_survives_copy_pickle_and_compile():
    import copy
    import io

    from gridgraph.nn.functional import kernel_trace

    net = _net(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                             nn.Conv2d(4, 2, 3, stride=2)), "cpu")
    run = tiled(net, 4)
    x = torch.randn(1, 3, 17, 13, dtype=D)
    want = _grads(net, x, net)
    buffer = io.BytesIO()
    torch.save(run, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(run), torch.load(buffer, weights_only=False)):
        y = other(x)
        _assert_equal((y.detach(), []), (want[0], []))
    with kernel_trace() as trace:
        _assert_equal(_grads(net, x, torch.compile(run, backend="aot_eager")), want)  # dynamo, no codegen
    assert trace and set(trace) <= {"image", "image-op"}  # message passing, tile by tile
