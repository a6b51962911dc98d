"""MSAM, AdamWMSAM and SAM on the fused backends ("cpu", "cuda") against the reference backend.

Numerics follow docs/design.md: one stream of gradients drives both implementations (tests/streams.py),
and the fused run's error against a float64 reference run is at most twice the reference's
own error at the same precision.
"""

import pytest
import torch

import msam_fused
from fused_cases import DEVICES, require_extension
from streams import (ADAMW_HYPERS, MSAM_HYPERS, GradientStream, drive_momentum_ascent, drive_sam,
                     initial_params, relative_error)

pytestmark = pytest.mark.usefixtures("extension")

STEPS = 200


@pytest.fixture(scope="module")
def extension():
    require_extension()


def backend_for(device):
    return "cuda" if device == "cuda" else "cpu"


def run(cls, hypers, dtype, backend, device="cpu", steps=STEPS, master_weights=False):
    """(stored, true, optimizer) after ``steps`` stream steps, rho changed at steps 40 and 70."""
    return drive_momentum_ascent(cls, hypers, dtype, backend, device, steps, (40, 70),
                                 master_weights=master_weights)


OPTIMIZERS = [(msam_fused.MSAM, MSAM_HYPERS), (msam_fused.AdamWMSAM, ADAMW_HYPERS)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls, hypers", OPTIMIZERS, ids=["MSAM", "AdamWMSAM"])
@pytest.mark.parametrize("dtype, master_weights", [
    (torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False),
    (torch.float16, True)], ids=["fp32", "bf16", "bf16-master", "fp16", "fp16-master"])
def test_within_twice_the_reference_error_over_200_steps(device, cls, hypers, dtype, master_weights):
    exact, exact_true, _ = run(cls, hypers, torch.float64, "reference")
    ref, ref_true, _ = run(cls, hypers, dtype, "reference", master_weights=master_weights)
    ours, ours_true, opt = run(cls, hypers, dtype, backend_for(device), device, master_weights=master_weights)
    assert opt.backend == backend_for(device)
    for mine, theirs, truth in ((ours, ref, exact), (ours_true, ref_true, exact_true)):
        own_error = relative_error(theirs, truth)
        assert own_error < 0.2
        assert relative_error(mine, truth) <= 2 * own_error + 1e-7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls, hypers", OPTIMIZERS, ids=["MSAM", "AdamWMSAM"])
def test_float64_agrees_with_the_reference_to_rounding(device, cls, hypers):
    ref, _, _ = run(cls, hypers, torch.float64, "reference", steps=100)
    ours, _, _ = run(cls, hypers, torch.float64, backend_for(device), device, steps=100)
    assert relative_error(ours, ref) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_reruns_are_bit_identical(device):
    first, _, _ = run(msam_fused.MSAM, MSAM_HYPERS, torch.float32, backend_for(device), device, steps=30)
    second, _, _ = run(msam_fused.MSAM, MSAM_HYPERS, torch.float32, backend_for(device), device, steps=30)
    assert all(torch.equal(a, b) for ga, gb in zip(first, second) for a, b in zip(ga, gb))


@pytest.mark.parametrize("device", DEVICES)
def test_resume_from_a_checkpoint_is_bit_identical(device):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)).to(device)
        return model, msam_fused.MSAM(model.parameters(), lr=0.1, weight_decay=1e-3, rho=0.5,
                                      backend=backend_for(device))

    def train(model, opt, steps, start):
        for step in range(start, start + steps):
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 5, generator=gen).to(device), torch.randn(16, 3, generator=gen).to(device)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    model, opt = make()
    train(model, opt, 20, 0)
    full_model, full_opt = make()
    train(full_model, full_opt, 10, 0)
    saved = (full_model.state_dict(), full_opt.state_dict())
    resumed_model, resumed_opt = make()
    resumed_model.load_state_dict(saved[0])
    resumed_opt.load_state_dict(saved[1])
    train(resumed_model, resumed_opt, 10, 10)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls, hypers", OPTIMIZERS, ids=["MSAM", "AdamWMSAM"])
def test_nonfinite_gradient_skips_the_whole_step(device, cls, hypers):
    """The one-pass step's first pass detects the inf: nothing changes, the skip is counted."""
    params = [p.to(device).requires_grad_() for p in initial_params(torch.float32)[0]]
    opt = cls(params, **hypers[0], backend=backend_for(device))
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        if step == 2:
            params[2].grad[5] = float("inf")
            before = [p.detach().clone() for p in params], {k: v.clone() for k, v in opt.state[params[0]].items()}
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before[0]))
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in before[1].items())
    assert opt.skipped_steps == 1

    params[2].grad[5] = float("nan")
    raising = cls(params, **hypers[0], backend=backend_for(device), nonfinite="raise")
    with pytest.raises(FloatingPointError, match="parameter 2"):
        raising.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("master_weights", [False, True])
