"""The fine-tuning building blocks, each against a direct computation:
LoRA merge == unmerged and only adapters train, freezing, FGM restores the embeddings,
InfoNCE against a hand-written loop, prompt scores == the verbalizer-token logits."""

import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minibert import BertConfig, BertForMaskedLM, BertForSequenceClassification, Tokenizer
from minibert.strategies import (
    FGM,
    PGD,
    FreeLB,
    LoRALinear,
    PackedPrompt,
    Prompt,
    Verbalizer,
    add_lora,
    freeze_bottom,
    info_nce,
    merge_lora,
    prompt_scores,
    sentence_repr,
)
from minibert.toolkit import UserError

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and a crowded machine punishes more); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WORDS = "the a film movie plot acting was is great terrible good bad very not it story".split()


def tiny_cfg(**kw) -> BertConfig:
    base = dict(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, max_position=64,
                dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return BertConfig(**base)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "words.txt"
        f.write_text(" ".join(WORDS * 3) + "\nit was great . it was terrible .\n", encoding="utf-8")
        return Tokenizer.train([f], vocab_size=200, min_frequency=1)


def batch(B=4, T=9, V=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


# --- LoRA ---------------------------------------------------------------------


def test_lora_starts_as_identity_and_merge_is_exact():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    lora = LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(3, 5, 16)
    assert torch.equal(lora(x), base(x))  # B = 0 at the start
    with torch.no_grad():
        lora.lora_B.normal_()
    merged = lora.merged()
    assert isinstance(merged, torch.nn.Linear)
    torch.testing.assert_close(merged(x), lora(x), rtol=1e-5, atol=1e-5)
    # the update really is (alpha / r) B A
    torch.testing.assert_close(merged.weight - base.weight, (lora.lora_B @ lora.lora_A) * 2.0)


def test_lora_model_merge_gives_identical_outputs_and_plain_keys():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_cfg())
    plain_keys = set(model.state_dict())
    n = add_lora(model.bert, rank=2, alpha=4.0)
    assert n == 3 * 4 * (2 * 32 + 32 * 2)  # layers x projections x (A + B)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    ids, mask = batch()
    model.eval()
    before = model(ids, None, mask).logits
    merge_lora(model)
    assert set(model.state_dict()) == plain_keys
    torch.testing.assert_close(model(ids, None, mask).logits, before, rtol=1e-5, atol=1e-5)


def test_lora_only_adapters_and_head_get_gradients():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_cfg())
    add_lora(model.bert, rank=2, alpha=4.0)
    ids, mask = batch()
    F.cross_entropy(model(ids, None, mask).logits, torch.tensor([0, 1, 0, 1])).backward()
    for name, p in model.named_parameters():
        trainable = "lora_" in name or name.startswith("classifier.")
        assert p.requires_grad == trainable, name
        assert (p.grad is not None) == trainable, name
        if "lora_A" in name:  # B starts at 0, so only the B side has a gradient at step 0
            assert torch.count_nonzero(p.grad) == 0
        if "lora_B" in name:
            assert torch.count_nonzero(p.grad) > 0


# --- freezing -------------------------------------------------------------------


def test_freeze_bottom_k_and_all():
    model = BertForSequenceClassification(tiny_cfg())
    freeze_bottom(model.bert, 2)
    for name, p in model.named_parameters():
        frozen = name.startswith(("bert.embeddings.", "bert.encoder.layers.0.", "bert.encoder.layers.1."))
        assert p.requires_grad != frozen, name
    model = BertForSequenceClassification(tiny_cfg())
    freeze_bottom(model.bert, "all")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]
    with pytest.raises(UserError, match="0..3"):
        freeze_bottom(BertForSequenceClassification(tiny_cfg()).bert, 4)


# --- FGM ------------------------------------------------------------------------


def test_fgm_perturbs_along_the_gradient_and_restores():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_cfg())
    emb = model.bert.embeddings.tok
    original = emb.weight.detach().clone()
    ids, mask = batch()
    y = torch.tensor([0, 1, 0, 1])
    F.cross_entropy(model(ids, None, mask).logits, y).backward()
    g = emb.weight.grad.clone()
    fgm = FGM(emb, epsilon=0.5)
    assert fgm.attack()
    delta = emb.weight.detach() - original
    torch.testing.assert_close(delta, 0.5 * g / g.norm())
    assert torch.linalg.vector_norm(delta).item() == pytest.approx(0.5, rel=1e-5)
    unused = sorted(set(range(64)) - set(ids.flatten().tolist()))
    assert torch.equal(delta[unused], torch.zeros_like(delta[unused]))  # only the batch's tokens move
    F.cross_entropy(model(ids, None, mask).logits, y).backward()  # the adversarial pass
    fgm.restore()
    assert torch.equal(emb.weight.detach(), original)
    assert not torch.equal(emb.weight.grad, g)  # the adversarial gradient was added


