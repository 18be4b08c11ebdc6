# %% [markdown]
# # 10. Anomaly detection with 1x1 convolutions
#
# A classic use of the 1x1 convolution outside deep networks is statistical anomaly detection in
# multi-channel images. The **RX detector** (Reed and Xiaoli's, the standard baseline of hyperspectral
# imaging) scores every pixel by the Mahalanobis distance of its channel vector $\mathbf{x}_i$ from the
# image's mean $\boldsymbol{\mu}$ under the image's covariance $\boldsymbol{\Sigma}$:
#
# $$s_i = (\mathbf{x}_i - \boldsymbol{\mu})^\top \boldsymbol{\Sigma}^{-1} (\mathbf{x}_i - \boldsymbol{\mu})
#       = \big\Vert \mathbf{W}\mathbf{x}_i + \mathbf{b} \big\Vert^2, \qquad
#       \mathbf{W} = \boldsymbol{\Sigma}^{-1/2},\; \mathbf{b} = -\mathbf{W}\boldsymbol{\mu}.$$
#
# That is a **whitening 1x1 convolution** (message passing over self-loops: each pixel mixes its own
# channels) followed by a squared norm. Its cousin, the **PCA reconstruction error**, is a 1x1
# projection onto the main principal components and a 1x1 back-projection. Both look at colour, not
# at brightness: this notebook plants anomalies that a channel sum cannot see at all, scores them
# with the 1x1 detectors, and then lets the statistics come from each pixel's `k x k` neighbourhood
# (k x k message passing) to show the receptive-field trade-off. Every claim is an `assert`.

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

torch.set_default_dtype(torch.float64)  # exact comparisons: float64 throughout

# %% [markdown]
# ## A real image with planted colour anomalies
#
# scikit-image's `coffee()` picture ships inside the package (no download), reduced 4x to 100 x 150
# pixels. Thirty 3 x 3 squares get a colour shift $\mathbf{d}$ of length 0.08 in a random direction of
# the **chroma plane** $d_R + d_G + d_B = 0$: the channel sum (brightness) of every pixel is unchanged,
# the colour is not. Values are not clipped, so the sum is preserved exactly.

# %%
coffee = torch.from_numpy(data.coffee()).permute(2, 0, 1).double() / 255   # (3, 400, 600), bundled
H, W = coffee.shape[1] // 4, coffee.shape[2] // 4
clean = nn.functional.adaptive_avg_pool2d(coffee[None], (H, W))[0]         # (3, 100, 150)

gen = torch.Generator().manual_seed(0)
u1 = torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2)   # an orthonormal basis of the chroma plane,
u2 = torch.tensor([1.0, 1.0, -2.0]) / math.sqrt(6)   # both orthogonal to (1, 1, 1)
NUM, SIDE, SHIFT = 30, 3, 0.08
planted = clean.clone()
truth = torch.zeros(H, W, dtype=torch.bool)
while int(truth.sum()) < NUM * SIDE ** 2:
    r, c = (int(torch.randint(1, n - SIDE - 1, (1,), generator=gen)) for n in (H, W))
    if truth[r - 1:r + SIDE + 1, c - 1:c + SIDE + 1].any():
        continue  # keep the squares apart (and one pixel from each other)
    angle = float(torch.rand(1, generator=gen)) * 2 * math.pi
    shift = SHIFT * (math.cos(angle) * u1 + math.sin(angle) * u2)
    planted[:, r:r + SIDE, c:c + SIDE] += shift.view(3, 1, 1)
    truth[r:r + SIDE, c:c + SIDE] = True
print(f"{H}x{W} pixels, {int(truth.sum())} anomalous ({truth.float().mean():.1%})")
assert torch.allclose(planted.sum(0), clean.sum(0), rtol=0, atol=1e-14)   # brightness untouched
change = (planted - clean).norm(dim=0)
assert torch.allclose(change[truth], torch.tensor(SHIFT), rtol=0, atol=1e-12) and not change[~truth].any()

