"""Each Triton op against ``msam_fused.reference`` (the literal step contract) on identical inputs.

Single calls cover sizes 0-d, one element, sizes that are no multiple of the row (1024), a
tensor spanning two segments and an empty tensor; dtypes float64/float32 (agreement to
rounding) and bfloat16/float16 (parameters within one storage ulp, fp32 state to rounding);
missing gradients, master weights, ``grad_scale``, skipped steps. Then both backends run the
contract's calls per step (partials, their sum, the coefficient, the write pass) on one
gradient stream. Runs compiled on a GPU, or under the interpreter (see ``triton_device.py``).
"""

import pytest
import torch

from msam_fused import reference
from msam_fused.triton_kernels import kernels, layout, ops, tuning
from streams import GradientStream, relative_error
from triton_device import DEVICE, INTERPRETED, MARKS, triton_kernels

pytestmark = MARKS

SIZES = [(5, 3), (), (1,), (1025,), (7, 2, 3)]
BIG = (int(kernels.CHUNK) + 1027,)  # two segments, the second with a masked tail
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
HALF = (torch.bfloat16, torch.float16)
# allowed difference, relative to the largest magnitude: rounding of the compute dtype for
# state and sums (summation order and FMA differ), one storage ulp for half parameters
STATE_TOL = {torch.float64: 1e-13, torch.float32: 2e-6}
STORAGE_ULP = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
MSAM_HYPER = dict(lr=0.1, weight_decay=0.01, momentum=0.9, rho=0.3)
ADAMW_HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, rho=0.3)


