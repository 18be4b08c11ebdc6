"""The ``gridgraph`` command line: argument parsing only; the work lives in the library."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

__all__ = ["main"]

_DTYPES = {"float32": [torch.float32], "float64": [torch.float64], "all": [torch.float32, torch.float64]}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridgraph", description="A CNN is a GNN on a pixel graph, exactly.")
    parser.add_argument("--version", action="version", version=_version_line(),
                        help="print gridgraph's version (and torch's, PyG's, Python's) and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser(
        "verify", help="check every graph layer against torch.nn.Conv2d, and converted networks against their originals",
        description="Layers: every graph layer against torch.nn.Conv2d over a built-in table of configurations. "
                    "Models: the reference networks (or your own, --model) converted with gridgraph.convert "
                    "against the originals, layer by layer, forward and gradients. Exits non-zero on any mismatch.")
    verify.add_argument("--device", default="all",
                        help="'cpu', 'cuda', 'cuda:N' or 'all' (every available device; default)")
    verify.add_argument("--dtype", choices=sorted(_DTYPES), default="all", help="default: all")
    verify.add_argument("--seed", type=int, default=0, help="random seed of weights and inputs (default: 0)")
    verify.add_argument("--quick", action="store_true",
                        help="a representative subset of layers, and the models in training mode only "
                             "(well under a minute)")
    verify.add_argument("--only", choices=["layers", "models"],
                        help="run only the layer table or only the models (default: both; --model implies models)")
    verify.add_argument("--model", action="append", metavar="MODULE:ATTRIBUTE", default=[],
                        help="verify your own model: an nn.Module or a zero-argument factory, given as "
                             "'package.module:name' or 'path/to/file.py:name' (repeatable; needs --input-shape)")
    verify.add_argument("--input-shape", metavar="B,C,H,W", help="input shape for --model, e.g. 2,3,32,32")
    verify.add_argument("--reference", action="append", metavar="NAME", default=[],
                        help="verify only these reference networks (repeatable; default: all of them)")
    verify.add_argument("--no-grads", action="store_true", help="models: compare outputs only, not gradients")
    verify.add_argument("--threads", type=int, default=1, metavar="N",
                        help="CPU threads for torch (default: 1; the checks use small tensors, for which "
                             "more threads mostly add contention, e.g. 7x slower on a busy 2-core machine)")
    return parser


def _version_line() -> str:
    """``gridgraph X (torch Y, torch_geometric Z, Python W)``: what a bug report needs."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from ._version import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"gridgraph {__version__} (torch {torch.__version__}, torch_geometric {installed('torch_geometric')}, "
            f"Python {platform.python_version()})")


def _error(message: str) -> int:
    print(f"gridgraph verify: error: {message}", file=sys.stderr)
    return 2


def _verify(args: argparse.Namespace) -> int:
    from .models import REFERENCE_MODELS
    from .verify import (BEYOND_CASES, LAYER_CASES, QUICK_BEYOND_CASES, QUICK_LAYER_CASES, available_devices,
                         check_model, load_model, models_summary, verify_beyond, verify_layers,
                         verify_reference_models)

    start = time.perf_counter()
    if args.threads < 1:
        return _error(f"--threads must be at least 1 (got {args.threads})")
    torch.set_num_threads(args.threads)
    if args.device == "all":
        devices = available_devices()
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as err:
            return _error(f"--device: {err}")
        if device.type == "cuda" and not torch.cuda.is_available():
            return _error("--device cuda requested but no CUDA device is available")
        devices = [device]
    dtypes = _DTYPES[args.dtype]
    run_layers = args.only != "models" and not args.model
    run_models = args.only != "layers"
    if args.only == "layers" and (args.model or args.reference):
        return _error("--only layers cannot be combined with --model or --reference")
    unknown = [n for n in args.reference if n not in REFERENCE_MODELS]
    if unknown:
        return _error(f"--reference: unknown network(s) {', '.join(unknown)}; choose from {', '.join(REFERENCE_MODELS)}")
    user_models = []
    if args.model:
        if not args.input_shape:
            return _error("--model needs --input-shape (e.g. --input-shape 2,3,32,32)")
        try:
            shape = tuple(int(v) for v in args.input_shape.replace("x", ",").split(","))
        except ValueError:
            return _error(f"--input-shape: expected comma-separated integers such as 2,3,32,32 (got {args.input_shape!r})")
        for spec in args.model:
            try:
                user_models.append((spec, load_model(spec), shape))
            except Exception as err:  # import errors, bad attribute, factory failures: all reported the same way
                return _error(f"--model {spec}: {type(err).__name__}: {err}")

    summaries: list[str] = []
    passed = True
    if run_layers:
        cases = QUICK_LAYER_CASES if args.quick else LAYER_CASES
        print(f"gridgraph verify: {len(cases)} Conv2d configurations x {args.dtype} x "
              f"{', '.join(map(str, devices))} (seed {args.seed}, TF32 off)\n", flush=True)
        report = verify_layers(cases, dtypes, devices, seed=args.seed)
        print(report.table())
        print()
        print(report.summary(), flush=True)
        summaries.append("layers: " + report.summary().split(": ", 1)[1])
        passed &= report.passed
        cases = QUICK_BEYOND_CASES if args.quick else BEYOND_CASES
        print(f"\nBeyond the grid: {len(cases)} masked, sparse, transposed, 1-D and 3-D configurations\n", flush=True)
        beyond = verify_beyond(cases, dtypes, devices, seed=args.seed)
        print(beyond.table())
        print()
        print(beyond.summary(), flush=True)
        summaries.append("beyond the grid: " + beyond.summary().split(": ", 1)[1])
        passed &= beyond.passed
    if run_models:
        grads = not args.no_grads
        if user_models:
            reports = []
            for spec, model, shape in user_models:
                for device in devices:
                    for dtype in dtypes:
                        try:
                            reports.append(check_model(model, shape, name=spec, dtype=dtype, device=device,
                                                       seed=args.seed, grads=grads))
                        except (ValueError, TypeError, RuntimeError) as err:
                            return _error(f"--model {spec} on input {shape}: {type(err).__name__}: {err}")
                        _print_model(reports[-1])
        else:
            names = args.reference or None
            modes = ("train",) if args.quick else ("train", "eval")
            print(f"\ngridgraph verify: {len(args.reference or REFERENCE_MODELS)} reference networks converted with "
                  f"gridgraph.convert x {args.dtype} x {', '.join(map(str, devices))} x {'/'.join(modes)} mode "
                  f"({'forward and gradients' if grads else 'forward'}, seed {args.seed}, TF32 off)", flush=True)
            reports = []
            for device in devices:
                for dtype in dtypes:
                    for name in names or REFERENCE_MODELS:
                        for report in verify_reference_models([name], [dtype], [device], seed=args.seed,
                                                              grads=grads, modes=modes):
                            _print_model(report)
                            reports.append(report)
        summary = models_summary(reports)
        print()
        print(summary)
        summaries.append("models: " + summary.split(": ", 1)[1])
        passed &= all(r.passed for r in reports)
    if len(summaries) > 1:
        print()
        print(f"{'PASS' if passed else 'FAIL'}: {' | '.join(summaries)} | total {time.perf_counter() - start:.1f}s")
    return 0 if passed else 1


def _print_model(report) -> None:
    print(f"\n### {report.name} [{str(report.dtype).replace('torch.', '')}, {report.device}]\n")
    print(report, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify":
        return _verify(args)
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
