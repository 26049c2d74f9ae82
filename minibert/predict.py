"""Use a fine-tuned model: label + probabilities for new text.

    python -m minibert.predict --model runs/sst2 "a gorgeous , witty film" "a dull mess"
    python -m minibert.predict --model runs/sst2 --file reviews.tsv     # any file minibert.tabular reads

    from minibert.predict import Classifier
    Classifier("runs/sst2")(["great film"])   # -> [Prediction(label=1, probs={0: 0.02, 1: 0.98}, ...)]

--model takes the run folder `python -m minibert.finetune` writes, or its model/ folder: a
Hugging Face-format BERT folder whose config.json carries id2label. A model folder with a
prompt.json was trained with `--strategy prompt` and is read through its masked-LM head.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .checkpoint import CheckpointError, read_json, resolve_model_dir
from .model import BertForMaskedLM, BertForSequenceClassification
from .strategies import PackedInputs, PlainInputs, Prompt  # noqa: F401 (PackedInputs: predict's inputs, re-exported)
from .tabular import ERRORS_HELP, LabelMap, NotUtf8Error, read_labeled
from .tokenizer import Tokenizer
from .toolkit import USER_ERRORS, OneLineParser, UserError, pick_device


def to_device(batch, device: torch.device):
    """Move a (possibly nested) dict of tensors."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    return {k: to_device(v, device) for k, v in batch.items()}