def test_fgm_needs_a_gradient():
    emb = torch.nn.Embedding(10, 4)
    with pytest.raises(RuntimeError, match="backward"):
        FGM(emb, 1.0).attack()


def _grads_after(adversary_factory, seed=0):
    """Clean backward, then the adversary's run: every parameter's gradient, and the embeddings after."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_cfg())
    ids, mask = batch()
    y = torch.tensor([0, 1, 0, 1])
    loss_fn = lambda: F.cross_entropy(model(ids, None, mask).logits, y)  # noqa: E731
    loss_fn().backward()
    emb = model.bert.embeddings.tok
    before = emb.weight.detach().clone()
    adversary_factory(emb, list(model.parameters())).run(loss_fn)
    assert torch.equal(emb.weight.detach(), before)  # restored
    return {n: p.grad.clone() for n, p in model.named_parameters()}, model, loss_fn


def test_pgd_with_one_step_is_fgm():
    fgm, _, _ = _grads_after(lambda e, ps: FGM(e, 0.5))
    pgd, _, _ = _grads_after(lambda e, ps: PGD(e, 0.5, steps=1, params=ps))
    for k in fgm:
        torch.testing.assert_close(pgd[k], fgm[k])


def _passes_by_hand(model, loss_fn, epsilon: float, steps: int) -> list[dict]:
    """PGD's steps written out: each along the gradient at the point reached, of length 2 epsilon / K,
    projected onto the ball. Returns every parameter's gradient at each point, the clean one first."""
    model.zero_grad()
    loss_fn().backward()
    params = dict(model.named_parameters())
    passes = [{n: p.grad.clone() for n, p in params.items()}]
    w = model.bert.embeddings.tok.weight
    e0 = w.detach().clone()
    g = w.grad.clone()
    for _ in range(steps):
        with torch.no_grad():
            r = w + (2 * epsilon / steps) * g / g.norm() - e0
            w.copy_(e0 + r * min(1.0, epsilon / r.norm().item()))
        assert torch.linalg.vector_norm(w.detach() - e0).item() <= epsilon + 1e-6
        model.zero_grad()
        loss_fn().backward()
        g = w.grad.clone()
        passes.append({n: p.grad.clone() for n, p in params.items()})
    with torch.no_grad():
        w.copy_(e0)
    return passes


def test_pgd_steps_stay_in_the_ball_and_keep_clean_plus_last_gradient():
    got, model, loss_fn = _grads_after(lambda e, ps: PGD(e, 0.3, steps=3, params=ps))
    passes = _passes_by_hand(model, loss_fn, 0.3, 3)
    clean, last = passes[0], passes[-1]
    for k in got:
        torch.testing.assert_close(got[k], clean[k] + last[k])
    assert not torch.allclose(last["classifier.weight"], clean["classifier.weight"])  # the passes differed


def test_freelb_averages_the_gradients_of_every_point_pgd_visits():
    """The step's gradient is the mean over the clean pass and all three perturbed ones, where PGD
    keeps the clean one and the last."""
    got, model, loss_fn = _grads_after(lambda e, ps: FreeLB(e, 0.3, steps=3, params=ps))
    passes = _passes_by_hand(model, loss_fn, 0.3, 3)
    for k in got:
        torch.testing.assert_close(got[k], sum(p[k] for p in passes) / 4)
    pgd, _, _ = _grads_after(lambda e, ps: PGD(e, 0.3, steps=3, params=ps))
    assert not torch.allclose(pgd["classifier.weight"], 2 * got["classifier.weight"])  # not PGD's two passes
    fgm, _, _ = _grads_after(lambda e, ps: FGM(e, 0.3))
    one, _, _ = _grads_after(lambda e, ps: FreeLB(e, 0.3, steps=1, params=ps))
    for k in fgm:  # one step: the clean and the FGM pass, averaged instead of added
        torch.testing.assert_close(one[k], fgm[k] / 2)


# --- InfoNCE --------------------------------------------------------------------


def test_info_nce_matches_a_hand_computed_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    tau = 0.1

    def cos(u, v):
        u, v = u.tolist(), v.tolist()
        return sum(x * y for x, y in zip(u, v)) / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))

    B = 5
    s = [[cos(a[i], b[j]) / tau for j in range(B)] for i in range(B)]
    a_to_b = sum(-(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(B)))) for i in range(B)) / B
    b_to_a = sum(-(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(B)))) for j in range(B)) / B
    assert info_nce(a, b, tau).item() == pytest.approx(0.5 * (a_to_b + b_to_a), rel=1e-5)
    # aligned views score lower than unrelated ones
    assert info_nce(a, a, tau) < info_nce(a, b, tau)


