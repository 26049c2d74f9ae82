"""minibert.distill on tiny models: a random 2-layer teacher with opinions (H=32, 2 heads) and
students from a preset, from the teacher's layers, or the teacher's whole copy.

Oracles: the loss written out with math.exp / math.log row by row (Hinton et al.'s formula);
the gradient of the soft term against its closed form T/B (softmax(z_s/T) - softmax(z_t/T)) and
its high-temperature limit (z_s - z_t) / (C B); a student that is the teacher's copy, for which
every transfer term is exactly zero; the teacher's own tensors for the layer-subset start.
"""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from minibert import BertConfig, BertForSequenceClassification, Tokenizer
from minibert import augment, distill
from minibert.checkpoint import PRETRAINED_HERE, pretrained_here
from minibert.predict import Classifier
from minibert.toolkit import UserError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WORDS = "the a film movie plot acting story was is it very quite and but great good bad awful".split()


def rows(n: int, seed: int) -> list[tuple[str, str]]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = rnd.sample(WORDS[:14], 4) + [rnd.choice(["great", "good"] if label else ["bad", "awful"])]
        rnd.shuffle(words)
        out.append((" ".join(words), "pos" if label else "neg"))
    return out


def write_tsv(path, data) -> str:
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in data), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    (d / "corpus.txt").write_text(" ".join(WORDS) + "\n", encoding="utf-8")
    tok = Tokenizer.train([d / "corpus.txt"], vocab_size=80, min_frequency=1)
    tok.model_max_length = 32
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64,
                     max_position=64, id2label={0: "neg", 1: "pos"})
    teacher = BertForSequenceClassification(cfg)
    train = rows(32, 0)
    # a teacher with confident predictions that depend on the input: a few full-batch steps on the task
    b = tok.pad([tok.build_inputs(ids, None, 32) for ids in tok.encode_ids([t for t, _ in train])])
    y = torch.tensor([int(label == "pos") for _, label in train])
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(30):
        teacher(b["input_ids"], b["token_type_ids"], b["attention_mask"], labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    teacher.save_pretrained(d / "teacher", tokenizer=tok)
    (d / "more.txt").write_text("\n".join(t for t, _ in rows(16, 5)) + "\n\n", encoding="utf-8")
    return {"dir": d, "teacher": str(d / "teacher"), "train": write_tsv(d / "train.tsv", train),
            "dev": write_tsv(d / "dev.tsv", rows(24, 1)), "test": write_tsv(d / "test.tsv", rows(40, 2)),
            "more": str(d / "more.txt")}


def test_the_loss_is_alpha_t2_kl_plus_one_minus_alpha_ce_written_out_by_hand():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(4, 3, dtype=torch.float64), 2 * torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([2, -100, 0, 1])  # the second row is unlabelled: KL only
    T, alpha = 3.0, 0.3
    loss, parts = distill.distillation_loss(z_s, z_t, y, T, alpha)

    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    kl = ce = 0.0
    for i in range(4):
        p_t, p_s = softmax([v / T for v in z_t[i].tolist()]), softmax([v / T for v in z_s[i].tolist()])
        kl += sum(a * math.log(a / b) for a, b in zip(p_t, p_s)) / 4
        if y[i] != -100:
            ce += -math.log(softmax(z_s[i].tolist())[int(y[i])]) / 3
    assert parts["soft"].item() == pytest.approx(kl, rel=1e-5)
    assert parts["hard"].item() == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(alpha * T * T * kl + (1 - alpha) * ce, rel=1e-5)
    none_labelled = distill.distillation_loss(z_s, z_t, torch.full((4,), -100), T, alpha)[1]["hard"]
    assert none_labelled.item() == 0.0


@pytest.mark.parametrize("T", [1.0, 4.0, 500.0])
def test_t_squared_keeps_the_soft_gradient_at_the_size_hinton_derives(T):
    torch.manual_seed(1)
    B, C = 8, 5
    z_t = torch.randn(B, C, dtype=torch.float64)
    z_s = torch.randn(B, C, dtype=torch.float64, requires_grad=True)
    loss, _ = distill.distillation_loss(z_s, z_t, torch.full((B,), -100), T, alpha=1.0)
    (grad,) = torch.autograd.grad(loss, z_s)
    exact = T / B * (torch.softmax(z_s.detach() / T, -1) - torch.softmax(z_t / T, -1))
    torch.testing.assert_close(grad, exact, rtol=1e-4, atol=2e-6)  # the loss is taken in fp32
    if T == 500.0:  # high temperature: (z_s - z_t) / (C B) for zero-mean logits, whatever T is
        centred = lambda z: z - z.mean(-1, keepdim=True)  # noqa: E731
        limit = (centred(z_s.detach()) - centred(z_t)) / (C * B)
        torch.testing.assert_close(grad, limit, rtol=0.05, atol=2e-4)


def test_attention_kl_and_hidden_mse_average_over_real_tokens_only_written_out_by_hand():
    torch.manual_seed(3)
    B, nh, T, H = 2, 3, 4, 5
    keep = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # the second row: two padding tokens
    bias = (1 - keep[:, None, None, :].double()) * -1e9  # padding keys get probability 0
    a_t = (torch.randn(B, nh, T, T, dtype=torch.float64) + bias).softmax(-1)
    a_s = (torch.randn(B, nh, T, T, dtype=torch.float64) + bias).softmax(-1)
    total, n = 0.0, 0
    for b in range(B):
        for h in range(nh):
            for i in range(T):
                if keep[b, i]:
                    total += sum(p * math.log(p / q) for p, q in zip(a_t[b, h, i].tolist(), a_s[b, h, i].tolist())
                                 if p > 0)
                    n += 1
    assert distill.attention_kl(a_s, a_t, keep).item() == pytest.approx(total / n, rel=1e-5)
    h_s, h_t = torch.randn(B, T, H), torch.randn(B, T, H)
    rows_kept = [(b, i) for b in range(B) for i in range(T) if keep[b, i]]
    mse = sum(((h_s[b, i] - h_t[b, i]) ** 2).sum().item() for b, i in rows_kept) / (len(rows_kept) * H)
    assert distill.hidden_mse(h_s, h_t, keep).item() == pytest.approx(mse, rel=1e-5)


def test_a_student_of_the_teachers_layers_starts_with_exactly_those_tensors(tmp_path):
    torch.manual_seed(2)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64, max_position=32,
                     heads_per_layer=[4, 2, 3, 1], intermediate_per_layer=[64, 10, 20, 30])
    teacher = BertForSequenceClassification(cfg)
    student = distill.student_from_teacher_layers(teacher, [1, 3])
    assert student.config.num_layers == 2
    assert student.config.heads_per_layer == [2, 1] and student.config.intermediate_per_layer == [10, 30]
    t, s = teacher.state_dict(), student.state_dict()
    for name, v in s.items():
        for i, j in ((0, 1), (1, 3)):
            name = name.replace(f"encoder.layers.{i}.", f"encoder.layers.@{j}.")
        assert torch.equal(v, t[name.replace("@", "")]), name
    assert not torch.equal(s["bert.encoder.layers.0.attn.q.weight"][:8], t["bert.encoder.layers.0.attn.q.weight"][:8])
    student.save_pretrained(tmp_path / "s")  # and it is a model folder like any other
    assert BertForSequenceClassification.from_pretrained(tmp_path / "s").config == student.config


