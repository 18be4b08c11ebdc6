"""The layout contract of converted layers: outputs and gradients have the strides torch's own convolution
gives them, for every layer kind, memory format, batch 0 / 1 and 1x1 grids (size-1 dimensions included), and
the eager path and the operator path compute the same thing.

A converted network hands torch's other modules exactly what the original handed them, so whatever torch
gets right for the original it gets right for the twin: a real network (tiny_vit) had exact outputs and input
gradients off by 100% because the twins returned channels-last gradients for channels-first inputs and
torch's own BatchNorm backward is wrong for the strides that produced downstream (test at the bottom).
"""
import itertools

import pytest
import torch
from torch import nn

from gridgraph import convert
from gridgraph.nn import layout
from gridgraph.nn.functional import kernel_trace

F64 = dict(rtol=1e-10, atol=1e-10)

# (torch module factory, input shape) per layer kind: 1-d, 2-d and 3-d, dense, pointwise, depthwise, grouped,
# strided, dilated, transposed
KINDS = {
    "2d": (lambda: nn.Conv2d(4, 5, 3, padding=1), (4, 5, 6)),
    "2d-1x1": (lambda: nn.Conv2d(4, 5, 1), (4, 5, 6)),
    "2d-1x1-s2": (lambda: nn.Conv2d(4, 5, 1, stride=2), (4, 5, 6)),
    "2d-dw": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 5, 6)),
    "2d-dw-s2": (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), (4, 5, 6)),
    "2d-grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 6)),
    "2d-strided": (lambda: nn.Conv2d(4, 5, 3, stride=2, padding=1), (4, 5, 6)),
    "2d-dilated": (lambda: nn.Conv2d(4, 5, 3, padding=2, dilation=2), (4, 5, 6)),
    "2d-reflect": (lambda: nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect"), (4, 5, 6)),
    "2d-transposed": (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (4, 5, 6)),
    "2d-transposed-grouped": (lambda: nn.ConvTranspose2d(4, 6, 3, padding=1, groups=2), (4, 5, 6)),
    "1d": (lambda: nn.Conv1d(4, 5, 3, padding=1), (4, 7)),
    "1d-transposed": (lambda: nn.ConvTranspose1d(4, 3, 3, stride=2), (4, 7)),
    "3d": (lambda: nn.Conv3d(4, 5, 3, padding=1), (4, 3, 4, 5)),
    "3d-dw": (lambda: nn.Conv3d(4, 4, 3, padding=1, groups=4), (4, 3, 4, 5)),
    "3d-transposed": (lambda: nn.ConvTranspose3d(4, 3, 2, stride=2), (4, 3, 4, 2)),
}


def _formats(ndim):
    """Input layouts: channels-first, channels-last and a sliced (non-dense) tensor."""
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)
    out = ["contiguous", "sliced"]
    return out + (["channels_last"] if cl is not None else [])


def _image(shape, fmt, dtype):
    x = torch.randn(*shape, dtype=dtype)
    if fmt == "channels_last":
        return x.to(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()])
    if fmt == "sliced":
        wide = torch.randn(*shape[:-1], shape[-1] + 3, dtype=dtype)
        return wide[..., 1:1 + shape[-1]]
    return x


def _cases():
    for kind, (make, shape) in KINDS.items():
        for batch in (1, 2, 0):
            n = len(shape) + 1
            for fmt in _formats(n):
                for weight_cl in ((False, True) if n in (4, 5) else (False,)):
                    yield kind, batch, fmt, weight_cl


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: "-".join(map(str, c)))
def test_outputs_and_gradients_have_torchs_strides(case, dtype):
    kind, batch, fmt, weight_cl = case
    make, shape = KINDS[kind]
    torch.manual_seed(0)
    conv = make().to(dtype)
    if weight_cl:
        conv = conv.to(memory_format=torch.channels_last if conv.weight.dim() == 4 else torch.channels_last_3d)
    twin = convert(conv)
    image = _image((batch, *shape), fmt, dtype)
    x_ref, x_twin = image.clone().requires_grad_(), image.clone().requires_grad_()
    if fmt != "contiguous":  # clone keeps the layout only for dense tensors: rebuild the sliced one
        x_ref = _image((batch, *shape), fmt, dtype).copy_(image).requires_grad_()
        x_twin = _image((batch, *shape), fmt, dtype).copy_(image).requires_grad_()
    ref, out = conv(x_ref), twin(x_twin)
    assert out.shape == ref.shape and out.stride() == ref.stride(), (out.stride(), ref.stride())
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    if batch == 0:
        return
    grad = torch.randn_like(ref)
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(ref, (x_ref, conv.weight, conv.bias), grad)
    gx, gw, gb = torch.autograd.grad(out, (x_twin, twin.weight, twin.bias), grad)
    assert gx.stride() == gx_ref.stride(), ("input gradient", gx.stride(), gx_ref.stride())
    assert gw.stride() == gw_ref.stride(), ("weight gradient", gw.stride(), gw_ref.stride())
    for a, b in ((gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (2, 4, 1, 1), (1, 1, 1, 1), (1, 4, 1, 6), (3, 6, 4, 4)])
