"""benchmarks/run.py in quick mode: every method runs and matches F.conv2d; outputs are written.

Quick mode times nothing worth reading; this checks correctness and the report's shape, never speed.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run.py"
METHODS = {"conv2d", "gridgraph", "gg-image", "gg-edges", "rgcn", "naive"}


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
            assert m["fwd_ms"] > 0 and m["fb_ms"] > 0
            assert m["fwd_ratio"] > 0 and m["fb_ratio"] > 0
        for name in ("gridgraph", "gg-image", "gg-edges"):
            assert row["methods"][name]["grad_rel_error"] <= 1e-4, (row["shape"], name)
    construction = payload["graph_construction"]
    assert construction["num_edges"] > 0 and construction["cold_ms"] > 0
    for key in ("torch", "torch_geometric", "threads", "cpu"):
        assert key in payload["machine"]


def test_quick_run_prints_table_and_draws_chart(quick_run):
    proc, out_dir = quick_run
    assert "| shape | method | fwd ms | fwd x conv |" in proc.stdout
    assert "gridgraph vs F.conv2d: forward geometric mean" in proc.stdout
    png = (out_dir / "ratios.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_naive_baseline_and_rgcn_peer_equal_conv2d():
    """The two PyG baselines are set up as the convolution (checked here at float64 directly)."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import run as bench
    finally:
        sys.path.remove(str(SCRIPT.parent))
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
