# %% [markdown]
# # 8. Beyond the grid: holes, irregular regions, point sets, upsampling
#
# A dense convolution needs a full rectangle of pixels. A graph does not: the same weights run on
# whatever pixels exist. This notebook takes three kinds of domain a `Conv2d` cannot hold directly:
#
# 1. **an image with holes / an irregular region** (`image_to_graph(image, conv, mask=mask)`): only the
#    pixels inside the region become nodes, and edges join them only;
# 2. **a sparse point set** (`sparse_to_graph(coords, features, size, conv)`), as sparse-convolution
#    users hold it: a list of active coordinates with features;
# 3. and, for completeness, **transposed convolution** (upsampling), whose graph is a strided
#    convolution's graph with every edge reversed.
#
# Each time the graph layer is checked (with `assert`) against the torch layer it mirrors:
# on a masked domain, `nn.Conv2d` applied to the image with the inactive pixels zeroed, read at the
# active output pixels. At stride 1 the outputs live on the active pixels themselves (*submanifold*);
# with a stride, an output pixel is active when any input in its window is.

# %%
# %matplotlib inline
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice, printed on import

import time

import torch
from matplotlib.figure import Figure
from torch.nn import functional as F

import gridgraph as gg
from gridgraph.domains import sparse_to_graph
from gridgraph.nn import GridConvTranspose2d

_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. An irregular region
#
# A smooth test image on a 96 x 128 grid, and a region shaped like an island with a lake in it.
# Only the island's pixels are nodes.

# %%
H, W = 96, 128
yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1.3, 1.3, W), indexing="ij")
image = torch.stack([torch.sin(4 * xx) * torch.cos(3 * yy), xx * yy, torch.cos(5 * (xx ** 2 + yy ** 2))])
image = image.double()  # (3, H, W)

island = ((xx / 1.1) ** 2 + (yy / 0.8) ** 2 < 1) | (((xx - 0.9) ** 2 + (yy + 0.5) ** 2) < 0.15)
lake = ((xx + 0.2) ** 2 + (yy - 0.1) ** 2) < 0.08
mask = island & ~lake  # (H, W) bool: the irregular region

conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
layer = gg.GridConv2d.from_conv2d(conv)
g = gg.image_to_graph(image, layer, mask=mask)
print(f"grid {H}x{W} = {H * W} pixels; active {g.num_src} ({g.num_src / (H * W):.0%}); "
      f"edges {g.edge_index.size(1)}; submanifold: {g.submanifold}")
print("first nodes (row, col):", g.pos[:3].tolist(), "... row-major")

# %% [markdown]
# The layer runs on node features (the plain call, which takes the neighbour-table fast path) and
# `graph_to_image` scatters its output back onto the grid, zeros outside the region. The reference is
# `nn.Conv2d` on the image with the outside zeroed, read inside the region.

# %%
out_nodes = layer(g.x, g.edge_index, g.edge_type)  # [active pixels, 4]
out = gg.graph_to_image(out_nodes, g)
reference = conv(image * mask)
err = (out - reference * mask).abs().max().item()
print(f"max |graph - Conv2d on zeroed image| over the region: {err:.1e}")
assert out_nodes.shape == (int(mask.sum()), 4)
assert err < 1e-12
assert torch.equal(out[:, ~mask], torch.zeros_like(out[:, ~mask]))  # nothing is computed outside

# %% [markdown]
# The gradients agree too: of the input (zero outside the region, where nothing reads it), the
# weight and the bias.

# %%
xa = image.clone().requires_grad_()
xb = image.clone().requires_grad_()
grad = torch.randn(4, H, W, dtype=torch.float64) * mask
conv.zero_grad()
(conv(xa * mask) * grad).sum().backward()
gb = gg.image_to_graph(xb, layer, mask=mask)
layer.zero_grad()
(gg.graph_to_image(layer(gb.x, gb.edge_index, gb.edge_type), gb) * grad).sum().backward()
errors = {"input": (xb.grad - xa.grad).abs().max().item(),
          "weight": (layer.weight.grad - conv.weight.grad).abs().max().item(),
          "bias": (layer.bias.grad - conv.bias.grad).abs().max().item()}
print({k: f"{v:.1e}" for k, v in errors.items()})
assert max(errors.values()) < 1e-10
border = torch.nn.functional.conv2d((~mask).double()[None, None], torch.ones(1, 1, 3, 3, dtype=torch.float64),
                                   padding=1)[0, 0] > 0  # pixels with an outside pixel in their window
assert torch.allclose(out[:, mask & ~border], conv(image)[:, mask & ~border], rtol=0, atol=1e-12)

