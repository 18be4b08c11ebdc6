"""convert / unconvert: every nn.Conv2d becomes ImageGridConv2d (message passing), drop-in and reversible.

The reference is always the torch model itself: the converted copy must give the same outputs and
gradients, hold the same weights under the same state_dict keys, and convert back to nn.Conv2d exactly.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gridgraph import GridConv2d, image_to_graph
from gridgraph.conversion import CONVERSIONS, ImageGridConv2d, convert, converted_layers, unconvert
from gridgraph.nn.functional import kernel_trace

#: One of each: kernel sizes, strides, 'same'/'valid', dilation, groups/depthwise, bias off, padding modes.
CONFIGS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=1),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=(2, 4), padding="same", dilation=(1, 2)),
    dict(kernel_size=5, stride=(2, 3), padding=2, groups=2, bias=False),
    dict(kernel_size=3, padding="valid", dilation=2, groups=4),
    dict(kernel_size=3, padding=1, padding_mode="reflect", stride=2),
    dict(kernel_size=(3, 1), padding=(2, 0), padding_mode="replicate"),
    dict(kernel_size=3, padding="same", padding_mode="circular", dilation=3),
]


def tolerance(ref: torch.Tensor) -> dict:
    """float64 ~1e-10, float32 ~1e-5, scaled to the data (max(1, max|ref|))."""
    scale = max(1.0, ref.detach().abs().max().item()) if ref.numel() else 1.0
    tol = 1e-10 if ref.dtype == torch.float64 else 1e-5
    return dict(atol=tol * scale, rtol=0.0)


@pytest.fixture(autouse=True)
def _quiet_torch_same_padding_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        yield


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_converted_conv_equals_conv2d_forward_and_backward(kwargs, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, **kwargs).to(dtype)
    twin = convert(conv)
    assert type(twin) is ImageGridConv2d
    x = torch.randn(3, 4, 11, 13, dtype=dtype, requires_grad=True)
    upstream = torch.randn(conv(x).shape, dtype=dtype)
    for images in (x, x[1]):  # batched and unbatched
        ref, out = conv(images), twin(images)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, **tolerance(ref))
    ref, out = conv(x), twin(x)
    ref_params = [p for p in (conv.weight, conv.bias) if p is not None]
    params = [p for p in (twin.weight, twin.bias) if p is not None]
    ref_grads = torch.autograd.grad(ref, [x, *ref_params], upstream)
    grads = torch.autograd.grad(out, [x, *params], upstream)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, **tolerance(g_ref))


def test_output_layout_is_conv2d_like():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    twin = convert(conv)
    x = torch.randn(2, 3, 6, 7)
    assert twin(x).is_contiguous()
    x_cl = x.to(memory_format=torch.channels_last)
    out = twin(x_cl)
    assert out.is_contiguous(memory_format=torch.channels_last)  # as nn.Conv2d does for channels-last input
    torch.testing.assert_close(out, conv(x), atol=1e-6, rtol=0)
    assert twin(x[:0]).shape == conv(x[:0]).shape == (0, 5, 6, 7)  # empty batch


def test_converted_layer_is_still_a_graph_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    twin = convert(conv)
    assert isinstance(twin, GridConv2d)
    x = torch.randn(2, 3, 7, 6)
    g = image_to_graph(x, twin)
    nodes = twin(g.x, g.edge_index, g.edge_type, size=g.size())
    torch.testing.assert_close(nodes, GridConv2d.from_conv2d(conv)(g.x, g.edge_index, g.edge_type, size=g.size()),
                               atol=0, rtol=0)
    torch.testing.assert_close(twin(x).permute(0, 2, 3, 1).reshape(-1, 4), nodes, atol=1e-6, rtol=0)


class Net(nn.Module):
    """Convolutions nested in containers, next to modules that are not convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, groups=8, bias=False))
        self.branches = nn.ModuleDict({"a": nn.Conv2d(8, 4, 1), "b": nn.Sequential(nn.MaxPool2d(2), nn.Flatten())})
        self.blocks = nn.ModuleList([nn.Linear(4 + 8 * 3 * 3, 6), nn.LayerNorm(6), nn.Linear(6, 2)])

    def forward(self, x):
        x = self.features(x)
        y = torch.cat([self.branches["a"](x).mean((2, 3)), self.branches["b"](x)], dim=1)
        for block in self.blocks:
            y = block(y)
        return y