@pytest.mark.parametrize("groups", [1, 4])
def test_size_one_dimensions_follow_torch(shape, groups):
    """Batch 1 and 1x1 grids: where both layouts describe the same memory, the strides torch writes (which
    decide torch's later choices, e.g. its BatchNorm's) are the twin's."""
    c = shape[1]
    if c % groups:
        pytest.skip("channels not divisible by groups")
    for weight_cl, fmt in itertools.product((False, True), ("contiguous", "channels_last")):
        conv = nn.Conv2d(c, c, 3, padding=1, groups=groups).double()
        if weight_cl:
            conv = conv.to(memory_format=torch.channels_last)
        twin = convert(conv)
        x = _image(shape, fmt, torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ra, rb = conv(xa), twin(xb)
        assert ra.stride() == rb.stride()
        ga = torch.autograd.grad(ra, xa, torch.ones_like(ra))[0]
        gb = torch.autograd.grad(rb, xb, torch.ones_like(rb))[0]
        assert ga.stride() == gb.stride()


def test_layout_rule_against_torch_itself():
    """The rule (torch's backend choice and memory format) for a channels-last weight with an NCHW input:
    channels-last out, as torch's convolution does."""
    x = torch.randn(2, 4, 5, 6)
    w = torch.randn(5, 4, 3, 3).to(memory_format=torch.channels_last)
    lay = layout.conv_layout(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    assert lay.channels_last
    assert lay.strides((2, 5, 5, 6)) == torch.empty(2, 5, 5, 6, memory_format=torch.channels_last).stride()


def test_eager_path_and_operator_path_agree_and_are_told_apart():
    """Plain eager mode calls the kernels directly ('image'); under a dispatch mode (here torch's FLOP
    counter) the registered operator runs ('image-op'); both give the same numbers and strides."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    twin = convert(conv)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    with kernel_trace() as trace:
        eager = twin(x)
        with FlopCounterMode(display=False):
            op = twin(x)
    assert trace == ["image", "image-op"]
    assert torch.equal(eager, op) and eager.stride() == op.stride()


class _TokenBlock(nn.Module):
    """tiny_vit's pattern: tokens [B, L, C] (NCHW in memory after a conv stem) + linear, viewed as an image,
    depthwise 3x3, eval BatchNorm, back to tokens, + MLP."""

    def __init__(self, c, size):
        super().__init__()
        self.size = size
        self.fc = nn.Linear(c, c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.bn = nn.BatchNorm2d(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, tokens):
        b, length, c = tokens.shape
        h, w = self.size
        x = tokens + self.fc(tokens)
        x = x.view(b, h, w, c).permute(0, 3, 1, 2)
        x = self.bn(self.dw(x))
        x = x.reshape(b, c, length).transpose(1, 2)
        return x + self.mlp(x)


@pytest.mark.parametrize("batch", [1, 2])
def test_token_blocks_with_batchnorm_have_exact_input_gradients(batch):
    """Three token blocks (the timm-free reproduction of tiny_vit's failure): the twin's input gradient equals
    the original's to float64 rounding (before: relative error 1.2-1.9)."""
    torch.manual_seed(0)
    c, size = 8, (4, 4)
    stem = nn.Conv2d(3, c, 3, padding=1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = stem
            self.blocks = nn.Sequential(*[_TokenBlock(c, size) for _ in range(3)])

        def forward(self, image):
            x = self.stem(image)
            return self.blocks(x.flatten(2).transpose(1, 2))

    net = Net().double().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    twin = convert(net)
    image = torch.randn(batch, 3, *size, dtype=torch.float64)
    xa, xb = image.clone().requires_grad_(), image.clone().requires_grad_()
    ya, yb = net(xa), twin(xb)
    torch.testing.assert_close(yb, ya, **F64)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, xa, g)[0]
    gb = torch.autograd.grad(yb, xb, g)[0]
    torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-9)
