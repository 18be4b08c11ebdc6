"""PixelAttention equals nn.MultiheadAttention on pixel graphs; SqueezeExcitation equals a torch SE block.

The reference is always the torch module itself, run on the flattened pixels of each image (sequence =
the image's H*W pixels, batch = the images): the complete pixel graph is unmasked attention, the k x k
graph is attention with the k x k neighbourhood as ``attn_mask`` (built here independently, pixel pair by
pixel pair), and a tap bias is a per-head float ``attn_mask``. Forward outputs, attention weights and the
gradients of the input and of every weight are compared, float64 to 1e-10 and float32 to 1e-5 (scaled).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch_geometric
from hypothesis import given, strategies as st
from torch import nn

import gridgraph
from gridgraph import (GridConv2d, PixelAttention, SqueezeExcitation, complete_pixel_graph, graph_to_image,
                       image_to_graph)
from gridgraph.models import SqueezeExcite
from _conv_reference import DTYPES, assert_matches

DTYPE_IDS = ["float64", "float32"]
CASES = [  # (embed_dim, num_heads, bias, batch_first, batch, height, width)
    (8, 2, True, True, 3, 4, 5),
    (6, 3, False, False, 2, 3, 4),
    (4, 1, True, False, 2, 5, 2),
    (8, 8, True, True, 1, 3, 3),
    (6, 2, True, True, 2, 1, 1),
]


# ----------------------------------------------------------------------------- references and helpers
def make_mha(embed_dim, num_heads, bias, batch_first, dtype, device, seed=0, dropout=0.0):
    """An nn.MultiheadAttention with every parameter random (scaled so the softmax is neither flat nor one-hot)."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, bias=bias, batch_first=batch_first,
                                device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in mha.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) / math.sqrt(embed_dim) * 1.5)
    return mha


def neighbourhood(height, width, kernel_size):
    """``allowed[i, j]``: pixel j lies in the k x k window (padding k // 2) of pixel i; ``tap[i, j]``: its tap.

    Written pixel pair by pixel pair, independently of the library's vectorised mask.
    """
    kh, kw = kernel_size
    n = height * width
    allowed = torch.zeros(n, n, dtype=torch.bool)
    tap = torch.zeros(n, n, dtype=torch.long)
    for i in range(n):
        hi, wi = divmod(i, width)
        for j in range(n):
            hj, wj = divmod(j, width)
            u, v = hj - hi + kh // 2, wj - wi + kw // 2
            if 0 <= u < kh and 0 <= v < kw:
                allowed[i, j] = True
                tap[i, j] = u * kw + v
    return allowed, tap


def to_sequence(images, batch_first):
    seq = images.flatten(2).transpose(1, 2)  # (B, L, E)
    return seq if batch_first else seq.transpose(0, 1)


def from_sequence(seq, batch_first, shape):
    seq = seq if batch_first else seq.transpose(0, 1)
    return seq.transpose(1, 2).reshape(shape)


def mha_run(mha, images, grad_out, attn_mask=None, key_images=None):
    """The reference: ``mha`` on the flattened pixels; returns output, attention weights and gradients."""
    mha.zero_grad(set_to_none=True)
    x = images.detach().clone().requires_grad_(True)
    query = to_sequence(x, mha.batch_first)
    key = query if key_images is None else to_sequence(key_images, mha.batch_first)
    out, weights = mha(query, key, key, attn_mask=attn_mask, average_attn_weights=False)
    out = from_sequence(out, mha.batch_first, images.shape)
    out.backward(grad_out)
    grads = {"in_proj_weight": mha.in_proj_weight.grad, "out_proj.weight": mha.out_proj.weight.grad}
    if mha.in_proj_bias is not None:
        grads.update({"in_proj_bias": mha.in_proj_bias.grad, "out_proj.bias": mha.out_proj.bias.grad})
    return out.detach(), weights.detach(), x.grad, grads