# %% [markdown]
# ## A channel sum cannot see them
#
# The brightness image is itself a 1x1 convolution, with weights `[1, 1, 1]`. On the planted image
# it is exactly the clean image's, so **any** detector that reads brightness alone (a global
# z-score here, but equally a local one or a whole CNN after a channel sum) gives the same score map
# with or without the anomalies.

# %%
channel_sum = gg.PointwiseConv2d(3, 1, bias=False)
with torch.no_grad():
    channel_sum.weight.fill_(1.0)


def pointwise(layer, image):
    """Run a 1x1 graph layer on the self-loop graph of an image (C, H, W); return an image."""
    g = gg.image_to_graph(image, kernel_size=1, padding=0)
    return gg.graph_to_image(layer(g.x, g.edge_index, g.edge_type), g).detach()


brightness = {name: pointwise(channel_sum, image)[0] for name, image in [("clean", clean), ("planted", planted)]}
assert torch.allclose(brightness["planted"], brightness["clean"], rtol=0, atol=1e-14)
b = brightness["planted"]
brightness_score = (b - b.mean()) ** 2 / b.var(correction=0)      # 1-D Mahalanobis distance of the brightness
b0 = brightness["clean"]
assert torch.allclose(brightness_score, (b0 - b0.mean()) ** 2 / b0.var(correction=0), rtol=0, atol=1e-10)

rows, cols = truth.nonzero()[0].tolist()               # zoom on the first square
zoom = (slice(max(rows - 6, 0), rows + 9), slice(max(cols - 6, 0), cols + 9))
fig = Figure(figsize=(15, 2.9), dpi=80, layout="constrained")
axes = fig.subplots(1, 6, width_ratios=[1.5, 1.5, 1.5, 1.5, 1, 1])
for ax, (title, img) in zip(axes, [("clean", clean.permute(1, 2, 0)), ("planted (30 squares)", planted.permute(1, 2, 0)),
                                   ("where: ground truth", truth), ("channel sum of planted - of clean", b - b0),
                                   ("zoom: clean", clean[:, zoom[0], zoom[1]].permute(1, 2, 0)),
                                   ("zoom: planted", planted[:, zoom[0], zoom[1]].permute(1, 2, 0))]):
    ax.imshow(img.clamp(0, 1) if img.dim() == 3 else img, cmap=None if img.dim() == 3 else "gray",
              **({"vmin": -0.1, "vmax": 0.1} if title.startswith("channel") else {}))
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
fig

# %% [markdown]
# ## RX: a whitening 1x1 convolution, then a squared norm
#
# The detector does not know where the anomalies are: mean and covariance come from all pixels of
# the planted image. $\mathbf{W} = \boldsymbol{\Sigma}^{-1/2}$ (from the eigendecomposition) and
# $\mathbf{b} = -\mathbf{W}\boldsymbol{\mu}$ go into a `PointwiseConv2d`. Its output is white (zero
# mean, identity covariance), and its squared norm equals the Mahalanobis distance computed directly.

# %%
X = planted.flatten(1).t()                      # (N, 3): one row per pixel
mu = X.mean(0)
sigma = torch.cov(X.t(), correction=0)
eigenvalues, eigenvectors = torch.linalg.eigh(sigma)   # ascending
print("covariance eigenvalues:", [f"{v:.4f}" for v in eigenvalues.tolist()], "(brightness dominates)")

whiten = gg.PointwiseConv2d(3, 3)
W_white = eigenvectors @ torch.diag(eigenvalues.rsqrt()) @ eigenvectors.t()   # Sigma^(-1/2), symmetric
with torch.no_grad():
    whiten.weight.copy_(W_white.view(3, 3, 1, 1))
    whiten.bias.copy_(-W_white @ mu)
white = pointwise(whiten, planted)               # (3, H, W)
rx_score = white.pow(2).sum(0)                   # squared norm over channels

