"""ELECTRA's replaced-token detection as the pretraining objective, for a time budget (issue 15).

Masked-LM pretraining learns from the masked 15-40% of the tokens only; at a CPU hour, how
many predictions a step makes decided when the model left the frequent-token plateau
(benchmarks/pretrain_results.md, second and eighth rounds). ELECTRA (Clark et al. 2020) makes
every token a prediction: a small masked-LM *generator* fills the masked positions with its own
samples, and the *discriminator* -- the BERT encoder we keep -- says for every token whether it
is the original or a replacement. The paper's gain over BERT was largest for the smallest models
and budgets (ELECTRA-Small vs BERT-Small at the same compute: GLUE 79.9 vs 75.1).

This script is the measurement, not a pretraining option: it reuses `minibert.pretrain`'s data
pipeline (the same instances, masks and held-out split) and model classes, trains generator and
discriminator together for --minutes of wall clock with the budget recipe's schedule (10% warmup,
linear decay to 0 at the budget), and writes the discriminator as a minibert model folder that
`python -m minibert.finetune --init` reads like any pretraining run. Its masked-LM head is the
untrained one of a new model (ELECTRA trains no MLM head on the discriminator), so the prompt
strategy does not apply to it.

Deviations from ELECTRA, for the budget: the generator has its own embeddings (ELECTRA ties them
to the discriminator's), the corruption is minibert's 80/10/10 masking at --mask-prob, and the
discriminator starts from the budget recipe's sinusoidal position table.

    python benchmarks/replaced_token_detection.py --corpus ../shared/data/corpus \\
        --tokenizer runs/ladder_mini/p60/model --minutes 60 --out runs/rtd/p60
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minibert.checkpoint import atomic_write_text  # noqa: E402
from minibert.model import PRESETS, BertConfig, BertForPreTraining  # noqa: E402
from minibert.optim import build_optimizer, warmup_linear_by_time  # noqa: E402
from minibert.pretrain import PretrainConfig, init_positions_sinusoidal, prepare_data  # noqa: E402
from minibert.tokenizer import Tokenizer  # noqa: E402
from minibert.toolkit import MetricsLog, seed_everything, set_threads  # noqa: E402


@torch.no_grad()  # sampled, not differentiated: ELECTRA trains the two losses jointly, without RL
def corrupt(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
            mlm_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The discriminator's input and targets: the original text (B, T) with each chosen
    position (labels != -100, in row-major order as mlm_logits' N rows) replaced by a sample
    from the generator's softmax there, and which tokens now differ from the original (B, T),
    padding excluded. A sample equal to the original counts as original, as in ELECTRA."""
    chosen = labels != -100  # (B, T)
    original = torch.where(chosen, labels, input_ids)  # (B, T): the text before masking
    sampled = torch.multinomial(torch.softmax(mlm_logits.float(), dim=-1), 1).squeeze(1)  # (N,)
    corrupted = original.clone()
    corrupted[chosen] = sampled
    return corrupted, (corrupted != original) & (attention_mask > 0)


class ReplacedTokenDetection(nn.Module):
    """Generator (a small masked LM) + discriminator (the BERT we keep) + the discriminator's
    per-token head: dense -> GELU -> dense to one logit (is this token a replacement?)."""

    def __init__(self, disc_cfg: BertConfig, gen_cfg: BertConfig, disc_weight: float):
        super().__init__()
        self.disc = BertForPreTraining(disc_cfg)
        self.gen = BertForPreTraining(gen_cfg)
        H = disc_cfg.hidden_size
        self.head = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.Linear(H, 1))
        self.head.apply(self.disc.bert._init_weights)
        self.disc_weight = disc_weight

    def forward(self, input_ids, token_type_ids, attention_mask, labels) -> dict:
        """input_ids: the masked instances (B, T); labels: the original ids at the chosen
        positions, -100 elsewhere (minibert's collator)."""
        g = self.gen(input_ids, token_type_ids, attention_mask, labels=labels)  # g.mlm_logits: (N, V)
        corrupted, replaced = corrupt(input_ids, labels, attention_mask, g.mlm_logits)
        h = self.disc.bert(corrupted, token_type_ids, attention_mask)  # (B, T, H)
        logits = self.head(h).squeeze(-1)  # (B, T)
        real = attention_mask > 0
        d_loss = F.binary_cross_entropy_with_logits(logits[real].float(), replaced[real].float())
        d_hits = ((logits[real] > 0) == replaced[real]).sum()
        loss = g.mlm_loss + self.disc_weight * d_loss
        return {"loss": loss, "logits": logits, "corrupted": corrupted, "replaced": replaced, "gen_loss": g.mlm_loss,
                "gen_correct": g.mlm_correct, "gen_count": g.mlm_count, "disc_loss": d_loss, "disc_correct": d_hits,
                "disc_count": real.sum(),
                "n_replaced": replaced.sum(), "replaced_found": (replaced & (logits > 0)).sum()}


