# %% [markdown]
# # 12. Images larger than memory
#
# Message passing is local: an output pixel needs only the pixels its receptive field reaches. So a pixel
# graph can be cut into tiles, each with a **halo** of the pixels its receptive field needs around it, and
# computed tile by tile, or band by band on several processes, with *the same result*, not an approximation
# at the seams. `gridgraph.tiled(model, tile_size)` does it for a converted network, forward and backward;
# `gridgraph.spatial_parallel(model)` across `torch.distributed` processes.
#
# 1. a large synthetic scene and a small converted network;
# 2. the halo of one tile, found layer by layer backwards through the network;
# 3. tiled equals whole, to float64 rounding, outputs and gradients, every padding mode;
# 4. the whole scene through the tiled network, and the memory curve of the recorded benchmark.

# %%
# %matplotlib inline
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice, printed on import

import json
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

import gridgraph as gg
from gridgraph.tiling import receptive_halo

_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. A scene and a network
#
# A procedural "satellite scene" of 2048 x 2048 pixels (fields, a river, roads and noise), and a small
# segmentation-style network: a strided stem, dilated and reflect-padded 3x3 convolutions, a depthwise layer,
# a 1x1 classifier and a transposed convolution back to full resolution.

# %%
H = W = 2048
yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
fields = torch.sin(40 * xx + 3 * torch.sin(7 * yy)) * torch.cos(35 * yy)
river = torch.exp(-((yy - 0.5 - 0.15 * torch.sin(9 * xx)) ** 2) / 0.0008)
roads = ((torch.remainder(xx * 12, 1) < 0.01) | (torch.remainder(yy * 9 + xx, 1) < 0.008)).float()
scene = torch.stack([0.4 * fields + roads, 0.5 * fields - river, river + 0.3 * roads])
scene = scene + 0.1 * torch.randn_like(scene)
scene = scene[None]  # (1, 3, H, W)
print(f"scene {tuple(scene.shape)}, {scene.numel() * 4 / 2**20:.0f} MiB in float32")

net = gg.convert(nn.Sequential(
    nn.Conv2d(3, 16, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
    nn.Conv2d(16, 16, 3, padding=2, dilation=2, padding_mode="reflect"), nn.ReLU(),
    nn.Conv2d(16, 16, 5, padding=2, groups=16), nn.ReLU(),
    nn.Conv2d(16, 4, 1),
    nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1),
)).eval()

fig = Figure(figsize=(4, 4))
ax = fig.subplots()
ax.imshow(scene[0, :, ::8, ::8].permute(1, 2, 0).clamp(-1, 2).add(1).div(3).numpy())
ax.set_title("the scene (every 8th pixel)")
ax.axis("off")
fig

# %% [markdown]
# ## 2. The halo of a tile
#
# For a 256 x 256 tile of the output, the pixels each layer must compute are found backwards through the
# network: a convolution needs the window of each of its output pixels (its stride and dilation included),
# the transposed convolution the inputs whose messages reach the tile. `receptive_halo` gives the input
# pixels of one tile: the tile and its halo.

# %%
tile = (((768, 1024),), ((1024, 1280),))
halo = receptive_halo(net, (H, W), tile)
(r0, r1), = halo[0]
(c0, c1), = halo[1]
print(f"output tile rows 768:1024, cols 1024:1280 -> input rows {r0}:{r1}, cols {c0}:{c1} "
      f"({r1 - r0} x {c1 - c0}: a halo of {768 - r0} pixels above, {r1 - 1024} below)")
assert (r0, r1, c0, c1) == (757, 1034, 1013, 1290)

border = receptive_halo(net, (H, W), (((0, 256),), ((0, 256),)))
print("a corner tile reads", border, ": its halo stops at the image border, where reflect padding reads "
      "the image itself")

fig = Figure(figsize=(4, 4))
ax = fig.subplots()
ax.imshow(scene[0, :, 600:1200, 900:1500].permute(1, 2, 0).clamp(-1, 2).add(1).div(3).numpy(),
          extent=(900, 1500, 1200, 600))
