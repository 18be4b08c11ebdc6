"""verify_model / ModelReport and the model mode of ``gridgraph verify``.

The report must pass exact twins, and must fail (pointing at the right layer) when a converted layer's
forward or gradient is wrong; it must leave both models as it found them.
"""
from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from torch import nn

from gridgraph import verify as verify_module
from gridgraph.cli import main
from gridgraph.conversion import convert
from gridgraph.models import REFERENCE_MODELS
from gridgraph.verify import ModelReport, check_model, load_model, verify_model, verify_reference_models
from _text import assert_aligned


@pytest.fixture(autouse=True)
def _quiet_torch_same_padding_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        yield


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, groups=4), nn.ReLU(), nn.Conv2d(8, 4, 1))


def test_report_passes_exact_twins_with_a_row_per_layer():
    net = small_net().double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    report = verify_model(net, convert(net), x, grads=True, name="small")
    assert isinstance(report, ModelReport) and report.passed
    assert [r.name for r in report.layers] == ["0", "3", "5"]
    assert report.layers[1].configuration == "8->8 k3x3 s2x2 p0x0 d1x1 zeros g4"
    assert report.layers[1].grid == "9x9 -> 4x4"
    assert all(r.alone < 1e-12 and r.in_network < 1e-12 and r.weight_grad < 1e-12 for r in report.layers)
    names = [c.name for c in report.gradients]
    assert names == [n for n, _ in net.named_parameters()] + ["input"]  # every parameter, then the input
    assert report.max_gradient_error < 1e-12 and report.max_output_error < 1e-12
    text = str(report)
    (table,) = assert_aligned(text)
    assert table[0] == ["layer", "configuration", "grid", "err alone", "err in network", "grad err (w, b)", "tol",
                        "result"]
    assert [row[0] for row in table[1:]] == ["0", "3", "5"] and [row[-1] for row in table[1:]] == ["pass"] * 3
    assert text.splitlines()[-1].startswith("PASS small [float64, cpu]")


def test_a_wrong_layer_fails_and_is_pinpointed():
    net = small_net()
    twin = convert(net)
    with torch.no_grad():
        twin[3].weight[0, 0, 1, 1] += 1e-3  # a bug in one converted layer
    report = verify_model(net, twin, torch.randn(2, 3, 9, 9))
    assert not report.passed
    rows = {r.name: r for r in report.layers}
    assert rows["0"].passed
    assert not rows["3"].passed and rows["3"].alone > 1e-4  # wrong by itself
    assert rows["5"].alone < 1e-5 < rows["5"].in_network  # only wrong because its input is
    (table,) = assert_aligned(report.table())
    assert [(row[0], row[-1]) for row in table[1:]] == [("0", "pass"), ("3", "FAIL"), ("5", "FAIL")]
    assert report.summary().startswith("FAIL")


def test_a_wrong_gradient_fails_although_the_forward_is_exact():
    net = small_net()
    twin = convert(net)
    twin[3].weight.register_hook(lambda g: g * 1.001)  # gradient bug only
    report = verify_model(net, twin, torch.randn(2, 3, 9, 9), grads=True)
    assert all(r.alone <= r.tolerance and r.in_network <= r.tolerance for r in report.layers)
    assert not report.passed
    failed = [c.name for c in report.gradients if not c.passed]
    assert failed == ["3.weight"]
    assert not next(r for r in report.layers if r.name == "3").passed
    assert "FAILED: 3.weight" in report.details()


def test_models_are_left_as_found_and_dropout_masks_agree():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.Conv2d(8, 2, 1))
    twin = convert(net)
    before = [b.clone() for b in net.buffers()] + [b.clone() for b in twin.buffers()]
    report = verify_model(net, twin, torch.randn(2, 3, 8, 8), grads=True)
    assert report.passed, str(report)  # training mode: same dropout mask in both runs
    after = list(net.buffers()) + list(twin.buffers())
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # running statistics restored
    assert all(p.grad is None for p in list(net.parameters()) + list(twin.parameters()))


def test_shared_layer_called_twice_and_structured_outputs():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.shared(self.shared(x))
            return {"logits": self.head(y).mean((2, 3)), "aux": (y, y.sum())}

    torch.manual_seed(0)
    net = TwoHeads().double()
    report = verify_model(net, convert(net), torch.randn(3, 4, 5, 6, dtype=torch.float64), grads=True)
    assert report.passed
    assert [r.name for r in report.layers] == ["shared (call 1)", "shared (call 2)", "head"]
    assert [c.name for c in report.outputs] == ["output['aux'][0]", "output['aux'][1]", "output['logits']"]