@torch.no_grad()
def evaluate(model: ReplacedTokenDetection, batches: list[dict]) -> dict:
    model.eval()
    torch.manual_seed(0)  # the same generator samples for every evaluation of a run
    s = {k: 0.0 for k in ("gen_correct", "gen_count", "disc_correct", "disc_count", "n_replaced", "replaced_found")}
    for b in batches:
        out = model(b["input_ids"], b["token_type_ids"], b["attention_mask"], b["labels"])
        for k in s:
            s[k] += float(out[k])
    model.train()
    return {"gen_mlm_acc": s["gen_correct"] / s["gen_count"], "disc_acc": s["disc_correct"] / s["disc_count"],
            "replaced_share": s["n_replaced"] / s["disc_count"],
            "replaced_recall": s["replaced_found"] / max(1.0, s["n_replaced"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", nargs="+", required=True)
    ap.add_argument("--tokenizer", required=True, help="reuse this tokenizer, so the random twin is the same model")
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--gen-hidden", type=int, default=64, help="generator width (ELECTRA: 1/4 to 1/2 of the "
                    "discriminator's); its layers match the discriminator's, one head per 64")
    ap.add_argument("--mask-prob", type=float, default=0.25)
    ap.add_argument("--disc-weight", type=float, default=50.0, help="ELECTRA's lambda")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = PretrainConfig(corpus=args.corpus, tokenizer=args.tokenizer, preset=args.preset, no_nsp=True,
                         mlm_prob=args.mask_prob, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                         out=str(out))
    tok = Tokenizer.from_file(args.tokenizer)
    data = prepare_data(cfg, tok)
    seed_everything(args.seed)
    disc_cfg = BertConfig.from_preset(args.preset, vocab_size=tok.vocab_size, dropout=0.0, attention_dropout=0.0)
    L = PRESETS[args.preset]["num_layers"]
    gen_cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=args.gen_hidden, num_layers=L,
                         num_heads=max(1, args.gen_hidden // 64), intermediate_size=4 * args.gen_hidden,
                         dropout=0.0, attention_dropout=0.0)
    model = ReplacedTokenDetection(disc_cfg, gen_cfg, args.disc_weight)
    init_positions_sinusoidal(model.disc)
    init_positions_sinusoidal(model.gen)
    opt = build_optimizer(model, args.lr, 0.01)
    budget_s = 60 * args.minutes
    t0 = time.time()
    sched = warmup_linear_by_time(opt, lambda: time.time() - t0, 0.1 * budget_s, budget_s)
    metrics = MetricsLog(out / "metrics.jsonl")

    def record(rec: dict) -> None:
        metrics.write(rec)
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()), flush=True)

    n_d = sum(p.numel() for p in model.disc.parameters())
    n_g = sum(p.numel() for p in model.gen.parameters())
    print(f"discriminator {n_d / 1e6:.2f}M, generator {n_g / 1e6:.2f}M parameters; {args.minutes:g} min", flush=True)
    step = 0
    while time.time() - t0 < budget_s:
        rows, keys = data.stream.take(args.batch_size)
        b = data.collate(rows, keys)
        r = model(b["input_ids"], b["token_type_ids"], b["attention_mask"], b["labels"])
        if not math.isfinite(r["loss"].item()):
            raise SystemExit(f"step {step + 1}: loss {r['loss'].item()}; the last model saved is in {out}/model")
        opt.zero_grad(set_to_none=True)
        r["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        elapsed = time.time() - t0
        last = elapsed >= budget_s
        if step % 100 == 0 or step == 1:
            rec = {"kind": "train", "step": step, "time_s": elapsed, "lr": sched.get_last_lr()[0],
                   "gen_loss": r["gen_loss"].item(), "disc_loss": r["disc_loss"].item(),
                   "gen_mlm_acc": float(r["gen_correct"]) / float(r["gen_count"]),
                   "disc_acc": float(r["disc_correct"]) / float(r["disc_count"])}
            record(rec)
        if step % args.eval_every == 0 or last:
            rec = {"kind": "eval", "step": step, "time_s": elapsed, **evaluate(model, data.eval_batches)}
            record(rec)
            model.disc.save_pretrained(out / "model", tokenizer=tok)
            model.gen.save_pretrained(out / "generator", tokenizer=tok)
            atomic_write_text(out / "model" / "eval.json", json.dumps(rec, indent=2) + "\n")
    print(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; discriminator in {out}/model", flush=True)


if __name__ == "__main__":
    main()
