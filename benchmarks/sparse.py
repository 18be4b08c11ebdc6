"""Sparse pixel domains against the dense convolution: a 1024x1024 image at 1%, 10% and 50% occupancy.

For each occupancy a random mask selects the active pixels; the graph layer runs on the masked pixel
graph (only active pixels are nodes) and ``F.conv2d`` on the whole image with inactive pixels zeroed,
the reference a user would otherwise pick. Before anything is timed, the graph layer's output is
checked against ``F.conv2d`` at the active output pixels. Reported per occupancy (the best of the
block times of ``torch.utils.benchmark.Timer.blocked_autorange``, which warms up and picks a block size
itself, medians in the JSON; the thread count fixed):

* graph construction (``image_to_graph(..., mask=...)``, cold: nothing of it is cached; includes the
  ``O(H*W)`` read of the mask),
* the graph layer, forward and forward + backward (node features in, node features out),
* ``F.conv2d`` on the dense image, forward and forward + backward,
* the bytes of the node features in and out plus the graph's table, against the dense image in and out.

**The spconv peer.** spconv's ``SubMConv2d`` (its CPU build, ``algo=ConvAlgo.Native``), the library
point-cloud and sparse-image users pick, runs the same submanifold 3x3 convolution on the same points
(optional: ``pip install spconv``, or the ``bench`` extra; skipped with a message when absent). Its output
is checked against ours and against ``F.conv2d`` on the masked image before anything is timed. Timed,
interleaved round by round (medians of ``Timer`` blocks, ratio = gridgraph / spconv, below 1: gridgraph
is faster):

* build + forward from points (``coords [N, 2]``, ``features [N, C]``): ``sparse_to_graph`` + the layer,
  against ``SparseConvTensor`` + indice generation + forward;
* build + forward from a masked image (``image``, ``mask``): ``image_to_graph(..., mask=)`` + the layer,
  against ``mask.nonzero()`` + the feature gather + the same spconv calls;
* the forward with the structure built (spconv reuses its indices through ``indice_key``);
* forward + backward where spconv supports it (its CPU build raises in the backward: it asks for a CUDA
  stream; the error is recorded).

Usage::

    python benchmarks/sparse.py                 # the full run (1024x1024), markdown table + JSON
    python benchmarks/sparse.py --threads 1 --only-spconv   # just the spconv peer (1 thread, as recorded)
    python benchmarks/sparse.py --quick         # a small image: checks correctness, times nothing
    python benchmarks/sparse.py --threads 1 --json benchmarks/recorded/sparse-1thread.json
    python benchmarks/sparse.py --show [--json ...]   # print the tables of a saved run

On a machine whose cores are shared with other work, a two-thread run of many small parallel
operations (the sparse path: a few per tap) can wait milliseconds at every OpenMP barrier, while the
dense convolution's few large operations barely notice; a one-thread run measures both without that.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch_geometric
from torch.nn import functional as F
from torch.utils import benchmark

import gridgraph
from gridgraph import GridConv2d, image_to_graph, sparse_to_graph

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import _malloc_for_timing  # noqa: E402  (the dense suite's allocator setting, for every method alike)


def timed(fn, min_run_time: float) -> dict:
    """Best and median per-call seconds of ``fn()``: ``torch.utils.benchmark.Timer.blocked_autorange``
    (warm-up and block size chosen by the timer) for at least ``min_run_time`` seconds, on the threads
    set with ``torch.set_num_threads``.

    The table reports the best block: on a shared machine other processes only ever add time, so the
    least disturbed block is the closest to the operation's own cost (the median is kept in the JSON).
    """
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return {"best": min(measurement.times), "median": measurement.median, "blocks": len(measurement.times)}


def run(size: int, channels: int, occupancies: list[float], kernel_size: int, stride: int, min_run_time: float,
        seed: int, timing: bool = True) -> dict:
    torch.manual_seed(seed)
    padding = kernel_size // 2
    conv = torch.nn.Conv2d(channels, channels, kernel_size, stride=stride, padding=padding)
    layer = GridConv2d.from_conv2d(conv)
    weight, bias = conv.weight.detach(), conv.bias.detach()
    image = torch.randn(1, channels, size, size)
    results = {"shape": f"1x{channels}x{size}x{size}", "conv": f"{channels}->{channels} k{kernel_size} s{stride} "
               f"p{padding}", "min_run_time_s": min_run_time, "timed": timing, "rows": []}

    # the dense reference, timed once (its cost does not depend on the occupancy)
    dense_in = image.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)

    def dense_fwd():
        with torch.no_grad():
            return F.conv2d(dense_in, w, b, stride=stride, padding=padding)

    def dense_fwd_bwd():
        out = F.conv2d(dense_in, w, b, stride=stride, padding=padding)
        out.backward(torch.ones_like(out))

    if timing:
        t_dense_f = timed(dense_fwd, min_run_time)
        t_dense_fb = timed(dense_fwd_bwd, min_run_time)
    dense_out = dense_fwd()
    dense_bytes = (image.numel() + dense_out.numel()) * image.element_size()

    for occupancy in occupancies:
        gen = torch.Generator().manual_seed(seed + int(occupancy * 1000))
        mask = torch.rand(1, size, size, generator=gen) < occupancy
        start = time.perf_counter()
        g = image_to_graph(image, layer, mask=mask)
        t_build = time.perf_counter() - start

        # correctness first: the graph layer equals F.conv2d on the zeroed image at the active outputs
        with torch.no_grad():
            out = layer(g.x, g.edge_index, g.edge_type)
            ref = F.conv2d(image * mask[:, None], weight, bias, stride=stride, padding=padding)
            want = ref[0, :, g.out_pos[:, 0], g.out_pos[:, 1]].t()
            err = (out - want).abs().max().item() / max(1.0, want.abs().max().item()) if want.numel() else 0.0
        if err > 1e-4:
            raise AssertionError(f"occupancy {occupancy}: graph layer differs from F.conv2d by {err:.2e}")
        if not timing:
            results["rows"].append({"occupancy": occupancy, "active_in": g.num_src, "active_out": g.num_dst,
                                    "max_error": err})
            continue

        x = g.x.detach().clone().requires_grad_(True)

        def graph_fwd():
            with torch.no_grad():
                return layer(x, g.edge_index, g.edge_type)

        def graph_fwd_bwd():
            layer.zero_grad(set_to_none=True)
            o = layer(x, g.edge_index, g.edge_type)
            o.backward(torch.ones_like(o))

        t_graph_f = timed(graph_fwd, min_run_time)
        t_graph_fb = timed(graph_fwd_bwd, min_run_time)
        graph_med = (t_graph_f["median"], t_graph_fb["median"])
        t_graph_f, t_graph_fb = t_graph_f["best"], t_graph_fb["best"]
        table_bytes = g.table.index.numel() * g.table.index.element_size()
        graph_bytes = (g.x.numel() + out.numel()) * out.element_size() + table_bytes
        results["rows"].append({
            "occupancy": occupancy, "active_in": g.num_src, "active_out": g.num_dst, "max_error": err,
            "build_s": t_build, "graph_forward_s": t_graph_f, "graph_forward_backward_s": t_graph_fb,
            "dense_forward_s": t_dense_f["best"], "dense_forward_backward_s": t_dense_fb["best"],
            "medians_s": {"graph_forward": graph_med[0], "graph_forward_backward": graph_med[1],
                          "dense_forward": t_dense_f["median"], "dense_forward_backward": t_dense_fb["median"]},
            "graph_bytes": graph_bytes, "dense_bytes": dense_bytes, "table_bytes": table_bytes,
        })
    return results


# ----------------------------------------------------------------------------------- the spconv peer
def load_spconv():
    """``(spconv.pytorch, ConvAlgo, version)``, or ``(None, None, reason)`` when spconv is not installed."""
    try:
        import spconv
        import spconv.pytorch as spconv_torch
        from spconv.core import ConvAlgo
    except Exception as error:  # ImportError, or a broken build
        return None, None, f"{type(error).__name__}: {error}"
    return spconv_torch, ConvAlgo, getattr(spconv, "__version__", "?")


def interleaved(fns: dict, rounds: int, min_run_time: float) -> dict:
    """Per-call seconds of each function: ``rounds`` rounds, every function timed in each (A/B/A/B), with
    ``Timer.blocked_autorange`` for ``min_run_time / rounds`` seconds; median and best over all blocks."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            samples[name].extend(timer.blocked_autorange(min_run_time=min_run_time / rounds).times)
    return {name: {"median": statistics.median(v), "best": min(v), "blocks": len(v)} for name, v in samples.items()}


