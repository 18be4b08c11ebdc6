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


def _spconv_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("spconv") is not None


def test_sparse_quick_run_checks_the_spconv_peer_or_says_it_is_skipped():
    """With spconv installed, the quick run compares gridgraph and spconv's SubMConv2d with F.conv2d at each
    occupancy; without it, it says so and still checks gridgraph."""
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "sparse.py"), "--quick", "--threads", "1", "--only-spconv"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if _spconv_installed():
        assert proc.stdout.count("| matches F.conv2d and spconv |") == 3, proc.stdout
    else:
        assert "spconv peer: skipped: spconv is not installed" in proc.stdout, proc.stdout
    assert "| matches F.conv2d |" not in proc.stdout  # --only-spconv: no dense comparison
    body = proc.stdout.split("\n", 1)[1]
    assert not TIMING_WORDS.search(body), TIMING_WORDS.search(body)


def _script_module(name: str):
    """Import ``benchmarks/<name>.py`` under a private module name (no clash with installed packages)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_gridgraph_bench_{name}", SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sparse_peer_reports_a_missing_spconv(monkeypatch):
    sparse = _script_module("sparse")
    monkeypatch.setitem(sys.modules, "spconv", None)  # import spconv now raises ImportError
    result = sparse.run_spconv(32, 2, [0.5], 0.1, 1, 0, timing=False)
    assert result["rows"] == [] and "spconv is not installed" in result["skipped"]
    assert sparse.spconv_markdown(result).startswith("spconv peer: skipped: spconv is not installed")


def test_scale_quick_run_is_correctness_only(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "scale.py"), "--quick", "--threads", "1",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "scale.json").read_text())
    assert payload["quick"] is True and len(payload["rows"]) == 4  # 2 channel counts x 2 sides
    for row in payload["rows"]:
        assert max(row["max_rel_error"].values()) <= 1e-4 and max(row["grad_rel_error"].values()) <= 1e-4
        assert not any(k in row for k in ("fb_ms", "time_ratio", "peak_mb")), sorted(row)
    assert proc.stdout.count("| matches F.conv2d |") == 4
    assert not TIMING_WORDS.search(proc.stdout + proc.stderr), TIMING_WORDS.search(proc.stdout + proc.stderr)
    assert not (tmp_path / "scale.png").exists()


def test_scale_timed_path_reports_ratios_and_draws_the_plot(tmp_path):
    """One tiny size with a tiny budget: the numbers are noise; the report's shape is what is checked."""
    scale = _script_module("scale")
    row = scale.measure_size(16, 2, rounds=2, budget_s=0.02, timing=True)
    assert row["reference"] in ("conv2d-nchw", "conv2d-cl")
    assert row["time_ratio"] > 0 and row["memory_ratio"] > 0 and min(row["samples"].values()) >= 2
    payload = {"machine": bench_machine(), "rounds": 2, "rows": [row, {"side": 32, "channels": 2, "skipped": "x"}]}
    table = scale.markdown(payload)
    assert "| 2 | 16 |" in table and "| 2 | 32 | skipped: x |" in table
    scale.plot(payload, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert scale.needed_bytes(4096, 64, "structure") > scale.needed_bytes(2048, 64, "plain") > 4 * 2**30
    structure = scale.measure_size(16, 2, rounds=1, budget_s=0.01, timing=True, call="structure")
    assert structure["call"] == "structure" and structure["max_rel_error"]["gridgraph"] <= 1e-4
    assert "| 2 | 16 (structure call) |" in scale.markdown({**payload, "rows": [structure]})


def bench_machine():
    return _bench_module().machine() | {"load_average_start": None, "load_average_end": None}


GPU_SCRIPT = SCRIPT.parent / "gpu.sh"


def test_gpu_script_parses_and_dry_runs_the_four_steps():
    assert subprocess.run(["bash", "-n", str(GPU_SCRIPT)], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(GPU_SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "gridgraph verify --device cuda" in lines[1]
    assert "pytest" in lines[2] and "-k cuda" in lines[2]
    assert "benchmarks/run.py --device cuda" in lines[3] and "--budget" in lines[3]
    assert "benchmarks/networks.py --device cuda" in lines[4]
    limits = [int(re.search(r"limit (\d+)s", line).group(1)) for line in lines[1:5]]
    assert limits[3] < 5 * 60  # the whole-network benchmark is cut at its limit: under 5 minutes


def test_gpu_script_runs_its_steps_on_the_cpu(tmp_path):
    """DEVICE=cpu runs quick stand-ins of the same four steps and writes the logs and the summary."""
    env = {**__import__("os").environ, "DEVICE": "cpu", "OUT_DIR": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(GPU_SCRIPT)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.count(" passed in ") == 4, summary
    for name in ("verify.log", "tests.log", "bench.log", "networks.log", "environment.txt", "bench/results.json",
                 "networks/networks.json"):
        assert (tmp_path / name).is_file(), name
    assert "PASS" in (tmp_path / "verify.log").read_text()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without a GPU")
def test_run_refuses_cuda_without_a_gpu():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cuda"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "no CUDA device is available" in proc.stderr


NETWORKS = SCRIPT.parent / "networks.py"


def test_networks_quick_run_checks_the_cases_it_can_build(tmp_path):
    """The whole-network benchmark's correctness run: the U-Net and the per-call case (no timm needed) are
    converted and checked in float64 before anything would be timed; every convolution call is counted by
    path; a timm case without timm is reported as skipped, not failed."""
    import json

    proc = subprocess.run([sys.executable, str(NETWORKS), "--quick", "--cases", "unet-b1,unet-b1-train,tiny-conv,resnet18-b1",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "networks.json").read_text())
    cases = {r["name"]: r for r in result["passes"][0]}
    for name in ("unet-b1", "unet-b1-train", "tiny-conv"):
        assert cases[name]["passed"] and cases[name]["output_error"] < 1e-12, cases[name]
        assert set(cases[name]["paths"]) == {"image"}, cases[name]["paths"]  # the eager kernels, no fallback
    assert cases["unet-b1"]["paths"]["image"] == 13  # every convolution of the (quick) U-Net, transposed included
    assert cases["unet-b1-train"]["input_grad_error"] < 1e-12 and cases["unet-b1-train"]["weight_grad_error"] < 1e-12
    try:
        import timm  # noqa: F401
    except ImportError:
        assert "skipped" in cases["resnet18-b1"]
    assert "nan" not in proc.stdout.lower()


def test_gnn_benchmark_quick_checks_every_network():
    script = ROOT / "benchmarks" / "gnn.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "network" not in line]
    assert {r.split("|")[1].strip() for r in rows} >= {"ResNetish", "MobileNetish", "UNet", "DilatedSegmenter"}
    assert all("FAILED" not in r and "n/a (checked, not timed)" in r for r in rows)
    assert not TIMING_WORDS.search(proc.stdout.split("|---|")[-1].replace("n/a", ""))
