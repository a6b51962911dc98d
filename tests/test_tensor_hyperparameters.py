"""Hyper-parameters as 0-d tensors: ``lr`` and ``rho`` given as tensors, updated in place by an
LR scheduler and a rho schedule, give the trajectory of the same values given as floats, on
every backend that runs here; and ``torch.compile(opt.step)`` does not recompile when a tensor
LR changes (docs/design.md, "Hyper-parameters")."""

import pytest
import torch

import msam_fused
from msam_fused.rho_schedulers import StepRho
from streams import ADAMW_HYPERS, MSAM_HYPERS, GradientStream, initial_params, relative_error

STEPS = 30
BACKENDS = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu"),
            pytest.param("cuda", "cuda", marks=pytest.mark.gpu), pytest.param("triton", "cuda", marks=pytest.mark.gpu)]


def _available_or_skip(backend: str, device: str) -> None:
    reason = msam_fused.available_backends(device)[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} does not run on {device} here: {reason}")


def _as_tensors(hypers: dict, device, keys=("lr", "rho")) -> dict:
    return {k: torch.tensor(v, dtype=torch.float64, device=device) if k in keys else v for k, v in hypers.items()}


def _run(cls, hypers, backend, device, tensors: bool):
    params = [[p.to(device).requires_grad_() for p in ps] for ps in initial_params(torch.float32)]
    groups = [{"params": ps, **(_as_tensors(h, device) if tensors else h)} for ps, h in zip(params, hypers)]
    opt = cls(groups, backend=backend)
    lr_schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    rho_schedule = StepRho(opt, milestone=12, before=1.0, after=2.5)
    stream = GradientStream()
    for step in range(STEPS):
        for gi, ps in enumerate(params):
            for i, p in enumerate(ps):
                grad = stream.grad(step, gi, i, p.detach().cpu())
                p.grad = None if grad is None else grad.to(device)
        opt.step()
        lr_schedule.step()
        rho_schedule.step()
        if step == 20:  # an in-place change by hand, as a custom schedule would make it
            rho = opt.param_groups[1]["rho"]
            if isinstance(rho, torch.Tensor):
                rho.fill_(0.05)
            else:
                opt.param_groups[1]["rho"] = 0.05
    with opt.unperturbed():
        true = [p.detach().cpu() for ps in params for p in ps]
    return [p.detach().cpu() for ps in params for p in ps], true, opt


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("cls, hypers", [(msam_fused.MSAM, MSAM_HYPERS), (msam_fused.AdamWMSAM, ADAMW_HYPERS)],
                         ids=["MSAM", "AdamWMSAM"])
def test_tensor_lr_and_rho_follow_the_float_trajectory(cls, hypers, backend, device):
    _available_or_skip(backend, device)
    stored_f, true_f, _ = _run(cls, hypers, backend, device, tensors=False)
    stored_t, true_t, opt = _run(cls, hypers, backend, device, tensors=True)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the schedulers kept the tensors
    assert float(opt.param_groups[0]["lr"]) == hypers[0]["lr"] * 0.5 ** (STEPS // 7)
    assert relative_error(stored_t, stored_f) <= 1e-5
    assert relative_error(true_t, true_f) <= 1e-5


def test_a_float_change_rebuilds_hyper_and_a_tensor_change_needs_no_rebuild():
    p = torch.nn.Parameter(torch.ones(4))
    lr = torch.tensor(0.1, dtype=torch.float64)
    opt = msam_fused.MSAM([p], lr=lr, rho=0.5, backend="reference")
    p.grad = torch.ones(4)
    opt.step()
    hyper = opt.hyper(opt.param_groups[0], p.device)
    lr.fill_(0.2)
    opt.param_groups[0]["momentum"] = 0.5
    opt.step()
    assert opt.hyper(opt.param_groups[0], p.device) is hyper  # rewritten in place, not replaced
    assert hyper.tolist() == [0.2, 0.0, 0.5, 0.5]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiled_step_does_not_recompile_when_a_tensor_lr_changes(backend):
    from torch._dynamo.testing import CompileCounter

    _available_or_skip(backend, "cpu")
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]
    opt = msam_fused.MSAM(params, lr=torch.tensor(0.1), rho=torch.tensor(0.3), backend=backend)
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    for i in range(6):
        for p in params:
            p.grad = torch.full_like(p, 0.1 * (i + 1))
        step()
        opt.param_groups[0]["lr"].fill_(0.1 / (i + 2))
        opt.param_groups[0]["rho"].fill_(0.3 + 0.1 * i)
    frames_after_warmup = counter.frame_count
    assert frames_after_warmup >= 1  # the step was compiled (graph breaks are allowed)
    for i in range(4):
        for p in params:
            p.grad = torch.full_like(p, 0.2)
        step()
        opt.param_groups[0]["lr"].fill_(0.01 * (i + 1))
    assert counter.frame_count == frames_after_warmup
