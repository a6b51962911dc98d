"""The fused ops one call at a time, and over a stream of steps, against the reference backend
(msam_fused/reference.py, the literal definition of the step contract of docs/design.md).

How close "the same" is, and why:

* CPU, one call: the kernels do the reference's operations in its order in the compute dtype,
  with no multiply-add contraction (-ffp-contract=off), so every element written by
  MSAM-SGD, the perturbation ops and SAM's ascent is bit-identical to the reference. AdamW-MSAM's
  state and step counts are too; its weights may differ by an ulp, because torch.sqrt on long
  CPU tensors goes through a vector-math library that is faithfully (not correctly) rounded,
  while the kernels' sqrt is IEEE: ``ADAMW_WEIGHT_ULPS`` ulps of the result.
* CUDA, one call: nvcc contracts ``a * b + c`` into one fused multiply-add (one rounding
  instead of two), so each written element is within ``CUDA_ULPS`` ulps (relative to the
  tensor's largest magnitude).
* Partial sums of squares add in another order than torch's sum (per segment, in compute
  precision over short runs, then in double): relative ``SUM_RTOL`` of the norm dtype.
* Over a stream of steps the coefficient feeds back into the weights, so runs drift apart by
  rounding; then the rule is that of docs/design.md: the fused run's error against a float64
  reference run is at most twice the reference's own error at that precision, plus a floor
  of a few ulps.
"""

import pytest
import torch

from fused_cases import (DEVICES, ODD_SHAPES, adamw_msam_hyper, bucket, clone, msam_sgd_hyper,
                         require_extension)
from msam_fused import fused_ops, reference

pytestmark = pytest.mark.usefixtures("extension")

LOW = (torch.bfloat16, torch.float16)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ADAMW_WEIGHT_ULPS = 2
CUDA_ULPS = 4
SUM_RTOL = {torch.float32: 1e-6, torch.float64: 1e-13}


@pytest.fixture(scope="module")
def extension():
    require_extension()


def norm_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def coefs(dtype, device):
    nd = norm_dtype(dtype)
    return torch.tensor(0.3, dtype=nd, device=device), torch.tensor(0.7, dtype=nd, device=device)


def assert_matches(actual, expected, *, ulps=0):
    """Bit for bit (``ulps=0``), or within ``ulps`` ulps of each tensor's dtype relative to its
    largest magnitude."""
    for a, e in zip(actual, expected):
        if a is None or e is None:
            assert a is None and e is None
        elif ulps == 0:
            assert torch.equal(a, e), f"differs in {int((a != e).sum())} of {a.numel()} elements"
        else:
            eps = torch.finfo(a.dtype).eps
            scale = float(e.abs().max()) if e.numel() else 0.0
            torch.testing.assert_close(a, e, rtol=ulps * eps, atol=ulps * eps * scale)


def write_ulps(device, cpu_ulps=0):
    return cpu_ulps if device == "cpu" else CUDA_ULPS


def assert_sum_close(partials, ref_partials, nd):
    ours, bad = fused_ops.sum_segment_partials(partials, nd)
    ref, ref_bad = reference.sum_segment_partials(ref_partials, nd)
    assert ours.dtype == nd and bad.dtype == torch.bool and bool(bad) == bool(ref_bad)
    torch.testing.assert_close(ours, ref, rtol=SUM_RTOL[nd], atol=0)
    return ours


