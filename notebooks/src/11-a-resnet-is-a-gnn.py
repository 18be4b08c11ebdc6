# %% [markdown]
# # 11. A ResNet is a GNN
#
# The earlier notebooks showed it layer by layer: a convolution is message passing on a pixel graph.
# Here the whole network makes the step. `gridgraph.to_gnn(cnn)` traces a CNN and runs it on **PyG batches of
# pixel graphs**: it reads only the node features `x` (`[nodes, channels]`), each graph's grid and
# `batch`, and builds every stage's own graph itself (3x3 at stride 1, 3x3 at stride 2, 1x1, ...).
#
# 1. convert a small ResNet and feed it a PyG `DataLoader` of pixel graphs **of different sizes**;
# 2. look at the message passing of each stage: grids, edges, aggregations;
# 3. check it against the CNN, image by image (float64);
# 4. swap one stage for an attention-based PyG layer (`TransformerConv`) and fine-tune for a few steps.

# %%
# %matplotlib inline
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice, printed on import

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn import TransformerConv

import gridgraph as gg

_ = torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # exactness checks in float64

# %% [markdown]
# ## 1. A ResNet on a DataLoader of pixel graphs
#
# `gridgraph.models.ResNetish` is a ResNet in miniature: a 3x3 stem, a basic block, a strided basic block
# with a 1x1 projection shortcut, a strided bottleneck, global average pooling and a linear classifier.
# The images have three different sizes; `ToPixelGraph` turns each into a pixel graph (as a PyG
# transform would in a dataset), and PyG's `DataLoader` batches them.

# %%
cnn = gg.models.ResNetish(num_classes=3).eval()
gnn = gg.to_gnn(cnn).eval()

sizes = [(24, 24), (32, 20), (28, 28), (24, 24), (20, 36), (32, 32)]
images = [torch.randn(3, h, w) for h, w in sizes]
to_graph = gg.ToPixelGraph(kernel_size=3)
dataset = [to_graph(Data(image=image, y=torch.tensor([i % 3]))) for i, image in enumerate(images)]
loader = DataLoader(dataset, batch_size=3)

batch = next(iter(loader))
print(batch)
print("grids of the first batch:", gg.features_of(batch).grids)
logits = gnn(batch)
print("logits", tuple(logits.shape), "(one row per graph)")

# %% [markdown]
# ## 2. The message passing of each stage
#
# `gnn.describe(batch)` lists what ran on the node features of the first graph: convolutions as sums of
# messages over their taps (with the edges of that stage's pixel graph), BatchNorm and activations node by
# node, residual additions on the same grid, and the global pooling as a per-graph readout.

# %%
rows = gnn.describe(batch)
print(f"{'operator':<18} {'module':<18} {'grid in':>9} {'grid out':>9} {'C in':>5} {'C out':>5} {'edges':>6}  aggregation")
for r in rows:
    if r["aggregation"] == "node-wise" and r["op"] not in ("add",):
        continue  # BatchNorm / ReLU: node by node
    grid_out = "x".join(map(str, r["grid_out"])) if r["grid_out"] else "readout"
    print(f"{r['op']:<18} {str(r['module'] or '-'):<18} {'x'.join(map(str, r['grid_in'])):>9} {grid_out:>9} "
          f"{r['channels_in']:>5} {r['channels_out']:>5} {r.get('edges', ''):>6}  {r['aggregation']}")

convs = [r for r in rows if r["aggregation"].startswith("sum over taps")]
assert convs[0]["edges"] == (3 * 24 - 2) ** 2  # the stem's 3x3 graph on the first 24x24 grid
assert {r["grid_out"] for r in convs} == {(24, 24), (12, 12), (6, 6)}

# %% [markdown]
# The grids shrink where a convolution has a stride: a strided 3x3 stage sends messages from a 24x24 grid to
# a 12x12 one (each target reads its 3x3 window of the finer grid), and a 1x1 projection shortcut is a graph
# of one edge per target. Edges per stage, for the first graph of the batch:

# %%
fig = Figure(figsize=(8, 3))
ax = fig.subplots()
ax.bar(range(len(convs)), [r["edges"] for r in convs], color=["C0" if r["grid_in"] == r["grid_out"] else "C1"
                                                              for r in convs])