def compute(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def hyper(algorithm, **changes):
    """The float64 hyper-parameter vector of ``algorithm`` ("msam" or "adamw")."""
    names, values = ((reference.MSAM_SGD_HYPER, MSAM_HYPER) if algorithm == "msam"
                     else (reference.ADAMW_MSAM_HYPER, ADAMW_HYPER))
    values = {**values, **changes}
    return torch.tensor([values[n] for n in names], dtype=torch.float64, device=DEVICE)


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


def coefs(dtype, old=0.3, new=0.2):
    cd = compute(dtype)
    return dict(coef_old=torch.tensor(old, dtype=cd, device=DEVICE),
                coef_new=torch.tensor(new, dtype=cd, device=DEVICE))


def inputs_for(algorithm, dtype, sizes=SIZES, masters=False, missing=(1,)):
    """The column lists of one bucket of ``algorithm``, as the contract's calls take them."""
    cd = compute(dtype)
    params = tensors(sizes, dtype, 0)
    grads = tensors(sizes, dtype, 1)
    for i in missing:
        grads[i] = None
    masters = [p.float() + 1e-3 for p in params] if masters else [None] * len(sizes)
    if algorithm == "msam":
        return dict(params=params, grads=grads, momenta=tensors(sizes, cd, 2), masters=masters)
    steps = [torch.tensor(float(3 * i % 13), device=DEVICE) for i in range(len(sizes))]
    return dict(params=params, grads=grads, exp_avgs=tensors(sizes, cd, 3, scale=0.1),
                exp_avg_sqs=[t.abs() for t in tensors(sizes, cd, 4, scale=0.1)], steps=steps,
                masters=masters)


PARTIALS = {"msam": "msam_sgd_partials", "adamw": "adamw_msam_partials"}
STEP = {"msam": "msam_sgd_step_", "adamw": "adamw_msam_step_"}
STATE = {"msam": ("momenta",), "adamw": ("exp_avgs", "exp_avg_sqs", "masters")}


# ---------------------------------------------------------------------- read-only passes
def assert_partials_match(got, want, tol):
    """Same rows (the sizes here fit one segment each): sums to ``tol``, markers identical."""
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert_matches(got[:, 0], want[:, 0], tol)
    assert torch.equal(got[:, 1].isnan(), want[:, 1].isnan())
    assert not got[:, 1].nan_to_num(0).any()


@pytest.mark.parametrize("algorithm", ["msam", "adamw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scaled", [False, True], ids=["", "grad_scale"])
def test_partials(algorithm, dtype, scaled):
    cd = compute(dtype)
    inputs = inputs_for(algorithm, dtype)
    kwargs = dict(hyper=hyper(algorithm), norm_dtype=cd,
                  grad_scale=torch.tensor([4.0], device=DEVICE) if scaled else None)
    (ours, got), (ref, want) = run_both(PARTIALS[algorithm], inputs, **kwargs)
    assert_partials_match(got, want, 2 * STATE_TOL[cd])
    assert all(a is b or torch.equal(a, b) for key in inputs for a, b in zip(ours[key], inputs[key]))


@pytest.mark.parametrize("algorithm", ["msam", "adamw", "sam"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=str)
def test_partials_mark_non_finite_gradients(algorithm, bad):
    """The marker of a segment is NaN exactly when its gradient holds inf or NaN, and the
    bucket's sum says so: the read-only pass is also the non-finite check."""
    inputs = inputs_for("msam" if algorithm == "sam" else algorithm, torch.float32)
    inputs["grads"][3][7] = bad  # the (1025,) tensor
    if algorithm == "sam":
        inputs = dict(params=inputs["params"], grads=[g if g is not None else torch.zeros_like(p)
                                                      for p, g in zip(inputs["params"], inputs["grads"])])
        kwargs = dict(adaptive=False, norm_dtype=torch.float32)
        (_, got), (_, want) = run_both("sam_ascent_partials", inputs, **kwargs)
    else:
        (_, got), (_, want) = run_both(PARTIALS[algorithm], inputs, hyper=hyper(algorithm),
                                       norm_dtype=torch.float32)
    assert got[:, 1].isnan().tolist() == want[:, 1].isnan().tolist() == [False, False, False, True, False]
    assert bool(triton_kernels.sum_segment_partials(got, torch.float32)[1])


def test_partials_of_a_tensor_spanning_segments():
    sizes = [BIG, (0,), (3,)]
    inputs = inputs_for("msam", torch.float32, sizes=sizes, missing=())
    (_, got), (_, want) = run_both("msam_sgd_partials", inputs, hyper=hyper("msam"),
                                   norm_dtype=torch.float32)
    rows = [triton_kernels.segment_count(t.numel(), DEVICE) for t in inputs["params"]]
    assert rows == [2, 0, 1] and got.shape == (3, 2)
    ours, theirs = (triton_kernels.sum_segment_partials(got, torch.float32),
                    reference.sum_segment_partials(want, torch.float32))
    assert_matches(ours[0], theirs[0], 1e-5)
    assert not ours[1] and not theirs[1]


@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float64], ids=str)
def test_sum_of_partials_computed_in_pieces_is_bit_identical(norm_dtype):
    """The overlapped step computes a bucket's partials in pieces during backward and
    concatenates them in tensor order: the sum must be the one-pass sum, bit for bit."""
    inputs = inputs_for("msam", torch.float32, sizes=[BIG, (5, 3), (1025,), (), (33,)], missing=(3,))
    kwargs = dict(hyper=hyper("msam"), norm_dtype=norm_dtype)
    whole = triton_kernels.msam_sgd_partials(**inputs, **kwargs)
    pieces = [triton_kernels.msam_sgd_partials(**{k: v[a:b] for k, v in inputs.items()}, **kwargs)
              for a, b in ((0, 2), (2, 3), (3, 5))]
    assert torch.equal(torch.cat(pieces), whole)
    total, nonfinite = triton_kernels.sum_segment_partials(torch.cat(pieces), norm_dtype)
    assert torch.equal(total, triton_kernels.sum_segment_partials(whole, norm_dtype)[0])
    assert total.dtype == norm_dtype and nonfinite.dtype == torch.bool and not nonfinite


def test_sum_of_no_partials():
    total, nonfinite = triton_kernels.sum_segment_partials(
        torch.zeros((0, 2), dtype=torch.float64, device=DEVICE), torch.float32)
    assert float(total) == 0.0 and not nonfinite


# ------------------------------------------------------------------------- write passes
@pytest.mark.parametrize("algorithm", ["msam", "adamw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masters", [False, True], ids=["", "masters"])
@pytest.mark.parametrize("scaled", [False, True], ids=["", "grad_scale"])
def test_step(algorithm, dtype, masters, scaled):
    if masters and dtype not in HALF:
        pytest.skip("master weights are for half parameters")
    cd = compute(dtype)
    inputs = inputs_for(algorithm, dtype, masters=masters)
    (ours, _), (ref, _) = run_both(
        STEP[algorithm], inputs, hyper=hyper(algorithm), **coefs(dtype),
        grad_scale=torch.tensor([4.0], device=DEVICE) if scaled else None,
        found_inf=flags(0.0) if scaled else None)
    tol = STATE_TOL[cd]
    for key in STATE[algorithm]:
        assert_matches(ours[key], ref[key], tol)
    assert_matches(ours["masters"], ref["masters"], tol)
    assert_matches(ours["params"], ref["params"], max(tol, STORAGE_ULP[dtype]))
    if algorithm == "adamw":
        assert [float(t) for t in ours["steps"]] == [float(t) for t in ref["steps"]]
        assert float(ours["steps"][1]) == float(inputs["steps"][1])  # no gradient: no step


@pytest.mark.parametrize("algorithm", ["msam", "adamw"])
@pytest.mark.parametrize("flag_dtype", [torch.float32, torch.bool], ids=str)
def test_skipped_step_changes_nothing(algorithm, flag_dtype):
    inputs = inputs_for(algorithm, torch.bfloat16, masters=True)
    before = clone(inputs)
    getattr(triton_kernels, STEP[algorithm])(
        **inputs, hyper=hyper(algorithm), **coefs(torch.bfloat16),
        grad_scale=torch.tensor(2.0, device=DEVICE), found_inf=flags(1.0, flag_dtype))
    for key, tensors_ in inputs.items():
        for a, b in zip(tensors_, before[key]):
            assert (a is None and b is None) or torch.equal(a, b), key


def test_bias_corrections_are_formed_in_float64():
    """With beta2 = 0.9999 at t = 1, ``1 - beta2**t`` formed in float32 is 1e-4 relative off;
    the kernels form it in float64 and agree with the reference to float32 rounding."""
    inputs = inputs_for("adamw", torch.float32, sizes=[(1025,)], missing=())
    inputs["steps"][0].zero_()
    (ours, _), (ref, _) = run_both("adamw_msam_step_", inputs, hyper=hyper("adamw", beta2=0.9999),
                                   **coefs(torch.float32))
    assert_matches(ours["params"], ref["params"], 2e-7)


def test_adaptive_variant_is_refused():
    inputs = inputs_for("msam", torch.float32)
    with pytest.raises(NotImplementedError, match="adaptive"):
        triton_kernels.msam_sgd_partials(**inputs, hyper=hyper("msam"), norm_dtype=torch.float32,
                                         coef_old=torch.tensor(0.1), perturbations=inputs["momenta"])
    with pytest.raises(NotImplementedError, match="adaptive"):
        triton_kernels.msam_sgd_step_(**inputs, hyper=hyper("msam"), **coefs(torch.float32),
                                      perturbations=inputs["momenta"])
    assert "adaptive" not in triton_kernels.capabilities


# ------------------------------------------------------------------- one gradient stream
def drive(backend, algorithm, dtype, steps, shapes, masters=False, inf_at=None):
    """``steps`` steps of the contract's calls on one bucket, gradients from a
    GradientStream (``inf_at``: a step whose gradient holds an inf, which must be skipped);
    rho changes at a fifth and at half of the run. Returns the stored parameters and the
    true weights (as float64 lists)."""
    cd = compute(dtype)
    inputs = inputs_for(algorithm, dtype, sizes=shapes, masters=masters, missing=())
    if algorithm == "adamw":
        for t in inputs["steps"]:
            t.zero_()
        for s in inputs["exp_avg_sqs"]:
            s.zero_()
    for state in (inputs.get("momenta") or inputs["exp_avgs"]):
        state.zero_()
    stream = GradientStream(group_shapes=[shapes])
    hyp = hyper(algorithm)
    rho = len(hyp) - 1
    coef = torch.zeros((), dtype=cd, device=DEVICE)
    for step in range(steps):
        if step in (steps // 5, steps // 2):
            hyp[rho] *= 2.5 if step == steps // 5 else 0.1
        inputs["grads"] = [None if g is None else g.to(DEVICE) for g in
                           (stream.grad(step, 0, i, p.cpu()) for i, p in enumerate(inputs["params"]))]
        if step == inf_at:
            inputs["grads"][0].view(-1)[0] = float("inf")
        partials = getattr(backend, PARTIALS[algorithm])(**inputs, hyper=hyp, norm_dtype=cd)
        total, nonfinite = backend.sum_segment_partials(partials, cd)
        coef_new = backend.perturbation_coef(total, hyp[rho], coef, found_inf=nonfinite)
        getattr(backend, STEP[algorithm])(**inputs, hyper=hyp, coef_old=coef, coef_new=coef_new,
                                          found_inf=nonfinite)
        coef = coef_new
    stored = [p.double().cpu().clone() for p in inputs["params"]]
    backend.remove_perturbation_(inputs["params"], inputs.get("momenta") or inputs["exp_avgs"],
                                 inputs["masters"], coef=coef)
    return stored, [p.double().cpu() for p in inputs["params"]]


STREAM_SHAPES = [(5, 3), (1025,), (), (33,)]


# the skipped step's AdamW arithmetic meets inf / inf (under the interpreter numpy warns) before
# its stores are masked off
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("algorithm", ["msam", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_stream_matches_reference(algorithm, dtype):
    """Both backends run the same calls on one stream, with a skipped step: the trajectories
    agree to the rounding of the dtype (bf16 with fp32 master weights)."""
    steps = 20
    masters = dtype in HALF
    ours = drive(triton_kernels, algorithm, dtype, steps, STREAM_SHAPES, masters, inf_at=7)
    ref = drive(reference, algorithm, dtype, steps, STREAM_SHAPES, masters, inf_at=7)
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    assert relative_error(ours[0], ref[0]) <= tol
    assert relative_error(ours[1], ref[1]) <= tol


def test_adamw_float32_within_twice_the_reference_error_over_200_steps():
    """Against the float64 reference run (the oracle), Triton AdamW-MSAM in float32 errs at
    most twice as much as the float32 reference: the bias corrections and the coefficient are
    formed in float64 and the update divides and takes roots with IEEE rounding."""
    exact = drive(reference, "adamw", torch.float64, 200, STREAM_SHAPES)
    ref = drive(reference, "adamw", torch.float32, 200, STREAM_SHAPES)
    ours = drive(triton_kernels, "adamw", torch.float32, 200, STREAM_SHAPES)
    for k in (0, 1):  # stored parameters, true weights
        own = relative_error(ref[k], exact[k])
        assert 0 < own < 1e-4
        assert relative_error(ours[k], exact[k]) <= 2 * own


def test_sum_does_not_depend_on_tuning_or_table(monkeypatch):
    """Deterministic reductions: other rows per step, other warps, a rebuilt table: same bits."""
    inputs = inputs_for("msam", torch.float32, sizes=[BIG, (1025,), (3,)], missing=())
    kwargs = dict(hyper=hyper("msam"), norm_dtype=torch.float32)
    results = []
    for cfg in (tuning.Config(1, 4), tuning.Config(4, 8), tuning.Config(2, 4)):
        monkeypatch.setattr(tuning, "config", lambda name, dtype, interpreted, cfg=cfg: cfg)
        layout.clear_cache()
        partials = triton_kernels.msam_sgd_partials(**inputs, **kwargs)
        results.append(triton_kernels.sum_segment_partials(partials, torch.float32)[0])
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_tuning_is_a_lookup_never_a_measurement(monkeypatch):
    """Steps never time anything (that would synchronize, and fail under graph capture):
    without a ``tune()`` call every kernel uses the default; ``choose`` keeps the fastest."""
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("timed in a step"))
    monkeypatch.setattr(tuning, "_chosen", {})
    drive(triton_kernels, "adamw", torch.float32, 2, [(5, 3)])
    assert tuning.config("adamw_msam_step_kernel", torch.float32, interpreted=False) == tuning.DEFAULT
    timings = iter([3.0, 1.0, 2.0, 5.0, 4.0, 6.0])
    best = tuning.choose("adamw_msam_step_kernel", torch.float32, lambda: next(timings))
    assert best == tuning.CANDIDATES[1]
    assert tuning.config("adamw_msam_step_kernel", torch.float32, interpreted=False) == best
    assert tuning.config("adamw_msam_step_kernel", torch.bfloat16, interpreted=False) == tuning.DEFAULT
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="GPU"):
            triton_kernels.tune(DEVICE)


# --------------------------------------------------- capability "stash": MSAM-SGD in backward
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0], ids=["", "finite", "skip"])
def test_stash_then_finish(dtype, found_inf):
    """The stash writes the new momenta, keeps the old ones in the gradients and returns the
    partials of ``msam_sgd_partials``; the finish completes the step as the reference does,
    and a skipped step leaves every tensor as it was before the stash, bit for bit."""
    assert "stash" in triton_kernels.capabilities
    inputs = inputs_for("msam", dtype, sizes=SIZES + [BIG], missing=(1,))
    before = clone(inputs)
    stepped = [i for i, g in enumerate(inputs["grads"]) if g is not None]
    pick = {k: [v[i] for i in stepped] for k, v in inputs.items() if k != "masters"}
    kwargs = dict(hyper=hyper("msam"), norm_dtype=compute(dtype), grad_scale=torch.tensor(2.0, device=DEVICE))
    expected = triton_kernels.msam_sgd_partials(**pick, masters=[None] * len(stepped), **kwargs)
    (ours, got), (ref, want) = run_both("msam_sgd_overlap_stash_", pick, **kwargs)
    assert torch.equal(got, expected)
    assert all(torch.equal(a, before["momenta"][i]) for a, i in zip(ours["grads"], stepped))
    assert_matches(ours["momenta"], ref["momenta"], STATE_TOL[compute(dtype)])
    finish = dict(hyper=hyper("msam"), **coefs(dtype), found_inf=flags(found_inf))
    results = []
    for backend, state in ((triton_kernels, ours), (reference, ref)):
        params, momenta = clone(before["params"]), clone(before["momenta"])
        stashes = [None] * len(params)
        for j, i in enumerate(stepped):
            params[i], momenta[i], stashes[i] = state["params"][j], state["momenta"][j], state["grads"][j]
        backend.msam_sgd_overlap_finish_(params, stashes, momenta, **finish)
        results.append((params, momenta))
    assert_matches(results[0][0], results[1][0], STATE_TOL[compute(dtype)])
    if found_inf:
        for got_, want_ in zip(results[0], (before["params"], before["momenta"])):
            assert all(torch.equal(a, b) for a, b in zip(got_, want_))


def test_stash_refuses_half_parameters():
    inputs = inputs_for("msam", torch.bfloat16, sizes=[(3,)], missing=())
    with pytest.raises(ValueError, match="cannot hold"):
        triton_kernels.msam_sgd_overlap_stash_(inputs["params"], inputs["grads"], inputs["momenta"],
                                               hyper=hyper("msam"), norm_dtype=torch.float32)


@pytest.mark.skipif(DEVICE != "cuda", reason="streams and CUDA graph capture need a CUDA GPU")
def test_captured_step_follows_hyper_changes_after_an_abandoned_capture():
    """Warm-up on a side stream (tables built there, used on the main stream), then a capture
    that is never replayed, then a second capture replayed with lr and rho changed in place
    between replays: every replay equals the eager step. Gradients made inside the captured
    function get fresh addresses, so each capture builds its own table."""
    static = inputs_for("msam", torch.float32, sizes=[(5, 3), (1025,), BIG], missing=())
    eager = clone(static)

    def step(state, h, coef):
        state = {**state, "grads": [g * 1.0 for g in state["grads"]]}
        partials = triton_kernels.msam_sgd_partials(**state, hyper=h, norm_dtype=torch.float32)
        total, nonfinite = triton_kernels.sum_segment_partials(partials, torch.float32)
        new = triton_kernels.perturbation_coef(total, h[3], coef, nonfinite)
        triton_kernels.msam_sgd_step_(**state, hyper=h, coef_old=coef, coef_new=new, found_inf=nonfinite)
        coef.copy_(new)

    h_graph, h_eager = hyper("msam"), hyper("msam")
    c_graph, c_eager = torch.zeros((), device=DEVICE), torch.zeros((), device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static, h_graph, c_graph)
    torch.cuda.current_stream().wait_stream(side)
    step(eager, h_eager, c_eager)
    abandoned = torch.cuda.CUDAGraph()
    with torch.cuda.graph(abandoned):
        step(static, h_graph, c_graph)
    del abandoned
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static, h_graph, c_graph)
    for lr, rho in ((0.1, 0.3), (0.05, 0.6), (0.2, 0.0)):
        for h in (h_graph, h_eager):
            h[0], h[3] = lr, rho
        graph.replay()
        step(eager, h_eager, c_eager)
        torch.cuda.synchronize()
        assert torch.equal(c_graph, c_eager)
        for key in ("params", "momenta"):
            assert all(torch.equal(a, b) for a, b in zip(static[key], eager[key])), key


