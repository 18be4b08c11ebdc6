"""The ``gridgraph`` command line: argument parsing only; the work lives in the library."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

__all__ = ["main"]

_DTYPES = {"float32": [torch.float32], "float64": [torch.float64], "all": [torch.float32, torch.float64]}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridgraph", description="A CNN is a GNN on a pixel graph, exactly.")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check every graph layer against torch.nn.Conv2d, forward and backward")
    verify.add_argument("--device", default="all",
                        help="'cpu', 'cuda', 'cuda:N' or 'all' (every available device; default)")
    verify.add_argument("--dtype", choices=sorted(_DTYPES), default="all", help="default: all")
    verify.add_argument("--seed", type=int, default=0, help="random seed of weights and inputs (default: 0)")
    verify.add_argument("--quick", action="store_true", help="a representative subset (well under a minute)")
    return parser


def _verify(args: argparse.Namespace) -> int:
    from .verify import LAYER_CASES, QUICK_LAYER_CASES, available_devices, verify_layers

    if args.device == "all":
        devices = available_devices()
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as err:
            print(f"gridgraph verify: error: --device: {err}", file=sys.stderr)
            return 2
        if device.type == "cuda" and not torch.cuda.is_available():
            print("gridgraph verify: error: --device cuda requested but no CUDA device is available", file=sys.stderr)
            return 2
        devices = [device]
    cases = QUICK_LAYER_CASES if args.quick else LAYER_CASES
    print(f"gridgraph verify: {len(cases)} Conv2d configurations x {args.dtype} x {', '.join(map(str, devices))}"
          f" (seed {args.seed}, TF32 off)\n", flush=True)
    report = verify_layers(cases, _DTYPES[args.dtype], devices, seed=args.seed)
    print(report.table())
    print()
    print(report.summary())
    return 0 if report.passed else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify":
        return _verify(args)
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
