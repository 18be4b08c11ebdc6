"""The ``gridgraph`` command line: argument parsing and printing only; the work lives in the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any, Optional, Sequence, TextIO

import torch

from _gridgraph_cli import EXIT_CODES as _EXIT_CODES  # noqa: F401  (the parser lives outside the package)
from _gridgraph_cli import EXIT_ERROR, EXIT_MISMATCH, EXIT_PASS, parser as _parser, version_line

__all__ = ["main", "run", "EXIT_PASS", "EXIT_MISMATCH", "EXIT_ERROR"]

#: The reference networks ``verify --quick`` checks: depthwise, residual, dilated and transposed layers.
QUICK_MODELS = ("mobilenet", "resnet", "dilated", "unet")

_DTYPES = {"float32": [torch.float32], "float64": [torch.float64], "all": [torch.float32, torch.float64]}


class _UsageError(Exception):
    """A problem with the command line or the user's model: one line on stderr, exit code 2."""


def _version_line() -> str:
    """``gridgraph X (torch Y, torch_geometric Z, Python W)``: what a bug report needs."""
    return version_line()


def kernels_line() -> str:
    """One line: which loops run the lattice kernels here, and what it costs when they are not compiled."""
    from .nn import compiled

    info = compiled.describe()
    if info["compiled"]:
        return f"kernels: lattice gathers and GEMMs in torch; depthwise/grouped loops compiled (numba {info['numba']}, " \
               f"{info['threading']} threads)"
    return f"kernels: torch only -- compiled loops off: {info['reason']}; {compiled.COST}"


def _info() -> int:
    import platform

    from .structure import cache_info

    print(_version_line())
    print(f"platform: {platform.platform()}, {platform.machine()}, {torch.get_num_threads()} torch threads")
    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    print(f"devices: {', '.join(devices)}")
    print(kernels_line())
    print(f"oneDNN (the CPU GEMMs of float32 blocks): {'yes' if torch.backends.mkldnn.is_available() else 'no'}")
    cache = cache_info()
    print(f"structure cache: {cache['entries']} entries, {cache['bytes']} bytes of at most {cache['max_bytes']}")
    return EXIT_PASS


def _and(words: Any) -> str:
    """``'a'``, ``'a and b'``, ``'a, b and c'``."""
    words = [str(w) for w in words]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _dtype_words(dtypes: Sequence[torch.dtype]) -> str:
    return _and(str(d).replace("torch.", "") for d in dtypes)


def _device_words(devices: Sequence[Any]) -> str:
    return _and(devices)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise _UsageError(f"--input-shape: expected comma-separated integers such as 2,3,32,32 "
                          f"(got {text!r})") from None
    if any(v <= 0 for v in shape):
        raise _UsageError(f"--input-shape: every dimension must be positive, or nothing would be compared "
                          f"(got {text!r})")
    return shape


def _devices(name: str) -> list:
    from .verify import available_devices

    if name == "all":
        return available_devices()
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise _UsageError(f"--device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda requested but no CUDA device is available")
    return [device]