def test_verify_model_rejects_bad_arguments():
    net = small_net()
    x = torch.randn(2, 3, 9, 9)
    with pytest.raises(ValueError, match=r"contains no converted layer; did you pass gridgraph.convert\(original\)"):
        verify_model(net, net, x)
    with pytest.raises(TypeError, match=r"converted must be an nn.Module \(got str\)"):
        verify_model(net, "twin", x)
    with pytest.raises(TypeError, match="example_input must be a Tensor or a tuple of Tensors"):
        verify_model(net, convert(net), [[1.0]])
    other = convert(nn.Sequential(nn.Linear(2, 2), nn.Conv2d(3, 8, 3)))
    with pytest.raises(ValueError, match=r"converted layer '1' has no Conv2d of the same name in original"):
        verify_model(net, other, x)
    with pytest.raises(ValueError, match="no default tolerance for inputs of dtype torch.float16; pass tol"):
        verify_model(net.half(), convert(net), x.half())


def test_verify_reference_models_and_check_model():
    reports = verify_reference_models(["squeeze_excite"], dtypes=[torch.float32], devices=["cpu"], modes=["eval"])
    assert [r.name for r in reports] == ["squeeze_excite (eval)"] and reports[0].passed
    assert any(r.grid == "1x1 -> 1x1" for r in reports[0].layers)  # SE convolutions on a 1x1 grid
    net = small_net()
    report = check_model(net, (2, 3, 9, 9), name="small", dtype=torch.float64)
    assert report.passed and report.dtype == torch.float64
    assert next(net.parameters()).dtype == torch.float32  # the user's model is not modified
    with pytest.raises(ValueError, match=r"unknown reference model\(s\) \['vgg'\]"):
        verify_reference_models(["vgg"])


def _user_module(tmp_path) -> str:
    path = tmp_path / "user_nets.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2))

        class Zoo:
            small = staticmethod(build)

        instance = build()
        not_a_model = 3

        class Picky(nn.Module):
            # its forward raises a KeyError: an error of the user's model, not a mismatch

            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)

            def forward(self, x):
                return {"features": self.conv(x)}["logits"]

        def broken_factory():
            raise KeyError("weights")
        """))
    return str(path)


def test_load_model_from_module_or_file(tmp_path):
    path = _user_module(tmp_path)
    assert isinstance(load_model(f"{path}:build"), nn.Sequential)
    assert isinstance(load_model(f"{path}:Zoo.small"), nn.Sequential)
    assert isinstance(load_model(f"{path}:instance"), nn.Sequential)
    assert isinstance(load_model("gridgraph.models:ResNeXtish"), nn.Module)
    with pytest.raises(TypeError, match="is a int, not an nn.Module or a factory of one"):
        load_model(f"{path}:not_a_model")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_model(f"{path}:missing")
    with pytest.raises(ValueError, match="expected a model as 'module:attribute'"):
        load_model("gridgraph.models")


def test_cli_model_mode_with_a_user_model(tmp_path, capsys):
    path = _user_module(tmp_path)
    assert main(["verify", "--model", f"{path}:build", "--input-shape", "2,3,8,8", "--device", "cpu",
                 "--verbose"]) == 0
    out = capsys.readouterr().out
    assert f"### {path}:build (train) [float32, cpu]" in out and f"### {path}:build (train) [float64, cpu]" in out
    tables = assert_aligned(out)
    assert len(tables) == 2 and tables[0][1][:3] == ["0", "3->4 k3x3 s1x1 p1x1 d1x1 zeros", "8x8 -> 8x8"]
    assert "  models  PASS: 2 model checks, 4 layer calls in " in out
    assert out.strip().splitlines()[-1].startswith("PASS: models; total ")


def test_cli_reference_subset_and_exit_code_on_failure(capsys, monkeypatch):
    args = ["verify", "--only", "models", "--reference", "resnext", "--dtype", "float32", "--device", "cpu", "--quick"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "  PASS resnext (train) [float32, cpu]: " in out and "mobilenet" not in out
    monkeypatch.setitem(verify_module.TOLERANCES, torch.float32, 0.0)  # every rounding difference now fails
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "  models  FAIL (1: resnext (train) [float32]): 1 model check," in out
    assert out.strip().splitlines()[-1].startswith("FAIL in models (exit code 1)")


@pytest.mark.parametrize("argv, message", [
    (["--model", "x:y"], "--model needs --input-shape"),
    (["--model", "no_such_module_xyz:net", "--input-shape", "1,3,8,8"], "--model no_such_module_xyz:net: ModuleNotFoundError"),
    (["--model", "gridgraph.models:ResNetish", "--input-shape", "a,b"], "--input-shape: expected comma-separated integers"),
    (["--reference", "vgg"], "--reference: unknown network(s) vgg"),
    (["--only", "layers", "--reference", "resnet"], "--only layers cannot be combined with --model or --reference"),
    (["--threads", "0"], "--threads must be at least 1 (got 0)"),
    (["--json", "/no/such/folder/report.json"], "--json: the folder of '/no/such/folder/report.json' does not exist"),
    (["--model", "gridgraph.models:ResNetish", "--input-shape", "1,4,8,8"], "on input (1, 4, 8, 8): ValueError: ImageGridConv2d: expected input with 3 channels"),
])
def test_cli_model_mode_errors(argv, message, capsys):
    assert main(["verify", "--device", "cpu", "--dtype", "float64"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("attribute, message", [
    ("Picky", "--model {path}:Picky on input (2, 3, 8, 8): KeyError: 'logits'"),   # raised by its forward
    ("broken_factory", "--model {path}:broken_factory: KeyError: 'weights'"),     # raised while building it
])
def test_cli_any_error_of_the_users_model_exits_2_with_one_line(tmp_path, capsys, attribute, message):
    path = _user_module(tmp_path)
    argv = ["verify", "--device", "cpu", "--model", f"{path}:{attribute}", "--input-shape", "2,3,8,8", "--no-progress"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"gridgraph verify: error: {message.format(path=path)}\n"
    assert "PASS" not in captured.out and "FAIL" not in captured.out
    assert main(argv + ["--debug"]) == 2  # the same exit code, with the traceback
    err = capsys.readouterr().err
    assert err.startswith(f"gridgraph verify: error: {message.format(path=path)}\n")
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("KeyError")


def test_cli_an_import_error_of_the_users_module_exits_2(tmp_path, capsys):
    path = tmp_path / "broken.py"
    path.write_text("import torch\nraise RuntimeError('no GPU here')\n")
    assert main(["verify", "--model", f"{path}:net", "--input-shape", "1,3,8,8"]) == 2
    assert capsys.readouterr().err == f"gridgraph verify: error: --model {path}:net: RuntimeError: no GPU here\n"


@pytest.mark.parametrize("shape", ["0,3,8,8", "2,3,0,8", "2,-3,8,8"])
def test_cli_refuses_an_input_shape_with_nothing_to_compare(tmp_path, capsys, shape):
    path = _user_module(tmp_path)
    assert main(["verify", "--device", "cpu", "--model", f"{path}:build", "--input-shape", shape]) == 2
    captured = capsys.readouterr()
    assert f"--input-shape: every dimension must be positive, or nothing would be compared (got '{shape}')" in \
        captured.err
    assert "PASS" not in captured.out


@pytest.mark.parametrize("activation", [nn.ReLU(inplace=True), nn.SiLU(inplace=True), nn.Hardtanh(inplace=True)],
                         ids=lambda m: type(m).__name__)
def test_in_place_activations_after_a_convolution_pass(activation):
    """The hooks record copies: an in-place activation that overwrites a convolution's output later in the
    forward must not change what is compared (it made exact twins FAIL with an 'alone' error of ~1)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), activation, nn.Conv2d(4, 4, 3, groups=2),
                        nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1)).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    report = verify_model(net, convert(net), x, grads=True)
    assert report.passed, str(report)
    assert [r.name for r in report.layers] == ["0", "2", "4"]
    assert all(r.alone < 1e-12 and r.in_network < 1e-12 for r in report.layers)
    # the recorded outputs are the convolutions' own: before the activation overwrote them
    assert report.max_gradient_error < 1e-12


