# %% [markdown]
# # 6. The price of separability
#
# Notebook 5 showed what separability saves. This one shows what it costs, in linear algebra. On
# one `k x k` patch a layer is a matrix from the patch's `C_in k^2` numbers to `C_out` outputs
# (`gridgraph.analysis.patch_operator`, built by pushing basis patches through the *graph* layer):
#
# * a full convolution can have rank up to `min(C_out, C_in k^2)`;
# * a separable block squeezes every patch through its `C_in` depthwise channels first, so its rank
#   is at most `min(C_out, C_in)`;
# * with identity depthwise filters the block *collapses* to its pointwise part: rank at most
#   `min(C_out, C_in)`, and it ignores every tap but the centre one.
#
# Then: exactly which full kernels can a separable block reach, and how close can it get to the rest?

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
# ## Ranks on one patch

# %%
c_in, c_out, k = 4, 16, 3
full = gg.GridConv2d(c_in, c_out, k, padding=1)
sep = gg.SeparableConv2d(c_in, c_out, k, padding=1)
collapsed = analysis.collapsed_separable(sep)
operators = {name: analysis.patch_operator(layer) for name, layer in
             [("full", full), ("separable", sep), ("collapsed", collapsed)]}
for name, op in operators.items():
    layer = {"full": full, "separable": sep, "collapsed": collapsed}[name]
    print(f"{name:9s}: patch operator {tuple(op.shape)}, rank {analysis.matrix_rank(op):2d}, "
          f"bound {analysis.rank_bound(layer)}")
assert tuple(operators["full"].shape) == (c_out, c_in * k * k)
assert torch.equal(operators["full"], full.weight.detach().double().reshape(c_out, -1))  # it is the weight
assert analysis.matrix_rank(operators["full"]) == min(c_out, c_in * k * k) == 16
assert analysis.matrix_rank(operators["separable"]) == min(c_out, c_in) == 4
assert analysis.matrix_rank(operators["collapsed"]) <= min(c_out, c_in)
# The collapsed block only reads the centre tap, with its pointwise weight.
taps = operators["collapsed"].view(c_out, c_in, k * k)
assert torch.count_nonzero(taps[:, :, [0, 1, 2, 3, 5, 6, 7, 8]]) == 0
assert torch.equal(taps[:, :, 4], sep.pointwise.weight.detach().double()[:, :, 0, 0])
plot.plot_singular_values(operators, title=f"patch operators, C_in={c_in}, C_out={c_out}, k={k}")

# %% [markdown]
# A collapsed block really is just its pointwise layer: run both as message passing on an image.

# %%
x = torch.randn(2, c_in, 6, 6)
torch.testing.assert_close(analysis.graph_apply(collapsed, x), analysis.graph_apply(collapsed.pointwise, x),
                           rtol=1e-5, atol=1e-6)
print("collapsed separable == its pointwise layer: True")

# %% [markdown]
# ## On a whole image
#
# The same matrices for a small image (`linear_operator`: a `C_out H W x C_in H W` matrix, again
# built from basis images pushed through the graph layers). It reproduces the layer exactly. Rank
# alone no longer separates full from separable here: with `C_out > C_in` both are injective (rank
# `C_in H W`). The collapsed block, though, is visibly nothing but a per-pixel matrix: its operator
# is the Kronecker product `P (x) I_{HW}` of its pointwise weight with the identity on pixels, so
# no information ever moves between pixels.

# %%
H = W = 5
op_full = analysis.linear_operator(full, (H, W))
op_sep = analysis.linear_operator(sep, (H, W))
op_collapsed = analysis.linear_operator(collapsed, (H, W))
xi = torch.randn(c_in, H, W, dtype=torch.float64)
with torch.no_grad():
    ref = full.to_conv2d().double()(xi[None])[0] - full.bias.double()[:, None, None]
torch.testing.assert_close(op_full @ xi.reshape(-1), ref.reshape(-1), rtol=1e-10, atol=1e-10)
for name, op in [("full", op_full), ("separable", op_sep), ("collapsed", op_collapsed)]:
    print(f"{name:9s}: operator {tuple(op.shape)}, rank {analysis.matrix_rank(op)} "
          f"(input dimension {c_in * H * W}, output dimension {c_out * H * W})")