# ------------------------------------------------------------------------------ MSAM-SGD
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masters", [False, True])
def test_msam_sgd_matches_reference(device, dtype, masters):
    if masters and dtype not in LOW:
        pytest.skip("master weights are for bf16/fp16 parameters")
    params, grads, momenta, ms = bucket(ODD_SHAPES, dtype, device, masters=masters, missing=(1, 4))
    coef_old, coef_new = coefs(dtype, device)
    hyper, nd = msam_sgd_hyper(device), norm_dtype(dtype)

    read_only = [clone(params), clone(momenta), clone(ms)]
    partials = fused_ops.msam_sgd_partials(read_only[0], grads, read_only[1], read_only[2], hyper=hyper,
                                           norm_dtype=nd)
    assert partials.dtype == torch.float64 and partials.device.type == device
    assert partials.shape == (sum(fused_ops.segment_count(p.numel(), device) for p in params), 2)
    assert_matches(read_only[0] + read_only[1], params + momenta)
    assert_sum_close(partials, reference.msam_sgd_partials(params, grads, momenta, ms, hyper=hyper,
                                                           norm_dtype=nd), nd)

    ours, ref = [clone(params), clone(momenta), clone(ms)], [clone(params), clone(momenta), clone(ms)]
    fused_ops.msam_sgd_step_(ours[0], grads, ours[1], ours[2], hyper=hyper, coef_old=coef_old, coef_new=coef_new)
    reference.msam_sgd_step_(ref[0], grads, ref[1], ref[2], hyper=hyper, coef_old=coef_old, coef_new=coef_new)
    for a, e in zip(ours, ref):
        assert_matches(a, e, ulps=write_ulps(device))


# ---------------------------------------------------------------------------- AdamW-MSAM
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masters", [False, True])
def test_adamw_msam_matches_reference(device, dtype, masters):
    if masters and dtype not in LOW:
        pytest.skip("master weights are for bf16/fp16 parameters")
    params, grads, exp_avgs, ms = bucket(ODD_SHAPES, dtype, device, masters=masters, missing=(2,))
    exp_avg_sqs = [m.square() for m in exp_avgs]
    steps = [torch.tensor(float(i), device=device) for i in range(len(params))]
    coef_old, coef_new = coefs(dtype, device)
    hyper, nd = adamw_msam_hyper(device), norm_dtype(dtype)

    partials = fused_ops.adamw_msam_partials(params, grads, exp_avgs, exp_avg_sqs, steps, ms, hyper=hyper,
                                             norm_dtype=nd)
    assert_sum_close(partials, reference.adamw_msam_partials(params, grads, exp_avgs, exp_avg_sqs, steps, ms,
                                                             hyper=hyper, norm_dtype=nd), nd)

    def state():
        return [clone(params), clone(exp_avgs), clone(exp_avg_sqs), clone(steps), clone(ms)]

    ours, ref = state(), state()
    for backend, s in ((fused_ops, ours), (reference, ref)):
        backend.adamw_msam_step_(s[0], grads, s[1], s[2], s[3], s[4], hyper=hyper, coef_old=coef_old,
                                 coef_new=coef_new)
    assert [float(t) for t in ours[3]] == [i + (i != 2) for i in range(len(params))]
    assert_matches(ours[0], ref[0], ulps=write_ulps(device, ADAMW_WEIGHT_ULPS))
    assert_matches(ours[4], ref[4], ulps=write_ulps(device, ADAMW_WEIGHT_ULPS))
    for a, e in zip(ours[1:4], ref[1:4]):
        assert_matches(a, e, ulps=write_ulps(device))


