# %% [markdown]
# # 9. Attention is a convolution with data-dependent weights
#
# On the pixel graph of a `k x k` convolution, the edge $j \to i$ carries a weight fixed by its
# kernel tap $\tau(j \to i)$, the same for every image and every pixel:
#
# $$\text{convolution:}\qquad \mathbf{x}'_i = \mathbf{b} + \sum_{(j \to i)} \mathbf{W}_{\tau(j \to i)}\, \mathbf{x}_j .$$
#
# Attention runs on a graph too. Queries, keys and values are 1x1 convolutions (messages over
# self-loops), and each edge gets a weight **computed from the two pixels**: per head $h$, the
# softmax over the incoming edges of $i$ of the score $\mathbf{q}_i \cdot \mathbf{k}_j / \sqrt{d}$,
# optionally plus a learned bias per tap $\beta_{h,\tau}$ (relative-position bias):
#
# $$\text{attention:}\qquad \mathbf{x}'_i = \mathbf{b}' + \sum_{(j \to i)} \underbrace{\sum_h \alpha^h_{ij}\,
# \mathbf{W}^h_{out} \mathbf{W}^h_v}_{\text{a tap weight chosen by the data}}\, \mathbf{x}_j,
# \qquad \alpha^h_{ij} = \operatorname{softmax}_j\!\Big(\frac{\mathbf{q}^h_i \cdot \mathbf{k}^h_j}{\sqrt d} + \beta_{h, \tau(j \to i)}\Big).$$
#
# Same graph, three weightings: **tap weights** (`GridConv2d`), **attention scores**
# (`PixelAttention`), **attention + tap bias**. Each is checked (by `assert`) against its torch twin:
# `nn.Conv2d`, and `nn.MultiheadAttention` on the flattened pixels with the graph as `attn_mask`.
# Then one pixel's attention weights are drawn next to its convolution taps, attention with constant
# scores turns back into a convolution, and the costs of the complete graph (global attention) and
# the `k x k` graph (local attention) are counted.

# %%
# %matplotlib inline
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice, printed on import

import math

import torch
from matplotlib.figure import Figure
from skimage import data
from torch import nn

import gridgraph as gg
from gridgraph import analysis

_ = torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # exact comparisons: float64 throughout

# %% [markdown]
# ## One graph, three weightings
#
# A batch of 2 images of 9 x 10 pixels with 8 channels, and the 5 x 5 pixel graph (padding 2: a border
# pixel has fewer neighbours). The three layers read the same `edge_index`.