ax.set_xticks(range(len(convs)), [r["module"] for r in convs], rotation=45, ha="right", fontsize=8)
ax.set_ylabel("edges (one graph)")
ax.set_title("edges of each convolution's pixel graph (orange: strided, to a coarser grid)")
fig.tight_layout()
fig

# %% [markdown]
# ## 3. Equal to the CNN, image by image
#
# Each graph's logits equal the CNN's on its image alone, and so do the input gradients.

# %%
worst, k = 0.0, 0
for batch in loader:
    x = batch.x.clone().requires_grad_()
    batch.x = x
    out = gnn(batch)
    out.square().sum().backward()
    for g in range(batch.num_graphs):
        image = images[k].clone().requires_grad_()  # the loader keeps the dataset's order
        k += 1
        want = cnn(image[None])
        want.square().sum().backward()
        lo, hi = batch.ptr[g].item(), batch.ptr[g + 1].item()
        worst = max(worst, (out[g] - want[0]).abs().max().item(),
                    (x.grad[lo:hi] - image.grad.permute(1, 2, 0).reshape(-1, 3)).abs().max().item())
print(f"largest difference (logits and input gradients): {worst:.1e}")
assert worst < 1e-10

# %% [markdown]
# In training mode, BatchNorm's statistics are taken over all nodes of the batch: for graphs of one size
# exactly BatchNorm2d's over `(N, H, W)`; for mixed sizes the GNN's own semantics (no CNN counterpart).
#
# ## 4. One stage becomes attention
#
# The network splits at any point into two GNNs; between them is a PyG batch of pixel graphs (each pixel
# joined to its 3x3 neighbourhood), on which any PyG layer runs. Here `layer1` (a residual block on the full
# grid) is replaced by a `TransformerConv`: attention over each pixel's 3x3 neighbourhood, weights from the
# data instead of from the tap. Then the whole mixed network is fine-tuned for a few steps on a toy task:
# which of three corners is the brightest.

# %%
class Head(nn.Module):
    def __init__(self, layer2, layer3, fc):
        super().__init__()
        self.layer2, self.layer3, self.fc = layer2, layer3, fc

    def forward(self, x):
        return self.fc(self.layer3(self.layer2(x)).mean((2, 3)))


class Mixed(nn.Module):
    def __init__(self, cnn):
        super().__init__()
        self.stem = gg.to_gnn(cnn.stem, kernel_size=3)           # out: pixel graphs with 3x3 neighbourhoods
        self.attention = TransformerConv(16, 16, heads=2, concat=False)
        self.head = gg.to_gnn(Head(cnn.layer2, cnn.layer3, cnn.fc))

    def forward(self, batch):
        graphs = self.stem(batch)                                # a PixelGraph batch, 3x3 neighbourhoods
        graphs.x = graphs.x + self.attention(graphs.x, graphs.edge_index)
        return self.head(graphs)


def corner_task(n):
    data = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        image = 0.3 * torch.randn(3, h, w)
        label = i % 3
        r0, c0 = [(0, 0), (0, w - 6), (h - 6, 0)][label]
        image[:, r0:r0 + 6, c0:c0 + 6] += 1.5
        data.append(to_graph(Data(image=image, y=torch.tensor([label]))))
    return data


mixed = Mixed(cnn).train()
optimiser = torch.optim.Adam(mixed.parameters(), lr=3e-3)
train = DataLoader(corner_task(48), batch_size=8, shuffle=True)
losses = []
for epoch in range(4):
    for batch in train:
        loss = F.cross_entropy(mixed(batch), batch.y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f} ({len(losses)} steps)")
assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4

mixed.eval()
test = next(iter(DataLoader(corner_task(30), batch_size=30)))
accuracy = (mixed(test).argmax(1) == test.y).double().mean().item()
print(f"accuracy on 30 new images of mixed sizes: {accuracy:.0%}")

fig = Figure(figsize=(6, 3))
ax = fig.subplots()
ax.plot(losses)
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy")
ax.set_title("a ResNet with an attention stage, fine-tuned on pixel graphs")
fig.tight_layout()
fig

# %% [markdown]
# What changed and what did not: the stem and the later stages are the CNN's, run as message passing on
# their own grids; the attention stage is an ordinary PyG layer on the pixel graph between them. Nothing
# here needed an image tensor: the batches were PyG batches of graphs of different sizes throughout.