class _Run:
    """One ``gridgraph verify`` run: where its text goes, its progress lines and what the JSON report holds."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str]) -> None:
        self.args = args
        self.start = time.perf_counter()
        self.out: TextIO = sys.stderr if args.json == "-" else sys.stdout  # stdout carries the JSON then
        self.sections: dict[str, dict] = {}
        self.lines: list[tuple[str, bool, str]] = []  # (section, passed, its summary line)
        self.report: dict = {"gridgraph": _version_line(), "command": ["gridgraph", *argv], "seed": args.seed}

    def print(self, *text: str) -> None:
        print(*text, file=self.out, flush=True)

    def progress(self, text: str) -> None:
        if not self.args.no_progress:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {text}", file=sys.stderr, flush=True)

    def section(self, key: str, title: str, passed: bool, summary: str, data: dict) -> None:
        self.lines.append((title, passed, summary))
        self.sections[key] = data

    def finish(self, code: int, error: Optional[str] = None, write_json: bool = True) -> int:
        from .verify import _format_seconds

        seconds = time.perf_counter() - self.start
        if error is None:
            width = max(len(title) for title, _, _ in self.lines)
            self.print("\nSummary")
            for title, _, summary in self.lines:
                self.print(f"  {title:<{width}}  {summary}")
            failed = [title for title, passed, _ in self.lines if not passed]
            total = _format_seconds(seconds)
            self.print(f"FAIL in {_and(failed)} (exit code {code}); total {total}" if failed else
                       f"PASS: {_and(t for t, _, _ in self.lines)}; total {total}")
        if self.args.json and write_json:
            self.report.update(passed=code == EXIT_PASS, exit_code=code, seconds=seconds, error=error,
                               sections=self.sections)
            text = json.dumps(self.report, indent=1)
            if self.args.json == "-":
                print(text, flush=True)
            else:
                try:
                    with open(self.args.json, "w") as f:
                        f.write(text + "\n")
                except OSError as err:
                    print(f"gridgraph verify: error: --json: cannot write {self.args.json!r}: {err}",
                          file=sys.stderr)
                    return EXIT_ERROR
        return code


def _verify(args: argparse.Namespace, argv: Sequence[str]) -> int:
    run = _Run(args, argv)
    try:
        return _verify_run(args, run)
    except _UsageError as err:
        message = str(err)
        print(f"gridgraph verify: error: {message}", file=sys.stderr, flush=True)
        if args.debug and err.__cause__ is not None:
            traceback.print_exception(err.__cause__, file=sys.stderr)
        return run.finish(EXIT_ERROR, error=message, write_json=not message.startswith("--json"))


def _verify_run(args: argparse.Namespace, run: _Run) -> int:
    from .models import REFERENCE_MODELS
    from .verify import (ATTENTION_CASES, BEYOND_CASES, LAYER_CASES, QUICK_BEYOND_CASES, QUICK_LAYER_CASES, _count,
                         _format_seconds, check_model, load_model, models_summary, verify_attention, verify_beyond,
                         verify_layers)

    if args.threads < 1:
        raise _UsageError(f"--threads must be at least 1 (got {args.threads})")
    if args.json not in (None, "-") and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise _UsageError(f"--json: the folder of {args.json!r} does not exist")
    torch.set_num_threads(args.threads)
    devices = _devices(args.device)
    dtypes = _DTYPES[args.dtype]
    run_layers = args.only != "models" and not args.model
    run_models = args.only != "layers"
    if args.only == "layers" and (args.model or args.reference):
        raise _UsageError("--only layers cannot be combined with --model or --reference")
    if args.model and args.reference:
        raise _UsageError("--model and --reference cannot be combined: verify your models or reference networks")
    unknown = [n for n in args.reference if n not in REFERENCE_MODELS]
    if unknown:
        raise _UsageError(f"--reference: unknown network(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(REFERENCE_MODELS)}")
    user_models = []
    if args.model:
        if not args.input_shape:
            raise _UsageError("--model needs --input-shape (e.g. --input-shape 2,3,32,32)")
        shape = _parse_shape(args.input_shape)
        for spec in args.model:
            try:
                user_models.append((spec, load_model(spec)))
            except Exception as err:  # import errors, bad attribute, factory failures: all reported the same way
                raise _UsageError(f"--model {spec}: {type(err).__name__}: {err}") from err
    run.report.update(devices=[str(d) for d in devices], dtypes=[str(d).replace("torch.", "") for d in dtypes])
    where = f"{_dtype_words(dtypes)}, on {_device_words(devices)}"

    def layer_section(key: str, title: str, verify, cases: Sequence[Any], what: str) -> bool:
        run.print(f"{what}: {_count(len(cases), 'configuration')}, {where} (seed {args.seed}, TF32 off)")
        run.print(kernels_line() + "\n")
        report = verify(cases, dtypes, devices, seed=args.seed,
                        progress=lambda part: run.progress(
                            f"{title}, {_dtype_words([part.results[0].dtype])} on {part.results[0].device}: "
                            f"{'PASS' if part.passed else 'FAIL'}, {_count(len(part.results), 'check')} in "
                            f"{_format_seconds(part.seconds)}"))
        if args.verbose:
            run.print(report.table())
        else:  # one line per section; every configuration with --verbose
            run.print(f"  {report.summary()}")
            failing = [r for r in getattr(report, "results", []) if not r.passed]
            if failing:  # the failing configurations' rows
                try:
                    run.print(type(report)(results=failing).table())
                except TypeError:
                    run.print(report.table())
        run.section(key, title, report.passed, report.summary(), report.to_dict())
        return report.passed

    passed = True
    if run_layers:
        passed &= layer_section("layers", "layers", verify_layers, QUICK_LAYER_CASES if args.quick else LAYER_CASES,
                                "Layers: GridConv2d against torch.nn.Conv2d, both computation paths")
        run.print()
        passed &= layer_section("beyond", "beyond the grid", verify_beyond,
                                QUICK_BEYOND_CASES if args.quick else BEYOND_CASES,
                                "Beyond the grid: masked, sparse, point, transposed, 1-D and 3-D layers against torch")
        run.print()
        passed &= layer_section("attention", "attention", verify_attention,
                                ATTENTION_CASES[::2] if args.quick else ATTENTION_CASES,
                                "Attention: PixelAttention against torch.nn.MultiheadAttention (global and local)")
    if run_models:
        grads = not args.no_grads
        checked = "forward and gradients" if grads else "forward only"
        if run_layers:
            run.print()
        if user_models:
            jobs = [(spec, model, shape, None) for spec, model in user_models]
            run.print(f"Your models converted with gridgraph.convert, on input {shape}: {where}, {checked} "
                      f"(seed {args.seed}, TF32 off)")
        else:
            modes = ("train",) if args.quick else ("train", "eval")
            names = args.reference or (list(QUICK_MODELS) if args.quick else list(REFERENCE_MODELS))
            jobs = [(name, REFERENCE_MODELS[name], REFERENCE_MODELS[name].input_shape, modes) for name in names]
            model_where = where if not (args.quick and len(dtypes) > 1) else f"float64, on {_device_words(devices)}"
            run.print(f"Models: {_count(len(names), 'reference network')} converted with gridgraph.convert, {model_where}, "
                      f"{' and '.join(modes)} mode, {checked} (seed {args.seed}, TF32 off)")
        reports = []
        model_dtypes = dtypes
        if args.quick and not user_models and len(dtypes) > 1:  # quick: the networks in float64 only
            model_dtypes = [torch.float64]
        for device in devices:
            for dtype in model_dtypes:
                for name, source, shape, modes in jobs:
                    if modes is None:  # the user's model, in the mode it comes in
                        try:
                            found = [check_model(source, shape, name=name, dtype=dtype, device=device,
                                                 seed=args.seed, grads=grads)]
                        except Exception as err:  # whatever their forward raises: not a mismatch
                            raise _UsageError(f"--model {name} on input {shape}: {type(err).__name__}: "
                                              f"{err}") from err
                    else:
                        model = source.build(seed=args.seed)
                        found = [check_model(model, shape, name=name, dtype=dtype, device=device, seed=args.seed,
                                             grads=grads, training=mode == "train") for mode in modes]
                    for report in found:
                        if args.verbose or not report.passed:
                            run.print(f"\n### {report.name} [{str(report.dtype).replace('torch.', '')}, "
                                      f"{report.device}]\n")
                            run.print(str(report))
                        else:
                            run.print(f"  {report.summary()}")
                        run.progress(f"{report.name} [{_dtype_words([report.dtype])}, {report.device}]: "
                                     f"{'PASS' if report.passed else 'FAIL'} in {_format_seconds(report.seconds)}")
                        reports.append(report)
        summary = models_summary(reports)
        models_passed = all(r.passed for r in reports)
        run.section("models", "models", models_passed, summary,
                    {"passed": models_passed, "seconds": sum(r.seconds for r in reports), "summary": summary,
                     "reports": [r.to_dict() for r in reports]})
        passed &= models_passed
    return run.finish(EXIT_PASS if passed else EXIT_MISMATCH)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(_parser().parse_args(argv), argv)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run parsed arguments (the parser: ``_gridgraph_cli.parser``)."""
    if args.command == "verify":
        return _verify(args, argv)
    if args.command == "info":
        return _info()
    return EXIT_ERROR  # pragma: no cover - argparse requires a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
