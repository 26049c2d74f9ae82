"""transformers' BERT with a minibert config: the reference `python -m minibert.bench --compare-hf`
times beside minibert. It lives here, outside the package, because minibert never imports
transformers (an optional test/bench extra: pip install -e ".[test]")."""

from __future__ import annotations

import transformers
from torch import nn

from minibert.model import BertConfig


def hf_models(cfg: BertConfig) -> tuple[nn.Module, nn.Module]:
    """transformers' BertForPreTraining and BertModel with our config (SDPA attention, same dropout)."""
    if cfg.position_embedding != "learned" or cfg.norm_position != "post":
        raise ValueError("--compare-hf needs BERT's own architecture (learned positions, post-LN)")
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",  # the exact erf GELU, as ours
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position,
        type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.initializer_range,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id,
        attn_implementation="sdpa",  # its fastest attention available on CPU and GPU without extras
    )
    # no pooler on the encoder: our BertModel.forward does not compute it either
    return transformers.BertForPreTraining(hf_cfg), transformers.BertModel(hf_cfg, add_pooling_layer=False)


class HFForward(nn.Module):
    """transformers' model behind the signature `python -m minibert.bench --deploy` calls every row
    with: (input_ids, attention_mask, token_type_ids) -> one tensor (logits, or hidden states)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def hf_pretrained(folder: str, task: str) -> nn.Module:
    """transformers reading a model folder minibert wrote (or any BERT folder): its
    BertForSequenceClassification for task "classifier", else its BertModel without the pooler."""
    transformers.logging.set_verbosity_error()  # its table of the weights it leaves out (the pooler)
    transformers.logging.disable_progress_bar()  # one per folder loaded
    if task == "classifier":
        model = transformers.BertForSequenceClassification.from_pretrained(folder, attn_implementation="sdpa")
    else:
        model = transformers.BertModel.from_pretrained(folder, attn_implementation="sdpa", add_pooling_layer=False)
    return HFForward(model.eval()).eval()