# %%
fig = Figure(figsize=(17, 3.4), dpi=80, layout="constrained")
axes = fig.subplots(1, 5)
axes[0].imshow(image[0], cmap="gray")
axes[0].set_title("image (channel 0)")
axes[1].imshow(mask, cmap="Greens")
axes[1].set_title(f"region: {g.num_src} of {H * W} pixels")
inside = out[0].detach()[mask]
scale = dict(cmap="magma", vmin=inside.min().item(), vmax=inside.max().item())  # one colour scale for both
axes[2].imshow(out[0].detach().masked_fill(~mask, float("nan")), **scale)
axes[2].set_title("GridConv2d on the region's graph")
axes[3].imshow(conv(image)[0].detach(), **scale)
axes[3].set_title("nn.Conv2d on the full image")
difference = (out[0] - conv(image)[0]).detach().abs().masked_fill(~mask, float("nan"))
axes[4].imshow(difference, cmap="Reds")
axes[4].set_title("|difference|: only along the border")
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
fig

# %% [markdown]
# Inside the region the graph layer and a convolution of the *full* image agree; along the region's
# border (right) they differ: the graph layer never reads the pixels outside, exactly as if they were zero. The same holds for every layer:
# a depthwise-separable block runs on the same graph, and a strided layer produces outputs on the
# output pixels whose window touches the region.

# %%
sep = gg.SeparableConv2d(3, 5, 3, padding=1).double()
dw, pw = sep.depthwise.to_conv2d(), sep.pointwise.to_conv2d()
out_sep = gg.graph_to_image(sep(g.x, g.edge_index, g.edge_type), g)
err_sep = (out_sep - pw(dw(image * mask)) * mask).abs().max().item()

down = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
gd = gg.image_to_graph(image, down, mask=mask)
out_down = gg.graph_to_image(gg.GridConv2d.from_conv2d(down)(gd.x, gd.edge_index, gd.edge_type), gd, side="output")
window = F.conv2d(mask[None, None].double(), torch.ones(1, 1, 3, 3, dtype=torch.float64), stride=2, padding=1)[0, 0] > 0
err_down = (out_down - down(image * mask) * window).abs().max().item()
print(f"separable on the region: {err_sep:.1e};  stride 2: {gd.num_src} -> {gd.num_dst} active pixels "
      f"(of {gd.out_size[0] * gd.out_size[1]}), error {err_down:.1e}")
assert err_sep < 1e-12 and err_down < 1e-12
assert torch.equal(gd.out_mask, window)

# %% [markdown]
# ## 2. A sparse point set
#
# Now the domain is a list of points: 1% of a 512 x 512 grid, each with 8 features, in no particular
# order, the way LiDAR or event-camera data arrives. `sparse_to_graph` sorts them row-major (`g.perm`
# is that order) and connects points that fall in each other's 3 x 3 window. The graph and the
# layer cost grows with the number of points; the 512 x 512 image below is built only to check.

