"""Each Triton op against ``msam_fused.reference`` on identical inputs.

Sizes include 0-d, one element, sizes that are no multiple of the row (1024) and a tensor
that spans two chunks; dtypes float64/float32 (agreement to rounding) and bfloat16/float16
(parameters within one storage ulp, fp32 state to rounding). Runs compiled on a GPU, or under
the interpreter (see ``triton_device.py``).
"""

import pytest
import torch

from msam_fused import reference
from msam_fused.triton_kernels import kernels, layout, ops, tuning
from triton_device import DEVICE, INTERPRETED, MARKS, triton_kernels

pytestmark = MARKS

SIZES = [(5, 3), (), (1,), (1025,), (7, 2, 3)]
BIG = (int(kernels.CHUNK) + 1027,)  # two programs, the second with a masked tail
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# allowed difference, relative to the largest magnitude: rounding of the compute dtype for
# state and sums (summation order and FMA differ), one storage ulp for half parameters
STATE_TOL = {torch.float64: 1e-13, torch.float32: 2e-6}
STORAGE_ULP = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def compute(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensors(sizes, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)
            for s in sizes]


def clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone(t) for t in x)
    return x


def assert_matches(actual, expected, tol):
    """Lists (of lists) of tensors, or tensors, equal up to ``tol`` times the largest value."""
    if isinstance(expected, torch.Tensor):
        scale = expected.double().abs().max().clamp_min(1e-30) if expected.numel() else 1.0
        torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=float(tol * scale))
        return
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
        else:
            assert_matches(a, e, tol)


def run_both(op_name, inputs: dict, **kwargs):
    """Call the op of both backends on copies of ``inputs``; return (triton, reference) copies
    and results."""
    ours, ref = clone(inputs), clone(inputs)
    got = getattr(triton_kernels, op_name)(**ours, **kwargs)
    want = getattr(reference, op_name)(**ref, **kwargs)
    return (ours, got), (ref, want)


def flags(found_inf, dtype=torch.float32):
    return None if found_inf is None else torch.tensor(found_inf, dtype=dtype, device=DEVICE)


# ------------------------------------------------------------------------------ updates
def msam_inputs(dtype, sizes=SIZES, masters=False, missing=(1,)):
    cd = compute(dtype)
    params = tensors(sizes, dtype, 0)
    grads = tensors(sizes, dtype, 1)
    for i in missing:
        grads[i] = None
    return dict(params=params, grads=grads, momenta=tensors(sizes, cd, 2),
                masters=[p.float() + 1e-3 for p in params] if masters else [None] * len(sizes))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masters", [False, True], ids=["", "masters"])
