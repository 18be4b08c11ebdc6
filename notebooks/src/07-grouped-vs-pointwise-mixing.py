# %% [markdown]
# # 7. Grouped vs pointwise mixing
#
# Every message a layer sends is a channel vector multiplied by a `C_out x C_in` *mixing matrix*,
# one per kernel tap (`gridgraph.analysis.mixing_matrices`). The shape of that matrix says which
# channels can ever talk to which:
#
# * pointwise (1x1, `groups=1`): dense: every output channel reads every input channel;
# * grouped (`groups=g`): block-diagonal: output channels of group `i` read only input group `i`;
# * depthwise (`groups=C`): diagonal: channels never mix.
#
# This notebook draws the matrices, checks their zero patterns, and measures what each can
# represent: a grouped layer is `g` times cheaper but cannot produce any mixing across groups,
# unless channels are shuffled between two grouped layers (the ShuffleNet trick).

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
# ## The mixing matrices

# %%
C = 8
layers = {
    "pointwise": gg.PointwiseConv2d(C, C),
    "grouped, g=2": gg.PointwiseConv2d(C, C, groups=2),
    "grouped, g=4": gg.PointwiseConv2d(C, C, groups=4),
    "depthwise 3x3 (summed)": gg.DepthwiseConv2d(C, 3, padding=1),
}
fig = Figure(figsize=(12, 3.3), dpi=80, layout="constrained")
for ax, (name, layer) in zip(fig.subplots(1, 4), layers.items()):
    m = analysis.mixing_matrix(layer)
    groups = layer.groups
    block = torch.block_diag(*[torch.ones(C // groups, C // groups)] * groups).bool()
    assert torch.count_nonzero(m[~block]) == 0          # nothing outside the diagonal blocks
    assert torch.count_nonzero(m[block]) == block.sum()  # everything inside them is used
    print(f"{name:24s}: {int(torch.count_nonzero(m)):2d} of {C * C} entries non-zero, "
          f"{sum(p.numel() for n, p in layer.named_parameters() if n == 'weight'):3d} weights")
    plot.plot_mixing_matrix(m, ax, groups=groups if groups > 1 else None, annotate=False, title=name)
assert torch.equal(analysis.mixing_matrix(layers["pointwise"]),
                   layers["pointwise"].weight.detach().double()[:, :, 0, 0])
fig

# %% [markdown]
# A grouped `k x k` layer has one block-diagonal matrix per tap; the figure shows the 9 taps of a
# 3x3 layer with 2 groups and their sum.

# %%
grouped3 = gg.GridConv2d(C, C, 3, padding=1, groups=2)
per_tap = analysis.mixing_matrices(grouped3)
assert per_tap.shape == (9, C, C)
block = torch.block_diag(torch.ones(4, 4), torch.ones(4, 4)).bool()
assert torch.count_nonzero(per_tap[:, ~block]) == 0
w = grouped3.weight.detach().double()  # (8, 4, 3, 3): each output reads the 4 channels of its group
for t in range(9):
    u, v = divmod(t, 3)
    torch.testing.assert_close(per_tap[t], torch.block_diag(w[:4, :, u, v], w[4:, :, u, v]), rtol=0, atol=0)
plot.plot_mixing_matrices(per_tap, groups=2, title="GridConv2d(8, 8, 3, groups=2): mixing per tap")

# %% [markdown]
# ## What each can represent
#
# Ask a 1x1 layer to compute a given channel mixing `T`: here "reverse the channel order" (an
# anti-diagonal permutation) and "each channel minus its partner four channels away". A pointwise layer simply takes
# `W = T`. The best a grouped layer can do (in least squares, over the pixels of any image whose
# channels are uncorrelated) is to keep the blocks of `T` and drop the rest; if `T` lives outside
# the blocks, nothing is left.

# %%
reverse = torch.eye(C, dtype=torch.float64).flip(1)
difference = torch.eye(C, dtype=torch.float64) - torch.eye(C, dtype=torch.float64).roll(4, dims=1)
x = torch.randn(64, C, 6, 6, dtype=torch.float64)
for name, T in [("reverse channels", reverse), ("channel minus partner", difference)]:
    target = torch.einsum("oc,bchw->bohw", T, x)
    print(name)
    for groups in [1, 2, 4]:
        c_out = T.size(0)
        if c_out % groups:
            print(f"  groups={groups}: impossible, {c_out} output channel(s) cannot be split into {groups} groups")
            continue
        layer = gg.PointwiseConv2d(C, c_out, bias=False, groups=groups).double()
        # Fit the layer by least squares on the data, block by block.
        with torch.no_grad():
            for gi in range(groups):
                rows = slice(gi * c_out // groups, (gi + 1) * c_out // groups)
                cols = slice(gi * C // groups, (gi + 1) * C // groups)
                inputs = x[:, cols].permute(0, 2, 3, 1).reshape(-1, C // groups)
                outputs = target[:, rows].permute(0, 2, 3, 1).reshape(-1, c_out // groups)
                solution = torch.linalg.lstsq(inputs, outputs).solution   # [C_in/g, C_out/g]
                layer.weight[rows, :, 0, 0] = solution.t()
        out = analysis.graph_apply(layer, x).detach()
        error = float((out - target).norm() / target.norm())
        mask = torch.block_diag(*[torch.ones(c_out // groups, C // groups, dtype=torch.float64)] * groups)
        predicted = float((T * (1 - mask)).norm() / T.norm())  # the part of T outside the blocks
        print(f"  groups={groups}: relative error {error:.3f} (part of T outside the blocks: {predicted:.3f}), "
              f"{layer.weight.numel()} weights")
        assert abs(error - predicted) < 0.1
        if groups == 1:
            assert error < 1e-10
            torch.testing.assert_close(analysis.mixing_matrix(layer), T, rtol=1e-8, atol=1e-8)
        if T is reverse and groups > 1:
            assert predicted == 1.0  # the anti-diagonal lies entirely outside the blocks
        if T is difference and groups > 1:
            assert abs(predicted - 0.5 ** 0.5) < 1e-12  # the diagonal survives, the partner terms do not

# %% [markdown]
# ## Shuffling channels between grouped layers
#
# Two grouped 1x1 layers in a row are still block-diagonal: the product of block-diagonal matrices
# is block-diagonal. Interleave the channels between them (a permutation `S`, the ShuffleNet
# channel shuffle) and the product `W_2 S W_1` becomes dense: every output can now read every input,
# at the cost of two grouped layers, `2/g` of one pointwise layer. (One shuffle suffices when each
# group holds at least `g` channels; here 16 channels in 4 groups of 4.)

# %%
C, g = 16, 4
first, second = gg.PointwiseConv2d(C, C, groups=g), gg.PointwiseConv2d(C, C, groups=g)
M1, M2 = analysis.mixing_matrix(first), analysis.mixing_matrix(second)
shuffle = torch.arange(C).view(g, C // g).t().reshape(-1)  # take one channel from each group in turn
S = torch.eye(C, dtype=torch.float64)[shuffle]
plain, shuffled = M2 @ M1, M2 @ S @ M1
print("non-zero entries of W2 W1:", int(torch.count_nonzero(plain)), " of W2 S W1:", int(torch.count_nonzero(shuffled)))
assert int(torch.count_nonzero(plain)) == C * C // g
assert int(torch.count_nonzero(shuffled)) == C * C
# The same, through the graph layers on an image: the shuffled stack's operator is the dense product.
xs = torch.randn(3, C, 4, 4)
stacked = analysis.graph_apply(second, analysis.graph_apply(first, xs)[:, shuffle])
expected = torch.einsum("oc,bchw->bohw", shuffled.float(), xs) + (M2.float() @ S.float() @ first.bias.detach()
                                                                 + second.bias.detach()).view(1, C, 1, 1)
torch.testing.assert_close(stacked, expected, rtol=1e-4, atol=1e-5)
cost_pw = analysis.pointwise_cost(C, C, (4, 4), bias=False)
cost_two = analysis.pointwise_cost(C, C, (4, 4), groups=g, bias=False) + analysis.pointwise_cost(
    C, C, (4, 4), groups=g, bias=False)
print(f"MACs: one pointwise layer {cost_pw.macs}, two grouped layers (g={g}) {cost_two.macs}")
assert cost_two.macs * g == 2 * cost_pw.macs
fig = Figure(figsize=(9, 3), dpi=80, layout="constrained")
axes = fig.subplots(1, 3)
plot.plot_mixing_matrix(M1, axes[0], groups=g, annotate=False, title="W1 (grouped)")
plot.plot_mixing_matrix(plain, axes[1], groups=g, annotate=False, title="W2 W1: still block-diagonal")
plot.plot_mixing_matrix(shuffled, axes[2], annotate=False, title="W2 S W1: dense after a shuffle")
fig
