"""Every convolution of real networks becomes message passing: the patterns of timm, torchvision, MONAI and
segmentation_models_pytorch, each replicated in a few lines (no model zoo in the tests).

For each pattern: after ``convert`` (with an example input, and without one: found at the first call) no torch
convolution operator runs in forward or backward (:func:`gridgraph.torch_convolutions`, which watches the ATen
operators torch executes), and the float64 output, input gradient and parameter gradients equal the
original's. What cannot be converted is named with its reason, by ``convert`` and by ``verify_model``.
"""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gridgraph import convert, message_passing, torch_convolutions, unconvert, verify_model
from gridgraph.conversion import converted_layers
from gridgraph.routing import is_routed

D = torch.float64
F64 = dict(rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------- the patterns
class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow's 'SAME' padding computed from the input size."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s, d in ((iw, self.weight.shape[-1], self.stride[1], self.dilation[1]),
                              (ih, self.weight.shape[-2], self.stride[0], self.dilation[0])):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: weight standardisation in forward."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d: standardised, scaled weights with a learned gain."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MixedConv2d(nn.ModuleDict):
    """timm's MixedConv2d: channel splits through kernels of different sizes, concatenated."""

    def __init__(self, c_in, c_out):
        super().__init__({"k3": Conv2dSame(c_in // 2, c_out // 2, 3), "k5": StdConv2d(c_in - c_in // 2,
                                                                                     c_out - c_out // 2, 5, padding=2)})
        self.splits = [c_in // 2, c_in - c_in // 2]

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(p) for conv, p in zip(self.values(), parts)], 1)


class BlurPool(nn.Module):
    """A blur pool: a fixed binomial filter in a registered buffer, applied with F.conv2d per channel."""

    def __init__(self, channels):
        super().__init__()
        f = torch.tensor([1., 2., 1.])
        self.register_buffer("filt", ((f[:, None] * f[None]) / 16).expand(channels, 1, 3, 3).clone())
        self.channels = channels

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt.to(x.dtype), stride=2,
                        groups=self.channels)


class CondConv2d(nn.Module):
    """timm's CondConv2d: per-sample mixtures of expert kernels, one grouped F.conv2d for the whole batch."""

    def __init__(self, c_in, c_out, k=3, experts=3):
        super().__init__()
        self.c_in, self.c_out, self.k = c_in, c_out, k
        self.weight = nn.Parameter(torch.randn(experts, c_out * c_in * k * k) * 0.2)
        self.bias = nn.Parameter(torch.randn(experts, c_out) * 0.1)
        self.route = nn.Linear(c_in, experts)

    def forward(self, x):
        b = x.size(0)
        routing = torch.sigmoid(self.route(x.mean((2, 3))))
        w = (routing @ self.weight).view(b * self.c_out, self.c_in, self.k, self.k)
        bias = (routing @ self.bias).view(-1)
        out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w, bias, padding=self.k // 2, groups=b)
        return out.view(b, self.c_out, *out.shape[2:])


class Conv3DSimple(nn.Conv3d):
    """torchvision's video Conv3DSimple: a subclass that only adds a static method."""

    @staticmethod
    def get_downsample_stride(stride):
        return stride, stride, stride


class Sobel(nn.Module):
    """A user's edge filter: F.conv2d with fixed kernels built in forward."""

    def forward(self, x):
        k = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]], dtype=x.dtype)
        kernels = torch.stack([k, k.t()])[:, None].repeat(x.size(1), 1, 1, 1)
        return F.conv2d(x, kernels, padding=1, groups=x.size(1))


