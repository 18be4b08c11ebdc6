"""Whole networks: a converted twin against the original network, the unit users run.

Run from the repository root (timm is needed for the timm cases: ``pip install -e ".[bench]"``; gridgraph
itself is installed plain, with nothing beyond its declared dependencies)::

    python benchmarks/networks.py             # every case, 3 passes, CPU, 2 threads (~15 minutes)
    python benchmarks/networks.py --quick     # tiny inputs: checks every case's outputs, times nothing
    python benchmarks/networks.py --cases resnet18-b1,unet --runs 1
    python benchmarks/networks.py --device cuda --runs 1 --rounds 3   # on a GPU, against cuDNN (TF32 off)

Each case builds the original (timm's definition with random weights, or this repository's U-Net), converts
it with ``gridgraph.convert`` and **checks the twin's output against the original's before anything is
timed** (on float64 copies, to 1e-9 of the output's scale; input and weight gradients too for the
forward+backward cases). Then, in one process, it times

* the original in NCHW and in channels-last (``model.to(memory_format=torch.channels_last)`` with a
  channels-last input): the reference of every ratio is the faster of the two;
* the twin in both layouts too: its best is the channels-last one, where activations stay in node layout
  from layer to layer (a channels-last tensor *is* ``[nodes, channels]``).

Forward cases run in eval mode under ``torch.no_grad()``; forward+backward cases in training mode, as a training
step does (BatchNorm updating its statistics, the gradients of every parameter; the image needs none, as
in training; the output check compares the input gradient too). Timing: the four variants interleaved,
``--rounds`` rounds of blocks of calls of at least 0.2 s each (warm-up excluded), median of the per-call block
times; ``--runs`` passes over all cases, and the summary gives the median of the per-case medians and their
range. Peak memory: the peak of the bytes torch's CPU allocator holds during one call above what it held
before (``torch.profiler`` memory events, as ``benchmarks/run.py``), plus, for the twin, the workspace its
kernels keep between calls (:func:`gridgraph.nn.lattice.workspace_bytes`). glibc recycles freed buffers up
to 32 MiB for both sides alike (so that neither pays page faults on every call).

Every converted convolution call is counted by path (:func:`gridgraph.nn.functional.kernel_trace`): ``image``
(the kernels called directly) or ``image-op`` (the registered operator, e.g. for a dtype the eager path does
not take); the table prints the counts, so that no fallback goes unseen. The per-call overhead of a converted
convolution is the ``tiny-conv`` case: ``nn.Conv2d(8, 8, 3, padding=1)`` on a 1x8x4x4 input.

Outputs: a markdown table on stdout, ``networks.json`` and ``networks.png`` in ``--out-dir``
(default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import _malloc_for_timing, peak_extra_bytes  # noqa: E402  (the same memory measure as the layers')

import gridgraph  # noqa: E402
from gridgraph.nn import compiled, lattice  # noqa: E402
from gridgraph.nn.functional import kernel_trace  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a timm model name, "unet" (gridgraph.models.UNet, 32 channels, depth 4) or "tiny-conv"
    batch: int
    size: int
    train: bool = False  # forward+backward in training mode (else forward, eval, no_grad)
    target: Optional[float] = None  # the time-ratio target for this case, if any


CASES = (
    Case("resnet18-b1", "resnet18", 1, 224),
    Case("resnet18-b8", "resnet18", 8, 224),
    Case("mobilenetv2-b1", "mobilenetv2_100", 1, 224),
    Case("mobilenetv2-b8", "mobilenetv2_100", 8, 224),
    Case("efficientnet_b0-b1", "efficientnet_b0", 1, 224),
    Case("convnext_atto-b1", "convnext_atto", 1, 224),
    Case("regnety_002-b8", "regnety_002", 8, 224),
    Case("resnet18-b1-64px", "resnet18", 1, 64, target=2.0),
    Case("resnet18-b8-train", "resnet18", 8, 224, train=True, target=1.5),
    Case("unet-b1", "unet", 1, 256),
    Case("unet-b1-train", "unet", 1, 256, train=True),
    Case("tiny-conv", "tiny-conv", 1, 4, target=5.0),
    Case("tiny-conv-train", "tiny-conv", 1, 4, train=True, target=3.0),
)
#: The seven forward cases at 224x224 whose geometric mean the target (1.3x) is about.
FORWARD_224 = ("resnet18-b1", "resnet18-b8", "mobilenetv2-b1", "mobilenetv2-b8", "efficientnet_b0-b1",
               "convnext_atto-b1", "regnety_002-b8")
TARGET_GEOMEAN, TARGET_WORST = 1.3, 2.0


def build(case: Case, quick: bool) -> nn.Module:
    if case.model == "tiny-conv":
        return nn.Conv2d(8, 8, 3, padding=1)
    if case.model == "unet":
        from gridgraph.models import UNet

        return UNet(3, 2, width=8 if quick else 32, depth=2 if quick else 4)
    try:
        import timm
    except ImportError:
        return None
    return timm.create_model(case.model, pretrained=False)


def example(case: Case, quick: bool) -> torch.Tensor:
    channels = 8 if case.model == "tiny-conv" else 3
    size = case.size if case.model == "tiny-conv" or not quick else 32
    batch = case.batch if not quick else min(case.batch, 2)
    return torch.randn(batch, channels, size, size)


def _to_format(model: nn.Module, x: torch.Tensor, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(memory_format=fmt), x.contiguous(memory_format=fmt)


def _step(model: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], object]:
    if not train:
        def forward():
            with torch.no_grad():
                return model(x)
        return forward
    def forward_backward():  # a training step's work: the parameters' gradients (the image needs none)
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.float().square().mean().backward()
        return out
    return forward_backward


def check(case: Case, original: nn.Module, twin: nn.Module, x: torch.Tensor) -> dict:
    """Outputs (and gradients) of the twin against the original before any timing, in float64 on copies (in
    float32 a training-mode BatchNorm over a 2x1x1 feature map amplifies the order of float32 sums into
    1e-3); the paths the converted convolutions took."""
    import copy

    original, twin = copy.deepcopy(original).double(), copy.deepcopy(twin).double()
    x = x.double()
    xa, xb = x.clone().requires_grad_(case.train), x.clone().requires_grad_(case.train)
    with torch.set_grad_enabled(case.train):
        ref = original(xa)
        with kernel_trace() as trace:
            out = twin(xb)
    scale = max(1.0, float(ref.abs().max()))
    err = float((out - ref).abs().max()) / scale
    result = {"output_error": err, "paths": {p: trace.count(p) for p in sorted(set(trace))}}
    if case.train:
        grad = torch.randn_like(ref)
        ref.backward(grad)
        out.backward(grad)
        gscale = max(1.0, float(xa.grad.abs().max()))
        result["input_grad_error"] = float((xb.grad - xa.grad).abs().max()) / gscale
        werr = 0.0
        for (name, p), q in zip(original.named_parameters(), twin.parameters()):
            if p.grad is not None:
                werr = max(werr, float((q.grad - p.grad).abs().max()) / max(1.0, float(p.grad.abs().max())))
        result["weight_grad_error"] = werr
        original.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
    tol = 1e-9
    errors = [v for k, v in result.items() if k.endswith("error")]
    result["passed"] = max(errors) <= tol
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(variants: dict[str, Callable[[], object]], rounds: int, min_block: float,
                  device: torch.device) -> dict[str, float]:
    """Median per-call seconds of each variant, interleaved over ``rounds`` rounds of blocks >= ``min_block``."""
    calls = {}
    for name, fn in variants.items():  # warm-up, and a block size per variant
        for _ in range(3):
            fn()
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        once = max(time.perf_counter() - t, 1e-6)
        calls[name] = max(1, int(math.ceil(min_block / once)))
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            _sync(device)
            t = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t) / calls[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def run_case(case: Case, args) -> Optional[dict]:
    torch.manual_seed(0)
    original = build(case, args.quick)
    if original is None:
        return {"name": case.name, "skipped": "timm is not installed (pip install -e \".[bench]\")"}
    device = torch.device(args.device)
    original = original.train(case.train).to(device)
    twin = gridgraph.convert(original).train(case.train)
    x = example(case, args.quick).to(device)
    checked = check(case, original, twin, x)
    result = {"name": case.name, "model": case.model, "batch": x.size(0), "size": x.size(-1), "train": case.train,
              **checked}
    if not checked["passed"] or args.quick:
        return result
    variants, memory = {}, {}
    for side, model in (("original", original), ("twin", twin)):
        for cl in (False, True):
            m, xi = _to_format(model, x, cl)
            variants[f"{side}-{'cl' if cl else 'nchw'}"] = _step(m, xi, case.train)
    times = time_variants(variants, args.rounds, args.min_block, device)
    best = {side: min(("nchw", "cl"), key=lambda f: times[f"{side}-{f}"]) for side in ("original", "twin")}
    for side, model in (("original", original), ("twin", twin)):
        m, xi = _to_format(model, x, best[side] == "cl")
        step = _step(m, xi, case.train)
        lattice.release_workspace()  # count the workspace this network's layers need, not earlier cases'
        step()
        memory[side] = peak_extra_bytes(step, device) + (lattice.workspace_bytes() if side == "twin" else 0)
    result.update(
        times_ms={k: v * 1e3 for k, v in times.items()}, best_layout=best,
        time_ratio=times[f"twin-{best['twin']}"] / times[f"original-{best['original']}"],
        memory_bytes=memory, memory_ratio=memory["twin"] / max(1, memory["original"]))
    return result


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarise(passes: list[list[dict]]) -> dict:
    """Per case: the median (and range) over the passes of the time and memory ratios; the targets."""
    cases = {}
    for results in passes:
        for r in results:
            if "time_ratio" in r:
                c = cases.setdefault(r["name"], {"time": [], "memory": [], "train": r["train"]})
                c["time"].append(r["time_ratio"])
                c["memory"].append(r["memory_ratio"])
    table = {}
    for name, c in cases.items():
        table[name] = {"time_median": statistics.median(c["time"]), "time_min": min(c["time"]),
                       "time_max": max(c["time"]), "memory_median": statistics.median(c["memory"]),
                       "train": c["train"]}
    fwd = [table[n]["time_median"] for n in FORWARD_224 if n in table]
    summary = {"cases": table, "forward_224_geomean": _geomean(fwd),
               "forward_224_worst": max(fwd) if fwd else float("nan")}
    return summary


def print_table(passes: list[list[dict]], summary: dict, out) -> None:
    last = {r["name"]: r for r in passes[-1]}
    print("| case | input | mode | original best (ms) | twin best (ms) | time ratio (median, range) | peak memory "
          "ratio | paths | max error |", file=out)
    print("|---|---|---|---:|---:|---|---:|---|---:|", file=out)
    for case in CASES:
        r = last.get(case.name)
        if r is None:
            continue
        if "skipped" in r:
            print(f"| {case.name} | | | | | n/a: {r['skipped']} | | | |", file=out)
            continue
        errors = max(v for k, v in r.items() if k.endswith("error"))
        paths = ", ".join(f"{k} {v}" for k, v in r["paths"].items())
        mode = "fwd+bwd, train" if r["train"] else "forward, eval"
        shape = f"{r['batch']}x{'8' if r['model'] == 'tiny-conv' else '3'}x{r['size']}x{r['size']}"
        s = summary["cases"].get(case.name)
        if s is None:
            why = "n/a: output check failed" if not r["passed"] else "n/a: --quick times nothing"
            print(f"| {case.name} | {shape} | {mode} | | | {why} | | {paths} | {errors:.1e} |", file=out)
            continue
        t = r["times_ms"]
        o, w = t[f"original-{r['best_layout']['original']}"], t[f"twin-{r['best_layout']['twin']}"]
        target = f" (target {case.target})" if case.target else ""
        print(f"| {case.name} | {shape} | {mode} | {o:.2f} ({r['best_layout']['original']}) | {w:.2f} "
              f"({r['best_layout']['twin']}) | **{s['time_median']:.2f}x** ({s['time_min']:.2f}-{s['time_max']:.2f})"
              f"{target} | {s['memory_median']:.2f}x | {paths} | {errors:.1e} |", file=out)
    fwd = [n for n in FORWARD_224 if n in summary["cases"]]
    if len(fwd) < len(FORWARD_224):
        print(f"\nForward at 224x224: n/a ({len(fwd)} of the seven cases timed).", file=out)
        return
    print(f"\nForward at 224x224, geometric mean of the seven cases: **{summary['forward_224_geomean']:.2f}x** "
          f"(target {TARGET_GEOMEAN}x); worst {summary['forward_224_worst']:.2f}x (target {TARGET_WORST}x).", file=out)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.name for c in CASES if c.name in summary["cases"]]
    med = [summary["cases"][n]["time_median"] for n in names]
    low = [m - summary["cases"][n]["time_min"] for n, m in zip(names, med)]
    high = [summary["cases"][n]["time_max"] - m for n, m in zip(names, med)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = ["tab:orange" if summary["cases"][n]["train"] else "tab:blue" for n in names]
    ax.bar(range(len(names)), med, yerr=[low, high], color=colors, capsize=3)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(TARGET_GEOMEAN, color="tab:green", ls="--", lw=0.8, label=f"geomean target {TARGET_GEOMEAN}x")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.set_ylabel("twin / original time (best layouts)")
    ax.set_title(f"converted network / original, median and range over passes "
                 f"(forward geomean at 224: {summary['forward_224_geomean']:.2f}x); orange: fwd+bwd")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="cases: " + ", ".join(c.name for c in CASES))
    parser.add_argument("--quick", action="store_true", help="tiny inputs: check every case, time nothing")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--runs", type=int, default=3, help="passes over the cases (default: 3)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per case (default: 7)")
    parser.add_argument("--min-block", type=float, default=0.2, help="seconds per timed block (default: 0.2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (TF32 off; default: cpu)")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    cases = CASES
    if args.cases:
        wanted = args.cases.split(",")
        unknown = [w for w in wanted if w not in {c.name for c in CASES}]
        if unknown:
            parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(c.name for c in CASES)}")
        cases = tuple(c for c in CASES if c.name in wanted)
    malloc = _malloc_for_timing()
    print(f"# gridgraph {gridgraph.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads; compiled loops: {compiled.describe()}", file=sys.stderr)
    passes = []
    for run in range(1 if args.quick else args.runs):
        results = []
        for case in cases:
            t = time.perf_counter()
            results.append(run_case(case, args))
            r = results[-1]
            note = r.get("skipped") or (f"{r['time_ratio']:.2f}x" if "time_ratio" in r else
                                        f"checked ({'pass' if r.get('passed') else 'FAIL'})")
            print(f"[pass {run + 1}] {case.name}: {note} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        passes.append(results)
    summary = summarise(passes)
    print_table(passes, summary, sys.stdout)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"gridgraph": gridgraph.__version__, "torch": torch.__version__, "threads": args.threads,
            "device": args.device,
            "machine": platform.machine(), "processor": platform.processor(), "compiled": compiled.describe(),
            "malloc_recycling": malloc, "quick": args.quick}
    (out / "networks.json").write_text(json.dumps({"info": info, "passes": passes, "summary": summary}, indent=1))
    if not args.quick and summary["cases"]:
        plot(summary, out / "networks.png")
    failed = [r["name"] for r in passes[-1] if r.get("passed") is False]
    if failed:
        print(f"output check FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