def test_sentence_repr_mean_ignores_padding():
    h = torch.arange(2 * 3 * 2, dtype=torch.float).view(2, 3, 2)  # (B, T, H)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(sentence_repr(h, mask, "mean"), torch.stack([h[0].mean(0), h[1, 0]]))
    torch.testing.assert_close(sentence_repr(h, mask, "cls"), h[:, 0])


# --- prompts --------------------------------------------------------------------


def test_prompt_scores_equal_direct_verbalizer_logits(tok):
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_cfg(vocab_size=tok.vocab_size)).eval()
    verb = Verbalizer.parse("0:terrible,1:great", ["0", "1"], tok)
    prompt = Prompt("{text} it was [MASK] .", verb, tok, max_len=32)
    texts = ["the film was good", "a very bad plot", "the acting is not great", "story"]
    with torch.no_grad():
        scores = prompt.scores(mlm, prompt.collate(prompt.encode(texts)))  # (B, C)
        direct = []
        for t in texts:
            ids = ([tok.cls_id] + tok.encode_ids([t])[0] + tok.encode_ids(["it was"])[0] + [tok.mask_id]
                   + tok.encode_ids(["."])[0] + [tok.sep_id])
            logits = mlm(torch.tensor([ids])).logits[0, ids.index(tok.mask_id)]  # (V,)
            direct.append(logits[[tok.token_to_id("terrible"), tok.token_to_id("great")]])
        direct = torch.stack(direct)  # (B, 2)
    assert torch.equal(scores.argmax(-1), direct.argmax(-1))
    # log-softmax shifts every class by the same constant, so the differences agree too
    torch.testing.assert_close(scores[:, 1] - scores[:, 0], direct[:, 1] - direct[:, 0], rtol=1e-4, atol=1e-4)


def test_prompt_multi_piece_and_alternative_words(tok):
    verb = Verbalizer.parse("neg:terrible|very bad,pos:great", ["neg", "pos"], tok)
    assert verb.mask_counts == [1, 2]
    assert verb.spec == "neg:terrible|very bad,pos:great"
    prompt = Prompt("{text} it was [MASK] .", verb, tok, max_len=12)
    items = prompt.encode(["the film was good and the story was good and the plot was good"])
    for n, (ids, at) in items[0].items():
        assert len(ids) <= 12 and ids[at : at + n] == [tok.mask_id] * n and ids[-1] == tok.sep_id
    # scores by hand for one row: mean of word-piece log-probs, then mean over a label's words
    g = torch.Generator().manual_seed(0)
    logits = {1: torch.randn(1, 1, tok.vocab_size, generator=g), 2: torch.randn(1, 2, tok.vocab_size, generator=g)}
    s = prompt_scores(logits, verb)
    lp1, lp2 = logits[1].log_softmax(-1)[0], logits[2].log_softmax(-1)[0]
    very, bad = tok.token_to_id("very"), tok.token_to_id("bad")
    neg = 0.5 * (lp1[0, tok.token_to_id("terrible")] + 0.5 * (lp2[0, very] + lp2[1, bad]))
    torch.testing.assert_close(s[0], torch.stack([neg, lp1[0, tok.token_to_id("great")]]))


def test_packed_prompts_score_like_padded_ones(tok):
    """--pack with --strategy prompt: the prompts share rows, each with its own positions and
    attention block, so every class score is the padded batch's; a two-piece word checks that
    the n consecutive [MASK]s are found in the packed rows too."""
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_cfg(vocab_size=tok.vocab_size)).eval()
    verb = Verbalizer.parse("0:terrible|very bad,1:great", ["0", "1"], tok)
    texts = ["the film was good", "a very bad plot", "the acting is not great", "story", "it was not a good film",
             "the plot"]
    template = "{text} it was [MASK] ."
    plain, packed = Prompt(template, verb, tok, 24), PackedPrompt(template, verb, tok, 24)
    items = plain.encode(texts)
    batch = packed.collate(items)
    assert all(b["input_ids"].shape[0] < len(texts) for b in batch.values())  # really packed
    with torch.no_grad():
        torch.testing.assert_close(packed.scores(mlm, batch), plain.scores(mlm, plain.collate(items)), rtol=1e-4,
                                   atol=1e-5)


def test_verbalizer_errors(tok):
    with pytest.raises(UserError, match="do not match"):
        Verbalizer.parse("0:terrible", ["0", "1"], tok)
    with pytest.raises(UserError, match="not in the vocabulary"):
        Verbalizer.parse("0:terrible,1:zzzqqq", ["0", "1"], tok)
    with pytest.raises(UserError, match="LABEL:WORD"):
        Verbalizer.parse("terrible,great", ["0", "1"], tok)
    verb = Verbalizer.parse("0:terrible,1:great", ["0", "1"], tok)
    with pytest.raises(UserError, match=r"\[MASK\]"):
        Prompt("{text} it was .", verb, tok, 32)