direct = ((X - mu) * torch.linalg.solve(sigma, (X - mu).t()).t()).sum(1).view(H, W)
print(f"RX by the 1x1 layer vs direct Mahalanobis: max difference {(rx_score - direct).abs().max():.1e}")
assert torch.allclose(rx_score, direct, rtol=1e-10, atol=1e-10)
Y = white.flatten(1).t()
assert torch.allclose(Y.mean(0), torch.zeros(3), atol=1e-10)
assert torch.allclose(torch.cov(Y.t(), correction=0), torch.eye(3), atol=1e-10)
assert torch.allclose(rx_score.mean(), torch.tensor(3.0), atol=1e-10)   # E[s] = number of channels

# %% [markdown]
# ## PCA reconstruction error: a 1x1 projection and a 1x1 back-projection
#
# Keep the two strongest principal components (brightness and the main colour axis of the picture):
# an `encode` layer (3 -> 2) and a `decode` layer (2 -> 3). The reconstruction error is what the
# image's usual colours cannot explain: the energy along the weakest component. Together the two
# layers are one 1x1 layer of rank 2, $\mathbf{U}_2\mathbf{U}_2^\top$.

# %%
U2 = eigenvectors[:, 1:]                         # the 2 strongest components, (3, 2)
encode, decode = gg.PointwiseConv2d(3, 2), gg.PointwiseConv2d(2, 3)
with torch.no_grad():
    encode.weight.copy_(U2.t().reshape(2, 3, 1, 1))
    encode.bias.copy_(-U2.t() @ mu)
    decode.weight.copy_(U2.reshape(3, 2, 1, 1))
    decode.bias.copy_(mu)
reconstruction = pointwise(decode, pointwise(encode, planted))
pca_score = (planted - reconstruction).pow(2).sum(0)
weakest = eigenvectors[:, 0]
assert torch.allclose(pca_score, ((X - mu) @ weakest).pow(2).view(H, W), rtol=1e-10, atol=1e-12)
both = gg.analysis.mixing_matrix(decode) @ gg.analysis.mixing_matrix(encode)
assert torch.allclose(both, U2 @ U2.t(), atol=1e-12) and int(torch.linalg.matrix_rank(both)) == 2
print("PCA error = energy along the weakest component", [round(v, 3) for v in weakest.tolist()])

# %% [markdown]
# ## ROC AUC
#
# The area under the ROC curve is the probability that a random anomalous pixel scores higher than a
# random normal one (ties count one half): a few lines, checked on cases with known answers.

# %%
def roc_auc(scores, labels):
    positive, negative = scores[labels].flatten(), scores[~labels].flatten()
    higher = (positive[:, None] > negative[None, :]).double().mean()
    ties = (positive[:, None] == negative[None, :]).double().mean()
    return float(higher + 0.5 * ties)


toy_labels = torch.tensor([True, True, False, False])
assert roc_auc(torch.tensor([3.0, 4.0, 1.0, 2.0]), toy_labels) == 1.0
assert roc_auc(torch.tensor([1.0, 2.0, 3.0, 4.0]), toy_labels) == 0.0
assert roc_auc(torch.ones(4), toy_labels) == 0.5
assert roc_auc(torch.tensor([3.0, 1.0, 2.0, 0.0]), toy_labels) == 0.75

auc = {"brightness (channel sum)": roc_auc(brightness_score, truth),
       "RX (whitening 1x1)": roc_auc(rx_score, truth),
       "PCA error (1x1 down and up)": roc_auc(pca_score, truth)}
for name, value in auc.items():
    print(f"{name:28s} AUC {value:.3f}")
assert auc["RX (whitening 1x1)"] > auc["brightness (channel sum)"] + 0.2
assert auc["PCA error (1x1 down and up)"] > auc["brightness (channel sum)"] + 0.2
assert abs(auc["brightness (channel sum)"] - 0.5) < 0.1   # chance: it scores the picture, not the anomalies