assert analysis.matrix_rank(op_full) == analysis.matrix_rank(op_sep) == c_in * H * W
P = sep.pointwise.weight.detach().double()[:, :, 0, 0]
assert torch.equal(op_collapsed, torch.kron(P, torch.eye(H * W, dtype=torch.float64)))
print("collapsed operator == kron(P, I_25):", True)

# %% [markdown]
# ## What a separable block can reach
#
# Write a separable block as a full kernel: `W[o, c, u, v] = P[o, c] * D[c, u, v]`. For each input
# channel `c`, the `C_out x k^2` slice `W[:, c]` is an outer product: rank 1 (rank `m` with depth
# multiplier `m`). Conversely *every* kernel whose slices have rank `<= m` is a separable block. So a
# separable block can reach exactly the kernels where each input channel is read through the same
# spatial filter(s) by all outputs.
#
# A concrete case: from one grey channel, detect vertical edges in output 1 and horizontal edges in
# output 2 (two Sobel filters). That slice has rank 2: no separable block with one filter per channel
# can do it, one with two (depth multiplier 2) can, exactly.

# %%
sobel_x = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]], dtype=torch.float64)
edges = torch.stack([sobel_x, sobel_x.t()])[:, None]   # (2 outputs, 1 input, 3, 3)
shared = torch.stack([sobel_x, 2 * sobel_x])[:, None]  # both outputs use the same filter
for name, weight in [("vertical + horizontal edges", edges), ("one edge filter, two gains", shared)]:
    ranks = analysis.separable_slice_ranks(weight)
    errors = [analysis.separable_approximation(weight, m)[2] for m in (1, 2)]
    print(f"{name:28s}: slice ranks {ranks}, best separable error m=1: {errors[0]:.3f}, m=2: {errors[1]:.1e}")
assert analysis.separable_slice_ranks(edges) == [2]
assert analysis.separable_approximation(edges, 1)[2] > 0.5
assert analysis.separable_approximation(edges, 2)[2] < 1e-12
assert analysis.separable_slice_ranks(shared) == [1] and analysis.separable_approximation(shared, 1)[2] < 1e-12

# %% [markdown]
# The best separable approximation (a truncated SVD per input channel, optimal by Eckart-Young) can
# be loaded into a real `SeparableConv2d` and run as message passing; with `m = 2` it reproduces the
# two Sobel filters on an image exactly.

# %%
dw, pw, err = analysis.separable_approximation(edges, 2)
layer = gg.SeparableConv2d(1, 2, 3, padding=1, bias=False, depth_multiplier=2).double()
with torch.no_grad():
    layer.depthwise.weight.copy_(dw)
    layer.pointwise.weight.copy_(pw)
image = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
image[..., 2:6, 3:5] = 1.0
reference = torch.nn.functional.conv2d(image, edges, padding=1)  # the full kernel, as a reference only
torch.testing.assert_close(analysis.graph_apply(layer, image), reference, rtol=1e-10, atol=1e-10)
print("separable (m=2) reproduces both Sobel filters: max error",
      f"{(analysis.graph_apply(layer, image) - reference).abs().max().item():.1e}")

# %% [markdown]
# For a random full kernel every slice has full rank `min(C_out, k^2)`, and the error of the best
# separable block falls with each extra depthwise filter per channel, reaching zero at
# `m = min(C_out, k^2)`: at that point the "separable" block has as many weights as the full one.

# %%
weight = full.weight.detach().double()
print("slice ranks of a random 16x4x3x3 kernel:", analysis.separable_slice_ranks(weight))
errors = [analysis.separable_approximation(weight, m)[2] for m in range(1, 10)]
for m, e in enumerate(errors, 1):
    print(f"  depth multiplier {m}: relative error {e:.3f}")
assert analysis.separable_slice_ranks(weight) == [9, 9, 9, 9]
assert all(a > b for a, b in zip(errors[:8], errors[1:]))
assert errors[0] > 0.5 and errors[-1] < 1e-12
fig = Figure(figsize=(4.5, 2.8), dpi=80, layout="constrained")
ax = fig.add_subplot()
ax.plot(range(1, 10), errors, "o-")
ax.set_xlabel("depthwise filters per input channel (m)")
ax.set_ylabel("relative error of best separable block")
ax.set_title("a random 3x3 kernel, 4 -> 16 channels", fontsize=9)
ax.grid(alpha=0.3)
fig
