"""Reading and writing Hugging Face-format BERT folders, and atomic file writes.

A *model folder* holds config.json, model.safetensors (or the older pytorch_model.bin) and
the tokenizer files. A *run folder* (what pretrain and finetune write) holds its latest
model folder as `model/`; `resolve_model_dir` turns either into the model folder.

Tensor names in a model folder follow the original TF port
("encoder.layer.3.attention.self.query.weight"); minibert's modules have shorter names of
their own ("encoder.layers.3.attn.q.weight"). `hf_name` maps ours to theirs, one rule per
module, so a reader can see the whole mapping at once.

Loading trusts nothing in the folder. In order, before the model is allocated:
  1. config.json: every field's type and range (a hostile vocab_size=10**9 fails here);
  2. the tokenizer's size against vocab_size;
  3. model.safetensors' header (8-byte little-endian length + JSON): every key and shape
     against the model's, and every tensor's bytes inside the file (a truncated file fails
     here, without reading the tensors).
Each problem is one CheckpointError line naming the file and the field. Nothing is ever
unpickled: safetensors, or torch.load with weights_only=True for .bin files.

Writes never leave a half-written file: each goes to a temporary `.<name>.tmp-*` beside
its target, is flushed to disk and renamed over it; `save_pretrained` writes a whole
temporary folder and swaps it in, so a folder never mixes an old tokenizer with a new model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

log = logging.getLogger("minibert")

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A model folder that cannot be read or written; the message is one line: what, where, how to fix."""


# -----------------------------------------------------------------------------
# Atomic writes: write to a temporary file beside the target, flush to disk, rename.
# A crash (or SIGKILL) mid-write leaves the old file intact, never a half-written one,
# and a `.<name>.tmp-*` leftover that the next run's output-folder check removes.


def temp_path(path: Path) -> Path:
    """A fresh `.<name>.tmp-<random>` beside path (the name every minibert temp file has)."""
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"


def cannot_write(path: PathLike, e: OSError) -> CheckpointError:
    return CheckpointError(f"cannot write {path}: {e.strerror or e}")


