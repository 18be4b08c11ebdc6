# %% [markdown]
# # 4. A k x k convolution is message passing
#
# On the pixel graph of a `k x k` convolution, output pixel $i$ receives one message from every
# input pixel $j$ under its window, transformed by the weight of the kernel tap $(u, v)$ that joins
# them:
#
# $$\mathbf{x}'_i = \mathbf{b} + \sum_{(j \to i) \in \mathcal{E}} \mathbf{W}_{:,:,u,v}\, \mathbf{x}_j,
# \qquad \texttt{edge\_type}(j \to i) = u \cdot k_W + v.$$
#
# This notebook checks that `GridConv2d` on that graph equals `nn.Conv2d` across strides,
# dilations and all four padding modes, recomputes one output pixel by hand from its incoming
# messages, and draws those messages.

# %%
# %matplotlib inline
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice, printed on import

warnings.filterwarnings("ignore", message="Using padding='same' with even kernel")  # nn.Conv2d's notice

import torch
from matplotlib.figure import Figure

import gridgraph as gg
from gridgraph import plot

_ = torch.manual_seed(0)

# %% [markdown]
# ## The equivalence, configuration by configuration
#
# Forward and gradients, in float64, against `nn.Conv2d` with the same weights.

# %%
configs = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=5, stride=2, dilation=2, padding=3),
    dict(kernel_size=(2, 3), padding="same"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=2, padding_mode="replicate"),
    dict(kernel_size=3, padding=1, padding_mode="circular"),
    dict(kernel_size=3, padding="valid", groups=2),
]
x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
print(f"{'configuration':62s} {'forward':>9s} {'gradients':>9s}")
for kw in configs:
    conv = torch.nn.Conv2d(4, 6, **kw).double()
    layer = gg.GridConv2d.from_conv2d(conv)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = gg.image_to_graph(xb, layer)
    out = gg.graph_to_image(layer(g.x, g.edge_index, g.edge_type, size=g.size()), g)
    ref = conv(xa)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    fwd = (out - ref).abs().max().item()
    bwd = max((xa.grad - xb.grad).abs().max().item(), (conv.weight.grad - layer.weight.grad).abs().max().item(),
              (conv.bias.grad - layer.bias.grad).abs().max().item())
    print(f"{str(kw):62s} {fwd:9.1e} {bwd:9.1e}")
    assert out.shape == ref.shape and fwd < 1e-12 and bwd < 1e-12

# %% [markdown]
# ## One output pixel, recomputed from its messages
#
# Take a strided, dilated, reflect-padded convolution and an output pixel on the border. Walk its
# incoming edges (some come from reflected pixels, and one input pixel can send two messages),
# multiply each source pixel's channel vector by the weight slice of the edge's tap, and
# add: that is `nn.Conv2d`'s output at that pixel.

# %%
conv = torch.nn.Conv2d(4, 3, 3, stride=2, dilation=2, padding=2, padding_mode="reflect").double()
layer = gg.GridConv2d.from_conv2d(conv)
image = torch.randn(4, 9, 8, dtype=torch.float64)
g = gg.image_to_graph(image, layer)
target = (0, 3)  # anchor (0, 6): taps above the image and right of it are reflected back in
i = target[0] * g.out_size[1] + target[1]
into = (g.edge_index[1] == i).nonzero().flatten()
total = conv.bias.detach().clone()
print(f"messages into output pixel {target} (anchor {tuple(t * 2 for t in target)} on the input grid):")
for e in into.tolist():
    j, tap = int(g.edge_index[0, e]), int(g.edge_type[e])
    u, v = divmod(tap, 3)
    message = conv.weight.detach()[:, :, u, v] @ g.x[j]
    total += message
    print(f"  from input pixel {divmod(j, g.in_size[1])}, tap ({u},{v}), offset "
          f"{tuple(int(o) for o in g.edge_attr[e].tolist())}")
expected = conv(image[None])[0, :, target[0], target[1]]
print("sum of messages + bias:", [round(v, 6) for v in total.tolist()])
print("nn.Conv2d output:      ", [round(v, 6) for v in expected.tolist()])
assert len(into) == 9  # reflect padding: every target gets all 9 messages
torch.testing.assert_close(total, expected.detach(), rtol=1e-12, atol=1e-12)

# %% [markdown]
# ## How many messages? It depends on the padding mode
#
# With zero padding the taps that fall outside the image have no edge: a corner pixel of a 3x3,
# padding-1 convolution receives 4 messages. Reflect, replicate and circular padding take the
# message from the mirrored, clamped or wrapped pixel instead, so every pixel receives all 9.

# %%
for mode in ["zeros", "reflect", "replicate", "circular"]:
    gm = gg.image_to_graph(torch.zeros(1, 5, 6), kernel_size=3, padding=1, padding_mode=mode)
    degree = torch.bincount(gm.edge_index[1], minlength=30).view(5, 6)
    print(f"{mode:9s}: corner {int(degree[0, 0])}, edge {int(degree[0, 2])}, interior {int(degree[2, 2])}, "
          f"edges {gm.edge_index.size(1)}")
    assert int(degree[2, 2]) == 9
    assert int(degree[0, 0]) == (4 if mode == "zeros" else 9)
    assert int(degree.min()) == (4 if mode == "zeros" else 9)

# %% [markdown]
# ## The messages into one pixel, drawn
#
# Plain 3x3; stride 2 (the graph is bipartite: squares are the output pixels, at their anchors);
# dilation 2 (the taps spread out); and circular padding at a corner (the messages wrap around).

# %%
fig = Figure(figsize=(14, 3.9), dpi=80, layout="constrained")
axes = fig.subplots(1, 4)
cases = [
    ("3x3, padding 1", dict(kernel_size=3, padding=1), (3, 3)),
    ("3x3, stride 2", dict(kernel_size=3, stride=2), (1, 1)),
    ("3x3, dilation 2", dict(kernel_size=3, dilation=2, padding=2), (3, 3)),
    ("3x3, circular, corner", dict(kernel_size=3, padding=1, padding_mode="circular"), (0, 0)),
]
for ax, (title, kw, target) in zip(axes, cases):
    gi = gg.image_to_graph(torch.zeros(1, 7, 7), **kw)
    w_out = gi.out_size[1]
    n_in = int((gi.edge_index[1] == target[0] * w_out + target[1]).sum())
    assert n_in == 9
    plot.draw_pixel_graph(gi, ax, target=target, only_target=True, legend=ax is axes[-1],
                          title=f"{title}: {n_in} messages into {target}")
fig
