"""The Python API in the model's terms: how to run is chosen at construction or by
set_backend (never by editing the config), and a bad input is a ValueError that names
the input, the wrong value or shape, and what is allowed -- not an index error from
inside torch. Oracles: the plain model's own outputs, and the sizes in the config."""

import pytest
import torch

from minibert import (
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from minibert.model import ATTN_IMPLS, FeedForward, MultiHeadAttention


def backends(model):
    attn = {m.attn_impl for m in model.modules() if isinstance(m, MultiHeadAttention)}
    fused = {m.fused_kernels for m in model.modules() if isinstance(m, FeedForward)}
    return attn, fused


def test_set_backend_switches_every_layer_and_keeps_the_outputs(tiny_config):
    torch.manual_seed(0)
    m = BertForPreTraining(tiny_config(attn_impl="math")).eval()
    ids = torch.randint(5, 97, (2, 9))
    before = m(ids).mlm_logits
    assert m.set_backend(attn_impl="sdpa", fused_kernels=True) is m
    assert backends(m) == ({"sdpa"}, {True}) and m.fused_kernels and m.bert.attn_impl == "sdpa"
    torch.testing.assert_close(m(ids).mlm_logits, before, atol=1e-5, rtol=1e-5)
    m.set_backend(fused_kernels=False)  # None leaves the other one as it is
    assert backends(m) == ({"sdpa"}, {False})
    with pytest.raises(ValueError, match="attn_impl must be one of math, sdpa"):
        m.set_backend(attn_impl="fast")


def test_modules_copy_the_backend_when_built_so_editing_the_config_changes_nothing(tiny_config):
    m = BertModel(tiny_config(attn_impl="math"))
    m.config.attn_impl = "sdpa"
    assert backends(m)[0] == {"math"}


def test_from_pretrained_chooses_how_to_run_and_does_not_save_it(tmp_path, tiny_config):
    BertForSequenceClassification(tiny_config(attn_impl="math", fused_kernels=True)).save_pretrained(tmp_path)
    assert "attn_impl" not in (tmp_path / "config.json").read_text()
    m = BertForSequenceClassification.from_pretrained(tmp_path, attn_impl="flex", fused_kernels=True)
    assert backends(m) == ({"flex"}, {True})
    assert backends(BertForSequenceClassification.from_pretrained(tmp_path))[0] == {"sdpa"}  # the default
    assert set(ATTN_IMPLS) >= {"math", "sdpa", "flex", "triton"}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(input_ids=torch.tensor([[2, 97, 3]])), r"input_ids holds 97; allowed values are 0\.\.96 \(vocab_size\)"),
        (dict(input_ids=torch.tensor([[2, -1, 3]])), r"input_ids holds -1; allowed values are 0\.\.96"),
        (dict(input_ids=torch.tensor([[2.0, 5.0, 3.0]])), r"input_ids must hold integers, got dtype torch.float32"),
        (dict(input_ids=torch.tensor([2, 5, 3])), r"input_ids must be \(B, T\) = \(batch, tokens\), got shape \(3,\)"),
        (dict(input_ids=torch.ones(1, 65, dtype=torch.long)), r"sequence length 65 exceeds max_position 64"),
        (dict(attention_mask=torch.ones(1, 4)),
         r"attention_mask has shape \(1, 4\); it must be \(1, 3\) or \(1, 3, 3\)"),
        (dict(token_type_ids=torch.zeros(2, 3, dtype=torch.long)),
         r"token_type_ids has shape \(2, 3\); it must be \(1, 3\)"),
        (dict(token_type_ids=torch.tensor([[0, 1, 2]])),
         r"token_type_ids holds 2; allowed values are 0\.\.1 \(type_vocab"),
        (dict(token_type_ids=torch.tensor([[0.0, 1.0, 1.0]])), r"token_type_ids must hold integers"),
    ],
)
def test_bad_inputs_are_named_in_the_models_terms(change, message, tiny_config):
    m = BertModel(tiny_config())
    batch = dict(input_ids=torch.tensor([[2, 5, 3]]), attention_mask=None, token_type_ids=None)
    m(**batch)  # the unchanged batch is fine
    with pytest.raises(ValueError, match=message):
        m(**{**batch, **change})


def test_bad_labels_are_named_in_the_models_terms(tiny_config):
    ids = torch.tensor([[2, 5, 3], [2, 6, 3]])
    pre, mlm = BertForPreTraining(tiny_config()), BertForMaskedLM(tiny_config())
    with pytest.raises(ValueError, match=r"labels has shape \(2, 4\); it must be \(2, 3\)"):
        pre(ids, labels=torch.full((2, 4), -100))
    with pytest.raises(ValueError, match=r"labels holds 97; allowed values are 0\.\.96 \(vocab_size\) or -100 \(no"):
        mlm(ids, labels=torch.tensor([[-100, 97, -100], [-100, 5, -100]]))
    with pytest.raises(ValueError, match=r"labels must hold integers"):
        mlm(ids, labels=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"next_sentence_label holds 2; allowed values are 0\.\.1"):
        pre(ids, labels=torch.full((2, 3), -100), next_sentence_label=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"next_sentence_label has shape \(3,\); it must be \(2,\)"):
        pre(ids, labels=torch.full((2, 3), -100), next_sentence_label=torch.tensor([0, 1, 1]))
    clf = BertForSequenceClassification(tiny_config(num_labels=3))
    with pytest.raises(ValueError, match=r"labels holds 3; allowed values are 0\.\.2 \(num_labels\)"):
        clf(ids, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels has shape \(2, 3\); it must be \(2,\)"):
        clf(ids, labels=torch.zeros(2, 3, dtype=torch.long))
    BertForSequenceClassification(tiny_config(num_labels=1))(ids, labels=torch.tensor([0.5, 2.0]))  # regression: floats
    tag = BertForTokenClassification(tiny_config(num_labels=5))
    with pytest.raises(ValueError, match=r"labels holds 5; allowed values are 0\.\.4 \(num_labels\) or -100"):
        tag(ids, labels=torch.tensor([[-100, 5, -100], [-100, 1, -100]]))


def test_value_checks_are_skipped_inside_torch_compile(tiny_config, monkeypatch):
    # A value check needs the values on the host (a device sync) and a data-dependent branch,
    # which would break a compiled graph; shape checks are free and always run.
    m = BertModel(tiny_config())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(IndexError):  # what torch says without the check
        m(torch.tensor([[2, 97, 3]]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        m(torch.tensor([[2, 5, 3]]), attention_mask=torch.ones(1, 4))
