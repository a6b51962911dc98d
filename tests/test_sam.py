"""SAM wrapper: shares the base optimizer's groups and state, exact return to w, BN stats."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msam_fused
from test_optimizer_api import batch, small_model


def make_sam(model, **kw):
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, **kw}
    return msam_fused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, backend="reference", **kw)


def sam_step(model, sam, x, y):
    F.cross_entropy(model(x), y).backward()
    sam.first_step(zero_grad=True)
    with msam_fused.disable_running_stats(model):
        F.cross_entropy(model(x), y).backward()
    sam.second_step(zero_grad=True)


def test_shares_param_groups_and_state_with_the_base_optimizer():
    model = small_model()
    sam = make_sam(model)
    assert sam.param_groups is sam.base_optimizer.param_groups
    assert sam.state is sam.base_optimizer.state
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.1)
    sam_step(model, sam, *batch(0))
    sched.step()
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    extra = nn.Parameter(torch.zeros(3))
    sam.add_param_group({"params": [extra]})
    group = sam.base_optimizer.param_groups[-1]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-3 and group["rho"] == 0.05


def test_second_pass_leaves_batchnorm_statistics_alone_and_returns_exactly_to_w():
    model = small_model()
    sam = make_sam(model, lr=0.0, momentum=0.0, weight_decay=0.0)
    bn = model[1]
    x, y = batch(0)
    w = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    sam.first_step(zero_grad=True)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    with msam_fused.disable_running_stats(model):
        F.cross_entropy(model(x), y).backward()
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2]) and bn.track_running_stats
    sam.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))


def test_step_with_closure_equals_first_and_second_step():
    model_a, model_b = small_model(), small_model()
    sam_a, sam_b = make_sam(model_a), make_sam(model_b)
    for step in range(3):
        x, y = batch(step)
        sam_step(model_a, sam_a, x, y)
        F.cross_entropy(model_b(x), y).backward()

        def closure():
            with msam_fused.disable_running_stats(model_b):
                loss = F.cross_entropy(model_b(x), y)
                loss.backward()
            return loss
        assert torch.is_tensor(sam_b.step(closure))
        sam_b.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))


def test_state_dict_resume_continues_exactly():
    model_a, model_b = small_model(), small_model(seed=3)
    sam_a = make_sam(model_a)
    for step in range(3):
        sam_step(model_a, sam_a, *batch(step))
    model_b.load_state_dict(model_a.state_dict())
    sam_b = make_sam(model_b, lr=0.5)
    sam_b.load_state_dict(sam_a.state_dict())
    assert sam_b.param_groups is sam_b.base_optimizer.param_groups and sam_b.param_groups[0]["lr"] == 0.1
    for step in range(3, 6):
        sam_step(model_a, sam_a, *batch(step))
        sam_step(model_b, sam_b, *batch(step))
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_gradient_skips_perturbation_and_base_step(fused):
    model = small_model()
    sam = make_sam(model, fused=fused)
    sam_step(model, sam, *batch(0))
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [sam.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x, y = batch(1)
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    sam.first_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    F.cross_entropy(model(x), y).backward()
    sam.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(sam.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), buffers))
    assert sam.skipped_steps == 1
    resumed = make_sam(small_model(), fused=fused)
    resumed.load_state_dict(sam.state_dict())
    assert resumed.skipped_steps == 1


def test_the_state_dict_loads_into_the_base_optimizer_alone():
    model = small_model()
    sam = make_sam(model)
    sam_step(model, sam, *batch(0))
    base = torch.optim.SGD(small_model().parameters(), lr=0.1, momentum=0.9)
    base.load_state_dict(sam.state_dict())
    assert all(torch.equal(base.state[q]["momentum_buffer"], sam.state[p]["momentum_buffer"])
               for p, q in zip(model.parameters(), base.param_groups[0]["params"]))


def test_grad_scaler_step_finishes_the_sam_step():
    model_a, model_b = small_model(), small_model()
    sam_a, sam_b = make_sam(model_a), make_sam(model_b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for step in range(3):
        x, y = batch(step)
        scaler.scale(F.cross_entropy(model_a(x), y)).backward()
        sam_a.first_step(zero_grad=True)
        with msam_fused.disable_running_stats(model_a):
            scaler.scale(F.cross_entropy(model_a(x), y)).backward()
        scaler.step(sam_a)
        scaler.update()
        sam_a.zero_grad()
        sam_step(model_b, sam_b, x, y)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_misuse_gets_clear_errors():
    model = small_model()
    with pytest.raises(TypeError, match="optimizer class"):
        msam_fused.SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    sam = make_sam(model)
    with pytest.raises(RuntimeError, match="without first_step"):
        sam.second_step()
    with pytest.raises(RuntimeError, match="needs a closure"):
        sam.step()
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        sam.first_step()
    with pytest.raises(ValueError, match="rho"):
        msam_fused.SAM(model.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="not saved by msam_fused.SAM"):
        sam.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