@pytest.mark.parametrize("scaled", [False, True], ids=["", "grad_scale"])
def test_msam_sgd_update(dtype, masters, scaled):
    if masters and dtype in (torch.float64, torch.float32):
        pytest.skip("master weights are for half parameters")
    cd = compute(dtype)
    inputs = msam_inputs(dtype, masters=masters)
    (ours, got), (ref, want) = run_both(
        "msam_sgd_update_", inputs, lr=0.1, weight_decay=0.01, momentum=0.9,
        coef=torch.tensor(0.3, dtype=cd, device=DEVICE), norm_dtype=cd,
        grad_scale=torch.tensor([4.0], device=DEVICE) if scaled else None,
        found_inf=flags(0.0) if scaled else None)
    tol = STATE_TOL[cd]
    assert_matches(got, want, 10 * tol)
    assert_matches(ours["momenta"], ref["momenta"], tol)
    assert_matches(ours["masters"], ref["masters"], tol)
    assert_matches(ours["params"], ref["params"], STORAGE_ULP[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masters", [False, True], ids=["", "masters"])
def test_adamw_msam_update(dtype, masters):
    if masters and dtype in (torch.float64, torch.float32):
        pytest.skip("master weights are for half parameters")
    cd = compute(dtype)
    base = msam_inputs(dtype, masters=masters)
    inputs = dict(params=base["params"], grads=base["grads"],
                  exp_avgs=tensors(SIZES, cd, 3, scale=0.1),
                  exp_avg_sqs=[t.abs() for t in tensors(SIZES, cd, 4, scale=0.1)],
                  steps=[torch.tensor(float(t), device=DEVICE) for t in (0, 3, 7, 1, 12)],
                  masters=base["masters"])
    (ours, got), (ref, want) = run_both(
        "adamw_msam_update_", inputs, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
        weight_decay=0.1, coef=torch.tensor(0.3, dtype=cd, device=DEVICE), norm_dtype=cd)
    # the bias corrections take beta**t as exp2(t*log2(beta)): a few ulps of the compute dtype
    tol = 8 * STATE_TOL[cd]
    assert_matches(got, want, 10 * tol)
    for key in ("exp_avgs", "exp_avg_sqs", "masters"):
        assert_matches(ours[key], ref[key], tol)
    assert [float(t) for t in ours["steps"]] == [float(t) for t in ref["steps"]] == [1, 3, 8, 2, 13]
    assert_matches(ours["params"], ref["params"], max(tol, STORAGE_ULP[dtype]))


@pytest.mark.parametrize("op", ["msam_sgd_update_", "adamw_msam_update_"])
def test_update_with_found_inf_changes_nothing(op):
    inputs = msam_inputs(torch.float32)
    kwargs = dict(lr=0.1, weight_decay=0.01, coef=torch.tensor(0.3, device=DEVICE),
                  norm_dtype=torch.float32, grad_scale=torch.tensor(2.0, device=DEVICE),
                  found_inf=flags(1.0))
    if op == "msam_sgd_update_":
        kwargs["momentum"] = 0.9
    else:
        inputs = dict(params=inputs["params"], grads=inputs["grads"],
                      exp_avgs=tensors(SIZES, torch.float32, 3),
                      exp_avg_sqs=[t.abs() for t in tensors(SIZES, torch.float32, 4)],
                      steps=[torch.tensor(2.0, device=DEVICE) for _ in SIZES], masters=inputs["masters"])
        kwargs.update(beta1=0.9, beta2=0.99, eps=1e-8)
    before = clone(inputs)
    getattr(triton_kernels, op)(**inputs, **kwargs)
    for key, tensors_ in inputs.items():
        for a, b in zip(tensors_, before[key]):
            assert (a is None and b is None) or torch.equal(a, b), key


def test_multi_chunk_tensor_and_empty_tensor():
    sizes = [BIG, (0,), (3,)]
    inputs = msam_inputs(torch.float32, sizes=sizes, missing=())
    (ours, got), (ref, want) = run_both(
        "msam_sgd_update_", inputs, lr=0.1, weight_decay=0.01, momentum=0.9,
        coef=torch.tensor(0.3, device=DEVICE), norm_dtype=torch.float32)
    assert_matches(got, want, 1e-5)
    assert_matches(ours["params"], ref["params"], 2e-6)


def test_sum_does_not_depend_on_tuning_or_table(monkeypatch):
    """Deterministic reductions: other rows per step, other warps, a rebuilt table: same bits."""
    inputs = msam_inputs(torch.float32, sizes=[BIG, (1025,), (3,)], missing=())
    kwargs = dict(lr=0.1, weight_decay=0.01, momentum=0.9, coef=torch.tensor(0.3, device=DEVICE),
                  norm_dtype=torch.float32)
    results = []
    for cfg in (tuning.Config(1, 4), tuning.Config(4, 8), tuning.Config(2, 4)):
        monkeypatch.setattr(tuning, "config", lambda key, interpreted, bench, cfg=cfg: cfg)
        layout.clear_cache()
        copy = clone(inputs)
        results.append((triton_kernels.msam_sgd_update_(**copy, **kwargs), copy))
    for total, copy in results[1:]:
        assert torch.equal(total, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(copy["params"], results[0][1]["params"]))


# -------------------------------------------------------------------------- perturbation
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masters", [False, True], ids=["", "masters"])
@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0], ids=["", "finite", "skip"])
def test_apply_perturbation(dtype, masters, found_inf):
    if masters and dtype in (torch.float64, torch.float32):
        pytest.skip("master weights are for half parameters")
    cd = compute(dtype)
    inputs = msam_inputs(dtype, masters=masters)
    inputs = dict(params=inputs["params"], directions=inputs["momenta"], masters=inputs["masters"])
    (ours, _), (ref, _) = run_both("apply_perturbation_", inputs,
                                   coef=torch.tensor(0.25, dtype=cd, device=DEVICE),
                                   found_inf=flags(found_inf, torch.bool if found_inf else torch.float32))
    if found_inf:
        assert all(torch.equal(a, b) for a, b in zip(ours["params"], inputs["params"]))
    assert_matches(ours["params"], ref["params"], STORAGE_ULP[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_remove_perturbation_with_some_masters(dtype):
    cd = compute(dtype)
    inputs = msam_inputs(dtype, masters=True)
    masters = inputs["masters"]
    masters[0] = masters[3] = None  # a bucket mixing both kinds still works
    inputs = dict(params=inputs["params"], directions=inputs["momenta"], masters=masters)
    (ours, _), (ref, _) = run_both("remove_perturbation_", inputs,
                                   coef=torch.tensor(0.25, dtype=cd, device=DEVICE))
    assert_matches(ours["params"], ref["params"], STORAGE_ULP[dtype])


@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0], ids=["", "finite", "skip"])
@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float64], ids=str)
def test_perturbation_coef(found_inf, norm_dtype):
    total = torch.tensor(7.25, dtype=norm_dtype, device=DEVICE)
    old = torch.tensor(0.125, dtype=norm_dtype, device=DEVICE)
    got = triton_kernels.perturbation_coef(total, 0.3, old, flags(found_inf))
    want = reference.perturbation_coef(total, 0.3, old, flags(found_inf))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_matches(got, want, STATE_TOL[norm_dtype])


