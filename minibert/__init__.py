"""minibert: BERT written from scratch in PyTorch. See README.md and chapters/."""

from .checkpoint import CheckpointError
from .model import (
    PRESETS,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from .tokenizer import Tokenizer

__all__ = [
    "PRESETS",
    "BertConfig",
    "BertModel",
    "BertForPreTraining",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "Tokenizer",
    "CheckpointError",
]
__version__ = "0.1.0"
