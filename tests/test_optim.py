"""The optimiser recipe: which parameters decay, the schedule's shape, and the fused AdamW
path against PyTorch's plain (for-each) AdamW."""

import pytest
import torch

from minibert.model import BertConfig, BertForSequenceClassification
from minibert.optim import PullToStart, adamw, build_optimizer, param_groups, warmup_linear, warmup_linear_by_time


def small_model(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig.from_preset("tiny", vocab_size=64, num_labels=2, dropout=0.0, attention_dropout=0.0)
    return BertForSequenceClassification(cfg)


def test_biases_and_layernorm_do_not_decay():
    model = small_model()
    names = {id(p): n for n, p in model.named_parameters()}
    for g in param_groups(model, 1e-3, 0.01):
        for p in g["params"]:
            expect = 0.0 if p.ndim < 2 else 0.01
            assert g["weight_decay"] == expect, names[id(p)]


def test_warmup_then_linear_decay():
    # the first step already trains (lr = base/warmup), the peak is held at t = warmup, 0 after total
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = warmup_linear(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_the_time_schedule_warms_up_then_decays_to_zero_at_the_budget():
    """--time-budget: the same shape over seconds, read from a clock at each scheduler step
    (here a fake one: 10 s budget, 2 s warmup), and it stays at 0 once the budget is spent."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    now = [0.0]
    sched = warmup_linear_by_time(opt, lambda: now[0], warmup_s=2.0, total_s=10.0)
    lrs = [opt.param_groups[0]["lr"]]
    for t in (1.0, 2.0, 6.0, 9.0, 10.0, 12.0):
        now[0] = t
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 1.0, 0.25, 0.0, 0.0])


def test_fused_adamw_matches_plain_adamw():
    """build_optimizer asks for the fused kernel (CPU and CUDA); it must take the same steps."""
    a, b = small_model(), small_model()
    opt_a = build_optimizer(a, 1e-3, 0.01)
    assert opt_a.defaults["fused"]
    opt_b = torch.optim.AdamW(param_groups(b, 1e-3, 0.01), lr=1e-3, eps=1e-6, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        ids = torch.randint(0, 64, (4, 12), generator=g)
        y = torch.randint(0, 2, (4,), generator=g)
        for m, opt in ((a, opt_a), (b, opt_b)):
            m(ids, labels=y).loss.backward()
            opt.step()
            opt.zero_grad()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


def test_adamw_takes_the_fused_kernel_for_any_groups():
    """finetune builds its groups from several modules (LoRA, prompt, head) and calls adamw
    directly: it gets the fused kernel on the CPU too, with the groups' own settings."""
    m = small_model()
    groups = param_groups(m, 2e-3, 0.01)
    opt = adamw(groups, 2e-3, eps=1e-8)
    assert opt.defaults["fused"] and opt.defaults["eps"] == 1e-8
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]


def test_l2sp_pulls_the_encoder_toward_its_start_and_the_head_toward_zero():
    """--l2sp: AdamW (torch's fused kernel) with PullToStart against Adam written out by hand, where the
    encoder's weights (biases and LayerNorm too) decay toward their first values and the head's matrix
    toward zero; three steps with a changing learning rate, as the schedule changes it."""
    lr, wd, s, eps = 1e-3, 0.5, 30.0, 1e-6  # lr * s = 0.03: the pull moves a weight as far as a step does
    a, b = small_model(), small_model()
    groups = param_groups(a, lr, wd, l2sp=s)
    names = {id(p): n for n, p in a.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            assert (g["l2sp"], g["weight_decay"]) == ((s, 0.0) if n.startswith("bert.") else
                                                      (0.0, wd if p.ndim == 2 else 0.0)), n
    opt = adamw(groups, lr)
    PullToStart(opt)
    start = {n: p.detach().clone() for n, p in b.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in b.named_parameters()}
    v = {n: torch.zeros_like(p) for n, p in b.named_parameters()}
    g_ = torch.Generator().manual_seed(2)
    for t, rate in enumerate([lr, lr / 2, lr / 4], start=1):
        ids = torch.randint(0, 64, (4, 12), generator=g_)
        y = torch.randint(0, 2, (4,), generator=g_)
        for group in opt.param_groups:
            group["lr"] = rate
        a(ids, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
        b.zero_grad()
        b(ids, labels=y).loss.backward()
        with torch.no_grad():
            for n, p in b.named_parameters():
                if n.startswith("bert."):
                    p -= rate * s * (p - start[n])
                elif p.ndim == 2:
                    p -= rate * wd * p
                m[n] = 0.9 * m[n] + 0.1 * p.grad
                v[n] = 0.999 * v[n] + 0.001 * p.grad ** 2
                p -= rate * (m[n] / (1 - 0.9 ** t)) / ((v[n] / (1 - 0.999 ** t)).sqrt() + eps)
    moved = 0
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
        moved += not torch.equal(pa, start[n])
    assert moved == len(start)
