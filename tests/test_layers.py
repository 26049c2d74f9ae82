"""Each hand-written piece against an independent implementation: attention vs torch's
SDPA and nn.MultiheadAttention, LayerNorm/GELU/sinusoidal encoding vs their formulas,
and the behaviours whose bugs are silent (loss masks, padding)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

# without a GPU, the fused-kernel test below runs the Triton kernels under Triton's CPU
# interpreter (tests/conftest.py sets this too); on a GPU machine the compiled kernels run
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from minibert import BertConfig, BertForMaskedLM, BertForPreTraining, BertModel
from minibert.kernels.attention import ATTENTION_BACKENDS
from minibert.model import (
    AttentionMask,
    EncoderLayer,
    MultiHeadAttention,
    attention_bias,
    dropout,
    gelu,
    sinusoidal_encoding,
    summed_cross_entropy,
    vocab_cross_entropy,
)


def padded_batch(B=3, T=11, H=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    lengths = torch.tensor([T, 7, 3])[:B]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T)
    return x, mask


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_attention_matches_sdpa_forward_and_grad(impl, tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config(attn_impl=impl, attention_dropout=0.0)
    attn = MultiHeadAttention(cfg)
    x, mask = padded_batch()
    x.requires_grad_(True)
    out, _ = attn(x, AttentionMask(bias=attention_bias(mask, x.dtype)))

    # reference: the same projections, torch's SDPA with a boolean key mask, written independently
    B, T, H = x.shape
    xr = x.detach().clone().requires_grad_(True)

    def heads(t):
        return t.view(B, T, 4, 16).transpose(1, 2)

    q, k, v = (heads(F.linear(xr, lin.weight, lin.bias)) for lin in (attn.q, attn.k, attn.v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool()[:, None, None, :])
    ref = F.linear(y.transpose(1, 2).reshape(B, T, H), attn.o.weight, attn.o.bias)

    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out) * mask[..., None]  # gradients only from real positions
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)


def test_attention_matches_nn_multiheadattention(tiny_config):
    torch.manual_seed(1)
    cfg = tiny_config(attn_impl="math", attention_dropout=0.0)
    attn = MultiHeadAttention(cfg)
    ref = torch.nn.MultiheadAttention(64, 4, batch_first=True, dropout=0.0)
    with torch.no_grad():  # copy our weights into torch's packed in_proj layout
        ref.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        ref.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        ref.out_proj.weight.copy_(attn.o.weight)
        ref.out_proj.bias.copy_(attn.o.bias)
    x, mask = padded_batch()
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    ours, w = attn(x1, AttentionMask(bias=attention_bias(mask, x.dtype)), need_weights=True)
    theirs, w_ref = ref(x2, x2, x2, key_padding_mask=~mask.bool(), need_weights=True, average_attn_weights=False)
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
    # weights (B, nh, T, T): compare the rows of real queries
    torch.testing.assert_close(w.transpose(1, 2)[real], w_ref.transpose(1, 2)[real], atol=1e-6, rtol=1e-5)
    # padded keys get exactly zero probability
    assert w[1, :, :, 7:].abs().max() == 0
    ours[real].sum().backward()
    theirs[real].sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.o.weight.grad, ref.out_proj.weight.grad, atol=1e-5, rtol=1e-5)


def test_attention_weights_rows_sum_to_one_and_scale_is_sqrt_head_size(tiny_config):
    torch.manual_seed(2)
    cfg = tiny_config(attn_impl="math", attention_dropout=0.0)
    attn = MultiHeadAttention(cfg)
    x, _ = padded_batch(B=1, T=5)
    _, w = attn(x, AttentionMask(), need_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 5))
    q = attn.q(x).view(1, 5, 4, 16).transpose(1, 2)
    k = attn.k(x).view(1, 5, 4, 16).transpose(1, 2)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)  # sqrt(16) = 4
    torch.testing.assert_close(w, expected)


def test_layernorm_matches_formula_biased_variance(tiny_config):
    # BERT's LayerNorm uses the biased variance (divide by H); an unbiased one is a silent bug
    torch.manual_seed(3)
    layer = EncoderLayer(tiny_config())
    ln = layer.norm1
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(4, 64) * 3 + 1
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    expected = (x - mu) / torch.sqrt(var + 1e-12) * ln.weight + ln.bias
    torch.testing.assert_close(ln(x), expected, atol=1e-5, rtol=1e-5)
    assert ln.eps == 1e-12


def test_gelu_is_the_exact_erf_form():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    expected = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    torch.testing.assert_close(gelu(x), expected, atol=1e-12, rtol=0)
    tanh_approx = F.gelu(x, approximate="tanh")
    assert (gelu(x) - tanh_approx).abs().max() > 1e-4  # we are not the tanh fit


def test_sinusoidal_encoding_formula():
    pe = sinusoidal_encoding(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / (10000 ** (2 * i / 16))
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    # relative positions are linear maps: PE(pos+k) = R_k PE(pos) for each (sin, cos) pair
    k = 3
    w = 1 / (10000 ** (torch.arange(0, 16, 2) / 16))
    s, c = pe[10, 0::2], pe[10, 1::2]
    rot_s = s * torch.cos(k * w) + c * torch.sin(k * w)
    torch.testing.assert_close(rot_s, pe[10 + k, 0::2], atol=1e-5, rtol=0)


def test_sinusoidal_model_has_no_position_parameters_and_uses_the_table(tiny_config):
    cfg = tiny_config(position_embedding="sinusoidal")
    m = BertModel(cfg)
    assert not any("pos" in n for n, _ in m.named_parameters())
    assert "embeddings.pe" not in m.state_dict()  # a derived buffer, never saved
    torch.testing.assert_close(m.embeddings.position_table(), sinusoidal_encoding(64, 64))


def test_pre_ln_differs_from_post_ln_and_has_final_norm(tiny_config):
    torch.manual_seed(0)
    post = BertModel(tiny_config()).eval()
    torch.manual_seed(0)
    pre = BertModel(tiny_config(norm_position="pre")).eval()
    assert pre.encoder.final_norm is not None and post.encoder.final_norm is None
    ids = torch.randint(5, 97, (2, 9))
    # pre-LN layer: x + Attn(LN(x)) + FFN(LN(.)) -- check one layer against the formula
    layer = pre.encoder.layers[0]
    x = torch.randn(2, 9, 64)
    a, _ = layer.attn(layer.norm1(x), AttentionMask())
    y = x + a
    y = y + layer.ffn(layer.norm2(y))
    torch.testing.assert_close(layer(x, AttentionMask())[0], y)
    assert not torch.allclose(pre(ids), post(ids))


def test_padding_never_changes_real_positions(tiny_config):
    torch.manual_seed(4)
    for impl in ("math", "sdpa"):
        m = BertModel(tiny_config(attn_impl=impl)).eval()
        ids = torch.randint(5, 97, (1, 6))
        short = m(ids, attention_mask=torch.ones_like(ids))
        padded_ids = torch.cat([ids, torch.randint(5, 97, (1, 5))], 1)  # garbage in the padding
        mask = torch.tensor([[1] * 6 + [0] * 5])
        long = m(padded_ids, attention_mask=mask)
        torch.testing.assert_close(long[:, :6], short, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", list(ATTENTION_BACKENDS))
def test_attention_backends_agree_with_math_on_a_whole_model(impl, tiny_config):
    """Values and gradients, with padding. (flex runs eagerly here: the unfused reference
    of the same mask, forward only -- torch has no FlexAttention backward on the CPU.)"""
    grads = impl != "flex"
    torch.manual_seed(5)
    m = BertForPreTraining(tiny_config(attn_impl="math", dropout=0.0, attention_dropout=0.0))
    ids = torch.randint(5, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 3] = 7
    out = []
    for name in ("math", impl):
        m.zero_grad()
        m.set_backend(attn_impl=name)
        with torch.set_grad_enabled(grads):
            o = m(ids, attention_mask=mask, labels=labels, next_sentence_label=torch.tensor([0, 1, 1]))
        if grads:
            o.loss.backward()
        grad = [p.grad.clone() for p in m.parameters()] if grads else []
        out.append((o.mlm_logits.detach(), o.nsp_logits.detach(), grad))
    (a, na, ga), (b, nb, gb) = out
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(na, nb, atol=1e-5, rtol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["math", *ATTENTION_BACKENDS])
def test_packed_rows_equal_separate_sequences(impl, tiny_config):
    """Two sequences packed in one row (doc_ids + restarting positions) give the same
    hidden states as each run alone: the block-diagonal mask lets nothing leak across."""
    torch.manual_seed(8)
    m = BertModel(tiny_config(attn_impl=impl)).eval().requires_grad_(impl != "flex")
    a, b = torch.randint(5, 97, (1, 5)), torch.randint(5, 97, (1, 4))
    packed = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], 1)  # (1, 12) with 3 pads
    doc_ids = torch.tensor([[1] * 5 + [2] * 4 + [0] * 3])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]])
    h = m(packed, doc_ids=doc_ids, position_ids=pos)
    torch.testing.assert_close(h[:, :5], m(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h[:, 5:9], m(b), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [150, 64, 1, 0])
def test_vocab_cross_entropy_matches_torch(N, dtype):
    # model.py's CPU loss for the V-wide MLM logits (64 rows at a time, in fp32) against
    # F.cross_entropy on an fp32 copy: the sum, its gradient and the argmax. N = 150 leaves a
    # partial block; N = 0 (no masked position) must give 0 and a gradient of the right shape.
    g = torch.Generator().manual_seed(N)
    x = (4 * torch.randn(N, 1000, generator=g)).to(dtype).requires_grad_()
    y = torch.randint(0, 1000, (N,), generator=g)
    before = x.detach().clone()
    got, pred = vocab_cross_entropy(x, y)
    (got * 0.5).backward()  # a scale other than 1 reaches the gradient
    got_grad, x.grad = x.grad, None
    exp = F.cross_entropy(x.float(), y, reduction="sum")
    (exp * 0.5).backward()
    assert torch.equal(x.detach(), before)  # the in-place passes work on copies
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-4)
    # bf16: the same fp32 numbers rounded to bf16 (within one rounding); fp32: within float error
    torch.testing.assert_close(got_grad.float(), x.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-6)
    assert torch.equal(pred, x.detach().float().argmax(-1))
    assert pred.requires_grad is False


def test_dropout_keeps_each_element_with_probability_1_minus_p():
    # model.dropout draws the CPU mask 16 bits per element from 64-bit draws. Each of the four
    # lanes of a draw must drop at rate p (a lane left with fewer random bits would not), any two
    # lanes of one draw must drop independently (rate p**2 together), and the kept elements
    # must be scaled so each element keeps its expectation. Bounds: 6 binomial standard errors.
    n, p = 1 << 20, 0.3
    torch.manual_seed(0)
    y = dropout(torch.ones(n), p, True)
    p_eff = round(p * 65536) / 65536
    dropped = (y == 0).view(-1, 4)  # (n/4, 4): the four lanes of each 64-bit draw
    se = math.sqrt(p * (1 - p) / (n / 4))
    for lane in range(4):
        assert abs(dropped[:, lane].float().mean().item() - p) < 6 * se
    for a, b in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)):
        both = (dropped[:, a] & dropped[:, b]).float().mean().item()
        assert abs(both - p * p) < 6 * math.sqrt(p * p * (1 - p * p) / (n / 4)), (a, b)
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p_eff)))
    assert abs(y.mean().item() - 1.0) < 6 * math.sqrt(p / (1 - p) / n)


def test_dropout_follows_torch_generator_and_matches_f_dropout():
    x = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    torch.manual_seed(3)
    a = dropout(x, 0.1, True)
    b = dropout(x, 0.1, True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.1, True), a)  # seeds (and resumed runs) reproduce the masks
    assert not torch.equal(a, b)  # each call draws a new mask
    # eval mode and p = 0: the input itself; the gradient is the mask times the scale
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    a.sum().backward()
    torch.testing.assert_close(x.grad, (a != 0).float() / (1 - round(0.1 * 65536) / 65536))
    # kept elements: what F.dropout gives them (in bf16 the same rounded scale, so equal)
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randn(4096, dtype=dtype)
        ours, theirs = dropout(z, 0.1, True), F.dropout(z, 0.1, True)
        both = (ours != 0) & (theirs != 0)
        torch.testing.assert_close(ours[both], theirs[both], rtol=1e-4, atol=0)


def test_mlm_loss_ignores_unlabelled_positions():
    # The textbook bug: a loss "mask" that does nothing. Changing logits where label == -100
    # must not move the loss; changing them where a label exists must.
    torch.manual_seed(6)
    logits = torch.randn(2, 8, 30)
    labels = torch.full((2, 8), -100)
    labels[0, 2], labels[1, 5] = 7, 11
    base, _, count = summed_cross_entropy(logits, labels)
    assert count.item() == 2
    noisy = logits.clone()
    noisy[labels == -100] += 100 * torch.randn_like(noisy[labels == -100])
    assert summed_cross_entropy(noisy, labels)[0].item() == pytest.approx(base.item(), abs=1e-5)
    moved = logits.clone()
    moved[0, 2, 7] += 5
    assert abs(summed_cross_entropy(moved, labels)[0].item() - base.item()) > 1e-2
    expected = -(logits[0, 2].log_softmax(-1)[7] + logits[1, 5].log_softmax(-1)[11])
    assert base.item() == pytest.approx(expected.item(), abs=1e-5)


def labelled_batch(B=3, T=10, V=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = torch.where((torch.rand(B, T, generator=g) < 0.3) & (mask == 1), ids, -100)
    labels[0, 1] = ids[0, 1]  # at least one labelled position
    return ids, mask, labels, torch.tensor([0, 1, 1])


@pytest.mark.parametrize("fused", [False, True])
def test_pretraining_sums_and_counts_equal_an_independent_cross_entropy(fused, tiny_config):
    torch.manual_seed(10)
    m = BertForPreTraining(tiny_config(fused_kernels=fused)).eval()
    ids, mask, labels, nsp = labelled_batch()
    out = m(ids, attention_mask=mask, labels=labels, next_sentence_label=nsp)
    # the oracle: every position's logits from the label-free forward, scored by torch
    full = m(ids, attention_mask=mask)
    logits, keep = full.mlm_logits.reshape(-1, 97), labels.reshape(-1) != -100
    want = F.cross_entropy(logits[keep], labels.reshape(-1)[keep], reduction="sum")
    torch.testing.assert_close(out.mlm_loss_sum, want, atol=1e-4, rtol=1e-5)
    assert out.mlm_count.item() == keep.sum().item() and out.mlm_count.dtype == torch.long
    assert out.mlm_correct.item() == (logits[keep].argmax(-1) == labels.reshape(-1)[keep]).sum().item()
    torch.testing.assert_close(out.mlm_loss, want / keep.sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.nsp_loss_sum, F.cross_entropy(full.nsp_logits, nsp, reduction="sum"))
    assert out.nsp_count.item() == 3 and out.nsp_correct.item() == (full.nsp_logits.argmax(-1) == nsp).sum().item()
    torch.testing.assert_close(out.loss, out.mlm_loss + out.nsp_loss)
    assert m(ids, labels=labels).nsp_loss_sum is None  # no NSP label, no NSP sums


@pytest.mark.parametrize("fused", [False, True])
def test_a_batch_without_labelled_positions_sums_to_zero_not_nan(fused, tiny_config):
    m = BertForPreTraining(tiny_config(fused_kernels=fused))
    ids, mask, _, nsp = labelled_batch()
    out = m(ids, attention_mask=mask, labels=torch.full_like(ids, -100), next_sentence_label=nsp)
    assert out.mlm_loss_sum.item() == 0.0 and out.mlm_count.item() == 0 and out.mlm_correct.item() == 0
    (out.mlm_loss_sum + out.nsp_loss_sum).backward()  # a trainer's sum: finite gradients
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    mlm = BertForMaskedLM(tiny_config())(ids, labels=torch.full_like(ids, -100))
    assert mlm.loss_sum.item() == 0.0 and mlm.count.item() == 0


def test_masked_lm_sums_and_counts_equal_an_independent_cross_entropy(tiny_config):
    torch.manual_seed(11)
    m = BertForMaskedLM(tiny_config()).eval()
    ids, mask, labels, _ = labelled_batch(seed=1)
    out = m(ids, attention_mask=mask, labels=labels)
    logits, keep = m(ids, attention_mask=mask).logits.reshape(-1, 97), labels.reshape(-1) != -100
    want = F.cross_entropy(logits[keep], labels.reshape(-1)[keep], reduction="sum")
    torch.testing.assert_close(out.loss_sum, want, atol=1e-4, rtol=1e-5)
    assert out.count.item() == keep.sum().item()
    assert out.correct.item() == (logits[keep].argmax(-1) == labels.reshape(-1)[keep]).sum().item()
    torch.testing.assert_close(out.loss, out.loss_sum / out.count)


@pytest.mark.parametrize("fused", [False, True])
def test_sums_are_float32_under_bf16_autocast(fused, tiny_config):
    m = BertForPreTraining(tiny_config(fused_kernels=fused))
    ids, mask, labels, nsp = labelled_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids, attention_mask=mask, labels=labels, next_sentence_label=nsp)
    assert out.nsp_logits.dtype == torch.bfloat16  # autocast really is on
    assert out.mlm_loss_sum.dtype == torch.float32 and out.nsp_loss_sum.dtype == torch.float32
    with torch.no_grad():
        ref = m(ids, attention_mask=mask, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(out.mlm_loss_sum, ref.mlm_loss_sum, rtol=0.05, atol=0.05)


def test_pretraining_loss_depends_only_on_labelled_positions(tiny_config):
    torch.manual_seed(7)
    m = BertForPreTraining(tiny_config()).eval()
    ids = torch.randint(5, 97, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 1], labels[1, 7] = 9, 13, 40
    nsp = torch.tensor([0, 1])
    out = m(ids, labels=labels, next_sentence_label=nsp)
    full = m(ids).mlm_logits  # (B, T, V) at every position
    expected_mlm = F.cross_entropy(full.reshape(-1, 97), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.mlm_loss, expected_mlm, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.mlm_logits, full[labels != -100], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected_mlm + F.cross_entropy(out.nsp_logits, nsp))


def test_decoder_is_tied_to_word_embeddings(tiny_config):
    m = BertForPreTraining(tiny_config())
    assert m.mlm.word_embeddings[0].weight is m.bert.embeddings.tok.weight
    names = [n for n, _ in m.named_parameters()]
    assert sum("tok.weight" in n for n in names) == 1  # registered once


def test_presets_follow_the_small_bert_grid():
    grid = {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512), "base": (12, 768),
            "large": (24, 1024)}
    for name, (L, H) in grid.items():
        c = BertConfig.from_preset(name)
        assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size) == (L, H, H // 64, 4 * H)
    with pytest.raises(ValueError, match="unknown preset"):
        BertConfig.from_preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=100, num_heads=3)


def test_bert_base_parameter_count():
    # 110M is the number the BERT paper quotes for BERT-Base (with its 30,522-token vocabulary)
    n = sum(p.numel() for p in BertModel(BertConfig.from_preset("base")).parameters())
    assert n == 109_482_240


@pytest.mark.parametrize("impl", ["sdpa", "triton"])
def test_fused_kernels_compute_the_same_model(impl, tiny_config):
    """fused_kernels=True (add+LayerNorm, bias+GELU) and attn_impl="triton" give the plain
    model's values and gradients. On the CPU they run the kernels under Triton's interpreter
    when TRITON_INTERPRET=1 (as in the test suite), else the PyTorch reference of each op."""
    torch.manual_seed(9)
    cfg = tiny_config(hidden_size=32, num_heads=2, intermediate_size=64, dropout=0.0, attention_dropout=0.0)
    m = BertForPreTraining(cfg)
    ids = torch.randint(5, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 2], labels[0, 5], labels[1, 3] = 11, 40, 7
    results = []
    for fused, attn in ((False, "math"), (True, impl)):
        m.zero_grad()
        m.set_backend(attn_impl=attn, fused_kernels=fused)
        o = m(ids, attention_mask=mask, labels=labels, next_sentence_label=torch.tensor([1, 0]))
        o.loss.backward()
        grads = [p.grad.clone() for p in m.parameters()]
        results.append((o.loss.detach(), o.mlm_loss.detach(), o.mlm_predictions, o.mlm_logits, grads))
    (loss0, mlm0, pred0, logits0, g0), (loss1, mlm1, pred1, logits1, g1) = results
    torch.testing.assert_close(loss0, loss1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mlm0, mlm1, atol=1e-5, rtol=1e-5)
    # the chunked MLM loss (decoder + cross-entropy, no logits kept) predicts what the logits do
    assert logits1 is None and pred0.shape == (4,) and torch.equal(pred0, pred1)
    assert torch.equal(pred0, logits0.argmax(-1))
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
