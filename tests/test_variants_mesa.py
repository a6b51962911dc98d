"""MESA (trajectory loss to an EMA model) against an independent loop."""

import copy

import pytest
import torch
import torch.nn.functional as F

from msam_fused.variants import MESA, train_step
from spec_loops import sgd_momentum_step_
from test_optimizer_api import batch, small_model
from test_variants_esam import check_against_loop, forward

DECAY, T, WEIGHT, START, LR, MOMENTUM = 0.9, 3.0, 0.5, 3, 0.1, 0.9


def spec_mesa(weights, data):
    """SGD on CE + [step >= START] * WEIGHT * T**2 * KL(softmax(f_ema / T) || softmax(f_w / T)),
    then ema = DECAY * ema + (1 - DECAY) * w."""
    ema = [w.clone() for w in weights]
    buffers = {}
    for step, (x, y) in enumerate(data):
        ws = [w.clone().requires_grad_() for w in weights]
        logits = forward(ws, x)
        loss = F.cross_entropy(logits, y)
        if step >= START:
            teacher = torch.softmax(forward(ema, x) / T, dim=1)
            student_log = torch.log_softmax(logits / T, dim=1)
            kl = (teacher * (teacher.log() - student_log)).sum(1).mean()
            loss = loss + WEIGHT * T * T * kl
        for j, (w, g) in enumerate(zip(weights, torch.autograd.grad(loss, ws))):
            sgd_momentum_step_(w, g, buffers, j, LR, MOMENTUM)
        for e, w in zip(ema, weights):
            e.copy_(DECAY * e + (1 - DECAY) * w)
    return ema


def make_mesa(model, **kw):
    return MESA(model, torch.optim.SGD, decay=DECAY, temperature=T, weight=WEIGHT, start_step=START,
                lr=LR, momentum=MOMENTUM, **kw)


def test_mesa_matches_the_loop():
    opt, ema = check_against_loop(make_mesa, spec_mesa, 8)
    for p, e in zip(opt.ema_model.parameters(), ema):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-14)


def test_ema_follows_buffers_and_resume_is_exact():
    model = small_model()
    opt = make_mesa(model)
    x, y = batch(0)
    bn, ema_bn = model[1], opt.ema_model[1]
    before = ema_bn.running_mean.clone()
    train_step(model, opt, x, y)
    torch.testing.assert_close(ema_bn.running_mean, DECAY * before + (1 - DECAY) * bn.running_mean)
    assert int(ema_bn.num_batches_tracked) == int(bn.num_batches_tracked) == 1
    assert not opt.ema_model.training and not any(p.requires_grad for p in opt.ema_model.parameters())
    for step in range(1, 4):
        train_step(model, opt, *batch(step))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for step in range(4, 7):
        train_step(model, opt, *batch(step))
    fresh = small_model(seed=3)
    fresh.load_state_dict(saved[0])
    resumed = make_mesa(fresh)
    resumed.load_state_dict(saved[1])
    assert resumed.steps_taken == 4
    for step in range(4, 7):
        train_step(fresh, resumed, *batch(step))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(opt.ema_model.state_dict().values(),
                                                  resumed.ema_model.state_dict().values()))


def test_lr_schedulers_and_misuse():
    model = small_model()
    opt = make_mesa(model)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_step(model, opt, *batch(0))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(LR / 2)
    with pytest.raises(ValueError, match="invalid decay=1.0"):
        MESA(model, torch.optim.SGD, decay=1.0, lr=0.1)
    with pytest.raises(ValueError, match="temperature=0"):
        MESA(model, torch.optim.SGD, temperature=0.0, lr=0.1)
    with pytest.raises(ValueError, match="no 'mesa' entry"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
