"""Speed suite: gridgraph's message passing against ``F.conv2d`` and PyTorch Geometric's layers.

Run from the repository root::

    python benchmarks/run.py                # the full suite (CPU, 2 threads), a few minutes
    python benchmarks/run.py --quick        # tiny shapes: checks every method against F.conv2d, times nothing

For every shape it measures, in one process and one run, forward and forward+backward (inputs and
parameters all require grad):

* ``conv2d``     ``F.conv2d`` on an NCHW batch; ``conv2d-cl`` the same on a channels-last batch. The
  reference of every ratio is the faster of the two (per shape and per mode, "best layout"); the
  ratios to NCHW alone are kept beside them;
* ``gridgraph``  ``GridConv2d(g.x, g.edge_index, g.edge_type)`` on node features, graph built beforehand
  (its ``edge_index`` carries the structure: the neighbour-table kernels);
* ``gg-loader``  the same call on a graph that went through PyG's ``DataLoader`` (a batch of the images'
  one-image graphs) and ``.to(device)``: the structure travels with it, so it must cost the same;
* ``gg-compiled`` the same call under ``torch.compile`` (``--compile-backend``, default inductor;
  compilation before timing): the registered operators, not an edge-list fallback;
* ``gg-image``   the image-level path: NCHW image -> ``image_to_graph`` (cached structure, one layout
  copy) -> ``GridConv2d`` -> ``graph_to_image`` (a view, channels-last strides);
* ``gg-edges``   the same layer on a copy of ``edge_index`` that carries no table: the general
  edge-list path (gather ``x_j``, one GEMM per tap, scatter-add);
* ``rgcn``       PyG ``RGCNConv(num_relations=kH*kW, aggr='add', root_weight=False)`` holding the
  conv's weights (block-diagonal for grouped convs): the peer;
* ``naive``      a plain PyG ``MessagePassing`` whose ``message`` gathers each edge's weight matrix
  ``W[edge_type]`` and multiplies (NNConv style): the naive baseline. It is skipped where its
  per-edge temporaries would exceed ``--naive-max-gb``.

Every method's output is checked against ``F.conv2d`` before it is timed (and the gridgraph methods'
gradients too). Times come from ``torch.utils.benchmark.Timer`` (``blocked_autorange``: warm-up, a
block size chosen so that timer overhead is negligible, the thread count fixed): per round and method
it runs blocks of calls for ``--budget / --rounds`` seconds; the table gives the median and the best
of the per-call block times, the rounds interleaved so that load from other processes hits all
methods alike; the fast methods
(``conv2d``, ``conv2d-cl`` and the ``gridgraph``/``gg-*`` rows but ``gg-edges``) are timed together first,
the slow baselines (``gg-edges``, ``rgcn``, ``naive``) afterwards, so that their large temporaries cannot disturb the first comparison. Peak extra memory is
the peak of the bytes held by torch's CPU allocator during one call, above what it held before (the
running sum of ``torch.profiler``'s allocation and free events, ``profile_memory=True``): output,
saved tensors, gradients, temporaries and oneDNN's workspaces (which PyTorch routes through the same
allocator); only MKL's small internal GEMM buffers escape it, for every method alike. It is exact and
immune to other processes, unlike resident-set deltas (tried first: glibc reuses freed pages and the
kernel's RSS counters lag, so they under-read). Timings run with glibc recycling freed buffers up to
32 MiB, as it settles to by itself after warm-up, so that no method pays page faults on every call. Graph construction is timed on a
1024x1024 image (3 channels, 3x3, padding 1): cold (caches cleared) and cached.

Outputs: a markdown table on stdout, ``results.json``, ``ratios.png`` (bar chart of ratios to
``F.conv2d``, log scale) in ``--out-dir`` (default ``benchmarks/results``). With ``--quick`` only the
correctness table and ``results.json`` (errors only): tiny shapes say nothing about speed.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils import benchmark
from torch_geometric.nn import MessagePassing, RGCNConv

import gridgraph
from gridgraph import GridConv2d, clear_cache, graph_to_image, image_to_graph

METHODS = ("conv2d", "conv2d-cl", "gridgraph", "gg-loader", "gg-compiled", "gg-image", "gg-edges", "rgcn", "naive")
METHOD_HELP = {
    "conv2d": "F.conv2d on an NCHW batch (a reference)",
    "conv2d-cl": "F.conv2d on a channels-last batch (the other reference; ratios use the faster)",
    "gridgraph": "GridConv2d on a pixel graph built beforehand (the neighbour-table kernels)",
    "gg-loader": "the same after PyG's DataLoader and .to(device)",
    "gg-compiled": "the same under torch.compile",
    "gg-image": "image -> image_to_graph -> the layer -> graph_to_image",
    "gg-edges": "the layer on a plain edge list (the per-tap edge kernels)",
    "rgcn": "PyG's RGCNConv holding the convolution's weights (the peer)",
    "naive": "a MessagePassing layer gathering a weight matrix per edge (NNConv style)",
}
FAST_METHODS = ("conv2d", "conv2d-cl", "gridgraph", "gg-loader", "gg-compiled", "gg-image")
REFERENCES = ("conv2d", "conv2d-cl")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    in_channels: int
    out_channels: int
    size: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1

    def describe(self) -> str:
        s = (f"B={self.batch} {self.in_channels}->{self.out_channels} {self.size}x{self.size} "
             f"k{self.kernel_size}")
        if self.stride != 1:
            s += f" s{self.stride}"
        if self.padding:
            s += f" p{self.padding}"
        if self.dilation != 1:
            s += f" d{self.dilation}"
        if self.groups != 1:
            s += f" g{self.groups}"
        return s


SHAPES = (
    Shape("1 3x3", 8, 64, 64, 56, 3, padding=1),
    Shape("2 3x3 deep", 8, 128, 128, 28, 3, padding=1),
    Shape("3 stem 7x7/2", 1, 3, 64, 224, 7, stride=2, padding=3),
    Shape("4 pointwise", 8, 256, 64, 28, 1),
    Shape("5 depthwise", 8, 128, 128, 56, 3, padding=1, groups=128),
    Shape("6 3x3/2", 8, 64, 128, 56, 3, stride=2, padding=1),
    Shape("7 dilated", 8, 32, 32, 56, 3, padding=2, dilation=2),
)

# The same seven geometries, small enough to check every method in a few seconds.
QUICK_SHAPES = (
    Shape("1 3x3", 2, 8, 8, 12, 3, padding=1),
    Shape("2 3x3 deep", 2, 16, 16, 8, 3, padding=1),
    Shape("3 stem 7x7/2", 1, 3, 8, 24, 7, stride=2, padding=3),
    Shape("4 pointwise", 2, 32, 8, 8, 1),
    Shape("5 depthwise", 2, 16, 16, 12, 3, padding=1, groups=16),
    Shape("6 3x3/2", 2, 8, 16, 12, 3, stride=2, padding=1),
    Shape("7 dilated", 2, 8, 8, 12, 3, padding=2, dilation=2),
)


# --------------------------------------------------------------------------------------- memory
_libc = None


def _set_malloc(threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds (bytes); False where that is not possible."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(_libc.mallopt(m_mmap_threshold, threshold)) and bool(_libc.mallopt(m_trim_threshold, threshold))
    except OSError:
        return False


def _malloc_for_timing() -> bool:
    """Recycle freed buffers up to 32 MiB (glibc's own limit after warm-up): no page faults per call."""
    return _set_malloc(32 << 20)


def peak_extra_bytes(fn: Callable[[], object], device: Optional[torch.device] = None) -> int:
    """Peak of the bytes held by torch's CPU allocator during one call of ``fn`` (result kept alive
    until the end), above what was held before: the running sum of the profiler's allocation and
    free events. Outputs, saved tensors, gradients, temporaries and oneDNN workspaces all go
    through that allocator; MKL's small internal GEMM buffers do not (for any method).
    On a CUDA ``device``: the CUDA caching allocator's peak of allocated bytes above the start."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


# --------------------------------------------------------------------------------------- methods
class NaiveEdgeConv(MessagePassing):
    """Per-edge weight gather: ``message = W[edge_type] @ x_j`` with an ``[E, C_out, C_in/G]`` temporary."""

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__(aggr="add", node_dim=0)
        self.groups = conv.groups
        self.weight = torch.nn.Parameter(conv.weight.detach().clone())
        self.bias = torch.nn.Parameter(conv.bias.detach().clone())

    def forward(self, x, edge_index, edge_type, size):
        return self.propagate(edge_index, x=x, edge_type=edge_type, size=size) + self.bias

    def message(self, x_j, edge_type):
        c_out, c_in_g = self.weight.shape[:2]
        g = self.groups
        per_tap = self.weight.reshape(g, c_out // g, c_in_g, -1).permute(3, 0, 1, 2)  # [T, G, Co/G, Ci/G]
        w_e = per_tap[edge_type]  # [E, G, Co/G, Ci/G]: the per-edge weight gather
        return (w_e @ x_j.view(-1, g, c_in_g, 1)).reshape(-1, c_out)


def rgcn_from_conv(conv: torch.nn.Conv2d):
    """``RGCNConv`` with one relation per tap holding ``conv``'s weights (block-diagonal if grouped)."""
    c_out, c_in_g, kh, kw = conv.weight.shape
    g = conv.groups
    layer = RGCNConv(conv.in_channels, c_out, num_relations=kh * kw, aggr="add", root_weight=False, bias=True)
    with torch.no_grad():
        w = torch.zeros(kh * kw, conv.in_channels, c_out)
        taps = conv.weight.reshape(g, c_out // g, c_in_g, kh * kw).permute(3, 0, 2, 1)  # [T, G, Ci/G, Co/G]
        for k in range(g):
            w[:, k * c_in_g:(k + 1) * c_in_g, k * (c_out // g):(k + 1) * (c_out // g)] = taps[:, k]
        layer.weight.copy_(w)
        layer.bias.copy_(conv.bias)
    return layer


@dataclass
class Case:
    """One method on one shape: how to run it forward and how to compare its output with conv2d."""

    forward: Callable[[], torch.Tensor]
    inputs: list  # tensors whose .grad is reset before each backward
    to_image: Callable[[torch.Tensor], torch.Tensor]
    grad_of_input: Optional[Callable[[], torch.Tensor]] = None  # the input gradient as an NCHW image


def build_cases(shape: Shape, methods: tuple[str, ...], naive_max_bytes: float, seed: int = 0,
                device: str = "cpu", compile_backend: str = "inductor"):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel_size, shape.stride,
                           shape.padding, shape.dilation, shape.groups).to(device)
    image = torch.randn(shape.batch, shape.in_channels, shape.size, shape.size).to(device)
    layer = GridConv2d.from_conv2d(conv)
    graph = image_to_graph(image, layer)
    h_out, w_out = graph.out_size
    c_out = shape.out_channels

    def node_to_image(y):
        return y.view(shape.batch, h_out, w_out, c_out).permute(0, 3, 1, 2)

    def x_grad_image(x):
        return lambda: x.grad.view(shape.batch, shape.size, shape.size, shape.in_channels).permute(0, 3, 1, 2)

    cases: dict[str, Case] = {}
    skipped: dict[str, str] = {}
    num_edges = graph.edge_index.size(1)
    size = graph.size()
    for method in methods:
        if method in ("conv2d", "conv2d-cl"):
            layout = torch.channels_last if method == "conv2d-cl" else torch.contiguous_format
            x = image.clone().contiguous(memory_format=layout).requires_grad_()
            cases[method] = Case(lambda x=x: conv(x), [x, *conv.parameters()], lambda y: y, lambda x=x: x.grad)
        elif method == "gg-loader":
            from torch_geometric.loader import DataLoader

            singles = [image_to_graph(image[b].cpu(), layer.cpu()) for b in range(shape.batch)]
            layer.to(device)
            loaded = next(iter(DataLoader(singles, batch_size=shape.batch))).to(device)
            x = loaded.x.clone().requires_grad_()
            cases[method] = Case(lambda x=x, g=loaded: layer(x, g.edge_index, g.edge_type, size=g.size()),
                                 [x, *layer.parameters()], node_to_image, x_grad_image(x))
        elif method == "gg-compiled":
            # The layer's forward is one code object for every shape: without a reset, the modes of
            # seven shapes pass dynamo's recompile limit and the later shapes would run eager,
            # silently. With fail_on_recompile_limit_hit the column is compiled or the run stops.
            torch._dynamo.reset()
            torch._dynamo.config.fail_on_recompile_limit_hit = True
            compiled = torch.compile(layer, backend=compile_backend)
            x = graph.x.clone().requires_grad_()
            cases[method] = Case(lambda x=x, c=compiled: c(x, graph.edge_index, graph.edge_type, size=size),
                                 [x, *layer.parameters()], node_to_image, x_grad_image(x))
        elif method == "gridgraph":
            x = graph.x.clone().requires_grad_()
            cases[method] = Case(lambda x=x: layer(x, graph.edge_index, graph.edge_type),
                                 [x, *layer.parameters()], node_to_image, x_grad_image(x))
        elif method == "gg-image":
            x = image.clone().requires_grad_()

            def run(x=x):
                g = image_to_graph(x, layer)
                return graph_to_image(layer(g.x, g.edge_index, g.edge_type), g)

            cases[method] = Case(run, [x, *layer.parameters()], lambda y: y, lambda x=x: x.grad)
        elif method == "gg-edges":
            x = graph.x.clone().requires_grad_()
            plain_edges = graph.edge_index.as_tensor()  # a plain [2, E] tensor, no structure: the edge-list path
            cases[method] = Case(lambda x=x, e=plain_edges: layer(x, e, graph.edge_type, size=size),
                                 [x, *layer.parameters()], node_to_image, x_grad_image(x))
        elif method == "rgcn":
            rgcn = rgcn_from_conv(conv.cpu()).to(device)
            x = graph.x.clone().requires_grad_()
            dst = x.new_empty(size[1], 0)  # RGCNConv reads the target count from x_dst (root_weight=False)
            cases[method] = Case(lambda x=x, r=rgcn, d=dst: r((x, d), graph.edge_index, graph.edge_type),
                                 [x, *rgcn.parameters()], node_to_image)
        elif method == "naive":
            need = num_edges * c_out * (shape.in_channels // shape.groups) * 4
            if need > naive_max_bytes:
                skipped[method] = f"per-edge weights need {need / 2**30:.1f} GiB > --naive-max-gb"
                continue
            naive = NaiveEdgeConv(conv).to(device)
            x = graph.x.clone().requires_grad_()
            cases[method] = Case(lambda x=x, m=naive: m(x, graph.edge_index, graph.edge_type, size),
                                 [x, *naive.parameters()], node_to_image)
    return conv, image, cases, skipped


def _fb(case: Case, grad: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        for t in case.inputs:
            t.grad = None
        y = case.forward()
        y.backward(grad)
        return y
    return run


def _fwd(case: Case) -> Callable[[], torch.Tensor]:
    def run():
        with torch.no_grad():
            return case.forward()
    return run


def check_case(name: str, case: Case, ref: torch.Tensor, ref_grad_x: Optional[torch.Tensor]) -> dict:
    """Max abs error of the output (and input gradient) against F.conv2d, relative to its scale."""
    with torch.no_grad():
        out = case.to_image(case.forward())
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: output shape {tuple(out.shape)} != conv2d's {tuple(ref.shape)}")
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    err = float((out - ref).abs().max()) / scale if ref.numel() else 0.0
    result = {"max_rel_error": err}
    if case.grad_of_input is not None and ref_grad_x is not None:
        y = case.forward()
        _fb(case, torch.ones_like(y))()
        gscale = max(1.0, float(ref_grad_x.abs().max()))
        result["grad_rel_error"] = float((case.grad_of_input() - ref_grad_x).abs().max()) / gscale
    bad = {k: v for k, v in result.items() if not v <= 1e-4}
    if bad:
        raise AssertionError(f"{name}: does not match F.conv2d: {bad}")
    return result


def measure(fns: dict[str, Callable[[], object]], rounds: int, budget_s: float,
            threads: int) -> dict[str, list[float]]:
    """Per-call seconds of each function, interleaved: every round times each function with
    ``torch.utils.benchmark.Timer.blocked_autorange`` for ``budget_s / rounds`` seconds (after its own
    warm-up and block-size estimate) on ``threads`` threads; the samples are its blocks' per-call means."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=name)
            samples[name].extend(timer.blocked_autorange(min_run_time=budget_s / rounds).times)
    return samples


def graph_construction(size: int = 1024, channels: int = 3, repeats: int = 3) -> dict:
    """Cold and cached ``image_to_graph`` on one ``size x size`` image, 3x3, padding 1 (medians, ms).

    A cold call must follow a cleared cache, so each is timed alone (``Timer.timeit(number=1)``)."""
    image = torch.randn(channels, size, size)
    build = benchmark.Timer(stmt="image_to_graph(image, kernel_size=3, padding=1)",
                            globals={"image_to_graph": image_to_graph, "image": image},
                            num_threads=torch.get_num_threads())
    cold, cached = [], []
    for _ in range(repeats):
        clear_cache()
        cold.append(build.timeit(number=1).median)  # one call on an empty cache
        cached.append(build.timeit(number=1).median)
    num_edges = image_to_graph(image, kernel_size=3, padding=1).edge_index.size(1)
    clear_cache()
    return {"size": size, "channels": channels, "num_edges": num_edges,
            "cold_ms": statistics.median(cold) * 1e3, "cached_ms": statistics.median(cached) * 1e3,
            "cold_samples_ms": [t * 1e3 for t in cold], "cached_samples_ms": [t * 1e3 for t in cached]}


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch_geometric
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_geometric": torch_geometric.__version__,
            "gridgraph": gridgraph.__version__, "threads": torch.get_num_threads(),
            "platform": platform.platform()}


def geomean(values) -> float:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarise(results: list[dict]) -> dict:
    def ratios(method, key):
        return [r["methods"][method][key] for r in results if method in r["methods"]
                and r["methods"][method].get(key) is not None]

    fwd = ratios("gridgraph", "fwd_ratio")
    fb = ratios("gridgraph", "fb_ratio")
    fwd_nchw = ratios("gridgraph", "fwd_ratio_nchw")
    fb_nchw = ratios("gridgraph", "fb_ratio_nchw")
    loader = [r["methods"]["gg-loader"]["fwd_ms"] / r["methods"]["gridgraph"]["fwd_ms"] for r in results
              if "gg-loader" in r["methods"] and "gridgraph" in r["methods"]]
    compiled = [r["methods"]["gg-compiled"]["fwd_ms"] / r["methods"]["gridgraph"]["fwd_ms"] for r in results
                if "gg-compiled" in r["methods"] and "gridgraph" in r["methods"]]
    fwd_best = ratios("gridgraph", "fwd_min_ratio")
    fb_best = ratios("gridgraph", "fb_min_ratio")
    speedup = [r["methods"]["rgcn"]["fwd_ms"] / r["methods"]["gridgraph"]["fwd_ms"] for r in results
               if "rgcn" in r["methods"] and "gridgraph" in r["methods"]]
    mem = [r["methods"]["gridgraph"]["mem_ratio"] for r in results
           if r["methods"].get("gridgraph", {}).get("mem_ratio") is not None]
    mem_fb = [r["methods"]["gridgraph"]["fb_mem_ratio"] for r in results
              if r["methods"].get("gridgraph", {}).get("fb_mem_ratio") is not None]
    return {"fwd_geomean": geomean(fwd), "fwd_max": max(fwd, default=float("nan")),
            "fb_geomean": geomean(fb), "fb_max": max(fb, default=float("nan")),
            "fwd_geomean_nchw": geomean(fwd_nchw), "fb_geomean_nchw": geomean(fb_nchw),
            "loader_over_graph_max": max(loader, default=float("nan")),
            "compiled_over_eager_max": max(compiled, default=float("nan")),
            "fwd_best_geomean": geomean(fwd_best),
            "fwd_best_max": max(fwd_best, default=float("nan")), "fb_best_geomean": geomean(fb_best),
            "rgcn_speedup_geomean": geomean(speedup),
            "mem_ratio_max": max(mem, default=float("nan")), "fb_mem_ratio_max": max(mem_fb, default=float("nan"))}


def _na(value: Any, spec: str, why: str) -> str:
    """``value`` formatted, or ``n/a (why)`` where it could not be computed (never 'nan')."""
    if value is None or (isinstance(value, float) and value != value):
        return f"n/a ({why})"
    return format(value, spec)


def markdown(results: list[dict], summary: dict, construction: Optional[dict], info: dict) -> str:
    def fmt(v, spec=".2f"):
        return "-" if v is None or (isinstance(v, float) and v != v) else format(v, spec)

    def x(key: str, why: str, spec: str = ".2f") -> str:
        text = _na(summary.get(key), spec, why)
        return text + "x" if not text.startswith("n/a") else text

    where = "" if info.get("device", "cpu") == "cpu" else f"Device: {info['device']}; "
    lines = [f"{where}CPU: {info['cpu']}, {info['threads']} threads; torch {info['torch']}, "
             f"torch_geometric {info['torch_geometric']}; float32; medians (and best) of "
             f"torch.utils.benchmark.Timer blocks",
             "",
             "Ratios are to the faster layout of F.conv2d (NCHW or channels-last) per shape and mode; "
             "`x NCHW` to the NCHW one alone.",
             "",
             "| shape | method | fwd ms | fwd x best | (best-of) | x NCHW | fwd+bwd ms | f+b x best | (best-of) | "
             "x NCHW | peak MB fwd | x conv | peak MB f+b | x conv |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for method, m in r["methods"].items():
            lines.append(f"| {r['shape']} | {method} | {fmt(m.get('fwd_ms'))} | {fmt(m.get('fwd_ratio'))} | "
                         f"{fmt(m.get('fwd_min_ratio'))} | {fmt(m.get('fwd_ratio_nchw'))} | {fmt(m.get('fb_ms'))} | "
                         f"{fmt(m.get('fb_ratio'))} | {fmt(m.get('fb_min_ratio'))} | {fmt(m.get('fb_ratio_nchw'))} | "
                         f"{fmt(m.get('mem_mb'), '.1f')} | {fmt(m.get('mem_ratio'))} | {fmt(m.get('fb_mem_mb'), '.1f')} | "
                         f"{fmt(m.get('fb_mem_ratio'))} |")
        for method, why in r.get("skipped", {}).items():
            lines.append(f"| {r['shape']} | {method} | skipped: {why} | | | | | | | | | |")
    no_gg, no_fb = "gridgraph not run", "forward only, or gridgraph not run"
    lines += ["",
              f"gridgraph vs F.conv2d (best layout): forward geometric mean {x('fwd_geomean', no_gg)} "
              f"(worst {x('fwd_max', no_gg)}), forward+backward geometric mean {x('fb_geomean', no_fb)} "
              f"(worst {x('fb_max', no_fb)}); against NCHW alone {x('fwd_geomean_nchw', no_gg)} and "
              f"{x('fb_geomean_nchw', no_fb)}; "
              f"after DataLoader + .to(device) at most {x('loader_over_graph_max', 'gg-loader not run')} the "
              f"graph's own forward, under torch.compile at most {x('compiled_over_eager_max', 'gg-compiled not run')}"
              f" eager; (best-of times: {x('fwd_best_geomean', no_gg)}, worst {x('fwd_best_max', no_gg)}; "
              f"{x('fb_best_geomean', no_fb)}); "
              f"vs RGCNConv: {x('rgcn_speedup_geomean', 'rgcn not run', '.1f')} faster (forward, geometric mean); "
              f"peak memory at most {x('mem_ratio_max', no_gg)} F.conv2d's (forward), "
              f"{x('fb_mem_ratio_max', no_fb)} (forward+backward)."]
    if construction:
        lines.append(f"Graph construction, {construction['size']}x{construction['size']} image, 3x3 "
                     f"({construction['num_edges']} edges): {construction['cold_ms']:.0f} ms cold "
                     f"(best {min(construction['cold_samples_ms']):.0f} ms), "
                     f"{construction['cached_ms']:.2f} ms cached.")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m != "conv2d" and any(m in r["methods"] for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, key, title in ((axes[0], "fwd_ratio", "forward"), (axes[1], "fb_ratio", "forward + backward")):
        for k, method in enumerate(methods):
            xs, ys = [], []
            for i, r in enumerate(results):
                v = r["methods"].get(method, {}).get(key)
                if v is not None:
                    xs.append(i + (k - (len(methods) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=method)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(2.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels([r["shape"] for r in results], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{title}: time / F.conv2d time")
    axes[0].set_ylabel("ratio to F.conv2d (log)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_shape(shape: Shape, methods: tuple[str, ...], *, timing: bool = True, naive_max_bytes: float = 2 * 2**30,
              rounds: int = 3, budget_s: float = 1.5, threads: int = 2, backward: bool = True, device="cpu",
              compile_backend: str = "inductor") -> dict:
    """Check every method on ``shape`` against ``F.conv2d``; with ``timing``, also time it (forward and
    forward+backward) and measure its peak memory, with ratios to the faster layout of ``conv2d``.
    Returns the result row."""
    methods = tuple(dict.fromkeys(REFERENCES + tuple(methods)))  # both layouts of the reference, always
    conv, image, cases, skipped = build_cases(shape, methods, naive_max_bytes, device=device,
                                              compile_backend=compile_backend)
    x_ref = image.clone().requires_grad_()
    ref = conv(x_ref)
    ref.backward(torch.ones_like(ref))
    ref, ref_gx = ref.detach(), x_ref.grad
    row = {"shape": shape.name, "config": asdict(shape), "describe": shape.describe(), "methods": {},
           "skipped": skipped}
    # gridgraph is timed against conv2d first, interleaved; the slow baselines afterwards, on their
    # own, so that their gigabyte temporaries cannot disturb the comparison that the targets use.
    fast = [n for n in cases if n in FAST_METHODS]
    slow = [n for n in cases if n not in FAST_METHODS]
    for group in (fast, slow):
        group_cases = {n: cases[n] for n in group}
        for name, case in group_cases.items():
            row["methods"][name] = check_case(name, case, ref, ref_gx)
        if not timing:
            continue
        grads = {n: torch.ones_like(c.forward().detach()) for n, c in group_cases.items()}
        fwd = measure({n: _fwd(c) for n, c in group_cases.items()}, rounds, budget_s, threads)
        fb = measure({n: _fb(c, grads[n]) for n, c in group_cases.items()}, rounds, budget_s, threads) \
            if backward else {}
        for name, case in group_cases.items():
            m = row["methods"][name]
            m.update(fwd_ms=statistics.median(fwd[name]) * 1e3, fwd_samples=len(fwd[name]),
                     fwd_min_ms=min(fwd[name]) * 1e3)
            if fb:
                m.update(fb_ms=statistics.median(fb[name]) * 1e3, fb_samples=len(fb[name]),
                         fb_min_ms=min(fb[name]) * 1e3)
            m["mem_mb"] = peak_extra_bytes(_fwd(case), device) / 2**20
            if fb:
                m["fb_mem_mb"] = peak_extra_bytes(_fb(case, grads[name]), device) / 2**20
        del group_cases, grads
    if timing:
        refs = [row["methods"][n] for n in REFERENCES if n in row["methods"]]
        nchw = row["methods"]["conv2d"]

        def best(key):
            values = [r[key] for r in refs if r.get(key) is not None]
            return min(values) if values else None

        row["reference"] = {key: best(key) for key in ("fwd_ms", "fwd_min_ms", "fb_ms", "fb_min_ms", "mem_mb",
                                                      "fb_mem_mb")}
        row["best_layout"] = {mode: min(refs, key=lambda r: r.get(f"{mode}_ms", float("inf"))) is nchw
                              and "NCHW" or "channels-last" for mode in ("fwd", "fb")}
        base = row["reference"]
        for m in row["methods"].values():
            m["fwd_ratio"] = m["fwd_ms"] / base["fwd_ms"]
            m["fwd_min_ratio"] = m["fwd_min_ms"] / base["fwd_min_ms"]
            m["fwd_ratio_nchw"] = m["fwd_ms"] / nchw["fwd_ms"]
            if "fb_ms" in m:
                m["fb_ratio"] = m["fb_ms"] / base["fb_ms"]
                m["fb_min_ratio"] = m["fb_min_ms"] / base["fb_min_ms"]
                m["fb_ratio_nchw"] = m["fb_ms"] / nchw["fb_ms"]
            for key, ratio in (("mem_mb", "mem_ratio"), ("fb_mem_mb", "fb_mem_ratio")):
                if m.get(key) is not None and nchw.get(key):
                    m[ratio] = m[key] / nchw[key]
    return row


def correctness_markdown(results: list[dict]) -> str:
    """The ``--quick`` table: each method's largest error against ``F.conv2d``; no times."""
    lines = ["Correctness only (tiny shapes; nothing is timed): max error relative to max(1, max|F.conv2d|)",
             "",
             "| shape | method | output error | input-gradient error | result |",
             "|---|---|---:|---:|---|"]
    for r in results:
        for method, m in r["methods"].items():
            grad = m.get("grad_rel_error")
            lines.append(f"| {r['shape']} | {method} | {m['max_rel_error']:.1e} | "
                         f"{'-' if grad is None else format(grad, '.1e')} | matches F.conv2d |")
        for method, why in r.get("skipped", {}).items():
            lines.append(f"| {r['shape']} | {method} | skipped: {why} | | |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    shapes = "\n".join(f"  {s.name:<14} {s.describe()}" for s in SHAPES)
    methods = "\n".join(f"  {name:<12} {what}" for name, what in METHOD_HELP.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"shapes (--shapes takes their numbers):\n{shapes}\n\n"
                                            f"methods (--methods takes their names):\n{methods}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes: checks every method against F.conv2d, times nothing")
    parser.add_argument("--threads", type=int, default=2, help="torch threads while timing (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per shape (default: 3)")
    parser.add_argument("--budget", type=float, default=1.5,
                        help="seconds of timing per method, mode and shape, split over the rounds (default: 1.5)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--shapes", default=None, help="comma-separated 1-based shape numbers (default: all)")
    parser.add_argument("--naive-max-gb", type=float, default=2.0,
                        help="skip the naive layer where its per-edge weights exceed this (default: 2)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    parser.add_argument("--no-construction", action="store_true", help="skip the graph construction timing")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of gg-compiled (default: inductor; aot_eager with --quick)")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--device", default="cpu",
                        help="where every method runs (default: cpu); on 'cuda' TF32 is switched off")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        torch.backends.cudnn.allow_tf32 = False  # full float32 on both sides: cuDNN and gridgraph's GEMMs
        torch.backends.cuda.matmul.allow_tf32 = False
    compile_backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")

    _malloc_for_timing()
    torch.set_num_threads(args.threads)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    methods = tuple(dict.fromkeys(REFERENCES + methods))  # both layouts of the reference, always
    if args.rounds < 1 or args.budget <= 0:
        parser.error(f"--rounds must be at least 1 and --budget positive (got {args.rounds}, {args.budget})")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = tuple(shapes[int(k) - 1] for k in args.shapes.split(","))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    info = machine()
    info["load_average_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["memory_measure"] = "peak bytes held by torch's CPU allocator during one call (profiler events)"
    info["device"] = str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)}, TF32 off)"
    if device.type == "cuda":
        info["memory_measure"] = "peak bytes allocated by the CUDA caching allocator during one call"
    results = []
    for shape in shapes:
        row = run_shape(shape, methods, timing=not args.quick, naive_max_bytes=args.naive_max_gb * 2**30,
                        rounds=args.rounds, budget_s=args.budget, threads=args.threads, backward=not args.no_backward,
                        device=device, compile_backend=compile_backend)
        results.append(row)
        if args.quick:
            print(f"  {shape.name}: every method matches F.conv2d", file=sys.stderr, flush=True)
        else:
            print(f"  {shape.name}: " + ", ".join(f"{n} {m['fwd_ratio']:.2f}x" for n, m in row["methods"].items()),
                  file=sys.stderr, flush=True)
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    payload = {"machine": info, "quick": args.quick, "results": results}
    if args.quick:  # tiny shapes say nothing about speed: the errors only, no times, no ratios, no chart
        print(correctness_markdown(results))
        (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
        print(f"\nwrote {out_dir / 'results.json'}", file=sys.stderr)
        return 0
    construction = None if args.no_construction else graph_construction(1024, repeats=3)
    summary = summarise(results)
    print(markdown(results, summary, construction, info))
    payload.update(rounds=args.rounds, budget_s=args.budget, timer="torch.utils.benchmark.Timer.blocked_autorange",
                   summary=summary, graph_construction=construction)
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    plot(results, out_dir / "ratios.png")
    print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'ratios.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
