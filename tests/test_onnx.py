"""ONNX export: converted networks and graph layers exported with gridgraph's translations run in
onnxruntime and equal the torch modules they mirror (``nn.Conv2d`` and friends), NaN parity included; the
exported graphs compute by gathers and GEMMs (no ONNX ``Conv``)."""
import numpy as np
import pytest
import torch
from torch import nn

import gridgraph as gg
from gridgraph.nn import GridConv2d

ort = pytest.importorskip("onnxruntime")  # the test extra installs it: these run in CI
onnx = pytest.importorskip("onnx")


def _run(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feeds)[0])


def _op_types(path):
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _close(got, want):
    want = want.detach()
    scale = want.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got, want, atol=1e-5 * float(scale), rtol=1e-5)


NETWORK_CONVS = {
    "3x3": lambda: nn.Conv2d(3, 8, 3, padding=1),
    "strided 5x5 no bias": lambda: nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=False),
    "grouped": lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2),
    "depthwise dilated": lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4),
    "1x1": lambda: nn.Conv2d(4, 6, 1),
    "reflect": lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),
    "replicate": lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="replicate"),
    "circular": lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular"),
    "asymmetric": lambda: nn.Conv2d(3, 5, (3, 1), stride=(2, 1), padding=(1, 0)),
    "transposed": lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
}


@pytest.mark.parametrize("name", sorted(NETWORK_CONVS))
def test_converted_conv_exports_and_equals_torch(name, tmp_path):
    torch.manual_seed(0)
    conv = NETWORK_CONVS[name]()
    x = torch.randn(2, conv.in_channels, 9, 10)
    twin = gg.convert(nn.Sequential(conv)).eval()
    path = tmp_path / "conv.onnx"
    gg.export_onnx(twin, (x,), path)
    _close(_run(path, x), conv(x))
    ops = _op_types(path)
    assert "Gather" in ops and not ops & {"Conv", "ConvTranspose", "ConvInteger"}, ops


def test_reference_network_exports_and_equals_torch(tmp_path):
    torch.manual_seed(0)
    net = gg.reference_model("mobilenet").eval()
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "net.onnx"
    gg.export_onnx(gg.convert(net).eval(), (x,), path)
    _close(_run(path, x), net(x))
    assert "Conv" not in _op_types(path)


class _OnGraph(nn.Module):
    """A graph layer on inputs (x, edge_index, edge_type): the plain edge-list operator."""

    def __init__(self, layer, num_dst):
        super().__init__()
        self.layer, self.num_dst = layer, num_dst

    def forward(self, x, edge_index, edge_type):
        return self.layer(x, edge_index, edge_type, size=(x.size(0), self.num_dst))


class _OwnGraph(nn.Module):
    """A graph layer holding its pixel graph (a masked or sparse domain): structure fixed at export."""

    def __init__(self, layer, graph):
        super().__init__()
        self.layer, self.graph = layer, graph

    def forward(self, x):
        return self.layer(x, self.graph.edge_index, self.graph.edge_type, size=self.graph.size())


def _masked_case(stride=1):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1)
    layer = GridConv2d.from_conv2d(conv).eval()
    image = torch.randn(4, 10, 12)
    mask = torch.rand(10, 12) > 0.5
    return conv, layer, image, mask, gg.image_to_graph(image, layer, mask=mask)


def test_masked_graph_exports_and_equals_the_dense_conv_on_the_masked_image(tmp_path):
    conv, layer, image, mask, g = _masked_case()
    path = tmp_path / "masked.onnx"
    gg.export_onnx(_OwnGraph(layer, g).eval(), (g.x,), path)
    got = _run(path, g.x)
    dense = conv((image * mask)[None])[0]  # stride 1: outputs at the active pixels
    _close(got, dense[:, mask].t())


def test_plain_edge_list_is_an_input_of_the_exported_model(tmp_path):
    conv, layer, image, mask, g = _masked_case(stride=2)
    edge_index, edge_type = g.edge_index.as_tensor().clone(), g.edge_type.clone()
    num_dst = g.size()[1]
    path = tmp_path / "edges.onnx"
    edges = torch.export.Dim("edges")  # the edge count stays free: another edge list, same model
    gg.export_onnx(_OnGraph(layer, num_dst).eval(), (g.x, edge_index, edge_type), path,
                   dynamic_shapes={"x": None, "edge_index": {1: edges}, "edge_type": {0: edges}})
    want = layer(g.x, edge_index, edge_type, size=(g.x.size(0), num_dst))
    _close(_run(path, g.x, edge_index, edge_type), want)
    # another edge list (fewer edges) through the same exported model: the edges are data
    keep = torch.rand(edge_type.numel()) > 0.3
    fewer = (edge_index[:, keep], edge_type[keep])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, (g.x.numpy(), fewer[0].numpy(), fewer[1].numpy()))))[0]
    _close(torch.from_numpy(got), layer(g.x, *fewer, size=(g.x.size(0), num_dst)))


def test_sparse_points_export(tmp_path):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    layer = GridConv2d.from_conv2d(conv).eval()
    coords = torch.unique(torch.randint(0, 16, (60, 2)), dim=0)
    features = torch.randn(coords.size(0), 3)
    g = gg.sparse_to_graph(coords, features, (16, 16), layer)
    path = tmp_path / "sparse.onnx"
    gg.export_onnx(_OwnGraph(layer, g).eval(), (g.x,), path)
    _close(_run(path, g.x), layer(g.x, g.edge_index, g.edge_type, size=g.size()))


def test_inf_weight_gives_nn_conv2d_nans_on_grids_and_masked_graphs(tmp_path):
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[1, 0, 0, 0] = float("inf")
    x = torch.randn(1, 3, 6, 7)
    path = tmp_path / "inf.onnx"
    gg.export_onnx(gg.convert(nn.Sequential(conv)).eval(), (x,), path)
    got, want = _run(path, x), conv(x).detach()
    assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan() & ~want.isinf()
    _close(got[finite], want[finite])

    layer = GridConv2d.from_conv2d(conv).eval()
    mask = torch.rand(6, 7) > 0.4
    g = gg.image_to_graph(x[0], layer, mask=mask)
    path = tmp_path / "inf-masked.onnx"
    gg.export_onnx(_OwnGraph(layer, g).eval(), (g.x,), path)
    got, want = _run(path, g.x), layer(g.x, g.edge_index, g.edge_type, size=g.size()).detach()
    dense = conv((x[0] * mask)[None])[0][:, mask].t()
    assert torch.equal(want.isnan(), dense.isnan()) and want.isnan().any()
    assert torch.equal(got.isnan(), want.isnan())


def test_translations_cover_the_forward_operators():
    table = gg.onnx_translations()
    assert set(table) == {torch.ops.gridgraph.grid_conv.default, torch.ops.gridgraph.conv_image.default,
                          torch.ops.gridgraph.edge_conv.default}
