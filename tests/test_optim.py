"""The optimiser recipe: which parameters decay, the schedule's shape, and the fused AdamW
path against PyTorch's plain (for-each) AdamW."""

import pytest
import torch

from minibert.model import BertConfig, BertForSequenceClassification
from minibert.optim import adamw, build_optimizer, param_groups, warmup_linear, warmup_linear_by_time


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
