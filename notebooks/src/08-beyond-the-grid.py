# %% [markdown]
# # 8. Beyond the grid: holes, irregular regions, point sets, upsampling
#
# A dense convolution needs a full rectangle of pixels. A graph does not: the same weights run on
# whatever pixels exist. This notebook takes four kinds of domain a `Conv2d` cannot hold directly:
#
# 1. **an image with holes / an irregular region** (`image_to_graph(image, conv, mask=mask)`): only the
#    pixels inside the region become nodes, and edges join them only;
# 2. **a sparse point set** (`sparse_to_graph(coords, features, size, conv)`), as sparse-convolution
#    users hold it: a list of active coordinates with features;
# 3. **points with real positions** (`positions_to_graph(pos, features, conv, spacing=s)`): no grid at
#    all, only positions; each edge takes the tap nearest to its relative offset;
# 4. and, for completeness, **transposed convolution** (upsampling), whose graph is a strided
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
# ## 3. Points with real positions: superpixel centroids
#
# A convolution's weights are indexed by *relative offset*, so they need no grid at all: only positions.
# `positions_to_graph(pos, features, conv, spacing=s)` joins point `j` to point `i` when
# `delta = (pos_j - pos_i) / s` lies within half a spacing of a tap's offset (per axis: `floor(delta + 1/2)`
# is that offset), and gives the edge that tap. The outputs sit on the points.
#
# First the bridge to the grid: every pixel of a 128 x 128 reduction of scikit-image's astronaut photo
# (bundled, no download) becomes a point at its position in the 512 x 512 original, jittered by up to
# 0.24 of the 4-pixel spacing. The graph is then exactly the pixel graph, and a Sobel filter written as
# a `Conv2d` (on the grey level, the mean of R, G and B) gives the same numbers on the points as
# `nn.Conv2d` on the image.

# %%
from skimage import data, segmentation

photo = data.astronaut()  # (512, 512, 3) uint8
rgb = torch.from_numpy(photo).double().permute(2, 0, 1) / 255  # (3, 512, 512)
small = F.avg_pool2d(rgb[None], 4)[0]  # (3, 128, 128): one pixel per 4 x 4 block

kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
sobel_conv = torch.nn.Conv2d(3, 2, 3, padding=1, bias=False).double()  # outputs: d/dx, d/dy of the grey level
with torch.no_grad():
    sobel_conv.weight.copy_(torch.stack([kx, kx.t()])[:, None].expand(2, 3, 3, 3) / 3)
sobel = gg.GridConv2d.from_conv2d(sobel_conv)