# -------------------------------------------------------------------------- perturbation
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masters", [False, True], ids=["", "masters"])
def test_apply_and_remove_perturbation(dtype, masters):
    if masters and dtype not in HALF:
        pytest.skip("master weights are for half parameters")
    cd = compute(dtype)
    base = inputs_for("msam", dtype, masters=masters)
    inputs = dict(params=base["params"], directions=base["momenta"], masters=base["masters"])
    for op in ("apply_perturbation_", "remove_perturbation_"):
        (ours, _), (ref, _) = run_both(op, inputs, coef=torch.tensor(0.25, dtype=cd, device=DEVICE))
        assert_matches(ours["params"], ref["params"], STORAGE_ULP[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_remove_perturbation_with_some_masters(dtype):
    cd = compute(dtype)
    inputs = inputs_for("msam", dtype, masters=True)
    masters = inputs["masters"]
    masters[0] = masters[3] = None  # a bucket mixing both kinds still works
    inputs = dict(params=inputs["params"], directions=inputs["momenta"], masters=masters)
    (ours, _), (ref, _) = run_both("remove_perturbation_", inputs,
                                   coef=torch.tensor(0.25, dtype=cd, device=DEVICE))
    assert_matches(ours["params"], ref["params"], STORAGE_ULP[dtype])


@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0], ids=["", "finite", "skip"])
@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rho", ["float", torch.float32, torch.float64], ids=str)
def test_perturbation_coef(found_inf, norm_dtype, rho):
    total = torch.tensor(7.25, dtype=norm_dtype, device=DEVICE)
    old = torch.tensor(0.125, dtype=torch.float32, device=DEVICE)
    rho = 0.3 if rho == "float" else torch.tensor(0.3, dtype=rho, device=DEVICE)
    got = triton_kernels.perturbation_coef(total, rho, old, flags(found_inf))
    want = reference.perturbation_coef(total, rho, old, flags(found_inf))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)  # both in float64, rounded once


