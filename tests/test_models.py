"""The reference networks, converted: equal to the originals forward and backward, and in training.

The reference is each torch network itself; its converted twin must give the same outputs and the same
gradient for every parameter and for the input (float64 to ~1e-10, float32 to ~1e-5, both scaled to
the data), and a few SGD steps from the same weights must keep both models' parameters equal.
"""
from __future__ import annotations

import copy

import warnings

import pytest
import torch
from torch import nn

from gridgraph.conversion import ImageGridConv2d, convert, converted_layers
from gridgraph.models import REFERENCE_MODELS, reference_model

NAMES = sorted(REFERENCE_MODELS)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _quiet_torch_same_padding_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        yield


def assert_close_scaled(actual, expected, dtype, scale=None, msg="", growth=1.0):
    """``max|actual - expected| <= tol * growth * scale``, ``scale`` by default ``max(1, max|expected|)``."""
    if scale is None:
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=TOL[dtype] * growth * scale, rtol=0.0,
                               msg=lambda m: f"{msg}: {m}")


def conv_configs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def test_registry_builds_every_network_deterministically():
    assert NAMES == ["conv_zoo", "dilated", "inception", "mobilenet", "resnet", "resnext", "squeeze_excite", "unet"]
    for name in NAMES:
        a, b, c = reference_model(name), reference_model(name), reference_model(name, seed=1)
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
        entry = REFERENCE_MODELS[name]
        assert entry.description and len(entry.input_shape) == 4
    with pytest.raises(ValueError, match=r"unknown reference model 'vgg'; expected one of \['conv_zoo'"):
        reference_model("vgg")


def test_reference_networks_cover_the_convolution_families():
    convs = {name: conv_configs(reference_model(name)) for name in NAMES}
    mobilenet = convs["mobilenet"]
    assert any(c.groups == c.in_channels > 1 for c in mobilenet)                       # depthwise
    assert any(c.kernel_size == (1, 1) for c in mobilenet)                             # pointwise
    assert any(c.stride == (2, 2) and c.groups > 1 for c in mobilenet)                 # stride-2 stages
    assert any(c.kernel_size == (1, 1) and c.stride == (2, 2) for c in convs["resnet"])  # projection shortcut
    assert any(1 < c.groups < c.in_channels for c in convs["resnext"])                 # grouped
    assert {(1, 7), (7, 1)} <= {c.kernel_size for c in convs["inception"]}
    assert any(c.padding == "same" for c in convs["inception"])
    assert {2, 4} <= {c.dilation[0] for c in convs["dilated"]}
    zoo = convs["conv_zoo"]
    assert {c.padding_mode for c in zoo} == {"zeros", "reflect", "replicate", "circular"}
    assert any(c.padding == "same" and c.kernel_size[0] % 2 == 0 for c in zoo)       # even 'same'
    assert any(c.padding == "valid" for c in zoo) and any(c.bias is None for c in zoo)
    assert any(c.out_channels == 2 * c.in_channels == 2 * c.groups for c in zoo)     # depth multiplier
    # Squeeze-and-excitation: 1x1 convolutions on a 1x1 grid.
    net = reference_model("squeeze_excite")
    grids = []
    hooks = [m.register_forward_hook(lambda m, i, o: grids.append(tuple(i[0].shape[-2:]))) for m in conv_configs(net)]
    net(torch.randn(REFERENCE_MODELS["squeeze_excite"].input_shape))
    for h in hooks:
        h.remove()
    assert (1, 1) in grids


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_converted_reference_network_equals_original_forward_and_backward(name, dtype):
    entry = REFERENCE_MODELS[name]
    model = entry.build(dtype=dtype)  # training mode: BatchNorm uses batch statistics
    twin = convert(model)
    assert len(converted_layers(twin)) == len(conv_configs(model)) > 0
    assert not any(type(m) is nn.Conv2d for m in twin.modules())
    params, twin_params = dict(model.named_parameters()), dict(twin.named_parameters())
    assert list(params) == list(twin_params)
    assert all(torch.equal(params[k], twin_params[k]) for k in params)  # weights equal

    x = entry.example_input(dtype=dtype).requires_grad_(True)
    ref, out = model(x), twin(x)
    assert_close_scaled(out, ref, dtype, msg=f"{name} output")

    upstream = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    names = list(params)
    ref_grads = torch.autograd.grad(ref, [x] + [params[k] for k in names], upstream)
    grads = torch.autograd.grad(out, [x] + [twin_params[k] for k in names], upstream)
    # Round-off in a gradient scales with the network's gradients (several are exactly zero up to
    # round-off, e.g. a conv bias followed by BatchNorm), so all are measured against the largest.
    scale = max(g.abs().max().item() for g in ref_grads)
    for label, g, g_ref in zip(["input"] + names, grads, ref_grads):
        assert_close_scaled(g, g_ref, dtype, scale=scale, msg=f"{name} gradient of {label}")


