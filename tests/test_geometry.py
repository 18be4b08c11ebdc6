"""ConvGeometry: the normalised geometry every other part reads; its sizes are nn.Conv2d's."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from gridgraph import ConvGeometry, GridConv2d


def conv2d_output_size(kwargs: dict, size: tuple[int, int]) -> tuple[int, int]:
    conv = nn.Conv2d(1, 1, **kwargs)
    return tuple(conv(torch.zeros(1, 1, *size)).shape[-2:])


SIZE_CASES = [
    dict(kernel_size=k, stride=s, padding=p, dilation=d)
    for k, s, p, d in itertools.product([1, 2, 3, (1, 7), (3, 2)], [1, 2, 3], [0, 1, 2, (2, 0)], [1, 2, 3])
] + [dict(kernel_size=k, padding=p, dilation=d) for k, p, d in itertools.product(
    [1, 2, 3, 4, 5, (3, 2)], ["same", "valid"], [1, 2, 3])]


@pytest.mark.parametrize("size", [(9, 11), (7, 7)])
def test_output_size_is_conv2d_formula(size):
    checked = 0
    for kwargs in SIZE_CASES:
        geometry = ConvGeometry.from_keywords(2, **kwargs)
        try:
            want = conv2d_output_size(kwargs, size)
        except RuntimeError:  # Conv2d refuses: the geometry must refuse too
            with pytest.raises(ValueError):
                geometry.output_size(size)
            continue
        assert geometry.output_size(size) == want, kwargs
        checked += 1
    assert checked > len(SIZE_CASES) // 2


@pytest.mark.parametrize("k, d", [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (2, 3), (4, 3), (7, 1)])
def test_same_padding_matches_conv2d(k, d):
    """'same' splits ``d*(k-1)`` as Conv2d does: the smaller half before, the larger after."""
    geometry = ConvGeometry.from_keywords(2, kernel_size=(k, 3), padding="same", dilation=(d, 1))
    total = d * (k - 1)
    assert geometry.padding == ((total // 2, total - total // 2), (1, 1))
    conv = nn.Conv2d(1, 1, (k, 3), padding="same", dilation=(d, 1))
    left, right = conv._reversed_padding_repeated_twice[2:]  # F.pad order: (W pads, H pads)
    assert geometry.padding[0] == (left, right)
    assert geometry.output_size((6, 5)) == (6, 5)


def test_valid_and_int_and_tuple_padding():
    assert ConvGeometry.from_keywords(2, 3, padding="valid").padding == ((0, 0), (0, 0))
    assert ConvGeometry.from_keywords(2, 3, padding=2).padding == ((2, 2), (2, 2))
    assert ConvGeometry.from_keywords(2, 3, padding=(2, 0)).padding == ((2, 2), (0, 0))
    g = ConvGeometry.from_keywords(2, (3, 2), stride=(2, 1), dilation=(1, 3))
    assert (g.kernel_size, g.stride, g.dilation, g.num_taps, g.ndim) == ((3, 2), (2, 1), (1, 3), 6, 2)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), padding=(2, 1),
                                                                       dilation=(2, 3)),
                                    dict(kernel_size=5, padding="same", dilation=2),
                                    dict(kernel_size=4, padding="same")])
def test_offsets_are_taps_row_major(kwargs):
    g = ConvGeometry.from_keywords(2, **kwargs)
    (kh, kw), (dh, dw), ((pt, _), (pl, _)) = g.kernel_size, g.dilation, g.padding
    offsets = g.offsets()
    assert offsets.dtype == torch.long and offsets.shape == (kh * kw, 2)
    for u in range(kh):
        for v in range(kw):
            assert offsets[u * kw + v].tolist() == [u * dh - pt, v * dw - pl]


@pytest.mark.parametrize("k, d", [(1, 1), (3, 1), (3, 2), (5, 1), (7, 3), ((3, 5), 1)])
def test_centre_tap_of_same_kernel_is_zero_offset(k, d):
    g = ConvGeometry.from_keywords(2, kernel_size=k, padding="same", dilation=d)
    kh, kw = g.kernel_size
    assert g.offsets()[(kh // 2) * kw + kw // 2].tolist() == [0, 0]


def test_from_module():
    conv = nn.Conv2d(3, 4, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), padding_mode="reflect")
    g = ConvGeometry.from_module(conv)
    assert g == ConvGeometry.from_keywords(2, (3, 2), 2, (1, 0), (1, 2), "reflect")
    assert ConvGeometry.from_module(GridConv2d.from_conv2d(conv)) == g
    assert ConvGeometry.from_module(nn.Conv1d(1, 1, 3)).ndim == 1
    with pytest.raises(TypeError, match="conv must be an nn.Conv1d/Conv2d/Conv3d.*got Linear"):
        ConvGeometry.from_module(nn.Linear(2, 2))


def test_hashable_and_immutable():
    a = ConvGeometry.from_keywords(2, 3, padding=1)
    b = ConvGeometry.from_keywords(2, (3, 3), 1, (1, 1), 1, "zeros")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != ConvGeometry.from_keywords(2, 3, padding=1, padding_mode="circular")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.stride = (2, 2)  # type: ignore[misc]


@pytest.mark.parametrize("padding", [0, 1, (2, 1), "same"])
def test_torch_padding_round_trip(padding):
    g = ConvGeometry.from_keywords(2, 3, padding=padding)
    assert ConvGeometry.from_keywords(2, 3, padding=g.torch_padding()) == g


def test_describe():
    assert ConvGeometry.from_keywords(2, 3, padding=1).describe() == "k3x3 s1x1 p1x1 d1x1 zeros"
    assert ConvGeometry.from_keywords(2, 2, padding="same", padding_mode="circular").describe() == \
        "k2x2 s1x1 p0+1x0+1 d1x1 circular"


BAD_KEYWORDS = [
    (dict(kernel_size=0), ValueError, r"kernel_size must be positive \(got \(0, 0\)\)"),
    (dict(kernel_size=(3, -1)), ValueError, "kernel_size must be positive"),
    (dict(kernel_size=3, stride=0), ValueError, r"stride must be positive \(got \(0, 0\)\)"),
    (dict(kernel_size=3, padding=-1), ValueError, r"padding must be non-negative"),
    (dict(kernel_size=3, dilation=0), ValueError, r"dilation must be positive \(got \(0, 0\)\)"),
    (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size must be an int or a tuple of 2 ints \(got \(3, 3, 3\)\)"),
    (dict(kernel_size=3, stride=(1, 2.0)), ValueError, "stride must be an int or a tuple of 2 ints"),
    (dict(kernel_size=True), TypeError, "kernel_size must be an int or a tuple of 2 ints"),
    (dict(kernel_size="3"), TypeError, "kernel_size must be an int or a tuple of 2 ints"),
    (dict(kernel_size=3, padding="full"), ValueError, "Invalid padding string 'full'"),
    (dict(kernel_size=3, padding="same", stride=2), ValueError,
     "padding='same' is not supported for strided convolutions"),
    (dict(kernel_size=3, padding_mode="zero"), ValueError, "padding_mode must be one of"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_KEYWORDS)
def test_bad_keywords(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ConvGeometry.from_keywords(2, **kwargs)


TOO_SMALL = [
    (dict(kernel_size=5), (4, 9), "image too small for the kernel"),
    (dict(kernel_size=3, dilation=3), (6, 6), "image too small for the kernel"),
    (dict(kernel_size=(1, 7), padding=(0, 1)), (3, 4), "image too small for the kernel"),
    (dict(kernel_size=3, padding=3, padding_mode="reflect"), (3, 8), "padding_mode='reflect'"),
    (dict(kernel_size=3, padding=(0, 2), padding_mode="reflect"), (5, 2), "padding_mode='reflect'"),
    (dict(kernel_size=9, padding=4, padding_mode="circular"), (3, 3), "wrap around more than once"),
]


@pytest.mark.parametrize("kwargs, size, match", TOO_SMALL)
def test_too_small_images_are_refused_where_conv2d_refuses(kwargs, size, match):
    with pytest.raises(RuntimeError):
        nn.Conv2d(1, 1, **kwargs)(torch.zeros(1, 1, *size))
    with pytest.raises(ValueError, match=match):
        ConvGeometry.from_keywords(2, **kwargs).output_size(size)


def test_limits_where_conv2d_still_works():
    """Reflect padding up to size - 1 and circular padding up to the size itself are accepted, as in Conv2d."""
    for kwargs, size in [(dict(kernel_size=5, padding=2, padding_mode="reflect"), (3, 3)),
                         (dict(kernel_size=7, padding=3, padding_mode="circular"), (3, 3)),
                         (dict(kernel_size=3, padding=5, padding_mode="replicate"), (1, 1))]:
        assert ConvGeometry.from_keywords(2, **kwargs).output_size(size) == conv2d_output_size(kwargs, size)


def test_output_size_needs_matching_dimensions():
    with pytest.raises(ValueError, match=r"expected a grid of 2 dimensions \(got size \(5,\)\)"):
        ConvGeometry.from_keywords(2, 3).output_size((5,))
    with pytest.raises(ValueError, match="image size must be positive"):
        ConvGeometry.from_keywords(2, 1).output_size((0, 4))


def test_choice_lists_in_messages_do_not_depend_on_the_hash_seed():
    """The same bad keyword gives the same message under any ``PYTHONHASHSEED`` (choices in a fixed order)."""
    import os
    import subprocess
    import sys

    script = ("from gridgraph.geometry import ConvGeometry\n"
              "for kw in (dict(padding_mode='zero'), dict(padding='full')):\n"
              "    try:\n"
              "        ConvGeometry.from_keywords(2, 3, **kw)\n"
              "    except ValueError as err:\n"
              "        print(err)\n")
    messages = set()
    for seed in ("0", "3", "7"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        messages.add(proc.stdout)
    assert len(messages) == 1, messages
    assert messages.pop().splitlines() == [
        "padding_mode must be one of ('zeros', 'reflect', 'replicate', 'circular'), but got padding_mode='zero'",
        "Invalid padding string 'full', should be one of ('same', 'valid')"]
