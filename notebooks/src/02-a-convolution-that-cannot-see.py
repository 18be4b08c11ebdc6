# %% [markdown]
# # 2. A convolution that cannot see
#
# A 1x1 convolution's pixel graph has only self-loops, so information never moves between pixels:
# however many 1x1 layers we stack, each output pixel depends on exactly one input pixel. A 3x3
# layer's graph joins neighbours, and every layer widens the region that can reach a pixel by one
# ring. Here the receptive field is computed as *graph reachability* on the composed pixel graphs
# (`gridgraph.analysis.receptive_field`), checked against the analytic formula
#
# $$r_L = 1 + \sum_{l=1}^{L} (k_l - 1)\, d_l \prod_{m<l} s_m$$
#
# and against autograd on the real `nn.Conv2d` stack.

# %%
# %matplotlib inline
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice, printed on import

import torch
from matplotlib.figure import Figure
from torch import nn

import gridgraph as gg
from gridgraph import analysis, plot

_ = torch.manual_seed(0)


def autograd_field(stack, size, target):
    """Which inputs the real nn.Conv2d stack's output pixel depends on (positive weights: nothing cancels)."""
    stack = stack.double()
    with torch.no_grad():
        for p in stack.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.zeros(1, stack[0].in_channels, *size, dtype=torch.float64, requires_grad=True)
    stack(x)[0, 0, target[0], target[1]].backward()
    return x.grad[0].abs().sum(0) > 0

# %% [markdown]
# ## Stacked 1x1 layers: one pixel, however deep
#
# Fifty pointwise layers with ReLUs between them: the reachable set of the centre pixel is the
# centre pixel itself.

# %%
size = (11, 11)
centre = (5, 5)
for depth in [1, 2, 5, 50]:
    layers = []
    for _ in range(depth):
        layers += [gg.PointwiseConv2d(4, 4), nn.ReLU()]
    mask = analysis.receptive_field(nn.Sequential(*layers), size, centre)
    print(f"{depth:2d} pointwise layers: receptive field of {int(mask.sum())} pixel(s)")
    assert int(mask.sum()) == 1 and bool(mask[centre])
    assert analysis.receptive_field_size(nn.Sequential(*layers)) == (1, 1)

# %% [markdown]
# The same holds for the real thing: the gradient of a deep stack of `nn.Conv2d(4, 4, 1)`'s centre
# output with respect to its input is non-zero at one pixel only, and a pixel outside the
# receptive field can be changed without changing the output at all.

# %%
deep_1x1 = nn.Sequential(*[m for _ in range(20) for m in (nn.Conv2d(4, 4, 1), nn.Tanh())]).double()
graph_mask = analysis.receptive_field(deep_1x1, size, centre)
assert torch.equal(autograd_field(nn.Sequential(*[m for m in deep_1x1 if isinstance(m, nn.Conv2d)]), size, centre),
                   graph_mask)
x = torch.randn(1, 4, *size, dtype=torch.float64)
x_changed = x.clone()
x_changed[..., 5, 6] += 100.0  # the pixel right next to the centre
with torch.no_grad():
    before, after = deep_1x1(x), deep_1x1(x_changed)
print("output at the centre unchanged:", torch.equal(before[..., 5, 5], after[..., 5, 5]))
print("output at the changed pixel changed:", not torch.equal(before[..., 5, 6], after[..., 5, 6]))
assert torch.equal(before[..., 5, 5], after[..., 5, 5])
assert not torch.equal(before[..., 5, 6], after[..., 5, 6])

# %% [markdown]
# ## Stacked 3x3 layers: one ring per layer
#
# With 3x3 layers the receptive field is `(2L + 1) x (2L + 1)`: 9, 25, 49, 81 pixels.