# %% [markdown]
# ## Local statistics: k x k message passing
#
# One mean and covariance for the whole picture are a blunt reference: the brown coffee, the white
# cup and the red saucer have very different colours. The **local RX** detector takes them from each
# pixel's `k x k` neighbourhood instead:
#
# $$\boldsymbol{\mu}_i = \frac{1}{k^2}\sum_{j \in N_k(i)} \mathbf{x}_j, \qquad
#   \boldsymbol{\Sigma}_i = \frac{1}{k^2}\sum_{j \in N_k(i)} \mathbf{x}_j \mathbf{x}_j^\top - \boldsymbol{\mu}_i\boldsymbol{\mu}_i^\top .$$
#
# Both are averages of messages on the `k x k` pixel graph: a depthwise box convolution applied to the
# 3 channels and to the 6 distinct channel products $x_a x_b$ (computed pixel by pixel). A box is
# separable, so it runs as a `k x 1` then a `1 x k` `DepthwiseConv2d`, with replicate padding so
# that every pixel receives exactly $k^2$ messages. Then each pixel is whitened by its own
# $\boldsymbol{\Sigma}_i^{-1/2}$: no longer one 1x1 layer for the image, but one per pixel.

# %%
pairs = [(a, b_) for a in range(3) for b_ in range(a, 3)]
moments_in = torch.cat([planted, torch.stack([planted[a] * planted[b_] for a, b_ in pairs])])   # (9, H, W)


