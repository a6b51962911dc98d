"""rho schedulers: the values they set at chosen steps, on MSAM, AdamWMSAM and SAM."""

import math

import pytest
import torch
import torch.nn.functional as F

import msam_fused
from msam_fused import rho_schedulers as rs
from test_optimizer_api import batch, small_model


def two_group_optimizers():
    model = small_model()
    layers = [list(model[0].parameters()), list(model[3].parameters())]
    return {
        "MSAM": msam_fused.MSAM([{"params": layers[0], "rho": 2.0}, {"params": layers[1], "rho": 1.0}],
                                lr=0.1, backend="reference"),
        "AdamWMSAM": msam_fused.AdamWMSAM([{"params": layers[0], "rho": 2.0},
                                           {"params": layers[1], "rho": 1.0}], backend="reference"),
        "SAM": msam_fused.SAM([{"params": layers[0], "rho": 2.0}, {"params": layers[1], "rho": 1.0}],
                              torch.optim.SGD, lr=0.1, backend="reference"),
    }


def rhos_over(scheduler, steps):
    """Group 0's rho during optimizer steps 0 .. steps-1."""
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["rho"])
        scheduler.step()
    return out


COS = [2.0 * (0.5 + 0.5 * math.cos(math.pi * t / 4)) for t in range(5)]
SCHEDULES = [
    (rs.ConstantRho, {}, [2.0] * 6),
    (rs.ZeroDuringWarmup, {"warmup_steps": 3}, [0, 0, 0, 2.0, 2.0, 2.0]),
    (rs.StepRho, {"milestone": 2, "before": 0.5, "after": 1.5}, [1.0, 1.0, 3.0, 3.0, 3.0, 3.0]),
    (rs.LinearRampRho, {"ramp_steps": 4}, [0, 0.5, 1.0, 1.5, 2.0, 2.0]),
    (rs.LinearRampRho, {"ramp_steps": 2, "start_factor": 0.5, "end_factor": 0.0}, [1.0, 0.5, 0, 0, 0, 0]),
    (rs.CosineRho, {"total_steps": 4}, COS + [0.0]),
    (rs.CosineRho, {"total_steps": 2, "start_factor": 0.0, "end_factor": 1.0}, [0, 1.0, 2.0, 2.0, 2.0, 2.0]),
]


@pytest.mark.parametrize("name", ["MSAM", "AdamWMSAM", "SAM"])
@pytest.mark.parametrize("cls,kwargs,expected", SCHEDULES,
                         ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(SCHEDULES)])
def test_values_at_chosen_steps(name, cls, kwargs, expected):
    opt = two_group_optimizers()[name]
    sched = cls(opt, **kwargs)
    values = rhos_over(sched, len(expected))
    assert values == pytest.approx(expected, abs=1e-12)
    # every group is scaled from its own initial rho
    assert opt.param_groups[1]["rho"] == pytest.approx(opt.param_groups[0]["rho"] / 2, abs=1e-12)
    assert sched.get_last_rho() == [g["rho"] for g in opt.param_groups]


def test_state_dict_resumes_the_schedule():
    opts = two_group_optimizers()
    first = rs.LinearRampRho(opts["MSAM"], ramp_steps=10)
    rhos_over(first, 4)
    state = first.state_dict()
    assert "optimizer" not in state
    other = two_group_optimizers()["MSAM"]
    other.load_state_dict(opts["MSAM"].state_dict())
    second = rs.LinearRampRho(other, ramp_steps=10, last_step=3)
    second.load_state_dict(state)
    assert rhos_over(second, 3) == pytest.approx(rhos_over(first, 3))


def test_warmup_zero_keeps_msam_at_its_true_weights_then_perturbs():
    model = small_model()
    opt = msam_fused.MSAM(model.parameters(), lr=0.1, rho=0.5, backend="reference")
    sched = rs.ZeroDuringWarmup(opt, warmup_steps=2)
    for step in range(4):
        F.cross_entropy(model(batch(step)[0]), batch(step)[1]).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        with opt.unperturbed():
            true = [p.detach().clone() for p in model.parameters()]
        at_w = all(torch.equal(p, w) for p, w in zip(model.parameters(), true))
        assert at_w == (step < 2), step


def test_misuse_gets_clear_errors():
    with pytest.raises(ValueError, match="has no 'rho'"):
        rs.ConstantRho(torch.optim.SGD(small_model().parameters(), lr=0.1))
    opt = two_group_optimizers()["MSAM"]
    with pytest.raises(ValueError, match="ramp_steps must be an integer >= 1"):
        rs.LinearRampRho(opt, ramp_steps=0)
    with pytest.raises(ValueError, match="invalid before=-1"):
        rs.StepRho(opt, milestone=3, before=-1.0)
    with pytest.raises(ValueError, match="resumes a schedule"):
        rs.CosineRho(two_group_optimizers()["SAM"], total_steps=5, last_step=4)