@pytest.mark.parametrize("name", ["mobilenet", "conv_zoo"])
def test_converted_reference_network_in_eval_mode_unbatched(name):
    entry = REFERENCE_MODELS[name]
    model = entry.build(dtype=torch.float64).eval()
    twin = convert(model)
    assert not twin.training
    x = entry.example_input(dtype=torch.float64)
    assert_close_scaled(twin(x), model(x), torch.float64)
    # A single image through the convolutions only (the heads pool over (H, W) of a batch).
    conv = converted_layers(twin)
    first = next(iter(conv.values()))
    assert_close_scaled(first(x[0]), model.get_submodule(next(iter(conv)))(x[0]), torch.float64)


def _train(model, entry, dtype, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x = torch.randn(entry.input_shape, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.randint(0, 10, (entry.input_shape[0],), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_equivalence_sgd_steps_float64():
    """ResNet-style net and its twin, same initial weights, 5 SGD steps (momentum, weight decay) on
    synthetic data: losses, parameters and BatchNorm running statistics stay equal to 1e-10."""
    entry = REFERENCE_MODELS["resnet"]
    model = entry.build(dtype=torch.float64)
    twin = convert(model)
    losses, twin_losses = _train(model, entry, torch.float64), _train(twin, entry, torch.float64)
    for step, (a, b) in enumerate(zip(twin_losses, losses)):
        assert abs(a - b) <= 1e-10 * max(1.0, abs(b)), f"loss at step {step}: {a} vs {b}"
    assert losses[-1] != losses[0]  # it trained
    ref_state, state = model.state_dict(), twin.state_dict()
    assert list(ref_state) == list(state)
    for k in ref_state:
        if ref_state[k].is_floating_point():
            assert_close_scaled(state[k], ref_state[k], torch.float64, msg=k)
        else:
            assert torch.equal(state[k], ref_state[k]), k
    assert all(isinstance(m, ImageGridConv2d) for m in converted_layers(twin).values())


def test_training_in_float32_stays_as_close_to_float64_as_conv2d_does():
    """In float32 two correct implementations drift apart through training (each step's rounding feeds the
    next), so the float32 twin is held to the float64 trajectory: after 5 SGD steps its parameters and
    statistics are no further from the float64 model's than nn.Conv2d's own float32 run is (within 10x)."""
    entry = REFERENCE_MODELS["resnet"]
    reference = entry.build(dtype=torch.float64)
    model = copy.deepcopy(reference).float()
    twin = convert(model)
    _train(reference, entry, torch.float64)
    _train(model, entry, torch.float32)
    _train(twin, entry, torch.float32)
    ref_state = reference.state_dict()
    for k, want in ref_state.items():
        if not want.is_floating_point():
            continue
        scale = max(1.0, want.abs().max().item())
        torch_drift = (model.state_dict()[k].double() - want).abs().max().item() / scale
        twin_drift = (twin.state_dict()[k].double() - want).abs().max().item() / scale
        assert twin_drift <= 10 * torch_drift + 1e-6, f"{k}: twin {twin_drift:.2e}, nn.Conv2d {torch_drift:.2e}"
