"""A CNN as a GNN: ``gridgraph.to_gnn`` on a PyG batch of same-size pixel graphs against the converted twin
on the stacked images (the target: the GNN costs no more than 1.5x the twin).

Run from the repository root (torchvision is optional: ``pip install torchvision`` adds ResNet-18 and
MobileNetV2)::

    python benchmarks/gnn.py                 # every case, CPU, 2 threads (~2 minutes)
    python benchmarks/gnn.py --quick         # tiny inputs: checks every case, times nothing

Each case (and, checked only, torchvision's EfficientNet-B0, MobileNetV3-small, RegNetY-400MF, DenseNet-121 and
SqueezeNet 1.1, ConvNeXt-T) first checks, in float64, that the GNN's output and input gradient on the pixel-graph batch equal
the original CNN's on the images (eval mode, and train mode with dropout off) and that no torch convolution,
pooling or interpolation operator ran in the GNN's forward and backward (watched at the ATen level), then times, interleaved
(``benchmarks/networks.py``'s timing: rounds of blocks of at least 0.2 s, median), in eval mode under
``torch.no_grad()``:

* ``twin``: ``gridgraph.convert(model)`` on the images, in its best layout (channels-last);
* ``gnn``: ``to_gnn(model)`` on ``Batch`` of the same images as pixel graphs (built once, outside the timing:
  the graphs are the GNN's input as images are the twin's).

The table prints the ratio gnn / twin per case and their geometric mean.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from networks import time_variants  # noqa: E402

import gridgraph  # noqa: E402
from gridgraph import models  # noqa: E402


def cases(quick: bool):
    size = 16 if quick else 64
    yield "ResNetish", models.ResNetish(), (8, 3, size, size)
    yield "MobileNetish", models.MobileNetish(), (8, 3, size, size)
    yield "UNet", models.UNet(), (4, 3, size, size)
    yield "DilatedSegmenter", models.DilatedSegmenter(), (4, 3, size, size)
    try:
        import torchvision
    except ImportError:
        print("torchvision is not installed: ResNet-18 and MobileNetV2 skipped", file=sys.stderr)
        return
    size = 32 if quick else 112
    yield "resnet18", torchvision.models.resnet18(), (8, 3, size, size)
    yield "mobilenet_v2", torchvision.models.mobilenet_v2(), (8, 3, size, size)
    for name in CHECKED_ONLY:  # exactness only (not timed)
        yield name, getattr(torchvision.models, name)(), None


CHECKED_ONLY = ["efficientnet_b0", "mobilenet_v3_small", "regnet_y_400mf", "densenet121", "squeezenet1_1",
                "convnext_tiny"]


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout) or type(m).__name__ in ("StochasticDepth", "DropPath"):
            m.eval()
    return model


class _Ops(TorchDispatchMode):
    """The ATen operators that run."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


FORBIDDEN = ("conv", "pool", "upsample", "interp", "im2col", "col2im", "unfold")


def check(model: nn.Module, shape) -> dict:
    """float64: the GNN on pixel graphs equals the CNN on images (output and input gradient, eval and train)."""
    errors = {}
    for mode in ("eval", "train"):
        reference = _no_dropout(copy.deepcopy(model).double().train(mode == "train"))
        gnn = gridgraph.to_gnn(copy.deepcopy(reference))
        _no_dropout(gnn.train(mode == "train"))
        x = torch.randn(2, *shape[1:], dtype=torch.float64)
        xr, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
        want = reference(xr)
        grad = torch.randn_like(want)
        with _Ops() as ops:  # forward and backward of the GNN: no torch convolution/pooling/interpolation
            got = gnn(gridgraph.image_to_graph(xg, kernel_size=1))
            if not isinstance(got, torch.Tensor):
                got = gridgraph.graph_to_image(got.x, got)
            (got * grad).sum().backward()
        (want * grad).sum().backward()
        errors.setdefault("torch_ops", set()).update(
            op for op in ops.ops if not op.startswith("gridgraph.") and any(k in op for k in FORBIDDEN))
        errors[mode] = max((got - want).abs().max().item() / max(1.0, want.abs().max().item()),
                           (xg.grad - xr.grad).abs().max().item() / max(1.0, xr.grad.abs().max().item()))
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny inputs: check every case, time nothing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, gridgraph {gridgraph.__version__}, {args.threads} threads\n")
    print("| network | input | float64 error (eval / train); no torch conv/pool/interp op | twin ms | gnn ms | gnn / twin |")
    print("|---|---|---|---|---|---|")
    ratios = []
    failed = False
    for name, model, shape in cases(args.quick):
        torch.manual_seed(0)
        timed = shape is not None
        shape = shape or (2, 3, 64, 64)
        errors = check(model, shape)
        torch_ops = errors.pop("torch_ops")
        ok = max(errors.values()) <= 1e-9 and not torch_ops
        failed |= not ok
        error_text = f"{errors['eval']:.1e} / {errors['train']:.1e}" + ("" if ok else " FAILED") + (
            f" (torch ran {sorted(torch_ops)})" if torch_ops else "")
        if args.quick or not ok or not timed:
            print(f"| {name} | {'x'.join(map(str, shape))} | {error_text} | n/a | n/a | n/a (checked, not timed) |")
            continue
        model = model.eval()
        twin = gridgraph.convert(model).eval().to(memory_format=torch.channels_last)
        gnn = gridgraph.to_gnn(model).eval()
        x = torch.randn(*shape)
        images = x.contiguous(memory_format=torch.channels_last)
        batch = gridgraph.image_to_graph(x, kernel_size=1)
        with torch.no_grad():
            times = time_variants({"twin": lambda: twin(images), "gnn": lambda: gnn(batch)}, args.rounds, 0.2,
                                  torch.device("cpu"))
        ratio = times["gnn"] / times["twin"]
        ratios.append(ratio)
        print(f"| {name} | {'x'.join(map(str, shape))} | {error_text} | {times['twin'] * 1e3:.2f} | "
              f"{times['gnn'] * 1e3:.2f} | {ratio:.2f}x |")
    if ratios:
        geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"\ngeometric mean gnn / twin: {geomean:.2f}x (worst {max(ratios):.2f}x; target <= 1.5x)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