def test_convert_replaces_exactly_the_conv2d_modules():
    torch.manual_seed(0)
    net = Net()
    twin = convert(net)
    assert sorted(converted_layers(twin)) == ["branches.a", "features.0", "features.3"]
    for name, module in net.named_modules():
        new = twin.get_submodule(name)
        if type(module) is nn.Conv2d:
            assert type(new) is ImageGridConv2d
            assert repr(new) == repr(module).replace("Conv2d", "ImageGridConv2d", 1)
        elif name:
            assert type(new) is type(module)  # BatchNorm, ReLU, pooling, Linear, LayerNorm left alone
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(twin(x), net(x), atol=1e-5, rtol=0)


def test_original_untouched_and_parameters_copied():
    torch.manual_seed(0)
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    twin = convert(net)
    assert type(net.features[0]) is nn.Conv2d and type(net.branches["a"]) is nn.Conv2d
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    for (name, p), (name2, q) in zip(net.named_parameters(), twin.named_parameters()):
        assert name == name2 and p is not q and torch.equal(p, q)
    with torch.no_grad():
        twin.features[0].weight.add_(1.0)
    assert torch.equal(net.features[0].weight, before["features.0.weight"])  # independent copies


def test_state_dict_keys_kept_and_load_both_ways():
    torch.manual_seed(0)
    net = Net()
    twin = convert(net)
    assert list(twin.state_dict()) == list(net.state_dict())
    other = Net()  # different random weights
    twin.load_state_dict(other.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(twin(x), other(x), atol=1e-5, rtol=0)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    net.load_state_dict(twin.state_dict())
    torch.testing.assert_close(net(x), twin(x), atol=1e-5, rtol=0)


def test_unconvert_gives_back_conv2d_with_identical_weights():
    torch.manual_seed(0)
    net = Net()
    back = unconvert(convert(net))
    for name, module in net.named_modules():
        new = back.get_submodule(name)
        assert type(new) is type(module)
        if isinstance(module, nn.Conv2d):
            assert repr(new) == repr(module)
            assert torch.equal(new.weight, module.weight)
            assert (new.bias is None) == (module.bias is None)
            if module.bias is not None:
                assert torch.equal(new.bias, module.bias)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(back(x), net(x))
    assert list(back.state_dict()) == list(net.state_dict())


def test_inplace_keeps_parameter_objects_so_an_existing_optimizer_still_trains():
    torch.manual_seed(0)
    net = Net()
    params = list(net.parameters())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    out = convert(net, inplace=True)
    assert out is net and type(net.features[0]) is ImageGridConv2d
    assert all(p is q for p, q in zip(params, net.parameters()))
    before = net.features[0].weight.detach().clone()
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    assert not torch.equal(net.features[0].weight, before)
    back = unconvert(net, inplace=True)
    assert back is net and type(net.features[0]) is nn.Conv2d
    assert all(p is q for p, q in zip(params, net.parameters()))


def test_a_single_conv_as_the_model():
    conv = nn.Conv2d(2, 3, 3)
    assert type(convert(conv)) is ImageGridConv2d and type(conv) is nn.Conv2d
    twin = convert(conv, inplace=True)  # a module cannot change its own type: the twin shares the Parameters
    assert twin.weight is conv.weight and twin.bias is conv.bias
    assert type(unconvert(twin)) is nn.Conv2d


def test_device_dtype_mode_and_requires_grad_kept():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 3, 1, bias=False)).double().eval()
    net[0].weight.requires_grad_(False)
    twin = convert(net)
    assert not twin.training and not twin[0].training and not twin[1].training
    assert twin[0].weight.dtype == torch.float64 and twin[0].weight.device == net[0].weight.device
    assert not twin[0].weight.requires_grad and twin[0].bias.requires_grad and twin[1].weight.requires_grad
    back = unconvert(twin)
    assert not back.training and not back[0].weight.requires_grad and back[0].weight.dtype == torch.float64