def test_cli_in_place_activations(tmp_path, capsys):
    path = tmp_path / "inplace.py"
    path.write_text("from torch import nn\n"
                    "def build():\n"
                    "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),\n"
                    "                         nn.Conv2d(4, 4, 3), nn.SiLU(inplace=True))\n")
    assert main(["verify", "--device", "cpu", "--model", f"{path}:build", "--input-shape", "2,3,8,8",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("PASS: models")


def test_reference_registry_is_what_the_cli_verifies(capsys):
    assert main(["verify", "--only", "models", "--dtype", "float64", "--device", "cpu", "--no-grads",
                 "--verbose"]) == 0
    out = capsys.readouterr().out
    for name in REFERENCE_MODELS:
        assert f"### {name} (train) [float64, cpu]" in out and f"### {name} (eval) [float64, cpu]" in out
    assert "gradients of" not in out


def test_other_converted_kinds_are_verified_too():
    """Whatever ``CONVERSIONS`` converts is paired and checked: here a transposed convolution (decoder)."""
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1)

        def forward(self, x):  # output_size picks the output size a stride leaves ambiguous
            return self.up(torch.relu(self.down(x)), output_size=x.shape[-2:])

    torch.manual_seed(0)
    net = Decoder().double()
    report = verify_model(net, convert(net), torch.randn(2, 3, 8, 8, dtype=torch.float64), grads=True)
    assert report.passed, str(report)
    assert [r.name for r in report.layers] == ["down", "up"]
    assert report.layers[1].configuration.startswith("8->4 transposed k3x3 s2x2")
    assert report.layers[1].grid == "4x4 -> 8x8"
