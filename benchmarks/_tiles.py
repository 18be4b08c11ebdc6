"""The tiled and spatially parallel part of ``benchmarks/scale.py --tiled`` (issue 22): peak memory and time of
whole vs tiled runs against the image size, the two memory bounds, and spatial parallel on 1, 2, 4 processes.

Every measurement runs in a fresh Python process (``scale.py --child SPEC``): the network and its input are
built first, then the process's peak resident memory is reset (``/proc/self/clear_refs``) and one
forward+backward runs; the peak growth is the peak resident set (``VmHWM``) minus the resident set just before
the call. The tiled run is checked against the whole run on a small image of the same network first (float64,
output and gradients to 1e-12).
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import gridgraph as gg

HERE = Path(__file__).resolve().parent


def chain6() -> nn.Module:
    """Six 3x3 convolutions with 16 channels and ReLU (the first memory bound's network)."""
    layers: list = []
    for i in range(6):
        layers += [nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


class SmallResNet(nn.Module):
    """A small ResNet-style classifier: strided stem, max pooling, two residual blocks, a strided projection,
    global average pooling, a linear head (the second memory bound's network)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 7, stride=2, padding=3)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.a1, self.a2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.down, self.project = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Conv2d(16, 32, 1, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        x = torch.relu(x + self.b2(torch.relu(self.b1(x))))
        x = torch.relu(self.down(x) + self.project(x))
        return self.fc(x.mean((2, 3)))


NETWORKS = {"chain6": chain6, "resnet": SmallResNet}


def _rss() -> tuple[int, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    torch.set_num_threads(spec.get("threads", 2))
    torch.manual_seed(0)
    net = gg.convert(NETWORKS[spec["net"]]()).eval()
    side = spec["side"]
    x = torch.randn(1, 3, side, side).requires_grad_(spec["input_grad"])
    run = gg.tiled(net, spec["tile"]) if spec["mode"] == "tiled" else net
    if spec["net"] == "chain6":
        out_shape = (1, 16, side, side)
        grad = torch.ones(out_shape)  # the upstream gradient exists before the call, as it would in training
    else:
        grad = None
    warm = torch.randn(1, 3, 96, 96, requires_grad=spec["input_grad"])  # compiled kernels and plans exist first
    out = run(warm)
    (out.sum() if grad is None else out.square().sum()).backward()
    del warm, out
    import gc
    gc.collect()
    before, _ = _rss()
    reset = _reset_peak()
    start = time.perf_counter()
    y = run(x)
    if grad is None:
        y.sum().backward()
    else:
        y.backward(grad)
    seconds = time.perf_counter() - start
    _, peak = _rss()
    return {**spec, "seconds": seconds, "peak_growth": peak - before, "rss_before": before, "peak_rss": peak,
            "peak_reset": reset}


def _run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "scale.py"), "--child", json.dumps(spec)], capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        return {**spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _estimate_whole(net: str, side: int, input_grad: bool) -> float:
    """Bytes a whole forward+backward holds at its peak (an estimate, to skip sizes that would not fit)."""
    pixels = side * side
    if net == "chain6":
        return 4.0 * pixels * (16 * 6 * 3 + 3 * (2 if input_grad else 1))
    return 4.0 * pixels * (3 + 16 * 4 / 4 + 16 * 14 / 16 + 32 * 6 / 64) * 1.5


def check_exact() -> float:
    """float64: tiled equals whole on a small image for both networks (output, input and weight gradients)."""
    worst = 0.0
    for name, factory in NETWORKS.items():
        torch.manual_seed(0)
        net = gg.convert(factory()).double().eval()
        x = torch.randn(2, 3, 45, 38, dtype=torch.float64)
        results = []
        for run in (net, gg.tiled(net, 8 if name == "chain6" else 3)):
            xi = x.clone().requires_grad_()
            y = run(xi)
            g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
            results.append([y.detach()] + list(torch.autograd.grad((y * g).sum(), [xi] + list(net.parameters()))))
        for a, b in zip(*results):
            worst = max(worst, (a - b).abs().max().item() / max(1.0, b.abs().max().item()))
    return worst


# ------------------------------------------------------------------------------------ spatial parallel
def _parallel_worker(rank: int, world: int, port: int, side: int, threads: int, queue) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = gg.convert(chain6()).eval()
    x = torch.randn(1, 3, side, side)
    band = torch.tensor_split(x, world, dim=2)[rank].clone().requires_grad_()
    del x
    parallel = gg.spatial_parallel(net)
    warm = torch.tensor_split(torch.randn(1, 3, 96, 96), world, dim=2)[rank].requires_grad_()
    parallel(warm).square().sum().backward()  # compiled kernels and plans exist first
    del warm
    grad = torch.ones(1, 16, band.size(2), side)
    dist.barrier()
    before, _ = _rss()
    _reset_peak()
    start = time.perf_counter()
    parallel(band).backward(grad)
    seconds = time.perf_counter() - start
    _, peak = _rss()
    dist.barrier()
    queue.put((rank, seconds, peak - before))
    dist.destroy_process_group()


def parallel_row(world: int, side: int) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 2) // world)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_parallel_worker, args=(r, world, port, side, threads, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=3600) for _ in range(world))
    for p in procs:
        p.join()
    return {"processes": world, "side": side, "threads_per_process": threads,
            "seconds": max(r[1] for r in results), "peak_growth_max": max(r[2] for r in results),
            "peak_growth_sum": sum(r[2] for r in results)}


# ------------------------------------------------------------------------------------ the run
def run(quick: bool, threads: int, max_gb: float, out_dir: Path) -> dict:
    error = check_exact()
    payload: dict = {"exactness_float64": error, "threads": threads, "curve": [], "bounds": {}, "parallel": []}
    print(f"tiled vs whole, float64 (output, input and weight gradients): max relative difference {error:.1e}",
          file=sys.stderr, flush=True)
    if quick:
        return payload
    mib = 2 ** 20
    # bound 1: six 3x3 16-channel convolutions + ReLU, 3x2048x2048, forward+backward with the input gradient
    spec = {"net": "chain6", "side": 2048, "input_grad": True, "tile": 256, "threads": threads}
    whole = _run_child({**spec, "mode": "whole"})
    tiled = _run_child({**spec, "mode": "tiled"})
    payload["bounds"]["chain6_2048"] = {"whole": whole, "tiled": tiled,
                                        "ratio": tiled["peak_growth"] / whole["peak_growth"]}
    print(f"chain6 2048: whole {whole['peak_growth'] / mib:.0f} MiB, tiled {tiled['peak_growth'] / mib:.0f} MiB",
          file=sys.stderr, flush=True)
    # bound 2: 8192x8192 RGB through the small ResNet, no input gradient, weight gradients
    big = _run_child({"net": "resnet", "side": 8192, "input_grad": False, "tile": 128, "threads": threads,
                      "mode": "tiled"})
    payload["bounds"]["resnet_8192"] = big
    print(f"resnet 8192 tiled: {big.get('peak_growth', 0) / mib:.0f} MiB growth, {big.get('seconds', 0):.0f} s",
          file=sys.stderr, flush=True)
    # the curve: the small ResNet, forward+backward (weight gradients), 512 to 8192
    for side in (512, 1024, 2048, 4096, 8192):
        row = {"side": side}
        for mode in ("whole", "tiled"):
            estimate = _estimate_whole("resnet", side, False)
            if mode == "whole" and estimate > max_gb * 2 ** 30:
                row[mode] = {"skipped": f"estimated {estimate / 2**30:.0f} GiB > {max_gb:g} GiB"}
                continue
            if mode == "tiled" and side == 8192:
                row[mode] = big
                continue
            row[mode] = _run_child({"net": "resnet", "side": side, "input_grad": False, "tile": 128,
                                    "threads": threads, "mode": mode})
        payload["curve"].append(row)
        print(f"curve {side}: " + ", ".join(f"{m} {row[m].get('peak_growth', 0) / mib:.0f} MiB "
                                            f"{row[m].get('seconds', 0):.1f} s" for m in ("whole", "tiled")),
              file=sys.stderr, flush=True)
    for world in (1, 2, 4):
        row = parallel_row(world, 2048)
        payload["parallel"].append(row)
        print(f"spatial parallel x{world}: {row['seconds']:.1f} s, max {row['peak_growth_max'] / mib:.0f} MiB "
              "per process", file=sys.stderr, flush=True)
    return payload


def markdown(payload: dict) -> str:
    mib = 2 ** 20
    lines = [f"Tiled vs whole, float64, output and gradients: max relative difference "
             f"{payload['exactness_float64']:.1e}", ""]
    bounds = payload.get("bounds", {})
    if "chain6_2048" in bounds:
        b = bounds["chain6_2048"]
        lines += ["| memory bound | whole | tiled | result |", "|---|---:|---:|---|",
                  f"| 6 x (3x3 conv, 16 ch, ReLU), 3x2048x2048, fwd+bwd with input gradient, tiles 256 | "
                  f"{b['whole']['peak_growth'] / mib:.0f} MiB, {b['whole']['seconds']:.1f} s | "
                  f"{b['tiled']['peak_growth'] / mib:.0f} MiB, {b['tiled']['seconds']:.1f} s | "
                  f"{b['ratio']:.3f} of whole (target < 1/3) |"]
        r = bounds["resnet_8192"]
        lines.append(f"| small ResNet, 3x8192x8192, fwd+bwd (weight gradients), tiles 128 | not run | "
                     f"{r.get('peak_growth', 0) / mib:.0f} MiB growth (peak RSS {r.get('peak_rss', 0) / mib:.0f} "
                     f"MiB), {r.get('seconds', 0):.0f} s | target < 4096 MiB |")
    if payload.get("curve"):
        lines += ["", "| side | whole: peak growth, time | tiled (128): peak growth, time |", "|---:|---:|---:|"]
        for row in payload["curve"]:
            cells = []
            for m in ("whole", "tiled"):
                v = row[m]
                cells.append(v["skipped"] if "skipped" in v else
                             f"{v['peak_growth'] / mib:.0f} MiB, {v['seconds']:.1f} s" if "peak_growth" in v
                             else v.get("error", "n/a"))
            lines.append(f"| {row['side']} | {cells[0]} | {cells[1]} |")
    if payload.get("parallel"):
        lines += ["", "| processes | threads each | time (fwd+bwd, 2048x2048, chain6) | peak growth per process (max) |",
                  "|---:|---:|---:|---:|"]
        for row in payload["parallel"]:
            lines.append(f"| {row['processes']} | {row['threads_per_process']} | {row['seconds']:.1f} s | "
                         f"{row['peak_growth_max'] / mib:.0f} MiB |")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    for mode, style in (("whole", "o-"), ("tiled", "s-")):
        rows = [r for r in payload["curve"] if "peak_growth" in r[mode]]
        sides = [r["side"] for r in rows]
        ax1.plot(sides, [r[mode]["peak_growth"] / 2**30 for r in rows], style, label=mode)
        ax2.plot(sides, [r[mode]["seconds"] for r in rows], style, label=mode)
    for ax, label in ((ax1, "peak memory growth (GiB)"), (ax2, "forward+backward (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("image side (pixels)")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("small ResNet, whole vs tiled (128-pixel tiles of the pooled grid), float32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