# ----------------------------------------------------------------------------------- SAM
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True], ids=["", "adaptive"])
def test_sam_ascent(dtype, adaptive):
    cd = compute(dtype)
    params, grads = tensors(SIZES, dtype, 0), tensors(SIZES, dtype, 1)
    got = triton_kernels.sam_ascent_sum_of_squares(params, grads, adaptive=adaptive, norm_dtype=cd)
    want = reference.sam_ascent_sum_of_squares(params, grads, adaptive=adaptive, norm_dtype=cd)
    assert_matches(got, want, 10 * STATE_TOL[cd])
    inputs = dict(params=params, grads=grads, backups=[torch.zeros_like(p) for p in params])
    (ours, _), (ref, _) = run_both("sam_ascent_", inputs, scale=torch.tensor(0.05, dtype=cd, device=DEVICE),
                                   adaptive=adaptive, found_inf=flags(0.0))
    assert all(torch.equal(a, b) for a, b in zip(ours["backups"], params))
    assert_matches(ours["params"], ref["params"], STORAGE_ULP[dtype])
    triton_kernels.sam_restore_(ours["params"], ours["backups"])
    assert all(torch.equal(a, b) for a, b in zip(ours["params"], params))


def test_sam_ascent_skip_keeps_params_but_remembers_them():
    params, grads = tensors(SIZES, torch.float32, 0), tensors(SIZES, torch.float32, 1)
    inputs = dict(params=params, grads=grads, backups=[torch.zeros_like(p) for p in params])
    (ours, _), (ref, _) = run_both("sam_ascent_", inputs, scale=torch.tensor(0.05, device=DEVICE),
                                   adaptive=False, found_inf=flags(1.0))
    for key in ("params", "backups"):
        assert all(torch.equal(a, b) for a, b in zip(ours[key], ref[key]))