# %%
B, E, HEADS, H, W, K = 2, 8, 2, 9, 10, 5
N = H * W
images = torch.randn(B, E, H, W)
g = gg.image_to_graph(images, kernel_size=K, padding=K // 2)
print(f"{B} images of {H}x{W} pixels, {E} channels: {g.num_nodes} nodes, {g.edge_index.size(1)} edges "
      f"(at most {K * K} into a pixel; {int((g.edge_index[1] == 0).sum())} into the corner)")

conv = nn.Conv2d(E, E, K, padding=K // 2)
tap_layer = gg.GridConv2d.from_conv2d(conv)

mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
attention = gg.PixelAttention.from_multihead_attention(mha)
biased = gg.PixelAttention.from_multihead_attention(mha, kernel_size=K)
with torch.no_grad():
    biased.tap_bias.copy_(torch.randn(HEADS, K * K))
print(tap_layer, attention, biased, sep="\n")

# %% [markdown]
# The reference for attention is `nn.MultiheadAttention` on each image's 90 pixels as a sequence. The
# graph *is* the mask: pixel $i$ may attend to pixel $j$ exactly when the graph has the edge
# $j \to i$. Below the mask is read off `edge_index` itself (image 0's block: the graph is
# block-diagonal per image), and, for the tap bias, it becomes a float mask holding
# $\beta_{h,\tau(j \to i)}$ on the edges and $-\infty$ elsewhere.

# %%
src, dst = g.edge_index[:, g.edge_index[1] < N]  # image 0's edges
allowed = torch.zeros(N, N, dtype=torch.bool)
allowed[dst, src] = True                            # [target i, source j]
tap = torch.zeros(N, N, dtype=torch.long)
tap[dst, src] = g.edge_type[g.edge_index[1] < N]
assert torch.equal(~allowed, attention.attention_mask(H, W, kernel_size=K))  # the layer's own mask agrees
float_mask = biased.tap_bias.detach()[:, tap].masked_fill(~allowed, -math.inf).repeat(B, 1, 1)

sequence = images.flatten(2).transpose(1, 2)        # (B, N pixels, E channels)


def as_image(seq):
    return seq.transpose(1, 2).reshape(B, E, H, W)


outputs = {
    "tap weights": (gg.graph_to_image(tap_layer(g.x, g.edge_index, g.edge_type), g), conv(images)),
    "attention scores": (gg.graph_to_image(attention(g.x, g.edge_index, g.edge_type), g),
                         as_image(mha(sequence, sequence, sequence, attn_mask=~allowed)[0])),
    "attention + tap bias": (gg.graph_to_image(biased(g.x, g.edge_index, g.edge_type), g),
                             as_image(mha(sequence, sequence, sequence, attn_mask=float_mask)[0])),
}
for name, (graph_out, torch_out) in outputs.items():
    error = (graph_out - torch_out).abs().max().item()
    print(f"{name:21s}: max |graph - torch| = {error:.1e}")
    assert error < 1e-12

# %% [markdown]
# Gradients agree too, for the input and every weight (shown for the tap-biased layer, whose
# reference gets the tap bias through the float mask).

# %%
x_graph, x_torch = images.clone().requires_grad_(), images.clone().requires_grad_()
bias_torch = biased.tap_bias.detach().clone().requires_grad_()
mask_torch = bias_torch[:, tap].masked_fill(~allowed, -math.inf).repeat(B, 1, 1)
upstream = torch.randn(B, E, H, W)
gx = gg.image_to_graph(x_graph, kernel_size=K, padding=K // 2)
gg.graph_to_image(biased(gx.x, gx.edge_index, gx.edge_type), gx).backward(upstream)
seq = x_torch.flatten(2).transpose(1, 2)
as_image(mha(seq, seq, seq, attn_mask=mask_torch)[0]).backward(upstream)
q, k, v = biased.query, biased.key, biased.value
pairs = {
    "input": (x_graph.grad, x_torch.grad),
    "tap bias": (biased.tap_bias.grad, bias_torch.grad),
    "q, k, v weights": (torch.cat([p.weight.grad.view(E, E) for p in (q, k, v)]), mha.in_proj_weight.grad),
    "q, k, v biases": (torch.cat([p.bias.grad for p in (q, k, v)]), mha.in_proj_bias.grad),
    "output weight": (biased.out_proj.weight.grad.view(E, E), mha.out_proj.weight.grad),
}
for name, (mine, theirs) in pairs.items():
    error = (mine - theirs).abs().max().item()
    print(f"gradient of {name:15s}: max difference {error:.1e}")
    assert error < 1e-12

# %% [markdown]
# ## The tap weight of every edge, recomputed
#
# The claim of the title, at one pixel: attention's output is a sum over the pixel's incoming edges
# of a matrix times the neighbour's features, exactly as in a convolution, only the matrix of the
# edge $j \to i$ is $\sum_h \alpha^h_{ij} \mathbf{W}^h_{out} \mathbf{W}^h_v$ instead of
# $\mathbf{W}_{\tau(j \to i)}$. (The bias $\mathbf{b}' = \mathbf{W}_{out}\mathbf{b}_v + \mathbf{b}_{out}$
# because the weights of each head sum to one.)

# %%
out, alpha = biased(g.x, g.edge_index, g.edge_type, return_attention_weights=True)
d = E // HEADS
w_v, b_v = biased.value.weight.detach().view(E, E), biased.value.bias.detach()
w_out, b_out = biased.out_proj.weight.detach().view(E, E), biased.out_proj.bias.detach()
head_maps = [w_out[:, h * d:(h + 1) * d] @ w_v[h * d:(h + 1) * d] for h in range(HEADS)]  # W_out^h W_v^h

i = 4 * W + 6  # pixel (4, 6) of image 0
incoming = (g.edge_index[1] == i).nonzero().view(-1)
by_hand = w_out @ b_v + b_out
by_hand_conv = conv.bias.detach().clone()
for e in incoming:
    j, t = g.edge_index[0, e], g.edge_type[e]
    edge_weight = sum(alpha[e, h] * head_maps[h] for h in range(HEADS))  # attention's "tap weight" of this edge
    by_hand = by_hand + edge_weight.detach() @ g.x[j]
    by_hand_conv = by_hand_conv + conv.weight.detach()[:, :, t // K, t % K] @ g.x[j]
print(f"pixel (4, 6): {len(incoming)} incoming edges; attention weights per head sum to",
      alpha[incoming].sum(0).tolist())
assert torch.allclose(alpha[incoming].sum(0), torch.ones(HEADS), rtol=0, atol=1e-14)
assert torch.allclose(by_hand, out[i].detach(), rtol=0, atol=1e-12)
assert torch.allclose(by_hand_conv, outputs["tap weights"][0][0, :, 4, 6], rtol=0, atol=1e-12)

# %% [markdown]
# ## One pixel's weights, drawn
#
# A real image now: the cat of scikit-image's bundled `chelsea()` picture, reduced to 20 x 30 pixels,
# its RGB centred and lifted to 6 channels. For two pixels (the cat's eye and a patch of the
# background), the figure shows
#
# * the **convolution taps** (the norm of $\mathbf{W}_{\tau}$, the same at every pixel),
# * the **local attention weights** $\alpha_{ij}$ (head 0) on the 7 x 7 window,
# * the **global attention weights** on the complete pixel graph (every pixel of the image).
#
# The queries and keys here compare colours ($\mathbf{W}_q = \mathbf{W}_k$), so a pixel attends to
# pixels of its own colour: the eye looks at dark pixels, the background at the background.

# %%
cat = torch.from_numpy(data.chelsea()).permute(2, 0, 1).double() / 255  # (3, 300, 451), bundled in the wheel
small = nn.functional.adaptive_avg_pool2d(cat[None], (20, 30))[0]      # (3, 20, 30)
centred = small - small.mean((1, 2), keepdim=True)
picture = torch.cat([centred, centred]) * 2                            # 6 channels
C6, K7 = 6, 7
att6 = gg.PixelAttention(C6, 2, kernel_size=K7)
conv6 = gg.GridConv2d(C6, C6, K7, padding=K7 // 2)
with torch.no_grad():
    for proj in (att6.query, att6.key):
        proj.weight.copy_(torch.eye(C6).view(C6, C6, 1, 1) * 2)
        proj.bias.zero_()
local = gg.image_to_graph(picture, kernel_size=K7, padding=K7 // 2)
whole = gg.complete_pixel_graph(picture)
_, alpha_local = att6(local.x, local.edge_index, local.edge_type, return_attention_weights=True)
att6_global = gg.PixelAttention.from_multihead_attention(att6.to_multihead_attention())  # same weights, no tap bias
_, alpha_global = att6_global(whole.x, whole.edge_index, return_attention_weights=True)

pixels = {"eye": (7, 11), "background": (10, 26)}
tap_norms = conv6.weight.detach().flatten(0, 1).norm(dim=0)  # (7, 7): one number per tap
fig = Figure(figsize=(11, 5.4), dpi=80, layout="constrained")
axes = fig.subplots(2, 4)
local_windows, attended_brightness = {}, {}
brightness = small.mean(0).flatten()  # (600,) grey level of each pixel
for row, (name, (r, c)) in enumerate(pixels.items()):
    target = r * 30 + c
    axes[row, 0].imshow(small.permute(1, 2, 0).clamp(0, 1))
    axes[row, 0].plot(c, r, "c+", markersize=14, mew=2)
    axes[row, 0].set_title(f"{name}: pixel ({r}, {c})", fontsize=9)
    axes[row, 1].imshow(tap_norms, cmap="Greys")
    axes[row, 1].set_title("convolution: |W_tap| (fixed)", fontsize=9)
    window = torch.full((K7, K7), float("nan"))
    into = local.edge_index[1] == target
    taps_in = local.edge_type[into]
    window[taps_in // K7, taps_in % K7] = alpha_local[into, 0].detach()
    local_windows[name] = window
    axes[row, 2].imshow(window, cmap="magma", vmin=0)
    axes[row, 2].set_title("local attention (7x7), head 0", fontsize=9)
    full = torch.zeros(20 * 30)
    into = whole.edge_index[1] == target
    full[whole.edge_index[0, into]] = alpha_global[into, 0].detach()
    attended_brightness[name] = float(full @ brightness)  # brightness of what the pixel attends to
    axes[row, 3].imshow(full.view(20, 30), cmap="magma")
    axes[row, 3].plot(c, r, "c+", markersize=10, mew=2)
    axes[row, 3].set_title("global attention (complete graph)", fontsize=9)
    for ax in axes[row]:
        ax.set_xticks([])
        ax.set_yticks([])
    assert torch.allclose(alpha_global[into].sum(0), torch.ones(2), atol=1e-12)
    assert into.sum() == 20 * 30  # the complete graph: every pixel of the image sends to the target
# the convolution's weights do not depend on the pixel; attention's do
assert not torch.allclose(local_windows["eye"], local_windows["background"], equal_nan=True)
print({name: round(v, 3) for name, v in attended_brightness.items()}, "image mean:", round(float(brightness.mean()), 3))
assert attended_brightness["eye"] < float(brightness.mean()) < attended_brightness["background"]
fig

# %% [markdown]
# ## Constant scores: attention becomes a convolution
#
# Zero the query weights and every score $\mathbf{q}_i \cdot \mathbf{k}_j$ is 0: only the tap bias
# is left, and $\alpha^h_{ij} = \operatorname{softmax}(\beta_h)_{\tau(j \to i)}$ depends on the tap alone.
# Attention is then the convolution with tap weights
# $\mathbf{W}_{\tau} = \sum_h \operatorname{softmax}(\beta_h)_\tau\, \mathbf{W}^h_{out}\mathbf{W}^h_v$
# and bias $\mathbf{W}_{out}\mathbf{b}_v + \mathbf{b}_{out}$. With circular padding every pixel gets its
# full window, so the equality is exact everywhere (with zero padding, a border pixel's softmax is
# renormalised over the taps it has, and only the interior agrees).

# %%
frozen = gg.PixelAttention.from_multihead_attention(mha, kernel_size=K)
with torch.no_grad():
    frozen.query.weight.zero_()
    frozen.query.bias.zero_()
    frozen.tap_bias.copy_(torch.randn(HEADS, K * K))
taps = torch.softmax(frozen.tap_bias.detach(), dim=1)  # [heads, K*K]
derived = nn.Conv2d(E, E, K, padding=K // 2, padding_mode="circular")
with torch.no_grad():
    derived.weight.copy_(sum(taps[h].view(1, 1, K, K) * head_maps[h].view(E, E, 1, 1) for h in range(HEADS)))
    derived.bias.copy_(w_out @ b_v + b_out)
gc = gg.image_to_graph(images, derived)                # the circular 5x5 graph: 25 edges into every pixel
as_attention = gg.graph_to_image(frozen(gc.x, gc.edge_index, gc.edge_type), gc)
as_conv = derived(images)
print(f"constant-score attention vs nn.Conv2d (circular): max difference {(as_attention - as_conv).abs().max():.1e}")
assert torch.allclose(as_attention, as_conv, rtol=0, atol=1e-12)
zero_padded = nn.Conv2d(E, E, K, padding=K // 2)
zero_padded.load_state_dict(derived.state_dict())
on_zero_graph = gg.graph_to_image(frozen(g.x, g.edge_index, g.edge_type), g)
interior = (slice(None), slice(None), slice(K // 2, -(K // 2)), slice(K // 2, -(K // 2)))
assert torch.allclose(on_zero_graph[interior], zero_padded(images)[interior], rtol=0, atol=1e-12)
assert not torch.allclose(on_zero_graph, zero_padded(images), rtol=0, atol=1e-6)  # the border renormalises

# %% [markdown]
# ## The complete graph is global attention
#
# `complete_pixel_graph` joins every pixel of an image to every pixel of the same image. It is the
# pixel graph of a `(2H-1) x (2W-1)` kernel with padding `(H-1, W-1)`, so each edge still has a tap:
# its relative offset. Without a mask, `nn.MultiheadAttention` is this graph.

# %%
gfull = gg.complete_pixel_graph(images)
print(f"complete graph: {gfull.edge_index.size(1)} edges = {B} x {N}^2; tap grid {2 * H - 1}x{2 * W - 1}")
assert gfull.edge_index.size(1) == B * N * N
global_out = gg.graph_to_image(attention(gfull.x, gfull.edge_index), gfull)
error = (global_out - as_image(mha(sequence, sequence, sequence)[0])).abs().max().item()
print(f"global attention vs nn.MultiheadAttention (no mask): max difference {error:.1e}")
assert error < 1e-12

# %% [markdown]
# ## Costs: the complete graph against the k x k graph
#
# Count multiply-accumulates (MACs) per image of $N$ pixels with $E$ channels, on a graph with
# $|\mathcal{E}|$ edges:
#
# | layer | MACs |
# |---|---|
# | `k x k` convolution (`analysis.conv_cost`) | $N E^2 k^2$ |
# | attention: 4 projections (1x1, `analysis.pointwise_cost`) | $4 N E^2$ |
# | attention: a score and a weighted value per edge | $2\,|\mathcal{E}|\,E$ |
#
# The complete graph has $|\mathcal{E}| = N^2$ edges, the `k x k` graph about $N k^2$. First the
# count is checked against PyTorch's FLOP counter on `nn.MultiheadAttention` (2 FLOPs per MAC).
# Then a fact the graph view makes plain: *masked* `nn.MultiheadAttention` pays for the complete
# graph whatever its mask, while message passing pays only for the edges it has.

# %%
def attention_macs(num_nodes, num_edges, channels):
    projections = analysis.pointwise_cost(channels, 3 * channels, (num_nodes, 1)) + \
        analysis.pointwise_cost(channels, channels, (num_nodes, 1))
    return projections.macs + 2 * num_edges * channels


seq32 = sequence.float()
mha32 = nn.MultiheadAttention(E, HEADS, batch_first=True, dtype=torch.float32)
flops_global = analysis.count_flops(mha32, seq32, seq32, seq32, need_weights=True)
flops_masked = analysis.count_flops(mha32, seq32, seq32, seq32, attn_mask=~allowed, need_weights=True)
model_global = B * attention_macs(N, N * N, E)
print(f"nn.MultiheadAttention, {B} images of {N} pixels: FLOP counter {flops_global:,d}, "
      f"cost model 2 x {model_global:,d} MACs = {2 * model_global:,d}")
assert flops_global == 2 * model_global
assert flops_masked == flops_global  # the mask removes no work
print(f"the same with the {K}x{K} mask: {flops_masked:,d} FLOPs (unchanged); the graph layer on the {K}x{K} graph: "
      f"2 x {attention_macs(B * N, g.edge_index.size(1), E):,d} = {2 * attention_macs(B * N, g.edge_index.size(1), E):,d}")
# The graph layer's projections are matrix products, which the FLOP counter sees; its per-edge work is
# gathers and elementwise products, which it does not count: so it reports the projections alone.
flops_graph = analysis.count_flops(attention.float(), g.x.float(), g.edge_index)
assert flops_graph == 2 * analysis.pointwise_cost(E, 4 * E, (B * N, 1)).macs
attention.double()

# %%
sides = [8, 16, 24, 32, 48, 64]
channels = 64
rows = []
for side in sides:
    n = side * side
    edges = {k_: gg.image_to_graph(torch.zeros(1, side, side), kernel_size=k_, padding=k_ // 2).edge_index.size(1)
             for k_ in (3, 7)}
    rows.append({
        "conv 3x3": analysis.conv_cost(channels, channels, 3, (side, side), padding=1).macs,
        "local attention 3x3": attention_macs(n, edges[3], channels),
        "local attention 7x7": attention_macs(n, edges[7], channels),
        "global attention": attention_macs(n, n * n, channels),
    })
print(f"{'image':>7s} " + " ".join(f"{name:>20s}" for name in rows[0]) + f" {'global / local 7x7':>19s}")
for side, row in zip(sides, rows):
    print(f"{side:3d}x{side:<3d} " + " ".join(f"{v:20,d}" for v in row.values())
          + f" {row['global attention'] / row['local attention 7x7']:19.1f}")
ratios = [row["global attention"] / row["local attention 7x7"] for row in rows]
assert all(b > a for a, b in zip(ratios, ratios[1:]))  # global attention grows like N^2, local like N
for side, row in zip(sides, rows):
    n = side * side  # interior pixels have k^2 edges: local attention costs at most 4NE^2 + 2 N k^2 E
    assert row["local attention 7x7"] <= 4 * n * channels ** 2 + 2 * n * 49 * channels
    assert row["global attention"] == 4 * n * channels ** 2 + 2 * n * n * channels

fig = Figure(figsize=(6.5, 3.4), dpi=80, layout="constrained")
ax = fig.add_subplot()
for name in rows[0]:
    ax.plot([s * s for s in sides], [row[name] for row in rows], "o-", label=name)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("pixels N per image")
ax.set_ylabel("multiply-accumulates")
ax.set_title(f"{channels} channels: global attention grows like N^2, the k x k graph like N", fontsize=9)
ax.legend(fontsize=8)
fig

# %% [markdown]
# On a 64 x 64 image with 64 channels, global attention does about 24 times the work of 7 x 7 local
# attention, and the gap grows with the image (on an 8 x 8 image the two are nearly the same graph).
# The attention layers themselves are the same code: only the graph changed.

# %%
print(f"global / local 7x7 on 64x64: {ratios[-1]:.1f}; on 8x8: {ratios[0]:.2f}")
assert 20 < ratios[-1] < 30 and ratios[0] < 1.5