@torch.no_grad()
def score_items(model, inputs, items: Sequence, batch_size: int, device: torch.device) -> Tensor:
    """Scores (N, C) for encoded items, in their order. Batches are cut from the items sorted
    by length so that each batch pads little; the order is restored at the end. Runs in the
    caller's autocast context, if any."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(items)), key=lambda i: inputs.length(items[i]))
    out: list[Tensor] = []
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = to_device(inputs.collate([items[i] for i in idx]), device)
        out.append(inputs.scores(model, batch).float().cpu())
    model.train(was_training)
    scores = torch.cat(out) if out else torch.zeros(0)
    result = torch.empty_like(scores)
    result[torch.tensor(order)] = scores
    return result


def _read_json(path: Path) -> dict:
    d = read_json(path)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: holds a {type(d).__name__}, not a JSON object")
    return d


@dataclass
class Prediction:
    label: object  # the label as the training data spelled it (int or str); None for regression
    probs: dict  # label -> probability; {} for regression
    score: Optional[float] = None  # the regression output


class Classifier:
    """A fine-tuned model (its folder, or the run folder holding it in model/), ready to label
    text. Call it on a list of strings (and pairs)."""

    def __init__(self, folder: str | Path, device: str = "cpu", batch_size: int = 64, max_len: Optional[int] = None):
        folder = resolve_model_dir(folder)
        cfg_path = folder / "config.json"
        hf = _read_json(cfg_path)
        if "id2label" not in hf:
            raise CheckpointError(f"{cfg_path}: no id2label; this is not a fine-tuned classifier "
                                  "(run minibert.finetune first)")
        try:
            self.label_map = LabelMap.from_json(hf)
        except (AttributeError, TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{cfg_path}: id2label is not a mapping of class ids to labels as finetune "
                                  f"writes it ({type(e).__name__}: {e})") from None
        self.tok = Tokenizer.from_file(folder)
        self.device = pick_device(device)
        self.batch_size = batch_size
        prompt_path = folder / "prompt.json"
        if prompt_path.exists():
            p = _read_json(prompt_path)
            self.inputs = Prompt.from_dict(p, [str(x) for x in self.label_map.labels], self.tok, max_len)
            self.model = BertForMaskedLM.from_pretrained(folder)
        else:
            self.inputs = PlainInputs(self.tok, max_len or self.tok.model_max_length)
            self.model = BertForSequenceClassification.from_pretrained(folder)
            if any(n.startswith("classifier.") for n in self.model.load_report["initialised"]):
                raise CheckpointError(f"{folder}: the checkpoint has no trained classifier head")
            outputs, want = self.model.classifier.out_features, max(self.label_map.num_labels, 1)
            if outputs != want:  # else a 2-class head read with one label would pass for regression
                raise CheckpointError(f"{cfg_path}: id2label names {len(hf['id2label'])} label(s), but the "
                                      f"classifier head has {outputs} outputs")
        self.model.to(self.device).eval()
        self.folder = folder

    def check_pairs(self, pairs: Optional[Sequence[str]]) -> None:
        """A model fine-tuned on text pairs reads [CLS] a [SEP] b [SEP]; given one text, or a model
        fine-tuned on single texts given two, it still answers, with a label that means nothing.
        Folders that do not record which (older ones, and those made by other libraries) are not
        checked."""
        want = self.model.config.text_pair
        if want is True and pairs is None:
            raise UserError(f"{self.folder} was fine-tuned on text pairs; give the second text of each "
                            "(on the command line: --file with a text pair column)")
        if want is False and pairs is not None:
            raise UserError(f"{self.folder} was fine-tuned on single texts and reads no second text; "
                            "drop --text-pair-col")

    def scores(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None) -> Tensor:
        """Raw class scores (N, C): logits, or verbalizer log-probabilities for prompt models."""
        self.check_pairs(pairs)
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
    prog = "python -m minibert.predict"
    ap = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("texts", nargs="*", help="texts to label")
    ap.add_argument("--model", required=True, help="the run folder minibert.finetune wrote, or its model/ folder")
    ap.add_argument("--file", help="label every row of this TSV/CSV/JSONL file instead (columns as in "
                    "minibert.finetune)")
    ap.add_argument("--text-col", help="text column of --file, by name or 0-based index")
    ap.add_argument("--text-pair-col", help="second-text column of --file, by name or 0-based index; a model "
                    "fine-tuned on text pairs needs one, a model fine-tuned on single texts refuses it")
    ap.add_argument("--errors", choices=("strict", "replace"), default="strict", help=ERRORS_HELP)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (auto: cuda, else mps, "
                    "else cpu)")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per forward pass")
    args = ap.parse_args(argv)
    if not args.texts and not args.file:
        ap.error("give texts to label, or --file")
    if args.batch_size < 1:
        ap.error(f"--batch-size must be positive, got {args.batch_size}")
    empty = [i for i, t in enumerate(args.texts, 1) if not t.strip()]
    if empty:  # training refuses empty rows too: a label for no text means nothing
        ap.error(f"text {empty[0]} of the command line is empty; give the text to label")
    try:
        clf = Classifier(args.model, device=args.device, batch_size=args.batch_size)
        pairs = None
        if args.file:
            col = lambda c: int(c) if c is not None and c.isdigit() else c  # noqa: E731
            try:
                data = read_labeled(args.file, col(args.text_col), col(args.text_pair_col), errors=args.errors)
            except NotUtf8Error as e:
                raise UserError(str(e.on_command_line())) from None
            except ValueError as e:  # DataError (file:line), or a file name whose extension names no format
                raise UserError(str(e) if str(e).startswith(args.file) else f"--file {args.file}: {e}") from None
            texts, pairs = data.texts, data.pairs
            if pairs is not None and args.text_pair_col is None and clf.model.config.text_pair is False:
                # a column found by its name (tabular.PAIR_NAMES) that this model has no use for
                print(f"{prog}: note: {args.file} has a second text column; {clf.folder} was fine-tuned on "
                      "single texts, so it is not read", file=sys.stderr)
                pairs = None
        else:
            texts = args.texts
        clf.check_pairs(pairs)
    except OSError as e:
        return _error(prog, UserError(f"cannot read {e.filename}: {e.strerror}" if e.filename else str(e)))
    except USER_ERRORS as e:
        return _error(prog, e)
    for t, p in zip(texts, clf(texts, pairs)):
        print(format_prediction(t, p))
    return 0


def _error(prog: str, e: Exception) -> int:
    print(f"{prog}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