def test_every_transfer_term_is_zero_for_a_student_that_copies_the_whole_teacher(env):
    teacher = Classifier(env["teacher"])
    student = distill.student_from_teacher_layers(teacher.model, [0, 1, 2]).eval()
    cfg = distill.DistillConfig(hidden_weight=1.0, attention_weight=1.0, temperature=2.0, alpha=1.0)
    d = distill.Distiller(cfg, teacher, student, [(0, 0), (1, 1), (2, 2)])
    student.eval()
    b = teacher.inputs.collate(teacher.inputs.encode([t for t, _ in rows(4, 7)]))
    loss, parts = d.loss(b, b, torch.full((4,), -100))
    assert d.proj is None  # same width: no projection
    for k in ("soft", "hidden", "attention"):
        assert parts[k].item() == pytest.approx(0.0, abs=1e-6), k


def test_cached_teacher_logits_and_a_packed_student_give_the_per_step_padded_loss(env):
    # the training loop's shortcuts (teacher logits computed once; student batches packed) against
    # the plain path: the teacher run on each padded batch, the student on the same padded batch
    teacher = Classifier(env["teacher"])
    student = distill.student_from_teacher_layers(teacher.model, [2, 0]).eval()  # eval: no dropout draws
    cfg = distill.DistillConfig(temperature=3.0, alpha=0.7)
    d = distill.Distiller(cfg, teacher, student, [(0, 2), (1, 0)])
    texts = [t for t, _ in rows(12, 9)] + ["good", "the film was very quite awful and the plot bad"]
    items = teacher.inputs.encode(texts)
    y = torch.tensor([0, 1] * 6 + [-100, 1])
    plain, _ = d.loss(teacher.inputs.collate(items), teacher.inputs.collate(items), y)
    cached = distill.score_items(teacher.model, teacher.inputs, items, 5, torch.device("cpu"))  # (N, C)
    packed = distill.PackedInputs(teacher.tok, 32).collate(items)
    assert packed["input_ids"].shape[0] < len(texts)  # really packed: fewer rows than texts
    fast, _ = d.loss(packed, cached, y, packed=True)
    assert fast.item() == pytest.approx(plain.item(), rel=1e-5, abs=1e-6)
    # alpha = 0 needs no teacher at all: the loss is the cross-entropy over the labelled rows
    d0 = distill.Distiller(distill.DistillConfig(alpha=0.0), teacher, student, [(0, 2), (1, 0)])
    labels_only, parts = d0.loss(packed, None, y, packed=True)
    s_logits = student(**{k: teacher.inputs.collate(items)[k] for k in ("input_ids", "token_type_ids",
                                                                           "attention_mask")}).logits
    ce = torch.nn.functional.cross_entropy(s_logits[y != -100], y[y != -100])
    assert labels_only.item() == pytest.approx(ce.item(), rel=1e-5) and parts["soft"].item() == 0.0


