# %% [markdown]
# # 1. Pixels as nodes
#
# An image is a graph: every pixel is a node whose features are its channel vector, and a
# convolution decides the edges. A `k x k` convolution joins each output pixel to the `k x k`
# input pixels under its window, one edge per kernel tap; a `1 x 1` convolution joins each pixel
# to itself only. This notebook builds both graphs for one small image, checks every claim
# numerically, and draws them side by side.

# %%
# %matplotlib inline
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice, printed on import

import torch
from matplotlib.figure import Figure

import gridgraph as gg
from gridgraph import analysis, plot

_ = torch.manual_seed(0)

# %% [markdown]
# ## An image becomes node features
#
# A `(C, H, W)` image becomes `x` of shape `[H*W, C]`; pixel `(h, w)` is node `h*W + w`
# (row-major, y pointing down).

# %%
C, H, W = 3, 4, 5
image = torch.stack([torch.linspace(0, 1, W).expand(H, W),          # red: left to right
                     torch.linspace(0, 1, H)[:, None].expand(H, W),  # green: top to bottom
                     torch.full((H, W), 0.5)])                       # blue: constant
g1 = gg.image_to_graph(image, kernel_size=1, padding=0)
print("x:", tuple(g1.x.shape), " edge_index:", tuple(g1.edge_index.shape))
for h, w in [(0, 0), (2, 3), (3, 4)]:
    node = h * W + w
    assert torch.equal(g1.x[node], image[:, h, w])
    print(f"pixel ({h}, {w}) -> node {node:2d}, features {g1.x[node].tolist()}")
assert torch.equal(gg.graph_to_image(g1.x, g1), image)  # image -> graph -> image is bit-exact

# %% [markdown]
# ## The 1x1 graph: self-loops only
#
# Kernel size 1 gives exactly one edge per pixel, from the pixel to itself.

# %%
src, dst = g1.edge_index
assert g1.edge_index.size(1) == H * W
assert torch.equal(src, dst) and torch.equal(src, torch.arange(H * W))
assert torch.equal(g1.edge_type, torch.zeros(H * W, dtype=torch.long))
print(f"{g1.edge_index.size(1)} edges, all self-loops:", bool((src == dst).all()))

# %% [markdown]
# ## The 3x3 graph: neighbours
#
# With a 3x3 kernel and zero padding of 1, an interior pixel receives 9 messages (its 8
# neighbours and itself), a border pixel 6 and a corner pixel 4: edges to padded positions are
# absent. Each edge carries its tap `u*3 + v` (`edge_type`) and the tap's offset `(dy, dx)`
# from the target (`edge_attr`).

# %%
g3 = gg.image_to_graph(image, kernel_size=3, padding=1)
in_degree = torch.bincount(g3.edge_index[1], minlength=H * W).view(H, W)
print("messages received per pixel:\n", in_degree)
assert in_degree[1:-1, 1:-1].eq(9).all() and in_degree[0, 0] == 4 and in_degree[0, 2] == 6
assert g3.edge_index.size(1) == (3 * W - 2) * (3 * H - 2)  # (sum over rows) x (sum over cols)
target = 1 * W + 2
into = g3.edge_index[1] == target
for j, t, off in zip(g3.edge_index[0][into].tolist(), g3.edge_type[into].tolist(), g3.edge_attr[into].tolist()):
    print(f"  node {j:2d} -> node {target}: tap {t} = (u={t // 3}, v={t % 3}), offset {tuple(int(o) for o in off)}")
assert sorted(g3.edge_type[into].tolist()) == list(range(9))

# %% [markdown]
# Side by side: the 1x1 graph has nothing but self-loops; the 3x3 graph connects every pixel to
# its neighbours. Edges are coloured by kernel tap.

# %%
fig = Figure(figsize=(11, 4.2), dpi=80, layout="constrained")
left, right = fig.subplots(1, 2)
plot.draw_pixel_graph(g1, left, title=f"1x1: {g1.edge_index.size(1)} self-loops")
plot.draw_pixel_graph(g3, right, title=f"3x3, padding 1: {g3.edge_index.size(1)} edges")
fig

# %% [markdown]
# ## The graph depends on the geometry, never on the weights
#
# Two different convolutions with the same geometry share one pixel graph; the weights only
# decide what travels along the edges.

# %%
conv_a = torch.nn.Conv2d(3, 8, 3, padding=1)
conv_b = torch.nn.Conv2d(3, 2, 3, padding=1)
ga, gb = gg.image_to_graph(image, conv_a), gg.image_to_graph(image, conv_b)
assert torch.equal(ga.edge_index, gb.edge_index) and torch.equal(ga.edge_type, gb.edge_type)
print("same edges for both convolutions:", torch.equal(ga.edge_index, gb.edge_index))

# %% [markdown]
# ## Message passing on these graphs *is* the convolution
#
# `PointwiseConv2d` on the self-loop graph equals `nn.Conv2d(C, C', 1)`; `GridConv2d` on the 3x3
# graph equals `nn.Conv2d(C, C', 3, padding=1)`.

# %%
batch = torch.randn(2, C, H, W, dtype=torch.float64)
for conv, layer_cls in [(torch.nn.Conv2d(C, 6, 1).double(), gg.PointwiseConv2d),
                        (torch.nn.Conv2d(C, 6, 3, padding=1).double(), gg.GridConv2d)]:
    layer = layer_cls.from_conv2d(conv)
    g = gg.image_to_graph(batch, layer)
    out = gg.graph_to_image(layer(g.x, g.edge_index, g.edge_type, size=g.size()), g)
    err = (out - conv(batch)).abs().max().item()
    print(f"{type(layer).__name__:16s} vs nn.Conv2d(k={conv.kernel_size[0]}): max |difference| = {err:.1e}")
    assert err < 1e-12

# %% [markdown]
# ## Circular padding: the grid becomes a torus
#
# With `padding_mode='circular'` the missing neighbours wrap around, so every pixel, corners
# included, receives all 9 messages.

# %%
gc = gg.image_to_graph(image, kernel_size=3, padding=1, padding_mode="circular")
degree = torch.bincount(gc.edge_index[1], minlength=H * W)
assert degree.eq(9).all()
corner = gc.edge_index[0][gc.edge_index[1] == 0].tolist()
print("the corner (0, 0) hears from nodes", sorted(corner))
assert sorted(corner) == sorted([19, 15, 16, 4, 0, 1, 9, 5, 6])
fig = plot.draw_messages(gc, (0, 0), title="circular padding: messages into the corner (0, 0)")
fig
