# %% [markdown]
# # 5. The separability bargain
#
# A full `k x k` convolution does two jobs at once: it looks at the neighbours (space) and it mixes
# channels. A depthwise-separable convolution splits them: a depthwise step passes messages along
# the `k x k` graph *channel by channel* (a diagonal mixing matrix per tap), then a pointwise step
# mixes channels over self-loops. Per output pixel, with `C_in` input and `C_out` output channels:
#
# | layer | multiply-accumulates |
# |---|---|
# | full `k x k` | $C_{in} C_{out} k^2$ |
# | depthwise + pointwise | $C_{in} k^2 + C_{in} C_{out}$ |
#
# $$\frac{\text{separable}}{\text{full}} = \frac{C_{in}(k^2 + C_{out})}{C_{in} C_{out} k^2} = \frac{1}{C_{out}} + \frac{1}{k^2}.$$
#
# The ratio is checked three ways: the formula, the cost model (`gridgraph.analysis`), and the
# FLOPs that `torch.utils.flop_counter` counts on real `nn.Conv2d` layers; then the layers are timed.

# %%
# %matplotlib inline
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice, printed on import

import time
from fractions import Fraction

import torch
from matplotlib.figure import Figure
from torch import nn

import gridgraph as gg
from gridgraph import analysis, plot

_ = torch.manual_seed(0)

# %% [markdown]
# ## The worked example: k = 3, C_in = 192, C_out = 384

# %%
c_in, c_out, k, size = 192, 384, 3, (16, 16)
full = analysis.conv_cost(c_in, c_out, k, size, padding=1, bias=False)
sep = analysis.separable_cost(c_in, c_out, k, size, padding=1, bias=False)
ratio = analysis.separable_ratio(c_out, k)
print(f"full conv     : {full.params:>7,d} weights, {full.macs:>11,d} MACs on {size[0]}x{size[1]}")
print(f"separable conv: {sep.params:>7,d} weights, {sep.macs:>11,d} MACs")
print(f"ratio = 1/{c_out} + 1/{k * k} = {ratio} = {float(ratio):.4f};  reduction = {float(1 - ratio):.4f}")
assert Fraction(sep.macs, full.macs) == ratio == Fraction(1, 384) + Fraction(1, 9)
assert Fraction(sep.params, full.params) == ratio
assert round(float(1 - ratio), 4) == 0.8863

# %% [markdown]
# The same numbers from PyTorch's own FLOP counter, run on the real layers (it counts 2 FLOPs per
# multiply-accumulate).

# %%
standard = nn.Conv2d(c_in, c_out, k, padding=1, bias=False)
depthwise = nn.Conv2d(c_in, c_in, k, padding=1, groups=c_in, bias=False)
pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
x = torch.randn(1, c_in, *size)
flops_full = analysis.count_flops(standard, x)
flops_sep = analysis.count_flops(nn.Sequential(depthwise, pointwise), x)
print(f"FlopCounterMode: full {flops_full:,d}, separable {flops_sep:,d}, ratio {flops_sep / flops_full:.6f}")
assert flops_full == full.flops and flops_sep == sep.flops
assert Fraction(flops_sep, flops_full) == ratio
graph_sep = gg.SeparableConv2d.from_conv2d(depthwise, pointwise)
assert analysis.layer_cost(graph_sep, size) == sep  # the graph layer has the same weights, hence the same cost

# %% [markdown]
# ## Formula = cost model = FLOP counter, across k and C_out

# %%
print(f"{'k':>2s} {'C_out':>5s} {'1/C_out + 1/k^2':>16s} {'cost model':>11s} {'FLOP counter':>13s} {'reduction':>10s}")
for k_ in [1, 3, 5, 7]:
    for c in [16, 64, 256]:
        formula = analysis.separable_ratio(c, k_)
        model = Fraction(analysis.separable_cost(8, c, k_, (8, 8), padding="same", bias=False).macs,
                         analysis.conv_cost(8, c, k_, (8, 8), padding="same", bias=False).macs)
        xs = torch.zeros(1, 8, 8, 8)
        counted = Fraction(
            analysis.count_flops(nn.Sequential(nn.Conv2d(8, 8, k_, padding="same", groups=8, bias=False),
                                               nn.Conv2d(8, c, 1, bias=False)), xs),
            analysis.count_flops(nn.Conv2d(8, c, k_, padding="same", bias=False), xs))
        assert formula == model == counted
        print(f"{k_:2d} {c:5d} {float(formula):16.4f} {float(model):11.4f} {float(counted):13.4f} "
              f"{float(1 - formula):10.1%}")

# %% [markdown]
# For large `C_out` the ratio approaches its floor `1/k^2`: the pointwise step dominates and the
# saving is nearly `k^2`-fold. For `k = 1` there is nothing to separate and the "separable" layer
# costs more (a useless depthwise scaling on top of the pointwise layer).

# %%
plot.plot_cost_ratio(kernel_sizes=(1, 2, 3, 5, 7), out_channels=(16, 64, 384, 1024), in_channels=192)

# %% [markdown]
# ## Measured time
#
# Counted FLOPs are not wall-clock time: a depthwise step does little arithmetic per byte it moves,
# so it runs far below the machine's peak. Below, the worked example (batch 2, 16x16) is timed as
# real `nn.Conv2d` layers and as gridgraph message passing, full vs separable. The numbers depend on
# the machine and its load; no claim is asserted on them. The outputs are checked equal first.

# %%
def median_time(fn, repeats=7):
    with torch.no_grad():
        fn()  # warm up (and build the cached pixel graph)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


xb = torch.randn(2, c_in, *size)
graph_full = gg.GridConv2d.from_conv2d(standard)
with torch.no_grad():
    g = gg.image_to_graph(xb, graph_full)
    torch.testing.assert_close(gg.graph_to_image(graph_full(g.x, g.edge_index, g.edge_type, size=g.size()), g),
                               standard(xb), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gg.graph_to_image(graph_sep(g.x, g.edge_index, g.edge_type, size=g.size()), g),
                               pointwise(depthwise(xb)), rtol=1e-4, atol=1e-4)
timings = {
    "nn.Conv2d full": median_time(lambda: standard(xb)),
    "nn.Conv2d separable": median_time(lambda: pointwise(depthwise(xb))),
    "graph full": median_time(lambda: graph_full(g.x, g.edge_index, g.edge_type, size=g.size())),
    "graph separable": median_time(lambda: graph_sep(g.x, g.edge_index, g.edge_type, size=g.size())),
}
for name, seconds in timings.items():
    print(f"{name:20s} {seconds * 1e3:8.2f} ms")
print(f"speed-up of separable over full: nn.Conv2d {timings['nn.Conv2d full'] / timings['nn.Conv2d separable']:.1f}x, "
      f"graph {timings['graph full'] / timings['graph separable']:.1f}x (FLOPs promise {float(1 / ratio):.1f}x)")

# %%
fig = Figure(figsize=(6, 2.6), dpi=80, layout="constrained")
ax = fig.add_subplot()
names = list(timings)
ax.barh(names, [timings[n] * 1e3 for n in names], color=["#2e86c1", "#85c1e9", "#ca6f1e", "#f0b27a"])
ax.invert_yaxis()
ax.set_xlabel("median time per forward (ms), this machine")
ax.set_title(f"k=3, 192 -> 384 channels, batch 2, 16x16; FLOPs ratio {float(ratio):.3f}", fontsize=9)
fig