def test_a_packed_run_trains_on_cached_teacher_logits(env):
    m = run(env, "packed", "--student", "teacher-layers:1", "--pack", "--epochs", "2", "--lr", "1e-3",
            "--test", env["test"])
    assert m["train"]["steps"] == 8  # 32 rows / batch 8, two epochs
    student, teacher = Classifier(env["dir"] / "packed"), Classifier(env["teacher"])
    assert student.model.config.num_layers == 1
    # --test scores the saved student and the teacher: the accuracies predict gives, counted by hand
    texts, y = [t for t, _ in rows(40, 2)], torch.tensor([int(label == "pos") for _, label in rows(40, 2)])
    s_pred, t_pred = student.scores(texts).argmax(-1), teacher.scores(texts).argmax(-1)
    assert m["test"]["accuracy"] == pytest.approx((s_pred == y).float().mean().item())
    assert m["teacher_test"]["accuracy"] == pytest.approx((t_pred == y).float().mean().item())
    assert m["test"]["agreement"] == pytest.approx((s_pred == t_pred).float().mean().item())


def run(env, out, *extra):
    argv = ["--teacher", env["teacher"], "--train", env["train"], "--dev", env["dev"], "--out", str(env["dir"] / out),
            "--batch-size", "8", "--threads", "1", "--log-every", "2", "--no-progress", *extra]
    assert distill.main(argv) == 0
    return json.loads((env["dir"] / out / "metrics.json").read_text())