# ----------------------------------------------------------------------------------- SAM
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True], ids=["", "adaptive"])
@pytest.mark.parametrize("in_place", [False, True], ids=["separate", "in_place"])
def test_sam_ascent(dtype, adaptive, in_place):
    cd = compute(dtype)
    params, grads = tensors(SIZES, dtype, 0), tensors(SIZES, dtype, 1)
    got = triton_kernels.sam_ascent_partials(params, grads, adaptive=adaptive, norm_dtype=cd)
    want = reference.sam_ascent_partials(params, grads, adaptive=adaptive, norm_dtype=cd)
    assert_partials_match(got, want, 2 * STATE_TOL[cd])
    scale = torch.tensor(0.05, dtype=cd, device=DEVICE)
    (ours_params, ours), (ref_params, ref) = (sam_ascent_both(backend, params, grads, in_place, scale=scale,
                                                              adaptive=adaptive, found_inf=flags(0.0))
                                              for backend in (triton_kernels, reference))
    assert_matches(ours, ref, STORAGE_ULP[dtype])
    if not in_place:
        assert all(torch.equal(a, b) for a, b in zip(ours_params, params))  # w is only read


@pytest.mark.parametrize("in_place", [False, True], ids=["separate", "in_place"])
def test_sam_ascent_skip_writes_w_or_nothing(in_place):
    params, grads = tensors(SIZES, torch.float32, 0), tensors(SIZES, torch.float32, 1)
    for backend in (triton_kernels, reference):
        now, outs = sam_ascent_both(backend, params, grads, in_place, scale=torch.tensor(0.05, device=DEVICE),
                                    adaptive=False, found_inf=flags(1.0))
        assert all(torch.equal(a, b) for a, b in zip(now, params))
        assert all(torch.equal(a, b) for a, b in zip(outs, params))


