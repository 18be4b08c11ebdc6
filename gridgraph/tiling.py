"""Exact tiled and spatially parallel execution of converted networks: :func:`tiled`, :func:`spatial_parallel`.

Message passing is local: an output pixel needs only the pixels its receptive field reaches. A network is
traced once (``torch.fx``, as :func:`~gridgraph.to_gnn` traces it); for a block of the output (a tile, or a
process's band of rows) the pixels each layer must compute are found backwards through the trace, layer by
layer: a convolution needs its window of every output pixel (strides and dilations included), its padding
read from the image itself where the image has pixels (an interior seam has no padding) and made at the
image border as the layer's ``padding_mode`` makes it (zeros, reflect, replicate, circular: the rows of the
other side of the image); a transposed convolution needs the inputs whose messages reach the block;
elementwise layers need the same pixels. Each layer then computes exactly those pixels, as message passing
on the gathered pixels with no padding of its own: every output pixel sums the same messages, with the same
weights, as in the whole-image run.

A region is a set of pixels per spatial axis (sorted, disjoint intervals; their product is the region), so
that circular padding's far rows cost only themselves.

Backward recomputes each tile's forward (memory stays bounded by a tile's activations) and sums the tiles'
weight gradients; a global average pooling at the end of the network (followed by any non-spatial head) is
summed tile by tile.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import routing
from .conversion import CONVERSIONS, convert
from .geometry import ConvGeometry, TransposedGeometry

__all__ = ["tiled", "spatial_parallel", "Tiled", "SpatialParallel", "receptive_halo"]

Intervals = tuple  # ((start, stop), ...) sorted, disjoint, merged
Region = tuple  # one Intervals per spatial axis


# ------------------------------------------------------------------------------------ intervals
def _merge(pieces) -> Intervals:
    out: list = []
    for a, b in sorted(p for p in pieces if p[1] > p[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


def _union(a: Region, b: Optional[Region]) -> Region:
    return a if b is None else tuple(_merge(x + y) for x, y in zip(a, b))


def _count(iv: Intervals) -> int:
    return sum(b - a for a, b in iv)


def _coords(iv: Intervals) -> list:
    return [c for a, b in iv for c in range(a, b)]


def _source(c: int, size: int, mode: str) -> int:
    """The pixel a padded coordinate reads (``-1``: a zero)."""
    if 0 <= c < size:
        return c
    if mode == "zeros":
        return -1
    if mode == "reflect":
        return -c if c < 0 else 2 * (size - 1) - c
    if mode == "replicate":
        return 0 if c < 0 else size - 1
    return c % size  # circular


def _sources(lo: int, hi: int, size: int, mode: str) -> Intervals:
    """The pixels the padded coordinates ``[lo, hi)`` read, as intervals."""
    inside = [(max(lo, 0), min(hi, size))]
    if mode == "zeros":
        return _merge(inside)
    extra = [_source(c, size, mode) for c in list(range(lo, min(0, hi))) + list(range(max(size, lo), hi))]
    return _merge(inside + [(c, c + 1) for c in extra])


# ------------------------------------------------------------------------------------ values
class _Value:
    """A spatial tensor ``[B, C, *stored]`` holding the pixels ``region`` of a grid ``size``."""

    __slots__ = ("tensor", "region", "size")

    def __init__(self, tensor: Tensor, region: Region, size: tuple) -> None:
        self.tensor, self.region, self.size = tensor, region, size

    def position(self, axis: int, c: int) -> int:
        offset = 0
        for a, b in self.region[axis]:
            if a <= c < b:
                return offset + c - a
            offset += b - a
        raise KeyError(c)

    def positions(self, axis: int, coords: Sequence[int]) -> Tensor:
        return torch.tensor([self.position(axis, c) for c in coords], dtype=torch.long, device=self.tensor.device)

    def _run(self, axis: int, coords: Sequence[int]) -> Optional[int]:
        """The stored position where ``coords`` start when they are consecutive stored pixels, else None."""
        if not coords or any(b - a != 1 for a, b in zip(coords, coords[1:])):
            return None
        for a, b in self.region[axis]:
            if a <= coords[0] and coords[-1] < b:
                return self.position(axis, coords[0])
        return None

    @classmethod
    def whole(cls, x: Tensor) -> "_Value":
        """The whole grid of ``x``."""
        size = tuple(x.shape[2:])
        return cls(x, tuple(((0, n),) for n in size), size)

    def index(self, axis: int, iv: Intervals) -> Any:
        """Where the pixels ``iv`` are stored along ``axis``: None (all of them, in order), ``(start, length)``
        (consecutive: a narrow view) or an index tensor."""
        if iv == self.region[axis]:
            return None
        coords = _coords(iv)
        start = self._run(axis, coords)
        return (start, len(coords)) if start is not None else self.positions(axis, coords)

    def restrict(self, region: Region) -> Tensor:
        """The tensor of ``region`` (a subset of the stored pixels)."""
        t = self.tensor
        for axis, iv in enumerate(region):
            ix = self.index(axis, iv)
            if isinstance(ix, tuple):
                t = t.narrow(2 + axis, *ix)
            elif ix is not None:
                t = t.index_select(2 + axis, ix)
        return t

    def add(self, region: Region, grad: Tensor) -> None:
        """``tensor[region] += grad`` in place (narrow views where the pixels are consecutive)."""
        _add_at(self.tensor, [self.index(axis, iv) for axis, iv in enumerate(region)], grad)

    def gather(self, virtual: Sequence[tuple], mode: str, fill: float = 0.0) -> Tensor:
        """Per axis ``(lo, hi)`` padded coordinates: the stored pixels they read, ``fill`` for zero padding."""
        t = self.tensor
        for axis, (lo, hi) in enumerate(virtual):
            size = self.size[axis]
            src = [_source(c, size, mode) for c in range(lo, hi)]
            if src == _coords(self.region[axis]):
                continue
            start = self._run(axis, src) if src and src[0] >= 0 else None
            if start is not None:
                t = t.narrow(2 + axis, start, len(src))
                continue
            valid = [s for s in src if s >= 0]
            index = self.positions(axis, valid)
            if len(valid) == len(src):
                t = t.index_select(2 + axis, index)
                continue
            shape = list(t.shape)
            shape[2 + axis] = len(src)
            out = t.new_full(shape, fill)
            where = torch.tensor([i for i, s in enumerate(src) if s >= 0], dtype=torch.long, device=t.device)
            out = out.index_copy(2 + axis, where, t.index_select(2 + axis, index))
            t = out
        return t


# ------------------------------------------------------------------------------------ the plan
_ELEMENTWISE = None


def _elementwise():
    global _ELEMENTWISE
    if _ELEMENTWISE is None:
        from . import gnn
        _ELEMENTWISE = (gnn._ELEMENTWISE_MODULES, gnn._ELEMENTWISE_FUNCTIONS, gnn._BINARY)
    return _ELEMENTWISE


class TilingError(NotImplementedError):
    """A layer that cannot be computed tile by tile exactly (named with its module path)."""


def _where(node) -> str:
    return f"{node.name!r}" + (f" (module {node.target!r})" if node.op == "call_module" else "")


class _Step:
    """One traced node, classified: ``kind`` in conv, transposed, pool, pointwise, cat, input, readout, head."""

    __slots__ = ("node", "kind", "module", "geometry", "inputs", "size", "extra")

    def __init__(self, node, kind, module=None, geometry=None, inputs=(), size=None, extra=None):
        self.node, self.kind, self.module, self.geometry = node, kind, module, geometry
        self.inputs, self.size, self.extra = tuple(inputs), size, extra


class _Plan:
    """The traced network, classified node by node for an input grid ``size``."""

    def __init__(self, root: nn.Module, graph: torch.fx.Graph, size: tuple, training: bool) -> None:
        self.root, self.graph, self.size = root, graph, tuple(size)
        self.steps: dict = {}
        self._needs: dict = {}  # out region -> the regions every step computes for it
        self.static: dict = {}  # shape values read from images (their grids)
        self.order: list = []
        self.readout: Optional[_Step] = None
        modules = dict(root.named_modules())
        elementwise_modules, elementwise_functions, binary = _elementwise()
        spatial: dict = {}  # node -> grid size
        for node in graph.nodes:
            if node.op == "placeholder":
                if spatial:
                    raise TilingError("tiled: the network takes one image input")
                step = _Step(node, "input", size=self.size)
            elif node.op == "output":
                self.output = node.args[0]
                if not isinstance(self.output, torch.fx.Node):
                    raise TilingError("tiled: the network must return one tensor")
                continue
            else:
                inputs = [a for a in node.all_input_nodes if a in spatial]
                shape = self._static_shape(node, spatial)
                if shape is not None:  # x.shape / x.shape[-2:] of an image: its grid, known from the plan
                    self.static[node] = shape
                    self.steps[node] = _Step(node, "static")
                    continue
                if not inputs:
                    self.steps[node] = _Step(node, "head")
                    continue
                step = self._classify(node, modules, inputs, spatial, elementwise_modules, elementwise_functions,
                                      binary, training)
            self.steps[node] = step
            if step.kind == "readout":
                if self.readout is not None:
                    raise TilingError(f"tiled: {_where(self.readout.node)} is a global pooling in the middle of the "
                                      f"network (another follows, {_where(node)}; e.g. squeeze-and-excitation): no "
                                      "tile can be computed before the whole image is")
                self.readout = step
            else:
                spatial[node] = step.size
                self.order.append(step)
        if self.readout is not None:  # after the readout nothing spatial may run
            after = set()
            for node in graph.nodes:
                if node is self.readout.node or any(a in after for a in node.all_input_nodes):
                    after.add(node)
                    if node in spatial:
                        raise TilingError(f"tiled: {_where(node)} mixes the image with its global pooling "
                                          f"{_where(self.readout.node)} (a global pooling in the middle of the "
                                          "network, e.g. squeeze-and-excitation): no tile can be computed "
                                          "before the whole image is")
            if self.output not in after:
                raise TilingError("tiled: the network's output does not depend on its global pooling")
        elif self.output not in spatial:
            raise TilingError("tiled: the network's output is not an image")
        self.out_step = self.readout if self.readout is not None else self.steps[self.output]
        self.spatial = spatial
        self._last_use: dict = {}
        for step in self.order:
            for a in step.inputs:
                self._last_use[a] = step.node
            for a in step.node.all_input_nodes:  # non-spatial readers (e.g. a readout) count too
                if a in spatial and a not in step.inputs:
                    self._last_use[a] = step.node

    def _static_shape(self, node, spatial) -> Optional[tuple]:
        """``x.shape`` / ``x.size()`` of an image (``(None, None, *grid)``: batch and channels are not static
        here) and the grid part of it (``x.shape[-2:]``, ``x.shape[2]``)."""
        if node.op == "call_function" and node.target is getattr and node.args[1] == "shape" and \
                node.args[0] in spatial:
            return (None, None) + tuple(spatial[node.args[0]])
        if node.op == "call_method" and node.target == "size" and len(node.args) == 1 and node.args[0] in spatial:
            return (None, None) + tuple(spatial[node.args[0]])
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.static:
            value = self.static[node.args[0]][node.args[1]]
            if value is None or (isinstance(value, tuple) and None in value):
                raise TilingError(f"tiled: {_where(node)} reads the batch or channel count of an image")
            return value if isinstance(value, tuple) else (value,)
        return None

    def _classify(self, node, modules, inputs, spatial, em, ef, binary, training) -> _Step:
        size = spatial[inputs[0]]
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, tuple(CONVERSIONS.values())):
                if getattr(module, "transposed_geometry", None) is not None:
                    g = module.transposed_geometry
                    return _Step(node, "transposed", module, g, inputs, g.output_size(size))
                g = module.geometry
                return _Step(node, "conv", module, g, inputs, g.output_size(size))
            if isinstance(module, tuple(CONVERSIONS)) or routing.is_routed(module):
                raise TilingError(f"tiled: {_where(node)} is a torch convolution or a routed module: convert the "
                                  "model first (gridgraph.convert)")
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if training and (module.training or module.running_mean is None):
                    raise TilingError(f"tiled: {_where(node)} is a BatchNorm in training mode: its statistics "
                                      "are over the whole image (put it in eval mode: model.eval() or "
                                      "freeze it)")
                return _Step(node, "pointwise", module, None, inputs, size)
            if isinstance(module, (nn.Dropout, nn.Dropout2d)) and module.training and module.p > 0:
                raise TilingError(f"tiled: {_where(node)} is an active dropout (random per call): eval mode")
            if isinstance(module, em):
                return _Step(node, "pointwise", module, None, inputs, size)
            if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                                   nn.AvgPool3d)):
                return self._pool(node, module, inputs, size)
            if isinstance(module, nn.Upsample):
                return self._interp(node, inputs, size, module.size, module.scale_factor, module.mode,
                                    module.align_corners, getattr(module, "recompute_scale_factor", None))
            if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
                if all(o == 1 for o in _tuple(module.output_size, len(size))):
                    return _Step(node, "readout", module, None, inputs, None, {"keepdim": True})
            raise TilingError(f"tiled: {_where(node)} ({type(module).__name__}) cannot be computed tile by tile "
                              "here")
        target = node.target
        if node.op == "call_function" and target in ef or (node.op == "call_method" and target in (
                "relu", "relu_", "sigmoid", "tanh", "exp", "neg", "abs", "clamp", "contiguous", "float", "double")):
            if len(inputs) != 1:
                raise TilingError(f"tiled: {_where(node)}: an elementwise function of two images")
            return _Step(node, "pointwise", None, None, inputs, size)
        if (node.op == "call_function" and target in binary) or (node.op == "call_method" and target in (
                "add", "add_", "mul", "mul_", "sub", "div", "__add__", "__mul__")):
            for a in node.all_input_nodes:
                if a in spatial and spatial[a] != size:
                    raise TilingError(f"tiled: {_where(node)} combines images of different sizes")
            return _Step(node, "pointwise", None, None, inputs, size)
        if node.op == "call_function" and target is F.interpolate:
            names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
            bound = dict(zip(names, node.args), **node.kwargs)
            if bound.get("antialias"):
                raise TilingError(f"tiled: {_where(node)}: interpolate with antialias")
            out = bound.get("size")
            if isinstance(out, torch.fx.Node):
                out = self.static.get(out)
                if out is None:
                    raise TilingError(f"tiled: {_where(node)}: an interpolation size not read from an image")
            return self._interp(node, inputs, size, out, bound.get("scale_factor"), bound.get("mode", "nearest"),
                                bound.get("align_corners"), bound.get("recompute_scale_factor"))
        if node.op == "call_function" and target is torch.cat:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim not in (1, -len(size) - 1) or any(spatial[a] != size for a in inputs):
                raise TilingError(f"tiled: {_where(node)}: only channel concatenation of images of one size")
            return _Step(node, "pointwise", None, None, inputs, size)
        if (node.op == "call_method" and target == "mean") or (node.op == "call_function" and target is torch.mean):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            dims = sorted(d % (len(size) + 2) for d in _tuple(dims, 1)) if dims is not None else None
            if dims == list(range(2, len(size) + 2)):
                return _Step(node, "readout", None, None, inputs, None, {"keepdim": bool(keepdim)})
        if node.op == "call_function" and target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                                                     F.adaptive_avg_pool3d):
            out = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
            if all(o == 1 for o in _tuple(out, len(size))):
                return _Step(node, "readout", None, None, inputs, None, {"keepdim": True})
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        raise TilingError(f"tiled: {_where(node)} ({name}) cannot be computed tile by tile exactly here")

    def _interp(self, node, inputs, size, out, scale, mode, align_corners, recompute) -> _Step:
        n = len(size)
        if mode not in ("nearest", "linear", "bilinear", "trilinear"):
            raise TilingError(f"tiled: {_where(node)}: interpolation mode {mode!r} (nearest, linear, bilinear and "
                              "trilinear are computed tile by tile)")
        scales = _tuple(scale, n) if scale is not None else (None,) * n
        target = tuple(int(v) for v in _tuple(out, n)) if out is not None else \
            tuple(int(math.floor(g * sc)) for g, sc in zip(size, scales))
        use = scales if scale is not None and not recompute else (None,) * n
        extra = {"mode": mode, "align_corners": align_corners, "scales": use, "sources": {}}
        return _Step(node, "interp", None, None, inputs, target, extra)

    def _interp_sources(self, step: _Step, axis: int, dtype=torch.float64, device=None) -> list:
        """Per output index along ``axis``: torch's source indices and weights (cached per dtype/device)."""
        from .gnn import _source

        key = (axis, dtype, device)
        found = step.extra["sources"].get(key)
        if found is None:
            src = self.spatial[step.inputs[0]]
            found = step.extra["sources"][key] = _source(step.size[axis], src[axis], step.extra["mode"],
                                                         step.extra["align_corners"], step.extra["scales"][axis],
                                                         dtype, device if device is not None else torch.device("cpu"))
        return found

    def _pool(self, node, module, inputs, size) -> _Step:
        n = len(size)
        is_max = "Max" in type(module).__name__
        if module.ceil_mode or (is_max and module.return_indices) or (
                not is_max and getattr(module, "divisor_override", None)):
            raise TilingError(f"tiled: {_where(node)}: pooling with ceil_mode, return_indices or divisor_override")
        k = _tuple(module.kernel_size, n)
        s = _tuple(module.stride if module.stride not in (None, []) else module.kernel_size, n)
        p = _tuple(module.padding, n)
        d = _tuple(getattr(module, "dilation", 1), n) if is_max else (1,) * n
        g = ConvGeometry(k, s, tuple((q, q) for q in p), d, "zeros")
        extra = {"max": is_max, "count_include_pad": getattr(module, "count_include_pad", True)}
        return _Step(node, "pool", module, g, inputs, g.output_size(size), extra)

    # ------------------------------------------------------------------------------ regions
    def needs(self, out_region: Region) -> dict:
        """Per spatial node, the region it must compute for ``out_region`` of the output step (for a readout:
        of its input); found once per region (forward and backward, call after call, ask again)."""
        found = self._needs.get(out_region)
        if found is None:
            if len(self._needs) > 4096:
                self._needs.clear()
            found = self._needs[out_region] = self._find_needs(out_region)
        return found

    def _find_needs(self, out_region: Region) -> dict:
        need: dict = {}
        target = self.out_step.inputs[0] if self.readout is not None else self.output
        need[target] = out_region
        for step in reversed(self.order):
            region = need.get(step.node)
            if region is None or step.kind == "input":
                continue
            if step.kind in ("conv", "pool"):
                g = step.geometry
                src_size = self.spatial[step.inputs[0]]
                mode = g.padding_mode if step.kind == "conv" else "zeros"
                want = tuple(_merge([iv for a, b in region[axis] for iv in _sources(
                    a * g.stride[axis] - g.padding[axis][0],
                    (b - 1) * g.stride[axis] - g.padding[axis][0] + (g.kernel_size[axis] - 1) * g.dilation[axis] + 1,
                    src_size[axis], mode)]) for axis in range(len(src_size)))
                need[step.inputs[0]] = _union(want, need.get(step.inputs[0]))
            elif step.kind == "interp":
                want = []
                for axis in range(len(step.size)):
                    terms = self._interp_sources(step, axis)
                    coords = torch.tensor(_coords(region[axis]), dtype=torch.long)
                    used = sorted({int(v) for index, _ in terms for v in index[coords].tolist()})
                    want.append(_merge([(v, v + 1) for v in used]))
                need[step.inputs[0]] = _union(tuple(want), need.get(step.inputs[0]))
            elif step.kind == "transposed":
                c = step.geometry.conv
                src_size = self.spatial[step.inputs[0]]
                want = []
                for axis in range(len(src_size)):
                    s, p, k, d = c.stride[axis], c.padding[axis][0], c.kernel_size[axis], c.dilation[axis]
                    pieces = []
                    for a, b in region[axis]:
                        lo = -((-(a + p - (k - 1) * d)) // s)
                        hi = (b - 1 + p) // s + 1
                        pieces.append((max(lo, 0), min(hi, src_size[axis])))
                    want.append(_merge(pieces))
                need[step.inputs[0]] = _union(tuple(want), need.get(step.inputs[0]))
            else:
                for a in step.inputs:
                    need[a] = _union(region, need.get(a))
        return need

    # ------------------------------------------------------------------------------ compute
    def run(self, x: _Value, need: dict) -> Tensor:
        """Compute every spatial node on its region; the output block (for a readout: the sum of its input's
        block over the spatial dims, ``[B, C]``)."""
        values: dict = {}
        keep = {self.readout.inputs[0] if self.readout is not None else self.output}
        for step in self.order:
            region = need.get(step.node)
            if region is None:
                continue
            if step.kind == "input":
                values[step.node] = x
                continue
            values[step.node] = _Value(self._compute(step, region, values), region, step.size)
            for a in step.inputs:  # free what no later step reads (a forward's memory, not all of its values)
                if a not in keep and self._last_use.get(a) is step.node:
                    del values[a]
        if self.readout is not None:
            block = values[self.readout.inputs[0]].restrict(need[self.readout.inputs[0]])
            return block.sum(dim=tuple(range(2, block.dim())))
        return values[self.output].restrict(need[self.output])

    def _compute(self, step: _Step, region: Region, values: dict) -> Tensor:
        node = step.node
        if step.kind in ("conv", "pool", "transposed"):
            source = values[step.inputs[0]]
            return _blocks(region, lambda runs: self._window(step, runs, source))
        if step.kind == "interp":
            source = values[step.inputs[0]]
            return _blocks(region, lambda runs: self._interp_block(step, runs, source))
        args = torch.fx.map_arg(node.args, lambda n: values[n].restrict(region) if n in values else
                                self._constant(n))
        kwargs = torch.fx.map_arg(node.kwargs, lambda n: values[n].restrict(region) if n in values else
                                  self._constant(n))
        if node.op == "call_module":
            return step.module(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def _interp_block(self, step: _Step, runs: tuple, source: _Value) -> Tensor:
        """Torch's interpolation of the output block ``runs``: per axis, a weighted gather of the stored sources."""
        t = source.tensor
        for axis, (a, b) in enumerate(runs):
            result = None
            for index, weight in self._interp_sources(step, axis, t.dtype, t.device):
                piece = t.index_select(2 + axis, source.positions(axis, index[a:b].tolist()))
                if weight is not None:
                    shape = [1] * t.dim()
                    shape[2 + axis] = b - a
                    piece = piece * weight[a:b].view(shape)
                result = piece if result is None else result + piece
            t = result
        return t

    def _constant(self, node):
        if node in self.static:
            return self.static[node]
        if node.op == "get_attr":  # a parameter or buffer used beside the image (a layer scale, ...)
            return _fetch(self.root, node.target)
        raise TilingError(f"tiled: {_where(node)} is neither an image nor a parameter of the network")

    def _window(self, step: _Step, runs: tuple, source: _Value) -> Tensor:
        """The output block ``runs`` (one interval per axis) of a windowed step, from the gathered source."""
        n = len(runs)
        if step.kind == "transposed":
            c = step.geometry.conv
            lows, highs = [], []
            for axis, (a, b) in enumerate(runs):
                s, p, k, d = c.stride[axis], c.padding[axis][0], c.kernel_size[axis], c.dilation[axis]
                lows.append(max(-((-(a + p - (k - 1) * d)) // s), 0))
                highs.append(min((b - 1 + p) // s + 1, source.size[axis]))
            block = source.restrict(tuple(((lo, hi),) for lo, hi in zip(lows, highs)))
            geometry = TransposedGeometry(ConvGeometry(c.kernel_size, c.stride, ((0, 0),) * n, c.dilation, "zeros"),
                                          (0,) * n)
            from .nn import functional as G
            full = G.conv_image(block, step.module.weight, step.module.bias, geometry, step.module.groups,
                                "tiled transposed convolution")
            index = tuple(slice(a + c.padding[axis][0] - lows[axis] * c.stride[axis],
                                b + c.padding[axis][0] - lows[axis] * c.stride[axis])
                          for axis, (a, b) in enumerate(runs))
            return full[(slice(None), slice(None)) + index]
        g = step.geometry
        virtual = [(a * g.stride[axis] - g.padding[axis][0],
                    (b - 1) * g.stride[axis] - g.padding[axis][0] + (g.kernel_size[axis] - 1) * g.dilation[axis] + 1)
                   for axis, (a, b) in enumerate(runs)]
        if step.kind == "conv":
            patch = source.gather(virtual, g.padding_mode)
            from .nn import functional as G
            geometry = ConvGeometry(g.kernel_size, g.stride, ((0, 0),) * n, g.dilation, "zeros")
            return G.conv_image(patch, step.module.weight, step.module.bias, geometry, step.module.groups,
                                "tiled convolution")
        return _pool_block(step, source, virtual, runs)


def _pool_block(step: _Step, source: _Value, virtual, runs) -> Tensor:
    from . import gnn

    g, n = step.geometry, len(runs)
    out = [b - a for a, b in runs]
    if step.extra["max"]:
        patch = source.gather(virtual, "zeros", fill=-math.inf)
        nodes = patch.permute(0, *range(2, n + 2), 1)
        result = gnn._max_aggregate(nodes, g.kernel_size, g.stride, g.dilation, out)
        return result.permute(0, n + 1, *range(1, n + 1))
    patch = source.gather(virtual, "zeros")
    nodes = patch.permute(0, *range(2, n + 2), 1)
    total = None
    for tap in gnn._taps(nodes, g.kernel_size, g.stride, g.dilation, out):
        total = tap.clone(memory_format=torch.contiguous_format) if total is None else total + tap
    divisor = gnn._avg_divisor(runs, source.size, g.kernel_size, g.stride, g.padding,
                               step.extra["count_include_pad"], patch.dtype, patch.device)
    return (total / divisor).permute(0, n + 1, *range(1, n + 1))


def _blocks(region: Region, fn) -> Tensor:
    """``fn(runs)`` for every product of one interval per axis, assembled along the axes."""
    def build(axis: int, prefix: tuple) -> Tensor:
        if axis == len(region):
            return fn(prefix)
        parts = [build(axis + 1, prefix + (iv,)) for iv in region[axis]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2 + axis)
    return build(0, ())


def _tuple(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


# ------------------------------------------------------------------------------------ tracing
def _trace(model: nn.Module) -> tuple[nn.Module, torch.fx.Graph]:
    from .gnn import _Tracer

    if isinstance(model, tuple(CONVERSIONS)) or isinstance(model, tuple(CONVERSIONS.values())):
        model = nn.Sequential(model)  # a single layer
    if any(type(m) in CONVERSIONS for m in model.modules()):
        raise TypeError("tiled/spatial_parallel take a converted model (gridgraph.convert(model)): this one still "
                        "holds torch convolutions")
    rank = next((m.weight.dim() for m in model.modules() if isinstance(m, tuple(CONVERSIONS.values()))), 4)
    try:
        graph = _Tracer(rank).trace(model)
    except Exception as error:
        raise TilingError(f"tiled: could not trace {type(model).__name__} with torch.fx ({type(error).__name__}: "
                          f"{error})") from error
    return model, graph


def _params(model: nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _tiles(size: tuple, tile: tuple) -> list:
    """The output tiles: per axis the intervals of ``tile`` pixels (the last one shorter)."""
    per_axis = [[(a, min(a + t, n)) for a in range(0, n, t)] for n, t in zip(size, tile)]
    out: list = [()]
    for options in per_axis:
        out = [prefix + (((a, b),),) for prefix in out for a, b in options]
    return out


def _region_of(region: Region, x: Tensor) -> Tensor:
    """The pixels ``region`` of the whole grid ``x`` (a view where each axis is one interval)."""
    return _Value.whole(x).restrict(region)


def _add_at(target: Tensor, index: list, grad: Tensor) -> None:
    """``target[..., index[0], index[1], ...] += grad`` in place; per axis ``None`` (the whole axis),
    ``(start, length)`` (a narrow view) or an index tensor."""
    t = target
    tensor_axes = []
    for axis, ix in enumerate(index):
        if isinstance(ix, tuple):
            t = t.narrow(2 + axis, *ix)
        elif ix is not None:
            tensor_axes.append(axis)
    if not tensor_axes:
        t.add_(grad)
        return
    g = grad
    for axis in reversed(tensor_axes[1:]):  # spread the later indexed axes first, then add along the first
        shape = list(g.shape)
        shape[2 + axis] = t.size(2 + axis)
        g = g.new_zeros(shape).index_add_(2 + axis, index[axis], g)
    t.index_add_(2 + tensor_axes[0], index[tensor_axes[0]], g)


def _add_into(target: Tensor, region: Region, grad: Tensor) -> None:
    """``target[region] += grad`` (``target`` the whole grid)."""
    _Value.whole(target).add(region, grad)


# ------------------------------------------------------------------------------------ tiled
class _TiledFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner: "Tiled", x: Tensor, *params: Tensor) -> Tensor:
        ctx.runner = runner
        ctx.save_for_backward(x)
        with torch.no_grad():
            return runner._forward_all(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        runner = ctx.runner
        params = runner._params
        needs_x = ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x) if needs_x else None
        grads = [torch.zeros_like(p) for p in params]
        plan = runner._plan_for(x)
        for tile in runner._tile_list(plan):
            need = plan.needs(tile)
            region = need[plan.order[0].node]
            block = _region_of(region, x).detach().requires_grad_(needs_x)
            with torch.enable_grad():
                out = plan.run(_Value(block, region, plan.size), need)
                g = runner._tile_grad(plan, tile, grad, out)
                inputs = ([block] if needs_x else []) + list(params)
                got = torch.autograd.grad(out, inputs, g, allow_unused=True)
            if needs_x:
                _add_into(grad_x, region, got[0])
                got = got[1:]
            for acc, gp in zip(grads, got):
                if gp is not None:
                    acc.add_(gp)
        return (None, grad_x, *grads)


class Tiled(nn.Module):
    """A converted network (or layer) computed tile by tile (made by :func:`tiled`): ``forward(x)`` equals
    ``module(x)`` (to float64 rounding) and so do its gradients, with memory bounded by a tile's activations.
    ``module`` is the network (its parameters are this module's).

    Example:
        >>> net = convert(torch.nn.Conv2d(3, 4, 3, padding=1)).double()
        >>> run = tiled(net, tile_size=(5, 7))
        >>> x = torch.randn(1, 3, 12, 20, dtype=torch.float64)
        >>> type(run).__name__, torch.allclose(run(x), net(x), rtol=1e-12, atol=1e-12)
        ('Tiled', True)
    """

    def __init__(self, module: nn.Module, graph: torch.fx.Graph, tile_size: Any) -> None:
        super().__init__()
        self.module = module
        self.graph = graph
        self.tile_size = tile_size
        self._plans: dict = {}

    @property
    def _params(self) -> list:
        return _params(self.module)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_plans"] = {}
        return state

    def _plan_for(self, x: Tensor) -> _Plan:
        key = (tuple(x.shape[2:]), self.module.training)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _Plan(self.module, self.graph, tuple(x.shape[2:]), self.module.training)
        return plan

    def _tile_list(self, plan: _Plan) -> list:
        size = plan.out_step.size if plan.readout is None else plan.spatial[plan.readout.inputs[0]]
        n = len(size)
        tile = _tuple(self.tile_size, n)
        if len(tile) != n or any(not isinstance(t, int) or t < 1 for t in tile):
            raise ValueError(f"tile_size must be a positive int or a tuple of {n} positive ints (got "
                             f"{self.tile_size!r})")
        return _tiles(size, tile)

    def _forward_all(self, x: Tensor) -> Tensor:
        plan = self._plan_for(x)
        out = None
        for tile in self._tile_list(plan):
            need = plan.needs(tile)
            region = need[plan.order[0].node]
            block = plan.run(_Value(_region_of(region, x), region, plan.size), need)
            if plan.readout is not None:
                out = block if out is None else out + block
                continue
            if out is None:
                out = block.new_empty(block.shape[:2] + tuple(plan.out_step.size))
            out[(slice(None), slice(None)) + tuple(slice(a, b) for ((a, b),) in tile)] = block
        if plan.readout is not None:
            out = out / math.prod(plan.spatial[plan.readout.inputs[0]])
        return out

    def _tile_grad(self, plan: _Plan, tile: Region, grad: Tensor, out: Tensor) -> Tensor:
        if plan.readout is not None:
            count = math.prod(plan.spatial[plan.readout.inputs[0]])
            return grad / count  # the sum's gradient: the pooled gradient over the count
        return grad[(slice(None), slice(None)) + tuple(slice(a, b) for ((a, b),) in tile)]

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 3:
            raise ValueError(f"tiled: expected an image batch (B, C, *grid) (got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__})")
        plan = self._plan_for(x)
        pooled = _TiledFunction.apply(self, x, *self._params)
        if plan.readout is None:
            return pooled
        return _head(plan, pooled)


def _head(plan: _Plan, pooled: Tensor) -> Any:
    """The non-spatial rest of the network after its global pooling (``pooled`` ``[B, C]``)."""
    values: dict = {}
    read = plan.readout
    values[read.node] = pooled.reshape(pooled.shape + (1,) * len(plan.spatial[read.inputs[0]])) \
        if read.extra.get("keepdim") else pooled
    modules = dict(plan.root.named_modules())
    seen = False
    for node in plan.graph.nodes:
        if node is read.node:
            seen = True
            continue
        if not seen or node.op in ("placeholder",):
            continue
        if node.op == "output":
            return values[node.args[0]]
        if node in plan.spatial:
            continue
        args = torch.fx.map_arg(node.args, lambda n: values[n])
        kwargs = torch.fx.map_arg(node.kwargs, lambda n: values[n])
        if node.op == "call_module":
            values[node] = modules[node.target](*args, **kwargs)
        elif node.op == "call_method":
            values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "get_attr":
            values[node] = _fetch(plan.root, node.target)
        else:
            values[node] = node.target(*args, **kwargs)
    raise TilingError("tiled: the network has no output")


def _fetch(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def tiled(model: nn.Module, tile_size: Any) -> Tiled:
    """``model`` computed tile by tile, exactly: each output tile from the input pixels its receptive field
    reaches (the halo), every layer computing only the pixels the tile needs.

    Args:
        model (nn.Module): a converted network (:func:`~gridgraph.convert`) or one converted layer: convolutions
            of any stride, dilation and padding mode (zeros, reflect, replicate, circular: at the image border
            only), pointwise, depthwise and transposed, elementwise layers between them (activations,
            BatchNorm in eval mode, residual additions, channel concatenations), max and average pooling,
            nearest and (bi/tri)linear upsampling (``nn.Upsample``, ``F.interpolate``, sizes read from an image
            included), and a global average pooling followed by a non-spatial head.
        tile_size (int or tuple): the tile, in pixels of the model's output (of its global pooling's input
            when it ends in one); tiles need not divide the image.

    The result equals ``model(x)`` to float64 rounding, and so do the input and weight gradients: backward
    recomputes each tile's forward (memory stays bounded by one tile's activations) and sums the tiles'
    weight gradients. A layer that cannot be computed tile by tile exactly (BatchNorm in training mode, a
    global pooling in the middle of the network, attention over the whole image) is a ``NotImplementedError``
    naming it.

    Example:
        >>> net = gridgraph.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
        ...                                             torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, stride=2)))
        >>> x = torch.randn(1, 3, 37, 50, dtype=torch.float64)
        >>> net = net.double()
        >>> torch.allclose(tiled(net, tile_size=8)(x), net(x), rtol=1e-12, atol=1e-12)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tiled expects an nn.Module (got {type(model).__name__})")
    _tuple_check(tile_size)
    module, graph = _trace(model)
    return Tiled(module, graph, tile_size)


def _tuple_check(tile_size: Any) -> None:
    values = _tuple(tile_size, 1)
    if not values or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in values):
        raise ValueError(f"tile_size must be a positive int or a tuple of positive ints (got {tile_size!r})")


def receptive_halo(model: nn.Module, image_size: Sequence[int], tile: Region) -> Region:
    """The input region (per axis intervals) that a region of ``model``'s output reads."""
    module, graph = _trace(model)
    plan = _Plan(module, graph, tuple(image_size), module.training)
    return plan.needs(tile)[plan.order[0].node]


# ------------------------------------------------------------------------------------ spatial parallel
def _bands(total: int, parts: int) -> list:
    """``torch.tensor_split`` of ``total`` rows into ``parts`` bands: ``[(start, stop)]``."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for r in range(parts):
        n = base + (1 if r < extra else 0)
        out.append((start, start + n))
        start += n
    return out


def _rows(iv: Intervals, band: tuple) -> Intervals:
    return _merge([(max(a, band[0]), min(b, band[1])) for a, b in iv])


class _SpatialFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner: "SpatialParallel", x: Tensor, *params: Tensor) -> Tensor:
        ctx.runner = runner
        with torch.no_grad():
            out, state = runner._local_forward(x)
        ctx.state = state
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        runner = ctx.runner
        grad_x, grads = runner._local_backward(x, grad, ctx.state, ctx.needs_input_grad[1])
        return (None, grad_x, *grads)


class SpatialParallel(nn.Module):
    """A converted network run across the processes of a ``torch.distributed`` group, each holding a band of
    rows (made by :func:`spatial_parallel`). ``module`` is the network (its parameters are this module's).

    Example:
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> run = spatial_parallel(convert(torch.nn.Conv2d(3, 4, 3, padding=1)))
        >>> type(run).__name__, run(torch.randn(1, 3, 6, 6)).shape
        ('SpatialParallel', torch.Size([1, 4, 6, 6]))
        >>> dist.destroy_process_group()
    """

    def __init__(self, module: nn.Module, graph: torch.fx.Graph, group: Any = None, tile_size: Any = None) -> None:
        super().__init__()
        self.module = module
        self.graph = graph
        self.group = group
        self.tile_size = tile_size
        self._plans: dict = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_plans"] = {}
        state["group"] = None
        state.pop("_last_plan", None)
        return state

    # ---------------------------------------------------------------- collectives
    def _dist(self):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("spatial_parallel needs torch.distributed initialised (dist.init_process_group)")
        return dist

    def _world(self) -> tuple[int, int]:
        dist = self._dist()
        return dist.get_world_size(self.group), dist.get_rank(self.group)

    def _global_rank(self, r: int) -> int:
        dist = self._dist()
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _exchange(self, sends: dict, recv_shapes: dict, like: Tensor) -> dict:
        """Point-to-point: ``sends[q]`` to rank ``q``; receive ``recv_shapes[q]`` from rank ``q``."""
        dist = self._dist()
        ops, received = [], {}
        for q, shape in sorted(recv_shapes.items()):
            buf = like.new_empty(shape)
            received[q] = buf
            ops.append(dist.P2POp(dist.irecv, buf, self._global_rank(q), self.group))
        for q, tensor in sorted(sends.items()):
            ops.append(dist.P2POp(dist.isend, tensor.contiguous(), self._global_rank(q), self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return received

    # ---------------------------------------------------------------- the local part
    def _layout(self, x: Tensor):
        dist = self._dist()
        world, rank = self._world()
        rows = torch.tensor([x.size(2)], dtype=torch.long, device=x.device)
        every = [torch.zeros_like(rows) for _ in range(world)]
        dist.all_gather(every, rows, group=self.group)
        counts = [int(t.item()) for t in every]
        size = (sum(counts),) + tuple(x.shape[3:])
        key = (size, self.module.training, world)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _Plan(self.module, self.graph, size, self.module.training)
        starts = [sum(counts[:r]) for r in range(world)]
        in_bands = [(s, s + c) for s, c in zip(starts, counts)]
        if counts != [b - a for a, b in _bands(size[0], world)]:
            raise ValueError(f"spatial_parallel: rank r must hold torch.tensor_split(x, world_size, dim=2)[r] "
                             f"(got bands of {counts} rows for {size[0]} rows)")
        out_size = plan.spatial[plan.readout.inputs[0]] if plan.readout is not None else plan.out_step.size
        out_bands = _bands(out_size[0], world)
        needs = []
        for r in range(world):
            a, b = out_bands[r]
            region = (((a, b),),) + tuple((((0, n),)) for n in out_size[1:])
            need = plan.needs(region) if b > a else None
            needs.append(need)
        return plan, world, rank, in_bands, out_bands, out_size, needs

    def _local_forward(self, x: Tensor):
        plan, world, rank, in_bands, out_bands, out_size, needs = self._layout(x)
        first = plan.order[0].node
        in_region = [need[first] if need is not None else None for need in needs]
        my_band = in_bands[rank]
        # rows each rank needs from me / I need from each rank
        sends, recv_shapes = {}, {}
        for q in range(world):
            if q == rank:
                continue
            if in_region[q] is not None:
                rows = _rows(in_region[q][0], my_band)
                if rows:
                    index = torch.tensor([c - my_band[0] for c in _coords(rows)], dtype=torch.long, device=x.device)
                    piece = x.index_select(2, index)
                    sends[q] = _region_of((((0, piece.size(2)),),) + in_region[q][1:], piece)
            if in_region[rank] is not None:
                rows = _rows(in_region[rank][0], in_bands[q])
                if rows:
                    shape = list(x.shape)
                    shape[2] = _count(rows)
                    for axis, iv in enumerate(in_region[rank][1:]):
                        shape[3 + axis] = _count(iv)
                    recv_shapes[q] = tuple(shape)
        received = self._exchange(sends, recv_shapes, x)
        self._last_plan = plan
        state = {"plan": plan, "in_region": in_region, "needs": needs, "in_bands": in_bands, "world": world,
                 "rank": rank}
        if in_region[rank] is None:
            local = None
        else:
            pieces = []
            for q in range(world):
                rows = _rows(in_region[rank][0], in_bands[q])
                if not rows:
                    continue
                if q == rank:
                    index = torch.tensor([c - my_band[0] for c in _coords(rows)], dtype=torch.long, device=x.device)
                    own = x.index_select(2, index)
                    pieces.append(_region_of((((0, own.size(2)),),) + in_region[rank][1:], own))
                else:
                    pieces.append(received[q])
            local = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
        state["local"] = local
        state["subtiles"] = self._subtiles(out_bands[rank], out_size)
        if plan.readout is not None:
            c = None
            for sub in state["subtiles"]:
                block = plan.run(_Value(local, in_region[rank], plan.size), plan.needs(sub))
                c = block if c is None else c + block
            partial = self._readout_partial(plan, c, x)
            self._dist().all_reduce(partial, group=self.group)
            return partial / math.prod(out_size), state
        a, b = out_bands[rank]
        if b > a:
            out = None
            for sub in state["subtiles"]:
                block = plan.run(_Value(local, in_region[rank], plan.size), plan.needs(sub))
                if out is None:
                    out = block.new_empty(block.shape[:2] + (b - a,) + tuple(out_size[1:]))
                out[(slice(None), slice(None), slice(sub[0][0][0] - a, sub[0][0][1] - a))
                    + tuple(slice(lo, hi) for ((lo, hi),) in sub[1:])] = block
            return out, state
        channels = self._out_channels(plan, x)
        return x.new_zeros((x.size(0), channels, 0) + tuple(out_size[1:])), state

    def _subtiles(self, band: tuple, out_size: tuple) -> list:
        """This rank's output band in tiles of ``tile_size`` (memory bounded by one tile, as :func:`tiled`)."""
        a, b = band
        if b <= a:
            return []
        tile = _tuple(self.tile_size if self.tile_size is not None else 256, len(out_size))
        return [(((a + lo, a + hi),),) + tuple(rest) for (((lo, hi),), *rest) in
                _tiles((b - a,) + tuple(out_size[1:]), tile)]

    def _readout_partial(self, plan, block, x) -> Tensor:
        if block is not None:
            return block.contiguous()
        channels = self._out_channels(plan, x, readout=True)
        return x.new_zeros(x.size(0), channels)

    def _out_channels(self, plan, x, readout=False) -> int:
        """The output's channels for a rank with no rows: from a one-pixel probe of the whole network."""
        size = plan.size
        probe_region = tuple(((0, 1),) for _ in size)
        need = plan.needs(probe_region)
        first = plan.order[0].node
        region = need[first]
        shape = (x.size(0), x.size(1)) + tuple(_count(iv) for iv in region)
        probe = x.new_zeros(shape)
        with torch.no_grad():
            return plan.run(_Value(probe, region, size), need).size(1)

    def _local_backward(self, x: Tensor, grad: Tensor, state: dict, needs_x: bool):
        plan, in_region, needs = state["plan"], state["in_region"], state["needs"]
        world, rank, in_bands = state["world"], state["rank"], state["in_bands"]
        params = _params(self.module)
        local_grad = None
        grads = [torch.zeros_like(p) for p in params]
        if needs[rank] is not None:
            local = _Value(state["local"], in_region[rank], plan.size)
            local_grad = torch.zeros_like(state["local"]) if needs_x else None
            first = plan.order[0].node
            band_start = state["subtiles"][0][0][0][0] if state["subtiles"] else 0
            for sub in state["subtiles"]:
                need = plan.needs(sub)
                region = need[first]
                block = local.restrict(region).detach().requires_grad_(needs_x)
                with torch.enable_grad():
                    out = plan.run(_Value(block, region, plan.size), need)
                    if plan.readout is not None:
                        g = grad / math.prod(plan.spatial[plan.readout.inputs[0]])
                    else:
                        g = grad[(slice(None), slice(None), slice(sub[0][0][0] - band_start, sub[0][0][1] - band_start))
                                 + tuple(slice(lo, hi) for ((lo, hi),) in sub[1:])]
                    inputs = ([block] if needs_x else []) + params
                    got = torch.autograd.grad(out, inputs, g, allow_unused=True)
                if needs_x:
                    _Value(local_grad, local.region, plan.size).add(region, got[0])
                    got = got[1:]
                for acc, gp in zip(grads, got):
                    if gp is not None:
                        acc.add_(gp)
        for acc in grads:  # each rank's loss is its share: the weight gradients are summed
            self._dist().all_reduce(acc, group=self.group)
        grad_x = None
        if needs_x:
            grad_x = torch.zeros_like(x)
            my_band = in_bands[rank]
            sends, recv_shapes, offset = {}, {}, 0
            pieces_rows = []
            if local_grad is not None:
                for q in range(world):
                    rows = _rows(in_region[rank][0], in_bands[q])
                    if not rows:
                        continue
                    n = _count(rows)
                    piece = local_grad.narrow(2, offset, n)
                    offset += n
                    if q == rank:
                        pieces_rows.append((rows, piece))
                    else:
                        sends[q] = piece
            for q in range(world):
                if q == rank or in_region[q] is None:
                    continue
                rows = _rows(in_region[q][0], my_band)
                if rows:
                    shape = list(x.shape)
                    shape[2] = _count(rows)
                    for axis, iv in enumerate(in_region[q][1:]):
                        shape[3 + axis] = _count(iv)
                    recv_shapes[q] = tuple(shape)
                    pieces_rows.append((rows, q))
            received = self._exchange(sends, recv_shapes, x)
            for rows, piece in pieces_rows:
                if not isinstance(piece, Tensor):
                    q = piece
                    piece = received[q]
                    cols = in_region[q][1:]
                else:
                    cols = in_region[rank][1:]
                region = (tuple((a - my_band[0], b - my_band[0]) for a, b in rows),) + cols
                _add_into(grad_x, region, piece)
        return grad_x, grads

    def forward(self, x: Tensor) -> Any:
        if not isinstance(x, Tensor) or x.dim() < 3:
            raise ValueError(f"spatial_parallel: expected this rank's band of an image batch (B, C, *grid) (got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__})")
        out = _SpatialFunction.apply(self, x, *_params(self.module))
        plan = self._last_plan
        if plan.readout is None:
            return out
        return _head(plan, out)


def spatial_parallel(model: nn.Module, group: Any = None, tile_size: Any = None) -> SpatialParallel:
    """``model`` run across the processes of a ``torch.distributed`` group, split by rows (dim 2), exactly.

    Rank ``r`` calls the result with ``torch.tensor_split(x, world_size, dim=2)[r]`` (world_size bands whose
    sizes differ by at most one, possibly empty) and gets ``torch.tensor_split(y, world_size, dim=2)[r]`` of
    the whole output ``y = model(x)``; a network that ends in a global average pooling returns its whole
    (non-spatial) output on every rank. Each rank computes its output rows from the input rows their receptive
    field reaches: the rows held by other ranks (any number of bands away; with circular padding, the other
    end of the image) arrive by point-to-point messages (gloo on CPU, NCCL on GPU), and backward sends their
    gradients back the same way. Weight gradients are summed across ranks, each rank's loss being its share of
    the whole-image loss (for a global output, returned whole on every rank, every rank computes the same
    loss), so that every rank ends with the whole-image gradients and training equals training on the whole
    image in one process. BatchNorm in training mode is a clear error (its statistics are over the whole
    image).

    Args:
        model (nn.Module): a converted network (the layers :func:`tiled` takes).
        group: the process group (default: the whole world).

    Example:
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)   # one process here
        >>> net = convert(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"))
        >>> x = torch.randn(1, 3, 9, 8)
        >>> band = torch.tensor_split(x, dist.get_world_size(), dim=2)[dist.get_rank()]
        >>> torch.allclose(spatial_parallel(net)(band), net(x), atol=1e-6)
        True
        >>> dist.destroy_process_group()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"spatial_parallel expects an nn.Module (got {type(model).__name__})")
    module, graph = _trace(model)
    return SpatialParallel(module, graph, group, tile_size)
