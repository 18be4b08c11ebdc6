"""Scale curve: gridgraph's plain call against ``F.conv2d`` as the image grows (issue 11, item 4).

For ``C = 8`` and ``C = 64`` channels (``C -> C``, 3x3, padding 1, batch 1) and image sides 256 to 4096,
forward + backward (input and parameters require grad):

* ``gridgraph``: ``GridConv2d(g.x, g.edge_index, g.edge_type)`` on node features ``[H*W, C]``, the pixel
  graph built beforehand (as in ``benchmarks/run.py``). Where the graph's edge list would not fit in
  ``--max-gb`` (4096x4096: 151 M edges), the same operator is called on the graph's structure alone
  (``gridgraph.nn.functional.conv(x, part, weight, bias)``: the key of the same neighbour table, no edge
  list), marked "structure call" in the table;
* ``conv2d``: ``F.conv2d`` on the image, NCHW and channels-last, both timed; the faster is the
  reference, and the memory ratio is taken against that same layout.

Every method's output and input gradient is checked against ``F.conv2d`` (NCHW) before it is timed.
Times: medians of ``torch.utils.benchmark.Timer`` blocks over ``--rounds`` interleaved rounds (A/B/C,
A/B/C, ...). Peak memory: ``peak_extra_bytes`` of ``benchmarks/run.py`` (the running sum of torch's CPU
allocator events during one call, above what it held before). A size that would not fit in ``--max-gb``
even with the structure call (an estimate: the cached structure, the inputs in both layouts, the upstream
gradients, an output and an input gradient) is skipped and reported as such.

Usage::

    python benchmarks/scale.py                    # the full curve, 2 threads: table, JSON, plot
    python benchmarks/scale.py --quick            # tiny images: correctness only, nothing timed
    python benchmarks/scale.py --show --json benchmarks/recorded/scale-2threads.json   # print a saved run
    python benchmarks/scale.py --tiled            # whole vs tiled networks, memory bounds, spatial parallel

``--tiled`` (``benchmarks/_tiles.py``) measures converted networks run whole and with ``gridgraph.tiled``:
peak resident memory growth and time of one forward+backward against the image side (512 to 8192), the two
memory bounds of issue 22, and ``gridgraph.spatial_parallel`` on 1, 2 and 4 local processes; each
measurement in a fresh process.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from gridgraph import GridConv2d, clear_cache, image_to_graph, set_cache_limit
from gridgraph.structure import REGISTRY

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import _malloc_for_timing, machine, peak_extra_bytes  # noqa: E402  (the dense suite's measures)

CHANNELS = (8, 64)
SIDES = (256, 512, 1024, 2048, 4096)
QUICK_CHANNELS = (2, 4)
QUICK_SIDES = (12, 24)
METHODS = ("gridgraph", "conv2d-nchw", "conv2d-cl")


def needed_bytes(side: int, channels: int, call: str) -> int:
    """A generous estimate of what one size holds at its peak. Per pixel: the graph and the cached
    structure (``'plain'``: the edge list, taps and offsets, the cached edge template, the neighbour table
    and the kernels' plans, ~620 bytes measured at 1024x1024, 3x3; ``'structure'``: the table and plans
    only, ~150 bytes), and ~8 live float tensors of ``C`` channels (inputs, upstream gradients, output,
    input gradient)."""
    per_pixel = (700 if call == "plain" else 200) + 8 * channels * 4
    return side * side * per_pixel


def cases(side: int, channels: int, call: str = "plain", seed: int = 0):
    """The three methods on one size, each a forward+backward closure, after the output/gradient checks.

    ``call='plain'``: the graph layer's plain call on the pixel graph (``image_to_graph`` beforehand);
    ``'structure'``: the same operator given the graph's structure alone (``gridgraph.nn.functional.conv``
    on a :class:`~gridgraph.structure.GraphPart`), for images whose edge list would not fit in memory.
    Both run ``torch.ops.gridgraph.grid_conv`` on the same key (checked with ``kernel_trace``)."""
    from gridgraph.geometry import ConvGeometry
    from gridgraph.nn.functional import conv as graph_conv, kernel_trace
    from gridgraph.structure import GraphPart

    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    layer = GridConv2d.from_conv2d(conv)
    weight, bias = conv.weight.detach().requires_grad_(True), conv.bias.detach().requires_grad_(True)
    x_nchw = torch.randn(1, channels, side, side).requires_grad_(True)
    x_cl = x_nchw.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    # node features [H*W, C] are the channels-last image: a view of x_cl's storage with its own gradient
    x_nodes = x_cl.detach().permute(0, 2, 3, 1).reshape(-1, channels).requires_grad_(True)
    grad_image = torch.randn(1, channels, side, side)
    grad_cl = grad_image.contiguous(memory_format=torch.channels_last)
    grad_nodes = grad_cl.permute(0, 2, 3, 1).reshape(-1, channels)
    if call == "plain":
        graph = image_to_graph(x_nchw.detach(), layer)
        num_edges = graph.edge_index.size(1)

        def run_graph():
            return layer(x_nodes, graph.edge_index, graph.edge_type)
    else:
        part = GraphPart.grid(ConvGeometry.from_module(layer), (side, side), 1)
        num_edges = None

        def run_graph():
            return graph_conv(x_nodes, part, layer.weight, layer.bias)

    def gridgraph(keep: bool = False):
        layer.zero_grad(set_to_none=True)
        out = run_graph()
        out.backward(grad_nodes)
        if not keep:  # nothing of this call stays alive into the next one
            x_nodes.grad = None
        return out

    def conv_of(x, grad):
        def conv(keep: bool = False):
            weight.grad = bias.grad = None
            out = F.conv2d(x, weight, bias, padding=1)
            out.backward(grad)
            if not keep:
                x.grad = None
            return out
        return conv

    conv_nchw, conv_cl = conv_of(x_nchw, grad_image), conv_of(x_cl, grad_cl)

    # correctness first: outputs and input gradients against F.conv2d (NCHW)
    ref = conv_nchw(keep=True).detach()
    ref_grad = x_nchw.grad
    x_nchw.grad = None
    scale = max(1.0, float(ref.abs().max()))
    gscale = max(1.0, float(ref_grad.abs().max()))
    errors = {}
    with kernel_trace() as trace:
        out = gridgraph(keep=True).detach().view(1, side, side, channels).permute(0, 3, 1, 2)
    if trace != ["grid"]:
        raise AssertionError(f"side {side}, C={channels}: expected the grid kernel, ran {trace}")
    errors["gridgraph"] = (float((out - ref).abs().max()) / scale,
                           float((x_nodes.grad.view(1, side, side, channels).permute(0, 3, 1, 2) - ref_grad).abs().max())
                           / gscale)
    del out
    x_nodes.grad = None
    out = conv_cl(keep=True).detach()
    errors["conv2d-cl"] = (float((out - ref).abs().max()) / scale, float((x_cl.grad - ref_grad).abs().max()) / gscale)
    x_cl.grad = None
    del out, ref, ref_grad
    bad = {k: v for k, v in errors.items() if max(v) > 1e-4}
    if bad:
        raise AssertionError(f"side {side}, C={channels}: differs from F.conv2d: {bad}")
    return {"gridgraph": gridgraph, "conv2d-nchw": conv_nchw, "conv2d-cl": conv_cl}, errors, num_edges


def measure_size(side: int, channels: int, rounds: int, budget_s: float, timing: bool, call: str = "plain") -> dict:
    fns, errors, num_edges = cases(side, channels, call)
    row = {"side": side, "channels": channels, "call": call, "num_edges": num_edges,
           "max_rel_error": {k: v[0] for k, v in errors.items()},
           "grad_rel_error": {k: v[1] for k, v in errors.items()}}
    if not timing:
        return row
    samples = {name: [] for name in fns}
    for _ in range(rounds):  # interleaved: load from other processes hits every method alike
        for name, fn in fns.items():
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            samples[name].extend(timer.blocked_autorange(min_run_time=budget_s / rounds).times)
    row["fb_ms"] = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    row["fb_min_ms"] = {k: min(v) * 1e3 for k, v in samples.items()}
    row["samples"] = {k: len(v) for k, v in samples.items()}
    row["peak_mb"] = {}
    for name, fn in fns.items():
        gc.collect()
        row["peak_mb"][name] = peak_extra_bytes(fn) / 2**20
    ref = min(("conv2d-nchw", "conv2d-cl"), key=lambda k: row["fb_ms"][k])
    row["reference"] = ref
    row["time_ratio"] = row["fb_ms"]["gridgraph"] / row["fb_ms"][ref]
    row["time_ratio_nchw"] = row["fb_ms"]["gridgraph"] / row["fb_ms"]["conv2d-nchw"]
    row["memory_ratio"] = row["peak_mb"]["gridgraph"] / row["peak_mb"][ref]
    return row


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    if payload.get("quick"):
        lines = ["Correctness only (tiny images; nothing is timed): max error relative to max(1, max|F.conv2d|)", "",
                 "| C | side | output error | input-gradient error | result |", "|---:|---:|---:|---:|---|"]
        for r in rows:
            lines.append(f"| {r['channels']} | {r['side']} | {r['max_rel_error']['gridgraph']:.1e} | "
                         f"{r['grad_rel_error']['gridgraph']:.1e} | matches F.conv2d |")
        return "\n".join(lines)
    m = payload["machine"]
    lines = [f"CPU: {m['cpu']}, {m['threads']} threads; torch {m['torch']}; float32; C -> C, 3x3, padding 1, "
             f"batch 1; forward+backward; medians of Timer blocks over {payload['rounds']} interleaved rounds; "
             f"load average {m.get('load_average_start')} at the start, {m.get('load_average_end')} at the end; "
             f"structure cache bound {m.get('structure_cache_gib', 2):g} GiB", "",
             "| C | side | gridgraph ms | conv2d NCHW ms | conv2d CL ms | ratio to the faster | (to NCHW) | "
             "gridgraph peak MB | conv2d peak MB (same layout) | memory ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['channels']} | {r['side']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        t, p, ref = r["fb_ms"], r["peak_mb"], r["reference"]
        side = f"{r['side']}" + (" (structure call)" if r.get("call") == "structure" else "")
        lines.append(f"| {r['channels']} | {side} | {t['gridgraph']:.1f} | {t['conv2d-nchw']:.1f} | "
                     f"{t['conv2d-cl']:.1f} | {r['time_ratio']:.2f}x ({'CL' if ref == 'conv2d-cl' else 'NCHW'}) | "
                     f"{r['time_ratio_nchw']:.2f}x | {p['gridgraph']:.0f} | {p[ref]:.0f} | {r['memory_ratio']:.2f}x |")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for channels, marker in zip(sorted({r["channels"] for r in payload["rows"]}), "os^v"):
        rows = [r for r in payload["rows"] if r["channels"] == channels and "time_ratio" in r]
        sides = [r["side"] for r in rows]
        axes[0].plot(sides, [r["time_ratio"] for r in rows], marker=marker, label=f"C = {channels}")
        axes[1].plot(sides, [r["memory_ratio"] for r in rows], marker=marker, label=f"C = {channels}")
    for ax, what in zip(axes, ("time, forward+backward", "peak memory, forward+backward")):
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("image side (pixels)")
        ax.set_ylabel("gridgraph / F.conv2d (faster layout)")
        ax.set_title(what)
        ax.set_ylim(bottom=0)
        ax.legend()
    m = payload["machine"]
    fig.suptitle(f"Scale curve, 3x3, batch 1 ({m['threads']} threads, {m['cpu']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny images: correctness only, nothing timed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per size (default: 3)")
    parser.add_argument("--budget", type=float, default=3.0,
                        help="seconds of timing per method and size, split over the rounds (default: 3)")
    parser.add_argument("--channels", default=",".join(map(str, CHANNELS)))
    parser.add_argument("--sides", default=",".join(map(str, SIDES)))
    parser.add_argument("--max-gb", type=float, default=12.0,
                        help="skip a size whose estimated peak exceeds this many GiB (default: 12)")
    parser.add_argument("--cache-gb", type=float, default=None,
                        help="bound of gridgraph's structure cache (gridgraph.structure.REGISTRY.max_bytes) in GiB "
                             "(default: the library's, 2 GiB; a 4096x4096 3x3 grid's table and plans hold ~2.4 GiB)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--json", type=Path, default=None, help="with --show: the saved run to print")
    parser.add_argument("--show", action="store_true", help="print the table of a saved run and exit")
    parser.add_argument("--tiled", action="store_true",
                        help="whole vs tiled networks: memory and time against size, memory bounds, spatial parallel")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        import _tiles
        print(json.dumps(_tiles.child(json.loads(args.child))))
        return 0
    if args.tiled:
        import _tiles
        payload = _tiles.run(args.quick, args.threads, args.max_gb, args.out_dir)
        print(_tiles.markdown(payload))
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "tiled.json").write_text(json.dumps(payload, indent=1))
        if not args.quick:
            _tiles.plot(payload, args.out_dir / "tiled.png")
        return 0
    if args.show:
        print(markdown(json.loads((args.json or args.out_dir / "scale.json").read_text())))
        return 0
    if args.rounds < 1 or args.budget <= 0:
        parser.error(f"--rounds must be at least 1 and --budget positive (got {args.rounds}, {args.budget})")
    channels = QUICK_CHANNELS if args.quick else tuple(int(c) for c in args.channels.split(","))
    sides = QUICK_SIDES if args.quick else tuple(int(s) for s in args.sides.split(","))
    _malloc_for_timing()
    torch.set_num_threads(args.threads)
    if args.cache_gb is not None:
        set_cache_limit(max_bytes=int(args.cache_gb * 2**30))
    info = machine()
    info["structure_cache_gib"] = REGISTRY.max_bytes / 2**30
    info["load_average_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    payload = {"machine": info, "quick": args.quick, "rounds": args.rounds, "budget_s": args.budget, "rows": []}
    for c in channels:
        for side in sides:
            calls = [k for k in ("plain", "structure") if needed_bytes(side, c, k) <= args.max_gb * 2**30]
            if not calls:
                row = {"side": side, "channels": c, "skipped": f"needs ~{needed_bytes(side, c, 'structure') / 2**30:.0f}"
                       f" GiB > --max-gb {args.max_gb:g}"}
            else:
                row = measure_size(side, c, args.rounds, args.budget, timing=not args.quick, call=calls[0])
                clear_cache()
                gc.collect()
            payload["rows"].append(row)
            status = row.get("skipped") or (f"{row['time_ratio']:.2f}x time, {row['memory_ratio']:.2f}x memory"
                                            if "time_ratio" in row else "matches F.conv2d")
            print(f"  C={c} side={side}: {status}", file=sys.stderr, flush=True)
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(markdown(payload))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "scale.json").write_text(json.dumps(payload, indent=1))
    if not args.quick:
        plot(payload, args.out_dir / "scale.png")
        print(f"\nwrote {args.out_dir / 'scale.json'} and {args.out_dir / 'scale.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