def test_adamw_bias_corrections_are_formed_in_float64():
    """beta2 = 0.9999 at t = 1: 1 - beta2**t in float32 would be off by ~1e-4 relative."""
    params, grads, exp_avgs, _ = bucket([(9,)], torch.float32, "cpu")
    hyper = adamw_msam_hyper("cpu", beta2=0.9999)
    state = [clone(params), clone(exp_avgs), [torch.zeros(9)], [torch.zeros(())]]
    zero = torch.zeros(())
    fused_ops.adamw_msam_step_(state[0], grads, state[1], state[2], state[3], [None], hyper=hyper, coef_old=zero,
                               coef_new=zero)
    s_new = (1 - 0.9999) * grads[0].double() ** 2
    m_new = 0.9 * exp_avgs[0].double() + 0.1 * grads[0].double()
    step_size, bias2_sqrt = 1e-2 / (1 - 0.9), (1 - 0.9999) ** 0.5
    expected = (params[0].double() - step_size * m_new / (s_new.sqrt() / bias2_sqrt + 1e-8)) * (1 - 1e-2 * 0.05)
    torch.testing.assert_close(state[0][0].double(), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------- a stream of steps, 2x rule
def stream_grad(step, i, p):
    """Seeded noise plus a small multiple of the weights; parameter 2 gets none every third step."""
    if i == 2 and step % 3 == 2:
        return None
    gen = torch.Generator().manual_seed(1009 * step + i)
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    return (noise + 0.1 * p.detach().cpu().double()).to(device=p.device, dtype=p.dtype)


STREAM_SHAPES = [(), (1,), (7,), (33,), (17, 3), (1025,), (40_000,)]


def run_stream(backend, algorithm, dtype, device, steps, masters):
    """``steps`` steps of the contract (partials, sum, coefficient, write pass) on one bucket;
    rho is ``hyper``'s own entry (a 0-d tensor on the device). Returns the stored weights."""
    gen = torch.Generator().manual_seed(0)
    state_dtype = torch.float32 if dtype in LOW else dtype
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
              for s in STREAM_SHAPES]
    ms = [p.float() for p in params] if masters else [None] * len(params)
    nd = norm_dtype(dtype)
    coef = torch.zeros((), dtype=nd, device=device)
    if algorithm == "msam_sgd":
        hyper = msam_sgd_hyper(device, rho=0.3)
        state = [[torch.zeros_like(p, dtype=state_dtype) for p in params]]
        partials_fn, step_fn = backend.msam_sgd_partials, backend.msam_sgd_step_
    else:
        hyper = adamw_msam_hyper(device, rho=0.3)
        state = [[torch.zeros_like(p, dtype=state_dtype) for p in params] for _ in range(2)]
        state.append([torch.zeros((), device=device) for _ in params])
        partials_fn, step_fn = backend.adamw_msam_partials, backend.adamw_msam_step_
    for step in range(steps):
        grads = [stream_grad(step, i, p) for i, p in enumerate(params)]
        partials = partials_fn(params, grads, *state, ms, hyper=hyper, norm_dtype=nd)
        sum_of_squares, nonfinite = backend.sum_segment_partials(partials, nd)
        coef_new = backend.perturbation_coef(sum_of_squares, hyper[-1], coef, nonfinite)
        step_fn(params, grads, *state, ms, hyper=hyper, coef_old=coef, coef_new=coef_new, found_inf=nonfinite)
        coef = coef_new
    return params


def relative_error(actual, expected):
    a = torch.cat([t.double().reshape(-1).cpu() for t in actual])
    e = torch.cat([t.double().reshape(-1).cpu() for t in expected])
    return float((a - e).abs().max() / e.abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ["msam_sgd", "adamw_msam"])
@pytest.mark.parametrize("dtype, masters", [(torch.float32, False), (torch.float64, False),
                                            (torch.bfloat16, False), (torch.bfloat16, True),
                                            (torch.float16, True)])
def test_a_stream_of_steps_is_within_twice_the_references_error(device, algorithm, dtype, masters):
    steps = 40
    oracle = run_stream(reference, algorithm, torch.float64, device, steps, False)
    ref = run_stream(reference, algorithm, dtype, device, steps, masters)
    ours = run_stream(fused_ops, algorithm, dtype, device, steps, masters)
    ref_error, our_error = relative_error(ref, oracle), relative_error(ours, oracle)
    floor = 8 * torch.finfo(dtype).eps
    assert our_error <= 2 * ref_error + floor, (our_error, ref_error)