# %%
fig = Figure(figsize=(10, 5), dpi=80, layout="constrained")
axes = fig.subplots(2, 4)
for i, depth in enumerate([1, 2, 3, 4]):
    ones = [gg.PointwiseConv2d(2, 2) for _ in range(depth)]
    threes = [gg.GridConv2d(2, 2, 3, padding=1) for _ in range(depth)]
    m1 = analysis.receptive_field(ones, size, centre)
    m3 = analysis.receptive_field(threes, size, centre)
    convs = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(depth)])
    assert torch.equal(m3, autograd_field(convs, size, centre))
    assert int(m3.sum()) == (2 * depth + 1) ** 2 and analysis.receptive_field_size(threes) == (2 * depth + 1,) * 2
    assert int(m1.sum()) == 1
    plot.plot_receptive_field(m1, axes[0, i], target=centre, title=f"{depth} x 1x1: {int(m1.sum())} pixel")
    plot.plot_receptive_field(m3, axes[1, i], target=centre, window=analysis.receptive_field_window(threes, centre),
                              title=f"{depth} x 3x3: {int(m3.sum())} pixels")
fig

# %% [markdown]
# ## Stride, dilation and pooling
#
# The formula and the graph agree for any mix. Below: a small VGG-like stack (two 3x3 layers, a
# 2x2 max-pool, two more 3x3 layers), a strided stack and a dilated one. For each, the bounding
# box of the reachable set equals the analytic window. Dilated layers leave holes: the receptive
# field is *not* the whole box, which only the graph view shows.

# %%
stacks = {
    "VGG-like": nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(),
                              nn.MaxPool2d(2), nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1)),
    "strided": nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.Conv2d(1, 1, 3, stride=2, padding=1),
                             nn.Conv2d(1, 1, 3, padding=1)),
    "dilated": nn.Sequential(nn.Conv2d(1, 1, 3, dilation=2, padding=2), nn.Conv2d(1, 1, 3, dilation=2, padding=2)),
}
size = (24, 24)
fig = Figure(figsize=(10, 3.6), dpi=80, layout="constrained")
for ax, (name, stack) in zip(fig.subplots(1, 3), stacks.items()):
    geoms = analysis.layer_geometries(stack)
    out = size
    for g in geoms:
        out = g.output_size(out)
    target = (out[0] // 2, out[1] // 2)
    mask = analysis.receptive_field(stack, size, target)
    rows, cols = mask.nonzero(as_tuple=True)
    window = analysis.receptive_field_window(stack, target)
    box = ((int(rows.min()), int(rows.max()) + 1), (int(cols.min()), int(cols.max()) + 1))
    print(f"{name:9s}: r = {analysis.receptive_field_size(stack)}, analytic window {window}, "
          f"graph bounding box {box}, {int(mask.sum())} pixels reached")
    assert box == window
    assert torch.equal(analysis.receptive_field(stack, size, target, method="networkx"), mask)
    convs = [m for m in stack if not isinstance(m, nn.ReLU)]
    reference = nn.Sequential(*[nn.AvgPool2d(2) if isinstance(m, nn.MaxPool2d) else m for m in convs])
    assert torch.equal(autograd_field(reference, size, target), mask)
    plot.plot_receptive_field(mask, ax, window=window, title=f"{name}: r = {analysis.receptive_field_size(stack)[0]}")
assert analysis.receptive_field_size(stacks["VGG-like"]) == (14, 14)  # 1 + 2 + 2 + 1 + 2*2 + 2*2
# Two dilation-2 layers reach offsets {-4, -2, 0, 2, 4} per axis: 25 of the 81 pixels of their 9 x 9 box.
assert int(analysis.receptive_field(stacks["dilated"], size, (12, 12)).sum()) == 25
fig

# %% [markdown]
# ## Not all pixels of the field are equal
#
# The composed pixel graph counts *paths*: the number of ways a message can travel from an input
# pixel to the target. Through three 3x3 layers the counts along one axis are 1, 3, 6, 7, 6, 3, 1
# (the path counts factor into rows times columns), so the centre pixel reaches the target along
# 7 x 7 = 49 paths and a corner of the field along 1: the field fades towards its edge (the idea
# behind the "effective receptive field").

# %%
counts = analysis.receptive_field([gg.GridConv2d(1, 1, 3, padding=1)] * 3, (11, 11), (5, 5), counts=True)
print(counts[5, 2:9].tolist())
assert counts[5, 2:9].tolist() == [7.0, 21.0, 42.0, 49.0, 42.0, 21.0, 7.0]  # 7 x (1, 3, 6, 7, 6, 3, 1)
assert counts[2, 2] == 1.0
assert counts.sum() == 9 ** 3
plot.plot_receptive_field(counts, target=(5, 5), title="paths from each pixel, three 3x3 layers")
