"""Real networks, converted, against the originals: what became message passing, what torch convolution still
runs (found by running the model: :func:`gridgraph.torch_convolutions`), and the float64 errors of the output,
the input gradient and the parameter gradients. timm's and torchvision's definitions, random weights; not part
of the test suite (timm and torchvision come with the ``bench`` extra).

    pip install -e ".[bench]"
    python benchmarks/zoo.py                        # the default list, eval, 1x3x64x64 (video: 1x3x4x32x32)
    python benchmarks/zoo.py --models tiny_vit_5m_224 tv:r3d_18 --size 96 --train

A name ``tv:<name>`` is a torchvision model (``torchvision.models.get_model``), any other a timm model.

Prints one line per network: the largest relative error of the output, of the input gradient (max |twin -
original| / max |original|) and of the parameter gradients (against the network's largest gradient), and whether every converted convolution ran the
image kernels; exits non-zero if any error exceeds ``--tol`` (default 1e-9).
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

import gridgraph
from gridgraph.nn.functional import kernel_trace
from gridgraph.routing import is_routed

DEFAULT = ["tiny_vit_5m_224", "resnet18", "mobilenetv2_100", "efficientnet_b0", "convnext_atto", "regnety_002",
           "mobilevit_xxs", "efficientvit_b0", "repvit_m0_9", "fastvit_t8", "ghostnet_100", "dla34",
           # the patterns: Conv2dSame, StdConv2d, ScaledStdConv2d, MixedConv2d, BlurPool, CondConv2d, video
           "tf_efficientnet_b0", "resnetv2_50x1_bit", "nf_regnet_b0", "mixnet_s", "resnetblur18",
           "efficientnet_cc_b0_4e", "tv:r3d_18", "tv:r2plus1d_18", "tv:mc3_18"]


def check(name: str, size: int, train: bool, tol: float) -> bool:
    torch.manual_seed(0)
    video = name.startswith("tv:")
    try:
        if video:
            import torchvision

            net = torchvision.models.get_model(name[3:], weights=None)
        else:
            import timm

            net = timm.create_model(name, pretrained=False)
        net = net.double().train(train)
    except Exception as error:  # noqa: BLE001
        print(f"{name}: not built ({type(error).__name__}: {error})")
        return True
    batch = 2 if train else 1  # BatchNorm1d heads train on 2+
    x = torch.randn(batch, 3, *((4, size // 2, size // 2) if video else (size, size)), dtype=torch.float64)
    twin = gridgraph.convert(net, example_input=x)
    layers = gridgraph.converted_layers(twin)
    routed = sum(is_routed(m) for m in layers.values())
    left = gridgraph.torch_convolutions(twin, (x,))
    results = []
    for model in (net, twin):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        with kernel_trace() as trace:
            out = model(xi)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
        out.backward(g)
        results.append((out.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}, trace))
        model.zero_grad()
    (o, gx, gp, _), (o2, gx2, gp2, trace) = results

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()

    # parameter gradients against the network's largest one (some are zero up to round-off, e.g. a convolution's
    # bias before BatchNorm in training mode: relative to themselves their round-off would look like 100%)
    scale = max(g.abs().max() for g in gp.values() if g is not None)
    errors = {"output": rel(o2, o), "input grad": rel(gx2, gx),
              "param grads": max(((gp2[n] - gp[n]).abs().max() / scale).item() if gp2[n] is not None else float("inf")
                                 for n in gp if gp[n] is not None)}
    missing = [n for n in gp if gp[n] is not None and gp2[n] is None]
    if missing:
        print(f"{name}: no gradient in the twin for {missing[:5]}")
    ok = all(e <= tol for e in errors.values()) and not left
    print(f"{name} ({'train' if train else 'eval'}, {'x'.join(map(str, x.shape))}): {len(layers)} converted "
          f"({len(layers) - routed} twins, {routed} routed), torch convolutions left: {left or 'none'}; "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + f"; {'ok' if ok else 'FAIL'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train", action="store_true", help="training mode (default: eval)")
    parser.add_argument("--tol", type=float, default=1e-9)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    ok = [check(name, args.size, args.train, args.tol) for name in args.models]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