# ------------------------------------------------------------------- perturbation, coefficient
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masters", [False, True])
def test_perturbation_matches_reference(device, dtype, masters):
    params, _, directions, ms = bucket(ODD_SHAPES, dtype, device, masters=masters)
    coef = coefs(dtype, device)[1]
    for fn in ("apply_perturbation_", "remove_perturbation_"):
        ours, ref = clone(params), clone(params)
        getattr(fused_ops, fn)(ours, directions, ms, coef=coef)
        getattr(reference, fn)(ref, directions, ms, coef=coef)
        assert_matches(ours, ref, ulps=write_ulps(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sum_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rho_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_perturbation_coef_matches_reference(device, sum_dtype, rho_dtype):
    """Both form rho / (sqrt(sum) + 1e-12) in float64, then round once: the same bits."""
    total = torch.tensor(7.5, dtype=sum_dtype, device=device)
    old = torch.tensor(0.25, dtype=sum_dtype, device=device)
    rho = torch.tensor(0.3, dtype=rho_dtype, device=device)
    new = fused_ops.perturbation_coef(total, rho, old)
    assert new.dtype == sum_dtype and new.data_ptr() != old.data_ptr()
    assert torch.equal(new, reference.perturbation_coef(total, rho, old))
    assert torch.equal(fused_ops.perturbation_coef(total, 0.3, old), reference.perturbation_coef(total, 0.3, old))
    for found_inf in (torch.tensor(True, device=device), torch.tensor(1.0, device=device)):
        assert torch.equal(fused_ops.perturbation_coef(total, rho, old, found_inf), old)
    zero = torch.zeros((), dtype=sum_dtype, device=device)
    assert torch.equal(fused_ops.perturbation_coef(zero, rho, old), reference.perturbation_coef(zero, rho, old))


# ----------------------------------------------------------------------------------- SAM
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("outs_kind", ["in_place", "separate", "misaligned"])
def test_sam_ascent_matches_reference(device, dtype, adaptive, outs_kind):
    params, grads, _, _ = bucket(ODD_SHAPES, dtype, device)
    nd = norm_dtype(dtype)
    partials = fused_ops.sam_ascent_partials(params, grads, adaptive=adaptive, norm_dtype=nd)
    ref_partials = reference.sam_ascent_partials(params, grads, adaptive=adaptive, norm_dtype=nd)
    sum_of_squares = assert_sum_close(partials, ref_partials, nd)
    scale = reference.perturbation_coef(sum_of_squares, 0.05, torch.zeros((), dtype=nd, device=device))
    ours_params, ref_params = clone(params), clone(params)
    ours, ref = sam_outs(ours_params, outs_kind), sam_outs(ref_params, outs_kind)
    fused_ops.sam_ascent_(ours_params, grads, ours, scale=scale, adaptive=adaptive)
    reference.sam_ascent_(ref_params, grads, ref, scale=scale, adaptive=adaptive)
    assert_matches(ours, ref, ulps=write_ulps(device))
    if outs_kind != "in_place":
        assert_matches(ours_params, params)  # w is only read


def sam_outs(params, kind):
    """Where the ascent writes: the parameters, fresh buffers, or buffers one element past an
    aligned address (the CPU kernel's unaligned head before its streamed vectors)."""
    if kind == "in_place":
        return params
    if kind == "separate":
        return [torch.full_like(p, float("nan")) for p in params]
    return [torch.full((p.numel() + 1,), float("nan"), dtype=p.dtype, device=p.device)[1:].view(p.shape)
            for p in params]


# ------------------------------------------------------------- skip, unscale, non-finite
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("found_inf_dtype", [torch.bool, torch.float32])
def test_found_inf_leaves_everything_bit_identical(device, found_inf_dtype):
    params, grads, momenta, ms = bucket(ODD_SHAPES, torch.bfloat16, device, masters=True, missing=(3,))
    exp_avg_sqs = [m.square() for m in momenta]
    steps = [torch.tensor(3.0, device=device) for _ in params]
    found_inf = torch.ones((), dtype=found_inf_dtype, device=device)
    coef_old, coef_new = coefs(torch.bfloat16, device)
    before = [clone(x) for x in (params, momenta, exp_avg_sqs, ms, steps)]
    fused_ops.msam_sgd_step_(params, grads, momenta, ms, hyper=msam_sgd_hyper(device), coef_old=coef_old,
                             coef_new=coef_new, found_inf=found_inf)
    fused_ops.adamw_msam_step_(params, grads, momenta, exp_avg_sqs, steps, ms, hyper=adamw_msam_hyper(device),
                               coef_old=coef_old, coef_new=coef_new, found_inf=found_inf)
    ones = [torch.ones_like(p) for p in params]
    outs = [torch.full_like(p, float("nan")) for p in params]
    fused_ops.sam_ascent_(params, ones, outs, scale=coef_new, adaptive=False, found_inf=found_inf)
    fused_ops.sam_ascent_(params, ones, params, scale=coef_new, adaptive=False, found_inf=found_inf)
    for now, then in zip((params, momenta, exp_avg_sqs, ms, steps), before):
        assert_matches(now, then)
    assert_matches(outs, before[0])  # a skipped ascent into other memory writes w exactly


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grad_scale_unscales_inside_the_kernel(device, dtype):
    params, grads, momenta, ms = bucket(ODD_SHAPES, dtype, device, masters=dtype in LOW, missing=(2,))
    scale = torch.tensor(1024.0, device=device)
    scaled = [None if g is None else g * 1024 for g in grads]
    coef_old, coef_new = coefs(dtype, device)
    hyper, nd = msam_sgd_hyper(device), norm_dtype(dtype)
    assert_sum_close(fused_ops.msam_sgd_partials(params, scaled, momenta, ms, hyper=hyper, norm_dtype=nd,
                                                 grad_scale=scale),
                     reference.msam_sgd_partials(params, scaled, momenta, ms, hyper=hyper, norm_dtype=nd,
                                                 grad_scale=scale), nd)
    ours, ref = [clone(params), clone(momenta), clone(ms)], [clone(params), clone(momenta), clone(ms)]
    for backend, s in ((fused_ops, ours), (reference, ref)):
        backend.msam_sgd_step_(s[0], scaled, s[1], s[2], hyper=hyper, coef_old=coef_old, coef_new=coef_new,
                               grad_scale=scale)
    for a, e in zip(ours, ref):
        assert_matches(a, e, ulps=write_ulps(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [(7, 12_345), (4, 50), (0, 0)])
def test_partials_flag_nonfinite_gradients_in_their_segment(device, bad, where):
    params, grads, momenta, ms = bucket(ODD_SHAPES, torch.float32, device)
    index, offset = where
    grads[index].view(-1)[offset] = bad
    segment = sum(fused_ops.segment_count(p.numel(), device) for p in params[:index])
    segment += offset // torch.ops.msam_fused.segment_length(torch.device(device))
    hyper = msam_sgd_hyper(device)
    for partials in (fused_ops.msam_sgd_partials(params, grads, momenta, ms, hyper=hyper, norm_dtype=torch.float32),
                     fused_ops.adamw_msam_partials(params, grads, momenta, momenta, [None] * len(params), ms,
                                                   hyper=adamw_msam_hyper(device), norm_dtype=torch.float32),
                     fused_ops.sam_ascent_partials(params, grads, adaptive=False, norm_dtype=torch.float32)):
        assert partials[:, 1].isnan().nonzero().flatten().tolist() == [segment]
        assert bool(fused_ops.sum_segment_partials(partials, torch.float32)[1])


@pytest.mark.parametrize("device", DEVICES)
def test_hyper_is_read_when_the_op_runs(device):
    """Changing ``hyper`` in place (as an LR schedule on a 0-d tensor does) changes the step."""
    params, grads, momenta, _ = bucket([(5,), (40,)], torch.float32, device)
    hyper = msam_sgd_hyper(device)
    zero = torch.zeros((), device=device)
    results = []
    for lr in (0.1, 0.02):
        hyper[0] = lr
        ours, ref = [clone(params), clone(momenta)], [clone(params), clone(momenta)]
        for backend, s in ((fused_ops, ours), (reference, ref)):
            backend.msam_sgd_step_(s[0], grads, s[1], [None, None], hyper=hyper, coef_old=zero, coef_new=zero)
        assert_matches(ours[0], ref[0], ulps=write_ulps(device))
        results.append(ours[0])
    assert not torch.equal(results[0][1], results[1][1])


# --------------------------------------------------------------------------- layouts, sizes
def layouts(device):
    """Parameters and gradients in memory orders the kernels do not walk directly."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=gen).to(device)
    conv = torch.randn(4, 3, 5, 5, generator=gen).to(device)
    return [
        (base.clone(), torch.randn(5, 6, generator=gen).to(device).t()),           # transposed grad
        (base.t().contiguous().t(), torch.randn(6, 5, generator=gen).to(device)),  # transposed param
        (conv.clone().to(memory_format=torch.channels_last),                     # channels_last both
         torch.randn(4, 3, 5, 5, generator=gen).to(device).to(memory_format=torch.channels_last)),
        (base.clone(), torch.randn(6, 10, generator=gen).to(device)[:, ::2]),       # strided grad
        (torch.randn(41, generator=gen).to(device)[1:], torch.randn(41, generator=gen).to(device)[1:]),  # offset
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_the_kernels_cannot_walk_match_reference(device):
    pairs = layouts(device)
    params, grads = [p for p, _ in pairs], [g for _, g in pairs]
    momenta = [torch.randn_like(p) for p in params]  # contiguous, unlike some params
    coef_old, coef_new = coefs(torch.float32, device)
    nones, hyper = [None] * len(params), msam_sgd_hyper(device)
    ours, ref = [clone(params), clone(momenta)], [clone(params), clone(momenta)]
    for backend, s in ((fused_ops, ours), (reference, ref)):
        backend.msam_sgd_step_(s[0], grads, s[1], nones, hyper=hyper, coef_old=coef_old, coef_new=coef_new)
    assert_matches(ours[0] + ours[1], ref[0] + ref[1], ulps=write_ulps(device))
    assert [p.stride() for p in ours[0]] == [p.stride() for p in params]


@pytest.mark.parametrize("device", DEVICES)
def test_many_tiny_tensors_and_one_huge(device):
    shapes = [(1 + i % 5,) for i in range(300)] + [(200_003,)] + [()] * 20
    params, grads, momenta, _ = bucket(shapes, torch.float32, device, missing=(5, 300))
    nones, hyper = [None] * len(params), msam_sgd_hyper(device)
    coef_old, coef_new = coefs(torch.float32, device)
    assert_sum_close(fused_ops.msam_sgd_partials(params, grads, momenta, nones, hyper=hyper, norm_dtype=torch.float32),
                     reference.msam_sgd_partials(params, grads, momenta, nones, hyper=hyper,
                                                 norm_dtype=torch.float32), torch.float32)
    ours, ref = [clone(params), clone(momenta)], [clone(params), clone(momenta)]
    for backend, s in ((fused_ops, ours), (reference, ref)):
        backend.msam_sgd_step_(s[0], grads, s[1], nones, hyper=hyper, coef_old=coef_old, coef_new=coef_new)
    assert_matches(ours[0] + ours[1], ref[0] + ref[1], ulps=write_ulps(device))


def test_partials_are_the_same_for_any_number_of_threads():
    params, grads, momenta, ms = bucket([(300_001,), (77,), (65_536,)], torch.float32, "cpu")
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(fused_ops.msam_sgd_partials(params, grads, momenta, ms, hyper=msam_sgd_hyper("cpu"),
                                                    norm_dtype=torch.float32))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, runs[0]) for r in runs)


# ------------------------------------------------------------------------------ bad input
def sgd_step(params, grads, momenta, masters=None, hyper=None, coef_old=None):
    coef = torch.tensor(0.1, device=params[0].device)
    torch.ops.msam_fused.msam_sgd_step_(params, grads, momenta, masters or [],
                                        msam_sgd_hyper(params[0].device) if hyper is None else hyper,
                                        coef if coef_old is None else coef_old, coef, None, None)


@pytest.mark.parametrize("make, message", [
    (lambda: ([torch.ones(3, dtype=torch.int32)], [torch.ones(3, dtype=torch.int32)], [torch.ones(3)]),
     "params\\[0\\] has dtype Int; the fused kernels support float32, float64, bfloat16 and float16"),
    (lambda: ([torch.ones(3)], [torch.ones(3, dtype=torch.float16)], [torch.ones(3)]),
     "grads\\[0\\] has dtype Half, expected Float"),
    (lambda: ([torch.ones(3, dtype=torch.bfloat16)], [torch.ones(3, dtype=torch.bfloat16)],
              [torch.ones(3, dtype=torch.bfloat16)]),
     "momenta\\[0\\] has dtype BFloat16, expected Float \\(state of BFloat16 parameters\\)"),
    (lambda: ([torch.ones(3), torch.ones(2, dtype=torch.float64)], [None, None], [torch.ones(3)] * 2),
     "params\\[1\\] has dtype Double, expected Float \\(all params of one call share one dtype\\)"),
    (lambda: ([torch.ones(3)], [torch.ones(4)], [torch.ones(3)]), "grads\\[0\\] has shape \\[4\\]"),
    (lambda: ([torch.ones(3)], [torch.ones(3)], []), "momenta has 0 tensors but params has 1"),
    (lambda: ([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], None, msam_sgd_hyper("cpu", lr=-1.0)),
     "hyper: lr must be a non-negative number"),
    (lambda: ([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], None, torch.zeros(3, dtype=torch.float64)),
     "hyper must be a contiguous 1-D float64 tensor of 4 entries \\(lr, weight_decay, momentum, rho\\)"),
    (lambda: ([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], None, torch.zeros(4)),
     "hyper must be a contiguous 1-D float64 tensor of 4 entries"),
    (lambda: ([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], None, None,
              torch.tensor(1, dtype=torch.int64)), "coef_old has dtype Long"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(make, message):
    args = make()
    params, grads, momenta = args[:3]
    before = clone(params) + clone(momenta)
    with pytest.raises(RuntimeError, match=f"msam_fused.msam_sgd_step_: {message}"):
        sgd_step(params, grads, momenta, *args[3:])
    assert all(torch.equal(a, b) for a, b in zip(clone(params) + clone(momenta), before))


def test_other_bad_input_is_a_clear_error():
    params, grads, momenta, _ = bucket([(3,)], torch.float32, "cpu")
    ops = torch.ops.msam_fused
    with pytest.raises(RuntimeError, match="adamw_msam_partials: hyper: betas must lie in \\[0, 1\\)"):
        ops.adamw_msam_partials(params, grads, momenta, adamw_msam_hyper("cpu", beta1=1.0), torch.float32)
    with pytest.raises(RuntimeError, match="msam_sgd_partials: norm_dtype must be float32 or float64, got Half"):
        ops.msam_sgd_partials(params, grads, momenta, msam_sgd_hyper("cpu"), torch.float16)
    with pytest.raises(RuntimeError, match="perturbation_coef: rho must be a one-element"):
        ops.perturbation_coef(torch.ones(()), torch.ones(2), torch.ones(()))
    with pytest.raises(RuntimeError, match="hyper is on meta but params\\[0\\] is on cpu"):
        ops.msam_sgd_partials(params, grads, momenta, msam_sgd_hyper("meta"), torch.float32)
    with pytest.raises(RuntimeError, match="grads\\[0\\] is on meta but params\\[0\\] is on cpu"):
        sgd_step([torch.ones(3)], [torch.ones(3, device="meta")], [torch.ones(3)])


@pytest.mark.gpu
def test_device_mix_is_a_clear_error_on_cuda():
    with pytest.raises(RuntimeError, match="grads\\[0\\] is on cpu but params\\[0\\] is on cuda:0"):
        sgd_step([torch.ones(3, device="cuda")], [torch.ones(3)], [torch.ones(3, device="cuda")])
    with pytest.raises(RuntimeError, match="hyper is on cpu but params\\[0\\] is on cuda:0"):
        sgd_step([torch.ones(3, device="cuda")], [torch.ones(3, device="cuda")], [torch.ones(3, device="cuda")],
                 hyper=msam_sgd_hyper("cpu"))


def test_adaptive_perturbations_are_refused():
    params, grads, momenta, ms = bucket([(3,)], torch.float32, "cpu")
    zero = torch.zeros(())
    with pytest.raises(NotImplementedError, match="msam_sgd_step_.*adaptive"):
        fused_ops.msam_sgd_step_(params, grads, momenta, ms, hyper=msam_sgd_hyper("cpu"), coef_old=zero,
                                 coef_new=zero, perturbations=momenta)
    with pytest.raises(NotImplementedError, match="adamw_msam_partials.*adaptive"):
        fused_ops.adamw_msam_partials(params, grads, momenta, momenta, [zero], ms, hyper=adamw_msam_hyper("cpu"),
                                      norm_dtype=torch.float32, perturbations=momenta)


def test_the_backend_namespace_names_its_capabilities():
    backend = fused_ops.backend("cpu")
    assert backend.name == "cpu" and backend.capabilities == frozenset({"stash"})
    for name in fused_ops.BACKEND_FUNCTIONS:
        assert getattr(backend, name) is getattr(fused_ops, name)
        assert hasattr(reference, name), name


# -------------------------------------------------------------------------------- opcheck
def op_samples(device):
    """(op, args) for every op: odd sizes, a missing gradient, master weights, found_inf."""
    params, grads, momenta, _ = bucket([(), (7,), (17, 3)], torch.float32, device, missing=(1,))
    bf_params, bf_grads, bf_momenta, bf_masters = bucket([(1,), (33,)], torch.bfloat16, device, masters=True)
    coef, coef_new = coefs(torch.float32, device)
    steps = [torch.tensor(2.0, device=device) for _ in params]
    no = torch.tensor(False, device=device)
    scale = torch.tensor(4.0, device=device)
    sgd, adamw = msam_sgd_hyper(device), adamw_msam_hyper(device)
    ops = torch.ops.msam_fused
    f32 = torch.float32
    with_grads = [params[0], params[2]], [momenta[0], momenta[2]]
    return [
        (ops.msam_sgd_partials, (params, grads, momenta, sgd, f32, scale)),
        (ops.msam_sgd_step_, (bf_params, bf_grads, bf_momenta, bf_masters, sgd, coef, coef_new, scale, no)),
        (ops.adamw_msam_partials, (params, grads, momenta, adamw, f32, None)),
        (ops.adamw_msam_step_, (params, grads, momenta, [m.square() for m in momenta], steps, [], adamw, coef,
                                coef_new, scale, no)),
        (ops.sum_segment_partials, (torch.rand(5, 2, dtype=torch.float64, device=device), f32)),
        (ops.perturbation_coef, (torch.tensor(4.0, device=device), sgd[3], coef, no)),
        (ops.perturb_, (bf_params, bf_momenta, bf_masters, coef, -1.0)),
        (ops.sam_ascent_partials, (*with_grads, True, f32)),
        (ops.sam_ascent_, (*with_grads, [torch.empty_like(params[0]), torch.empty_like(params[2])], coef, False,
                           None)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(9))
def test_opcheck(device, index):
    op, args = op_samples(device)[index]
    torch.library.opcheck(op, args)


@pytest.mark.slow
def test_the_step_compiles_into_one_graph():
    """partials, sum, coefficient and write pass trace with fullgraph=True (fake kernels) and
    give the eager result."""
    def step(params, grads, momenta, hyper, coef_old):
        partials = fused_ops.msam_sgd_partials(params, grads, momenta, [None] * len(params), hyper=hyper,
                                               norm_dtype=torch.float32)
        sum_of_squares, nonfinite = fused_ops.sum_segment_partials(partials, torch.float32)
        coef_new = fused_ops.perturbation_coef(sum_of_squares, hyper[3], coef_old, nonfinite)
        fused_ops.msam_sgd_step_(params, grads, momenta, [None] * len(params), hyper=hyper, coef_old=coef_old,
                                 coef_new=coef_new, found_inf=nonfinite)
        return coef_new

    params, grads, momenta, _ = bucket([(5,), (33, 2)], torch.float32, "cpu")
    hyper = msam_sgd_hyper("cpu")
    eager, compiled = [clone(params), clone(momenta)], [clone(params), clone(momenta)]
    c_eager = step(eager[0], grads, eager[1], hyper, torch.tensor(0.1))
    c_compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled[0], grads, compiled[1], hyper,
                                                                          torch.tensor(0.1))
    assert torch.equal(c_eager, c_compiled)
    assert_matches(eager[0] + eager[1], compiled[0] + compiled[1])