def sam_ascent_both(backend, params, grads, in_place, **kwargs):
    """``backend.sam_ascent_`` on copies of ``params``, into them or into NaN-filled buffers;
    returns (the copies, the outs)."""
    params = [p.clone() for p in params]
    outs = params if in_place else [torch.full_like(p, float("nan")) for p in params]
    backend.sam_ascent_(params, grads, outs, **kwargs)
    return params, outs


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
        (_, got), (_, want) = run_both("msam_sgd_partials", inputs, hyper=hyper("msam"),
                                       norm_dtype=torch.float32)
        assert_partials_match(got, want, 2e-6)
        (ours, _), (ref, _) = run_both("msam_sgd_step_", inputs, hyper=hyper("msam"),
                                       **coefs(torch.float32))
        assert_matches(ours["params"], ref["params"], 2e-6)
        assert_matches(ours["momenta"], ref["momenta"], 2e-6)
        assert ours["params"][0].is_contiguous(memory_format=torch.channels_last)


def test_misaligned_views_run_in_their_own_launch():
    """Vector loads are decided per tensor: a gradient viewing a buffer at an odd offset puts
    that tensor in an unaligned launch and leaves the others aligned; results are unchanged."""
    flat = torch.randn(3000, device=DEVICE)
    inputs = inputs_for("msam", torch.float32, sizes=[(1025,), (1025,)], missing=())
    inputs["grads"] = [flat[:1025], flat[1029:2054]]  # the second starts 4 bytes off 16
    records = [layout.Record(0, [p, g]) for p, g in zip(inputs["params"], inputs["grads"])]
    assert [plan.aligned for plan in layout.launches(torch.device(DEVICE), [records])[0]] == [True, False]
    (ours, _), (ref, _) = run_both("msam_sgd_step_", inputs, hyper=hyper("msam"), **coefs(torch.float32))
    assert_matches(ours["params"], ref["params"], 2e-6)