def box_mean(image, k):
    """Mean over each pixel's k x k neighbourhood (replicate padding), by two depthwise graph layers."""
    out = image
    for kernel, padding in (((k, 1), (k // 2, 0)), ((1, k), (0, k // 2))):
        layer = gg.DepthwiseConv2d(image.size(0), kernel, padding=padding, bias=False, padding_mode="replicate")
        with torch.no_grad():
            layer.weight.fill_(1.0 / k)
        g = gg.image_to_graph(out, layer)
        out = gg.graph_to_image(layer(g.x, g.edge_index, g.edge_type), g).detach()
    return out


def box_mean_direct(image, k):
    """The reference: pad by replication and add the k^2 shifted copies."""
    p = k // 2
    padded = nn.functional.pad(image[None], (p, p, p, p), mode="replicate")[0]
    return sum(padded[:, u:u + H, v:v + W] for u in range(k) for v in range(k)) / k ** 2


assert torch.allclose(box_mean(moments_in, 7), box_mean_direct(moments_in, 7), rtol=0, atol=1e-12)
full_box = gg.DepthwiseConv2d(9, 7, padding=3, bias=False, padding_mode="replicate")   # the unseparated 7x7
with torch.no_grad():
    full_box.weight.fill_(1.0 / 49)
g7 = gg.image_to_graph(moments_in, full_box)
assert int((g7.edge_index[1] == 0).sum()) == 49   # replicate padding: a corner pixel gets 49 messages too
assert torch.allclose(gg.graph_to_image(full_box(g7.x, g7.edge_index, g7.edge_type), g7).detach(),
                      box_mean(moments_in, 7), rtol=0, atol=1e-12)


def local_rx(k, ridge=1e-6):
    m = box_mean(moments_in, k)
    mean = m[:3].permute(1, 2, 0)                         # (H, W, 3)
    second = torch.empty(H, W, 3, 3)
    for n, (a, b_) in enumerate(pairs):
        second[..., a, b_] = second[..., b_, a] = m[3 + n]
    cov = second - mean[..., :, None] * mean[..., None, :] + ridge * torch.eye(3)
    delta = planted.permute(1, 2, 0) - mean
    return (delta[..., None, :] @ torch.linalg.solve(cov, delta[..., :, None]))[..., 0, 0]


# One pixel by hand: its window's mean and covariance, and its Mahalanobis distance.
r0, c0, k0 = 40, 70, 9
window = planted[:, r0 - 4:r0 + 5, c0 - 4:c0 + 5].flatten(1).t()
cov0 = torch.cov(window.t(), correction=0) + 1e-6 * torch.eye(3)
d0 = planted[:, r0, c0] - window.mean(0)
assert torch.allclose(local_rx(k0)[r0, c0], d0 @ torch.linalg.solve(cov0, d0), rtol=1e-9)

sizes = [3, 5, 7, 9, 11, 15, 21, 31, 45, 65, 99]
local_auc = {k: roc_auc(local_rx(k), truth) for k in sizes}
for k, value in local_auc.items():
    print(f"local RX, {k:2d}x{k:<2d} window: AUC {value:.3f}")
best = max(local_auc, key=local_auc.get)
print(f"best window {best}x{best}: AUC {local_auc[best]:.3f}; global RX {auc['RX (whitening 1x1)']:.3f}")
auc[f"local RX ({best}x{best})"] = local_auc[best]
assert sizes[0] < best < sizes[-1]                       # the trade-off has an interior optimum
assert local_auc[sizes[0]] < local_auc[best] - 0.2        # too small: the anomaly is its own background
assert local_auc[sizes[-1]] < local_auc[best] - 0.05      # too large: back towards the global statistics
assert local_auc[best] > auc["RX (whitening 1x1)"] > auc["brightness (channel sum)"]

# %% [markdown]
# A window barely larger than a 3 x 3 anomaly is mostly the anomaly itself, which then looks normal
# to its own statistics. A very large window mixes the coffee with the cup and the saucer, and the
# detector drifts back towards the global one. In between, the statistics describe the anomaly's
# surroundings: the receptive field of the `k x k` message passing is the detector's notion of
# "background".

# %%
fig = Figure(figsize=(13, 6.2), dpi=80, layout="constrained")
top, bottom = fig.subfigures(2, 1, height_ratios=[1.15, 1])
axes = top.subplots(1, 4)
maps = [("brightness z-score (blind)", brightness_score), ("RX, global (1x1)", rx_score),
        ("PCA error (1x1 down, up)", pca_score), (f"RX, local {best}x{best}", local_rx(best))]
outline = torch.nn.functional.max_pool2d(truth[None, None].double(), 3, 1, 1)[0, 0] - truth.double()
for ax, (title, score) in zip(axes, maps):
    shown = score.log1p()
    ax.imshow(shown, cmap="inferno", vmax=float(shown.quantile(0.995)))
    ax.contour(outline, levels=[0.5], colors="cyan", linewidths=0.6)
    ax.set_title(f"{title}\nAUC {roc_auc(score, truth):.3f}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
ax = bottom.subplots()
ax.plot(sizes, [local_auc[k] for k in sizes], "o-", label="local RX (k x k message passing)")
ax.axhline(auc["RX (whitening 1x1)"], color="C1", ls="--", label="global RX (whitening 1x1)")
ax.axhline(auc["PCA error (1x1 down and up)"], color="C2", ls=":", label="PCA error (1x1 down and up)")
ax.axhline(auc["brightness (channel sum)"], color="grey", ls="-.", label="brightness (channel sum)")
ax.set_xscale("log")
ax.set_xlabel("window k (log scale)")
ax.set_ylabel("ROC AUC")
ax.set_xticks(sizes, [str(k) for k in sizes])
ax.minorticks_off()
ax.set_title("receptive-field trade-off of the local detector", fontsize=9)
ax.legend(fontsize=8, loc="lower right")
fig

# %% [markdown]
# | detector | what it is on the pixel graph | AUC |
# |---|---|---|
# | brightness | 1x1 `[1, 1, 1]`, then a z-score | chance: blind by construction |
# | RX, global | whitening 1x1 convolution, squared norm | better than chance by far |
# | PCA error | 1x1 to 2 components, 1x1 back, squared residual | likewise |
# | RX, local | `k x k` box message passing for the moments, per-pixel whitening | best, at a medium window |
#
# The exact numbers are printed above; the asserts pin their order.

# %%
for name, value in auc.items():
    print(f"{name:28s} {value:.3f}")
