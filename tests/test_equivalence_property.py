"""Property-based search: for any nn.Conv2d configuration, GridConv2d gives the same numbers.

Hypothesis draws a configuration from the space of issue 2 (kernel 1-7, square or rectangular; stride
1-3; padding 0-3, tuples, 'same', 'valid'; dilation 1-3; groups 1, 2 or channels with a depth
multiplier; bias on or off; the four padding modes; batch 0, 1 or 3; images from 1x1 up), builds the
``nn.Conv2d``, and compares forward and gradients (input, weight, bias) in float64 on the neighbour-table
path, the general edge-list path and a shuffled edge list.

Where ``nn.Conv2d`` refuses a configuration (constructor or forward), gridgraph must refuse it too, with
a ValueError / TypeError (the same message for the constructor); such examples are then discarded.
Run ``HYPOTHESIS_PROFILE=thorough pytest tests/test_equivalence_property.py`` for a longer search.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from torch import nn

from gridgraph import GridConv2d, image_to_graph
from _conv_reference import PATHS, check_conv, randomise_

pairs = st.tuples

kernel_sizes = st.one_of(st.sampled_from([1, 2, 3, 5, 7]), pairs(st.integers(1, 7), st.integers(1, 7)),
                         st.sampled_from([(1, 7), (3, 2), (7, 1)]))
strides = st.one_of(st.integers(1, 3), pairs(st.integers(1, 3), st.integers(1, 3)))
paddings = st.one_of(st.integers(0, 2), pairs(st.integers(0, 3), st.integers(0, 3)), st.sampled_from(["same", "valid"]))
dilations = st.one_of(st.integers(1, 3), pairs(st.integers(1, 3), st.integers(1, 3)))
modes = st.sampled_from(["zeros", "reflect", "replicate", "circular"])


@st.composite
def conv_configs(draw):
    kind = draw(st.sampled_from(["dense", "groups=2", "depthwise"]))
    if kind == "dense":
        groups, c_in, c_out = 1, draw(st.integers(1, 4)), draw(st.integers(1, 4))
    elif kind == "groups=2":
        groups, c_in, c_out = 2, 2 * draw(st.integers(1, 2)), 2 * draw(st.integers(1, 2))
    else:
        c_in = draw(st.integers(1, 4))
        groups, c_out = c_in, c_in * draw(st.integers(1, 3))
    kwargs = dict(kernel_size=draw(kernel_sizes), stride=draw(strides), padding=draw(paddings),
                  dilation=draw(dilations), groups=groups, bias=draw(st.booleans()), padding_mode=draw(modes))
    batch = draw(st.sampled_from([0, 1, 3]))
    height, width = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    return c_in, c_out, kwargs, batch, height, width


@settings(max_examples=max(120, settings.default.max_examples))
@given(config=conv_configs(), seed=st.integers(0, 2 ** 16))
def test_grid_conv_equals_conv2d(config, seed, device):
    c_in, c_out, kwargs, batch, height, width = config
    note(f"Conv2d({c_in}, {c_out}, **{kwargs}) on a {batch}x{c_in}x{height}x{width} batch")
    try:
        conv = nn.Conv2d(c_in, c_out, **kwargs, device=device, dtype=torch.float64)
    except (ValueError, TypeError) as refusal:
        with pytest.raises(type(refusal), match=f"^{re.escape(str(refusal))}$"):
            GridConv2d(c_in, c_out, **kwargs)
        assume(False)
    randomise_(conv, torch.Generator().manual_seed(seed))
    images = torch.randn(batch, c_in, height, width, dtype=torch.float64, device=device)
    try:
        conv(images)
    except RuntimeError:  # too small for the kernel, reflect padding too large, circular wrapping twice
        with pytest.raises((ValueError, TypeError)):
            image_to_graph(images, conv)
        assume(False)
    layer = GridConv2d.from_conv2d(conv)
    for path in PATHS:
        check_conv(conv, layer, batch, height, width, path, seed=seed)