ax.add_patch(Rectangle((1024, 768), 256, 256, fill=False, color="white", lw=2, label="tile"))
ax.add_patch(Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, color="red", lw=1.5, ls="--", label="tile + halo"))
ax.legend(loc="lower left", fontsize=8)
ax.set_title("one tile and the input it reads")
fig

# %% [markdown]
# ## 3. Tiled equals whole
#
# On a crop in float64, for every padding mode, the tiled network's output and its input and weight gradients
# equal the whole-image run's to rounding (tiles that do not divide the image included). Backward recomputes
# each tile's forward, so that memory stays bounded by one tile.

# %%
crop = scene[:, :, :150, :170].double()
for mode in ("zeros", "reflect", "replicate", "circular"):
    torch.manual_seed(1)
    model = gg.convert(nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode=mode), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode=mode), nn.Tanh(),
        nn.ConvTranspose2d(8, 2, 4, stride=2, padding=1))).double()
    results = []
    for run in (model, gg.tiled(model, tile_size=(48, 37))):
        x = crop.clone().requires_grad_()
        y = run(x)
        grads = torch.autograd.grad(y.square().sum(), [x] + list(model.parameters()))
        results.append([y.detach(), *grads])
    worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*results))
    print(f"{mode:>9}: largest relative difference {worst:.1e}")
    assert worst < 1e-12

# %% [markdown]
# ## 4. The whole scene, tile by tile
#
# The 2048 x 2048 scene through the tiled network in float32, without gradients: each tile computes only its
# halo'd pixels.

# %%
with torch.no_grad():
    start = time.perf_counter()
    out = gg.tiled(net, tile_size=512)(scene)
    print(f"tiled: output {tuple(out.shape)} in {time.perf_counter() - start:.1f} s")
    check = net(scene[:, :, :300, :300])  # the whole network on a corner: the same pixels
assert torch.allclose(out[:, :, :280, :280], check[:, :, :280, :280], atol=1e-5)

fig = Figure(figsize=(4, 4))
ax = fig.subplots()
ax.imshow(out[0, :3, ::8, ::8].permute(1, 2, 0).sigmoid().numpy())
ax.set_title("the network's output (3 of 4 channels)")
ax.axis("off")
fig

# %% [markdown]
# How memory grows with the image, whole against tiled, from the recorded benchmark
# (`python benchmarks/scale.py --tiled`, a small ResNet-style network, forward+backward, float32, 2 threads):
# the whole run's memory grows with the activations of every layer; the tiled run's with the input alone.

# %%
recorded = Path("..") / "benchmarks" / "recorded" / "tiled-cpu-2threads" / "tiled.json"
payload = json.loads(recorded.read_text())
fig = Figure(figsize=(5, 3.4))
ax = fig.subplots()
for mode, style in (("whole", "o-"), ("tiled", "s-")):
    rows = [r for r in payload["curve"] if "peak_growth" in r[mode]]
    ax.plot([r["side"] for r in rows], [r[mode]["peak_growth"] / 2**30 for r in rows], style, label=mode)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("image side (pixels)")
ax.set_ylabel("peak memory growth (GiB)")
ax.legend()
ax.grid(alpha=0.3)
fig.tight_layout()
bound = payload["bounds"]["chain6_2048"]
print(f"six 16-channel 3x3 layers on 3x2048x2048, forward+backward: tiled uses {bound['ratio']:.2f} of the "
      "whole run's memory")
print(f"a 3x8192x8192 image through the small ResNet, forward+backward: peak growth "
      f"{payload['bounds']['resnet_8192']['peak_growth'] / 2**30:.2f} GiB")
fig

# %% [markdown]
# Across processes, `spatial_parallel(model)` gives rank `r` the band `torch.tensor_split(x, world_size,
# dim=2)[r]`; the rows its receptive field reaches in other bands arrive by point-to-point messages, and the
# gradients go back the same way (see `tests/test_tiling.py`, which runs it on 2 and 3 local processes).
# What cannot be tiled exactly is named: BatchNorm in training mode (its statistics are over the whole
# image), a global pooling in the middle of a network (squeeze-and-excitation), attention over the whole
# image.