def test_backend_resolves_and_names_itself():
    from msam_fused import backends

    assert backends.resolve("triton", torch.device(DEVICE)) is triton_kernels
    assert triton_kernels.name == "triton"
    other = "cuda" if DEVICE == "cpu" else "cpu"
    assert "interpreter" in triton_kernels.unavailable_reason(other) or "TRITON_INTERPRET" in \
        triton_kernels.unavailable_reason(other)


def test_bad_input_is_a_clear_error():
    inputs = inputs_for("msam", torch.float32, sizes=[(3,)], missing=())
    inputs["momenta"] = [torch.zeros(3, dtype=torch.float64, device=DEVICE)]
    with pytest.raises(TypeError, match="momenta holds a torch.float64"):
        triton_kernels.msam_sgd_step_(**inputs, hyper=hyper("msam"), **coefs(torch.float32))
    inputs = inputs_for("msam", torch.float32, sizes=[(3,)], missing=())
    before = clone(inputs)
    with pytest.raises(ValueError, match="hyper must be a 1-D float64 tensor of 4 entries"):
        triton_kernels.msam_sgd_step_(**inputs, hyper=hyper("msam").float(), **coefs(torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(inputs["params"], before["params"]))


# ------------------------------------------------------------------- torch.library / compile
def test_opcheck():
    cd = torch.float32
    inputs = inputs_for("msam", torch.float32, sizes=[(3,), (2, 2)], missing=())
    p, g, v = inputs["params"], inputs["grads"], inputs["momenta"]
    h, c = hyper("msam"), coefs(cd)
    torch.library.opcheck(ops.msam_sgd_partials, (p, g, v, h, cd, None))
    torch.library.opcheck(ops.msam_sgd_step_,
                          (p, g, v, [], h, c["coef_old"], c["coef_new"], None, flags(0.0)))
    torch.library.opcheck(ops.perturb_, (p, v, [None, None], c["coef_old"], -1))
    partials = ops.msam_sgd_partials(p, g, v, h, cd, None)
    torch.library.opcheck(ops.sum_segment_partials, (partials, cd))
    torch.library.opcheck(ops.perturbation_coef, (torch.tensor(4.0, device=DEVICE),
                                                  torch.tensor(0.5, dtype=torch.float64, device=DEVICE),
                                                  c["coef_old"], None))


def test_compiled_step_traces_through_the_ops():
    """A ``torch.compile(fullgraph=True)`` MSAM step (partials, their sum, coefficient, write
    pass) gives the eager result: the ops have fake versions and declare what they mutate."""
    inputs = inputs_for("msam", torch.float32, sizes=[(3,), (1025,)], missing=())
    h, coef = hyper("msam"), torch.tensor(0.3, device=DEVICE)

    def step(params, grads, momenta):
        masters = [None, None]
        partials = triton_kernels.msam_sgd_partials(params, grads, momenta, masters, hyper=h,
                                                    norm_dtype=torch.float32)
        total, nonfinite = triton_kernels.sum_segment_partials(partials, torch.float32)
        new_coef = triton_kernels.perturbation_coef(total, h[3], coef, nonfinite)
        triton_kernels.msam_sgd_step_(params, grads, momenta, masters, hyper=h, coef_old=coef,
                                      coef_new=new_coef, found_inf=nonfinite)
        return new_coef

    eager, compiled = clone(inputs), clone(inputs)
    want = step(eager["params"], eager["grads"], eager["momenta"])
    backend = "aot_eager" if INTERPRETED else "inductor"
    got = torch.compile(step, backend=backend, fullgraph=True)(
        compiled["params"], compiled["grads"], compiled["momenta"])
    assert torch.equal(got, want)
    for key in ("params", "momenta"):
        assert all(torch.equal(a, b) for a, b in zip(compiled[key], eager[key]))
