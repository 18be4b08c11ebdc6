"""The layer verification report and the ``gridgraph verify`` command."""
import json
import re
import subprocess
import sys

import pytest
import torch

from gridgraph.cli import QUICK_MODELS, main
from gridgraph.models import REFERENCE_MODELS
from gridgraph.verify import (LAYER_CASES, QUICK_BEYOND_CASES, QUICK_LAYER_CASES, CaseResult, LayerCase, LayerReport,
                              check_layer_case, verify_layers)
from _text import assert_aligned


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
    assert "FAIL" in report.table()
    assert report.summary().startswith("FAIL (1 mismatch): 2 checks of 1 configuration in ")
    assert LayerReport([good]).passed


def test_verify_layers_float32_within_tolerance():
    report = verify_layers(QUICK_LAYER_CASES[:4], dtypes=[torch.float32], devices=["cpu"], seed=3)
    assert report.passed, str(report)
    assert len(report.results) == 8


def test_cli_verify_quick_float64(capsys):
    assert main(["verify", "--quick", "--dtype", "float64", "--device", "cpu", "--seed", "1", "--verbose"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    tables = assert_aligned(out)  # every row has the header's cells, and the columns line up
    layers, beyond = tables[:2]
    assert layers[0] == ["configuration", "input", "device", "dtype", "path", "max err fwd", "max err grad", "result"]
    assert len(layers) - 1 == 2 * len(QUICK_LAYER_CASES) and len(beyond) - 1 == 2 * len(QUICK_BEYOND_CASES)
    assert {(row[2], row[3], row[7]) for row in layers[1:] + beyond[1:]} == {("cpu", "float64", "pass")}
    assert {row[1] for row in layers[1:]} == {c.describe_input() for c in QUICK_LAYER_CASES}
    # titles read as sentences; no 'x all x cpu', no 'output output'
    assert " x all x " not in out and "output output" not in out
    assert "12 configurations, float64, on cpu (seed 1, TF32 off)" in out
    assert "4 reference networks converted with gridgraph.convert, float64, on cpu, train mode" in out
    # the summary: one line per section, then the verdict
    lines = out.strip().splitlines()
    start = lines.index("Summary")
    assert [line.split("  ")[1] for line in lines[start + 1:-1]] == ["layers", "beyond the grid", "attention", "models"]
    assert all(re.search(r"  PASS: \d+ (checks|model checks)", line) for line in lines[start + 1:-1])
    assert all(len(line) < 200 for line in lines), max(lines, key=len)
    assert lines[-1].startswith("PASS: layers, beyond the grid, attention and models; total ")
    # every network's time is measured: none reads 0
    times = re.findall(r"PASS \S+ \(train\) \[float64, cpu\]: .*; ([0-9.]+) (ms|s)$", out, flags=re.M)
    assert len(times) == len(QUICK_MODELS) == 4 and all(float(t) > 0 for t, _ in times)
    assert out.count("### ") == len(QUICK_MODELS)  # --verbose: each network layer by layer
    # progress on stderr: one line per dtype and device of each section and one per network
    progress = captured.err.strip().splitlines()
    assert len(progress) == 3 + len(QUICK_MODELS)
    assert re.fullmatch(rf"\[ *[0-9.]+s\] layers, float64 on cpu: PASS, {2 * len(QUICK_LAYER_CASES)} checks in "
                        r"[0-9.]+ m?s", progress[0]), progress[0]
    assert progress[-1].split("] ", 1)[1].startswith(f"{QUICK_MODELS[-1]} (train) [float64, cpu]: PASS in ")


def test_cli_json_report_to_a_file_and_to_stdout(tmp_path, capsys):
    path = tmp_path / "report.json"
    argv = ["verify", "--quick", "--dtype", "float64", "--device", "cpu", "--reference", "resnet", "--no-progress"]
    assert main(argv + ["--json", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "Summary" in captured.out
    report = json.loads(path.read_text())
    assert report["passed"] is True and report["exit_code"] == 0 and report["error"] is None
    assert report["gridgraph"].startswith("gridgraph ") and report["command"][:2] == ["gridgraph", "verify"]
    assert report["devices"] == ["cpu"] and report["dtypes"] == ["float64"]
    assert set(report["sections"]) == {"layers", "beyond", "attention", "models"}
    layers = report["sections"]["layers"]["results"]
    assert len(layers) == 2 * len(QUICK_LAYER_CASES)
    assert all(r["passed"] and 0 <= r["forward_error"] <= r["tolerance"] for r in layers)
    (model,) = report["sections"]["models"]["reports"]
    assert model["name"] == "resnet (train)" and model["passed"] and model["seconds"] > 0
    assert [c["name"] for c in model["outputs"]] == ["output"] and model["gradients"]

    # '-': the JSON alone on stdout, the tables on stderr
    assert main(argv + ["--only", "models", "--json", "-"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["passed"] is True and list(report["sections"]) == ["models"]
    assert "PASS resnet (train) [float64, cpu]: " in captured.err


def test_cli_json_report_of_a_failure_and_of_an_error(tmp_path, capsys, monkeypatch):
    from gridgraph import verify as verify_module

    path = tmp_path / "report.json"
    monkeypatch.setitem(verify_module.TOLERANCES, torch.float64, 0.0)  # every rounding difference now fails
    assert main(["verify", "--only", "layers", "--quick", "--dtype", "float64", "--device", "cpu",
                 "--no-progress", "--json", str(path)]) == 1
    report = json.loads(path.read_text())
    assert report["passed"] is False and report["exit_code"] == 1
    assert not report["sections"]["layers"]["passed"]
    assert any(not r["passed"] for r in report["sections"]["layers"]["results"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "FAIL in layers, beyond the grid and attention (exit code 1)")
    assert main(["verify", "--threads", "0", "--json", str(path)]) == 2
    report = json.loads(path.read_text())
    assert report["exit_code"] == 2 and report["error"] == "--threads must be at least 1 (got 0)"


def test_cli_help_documents_the_exit_codes():
    proc = subprocess.run([sys.executable, "-m", "gridgraph", "verify", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "exit codes:" in proc.stdout
    for line in ("0  every check passed", "1  a mismatch", "2  a usage error"):
        assert line in proc.stdout


def test_cli_rejects_unavailable_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["verify", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "gridgraph", "verify", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--quick" in proc.stdout


def test_cli_verify_output_fits_two_screens(capsys):
    """Without --verbose: a line per section and per network, the summary; failures would add their rows."""
    assert main(["verify", "--device", "cpu", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) <= 100, len(lines)
    assert "### " not in "\n".join(lines) and "| configuration" not in "\n".join(lines)
    assert sum(line.startswith("  PASS ") for line in lines) == 2 * 2 * len(REFERENCE_MODELS)  # dtypes x modes
    assert lines[-1].startswith("PASS: layers, beyond the grid, attention and models; total ")