cells = torch.stack(torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij"), -1).view(-1, 2)
jitter = (torch.rand(cells.shape, dtype=torch.float64) - 0.5) * 0.48  # |jitter| < 0.24 spacing
lattice = (cells + jitter) * 4 + 1.5  # in pixels of the original: near the centre of each 4 x 4 block
g_lat = gg.positions_to_graph(lattice, small[:, cells[:, 0], cells[:, 1]].t(), sobel, spacing=4.0)
out_lat = sobel(g_lat.x, g_lat.edge_index)
ref_lat = sobel_conv(small)[:, cells[:, 0], cells[:, 1]].t()
err_lat = (out_lat - ref_lat).abs().max().item()
pixel_graph = gg.image_to_graph(small, sobel)
print(f"{g_lat.num_src} jittered points, {g_lat.edge_index.size(1)} edges; max |points - Conv2d| = {err_lat:.1e}")
assert err_lat < 1e-12
assert torch.equal(g_lat.edge_index.as_tensor(), pixel_graph.edge_index.as_tensor())  # the same graph ...
assert torch.equal(g_lat.edge_type, pixel_graph.edge_type)  # ... with the same taps

# %% [markdown]
# Now points that are not on any lattice: the centroids of SLIC superpixels, each carrying its mean
# colour. The spacing is a little wider than the typical distance between centroids, `1.2 sqrt(H W / N)`,
# so that most taps hold one. On an irregular set a tap may still hold no point (it reads zero, like zero padding) or several; `reduce` says what several do:
# `'sum'` adds them (parallel edges), `'nearest'` keeps the one closest to the tap's offset, `'mean'`
# averages them (through a virtual source node per shared tap, whose features are the mean). We take
# `'mean'`: a tap then sees the average colour in its cell, whatever the local density.

# %%
labels = torch.from_numpy(segmentation.slic(photo, n_segments=600, compactness=10, start_label=0)).long()
H, W = labels.shape
ids = labels.view(-1)
n_sp = int(ids.max()) + 1
size_sp = torch.bincount(ids, minlength=n_sp).double()
rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
centroids = torch.stack([torch.bincount(ids, rows.reshape(-1), n_sp), torch.bincount(ids, cols.reshape(-1), n_sp)], 1)
centroids = centroids / size_sp[:, None]  # [N, 2] (row, col), real-valued
colours = torch.stack([torch.bincount(ids, rgb[c].reshape(-1), n_sp) for c in range(3)], 1) / size_sp[:, None]
spacing = 1.2 * (H * W / n_sp) ** 0.5

start = time.perf_counter()
g_sp = gg.positions_to_graph(centroids, colours, sobel, spacing=spacing, reduce="mean")
build_ms = (time.perf_counter() - start) * 1e3
grad_sp = sobel(g_sp.x, g_sp.edge_index)  # [N, 2]: d/dx, d/dy on the superpixels
edge_sp = grad_sp.detach().norm(dim=1)
taps_used = torch.bincount(torch.unique(g_sp.edge_index[1] * 9 + g_sp.edge_type) // 9, minlength=n_sp)
print(f"{n_sp} superpixels, spacing {spacing:.1f} px: {g_sp.edge_index.size(1)} edges, "
      f"{g_sp.num_src - g_sp.num_dst} virtual nodes (taps shared by several centroids), built in {build_ms:.0f} ms")
print("taps holding a centroid, per superpixel (count of superpixels with 0..9):",
      torch.bincount(taps_used, minlength=10).tolist())
for reduce in ("sum", "nearest"):
    g_other = gg.positions_to_graph(centroids, colours, sobel, spacing=spacing, reduce=reduce)
    print(f"reduce={reduce!r}: {g_other.edge_index.size(1)} edges on {g_other.num_src} sources")


# %% [markdown]
# The graph computes exactly its definition. A direct reference written from the rule alone, over all
# pairs of centroids: each pair's nearest offset, each tap's mean colour per target, one `einsum` with
# the Sobel weights. Then a check that the response means something: where all nine taps hold a centroid,
# the Sobel magnitude follows the strongest colour step to an adjacent superpixel (read off the label map).

# %%
def direct_reference(pos, x, conv, spacing):
    """``reduce='mean'`` by the rule, O(N^2): per (target i, tap t) the mean of the points j whose
    ``floor((pos_j - pos_i) / spacing + 1/2)`` is the tap's offset, then ``sum_t W_t mean_t``."""
    nearest = torch.floor((pos[None, :, :] - pos[:, None, :]) / spacing + 0.5)  # [i, j, 2]
    offsets = torch.stack(torch.meshgrid(torch.arange(-1, 2), torch.arange(-1, 2), indexing="ij"), -1).view(9, 2)
    hit = (nearest[:, :, None, :] == offsets.double()).all(-1).double()  # [i, j, t]
    mean = torch.einsum("ijt,jc->itc", hit, x) / hit.sum(1).clamp(min=1)[:, :, None]
    out = torch.einsum("itc,oct->io", mean, conv.weight.reshape(conv.out_channels, conv.in_channels, 9))
    return out if conv.bias is None else out + conv.bias


err_sp = (grad_sp - direct_reference(centroids, colours, sobel_conv, spacing)).abs().max().item()
print(f"max |graph - direct reference| on the superpixels: {err_sp:.1e}")
assert err_sp < 1e-12

right = torch.stack([labels[:, :-1].reshape(-1), labels[:, 1:].reshape(-1)], 1)
below = torch.stack([labels[:-1].reshape(-1), labels[1:].reshape(-1)], 1)
pairs = torch.cat([right, below])
pairs = pairs[pairs[:, 0] != pairs[:, 1]]  # pixel neighbours in two superpixels: adjacent superpixels
pairs = torch.unique(torch.cat([pairs, pairs.flip(1)]), dim=0)
step = (colours[pairs[:, 0]] - colours[pairs[:, 1]]).norm(dim=1)
contrast = torch.zeros(n_sp, dtype=torch.float64).scatter_reduce(0, pairs[:, 0], step, "amax")
full = taps_used == 9
corr = torch.corrcoef(torch.stack([edge_sp[full], contrast[full]]))[0, 1].item()
print(f"{int(full.sum())} superpixels with all nine taps: correlation of Sobel magnitude and colour step {corr:.2f}")
assert corr > 0.4

# %% [markdown]
# The same goes for a trained network's first layer: the stem of the ResNet-style reference network,
# converted to message passing, runs unchanged on the centroids. On the jittered lattice it is the
# network's own first `nn.Conv2d`; on the superpixels it equals the direct reference again.

# %%
net = gg.reference_model("resnet").double().eval()
twin = gg.convert(net)
stem = next(m for m in twin.modules() if isinstance(m, gg.GridConv2d))
first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
print("the stem:", first)
with torch.no_grad():
    g_stem = gg.positions_to_graph(lattice, small[:, cells[:, 0], cells[:, 1]].t(), stem, spacing=4.0)
    err_stem = (stem(g_stem.x, g_stem.edge_index) - first(small)[:, cells[:, 0], cells[:, 1]].t()).abs().max().item()
    g_stem_sp = gg.positions_to_graph(centroids, colours, stem, spacing=spacing, reduce="mean")
    stem_sp = stem(g_stem_sp.x, g_stem_sp.edge_index)  # [N, 16]
    err_stem_sp = (stem_sp - direct_reference(centroids, colours, first, spacing)).abs().max().item()
print(f"stem on the jittered lattice vs its nn.Conv2d: {err_stem:.1e}; on the superpixels vs the direct rule: "
      f"{err_stem_sp:.1e}")
assert err_stem < 1e-12 and err_stem_sp < 1e-12

# %%
fig = Figure(figsize=(17, 4.4), dpi=80, layout="constrained")
axes = fig.subplots(1, 4)
axes[0].imshow(segmentation.mark_boundaries(photo, labels.numpy()))
axes[0].scatter(centroids[:, 1], centroids[:, 0], s=4, c="yellow")
axes[0].set_title(f"{n_sp} SLIC superpixels and their centroids")
axes[1].imshow(out_lat.detach().norm(dim=1).view(128, 128), cmap="magma")
axes[1].set_title("Sobel magnitude on the 128 x 128 jittered lattice")
axes[2].scatter(centroids[~full, 1], centroids[~full, 0], s=10, c="0.75", marker="x")  # a tap reads zero
dots = axes[2].scatter(centroids[full, 1], centroids[full, 0], c=edge_sp[full], s=40, cmap="magma")
axes[2].set_title("the same GridConv2d on the centroids\n(all nine taps filled; grey x: a tap is empty)")
fig.colorbar(dots, ax=axes[2], shrink=0.8)
channel = int(stem_sp.var(0).argmax())
axes[3].scatter(centroids[:, 1], centroids[:, 0], c=stem_sp[:, channel], s=22, cmap="coolwarm")
axes[3].set_title(f"ResNet stem, channel {channel}, on the centroids")
for ax in axes[1:]:
    ax.set_aspect("equal")
for ax in axes[2:]:
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
fig

# %% [markdown]
# Construction hashes each point into its lattice cell and looks up only the cells a tap can reach, so
# no N x N distance matrix is ever formed: memory and time grow with the points and their edges. The
# edges carry taps exactly as a pixel graph's do, and the layers run on them with the per-tap edge
# kernels of masked graphs.

# %% [markdown]
# ## 4. Upsampling: transposed convolution on reversed edges
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