def test_eval_every_checks_dev_between_passes_and_keeps_the_best_student(env):
    m = run(env, "every", "--student", "tiny", "--epochs", "2", "--lr", "1e-3", "--eval-every", "3")
    logged = [json.loads(line) for line in (env["dir"] / "every" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["dev_accuracy"] for r in logged if r["kind"] == "eval"}
    assert sorted(evals) == [0, 3, 6, 8]  # 32 rows / batch 8 = 4 steps a pass; every 3 steps, and the last
    best_step = m["train"]["best_step"]
    assert evals[best_step] == max(evals[s] for s in (3, 6, 8)) and m["dev"]["accuracy"] == evals[best_step]
    # the saved student is the kept one: its dev accuracy, recomputed from the folder, is the best's
    dev = rows(24, 1)
    pred = Classifier(env["dir"] / "every").scores([t for t, _ in dev]).argmax(-1)
    y = torch.tensor([int(label == "pos") for _, label in dev])
    assert (pred == y).float().mean().item() == pytest.approx(evals[best_step])


def test_a_random_student_imitates_the_teacher_better_after_a_few_steps(env):
    m = run(env, "preset", "--student", "tiny", "--unlabeled", env["more"], "--epochs", "4", "--lr", "1e-3",
            "--alpha", "0.8")
    assert m["dev"]["kl_to_teacher"] < m["dev_step0"]["kl_to_teacher"]
    assert m["dev"]["agreement"] > m["dev_step0"]["agreement"]
    student = Classifier(env["dir"] / "preset")  # a plain classifier folder, the teacher's tokenizer
    assert student.model.config.hidden_size == 128
    assert student.tok.encode_ids(WORDS) == Classifier(env["teacher"]).tok.encode_ids(WORDS)
    logged = [json.loads(line) for line in (env["dir"] / "preset" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" and "soft" in r and "hard" in r for r in logged)


def test_a_student_not_taken_from_a_published_checkpoint_is_marked_for_finetunes_schedule(env):
    # checkpoint.pretrained_here picks finetune's schedule: a preset's random start, or the layers of a
    # teacher that was itself pretrained here, is no published pretraining; a published teacher's layers are
    marked = env["dir"] / "marked-teacher"
    shutil.copytree(env["teacher"], marked)
    (marked / PRETRAINED_HERE).write_text(json.dumps({"short_pretraining": True}), encoding="utf-8")
    layers = ("--student", "teacher-layers:0,2", "--epochs", "1")
    run(env, "mark-preset", "--student", "tiny", "--epochs", "1")
    run(env, "mark-layers", *layers)
    run({**env, "teacher": str(marked)}, "mark-layers-here", *layers)
    starts = {}
    for out in ("mark-preset", "mark-layers", "mark-layers-here"):
        f = env["dir"] / out / "model" / PRETRAINED_HERE
        starts[out] = json.loads(f.read_text())["start"] if f.exists() else None
        assert pretrained_here(env["dir"] / out) == (starts[out] is not None)
    assert starts == {"mark-preset": "random", "mark-layers": None, "mark-layers-here": "here"}


def test_hidden_and_attention_transfer_train_through_a_projection_that_is_not_saved(env):
    m = run(env, "inner", "--student", "tiny", "--epochs", "1", "--hidden-weight", "1", "--attention-weight", "1",
            "--lr", "1e-3")
    logged = [json.loads(line) for line in (env["dir"] / "inner" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["kind"] == "train"]
    assert train and all(r["hidden"] > 0 and r["attention"] > 0 for r in train)
    loaded = Classifier(env["dir"] / "inner")  # no projection among its tensors, nothing newly initialised
    assert loaded.model.load_report == {"initialised": [], "discarded": []}
    assert m["train"]["steps"] == 4


def test_augmented_copies_join_the_transfer_set_unlabelled(env):
    log = []
    cfg = distill.DistillConfig(teacher=env["teacher"], student="tiny", train=env["train"], out=str(env["dir"] / "aug"),
                                augment=2, epochs=1, batch_size=8, threads=1, progress=False)
    m = distill.run(cfg, log=log.append)
    n_aug = len(augment.augment([t for t, _ in rows(32, 0)], 2, seed=0))
    assert 32 < n_aug <= 64
    assert any(f"transfer set {32 + n_aug:,} texts ({n_aug:,} unlabelled)" in line for line in log), log
    assert m["train"]["steps"] == math.ceil((32 + n_aug) / 8)


def test_the_teacher_cache_is_reused_only_for_the_same_teacher_and_texts(env):
    cache = env["dir"] / "logits.safetensors"

    def go(out, **extra):
        log = []
        cfg = distill.DistillConfig(teacher=env["teacher"], student="teacher-layers:1", train=env["train"],
                                    unlabeled=env["more"], out=str(env["dir"] / out), teacher_cache=str(cache),
                                    epochs=1, batch_size=8, lr=1e-3, threads=1, progress=False, **extra)
        return distill.run(cfg, log=log.append), log

    m1, log1 = go("c1")
    assert any("written to" in line for line in log1), log1
    # the file holds what predict's Classifier gives for the transfer set (training rows, then unlabelled)
    from safetensors.torch import load_file
    texts = [t for t, _ in rows(32, 0)] + [t for t, _ in rows(16, 5)]
    torch.testing.assert_close(load_file(cache)["logits"], Classifier(env["teacher"]).scores(texts),
                               rtol=0, atol=1e-5)
    m2, log2 = go("c2")  # read back: the same logits, so the same training to the last bit
    assert any("read from" in line for line in log2) and not any("written" in line for line in log2), log2
    assert m2["dev"] == m1["dev"] and m2["train"]["steps"] == m1["train"]["steps"]
    _, log3 = go("c3", augment=1)  # other texts: recomputed, not silently reused
    assert any("made for another teacher, transfer set or precision" in line for line in log3), log3
    # a file that is not a cache the command wrote (cut short, or the user's data named by mistake)
    # stops the run and is left as it was: the cache is a shortcut, not a licence to write over files
    for foreign in (cache.read_bytes()[:40], Path(env["train"]).read_bytes()):
        cache.write_bytes(foreign)
        with pytest.raises(UserError, match="the file exists and is not a teacher cache"):
            go("c4", augment=1)
        assert cache.read_bytes() == foreign
    cache.unlink()
    _, log4 = go("c4", augment=1)
    assert any("written to" in line for line in log4), log4


@pytest.mark.parametrize("extra, words", [
    (["--student", "huge"], "not a preset"),
    (["--student", "teacher-layers:0,7"], "the teacher has layers 0..2"),
    (["--student", "teacher-layers:0", "--attention-weight", "1", "--layer-map", "0:5"], "--layer-map 0:5"),
    (["--student", "small", "--attention-weight", "1"], "heads"),
    (["--student", "tiny", "--alpha", "2"], "--alpha in [0, 1]"),
    (["--student", "tiny", "--pack", "--hidden-weight", "1"], "--pack compares logits only"),
    (["--student", "tiny", "--alpha", "0", "--augment", "2"], "--alpha 0 trains on the labels alone"),
    (["--student", "tiny", "--augment", "-1"], "--augment must be >= 0"),
    (["--student", "tiny", "--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--student", "tiny", "--hidden-weight", "1", "--teacher-cache", "x"], "nothing to cache"),
    (["--student", "tiny", "--epochs", "0"], "need --epochs > 0"),
    (["--student", "tiny", "--max-steps", "-1"], "--max-steps >= 0"),
    (["--student", "tiny", "--eval-batch-size", "0"], "--eval-batch-size >= 1"),
    (["--student", "tiny", "--lr", "-1"], "need --lr > 0"),
    (["--student", "tiny", "--warmup", "2"], "--warmup in [0, 1]"),
    (["--student", "tiny", "--max-len", "1"], "--max-len 1: a row needs [CLS], [SEP]"),
])
def test_bad_options_are_one_line_errors(env, capsys, extra, words):
    argv = ["--teacher", env["teacher"], "--train", env["train"], "--out", str(env["dir"] / "bad"), "--threads", "1",
            *extra]
    assert distill.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_unlabelled_text_that_is_not_utf8_stops_unless_errors_replace(env, capsys):
    """--unlabeled in Latin-1: a one-line error that names the flag that reads it, and with that flag
    the text joins the transfer set (a BOM at its start is dropped, not kept as a character)."""
    latin = env["dir"] / "latin1.txt"
    latin.write_bytes(b"\xef\xbb\xbf" + "un film superbe\nun caf\u00e9 triste\n".encode("latin-1"))
    argv = ["--teacher", env["teacher"], "--train", env["train"], "--out", str(env["dir"] / "latin"), "--threads", "1",
            "--student", "tiny", "--unlabeled", str(latin), "--max-steps", "1", "--no-progress"]
    assert distill.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert f"--unlabeled {latin}: not UTF-8 text" in err and "--errors replace" in err and len(err.splitlines()) == 1
    assert distill.read_unlabeled(str(latin), "replace") == ["un film superbe", "un caf\ufffd triste"]
    assert distill.main(argv + ["--errors", "replace"]) == 0
