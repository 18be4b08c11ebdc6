# %% [markdown]
# # 3. The art of mixing channels
#
# A 1x1 convolution cannot see its neighbours (notebook 2), but it is a master of channels: at
# every pixel it applies one `C_out x C_in` matrix to the pixel's channel vector,
# $\mathbf{x}'_i = \mathbf{W}\mathbf{x}_i + \mathbf{b}$, a message along the pixel's self-loop.
#
# Two images make the point. **A** has a vertical bar in channel 1 and a horizontal bar in
# channel 2; **B** the other way round. Add up the channels and they become the same image: any
# network that starts by summing channels can never tell A from B. A 1x1 layer computing
# *channel 1 minus channel 2* keeps them apart. Finally a tiny model learns such a layer from data.

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

# %%
S = 7
vertical = torch.zeros(S, S)
vertical[1:6, 3] = 1.0
horizontal = vertical.t().clone()
A = torch.stack([vertical, horizontal])   # channel 1: vertical bar, channel 2: horizontal bar
B = torch.stack([horizontal, vertical])   # the other way round
fig = Figure(figsize=(8, 2.2), dpi=80, layout="constrained")
for sub, image, name in zip(fig.subfigures(1, 2), [A, B], "AB"):
    for c, ax in enumerate(sub.subplots(1, 2)):
        ax.imshow(image[c], cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{name}, channel {c + 1}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
fig

# %% [markdown]
# ## Summing channels erases the difference

# %%
print("channel sums identical:", torch.equal(A.sum(0), B.sum(0)))
assert torch.equal(A.sum(0), B.sum(0))
assert not torch.equal(A, B)

# %% [markdown]
# Summing is itself a 1x1 layer, with mixing matrix `[1, 1]`; so is the difference, with `[1, -1]`.
# Both run as message passing over the self-loop graph, and both equal `nn.Conv2d(2, 1, 1)`.

# %%
def pointwise(weights):
    layer = gg.PointwiseConv2d(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights).view(1, 2, 1, 1))
    return layer


summing, difference = pointwise([1.0, 1.0]), pointwise([1.0, -1.0])
images = torch.stack([A, B])
outputs = {}
for name, layer in [("sum", summing), ("difference", difference)]:
    g = gg.image_to_graph(images, layer)
    assert torch.equal(g.edge_index[0], g.edge_index[1])  # self-loops only
    out = gg.graph_to_image(layer(g.x, g.edge_index, g.edge_type), g)
    torch.testing.assert_close(out, layer.to_conv2d()(images), rtol=0, atol=1e-6)
    outputs[name] = out
    print(f"{name:10s}: mixing matrix {analysis.mixing_matrix(layer).tolist()}, "
          f"A and B give the same output: {torch.equal(out[0], out[1])}")
assert torch.equal(outputs["sum"][0], outputs["sum"][1])
assert not torch.equal(outputs["difference"][0], outputs["difference"][1])
assert torch.equal(outputs["difference"][1], -outputs["difference"][0])  # B's output is A's, negated

# %%
fig = Figure(figsize=(8, 2.4), dpi=80, layout="constrained")
axes = fig.subplots(1, 4)
for ax, (title, img) in zip(axes, [("A: ch1 + ch2", outputs["sum"][0, 0]), ("B: ch1 + ch2", outputs["sum"][1, 0]),
                                   ("A: ch1 - ch2", outputs["difference"][0, 0]),
                                   ("B: ch1 - ch2", outputs["difference"][1, 0])]):
    ax.imshow(img.detach(), cmap="RdBu_r", vmin=-2, vmax=2)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
fig

# %% [markdown]
# ## Learning the mixing from data
#
# A tiny classifier: one learnable 1x1 layer (2 -> 1 channels), a ReLU, then a linear read-out of
# the resulting map. The data: many noisy, randomly scaled copies of A (label 1) and B (label 0).
# The same model with its 1x1 layer frozen to the channel sum `[1, 1]` is the control: its
# read-out only ever sees the summed image, in which A and B look alike, so it cannot beat chance.

# %%
def make_data(n, generator):
    labels = torch.randint(0, 2, (n,), generator=generator)
    scale = 0.5 + torch.rand(n, 1, 1, 1, generator=generator)
    clean = torch.where(labels.view(n, 1, 1, 1).bool(), A, B)
    return clean * scale + 0.2 * torch.randn(n, 2, S, S, generator=generator), labels.float()


class Tiny(nn.Module):
    def __init__(self, mixing=None):
        super().__init__()
        self.mix = gg.PointwiseConv2d(2, 1)
        if mixing is not None:
            with torch.no_grad():
                self.mix.weight.copy_(torch.tensor(mixing).view(1, 2, 1, 1))
                self.mix.bias.zero_()
            self.mix.requires_grad_(False)
        self.readout = nn.Linear(S * S, 1)

    def forward(self, images):
        g = gg.image_to_graph(images, self.mix)
        mixed = gg.graph_to_image(self.mix(g.x, g.edge_index, g.edge_type), g)
        return self.readout(torch.relu(mixed).flatten(1)).squeeze(1)


def train(model, steps=200):
    gen = torch.Generator().manual_seed(1)
    x, y = make_data(256, gen)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
    x_test, y_test = make_data(1000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        accuracy = ((model(x_test) > 0).float() == y_test).float().mean().item()
    return loss.item(), accuracy


_ = torch.manual_seed(0)
learned, frozen = Tiny(), Tiny(mixing=[1.0, 1.0])
for name, model in [("learned 1x1 mixing", learned), ("frozen channel sum", frozen)]:
    loss, acc = train(model)
    print(f"{name:19s}: training loss {loss:.3f}, test accuracy {acc:.3f}")
    model.accuracy = acc
w = learned.mix.weight.detach().flatten()
print("learned mixing matrix:", [round(v, 3) for v in w.tolist()], "(opposite signs: a difference of channels)")
assert learned.accuracy > 0.97
assert frozen.accuracy < 0.6
assert float(w[0] * w[1]) < 0

# %% [markdown]
# The learned 1x1 layer weighs the two channels with opposite signs: it has found a difference of
# channels, the one operation that survives the swap. The control, blind to the channel
# structure, is stuck at chance.

# %%
fig = Figure(figsize=(6.5, 2.6), dpi=80, layout="constrained")
left, right = fig.subplots(1, 2)
plot.plot_mixing_matrix(analysis.mixing_matrix(learned.mix), left, title="learned 1x1 mixing")
plot.plot_mixing_matrix(analysis.mixing_matrix(frozen.mix), right, title="frozen: channel sum")
fig