class Upsampler(nn.Module):
    """A learned upsampling by a functional transposed convolution (its own weight)."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c, 2, 2) * 0.3)

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, stride=2)


def _qat_conv_bn():
    from torch.ao.nn.intrinsic.qat import ConvBn2d

    qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    return ConvBn2d(4, 4, 3, padding=1, qconfig=qconfig)


PATTERNS = {
    "same-padding subclass": (lambda: Conv2dSame(3, 4, 3, stride=2), (2, 3, 9, 10)),
    "weight-standardised subclass": (lambda: StdConv2d(3, 4, 3, padding=1), (2, 3, 7, 8)),
    "scaled weight-standardised subclass with gain": (lambda: ScaledStdConv2d(3, 4, 3, padding=1), (2, 3, 7, 8)),
    "mixed-kernel module": (lambda: MixedConv2d(4, 6), (2, 4, 9, 9)),
    "blur pool (filter buffer)": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), BlurPool(4)), (2, 3, 8, 8)),
    "per-sample expert conv": (lambda: CondConv2d(3, 4), (3, 3, 6, 7)),
    "3-d subclass without forward": (lambda: Conv3DSimple(2, 3, 3, padding=1), (2, 2, 4, 5, 5)),
    "weight_norm": (lambda: nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1)), (2, 3, 6, 6)),
    "spectral_norm": (lambda: nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3, padding=1)),
                      (2, 3, 6, 6)),
    "lazy conv": (lambda: nn.Sequential(nn.LazyConv2d(4, 3, padding=1, dtype=D), nn.ReLU()), (2, 3, 6, 6)),
    "fused conv-BN (QAT)": (_qat_conv_bn, (2, 4, 6, 6)),
    "user's F.conv2d edge filter": (lambda: nn.Sequential(nn.Conv2d(3, 2, 1), Sobel()), (2, 3, 7, 7)),
    "functional transposed conv": (lambda: nn.Sequential(nn.Conv2d(3, 2, 1), Upsampler(2)), (2, 3, 4, 5)),
}


#: fake quantisation's observers run in float32 only
FLOAT32 = {"fused conv-BN (QAT)"}


def _build(name: str):
    make, shape = PATTERNS[name]
    torch.manual_seed(0)
    dtype = torch.float32 if name in FLOAT32 else D
    model = make().to(dtype)
    return model, torch.randn(shape, dtype=dtype)


def _gradients(model, x):
    xi = x.clone().requires_grad_()
    torch.manual_seed(1)
    out = model(xi)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out.detach(), xi.grad, grads


@pytest.mark.parametrize("example", [True, False], ids=["example_input", "first_call"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_converts_exactly_with_no_torch_convolution_left(name, example):
    model, x = _build(name)
    tol = dict(rtol=1e-5, atol=1e-5) if name in FLOAT32 else F64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # QAT observers, lazy modules: torch's own warnings
        if name == "lazy conv" and example:  # convert materialises the lazy module from example_input (in
            twin = convert(model, inplace=True, example_input=x)  # place here, so that the reference below
            model = unconvert(copy.deepcopy(twin))  # has the weights it drew)
        else:
            if name == "lazy conv":
                model(x)  # without an example input, a lazy module must have run before convert
            twin = convert(model, example_input=x if example else None)
        if name == "spectral_norm":  # its power iteration runs in training mode: compare in eval
            model.eval(), twin.eval()
        twin(x)  # the first call (routes what convert could not see without an example input) ...
        model(x)  # ... and the same state change in the original (QAT observers, BatchNorm statistics)
    assert torch_convolutions(twin, (x,)) == []
    want, got = _gradients(model, x), _gradients(twin, x)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    assert got[2].keys() == want[2].keys()
    for key in want[2]:
        torch.testing.assert_close(got[2][key], want[2][key], **tol)
    assert twin.state_dict().keys() == model.state_dict().keys()
    assert converted_layers(twin)


def test_torch_convolutions_names_what_runs_unconverted():
    model = nn.Sequential(Conv2dSame(3, 4, 3), Sobel()).to(D)
    x = torch.randn(1, 3, 6, 6, dtype=D)
    found = torch_convolutions(model, (x,))
    assert "0 (Conv2dSame): aten::convolution" in found and "1 (Sobel): aten::convolution" in found
    assert "(backward): aten::convolution_backward" in found


def test_routed_modules_keep_their_class_and_unconvert_restores_it():
    model = nn.Sequential(Conv3DSimple(2, 3, 3, padding=1), nn.ReLU()).to(D)
    twin = convert(model)
    assert isinstance(twin[0], Conv3DSimple) and is_routed(twin[0])
    assert twin[0].get_downsample_stride(2) == (2, 2, 2)
    back = unconvert(twin)
    assert type(back[0]) is Conv3DSimple and not is_routed(back[0])
    x = torch.randn(1, 2, 3, 4, 4, dtype=D)
    assert torch_convolutions(back, (x,)) and not torch_convolutions(twin, (x,))


def test_spectral_norm_power_iteration_still_runs_in_training():
    model, x = _build("spectral_norm")
    twin = convert(model)
    key = "parametrizations.weight.0._u"
    for m in (model, twin):
        m.train()
        m(x)
        m(x)
    torch.testing.assert_close(twin.state_dict()[key], model.state_dict()[key], **F64)
    assert not torch.equal(twin.state_dict()[key], convert(_build("spectral_norm")[0]).state_dict()[key])


def test_routed_models_pickle_copy_compile_and_export():
    torch.manual_seed(0)
    model = nn.Sequential(StdConv2d(3, 4, 3, padding=1), BlurPool(4), Conv2dSame(4, 2, 3, stride=2)).to(D)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    twin = convert(model, example_input=x)
    want = model(x)
    buffer = io.BytesIO()
    torch.save(twin, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (loaded, copy.deepcopy(twin)):
        assert isinstance(other[0], StdConv2d) and is_routed(other[1])
        torch.testing.assert_close(other(x), want, **F64)
        assert torch_convolutions(other, (x,)) == []
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager")
    torch.testing.assert_close(compiled(x), want, **F64)
    program = torch.export.export(twin, (x,))
    torch.testing.assert_close(program.module()(x), want, **F64)
    graph = str(program.graph)
    assert "gridgraph.conv_image" in graph and "aten.convolution" not in graph


def test_hooks_on_routed_modules_fire():
    model = nn.Sequential(StdConv2d(3, 4, 3, padding=1)).to(D)
    log = []
    model[0].register_forward_hook(lambda m, a, o: log.append("forward"))
    model[0].register_full_backward_hook(lambda m, gi, go: log.append("backward"))
    twin = convert(model)
    twin(torch.randn(1, 3, 5, 5, dtype=D, requires_grad=True)).sum().backward()
    assert log == ["forward", "backward"]


def test_message_passing_context_routes_any_code():
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 7, 7, dtype=D, requires_grad=True), torch.randn(4, 3, 3, 3, dtype=D, requires_grad=True)
    want = F.conv2d(x, w, stride=2, padding="valid" if False else 1)
    seen = []
    with message_passing(record=lambda func, reason: seen.append((func.__name__, reason))):
        got = F.conv2d(x, w, stride=2, padding=1)
        same = F.conv2d(x, w, padding="same")
        up = F.conv_transpose2d(x, w.transpose(0, 1), stride=2, output_padding=1)
        ints = F.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.long), torch.ones(1, 1, 1, 1, dtype=torch.long))
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(same, F.conv2d(x, w, padding="same"), **F64)
    torch.testing.assert_close(up, F.conv_transpose2d(x, w.transpose(0, 1), stride=2, output_padding=1), **F64)
    assert torch.equal(ints, torch.ones(1, 1, 3, 3, dtype=torch.long))  # integer dtypes stay torch's
    assert seen[:3] == [("conv2d", None), ("conv2d", None), ("conv_transpose2d", None)]
    assert seen[3] == ("conv2d", "input has dtype torch.int64")
    g = torch.autograd.grad(got.sum(), (x, w))
    torch.testing.assert_close(g, torch.autograd.grad(want.sum(), (x, w)), **F64)


def test_what_cannot_be_converted_is_named_with_its_reason():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), scripted).to(D)
    with pytest.warns(UserWarning, match=r"1: a TorchScript module"):
        twin = convert(model)
    x = torch.randn(1, 3, 5, 5, dtype=D)
    report = verify_model(model, twin, x, grads=True)
    assert not report.passed
    assert any(entry.startswith("1 (RecursiveScriptModule)") for entry in report.unconverted)
    assert "not converted (still torch convolutions)" in report.details()
    lazy = nn.Sequential(nn.LazyConv2d(3, 3))
    with pytest.warns(UserWarning, match=r"0: a lazy LazyConv2d not materialised yet: pass example_input"):
        convert(lazy)