# ------------------------------------------------------------------ layouts and dispatch
def test_channels_last_and_mismatched_layouts():
    """Operands sharing a non-contiguous dense layout run in place; a mismatched operand
    (contiguous momentum for a channels-last weight) is staged through contiguous copies."""
    shape = (4, 3, 5, 5)
    p = torch.randn(shape, device=DEVICE).to(memory_format=torch.channels_last)
    g = torch.randn(shape, device=DEVICE).to(memory_format=torch.channels_last)
    for v in (torch.randn(shape, device=DEVICE).to(memory_format=torch.channels_last),
              torch.randn(shape, device=DEVICE)):
        inputs = dict(params=[p], grads=[g], momenta=[v], masters=[None])
        (ours, got), (ref, want) = run_both(
            "msam_sgd_update_", inputs, lr=0.1, weight_decay=0.01, momentum=0.9,
            coef=torch.tensor(0.3, device=DEVICE), norm_dtype=torch.float32)
        assert_matches(ours["params"], ref["params"], 2e-6)
        assert_matches(ours["momenta"], ref["momenta"], 2e-6)
        assert ours["params"][0].is_contiguous(memory_format=torch.channels_last)


def test_backend_resolves_and_names_itself():
    from msam_fused import backends

    assert backends.resolve("triton", torch.device(DEVICE)) is triton_kernels
    assert triton_kernels.name == "triton"
    other = "cuda" if DEVICE == "cpu" else "cpu"
    assert "interpreter" in triton_kernels.unavailable_reason(other) or "TRITON_INTERPRET" in \
        triton_kernels.unavailable_reason(other)


def test_unsupported_dtype_is_a_clear_error():
    p = torch.zeros(3, dtype=torch.float32, device=DEVICE)
    with pytest.raises(TypeError, match="momenta holds a torch.float64"):
        triton_kernels.msam_sgd_update_([p], [p.clone()], [torch.zeros(3, dtype=torch.float64, device=DEVICE)],
                                        [None], lr=0.1, weight_decay=0.0, momentum=0.9,
                                        coef=torch.tensor(0.0, device=DEVICE), norm_dtype=torch.float32)


# ------------------------------------------------------------------- torch.library / compile
def test_opcheck():
    cd = torch.float32
    inputs = msam_inputs(torch.float32, sizes=[(3,), (2, 2)], missing=())
    coef = torch.tensor(0.3, device=DEVICE)
    torch.library.opcheck(ops.msam_sgd_update_, (inputs["params"], inputs["grads"], inputs["momenta"], [],
                                                 0.1, 0.01, 0.9, coef, cd, None, None))
    torch.library.opcheck(ops.apply_perturbation_, (inputs["params"], inputs["momenta"], [None, None],
                                                    coef, flags(0.0)))
    torch.library.opcheck(ops.perturbation_coef, (torch.tensor(4.0, device=DEVICE), 0.5, coef, None))


def test_compiled_step_traces_through_the_ops():
    """A ``torch.compile(fullgraph=True)`` MSAM step (update, coefficient, perturbation) gives
    the eager result: the ops have fake versions and declare what they mutate."""
    inputs = msam_inputs(torch.float32, sizes=[(3,), (1025,)], missing=())
    coef = torch.tensor(0.3, device=DEVICE)

    def step(params, grads, momenta):
        total = triton_kernels.msam_sgd_update_(params, grads, momenta, [None, None], lr=0.1,
                                                weight_decay=0.01, momentum=0.9, coef=coef,
                                                norm_dtype=torch.float32)
        new_coef = triton_kernels.perturbation_coef(total, 0.5, coef)
        triton_kernels.apply_perturbation_(params, momenta, [None, None], coef=new_coef)
        return new_coef

    eager, compiled = clone(inputs), clone(inputs)
    want = step(eager["params"], eager["grads"], eager["momenta"])
    backend = "aot_eager" if INTERPRETED else "inductor"
    got = torch.compile(step, backend=backend, fullgraph=True)(
        compiled["params"], compiled["grads"], compiled["momenta"])
    assert torch.equal(got, want)
    for key in ("params", "momenta"):
        assert all(torch.equal(a, b) for a, b in zip(compiled[key], eager[key]))
