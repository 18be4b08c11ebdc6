"""benchmarks/run.py and sparse.py: in quick mode every method runs and matches F.conv2d, and nothing is
timed or claimed; the timed path (torch.utils.benchmark.Timer) produces its table, JSON and chart.

These check correctness and the reports' shape, never speed.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run.py"
METHODS = {"conv2d", "conv2d-cl", "gridgraph", "gg-loader", "gg-compiled", "gg-image", "gg-edges", "rgcn", "naive"}
TIMING_WORDS = re.compile(r"\d(\.\d+)?x\b|faster|slower|\bms\b|geometric mean")  # ratios, speed claims, times


def _bench_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import run as bench
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return bench


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out-dir", str(out_dir)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out_dir


def test_quick_run_checks_every_method_on_every_shape(quick_run):
    proc, out_dir = quick_run
    payload = json.loads((out_dir / "results.json").read_text())
    assert payload["quick"] is True
    assert len(payload["results"]) == 7
    for row in payload["results"]:
        assert set(row["methods"]) == METHODS, row["shape"]
        for name, m in row["methods"].items():
            assert m["max_rel_error"] <= 1e-4, (row["shape"], name)
            assert not any(k.endswith(("_ms", "_ratio", "_mb")) for k in m), (row["shape"], name, sorted(m))
        for name in ("gridgraph", "gg-loader", "gg-compiled", "gg-image", "gg-edges"):
            assert row["methods"][name]["grad_rel_error"] <= 1e-4, (row["shape"], name)
    assert "summary" not in payload and "graph_construction" not in payload
    for key in ("torch", "torch_geometric", "threads", "cpu"):
        assert key in payload["machine"]


def test_quick_run_prints_correctness_only(quick_run):
    proc, out_dir = quick_run
    assert "| shape | method | output error | input-gradient error | result |" in proc.stdout
    assert proc.stdout.count("| matches F.conv2d |") == 7 * len(METHODS)
    assert not TIMING_WORDS.search(proc.stdout + proc.stderr), TIMING_WORDS.search(proc.stdout + proc.stderr)
    assert not (out_dir / "ratios.png").exists()


def test_timed_path_reports_times_ratios_and_draws_the_chart(tmp_path):
    """The full suite's path on one tiny shape with a tiny budget: the numbers are noise, the shape of the
    report is what is checked."""
    bench = _bench_module()
    row = bench.run_shape(bench.QUICK_SHAPES[0], ("conv2d", "gridgraph", "gg-edges"), rounds=2, budget_s=0.02,
                          threads=1)
    for name, m in row["methods"].items():
        assert m["max_rel_error"] <= 1e-4
        assert 0 < m["fwd_min_ms"] <= m["fwd_ms"] and 0 < m["fb_min_ms"] <= m["fb_ms"]
        assert m["fwd_samples"] >= 2 and m["fb_samples"] >= 2  # Timer blocks, from both rounds
        assert m["fwd_ratio"] > 0 and m["mem_mb"] >= 0
    refs = (row["methods"]["conv2d"]["fwd_ms"], row["methods"]["conv2d-cl"]["fwd_ms"])
    assert row["reference"]["fwd_ms"] == min(refs)  # the faster layout is the reference
    assert min(row["methods"][n]["fwd_ratio"] for n in ("conv2d", "conv2d-cl")) == 1.0
    assert row["methods"]["conv2d"]["fwd_ratio_nchw"] == 1.0
    table = bench.markdown([row], bench.summarise([row]), None, bench.machine())
    assert "| shape | method | fwd ms | fwd x best |" in table and "forward geometric mean" in table
    bench.plot([row], tmp_path / "ratios.png")
    png = (tmp_path / "ratios.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_measure_times_with_the_torch_timer():
    bench = _bench_module()
    calls = []
    samples = bench.measure({"a": lambda: calls.append(1), "b": lambda: sum(range(1000))}, rounds=2, budget_s=0.02,
                            threads=1)
    assert set(samples) == {"a", "b"} and all(len(v) >= 2 and min(v) > 0 for v in samples.values())
    assert len(calls) > len(samples["a"])  # blocks of several calls: the timer chose a block size


def test_sparse_quick_run_is_correctness_only():
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "sparse.py"), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| matches F.conv2d |") == 6  # 3 occupancies x (stride 1, stride 2)
    assert "correctness only (nothing is timed)" in proc.stdout
    body = proc.stdout.split("\n", 1)[1]  # past the environment line
    assert not TIMING_WORDS.search(body), TIMING_WORDS.search(body)


def test_naive_baseline_and_rgcn_peer_equal_conv2d():
    """The two PyG baselines are set up as the convolution (checked here at float64 directly)."""
    import torch

    bench = _bench_module()
    from gridgraph import image_to_graph

    torch.manual_seed(0)
    for groups, stride in ((1, 1), (2, 2)):
        conv = torch.nn.Conv2d(4, 6, 3, stride=stride, padding=1, groups=groups).double()
        images = torch.randn(2, 4, 7, 6, dtype=torch.float64)
        g = image_to_graph(images, conv)
        ref = conv(images).permute(0, 2, 3, 1).reshape(-1, 6)
        naive = bench.NaiveEdgeConv(conv)
        torch.testing.assert_close(naive(g.x, g.edge_index, g.edge_type, g.size()), ref)
        rgcn = bench.rgcn_from_conv(conv).double()
        dst = g.x.new_empty(g.size(1), 0)
        torch.testing.assert_close(rgcn((g.x, dst), g.edge_index, g.edge_type), ref)
