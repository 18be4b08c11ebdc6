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

Usage::

    python benchmarks/sparse.py                 # the full run (1024x1024), markdown table + JSON
    python benchmarks/sparse.py --quick         # a small image: checks correctness, times nothing
    python benchmarks/sparse.py --threads 1 --json benchmarks/recorded/sparse-1thread.json
    python benchmarks/sparse.py --show [--json ...]   # print the tables of a saved run

On a machine whose cores are shared with other work, a two-thread run of many small parallel
operations (the sparse path: a few per tap) can wait milliseconds at every OpenMP barrier, while the
dense convolution's few large operations barely notice; a one-thread run measures both without that.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch_geometric
from torch.nn import functional as F
from torch.utils import benchmark

import gridgraph
from gridgraph import GridConv2d, image_to_graph

HERE = Path(__file__).resolve().parent


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
    args = parser.parse_args(argv)
    if args.show:
        saved = json.loads(args.json.read_text())
        print(f"# Sparse domains: {saved['environment']}")
        for results in saved["runs"]:
            print()
            print(markdown(results))
        return 0
    if args.quick:
        args.size, args.channels = 128, 8
    if args.min_run_time <= 0:
        parser.error(f"--min-run-time must be positive (got {args.min_run_time})")
    torch.set_num_threads(args.threads)
    env = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "python": sys.version.split()[0], "torch": torch.__version__, "torch_geometric": torch_geometric.__version__,
           "gridgraph": gridgraph.__version__, "threads": torch.get_num_threads()}
    print(f"# Sparse domains: {env}")
    all_results = {"environment": env, "runs": []}
    for kernel_size, stride in ((3, 1), (3, 2)):
        results = run(args.size, args.channels, [0.01, 0.10, 0.50], kernel_size, stride, args.min_run_time, args.seed,
                      timing=not args.quick)
        all_results["runs"].append(results)
        print()
        print(markdown(results))
    if not args.quick:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(all_results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