def run_spconv(size: int, channels: int, occupancies: list[float], min_run_time: float, rounds: int, seed: int,
               timing: bool = True) -> dict:
    """gridgraph against spconv's ``SubMConv2d`` (CPU, ``ConvAlgo.Native``) on masked ``size x size`` images."""
    spconv, ConvAlgo, version = load_spconv()
    results = {"peer": "spconv SubMConv2d (algo=ConvAlgo.Native)", "shape": f"1x{channels}x{size}x{size}",
               "conv": f"{channels}->{channels} k3 s1 p1 (submanifold)", "timed": timing, "rows": []}
    if spconv is None:
        results["skipped"] = f"spconv is not installed ({version}); pip install spconv (or the 'bench' extra)"
        return results
    results["spconv"] = version
    results["rounds"], results["min_run_time_s"] = rounds, min_run_time
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    layer = GridConv2d.from_conv2d(conv)
    sub = spconv.SubMConv2d(channels, channels, 3, padding=1, bias=True, algo=ConvAlgo.Native, indice_key="subm")
    with torch.no_grad():  # spconv 2.x keeps the weight as [C_out, kH, kW, C_in]
        sub.weight.copy_(conv.weight.permute(0, 2, 3, 1))
        sub.bias.copy_(conv.bias)
    image = torch.randn(1, channels, size, size)
    for occupancy in occupancies:
        gen = torch.Generator().manual_seed(seed + int(occupancy * 1000))
        mask = torch.rand(1, size, size, generator=gen) < occupancy
        coords = mask[0].nonzero()  # [N, 2] row-major: the points as a user holds them
        features = image[0, :, coords[:, 0], coords[:, 1]].t().contiguous()
        indices = torch.cat([coords.new_zeros(coords.size(0), 1), coords], 1).int()  # spconv: (batch, y, x) int32

        def ours_points():
            g = sparse_to_graph(coords, features, (size, size), layer)
            with torch.no_grad():
                return layer(g.x, g.edge_index, g.edge_type)

        def spconv_points():
            with torch.no_grad():
                return sub(spconv.SparseConvTensor(features, indices, [size, size], 1)).features

        def ours_mask():
            g = image_to_graph(image, layer, mask=mask)
            with torch.no_grad():
                return layer(g.x, g.edge_index, g.edge_type)

        def spconv_mask():
            pts = mask[0].nonzero()
            feats = image[0, :, pts[:, 0], pts[:, 1]].t().contiguous()
            idx = torch.cat([pts.new_zeros(pts.size(0), 1), pts], 1).int()
            with torch.no_grad():
                return sub(spconv.SparseConvTensor(feats, idx, [size, size], 1)).features

        # correctness first: both equal F.conv2d on the masked image at the active pixels, and each other
        with torch.no_grad():
            ref = F.conv2d(image * mask[:, None], conv.weight, conv.bias, padding=1)[0, :, coords[:, 0], coords[:, 1]].t()
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        errors = {name: float((fn() - ref).abs().max()) / scale if ref.numel() else 0.0
                  for name, fn in (("gridgraph", ours_points), ("gridgraph-mask", ours_mask),
                                   ("spconv", spconv_points), ("spconv-mask", spconv_mask))}
        if max(errors.values()) > 1e-4:
            raise AssertionError(f"occupancy {occupancy}: outputs differ from F.conv2d: {errors}")
        row = {"occupancy": occupancy, "points": coords.size(0), "max_error": errors}
        results["rows"].append(row)
        if not timing:
            continue
        g = sparse_to_graph(coords, features, (size, size), layer)
        built = spconv.SparseConvTensor(features, indices, [size, size], 1)
        with torch.no_grad():
            built.indice_dict = sub(built).indice_dict  # the indices, generated once and reused by key

        def ours_forward():
            with torch.no_grad():
                return layer(g.x, g.edge_index, g.edge_type)

        def spconv_forward():
            with torch.no_grad():
                return sub(built).features

        x = g.x.detach().clone().requires_grad_(True)

        def ours_forward_backward():
            layer.zero_grad(set_to_none=True)
            out = layer(x, g.edge_index, g.edge_type)
            out.backward(torch.ones_like(out))

        times = interleaved({"gridgraph build+fwd (points)": ours_points, "spconv build+fwd (points)": spconv_points,
                             "gridgraph build+fwd (mask)": ours_mask, "spconv build+fwd (mask)": spconv_mask,
                             "gridgraph fwd": ours_forward, "spconv fwd": spconv_forward}, rounds, min_run_time)
        times["gridgraph fwd+bwd"] = interleaved({"f": ours_forward_backward}, rounds, min_run_time)["f"]
        try:
            feats = features.clone().requires_grad_(True)
            out = sub(spconv.SparseConvTensor(feats, indices, [size, size], 1))
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                out.features.backward(torch.ones_like(out.features))  # spconv prints its debug dump on failure
            row["spconv_backward"] = "ran (not timed)"
        except Exception as error:  # spconv's CPU build: the backward asks for a CUDA stream
            row["spconv_backward"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        row["times_s"] = times
        row["ratios"] = {what: times[f"gridgraph {what}"]["median"] / times[f"spconv {what}"]["median"]
                         for what in ("build+fwd (points)", "build+fwd (mask)", "fwd")}
    return results


def spconv_markdown(results: dict) -> str:
    if "skipped" in results:
        return f"spconv peer: skipped: {results['skipped']}"
    if not results.get("timed", True):
        lines = [f"spconv peer ({results['spconv']}), {results['shape']}, {results['conv']}; correctness only "
                 "(nothing is timed)", "",
                 "| occupancy | points | max rel. error (gridgraph / spconv vs F.conv2d) | result |",
                 "|---:|---:|---:|---|"]
        lines += [f"| {r['occupancy']:.0%} | {r['points']:,} | {r['max_error']['gridgraph']:.1e} / "
                  f"{r['max_error']['spconv']:.1e} | matches F.conv2d and spconv |" for r in results["rows"]]
        return "\n".join(lines)
    lines = [f"spconv peer ({results['spconv']}, SubMConv2d, algo=ConvAlgo.Native), {results['shape']}, "
             f"{results['conv']}; medians of Timer blocks over {results['rounds']} interleaved rounds "
             f"({results['min_run_time_s']:g} s per measurement); ratio = gridgraph / spconv (below 1: gridgraph "
             "is faster)", "",
             "| occupancy | points | build+fwd from points: gridgraph / spconv | ratio | build+fwd from a mask: "
             "gridgraph / spconv | ratio | fwd, structure built: gridgraph / spconv | ratio | gridgraph fwd+bwd | "
             "spconv fwd+bwd |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["rows"]:
        t = {k: v["median"] * 1e3 for k, v in r["times_s"].items()}
        lines.append(
            f"| {r['occupancy']:.0%} | {r['points']:,} "
            f"| {t['gridgraph build+fwd (points)']:.2f} / {t['spconv build+fwd (points)']:.2f} ms "
            f"| {r['ratios']['build+fwd (points)']:.2f}x "
            f"| {t['gridgraph build+fwd (mask)']:.2f} / {t['spconv build+fwd (mask)']:.2f} ms "
            f"| {r['ratios']['build+fwd (mask)']:.2f}x "
            f"| {t['gridgraph fwd']:.2f} / {t['spconv fwd']:.2f} ms | {r['ratios']['fwd']:.2f}x "
            f"| {t['gridgraph fwd+bwd']:.2f} ms | not on CPU ({r['spconv_backward']}) |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    if not results.get("timed", True):
        lines = [f"{results['shape']}, {results['conv']}, random mask; correctness only (nothing is timed)", "",
                 "| occupancy | active px in / out | max rel. error | result |", "|---:|---:|---:|---|"]
        lines += [f"| {r['occupancy']:.0%} | {r['active_in']:,} / {r['active_out']:,} | {r['max_error']:.1e} "
                  f"| matches F.conv2d |" for r in results["rows"]]
        return "\n".join(lines)
    if "repeats" in results:  # a run recorded before the Timer: best of N hand-timed runs
        how = f"the best of {results['repeats']} runs after a warm-up"
    else:
        how = f"the best torch.utils.benchmark.Timer block ({results['min_run_time_s']:g} s per measurement)"
    lines = [f"{results['shape']}, {results['conv']}, random mask; times are {how}, ratio = graph / dense",
             "",
             "| occupancy | active px in / out | build (cold) | graph fwd | F.conv2d fwd | ratio fwd | graph fwd+bwd "
             "| F.conv2d fwd+bwd | ratio fwd+bwd | bytes graph / dense | max rel. error |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(
            f"| {r['occupancy']:.0%} | {r['active_in']:,} / {r['active_out']:,} | {r['build_s'] * 1e3:.0f} ms "
            f"| {r['graph_forward_s'] * 1e3:.1f} ms | {r['dense_forward_s'] * 1e3:.1f} ms "
            f"| {r['graph_forward_s'] / r['dense_forward_s']:.3g}x "
            f"| {r['graph_forward_backward_s'] * 1e3:.1f} ms | {r['dense_forward_backward_s'] * 1e3:.1f} ms "
            f"| {r['graph_forward_backward_s'] / r['dense_forward_backward_s']:.3g}x "
            f"| {r['graph_bytes'] / 2**20:.1f} / {r['dense_bytes'] / 2**20:.1f} MiB | {r['max_error']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 128x128 image: a correctness check, nothing timed")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--min-run-time", type=float, default=1.0,
                        help="seconds of timing per measurement (torch.utils.benchmark.Timer; default: 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "sparse.json", help="where to write the results")
    parser.add_argument("--show", action="store_true", help="print the tables of the saved JSON and exit")
    parser.add_argument("--no-spconv", action="store_true", help="skip the spconv peer")
    parser.add_argument("--only-spconv", action="store_true", help="run the spconv peer only")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the spconv comparison (default: 3)")
    parser.add_argument("--occupancies", default="0.01,0.1,0.5", help="comma-separated fractions (default: 0.01,0.1,0.5)")
    args = parser.parse_args(argv)
    if args.show:
        saved = json.loads(args.json.read_text())
        print(f"# Sparse domains: {saved['environment']}")
        for results in saved["runs"]:
            print()
            print(markdown(results))
        if saved.get("spconv"):
            print()
            print(spconv_markdown(saved["spconv"]))
        return 0
    if args.quick:
        args.size, args.channels = 128, 8
    if args.min_run_time <= 0:
        parser.error(f"--min-run-time must be positive (got {args.min_run_time})")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1 (got {args.rounds})")
    try:
        occupancies = [float(f) for f in args.occupancies.split(",")]
    except ValueError:
        parser.error(f"--occupancies must be comma-separated fractions (got {args.occupancies!r})")
    if not all(0 < f <= 1 for f in occupancies):
        parser.error(f"--occupancies must lie in (0, 1] (got {args.occupancies!r})")
    malloc = _malloc_for_timing()
    torch.set_num_threads(args.threads)
    env = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "python": sys.version.split()[0], "torch": torch.__version__, "torch_geometric": torch_geometric.__version__,
           "gridgraph": gridgraph.__version__, "threads": torch.get_num_threads(),
           "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
           "malloc": "glibc recycles freed buffers up to 32 MiB (as benchmarks/run.py)" if malloc else "default"}
    print(f"# Sparse domains: {env}")
    all_results = {"environment": env, "runs": []}
    if not args.no_spconv:
        peer = run_spconv(args.size, args.channels, occupancies, args.min_run_time, args.rounds, args.seed,
                          timing=not args.quick)
        all_results["spconv"] = peer
        print()
        print(spconv_markdown(peer))
    for kernel_size, stride in () if args.only_spconv else ((3, 1), (3, 2)):
        results = run(args.size, args.channels, occupancies, kernel_size, stride, args.min_run_time, args.seed,
                      timing=not args.quick)
        all_results["runs"].append(results)
        print()
        print(markdown(results))
    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if not args.quick:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(all_results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