def test_shared_modules_and_tied_weights_stay_shared():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), conv)  # the same module twice
    tied = nn.Conv2d(3, 3, 3, padding=1)
    tied.weight = conv.weight
    net.append(tied)
    twin = convert(net)
    assert twin[0] is twin[2] and type(twin[0]) is ImageGridConv2d
    assert twin[3].weight is twin[0].weight
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(twin(x), net(x), atol=1e-5, rtol=0)


def test_nothing_to_convert_warns_and_returns_the_model():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4))
    with pytest.warns(UserWarning, match=r"convert found nothing to convert in Sequential: it contains no nn\.Conv2d"):
        out = convert(mlp)
    assert type(out) is nn.Sequential and [type(m) for m in out] == [type(m) for m in mlp]
    with pytest.warns(UserWarning, match="unconvert found nothing to unconvert"):
        unconvert(mlp)
    twin = convert(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.warns(UserWarning, match="nothing to convert"):  # already converted
        convert(twin)


def test_subclasses_of_conv2d_keep_their_forward_and_are_routed():
    """A subclass keeps its class and its own forward (here: weight standardisation); only its convolution call
    runs as message passing (tests/test_real_patterns.py covers every pattern)."""
    class StandardisedConv2d(nn.Conv2d):
        def forward(self, x):
            w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    net = nn.Sequential(StandardisedConv2d(2, 2, 3), nn.Conv2d(2, 2, 1)).double()
    twin = convert(net)
    assert isinstance(twin[0], StandardisedConv2d) and type(twin[1]) is ImageGridConv2d
    assert list(converted_layers(twin)) == ["0", "1"]
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    with kernel_trace() as trace:
        torch.testing.assert_close(twin(x), net(x), rtol=1e-12, atol=1e-12)
    assert trace == ["image", "image"]
    assert type(unconvert(twin)[0]) is StandardisedConv2d


def test_buffers_attributes_and_hooks_are_kept_both_ways():
    """A conv's own buffers (persistent or not), attributes and hooks survive convert and unconvert: same
    state_dict keys, the attribute on the twin, the hooks called (and their handles still remove them)."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    net[0].register_buffer("scale", torch.tensor([2.0, 3.0]))
    net[0].register_buffer("scratch", torch.zeros(1), persistent=False)
    net[0].qconfig = "my-qconfig"
    calls = []
    handle = net[0].register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    net[0].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is lost, so nothing to warn about
        twin = convert(net)
    assert list(twin.state_dict()) == list(net.state_dict()) == ["0.weight", "0.bias", "0.scale"]
    assert torch.equal(twin[0].scale, net[0].scale) and twin[0].qconfig == "my-qconfig"
    assert "scratch" in dict(twin[0].named_buffers()) and "scratch" not in twin[0].state_dict()
    twin(torch.randn(1, 1, 5, 5))
    assert calls == ["pre", "ImageGridConv2d"]
    back = unconvert(twin)
    assert list(back.state_dict()) == list(net.state_dict()) and back[0].qconfig == "my-qconfig"
    back(torch.randn(1, 1, 5, 5))
    assert calls[2:] == ["pre", "Conv2d"]
    handle.remove()  # the original handle removes the hook from the original model
    net(torch.randn(1, 1, 5, 5))
    assert calls[4:] == ["pre"]


def test_attributes_shadowed_by_the_twin_are_reported():
    net = nn.Sequential(nn.Conv2d(1, 1, 3))
    net[0].geometry = "mine"  # the twin has a property of that name
    with pytest.warns(UserWarning, match=r"could not carry over 0.geometry"):
        convert(net)


def test_conversion_table_maps_each_torch_class_to_a_twin_that_maps_back():
    assert CONVERSIONS[nn.Conv2d] is ImageGridConv2d
    for torch_cls, twin_cls in CONVERSIONS.items():
        assert getattr(nn, twin_cls._torch_name) is torch_cls


@pytest.mark.parametrize("bad, error, message", [
    (torch.randn(3, 4), ValueError,
     r"ImageGridConv2d: expected input of shape \(C, H, W\) or \(B, C, H, W\): 3 or 4 dims \(got a 2-dim tensor "
     r"of shape \(3, 4\)\); to run on node features, pass edge_index and edge_type as well"),
    (torch.randn(1, 1, 3, 8, 8), ValueError, r"3 or 4 dims \(got a 5-dim tensor of shape \(1, 1, 3, 8, 8\)\)"),
    (torch.randn(2, 4, 8, 8), ValueError, r"expected input with 3 channels \(got 4 channels, input of shape \(2, 4, 8, 8\)\)"),
    (torch.randn(4, 8, 8), ValueError, r"expected input with 3 channels \(got 4 channels"),
    (torch.randn(2, 3, 8, 8, dtype=torch.float64), TypeError,
     r"expected input of dtype torch.float32, the layer's dtype \(got torch.float64\)"),
    (torch.randn(2, 3, 2, 2), ValueError, r"image too small for the kernel"),
    ([[1.0]], TypeError, r"ImageGridConv2d expects an image tensor \(got list\)"),
])
def test_wrong_inputs_give_clear_errors(bad, error, message):
    twin = convert(nn.Sequential(nn.Conv2d(3, 5, 3)))
    with pytest.raises(error, match=message):
        twin(bad)


def test_convert_rejects_non_modules_and_scripted_modules():
    with pytest.raises(TypeError, match=r"convert expects an nn.Module \(got function\)"):
        convert(lambda x: x)
    with pytest.raises(TypeError, match="cannot rewrite a TorchScript module"):
        convert(torch.jit.script(nn.Sequential(nn.Conv2d(1, 1, 1))))


@pytest.mark.slow
def test_torch_compile_of_a_converted_model_runs_and_matches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())  # one layer: compiling is slow on CPU
    twin = convert(net)
    compiled = torch.compile(twin, backend="aot_eager")  # dynamo + AOT autograd, no C++ toolchain needed
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    out, ref = compiled(x), net(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    g, g_ref = (torch.autograd.grad(y.sum(), [x, m[0].weight, m[0].bias]) for y, m in ((out, twin), (ref, net)))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_converted_model_on_every_device(device):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, stride=2, groups=3)).to(device)
    twin = convert(net)
    assert all(p.device == net[0].weight.device for p in twin.parameters())
    x = torch.randn(2, 3, 9, 9, device=device)
    torch.testing.assert_close(twin(x), net(x), atol=1e-5, rtol=0)


def test_convolutions_with_computed_weights_are_routed():
    """The old torch.nn.utils.weight_norm recomputes the weight in a hook: the module keeps it and its
    convolution call is routed."""
    net = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated in favour of parametrizations
        torch.nn.utils.weight_norm(net[0])
    with pytest.raises(RuntimeError, match=r"convert could not copy the model .* convert it in place with inplace=True"):
        convert(net)  # torch cannot deepcopy weight_norm's computed weight
    x = torch.randn(1, 2, 6, 6)
    want = net(x)
    twin = convert(net, inplace=True)
    assert isinstance(twin[0], nn.Conv2d) and type(twin[1]) is ImageGridConv2d
    with kernel_trace() as trace:
        torch.testing.assert_close(twin(x), want, atol=1e-6, rtol=0)
    assert trace == ["image", "image"]