"""Use a fine-tuned model: label + probabilities for new text.

    python -m minibert.predict --model runs/sst2/model "a gorgeous , witty film" "a dull mess"
    python -m minibert.predict --model runs/sst2/model --file reviews.tsv     # any file minibert.tabular reads

    from minibert.predict import Classifier
    Classifier("runs/sst2/model")(["great film"])   # -> [Prediction(label=1, probs={0: 0.02, 1: 0.98}, ...)]

A model folder is what `python -m minibert.finetune` writes: a Hugging Face-format
BERT folder whose config.json carries id2label. A folder with a prompt.json was
trained with `--strategy prompt` and is read through its masked-LM head.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .checkpoint import CheckpointError
from .model import BertForMaskedLM, BertForSequenceClassification
from .packing import pack
from .strategies import Prompt, Verbalizer
from .tabular import DataError, LabelMap, read_labeled
from .tokenizer import Tokenizer


class PlainInputs:
    """[CLS] A [SEP] (B [SEP]) rows for a sequence classifier, padded per batch."""

    def __init__(self, tok: Tokenizer, max_len: int):
        self.tok, self.max_len = tok, max_len

    def encode(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None) -> list[tuple[list[int], list[int]]]:
        a_all = self.tok.encode_ids(texts)  # batched in Rust
        b_all = self.tok.encode_ids(pairs) if pairs is not None else [None] * len(a_all)
        return [self.tok.build_inputs(a, b, self.max_len) for a, b in zip(a_all, b_all)]

    @staticmethod
    def length(item: tuple[list[int], list[int]]) -> int:
        return len(item[0])

    def collate(self, items: Sequence[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        return self.tok.pad(items)  # dynamic padding: T = the longest row of this batch

    @staticmethod
    def scores(model: BertForSequenceClassification, batch: dict[str, Tensor]) -> Tensor:
        return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits  # (B, C)


class PackedInputs(PlainInputs):
    """The same rows, but a batch is packed end to end into rows of max_len tokens
    (minibert.packing) instead of padded to its longest row.

    Short texts waste most of a padded batch: 32 SST-2 sentences of ~13 tokens padded
    to their longest (~40) are two-thirds [PAD]; packed, the same 32 fill ~4 rows of 128.
    Each sentence keeps its own positions and attends only to itself, so the encoder
    computes what it computes for the sentence alone (only the dropout draws differ);
    each sentence's [CLS] state is gathered back and goes through the usual head."""

    def collate(self, items: Sequence[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        # no dense (R, T, T) mask: the model builds the block-diagonal mask it needs from doc_ids
        return pack([ids for ids, _ in items], self.max_len, [types for _, types in items], pad_id=self.tok.pad_id, dense_mask=False)

    @staticmethod
    def scores(model: BertForSequenceClassification, batch: dict[str, Tensor]) -> Tensor:
        h = model.bert(batch["input_ids"], batch["token_type_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])  # (R, T, H)
        pooled = model.bert.pool(h, batch["cls_index"])  # (N, H): each sentence's [CLS], in the batch's order
        return model.classifier(model.drop(pooled))  # (N, C): BertForSequenceClassification's head


def to_device(batch, device: torch.device):
    """Move a (possibly nested) dict of tensors."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    return {k: to_device(v, device) for k, v in batch.items()}


@torch.no_grad()
def score_items(model, inputs, items: Sequence, batch_size: int, device: torch.device, autocast: bool = False) -> Tensor:
    """Scores (N, C) for encoded items, in their order. Batches are cut from the items sorted
    by length so that each batch pads little; the order is restored at the end."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(items)), key=lambda i: inputs.length(items[i]))
    out: list[Tensor] = []
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = to_device(inputs.collate([items[i] for i in idx]), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out.append(inputs.scores(model, batch).float().cpu())
    model.train(was_training)
    scores = torch.cat(out) if out else torch.zeros(0)
    result = torch.empty_like(scores)
    result[torch.tensor(order)] = scores
    return result


@dataclass
class Prediction:
    label: object  # the label as the training data spelled it (int or str); None for regression
    probs: dict  # label -> probability; {} for regression
    score: Optional[float] = None  # the regression output


class Classifier:
    """A fine-tuned folder, ready to label text. Call it on a list of strings (and pairs)."""

    def __init__(self, folder: str | Path, device: str = "cpu", batch_size: int = 64, max_len: Optional[int] = None):
        folder = Path(folder)
        cfg_path = folder / "config.json"
        try:
            hf = json.loads(cfg_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{folder}: no config.json; expected a folder written by minibert.finetune") from None
        if "id2label" not in hf:
            raise CheckpointError(f"{cfg_path}: no id2label; this is not a fine-tuned classifier (run minibert.finetune first)")
        self.label_map = LabelMap.from_json(hf)
        self.tok = Tokenizer.from_file(folder)
        self.device = torch.device(device)
        self.batch_size = batch_size
        prompt_path = folder / "prompt.json"
        if prompt_path.exists():
            p = json.loads(prompt_path.read_text(encoding="utf-8"))
            names = [str(x) for x in self.label_map.labels]
            verbalizer = Verbalizer.parse(p["verbalizer"], names, self.tok)
            self.inputs = Prompt(p["template"], verbalizer, self.tok, max_len or p["max_len"])
            self.model = BertForMaskedLM.from_pretrained(folder)
        else:
            self.inputs = PlainInputs(self.tok, max_len or self.tok.model_max_length)
            self.model = BertForSequenceClassification.from_pretrained(folder)
            if any(n.startswith("classifier.") for n in self.model.load_report["initialised"]):
                raise CheckpointError(f"{folder}: the checkpoint has no trained classifier head")
        self.model.to(self.device).eval()

    def scores(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None) -> Tensor:
        """Raw class scores (N, C): logits, or verbalizer log-probabilities for prompt models."""
        return score_items(self.model, self.inputs, self.inputs.encode(texts, pairs), self.batch_size, self.device)

    def __call__(self, texts: str | Sequence[str], pairs: str | Sequence[str] | None = None) -> list[Prediction]:
        if isinstance(texts, str):
            texts = [texts]
            pairs = [pairs] if isinstance(pairs, str) else pairs
        s = self.scores(texts, pairs)
        if self.label_map.is_regression:
            return [Prediction(None, {}, float(v)) for v in s[:, 0]]
        probs = s.softmax(-1)  # (N, C)
        labels = self.label_map.labels
        return [Prediction(labels[int(p.argmax())], {lab: float(x) for lab, x in zip(labels, p)}) for p in probs]


def format_prediction(text: str, p: Prediction) -> str:
    if p.score is not None:
        return f"{p.score:.4f}\t{text}"
    probs = " ".join(f"{lab}={x:.3f}" for lab, x in p.probs.items())
    return f"{p.label}\t{probs}\t{text}"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minibert.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("texts", nargs="*", help="texts to label")
    ap.add_argument("--model", required=True, help="a folder written by minibert.finetune (its model/ subfolder)")
    ap.add_argument("--file", help="label every row of this TSV/CSV/JSONL file instead (columns as in minibert.finetune)")
    ap.add_argument("--text-col", help="text column of --file, by name or 0-based index")
    ap.add_argument("--text-pair-col", help="second-text column of --file, by name or 0-based index")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per forward pass")
    args = ap.parse_args(argv)
    if not args.texts and not args.file:
        ap.error("give texts to label, or --file")
    try:
        clf = Classifier(args.model, device=args.device, batch_size=args.batch_size)
        pairs = None
        if args.file:
            col = lambda c: int(c) if c is not None and c.isdigit() else c  # noqa: E731
            data = read_labeled(args.file, col(args.text_col), col(args.text_pair_col))
            texts, pairs = data.texts, data.pairs
        else:
            texts = args.texts
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for t, p in zip(texts, clf(texts, pairs)):
        print(format_prediction(t, p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