def test_grad_scaler_unscales_in_the_kernel_and_skips_overflowing_steps(device, master_weights):
    """AMP: the scaler hands grad_scale/found_inf to the step; an overflow skips everything."""
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    runs = {}
    for backend in ("reference", backend_for(device)):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4).to(device=device, dtype=dtype)
        opt = msam_fused.MSAM(model.parameters(), lr=0.05, rho=0.3, backend=backend,
                              master_weights=master_weights)
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
        snapshots = []
        for step in range(6):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(4, 8, generator=gen).to(device=device, dtype=dtype)
            opt.zero_grad()
            scaler.scale(model(x).float().square().mean()).backward()
            if step == 3:
                model.weight.grad[0, 0] = float("inf")
                before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            if step == 3:
                assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            snapshots.append([p.detach().float().cpu().clone() for p in model.parameters()])
        assert opt.skipped_steps == 1
        runs[backend] = snapshots
    for ours, ref in zip(runs[backend_for(device)], runs["reference"]):
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_on_the_fused_backend_matches_the_reference(device, adaptive):
    results = {}
    for backend in ("reference", backend_for(device)):
        params = [p.to(device).requires_grad_() for p in initial_params(torch.float32)[1]]
        sam = msam_fused.SAM(params, torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.1, momentum=0.9,
                             backend=backend)
        stream = GradientStream()
        stream.missing = lambda step, gi, i: False
        drive_sam(sam, params, stream, 1, device)
        results[backend] = [p.detach().cpu() for p in params]
    assert relative_error(results[backend_for(device)], results["reference"]) <= 1e-5


def test_auto_picks_the_fused_cpu_backend():
    p = torch.zeros(3, requires_grad=True)
    assert msam_fused.MSAM([p], backend="auto").backend == "cpu"
    assert msam_fused.AdamWMSAM([p], backend="cpu").backend == "cpu"
    assert msam_fused.available_backends("cpu")["cpu"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_backend_without_a_gpu_is_a_clear_error():
    with pytest.raises(msam_fused.BackendUnavailableError, match="backend 'cuda'"):
        msam_fused.MSAM([torch.zeros(3, requires_grad=True)], backend="cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls, hypers", OPTIMIZERS, ids=["MSAM", "AdamWMSAM"])
def test_empty_tensors_with_gradients_count_as_stepped(device, cls, hypers):
    """An empty tensor (e.g. an FSDP2 shard of zero rows) with a gradient is stepped like any
    other: AdamW's step count advances, so every rank's count stays the same."""
    runs = []
    for backend in ("reference", backend_for(device)):
        params = [torch.zeros(0, device=device, requires_grad=True),
                  torch.ones(5, device=device, requires_grad=True)]
        opt = cls(params, **hypers[0], backend=backend)
        for step in range(3):
            params[0].grad = torch.zeros(0, device=device)
            params[1].grad = torch.full((5,), 0.1 * (step + 1), device=device)
            opt.step()
        runs.append(opt)
    for p, q in zip(*(list(o.state) for o in runs)):
        for key in runs[0].state[p]:
            torch.testing.assert_close(runs[1].state[q][key].cpu(), runs[0].state[p][key].cpu())


def test_unsupported_dtype_is_a_clear_error():
    p = torch.zeros(4, dtype=torch.float8_e4m3fn, requires_grad=False)
    p.grad = torch.zeros(4, dtype=torch.float8_e4m3fn)
    opt = msam_fused.MSAM([p], backend="cpu")
    with pytest.raises(RuntimeError, match="params\\[0\\] has dtype Float8_e4m3fn; the fused kernels support"):
        opt.step()


# ------------------------------------------------------------------------------------ GPU
def _training_setup(n_tensors):
    torch.manual_seed(0)
    params = [torch.randn(17 + i, device="cuda", requires_grad=True) for i in range(n_tensors)]
    opt = msam_fused.MSAM(params, lr=0.1, weight_decay=1e-3, rho=0.5, backend="cuda")
    return params, opt


def _set_grads(params, step):
    gen = torch.Generator(device="cuda").manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen)


@pytest.mark.gpu
def test_step_does_not_sync():
    params, opt = _training_setup(10)
    _set_grads(params, 0)
    opt.step()  # the first step creates state
    _set_grads(params, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_step_replays_in_a_cuda_graph():
    eager_params, eager_opt = _training_setup(6)
    params, opt = _training_setup(6)
    static_grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state and tables exist before the capture
        for step in range(3):
            _set_grads(eager_params, step)
            for g, e in zip(static_grads, eager_params):
                g.copy_(e.grad)
            opt.step()
            eager_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(3, 8):
        _set_grads(eager_params, step)
        for g, e in zip(static_grads, eager_params):
            g.copy_(e.grad)
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(params, eager_params):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_kernel_launches_do_not_grow_with_the_number_of_tensors():
    def launches(n_tensors):
        params, opt = _training_setup(n_tensors)
        _set_grads(params, 0)
        opt.step()
        _set_grads(params, 1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "msam_fused" in e.name)

    assert launches(3) == launches(300) > 0
