"""
Token specialisation of a trained MoE: which tokens each expert of each layer receives, like the
expert specialisation tables of Switch Transformer / ST-MoE:
$ python tools/specialisation.py --out_dir=out-shakespeare-char-moe-cpu
  specialisation.md    per layer and expert: its share of token-slots and its most frequent tokens,
                       each with the share of that token's occurrences that this expert gets
  specialisation.png   per layer: P(expert | token) for the most frequent tokens (rows sum to top_k)
Every token-slot counts (a top-2 model sends each token to 2 experts). The tokens are windows spread
evenly over the split, routed in eval mode (deterministic; expert choice uses its eval top-k).
"""
import os
import sys

import numpy as np
import torch

# the repo root, for its modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure, fail  # noqa: E402
from checkpoint import load_checkpoint, load_meta, CheckpointError  # noqa: E402
from moe_model import build_model  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run: reads out_dir/<ckpt>
ckpt = 'ckpt.pt'
plot_dir = ''  # where specialisation.md/.png go; '' = out_dir
split = 'val'
n_windows = 240  # windows of block_size tokens, spread evenly over the split
batch_size = 12
top_tokens = 8  # tokens listed per expert
heatmap_tokens = 30  # most frequent tokens in the image
device = 'cpu'
# -----------------------------------------------------------------------------
config = configure({k: v for k, v in globals().items() if not k.startswith('_')
                    and isinstance(v, (int, str))},
                   sys.argv[1:])
globals().update(config)
plot_dir = plot_dir or out_dir
try:
    checkpoint = load_checkpoint(os.path.join(out_dir, ckpt))
except CheckpointError as e:
    fail(str(e))
model = build_model(checkpoint['model_args'])
if not hasattr(model, 'moe_layers'):
    fail(f"{os.path.join(out_dir, ckpt)} is a dense model: no experts to look at")
model.load_state_dict(checkpoint['model'])
model.to(device).eval()
T = model.config.block_size

# the data and a way to print its tokens
dataset = checkpoint['config']['dataset']
data_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', dataset)
data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
if os.path.exists(os.path.join(data_dir, 'meta.pkl')):
    try:
        itos = load_meta(os.path.join(data_dir, 'meta.pkl'))['itos']  # plain data only, never runs code
    except CheckpointError as e:
        fail(str(e))
    decode = lambda t: itos[t]
else:
    from data.tiktoken_offline import get_gpt2_encoding
    enc = get_gpt2_encoding()
    decode = lambda t: enc.decode([t])
show = lambda t: repr(decode(t))[1:-1].replace(' ', '␣').replace('|', '\\|') or '∅'  # visible, table-safe

# route the windows; count token-slots per (layer, expert, token)
V, E, k = model.config.vocab_size, model.config.n_expert, model.config.top_k
layers = list(model.moe_layers())
counts = {i: torch.zeros(E, V, dtype=torch.long) for i in layers}
starts = np.linspace(0, len(data) - T - 1, n_windows).astype(np.int64)
with torch.no_grad():
    for b in range(0, n_windows, batch_size):
        idx = torch.stack([torch.from_numpy(data[s:s + T].astype(np.int64))
                           for s in starts[b:b + batch_size]])
        model(idx.to(device))
        tokens = idx.reshape(-1)  # in the order of layer.topk_idx's rows: b * T + t
        for i, layer in model.moe_layers().items():
            for slot in layer.topk_idx.cpu().t():  # each of a token's top_k choices
                counts[i].view(-1).index_add_(0, slot * V + tokens, torch.ones_like(tokens))

# the table
lines = [f"# Token specialisation of {os.path.join(out_dir, ckpt)} (iter {checkpoint['iter_num']})", '',
         f"{n_windows} windows of {T} tokens of the {split} split. Per expert: its share of all token-slots, "
         f"then its {top_tokens} most frequent tokens as `token` count "
         "(share of that token's occurrences sent to this expert; "
         f"uniform routing would give {model.config.top_k / E:.0%}).", '']
for i in layers:
    c = counts[i]
    per_token = c.sum(0).clamp(min=1)
    lines += [f"## layer {i}", '', '| expert | slots | most frequent tokens |', '|---|---|---|']
    for e in range(E):
        top = c[e].topk(top_tokens).indices.tolist()
        cells = ', '.join(f"`{show(t)}` {c[e, t]} ({c[e, t] * k / per_token[t]:.0%})" for t in top
                          if c[e, t] > 0)
        lines.append(f"| {e} | {c[e].sum() / c.sum():.1%} | {cells} |")
    lines.append('')
os.makedirs(plot_dir, exist_ok=True)
md_path, png_path = os.path.join(plot_dir, 'specialisation.md'), os.path.join(plot_dir, 'specialisation.png')
with open(md_path, 'w') as f:
    f.write('\n'.join(lines))

# the image: P(expert | token) for the most frequent tokens, one panel per layer
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
frequent = counts[layers[0]].sum(0).topk(min(heatmap_tokens, V)).indices.tolist()
fig, axes = plt.subplots(1, len(layers), figsize=(1.2 + 0.35 * E * len(layers) + 1.5 * len(layers),
                                                  0.25 * len(frequent) + 1.5),
                         squeeze=False)
for ax, i in zip(axes[0], layers):
    c = counts[i][:, frequent].float()
    share = (c * k / c.sum(0, keepdim=True).clamp(min=1)).t().numpy()  # rows: tokens
    im = ax.imshow(share, aspect='auto', cmap='magma', vmin=0, vmax=1, interpolation='nearest')
    ax.set_xticks(range(E))
    ax.set_yticks(range(len(frequent)), [show(t) for t in frequent], fontsize=8)
    ax.set(title=f'layer {i}', xlabel='expert')
fig.colorbar(im, ax=axes[0].tolist(), label='P(expert | token)')
fig.suptitle('P(expert | token): share of each frequent token\'s occurrences sent to each expert')
fig.savefig(png_path, dpi=100)
plt.close(fig)
print('\n'.join(lines))
print(f"wrote {md_path} and {png_path}")