def graph_run(layer, images, grad_out, graph_fn, key_images=None):
    """The twin: ``layer`` on the graph ``graph_fn(images)``; attention weights scattered into dense (B, h, L, S)."""
    layer.zero_grad(set_to_none=True)
    x = images.detach().clone().requires_grad_(True)
    g = graph_fn(x)
    inputs = g.x if key_images is None else (graph_fn(key_images).x, g.x)
    out, alpha = layer(inputs, g.edge_index, g.edge_type, return_attention_weights=True)
    image = graph_to_image(out, g)
    image.backward(grad_out)
    b, n = images.size(0), images[0, 0].numel()
    dense = alpha.new_zeros(b, layer.num_heads, n, n)
    src, dst = g.edge_index
    dense[dst // n, :, dst % n, src % n] = alpha.detach()
    e = layer.embed_dim
    projections = (layer.query, layer.key, layer.value)
    grads = {"in_proj_weight": torch.cat([p.weight.grad.view(e, e) for p in projections]),
             "out_proj.weight": layer.out_proj.weight.grad.view(e, e)}
    if layer.query.bias is not None:
        grads.update({"in_proj_bias": torch.cat([p.bias.grad for p in projections]),
                      "out_proj.bias": layer.out_proj.bias.grad})
    return image.detach(), dense, x.grad, grads


def compare(got, want):
    out, weights, grad_input, grads = got
    ref_out, ref_weights, ref_grad_input, ref_grads = want
    assert_matches(out, ref_out, "forward output")
    assert_matches(weights, ref_weights, "attention weights")
    assert_matches(grad_input, ref_grad_input, "gradient of the input")
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert_matches(grads[name], ref_grads[name], f"gradient of {name}")


def images_for(case, dtype, device, seed=2):
    embed_dim, _, _, _, batch, height, width = case
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, embed_dim, height, width, generator=gen, dtype=torch.float64).to(device, dtype)
    grad_out = torch.randn(images.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    return images, grad_out


# ----------------------------------------------------------------------------- PixelAttention = MHA
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_complete_graph_equals_multihead_attention(case, dtype, device):
    mha = make_mha(*case[:4], dtype, device)
    layer = PixelAttention.from_multihead_attention(mha)
    images, grad_out = images_for(case, dtype, device)
    compare(graph_run(layer, images, grad_out, complete_pixel_graph), mha_run(mha, images, grad_out))


@pytest.mark.parametrize("kernel_size", [3, 5, (3, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_kxk_graph_equals_masked_multihead_attention(case, dtype, kernel_size, device):
    """Local attention: the k x k pixel graph is nn.MultiheadAttention with the neighbourhood as attn_mask."""
    mha = make_mha(*case[:4], dtype, device)
    layer = PixelAttention.from_multihead_attention(mha)
    images, grad_out = images_for(case, dtype, device)
    k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
    allowed, _ = neighbourhood(*images.shape[-2:], k)
    mask = (~allowed).to(device)
    assert torch.equal(layer.attention_mask(*images.shape[-2:], kernel_size=k), mask)

    def graph(x):
        return image_to_graph(x, kernel_size=k, padding=(k[0] // 2, k[1] // 2))

    compare(graph_run(layer, images, grad_out, graph), mha_run(mha, images, grad_out, attn_mask=mask))


@pytest.mark.parametrize("graph", ["kxk", "complete"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_tap_bias_equals_a_per_head_float_mask(case, dtype, graph, device):
    """A bias per head per kernel tap (relative-position bias) is nn.MultiheadAttention with a float
    attn_mask: the bias on allowed pairs, -inf elsewhere. The gradient of the bias is compared too."""
    mha = make_mha(*case[:4], dtype, device)
    height, width = case[5:]
    k = (3, 3) if graph == "kxk" else (2 * height - 1, 2 * width - 1)
    layer = PixelAttention.from_multihead_attention(mha, kernel_size=k)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.tap_bias.copy_(torch.randn(layer.tap_bias.shape, generator=gen, dtype=torch.float64))
    images, grad_out = images_for(case, dtype, device)
    allowed, tap = neighbourhood(height, width, k)
    bias = layer.tap_bias.detach().clone().requires_grad_(True)
    mask = bias[:, tap.to(device)].masked_fill(~allowed.to(device), float("-inf")).repeat(images.size(0), 1, 1)
    want = mha_run(mha, images, grad_out, attn_mask=mask)
    graph_fn = complete_pixel_graph if graph == "complete" else (lambda x: image_to_graph(x, kernel_size=3, padding=1))
    got = graph_run(layer, images, grad_out, graph_fn)
    compare(got, want)
    assert_matches(layer.tap_bias.grad, bias.grad, "gradient of the tap bias")
    assert torch.equal(layer.attention_mask(height, width, num_images=images.size(0)), mask.detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cross_attention_on_a_bipartite_pair(dtype, device):
    """x = (x_src, x_dst): queries from one image batch, keys and values from another."""
    case = CASES[0]
    mha = make_mha(*case[:4], dtype, device)
    layer = PixelAttention.from_multihead_attention(mha)
    images, grad_out = images_for(case, dtype, device)
    keys, _ = images_for(case, dtype, device, seed=9)
    compare(graph_run(layer, images, grad_out, complete_pixel_graph, key_images=keys),
            mha_run(mha, images, grad_out, key_images=keys))


def test_constant_scores_plus_tap_bias_is_a_convolution(device):
    """Zero query weights make every score 0; with a tap bias, alpha = softmax(bias)_t on every edge that
    a full window delivers, so attention is the convolution with taps softmax(bias_h)_t W_out^h W_v^h
    and bias W_out b_v + b_out. Circular padding gives every pixel its full window: exact everywhere."""
    dtype, e, heads, k = torch.float64, 6, 3, 3
    mha = make_mha(e, heads, True, True, dtype, device)
    layer = PixelAttention.from_multihead_attention(mha, kernel_size=k)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.query.weight.zero_()
        layer.query.bias.zero_()
        layer.tap_bias.copy_(torch.randn(heads, k * k, generator=gen, dtype=dtype))
    d = e // heads
    w_v, b_v = layer.value.weight.detach().view(e, e), layer.value.bias.detach()
    w_out, b_out = layer.out_proj.weight.detach().view(e, e), layer.out_proj.bias.detach()
    taps = torch.softmax(layer.tap_bias.detach(), dim=1)  # [heads, k*k]
    weight = sum(taps[h].view(1, 1, k, k) * (w_out[:, h * d:(h + 1) * d] @ w_v[h * d:(h + 1) * d]).view(e, e, 1, 1)
                 for h in range(heads))
    conv = nn.Conv2d(e, e, k, padding=k // 2, padding_mode="circular", device=device, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(w_out @ b_v + b_out)
    images = torch.randn(2, e, 5, 4, generator=gen, dtype=dtype).to(device).requires_grad_(True)
    g = image_to_graph(images, conv)
    out = graph_to_image(layer(g.x, g.edge_index, g.edge_type), g)
    ref = conv(images)
    assert_matches(out, ref, "attention with constant scores vs nn.Conv2d")
    grad = torch.randn(ref.shape, generator=gen, dtype=dtype).to(device)
    assert_matches(torch.autograd.grad(out, images, grad)[0], torch.autograd.grad(ref, images, grad)[0],
                   "gradient of the input")
    twin = GridConv2d.from_conv2d(conv)
    assert_matches(graph_to_image(twin(g.x, g.edge_index, g.edge_type), g), ref, "GridConv2d twin")
    # With zero padding a border pixel's window is cut, and attention renormalises over the taps it has:
    # equal to the convolution inside, different on the border.
    zero = nn.Conv2d(e, e, k, padding=k // 2, device=device, dtype=dtype)
    zero.load_state_dict(conv.state_dict())
    g = image_to_graph(images, zero)
    out = graph_to_image(layer(g.x, g.edge_index, g.edge_type), g).detach()
    ref = zero(images).detach()
    assert_matches(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], "interior, zero padding")
    assert not torch.allclose(out[..., 0, :], ref[..., 0, :])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dropout_eval_and_certain_dropout(dtype, mode, device):
    """Attention dropout: none in eval; with p = 1 in training every weight is dropped on both sides."""
    case = CASES[0]
    p = 0.3 if mode == "eval" else 1.0
    mha = make_mha(*case[:4], dtype, device, dropout=p)
    mha.train(mode == "train")
    layer = PixelAttention.from_multihead_attention(mha)
    assert layer.dropout == p and layer.training == (mode == "train")
    images, grad_out = images_for(case, dtype, device)
    got, want = graph_run(layer, images, grad_out, complete_pixel_graph), mha_run(mha, images, grad_out)
    assert_matches(got[0], want[0], "forward output")
    assert_matches(got[2], want[2], "gradient of the input")
    if mode == "train":  # only the output bias is left
        assert_matches(got[0], mha.out_proj.bias.detach().view(1, -1, 1, 1).expand_as(got[0]), "output bias")


@given(num_nodes=st.integers(1, 9), heads=st.sampled_from([1, 2, 4]), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2 ** 16), shuffle=st.booleans())
def test_any_graph_equals_multihead_attention_with_its_adjacency_as_mask(num_nodes, heads, density, seed, shuffle):
    """On any graph with self-loops (no repeated edge), attention is nn.MultiheadAttention with
    attn_mask = no edge; the edge order does not matter."""
    gen = torch.Generator().manual_seed(seed)
    adjacency = torch.rand(num_nodes, num_nodes, generator=gen) < density
    adjacency |= torch.eye(num_nodes, dtype=torch.bool)  # [target, source]
    dst, src = adjacency.nonzero(as_tuple=True)
    edge_index = torch.stack([src, dst])
    if shuffle:
        edge_index = edge_index[:, torch.randperm(edge_index.size(1), generator=gen)]
    mha = make_mha(4, heads, True, True, torch.float64, "cpu", seed=seed)
    layer = PixelAttention.from_multihead_attention(mha)
    x = torch.randn(num_nodes, 4, generator=gen, dtype=torch.float64)
    ref = mha(x[None], x[None], x[None], attn_mask=~adjacency)[0][0]
    assert_matches(layer(x, edge_index), ref.detach(), "forward output")


def test_edge_index_subclass_and_edge_order(device):
    """A torch_geometric.EdgeIndex (as the graph redesign returns) and shuffled edges give the same result."""
    layer = PixelAttention(4, 2, kernel_size=3, device=device, dtype=torch.float64)
    with torch.no_grad():
        layer.tap_bias.normal_()
    images = torch.randn(2, 4, 3, 4, dtype=torch.float64, device=device)
    g = image_to_graph(images, kernel_size=3, padding=1)
    want = layer(g.x, g.edge_index, g.edge_type)
    n = g.num_nodes
    wrapped = torch_geometric.EdgeIndex(g.edge_index.clone(), sparse_size=(n, n))
    assert_matches(layer(g.x, wrapped, g.edge_type), want, "EdgeIndex input")
    perm = torch.randperm(g.edge_index.size(1), generator=torch.Generator().manual_seed(0)).to(device)
    assert_matches(layer(g.x, g.edge_index[:, perm], g.edge_type[perm]), want, "shuffled edges")


def test_target_without_incoming_edges_gets_the_output_bias(device):
    layer = PixelAttention(4, 2, device=device, dtype=torch.float64)
    with torch.no_grad():
        layer.out_proj.bias.normal_()
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    edge_index = torch.tensor([[0, 1], [0, 0]], device=device)  # nodes 1 and 2 receive nothing
    out = layer(x, edge_index)
    assert torch.equal(out[1], layer.out_proj.bias.detach()) and torch.equal(out[2], out[1])
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- conversion, graphs, repr
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_round_trip_with_multihead_attention(bias, batch_first, device):
    mha = make_mha(6, 3, bias, batch_first, torch.float64, device)
    mha.eval()
    mha.in_proj_weight.requires_grad_(False)
    layer = PixelAttention.from_multihead_attention(mha)
    assert not layer.training and not layer.query.weight.requires_grad and layer.out_proj.weight.requires_grad
    back = layer.to_multihead_attention()
    assert back.batch_first == batch_first and not back.training
    assert set(back.state_dict()) == set(mha.state_dict())
    for name, value in mha.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
        assert back.state_dict()[name].data_ptr() != value.data_ptr()  # a copy, not a view
    assert not back.in_proj_weight.requires_grad
    assert layer.to_multihead_attention(batch_first=not batch_first).batch_first == (not batch_first)
    # A layer built directly: its MultiheadAttention twin computes the same attention.
    fresh = PixelAttention(6, 2, bias=bias, device=device, dtype=torch.float64)
    images = torch.randn(2, 6, 3, 3, dtype=torch.float64, device=device)
    seq = to_sequence(images, False)
    ref = fresh.to_multihead_attention()(seq, seq, seq)[0]
    g = complete_pixel_graph(images)
    assert_matches(graph_to_image(fresh(g.x, g.edge_index), g), from_sequence(ref, False, images.shape).detach(),
                   "fresh layer vs its twin")


def test_initialisation_follows_multihead_attention():
    layer = PixelAttention(16, 4, kernel_size=3)
    bound = math.sqrt(6 / (16 + 48))  # xavier_uniform_ of the packed [3E, E] projection
    for proj in (layer.query, layer.key, layer.value):
        assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 4
        assert torch.equal(proj.bias, torch.zeros(16))
    assert torch.equal(layer.out_proj.bias, torch.zeros(16))
    assert torch.equal(layer.tap_bias, torch.zeros(4, 9))
    assert layer.num_taps == 9 and PixelAttention(4, 2).num_taps is None


def test_complete_pixel_graph_structure():
    images = torch.randn(2, 3, 3, 4)
    g = complete_pixel_graph(images)
    n = 12
    assert g.edge_index.size(1) == 2 * n * n
    src, dst = g.edge_index
    assert torch.equal(src // n, dst // n)  # block-diagonal: no edge joins two images
    pairs = set(zip(src.tolist(), dst.tolist()))
    assert pairs == {(b * n + j, b * n + i) for b in range(2) for i in range(n) for j in range(n)}
    # edge_type is the relative offset's tap in the (2H-1) x (2W-1) kernel
    dy = src % n // 4 - dst % n // 4
    dx = src % n % 4 - dst % n % 4
    assert torch.equal(g.edge_type, (dy + 2) * 7 + (dx + 3))
    assert torch.equal(graph_to_image(g.x, g), images)
    assert complete_pixel_graph(images[0]).edge_index.size(1) == n * n


def test_repr():
    assert repr(PixelAttention(8, 2)) == "PixelAttention(embed_dim=8, num_heads=2)"
    assert repr(PixelAttention(8, 2, dropout=0.1, bias=False, kernel_size=3)) == \
        "PixelAttention(embed_dim=8, num_heads=2, dropout=0.1, bias=False, kernel_size=(3, 3))"
    assert repr(SqueezeExcitation(8, 2)) == "SqueezeExcitation(8, 2, activation=ReLU, scale_activation=Sigmoid)"


# ----------------------------------------------------------------------------- errors
def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_errors_on_bad_modules_and_arguments():
    _raises(TypeError, r"mha must be an nn.MultiheadAttention \(got Linear\)",
            PixelAttention.from_multihead_attention, nn.Linear(4, 4))
    _raises(ValueError, r"kdim = vdim = embed_dim = 4 \(got kdim=3, vdim=4\)",
            PixelAttention.from_multihead_attention, nn.MultiheadAttention(4, 2, kdim=3))
    _raises(ValueError, "add_bias_kv", PixelAttention.from_multihead_attention,
            nn.MultiheadAttention(4, 2, add_bias_kv=True))
    _raises(ValueError, "add_zero_attn", PixelAttention.from_multihead_attention,
            nn.MultiheadAttention(4, 2, add_zero_attn=True))
    _raises(ValueError, r"embed_dim must be divisible by num_heads \(got embed_dim=6, num_heads=4\)",
            PixelAttention, 6, 4)
    _raises(ValueError, r"num_heads must be a positive int \(got 0\)", PixelAttention, 6, 0)
    _raises(ValueError, r"dropout must be a probability in \[0, 1\] \(got 1.5\)", PixelAttention, 6, 2, 1.5)
    _raises(TypeError, r"images must be a torch.Tensor \(got list\)", complete_pixel_graph, [1.0])
    _raises(ValueError, r"3 or 4 dims \(got a 2-dim tensor", complete_pixel_graph, torch.zeros(3, 3))
    _raises(ValueError, "kernel_size is needed", PixelAttention(4, 2).attention_mask, 3, 3)
    _raises(ValueError, r"kernel_size must be odd.* \(got \(3, 2\)\)", PixelAttention(4, 2).attention_mask, 3, 3, (3, 2))


def test_errors_on_bad_inputs():
    layer = PixelAttention(4, 2, kernel_size=3)
    x = torch.randn(5, 4)
    ei = torch.tensor([[0, 1, 2], [1, 1, 4]])
    et = torch.tensor([0, 4, 8])
    assert layer(x, ei, et).shape == (5, 4)
    _raises(TypeError, r"x must be a torch.Tensor \(got list\)", layer, [[1.0] * 4], ei, et)
    _raises(ValueError, r"expected x with 4 channels \(got 3\)", layer, torch.randn(5, 3), ei, et)
    _raises(ValueError, r"expected x of shape \[num_nodes, 4\]: 2 dims \(got a 1-dim", layer, torch.randn(4), ei, et)
    _raises(TypeError, r"expected x of dtype torch.float32, the layer's dtype \(got torch.float64\)",
            layer, x.double(), ei, et)
    _raises(ValueError, r"expected x\[1\] \(targets\) with 4 channels \(got 2\)", layer, (x, torch.randn(3, 2)), ei, et)
    _raises(TypeError, r"expected edge_index of dtype torch.int64 \(got torch.float32\)", layer, x, ei.float(), et)
    _raises(ValueError, r"expected edge_index of shape \[2, num_edges\] \(got \(3, 1\)\)", layer, x,
            torch.zeros(3, 1, dtype=torch.long), et)
    _raises(ValueError, r"edge_type is needed: this layer has a tap bias for a \(3, 3\) kernel", layer, x, ei)
    _raises(ValueError, r"expected edge_type of shape \[3\], one tap per edge \(got \(2,\)\)", layer, x, ei, et[:2])
    _raises(ValueError, r"edge_type must lie in \[0, 9\) .* \(got values in \[0, 9\]\)", layer, x, ei,
            torch.tensor([0, 4, 9]))
    _raises(ValueError, r"edge_index\[1\] \(target node ids\) must lie in \[0, 5\) \(got values in \[1, 5\]\)",
            layer, x, torch.tensor([[0, 1, 2], [1, 1, 5]]), et)
    _raises(ValueError, r"size \(5, 3\) does not match the rows of x twice: \(5, 5\)", layer, x, ei, et, size=(5, 3))
    _raises(ValueError, r"kernel_size \(5, 5\) differs from the tap bias's \(3, 3\)", layer.attention_mask, 3, 3, 5)


# ----------------------------------------------------------------------------- squeeze-and-excitation
class TorchSqueezeExcitation(nn.Module):
    """The reference block (torchvision's layout): average pool, 1x1 reduce, activation, 1x1 expand, sigmoid."""

    def __init__(self, channels, squeeze, activation=nn.ReLU):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


def se_check(block, layer, images, grad_out, names):
    """Run the torch block and the graph layer (on the 1x1 pixel graph, with ``batch``) forward and backward."""
    x_ref = images.detach().clone().requires_grad_(True)
    ref = block(x_ref)
    ref.backward(grad_out)
    x = images.detach().clone().requires_grad_(True)
    g = image_to_graph(x, kernel_size=1, padding=0)
    out = graph_to_image(layer(g.x, g.batch), g)
    out.backward(grad_out)
    assert_matches(out.detach(), ref.detach(), "forward output")
    assert_matches(x.grad, x_ref.grad, "gradient of the input")
    params = dict(block.named_parameters())
    for mine, theirs in names.items():
        assert_matches(dict(layer.named_parameters())[mine].grad, params[theirs].grad, f"gradient of {theirs}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch, channels, squeeze, height, width", [(3, 8, 2, 4, 5), (1, 4, 4, 3, 3), (2, 6, 3, 1, 7)])
def test_squeeze_excitation_equals_the_torch_block(batch, channels, squeeze, height, width, dtype, device):
    torch.manual_seed(0)
    block = TorchSqueezeExcitation(channels, squeeze).to(device, dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))
    layer = SqueezeExcitation.from_conv2d(block.fc1, block.fc2)
    images = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64).to(device, dtype)
    grad_out = torch.randn(images.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    names = {n: n for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    se_check(block, layer, images, grad_out, names)
    # torchvision's parameter names and shapes: state dicts load both ways
    fresh = SqueezeExcitation(channels, squeeze, device=device, dtype=dtype)
    fresh.load_state_dict(block.state_dict())
    block.load_state_dict(layer.state_dict())
    fc1, fc2 = fresh.to_conv2d()
    assert torch.equal(fc1.weight, block.fc1.weight) and torch.equal(fc2.bias, block.fc2.bias)


def test_squeeze_excitation_equals_the_reference_models_block(device):
    """gridgraph.models.SqueezeExcite (SiLU between its 1x1 layers ``reduce`` and ``expand``)."""
    torch.manual_seed(0)
    block = SqueezeExcite(8, 3).to(device, torch.float64)
    layer = SqueezeExcitation.from_conv2d(block.reduce, block.expand, activation=nn.SiLU)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 8, 5, 4, generator=gen, dtype=torch.float64).to(device)
    grad_out = torch.randn(images.shape, generator=gen, dtype=torch.float64).to(device)
    se_check(block, layer, images, grad_out, {"fc1.weight": "reduce.weight", "fc1.bias": "reduce.bias",
                                              "fc2.weight": "expand.weight", "fc2.bias": "expand.bias"})


def test_squeeze_excitation_inputs_and_errors():
    se = SqueezeExcitation(4, 2)
    images = torch.randn(3, 4, 2, 3)
    g = image_to_graph(images, kernel_size=1, padding=0)
    out = se(g.x, g.batch)
    # one image at a time, and the batch given as an EdgeIndex-free plain tensor with num_images
    for b in range(3):
        one = se(g.x[b * 6:(b + 1) * 6])
        torch.testing.assert_close(one, out[b * 6:(b + 1) * 6], rtol=0, atol=1e-6)
    torch.testing.assert_close(se(g.x, g.batch, num_images=3), out, rtol=0, atol=0)
    _raises(ValueError, r"expected x with 4 channels \(got 3\)", se, torch.randn(6, 3))
    _raises(ValueError, r"expected batch of shape \[18\], one image id per row of x \(got \(17,\)\)",
            se, g.x, g.batch[:17])
    _raises(TypeError, r"expected batch of dtype torch.int64 \(got torch.float32\)", se, g.x, g.batch.float())
    _raises(ValueError, r"batch must lie in \[0, num_images=2\) \(got values in \[0, 2\]\)", se, g.x, g.batch, 2)
    _raises(ValueError, r"fc2 must map fc1's 2 channels back to 4 \(got fc2: 2 -> 3\)",
            SqueezeExcitation.from_conv2d, nn.Conv2d(4, 2, 1), nn.Conv2d(2, 3, 1))
    _raises(TypeError, r"conv must be an nn.Conv2d \(got Linear\)", SqueezeExcitation.from_conv2d,
            nn.Linear(4, 2), nn.Conv2d(2, 4, 1))


def test_public_api():
    for name in ("PixelAttention", "SqueezeExcitation", "complete_pixel_graph"):
        assert name in gridgraph.__all__ and name in gridgraph.nn.__all__


def test_verify_attention_passes_and_can_fail(device, monkeypatch):
    from gridgraph.verify import ATTENTION_CASES, verify_attention

    report = verify_attention(ATTENTION_CASES, devices=[device])
    assert report.passed and len(report.results) == 2 * len(ATTENTION_CASES)
    assert {r.path for r in report.results} == {"complete", "local"}
    assert report.max_forward_error[torch.float64] <= 1e-10
    import gridgraph.nn.attention as attention

    original = attention.softmax
    monkeypatch.setattr(attention, "softmax", lambda *a, **k: original(*a, **k) * (1 + 1e-6))
    broken = verify_attention(ATTENTION_CASES[:1], dtypes=[torch.float64], devices=[device])
    assert not broken.passed