def _fsync(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """write(tmp) fills a temporary file, which then replaces path in one rename.
    The file gets the user's umask (created with 0o666 like any file, not mkstemp's 0o600)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = os.stat(tmp).st_mode  # 0o666 less the umask
        write(str(tmp))
        if os.stat(tmp).st_mode != mode:  # a writer that made its own file (safetensors: 0o600)
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise cannot_write(path, e) from None
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if type(e).__name__ == "SafetensorError" and "IoError" in str(e):  # safetensors' own word for a failed
            raise CheckpointError(f"cannot write {path}: {e}") from None  # write: a full disk, a lost mount
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_copy(src: PathLike, dst: PathLike) -> None:
    """Copy a file so that dst is never seen half-written: the old file or the whole new one."""
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def atomic_torch_save(obj, path: PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# -----------------------------------------------------------------------------
# Folders


def read_json(path: Path) -> Any:
    """A model folder's JSON file (config.json, prompt.json); invalid JSON is a CheckpointError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def resolve_model_dir(path: PathLike) -> Path:
    """A model folder as is; a run folder (pretrain's or finetune's output) -> its `model/`."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: not a folder (no such path); expected a model folder (config.json + "
                              "model.safetensors) or a run folder")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a folder; expected a model folder (config.json + model.safetensors) "
                              "or a run folder")
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    raise CheckpointError(f"{p}: no config.json here or in {p / 'model'}; expected a model folder or a run folder")


# Written by minibert.pretrain beside the model files of model/ and best/: the model was pretrained
# here, for CPU minutes or GPU hours rather than the days behind a published checkpoint, and
# finetune's default schedule (finetune.default_schedule) gives it larger steps for longer.
# minibert.finetune, prune and distill write it too when they started from such a model or from
# random weights.
PRETRAINED_HERE = "pretraining.json"


def pretrained_here(path: PathLike) -> bool:
    """Whether minibert.pretrain trained this model folder's (or run folder's) model from random
    weights, or continued such a model, or minibert.finetune, prune or distill made it from such a
    model or from random weights; False for published checkpoints (and what was made from them)
    and for folders whose mark cannot be read."""
    try:
        mark = json.loads((resolve_model_dir(path) / PRETRAINED_HERE).read_text(encoding="utf-8"))
    except (CheckpointError, OSError, ValueError):
        return False
    return isinstance(mark, dict) and mark.get("short_pretraining") is True


def here_mark(**fields) -> dict[str, str]:
    """save_pretrained's extra_files entry for the mark: PRETRAINED_HERE -> the fields as JSON.
    Every command that writes a model folder marks it the same way; the fields say which command
    and from what, and short_pretraining (True or False) is what pretrained_here reads."""
    return {PRETRAINED_HERE: json.dumps(fields, indent=2) + "\n"}


# Files that make up a model folder: replaced together by save_pretrained. Anything else in
# the folder (a run's train_state.pt, metrics, sub-folders) is carried over untouched.
MODEL_FILES = frozenset(
    {"config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt", "tokenizer.json",
     "tokenizer_config.json", "special_tokens_map.json", "prompt.json"}
)


def replace_folder(folder: Path, fill: Callable[[Path], None]) -> None:
    """fill(tmp) writes a new model folder into a sibling temp folder, which then replaces
    `folder` as a whole: the old folder is renamed aside, the new one renamed in, the old
    one's files that are not model files and that fill did not write moved into the new one,
    and the rest removed."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot write {folder}: it is a file, not a folder")
    # the previous folder is set aside under a name of its own, so that after a kill between the two
    # renames below the next job (toolkit.prepare_output) knows which leftover to put back
    tmp, old = temp_path(folder), folder.parent / f".{folder.name}.tmp-old-{uuid.uuid4().hex[:12]}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp, 0o777)  # the user's umask applies
        fill(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        if folder.exists():
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError:
            if old.exists():
                os.rename(old, folder)
            raise
        _fsync(folder.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise cannot_write(str(e.filename or folder).replace(str(tmp), str(folder)), e) from None
    except CheckpointError as e:  # from an atomic write inside tmp: name the file the user asked for
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(str(e).replace(str(tmp), str(folder))) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.exists():
        try:
            for entry in old.iterdir():
                # a run's other files stay with it, unless fill wrote a new one of that name
                if entry.name not in MODEL_FILES and not re.match(r"\..*\.tmp-", entry.name) \
                        and not (folder / entry.name).exists():
                    os.rename(entry, folder / entry.name)
        except OSError as e:
            why = f"{e.strerror or e} (files of the old folder are kept in {old})"
            raise CheckpointError(f"cannot write {folder}: {why}") from None
        shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# Name mapping: minibert name -> Hugging Face name (for the part inside `bert.`)

_BACKBONE_RULES = [
    (r"embeddings\.tok\.", "embeddings.word_embeddings."),
    (r"embeddings\.seg\.", "embeddings.token_type_embeddings."),
    (r"embeddings\.pos\.", "embeddings.position_embeddings."),
    (r"embeddings\.norm\.", "embeddings.LayerNorm."),
    (r"encoder\.layers\.(\d+)\.attn\.q\.", r"encoder.layer.\1.attention.self.query."),
    (r"encoder\.layers\.(\d+)\.attn\.k\.", r"encoder.layer.\1.attention.self.key."),
    (r"encoder\.layers\.(\d+)\.attn\.v\.", r"encoder.layer.\1.attention.self.value."),
    (r"encoder\.layers\.(\d+)\.attn\.o\.", r"encoder.layer.\1.attention.output.dense."),
    (r"encoder\.layers\.(\d+)\.norm1\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"encoder\.layers\.(\d+)\.ffn\.up\.", r"encoder.layer.\1.intermediate.dense."),
    (r"encoder\.layers\.(\d+)\.ffn\.down\.", r"encoder.layer.\1.output.dense."),
    (r"encoder\.layers\.(\d+)\.norm2\.", r"encoder.layer.\1.output.LayerNorm."),
    (r"encoder\.final_norm\.", "encoder.final_norm."),  # pre-LN only; no Hugging Face equivalent
    (r"pooler\.", "pooler.dense."),
]
_HEAD_RULES = [
    (r"mlm\.dense\.", "cls.predictions.transform.dense."),
    (r"mlm\.norm\.", "cls.predictions.transform.LayerNorm."),
    (r"mlm\.bias$", "cls.predictions.bias"),
    (r"nsp\.", "cls.seq_relationship."),
    (r"classifier\.", "classifier."),
]

# Keys that Hugging Face checkpoints carry but that are not parameters of their own:
# buffers (position_ids) and the decoder, which is tied to the word embeddings.
_IGNORED = re.compile(r"(^|\.)position_ids$|^cls\.predictions\.decoder\.(weight|bias)$")
# Heads of other BERT tasks: dropped with a note, not an error, when the model has no use for them.
_OTHER_HEADS = re.compile(r"^(cls\.|classifier\.|bert\.pooler\.|qa_outputs\.)")


def _apply(rules, name: str) -> Optional[str]:
    for pat, rep in rules:
        if re.match(pat, name):
            return re.sub(pat, rep, name, count=1)
    return None


def hf_name(name: str, is_backbone_only: bool) -> str:
    """minibert parameter name -> Hugging Face name, with the `bert.` prefix for task models."""
    if is_backbone_only:  # BertModel: names have no `bert.` prefix on either side
        out = _apply(_BACKBONE_RULES, name)
        return "bert." + out if out is not None else name
    if name.startswith("bert."):
        out = _apply(_BACKBONE_RULES, name[len("bert.") :])
        return "bert." + out if out is not None else name
    out = _apply(_HEAD_RULES, name)
    return out if out is not None else name


def normalise_hf_keys(sd: dict) -> dict:
    """Bring a Hugging Face state dict (or a name -> shape dict) to one spelling: `bert.` prefix
    on the backbone, LayerNorm weight/bias (old TF ports say gamma/beta), no buffers or tied copies."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        if not (k.startswith(("bert.", "cls.", "classifier.", "qa_outputs."))):
            k = "bert." + k  # a bare BertModel checkpoint
        if _IGNORED.search(k):
            continue
        out[k] = v
    return out


# -----------------------------------------------------------------------------
# config.json: translated field by field, each one checked before anything is built

# Upper bounds far above any BERT ever trained, far below what would exhaust memory.
_INT_FIELDS = {  # Hugging Face name: (minibert name, low, high)
    "vocab_size": ("vocab_size", 1, 10_000_000),
    "hidden_size": ("hidden_size", 1, 65_536),
    "num_hidden_layers": ("num_layers", 1, 1000),
    "num_attention_heads": ("num_heads", 1, 65_536),
    "intermediate_size": ("intermediate_size", 1, 262_144),
    "max_position_embeddings": ("max_position", 1, 1_000_000),
    "type_vocab_size": ("type_vocab_size", 1, 1000),
    "pad_token_id": ("pad_token_id", 0, 10_000_000),
    "num_labels": ("num_labels", 1, 1_000_000),
}
_FLOAT_FIELDS = {  # Hugging Face name: (minibert name, test, the allowed range in words)
    "hidden_dropout_prob": ("dropout", lambda v: 0 <= v < 1, "[0, 1)"),
    "attention_probs_dropout_prob": ("attention_dropout", lambda v: 0 <= v < 1, "[0, 1)"),
    "classifier_dropout": ("classifier_dropout", lambda v: 0 <= v < 1, "[0, 1)"),
    "layer_norm_eps": ("layer_norm_eps", lambda v: 0 < v <= 1, "(0, 1]"),
    "initializer_range": ("initializer_range", lambda v: 0 <= v <= 10, "[0, 10]"),
}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_CHOICES = {  # minibert's own fields, under "minibert": allowed values
    "position_embedding": ("learned", "sinusoidal"),
    "norm_position": ("post", "pre"),
}
# Per-layer sizes of a pruned model (minibert/prune.py), under "minibert": field -> the largest count
_PER_LAYER = {"heads_per_layer": 65_536, "intermediate_per_layer": 262_144}
_FLAGS = ("text_pair",)  # true or false, under "minibert": what a fine-tuned model reads
_HOW_TO_RUN = ("attn_impl", "fused_kernels")  # older files name them; the loader chooses them now


def config_to_hf(cfg) -> dict:
    """minibert BertConfig -> a config.json that transformers' BertConfig reads as-is."""
    d = {
        "architectures": None,  # filled by save_pretrained
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "classifier_dropout": cfg.classifier_dropout,
        # minibert's own fields; other libraries ignore unknown keys. Only what the model is:
        # how it runs (attn_impl, fused_kernels) is the loader's choice, so a model trained
        # with a CUDA kernel does not ask for it on a CPU
        "minibert": {
            "position_embedding": cfg.position_embedding,
            "norm_position": cfg.norm_position,
        },
    }
    for name in _PER_LAYER:  # only a pruned model has them, so other configs are unchanged
        if getattr(cfg, name) is not None:
            d["minibert"][name] = list(getattr(cfg, name))
    if cfg.text_pair is not None:
        d["minibert"]["text_pair"] = cfg.text_pair
    if cfg.id2label:
        d["id2label"] = {str(i): lab for i, lab in cfg.id2label.items()}
        d["label2id"] = {lab: i for i, lab in cfg.id2label.items()}
    if cfg.num_labels == 1:
        d["problem_type"] = "regression"
    d["num_labels"] = cfg.num_labels
    return d


def config_from_hf(d: object, path: PathLike) -> dict:
    """A parsed config.json -> BertConfig keyword arguments, every field's type and range
    checked; a CheckpointError naming `path` and the field otherwise."""

    def bad(field: str, msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: {field} {msg}")

    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    for name, want in (("hidden_act", "gelu"), ("position_embedding_type", "absolute"), ("model_type", "bert")):
        if d.get(name, want) != want:
            raise bad(name, f"= {d[name]!r} is not supported; minibert implements BERT ({name} = {want!r})")
    for name in _REQUIRED:
        if name not in d:
            raise bad(name, "is missing; a BERT config.json has " + ", ".join(_REQUIRED))
    kw = {}
    for theirs, (ours, low, high) in _INT_FIELDS.items():
        v = d.get(theirs)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad(theirs, f"= {v!r} must be a whole number in [{low}, {high}]")
        if not low <= v <= high:
            raise bad(theirs, f"= {v} is out of range; allowed [{low}, {high:,}]")
        kw[ours] = v
    for theirs, (ours, inside, allowed) in _FLOAT_FIELDS.items():
        v = d.get(theirs)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad(theirs, f"= {v!r} must be a number in {allowed}")
        if not inside(v):
            raise bad(theirs, f"= {v} is out of range; allowed {allowed}")
        kw[ours] = float(v)
    if kw["hidden_size"] % kw["num_heads"]:
        raise bad("hidden_size", f"= {kw['hidden_size']} is not divisible by num_attention_heads = {kw['num_heads']}")
    if kw.get("pad_token_id", 0) >= kw["vocab_size"]:
        raise bad("pad_token_id", f"= {kw['pad_token_id']} must be below vocab_size = {kw['vocab_size']}")
    own = d.get("minibert", {})
    if not isinstance(own, dict):
        raise bad("minibert", f"= {own!r} must be an object")
    for name, v in own.items():
        if name in _HOW_TO_RUN:
            continue
        if name in _FLAGS:
            if not isinstance(v, bool):
                raise bad(f"minibert.{name}", f"= {v!r} must be true or false")
            kw[name] = v
            continue
        if name in _PER_LAYER:
            ok = isinstance(v, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in v)
            if not ok or not all(0 <= n <= _PER_LAYER[name] for n in v):
                raise bad(f"minibert.{name}", f"= {v!r} must be a list of counts in [0, {_PER_LAYER[name]:,}], "
                          "one per layer")
            kw[name] = v
            continue
        if name not in _CHOICES:
            raise bad(f"minibert.{name}", "is not a minibert field; known: "
                      + ", ".join([*_CHOICES, *_PER_LAYER, *_FLAGS]))
        if v not in _CHOICES[name]:
            raise bad(f"minibert.{name}", f"= {v!r}; allowed: " + ", ".join(_CHOICES[name]))
        kw[name] = v
    if kw.get("position_embedding") == "sinusoidal" and kw["hidden_size"] % 2:
        raise bad("hidden_size", f"= {kw['hidden_size']} must be even for minibert.position_embedding = 'sinusoidal'")
    if "id2label" in d:
        id2label = d["id2label"]
        pairs = id2label.items() if isinstance(id2label, dict) else [(None, None)]
        if not all(isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in pairs):
            raise bad("id2label", "must map label ids (\"0\", \"1\", ...) to label names")
        kw["id2label"] = {int(k): v for k, v in id2label.items()}
        kw["num_labels"] = d.get("num_labels", len(id2label))
    if d.get("problem_type") == "regression":
        kw["num_labels"] = 1
    return kw


# -----------------------------------------------------------------------------
# Reading tensors: the safetensors header first, then the tensors

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 << 20  # 100 MB of JSON is far more than any BERT's few hundred tensors need


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape from a .safetensors file's header (8-byte little-endian length, then JSON),
    after checking that every tensor's bytes lie inside the file. Reads the header only."""

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {why}; the file is truncated or corrupt (save it again or download it again)")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise corrupt(f"header length {n} does not fit in the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise corrupt(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_size = size - 8 - n
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(s, int) and s >= 0 for s in shape) or not 0 <= begin <= end:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name!r} has a malformed header entry") from None
        if dtype not in _ITEMSIZE:
            raise corrupt(f"tensor {name!r} has unknown dtype {dtype!r}")
        if end > data_size:
            raise corrupt(f"tensor {name!r} ends at byte {end} of {data_size} data bytes")
        if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise corrupt(f"tensor {name!r} of shape {shape} does not match its {end - begin} bytes")
        shapes[name] = shape
    return shapes


def read_state_dict(folder: Path) -> dict[str, Tensor]:
    st, bin_ = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{st}: cannot read the tensors ({e}); the file is truncated or corrupt") from None
    if bin_.exists():
        try:
            return torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types; all mean the same to the user
            raise CheckpointError(f"{bin_}: cannot read the tensors ({type(e).__name__}: {e})") from None
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")


def tokenizer_size(folder: Path) -> Optional[int]:
    """How many ids the folder's tokenizer can produce (vocab.txt's lines, else tokenizer.json's
    vocabulary), or None without tokenizer files. Cheap: no tokenizer is built."""
    vocab, tj = folder / "vocab.txt", folder / "tokenizer.json"
    if vocab.is_file():
        with open(vocab, "rb") as f:
            return sum(1 for _ in f)
    if tj.is_file():
        try:
            d = json.loads(tj.read_text(encoding="utf-8"))
            ids = list(d["model"]["vocab"].values()) + [t["id"] for t in d.get("added_tokens", [])]
            return max(ids) + 1 if ids else 0
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError):
            raise CheckpointError(f"{tj}: not a WordPiece tokenizer.json (no model.vocab)") from None
    return None


def check_tokenizer_fits(folder: Path, vocab_size: int) -> None:
    n = tokenizer_size(folder)
    if n is not None and n > vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {n} tokens but config.json's vocab_size is {vocab_size}; "
            "the tokenizer files belong to another model (save model and tokenizer together)"
        )


def fit_report(model, found: dict[str, tuple[int, ...]], source: str) -> tuple[list[str], list[str]]:
    """Check a checkpoint's names and shapes (Hugging Face names, normalised) against `model`
    (which may live on the meta device). Returns (initialised, discarded): the model's head
    parameters the checkpoint lacks and the other tasks' heads it carries. Anything else
    missing, unexpected or of the wrong shape is one CheckpointError listing all of it."""
    own = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    ours_to_theirs = {name: hf_name(name, model.backbone_only) for name in own}
    theirs_to_ours = {v: k for k, v in ours_to_theirs.items()}
    missing = [n for n in own if ours_to_theirs[n] not in found]
    unexpected = [k for k in found if k not in theirs_to_ours]
    shape_errors = [
        f"{k}: checkpoint {tuple(found[k])} vs model {own[theirs_to_ours[k]]}"
        for k in found
        if k in theirs_to_ours and tuple(found[k]) != own[theirs_to_ours[k]]
    ]
    init_ok = [n for n in missing if n.startswith(model.head_prefixes)]
    missing_bad = [n for n in missing if n not in init_ok]
    discarded = [k for k in unexpected if _OTHER_HEADS.match(k)]
    unexpected_bad = [k for k in unexpected if k not in discarded]
    if missing_bad or unexpected_bad or shape_errors:
        msg = [f"{source}: checkpoint does not fit {type(model).__name__}"]
        if missing_bad:
            msg.append(f"missing keys ({len(missing_bad)}): " + ", ".join(ours_to_theirs[n] for n in missing_bad))
        if unexpected_bad:
            msg.append(f"unexpected keys ({len(unexpected_bad)}): " + ", ".join(unexpected_bad))
        if shape_errors:
            msg.append("shape mismatches: " + ", ".join(shape_errors))
        raise CheckpointError("; ".join(msg) + " (is config.json the one saved with these weights?)")
    return init_ok, discarded


class PretrainedMixin:
    """from_pretrained / save_pretrained for every minibert model class.

    A class sets `config_class` (BertConfig), `backbone_only` (True for the bare encoder,
    whose tensor names have no `bert.` prefix) and `head_prefixes`: the parameter-name
    prefixes a checkpoint may lack (a new classifier, say). Those are initialised and
    reported; anything else missing is an error.
    """

    config_class: type
    backbone_only: bool = False
    head_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(
        cls, folder: PathLike, attn_impl: Optional[str] = None, fused_kernels: Optional[bool] = None, **config_overrides
    ):
        """Load a model folder or a run folder's model. attn_impl / fused_kernels choose how to
        run (the config's defaults when None); config_overrides change fields (num_labels=3)."""
        folder = resolve_model_dir(folder)
        cfg_path = folder / "config.json"
        kw = config_from_hf(read_json(cfg_path), cfg_path)
        check_tokenizer_fits(folder, kw["vocab_size"])
        run = {k: v for k, v in (("attn_impl", attn_impl), ("fused_kernels", fused_kernels)) if v is not None}
        try:
            cfg = cls.config_class(**{**kw, **config_overrides, **run})
        except ValueError as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None
        with torch.device("meta"):  # names and shapes only: nothing is allocated yet
            shell = cls(cfg)
        st = folder / "model.safetensors"
        if st.exists():
            init_ok, discarded = fit_report(shell, normalise_hf_keys(read_safetensors_header(st)), str(st))
            sd = read_state_dict(folder)
        else:
            sd = read_state_dict(folder)  # a .bin file: read (bounded by its size), then checked
            shapes = {k: tuple(v.shape) for k, v in normalise_hf_keys(sd).items()}
            init_ok, discarded = fit_report(shell, shapes, str(folder))
        del shell
        model = cls(cfg)
        model.load_report = model.load_hf_state_dict(sd, source=str(folder))
        return model

    def load_hf_state_dict(self, sd: dict[str, Tensor], source: str = "state dict") -> dict:
        """Check every key and shape, then copy. Returns {'initialised': [...], 'discarded': [...]}."""
        sd = normalise_hf_keys(sd)
        init_ok, discarded = fit_report(self, {k: tuple(v.shape) for k, v in sd.items()}, source)
        with torch.no_grad():
            for name, t in self.state_dict().items():
                key = hf_name(name, self.backbone_only)
                if key in sd:
                    t.copy_(sd[key].to(t.dtype))
        if init_ok:
            log.warning("%s: newly initialised (not in the checkpoint): %s", source, ", ".join(init_ok))
        if discarded:
            log.info("%s: not used by %s: %s", source, type(self).__name__, ", ".join(discarded))
        return {"initialised": init_ok, "discarded": discarded}

    def hf_state_dict(self) -> dict[str, Tensor]:
        """The state dict under Hugging Face names (bare names for BertModel, as transformers saves it)."""
        out = {}
        for name, t in self.state_dict().items():
            key = hf_name(name, self.backbone_only)
            if self.backbone_only:
                key = key[len("bert.") :]
            out[key] = t.detach().contiguous().cpu()
        return out

    def save_pretrained(self, folder: PathLike, tokenizer=None, extra_files: Optional[dict[str, str]] = None) -> None:
        """Write config.json + model.safetensors (+ the tokenizer's files, + extra_files: name ->
        text, e.g. prompt.json) into a temporary folder that then replaces `folder`'s model
        files as a whole. A failure raises `cannot write PATH: reason` and leaves the old folder."""
        from safetensors.torch import save_file

        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise CheckpointError(f"cannot save to {folder}: the tokenizer has {tokenizer.vocab_size} tokens, "
                                  f"the model's vocab_size is {self.config.vocab_size}; save the model's own tokenizer")
        hf = config_to_hf(self.config)
        hf["architectures"] = [type(self).__name__]
        sd = self.hf_state_dict()

        def fill(tmp: Path) -> None:
            atomic_write(tmp / "model.safetensors", lambda path: save_file(sd, path, metadata={"format": "pt"}))
            atomic_write_text(tmp / "config.json", json.dumps(hf, indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save(tmp)
            for name, text in (extra_files or {}).items():
                atomic_write_text(tmp / name, text)

        replace_folder(Path(folder), fill)
