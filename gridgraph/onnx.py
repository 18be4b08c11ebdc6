"""ONNX export of graph layers and converted networks.

The graph layers call gridgraph's own operators (``torch.ops.gridgraph.grid_conv``, ``conv_image``, ``edge_conv``), which
ONNX does not know. :func:`onnx_translations` gives, for ``torch.onnx.export(..., dynamo=True)``'s
``custom_translation_table``, their message passing written in standard ONNX operators:

* ``grid_conv`` (pixel graphs, converted networks): the neighbour table of the operator's structure key
  becomes a constant ``[N_out, T]`` index; the features get a zero row appended (the absent edges'
  source), ``Gather`` collects every target's ``T`` source rows and one ``MatMul`` per group multiplies
  them by the stacked tap weights, bias added: the same gather-then-GEMM as the CPU kernel, so zero
  padding times an Inf weight is NaN as in ``nn.Conv2d``.
* ``conv_image`` (the image layers of converted networks): the image transposed to node features, the
  ``grid_conv`` translation, and back to an image.
* ``edge_conv`` (masked, sparse and plain edge lists): every source's message per tap (one ``Einsum``),
  ``Gather`` by ``source * T + tap``, ``ScatterND`` with ``reduction='add'`` into the targets; on a pixel
  graph, targets with an absent tap get the NaN that zero padding gives with non-finite weights.

No ONNX ``Conv`` is emitted: the exported model computes from the graph's structure as the layer does.
The ONNX tools (``onnx``, ``onnxscript``) are needed only here: ``pip install gridgraph[onnx]``.

Example::

    twin = gridgraph.convert(net).eval()
    gridgraph.export_onnx(twin, (torch.randn(1, 3, 32, 32),), "twin.onnx")

The exported model has the shapes of the example input (a pixel graph's structure is fixed at export).
Only the forward operators are translated (ONNX holds inference graphs).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .structure import cached_table, parse_key

__all__ = ["onnx_translations", "export_onnx"]


def _opset():
    try:
        from onnxscript import opset18
    except ImportError as error:  # pragma: no cover - exercised where onnxscript is absent
        raise ImportError("ONNX export needs onnx and onnxscript: pip install gridgraph[onnx] "
                          "(or pip install onnx onnxscript)") from error
    return opset18


def _neighbour_table(key: str) -> torch.Tensor:
    """``[B * N_out, T]`` int64: the source of every (target, tap) slot of the grid part ``key``, holes
    pointing at row ``B * N_src`` (the zero row appended to the features)."""
    _, geometry, in_size, num_images = parse_key(key)
    table = cached_table(geometry, in_size, torch.device("cpu"))
    index = table.index.long()
    per_image = index.unsqueeze(0) + (torch.arange(num_images) * table.num_src).view(-1, 1, 1)
    holes = num_images * table.num_src
    return torch.where(index.unsqueeze(0) >= 0, per_image, holes).reshape(-1, index.size(1))


def _grouped_matmul(op, cols, weight, num_rows: int, num_taps: int, groups: int, c_in: int, c_out: int):
    """``cols`` ``[R, T, C_in]`` (gathered sources) times the conv weight ``(C_out, C_in/G, *kernel)``:
    ``[R, C_out]``, one MatMul per group."""
    a, b = c_in // groups, c_out // groups
    # cols -> [G, R, T*a]
    cols = op.Reshape(cols, op.Constant(value_ints=[num_rows, num_taps, groups, a]))
    cols = op.Transpose(cols, perm=[2, 0, 1, 3])
    cols = op.Reshape(cols, op.Constant(value_ints=[groups, num_rows, num_taps * a]))
    # weight (C_out, a, *kernel) -> [G, b, a, T] -> [G, T, a, b] -> [G, T*a, b]
    w = op.Reshape(weight, op.Constant(value_ints=[groups, b, a, num_taps]))
    w = op.Transpose(w, perm=[0, 3, 2, 1])
    w = op.Reshape(w, op.Constant(value_ints=[groups, num_taps * a, b]))
    out = op.MatMul(cols, w)  # [G, R, b]
    out = op.Transpose(out, perm=[1, 0, 2])
    return op.Reshape(out, op.Constant(value_ints=[num_rows, c_out]))


def _grid_conv(x, weight, bias=None, key: str = "", groups: int = 1, c_out: Optional[int] = None,
               c_in: Optional[int] = None):
    op = _opset()
    index = _neighbour_table(key)
    num_rows, num_taps = index.shape
    c_in = x.shape[1] if c_in is None else c_in
    c_out = weight.shape[0] if c_out is None else c_out
    padded = op.Pad(x, op.Constant(value_ints=[0, 0, 1, 0]))  # the zero row absent edges read
    cols = op.Gather(padded, op.Constant(value=_ir_tensor(index)), axis=0)  # [R, T, C_in]
    out = _grouped_matmul(op, cols, weight, num_rows, num_taps, groups, c_in, c_out)
    return out if bias is None else op.Add(out, bias)


def _conv_image(input, weight, bias=None, key: str = "", groups: int = 1, out_strides=(), in_strides=(),
                weight_strides=()):
    """The image operator of converted layers: images to node features, the grid translation, back to images
    (memory formats do not exist in ONNX)."""
    op = _opset()
    kind, geometry, in_size, num_images = parse_key(key)
    n = len(in_size)
    c_in = input.shape[1]
    nodes = op.Reshape(op.Transpose(input, perm=[0, *range(2, n + 2), 1]), op.Constant(value_ints=[-1, c_in]))
    if kind == "transposed":  # the transposed layer's weight (C_in, C_out/G, *k) as its reversed graph's
        a, b = weight.shape[0], weight.shape[1]
        k = list(weight.shape[2:])
        w = op.Reshape(weight, op.Constant(value_ints=[groups, a // groups, b, -1]))
        w = op.Transpose(w, perm=[0, 2, 1, 3])
        weight = op.Reshape(w, op.Constant(value_ints=[groups * b, a // groups, *k]))
        c_out = groups * b
    else:
        c_out = weight.shape[0]
    out = _grid_conv(nodes, weight, bias, key, groups, c_out=c_out, c_in=c_in)
    out_size = list(geometry.output_size(in_size))
    out = op.Reshape(out, op.Constant(value_ints=[num_images, *out_size, c_out]))
    return op.Transpose(out, perm=[0, n + 1, *range(1, n + 1)])


def _edge_conv(x, edge_index, edge_type, weight, bias=None, num_dst: int = 0, groups: int = 1,
               holes: bool = False, cache: bool = False):
    op = _opset()
    c_in, c_out = x.shape[1], weight.shape[0]
    num_taps = 1
    for k in weight.shape[2:]:
        num_taps *= k
    a, b = c_in // groups, c_out // groups
    # every source's message through every tap: [N, T, C_out]
    xg = op.Reshape(x, op.Constant(value_ints=[-1, groups, a]))
    w = op.Reshape(weight, op.Constant(value_ints=[groups, b, a, num_taps]))
    messages = op.Einsum(xg, w, equation="nga,gbat->ntgb")
    messages = op.Reshape(messages, op.Constant(value_ints=[-1, c_out]))  # row src * T + tap
    src = op.Gather(edge_index, op.Constant(value_int=0), axis=0)
    dst = op.Gather(edge_index, op.Constant(value_int=1), axis=0)
    taps = op.Cast(edge_type, to=7)  # int64
    flat = op.Add(op.Mul(src, op.Constant(value_int=num_taps)), taps)
    picked = op.Gather(messages, flat, axis=0)  # [E, C_out]
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), x), op.Constant(value_ints=[num_dst, c_out]))
    out = op.ScatterND(zeros, op.Unsqueeze(dst, op.Constant(value_ints=[1])), picked, reduction="add")
    if bias is not None:
        out = op.Add(out, bias)
    if holes:
        # an absent tap adds what zero padding adds: zero, or NaN where that tap's weights hold Inf/NaN
        bad = op.ReduceSum(op.Mul(op.Reshape(weight, op.Constant(value_ints=[groups, b, a, num_taps])),
                                  op.CastLike(op.Constant(value_float=0.0), x)),
                           op.Constant(value_ints=[2]), keepdims=0)  # [G, b, T]: 0 or NaN
        bad = op.Transpose(op.Reshape(bad, op.Constant(value_ints=[c_out, num_taps])), perm=[1, 0])  # [T, C_out]
        bad = op.Cast(op.IsNaN(bad), to=1)
        slots = op.Add(op.Mul(dst, op.Constant(value_int=num_taps)), taps)
        present = op.ScatterND(op.Expand(op.Constant(value_float=0.0), op.Constant(value_ints=[num_dst * num_taps])),
                               op.Unsqueeze(slots, op.Constant(value_ints=[1])),
                               op.Expand(op.Constant(value_float=1.0), op.Shape(slots)), reduction="max")
        missing = op.Sub(op.Constant(value_float=1.0), op.Reshape(present, op.Constant(value_ints=[num_dst, num_taps])))
        hit = op.Greater(op.MatMul(missing, bad), op.Constant(value_float=0.0))
        out = op.Where(hit, op.CastLike(op.Constant(value_float=float("nan")), out), out)
    return out


def _ir_tensor(t: torch.Tensor):
    from onnxscript import ir
    return ir.tensor(t.numpy())


def onnx_translations() -> dict:
    """``{operator: ONNX function}`` for ``torch.onnx.export(..., dynamo=True,
    custom_translation_table=...)``: gridgraph's forward operators in standard ONNX operators.

    Example:
        >>> table = onnx_translations()                      # for torch.onnx.export(..., custom_translation_table=table)
        >>> sorted(str(op) for op in table)[:2]
        ['gridgraph.conv_image.default', 'gridgraph.edge_conv.default']
    """
    _opset()
    return {torch.ops.gridgraph.grid_conv.default: _grid_conv,
            torch.ops.gridgraph.conv_image.default: _conv_image,
            torch.ops.gridgraph.edge_conv.default: _edge_conv}


def export_onnx(model: torch.nn.Module, args: tuple, f: Any = None, **kwargs: Any):
    """``torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=onnx_translations())``.

    Shapes are fixed at export (a pixel graph's structure is part of the exported graph, as its neighbour
    table). Returns the ``ONNXProgram``; keyword arguments go to :func:`torch.onnx.export`.

    Example:
        >>> import tempfile, os
        >>> twin = convert(torch.nn.Conv2d(3, 4, 3, padding=1)).eval()
        >>> with tempfile.TemporaryDirectory() as folder:              # needs the "onnx" extra
        ...     path = os.path.join(folder, "twin.onnx")
        ...     _ = export_onnx(twin, (torch.randn(1, 3, 8, 8),), path, verbose=False)
        ...     os.path.getsize(path) > 0
        True
    """
    table = dict(onnx_translations())
    table.update(kwargs.pop("custom_translation_table", None) or {})
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)
