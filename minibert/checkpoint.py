"""Reading and writing Hugging Face-format BERT folders, and atomic file writes.

A Hugging Face BERT folder holds config.json, model.safetensors (or the older
pytorch_model.bin) and the tokenizer files. Tensor names there follow the original
TF port ("encoder.layer.3.attention.self.query.weight"); minibert's modules have
shorter names of their own ("encoder.layers.3.attn.q.weight"). `hf_name` maps
ours to theirs, one rule per module, so a reader can see the whole mapping at once.

Loading checks every key and every shape before it copies anything, and reports all
problems in one error. Nothing is ever unpickled: safetensors, or torch.load with
weights_only=True for .bin files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor

log = logging.getLogger("minibert")

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, truncated, or not this model's shape."""


# -----------------------------------------------------------------------------
# Atomic writes: write to a temporary file in the same folder, flush to disk, rename.
# A crash (or SIGKILL) mid-write leaves the old file intact, never a half-written one.


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_torch_save(obj, path: PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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


def normalise_hf_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Bring a Hugging Face state dict to one spelling: `bert.` prefix on the backbone,
    LayerNorm weight/bias (old TF ports say gamma/beta), no buffers or tied copies."""
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
# Config translation


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
        # with a CUDA kernel does not ask for it on a CPU (older files that name one still load)
        "minibert": {
            "position_embedding": cfg.position_embedding,
            "norm_position": cfg.norm_position,
        },
    }
    if cfg.id2label:
        d["id2label"] = {str(i): lab for i, lab in cfg.id2label.items()}
        d["label2id"] = {lab: i for i, lab in cfg.id2label.items()}
    if cfg.num_labels == 1:
        d["problem_type"] = "regression"
    d["num_labels"] = cfg.num_labels
    return d


def config_from_hf(d: dict, path: str):
    from .model import BertConfig

    act = d.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{path}: hidden_act={act!r} is not supported; minibert implements BERT's exact erf 'gelu'")
    pet = d.get("position_embedding_type", "absolute")
    if pet != "absolute":
        raise CheckpointError(f"{path}: position_embedding_type={pet!r} is not supported (only 'absolute')")
    if d.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{path}: model_type={d.get('model_type')!r}, expected 'bert'")
    try:
        kw = dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: config.json lacks the field {e.args[0]!r}") from None
    opt = {
        "max_position": "max_position_embeddings",
        "type_vocab_size": "type_vocab_size",
        "dropout": "hidden_dropout_prob",
        "attention_dropout": "attention_probs_dropout_prob",
        "layer_norm_eps": "layer_norm_eps",
        "pad_token_id": "pad_token_id",
        "initializer_range": "initializer_range",
        "classifier_dropout": "classifier_dropout",
    }
    for ours, theirs in opt.items():
        if d.get(theirs) is not None:
            kw[ours] = d[theirs]
    kw.update(d.get("minibert", {}))
    if "id2label" in d:
        kw["id2label"] = {int(k): v for k, v in d["id2label"].items()}
        kw["num_labels"] = len(kw["id2label"])
    if "num_labels" in d:
        kw["num_labels"] = d["num_labels"]
    if d.get("problem_type") == "regression":
        kw["num_labels"] = 1
    return BertConfig(**kw)


# -----------------------------------------------------------------------------
# Reading tensors


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


class PretrainedMixin:
    """from_pretrained / save_pretrained for every minibert model class.

    A class sets `head_prefixes`: the parameter-name prefixes a checkpoint may lack
    (a new classifier, say). Those are initialised and reported; anything else missing
    is an error.
    """

    head_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, folder: PathLike, **config_overrides):
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a folder (expected config.json + model.safetensors)")
        cfg_path = folder / "config.json"
        try:
            hf_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{folder}: no config.json") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
        cfg = config_from_hf(hf_cfg, str(cfg_path))
        for k, v in config_overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"unknown config field {k!r}")
            setattr(cfg, k, v)
        cfg.__post_init__()
        model = cls(cfg)
        model.load_report = model.load_hf_state_dict(read_state_dict(folder), source=str(folder))
        return model

    def load_hf_state_dict(self, sd: dict[str, Tensor], source: str = "state dict") -> dict:
        """Check every key and shape, then copy. Returns {'initialised': [...], 'discarded': [...]}."""
        from .model import BertModel

        sd = normalise_hf_keys(sd)
        own = self.state_dict()
        backbone_only = isinstance(self, BertModel)
        ours_to_theirs = {name: hf_name(name, backbone_only) for name in own}
        theirs_to_ours = {v: k for k, v in ours_to_theirs.items()}

        missing = [n for n in own if ours_to_theirs[n] not in sd]
        unexpected = [k for k in sd if k not in theirs_to_ours]
        shape_errors = [
            f"  {k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[theirs_to_ours[k]].shape)}"
            for k in sd
            if k in theirs_to_ours and sd[k].shape != own[theirs_to_ours[k]].shape
        ]
        init_ok = [n for n in missing if n.startswith(self.head_prefixes)]
        missing_bad = [n for n in missing if n not in init_ok]
        discarded = [k for k in unexpected if _OTHER_HEADS.match(k)]
        unexpected_bad = [k for k in unexpected if k not in discarded]
        if missing_bad or unexpected_bad or shape_errors:
            msg = [f"{source}: checkpoint does not fit {type(self).__name__}"]
            if missing_bad:
                msg.append(f"missing keys ({len(missing_bad)}): " + ", ".join(ours_to_theirs[n] for n in missing_bad))
            if unexpected_bad:
                msg.append(f"unexpected keys ({len(unexpected_bad)}): " + ", ".join(unexpected_bad))
            if shape_errors:
                msg.append("shape mismatches:\n" + "\n".join(shape_errors))
            raise CheckpointError("\n".join(msg))

        with torch.no_grad():
            for name, t in own.items():
                key = ours_to_theirs[name]
                if key in sd:
                    t.copy_(sd[key].to(t.dtype))
        if init_ok:
            log.warning("%s: newly initialised (not in the checkpoint): %s", source, ", ".join(init_ok))
        if discarded:
            log.info("%s: not used by %s: %s", source, type(self).__name__, ", ".join(discarded))
        return {"initialised": init_ok, "discarded": discarded}

    def hf_state_dict(self) -> dict[str, Tensor]:
        """The state dict under Hugging Face names (bare names for BertModel, as transformers saves it)."""
        from .model import BertModel

        backbone_only = isinstance(self, BertModel)
        out = {}
        for name, t in self.state_dict().items():
            key = hf_name(name, backbone_only)
            if backbone_only:
                key = key[len("bert.") :]
            out[key] = t.detach().contiguous().cpu()
        return out

    def save_pretrained(self, folder: PathLike, tokenizer=None) -> None:
        """Write config.json + model.safetensors (+ tokenizer files), each atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        hf = config_to_hf(self.config)
        hf["architectures"] = [type(self).__name__]
        sd = self.hf_state_dict()
        atomic_write(folder / "model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
        atomic_write_text(folder / "config.json", json.dumps(hf, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(folder)
