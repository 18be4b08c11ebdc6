"""The layer verification report and the ``gridgraph verify`` command."""
import subprocess
import sys

import pytest
import torch

from gridgraph.cli import main
from gridgraph.verify import (LAYER_CASES, QUICK_LAYER_CASES, CaseResult, LayerCase, LayerReport,
                              check_layer_case, verify_layers)


def test_builtin_table_covers_the_configuration_space():
    kernels = {c.kernel_size for c in LAYER_CASES}
    assert {1, 2, 3, 5, 7, (1, 7), (3, 2)} <= kernels
    assert {c.padding_mode for c in LAYER_CASES} == {"zeros", "reflect", "replicate", "circular"}
    assert {"same", "valid"} <= {c.padding for c in LAYER_CASES if isinstance(c.padding, str)}
    assert {1, 2, 3} <= {c.stride for c in LAYER_CASES if isinstance(c.stride, int)}
    assert {1, 2, 3} <= {c.dilation for c in LAYER_CASES if isinstance(c.dilation, int)}
    assert any(c.groups == c.in_channels for c in LAYER_CASES)
    assert any(c.groups == c.in_channels and c.out_channels > c.in_channels for c in LAYER_CASES)
    assert any(not c.bias for c in LAYER_CASES) and any(c.batch == 0 for c in LAYER_CASES)
    assert set(QUICK_LAYER_CASES) <= set(LAYER_CASES)


def test_check_layer_case_covers_both_paths_and_passes():
    results = check_layer_case(LayerCase(3, 4, 3, stride=2, padding=1, groups=1), torch.float64)
    assert [r.path for r in results] == ["table", "edges"]
    for r in results:
        assert r.passed and r.forward_error < 1e-12 and r.gradient_error < 1e-12


def test_report_fails_on_a_mismatch():
    case = LayerCase(1, 1, 1)
    good = CaseResult(case, "cpu", torch.float64, "table", 1e-16, 1e-16, 1e-10)
    bad = CaseResult(case, "cpu", torch.float64, "edges", 1e-3, 0.0, 1e-10)
    report = LayerReport([good, bad])
    assert not report.passed
    assert "FAIL" in report.table() and report.summary().startswith("FAIL (1 mismatches)")
    assert LayerReport([good]).passed


def test_verify_layers_float32_within_tolerance():
    report = verify_layers(QUICK_LAYER_CASES[:4], dtypes=[torch.float32], devices=["cpu"], seed=3)
    assert report.passed, str(report)
    assert len(report.results) == 8


def test_cli_verify_quick_float64(capsys):
    assert main(["verify", "--quick", "--dtype", "float64", "--device", "cpu", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "| configuration |" in out and out.strip().splitlines()[-1].startswith("PASS")


def test_cli_rejects_unavailable_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["verify", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "gridgraph", "verify", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--quick" in proc.stdout