# %%
S, C, N = 512, 8, int(0.01 * 512 * 512)
flat = torch.randperm(S * S)[:N]
coords = torch.stack([flat // S, flat % S], dim=1)  # [N, 2] (row, col), unsorted
features = torch.randn(N, C, dtype=torch.float64)

conv_s = torch.nn.Conv2d(C, 16, 3, padding=1).double()
start = time.perf_counter()
gs = sparse_to_graph(coords, features, (S, S), conv_s)
build_ms = (time.perf_counter() - start) * 1e3
layer_s = gg.GridConv2d.from_conv2d(conv_s)
out_s = layer_s(gs.x, gs.edge_index, gs.edge_type)  # [N, 16], in row-major node order
print(f"{N} points, {gs.edge_index.size(1)} edges ({gs.edge_index.size(1) / N:.2f} per point), "
      f"built in {build_ms:.0f} ms; table {tuple(gs.table.index.shape)}")

dense = torch.zeros(C, S, S, dtype=torch.float64)
dense[:, coords[:, 0], coords[:, 1]] = features.t()
ref_s = conv_s(dense)[:, gs.pos[:, 0], gs.pos[:, 1]].t()
err_s = (out_s - ref_s).abs().max().item()
print(f"max |graph - Conv2d on the scattered image| at the points: {err_s:.1e}")
assert err_s < 1e-12
back = out_s[gs.perm.argsort()]  # results in the caller's order of the points
assert torch.allclose(back, conv_s(dense)[:, coords[:, 0], coords[:, 1]].t(), rtol=0, atol=1e-12)

# %% [markdown]
# A strided layer coarsens the point set: an output pixel exists where its window holds a point.
# Stacking submanifold and strided layers is a sparse CNN, and each step equals its dense twin.

# %%
conv_d = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1).double()
gs2 = sparse_to_graph(gs.pos, out_s.detach(), (S, S), conv_d)
out_s2 = gg.GridConv2d.from_conv2d(conv_d)(gs2.x, gs2.edge_index, gs2.edge_type)
dense2 = conv_d(gg.graph_to_image(out_s.detach(), gs))
ref_s2 = dense2[:, gs2.out_pos[:, 0], gs2.out_pos[:, 1]].t()
err_s2 = (out_s2 - ref_s2).abs().max().item()
print(f"stride 2: {gs2.num_src} points -> {gs2.num_dst} active outputs on a {gs2.out_size} grid; error {err_s2:.1e}")
assert err_s2 < 1e-12
points = gs.mask.double()[None, None]  # (1, 1, S, S): where the points are
window2 = F.conv2d(points, torch.ones(1, 1, 3, 3, dtype=torch.float64), stride=2, padding=1)[0, 0] > 0
assert torch.equal(gs2.out_mask, window2)  # active outputs: a point in the window

# %%
fig = Figure(figsize=(10, 4.6), dpi=80, layout="constrained")
axes = fig.subplots(1, 2)
crop = (gs.pos[:, 0] < 128) & (gs.pos[:, 1] < 128)
axes[0].scatter(gs.pos[crop, 1], gs.pos[crop, 0], c=out_s[crop, 0].detach(), s=14, cmap="coolwarm")
src, dst = gs.edge_index
keep = crop[src] & crop[dst] & (src != dst)
for j, i in zip(src[keep].tolist(), dst[keep].tolist()):
    axes[0].plot([gs.pos[j, 1], gs.pos[i, 1]], [gs.pos[j, 0], gs.pos[i, 0]], color="k", lw=0.8)
axes[0].set_title("points (128 x 128 corner), coloured by output 0; edges")
crop2 = (gs2.out_pos[:, 0] < 64) & (gs2.out_pos[:, 1] < 64)
axes[1].scatter(gs2.out_pos[crop2, 1], gs2.out_pos[crop2, 0], c=out_s2[crop2, 0].detach(), s=14, cmap="coolwarm")
axes[1].set_title("after the stride-2 layer (64 x 64 corner)")
for ax in axes:
    ax.invert_yaxis()
    ax.set_aspect("equal")
fig

# %% [markdown]
# ## 3. Upsampling: transposed convolution on reversed edges
#
# `nn.ConvTranspose2d(k=4, s=2, p=1)` maps an `H x W` grid to `2H x 2W`; that bigger grid is exactly
# one on which the strided `Conv2d(k=4, s=2, p=1)` has `H x W` outputs. Reverse that convolution's
# edges and you have the transposed convolution's graph; the messages carry the weight transposed.

# %%
up = torch.nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1).double()
layer_up = GridConvTranspose2d.from_conv_transpose2d(up)
small = image[:, ::4, ::4].contiguous()  # (3, 24, 32)
gt = gg.image_to_graph(small, layer_up)
out_up = gg.graph_to_image(layer_up(gt.x, gt.edge_index, gt.edge_type), gt)
err_up = (out_up - up(small)).abs().max().item()
print(f"{tuple(small.shape[1:])} -> {tuple(out_up.shape[1:])}: {gt.edge_index.size(1)} edges, error {err_up:.1e}")
assert err_up < 1e-12
conv_view = gg.neighbour_table(gt.geometry, gt.out_size)  # the strided conv on the output grid ...
edges_conv = {(int(conv_view.index[i, t]), i, t) for i in range(gt.num_src) for t in range(16)
              if conv_view.index[i, t] >= 0}  # ... (its source, its target, tap) ...
edges_up = set(zip(gt.edge_index[1].tolist(), gt.edge_index[0].tolist(), gt.edge_type.tolist()))
assert edges_up == edges_conv  # ... is the transposed graph, reversed
print("the transposed graph is the strided Conv2d graph with every edge reversed:", edges_up == edges_conv)

# %% [markdown]
# ## Also: sequences and volumes
#
# `GridConv1d` and `GridConv3d` are the same n-dimensional layer with one or three spatial dimensions,
# on the graphs of `sequence_to_graph` and `volume_to_graph`; and a sparse domain can be a volume too.

# %%
from gridgraph.graph import sequence_to_graph, volume_to_graph
from gridgraph.nn import GridConv1d, GridConv3d

c1 = torch.nn.Conv1d(2, 3, 5, stride=2, padding=2).double()
seq = torch.randn(4, 2, 50, dtype=torch.float64)
g1 = sequence_to_graph(seq, c1)
e1 = (gg.graph_to_image(GridConv1d.from_conv1d(c1)(g1.x, g1.edge_index, g1.edge_type), g1) - c1(seq)).abs().max().item()
c3 = torch.nn.Conv3d(2, 3, 3, padding=1, padding_mode="circular").double()
vol = torch.randn(2, 2, 6, 7, 8, dtype=torch.float64)
g3 = volume_to_graph(vol, c3)
e3 = (gg.graph_to_image(GridConv3d.from_conv3d(c3)(g3.x, g3.edge_index, g3.edge_type), g3) - c3(vol)).abs().max().item()
print(f"Conv1d: {e1:.1e}   Conv3d: {e3:.1e}")
assert e1 < 1e-12 and e3 < 1e-12

# %% [markdown]
# **Summary.** On a masked or sparse domain the graph layer computes only where pixels exist, with the
# convolution's own weights, and equals the dense convolution of the zero-filled image there; its cost
# follows the active pixels (see `benchmarks/sparse.py` for 1%, 10% and 50% of a 1024 x 1024 image).
# Transposed, 1-D and 3-D convolutions are the same message passing on other graphs.
