"""The fused ops one call at a time, against the reference backend (msam_fused/reference.py).

Odd sizes, missing gradients, master weights, GradScaler's grad_scale/found_inf, layouts the
kernels cannot walk directly, bad input, and torch.library.opcheck on every op.
"""

import pytest
import torch

from fused_cases import DEVICES, ODD_SHAPES, bucket, clone, require_extension
from msam_fused import fused_ops, reference

pytestmark = pytest.mark.usefixtures("extension")

LOW = (torch.bfloat16, torch.float16)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SGD = dict(lr=0.1, weight_decay=1e-3, momentum=0.9)
ADAMW = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)


@pytest.fixture(scope="module")
def extension():
    require_extension()


def norm_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def coefs(dtype, device):
    nd = norm_dtype(dtype)
    return torch.tensor(0.3, dtype=nd, device=device), torch.tensor(0.7, dtype=nd, device=device)


def assert_same(actual, expected, dtype, exact=False, one_rounding=False):
    """Equal to the bit (``exact``), or close at the precision of ``dtype``. ``one_rounding``:
    the one-pass step rounds w - c * x once where the reference rounds w first, so bf16/fp16
    results may differ by an ulp of w (not of the result)."""
    for a, e in zip(actual, expected):
        if a is None:
            assert e is None
        elif exact:
            assert torch.equal(a, e)
        elif one_rounding and a.dtype in LOW:
            eps = torch.finfo(a.dtype).eps
            scale = float(e.abs().max()) if e.numel() else 0.0
            torch.testing.assert_close(a, e, rtol=eps, atol=eps * scale)
        elif a.dtype == torch.float32 and dtype != torch.float32:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)  # fp32 state of bf16/fp16 params
        else:
            torch.testing.assert_close(a, e)


# ------------------------------------------------------------------------------ MSAM-SGD
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masters", [False, True])
def test_msam_sgd_passes_match_reference(device, dtype, masters):
    if masters and dtype not in LOW:
        pytest.skip("master weights are for bf16/fp16 parameters")
    params, grads, momenta, ms = bucket(ODD_SHAPES, dtype, device, masters=masters, missing=(1, 4))
    coef_old, coef_new = coefs(dtype, device)
    nd = norm_dtype(dtype)

    ref = [clone(params), clone(momenta), clone(ms)]
    ref_sq = reference.msam_sgd_update_(ref[0], grads, ref[1], ref[2], **SGD, coef=coef_old, norm_dtype=nd)
    two = [clone(params), clone(momenta), clone(ms)]
    sq = fused_ops.msam_sgd_update_(two[0], grads, two[1], two[2], **SGD, coef=coef_old, norm_dtype=nd)
    assert sq.dtype == nd and sq.device.type == device
    torch.testing.assert_close(sq, ref_sq, rtol=1e-6 if nd == torch.float32 else 1e-13, atol=0)
    for fused_list, ref_list in zip(two, ref):
        assert_same(fused_list, ref_list, dtype)

    read_only = [clone(params), clone(momenta)]
    sq_only, nonfinite = fused_ops.msam_sgd_sum_of_squares(
        read_only[0], grads, read_only[1], weight_decay=SGD["weight_decay"], momentum=SGD["momentum"],
        norm_dtype=nd)
    assert torch.equal(sq_only, sq) and not nonfinite
    assert_same(read_only[0] + read_only[1], params + momenta, dtype, exact=True)

    # the one-pass step is update + apply_perturbation (for bf16/fp16 without master weights
    # it rounds once where the two passes round twice)
    reference.apply_perturbation_(ref[0], ref[1], ref[2], coef=coef_new)
    one = [clone(params), clone(momenta), clone(ms)]
    fused_ops.msam_sgd_step_(one[0], grads, one[1], one[2], **SGD, coef_old=coef_old, coef_new=coef_new)
    for fused_list, ref_list in zip(one, ref):
        assert_same(fused_list, ref_list, dtype, one_rounding=not masters)
    if dtype == torch.float32:
        fused_ops.apply_perturbation_(two[0], two[1], two[2], coef=coef_new)
        assert_same(one[0] + one[1], two[0] + two[1], dtype, exact=True)


# ---------------------------------------------------------------------------- AdamW-MSAM
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masters", [False, True])
def test_adamw_msam_passes_match_reference(device, dtype, masters):
    if masters and dtype not in LOW:
        pytest.skip("master weights are for bf16/fp16 parameters")
    params, grads, exp_avgs, ms = bucket(ODD_SHAPES, dtype, device, masters=masters, missing=(2,))
    exp_avg_sqs = [m.square() for m in exp_avgs]
    steps = [torch.tensor(float(i), device=device) for i in range(len(params))]
    coef_old, coef_new = coefs(dtype, device)
    nd = norm_dtype(dtype)

    def state():
        return [clone(params), clone(exp_avgs), clone(exp_avg_sqs), clone(steps), clone(ms)]

    ref = state()
    ref_sq = reference.adamw_msam_update_(ref[0], grads, ref[1], ref[2], ref[3], ref[4], **ADAMW,
                                          coef=coef_old, norm_dtype=nd)
    two = state()
    sq = fused_ops.adamw_msam_update_(two[0], grads, two[1], two[2], two[3], two[4], **ADAMW,
                                      coef=coef_old, norm_dtype=nd)
    torch.testing.assert_close(sq, ref_sq, rtol=1e-6 if nd == torch.float32 else 1e-13, atol=0)
    for fused_list, ref_list in zip(two, ref):
        assert_same(fused_list, ref_list, dtype)
    assert [float(t) for t in two[3]] == [i + (i != 2) for i in range(len(params))]

    sq_only, nonfinite = fused_ops.adamw_msam_sum_of_squares(params, grads, exp_avgs, beta1=ADAMW["beta1"],
                                                             norm_dtype=nd)
    assert torch.equal(sq_only, sq) and not nonfinite

    reference.apply_perturbation_(ref[0], ref[1], ref[4], coef=coef_new)
    one = state()
    fused_ops.adamw_msam_step_(one[0], grads, one[1], one[2], one[3], one[4], **ADAMW, coef_old=coef_old,
                               coef_new=coef_new)
    for fused_list, ref_list in zip(one, ref):
        assert_same(fused_list, ref_list, dtype, one_rounding=not masters)


# ------------------------------------------------------------------- perturbation, finalize
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
        assert_same(ours, ref, dtype, exact=dtype != torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sum_dtype", [torch.float32, torch.float64])
def test_perturbation_coef_matches_reference(device, sum_dtype):
    total = torch.tensor(7.5, dtype=sum_dtype, device=device)
    old = torch.tensor(0.25, dtype=sum_dtype, device=device)
    new = fused_ops.perturbation_coef(total, 2.0, old)
    torch.testing.assert_close(new, reference.perturbation_coef(total, 2.0, old))
    assert new.data_ptr() != old.data_ptr()
    for found_inf in (torch.tensor(True, device=device), torch.tensor(1.0, device=device)):
        assert torch.equal(fused_ops.perturbation_coef(total, 2.0, old, found_inf), old)
    assert fused_ops.perturbation_coef(torch.zeros((), dtype=sum_dtype, device=device), 1.0, old) == \
        reference.perturbation_coef(torch.zeros((), dtype=sum_dtype, device=device), 1.0, old)


# ----------------------------------------------------------------------------------- SAM
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_ascent_matches_reference(device, dtype, adaptive):
    params, grads, _, _ = bucket(ODD_SHAPES, dtype, device)
    nd = norm_dtype(dtype)
    sq = fused_ops.sam_ascent_sum_of_squares(params, grads, adaptive=adaptive, norm_dtype=nd)
    ref_sq = reference.sam_ascent_sum_of_squares(params, grads, adaptive=adaptive, norm_dtype=nd)
    torch.testing.assert_close(sq, ref_sq, rtol=1e-6 if nd == torch.float32 else 1e-13, atol=0)
    scale = reference.perturbation_coef(ref_sq, 0.05, torch.zeros((), dtype=nd, device=device))
    ours, ref = clone(params), clone(params)
    ours_backup, ref_backup = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
    fused_ops.sam_ascent_(ours, grads, ours_backup, scale=scale, adaptive=adaptive)
    reference.sam_ascent_(ref, grads, ref_backup, scale=scale, adaptive=adaptive)
    assert_same(ours, ref, dtype, exact=dtype != torch.float64)
    assert_same(ours_backup, params, dtype, exact=True)
    fused_ops.sam_restore_(ours, ours_backup)
    assert_same(ours, params, dtype, exact=True)


# ------------------------------------------------------------- skip, unscale, non-finite
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("found_inf_dtype", [torch.bool, torch.float32])
def test_found_inf_leaves_everything_bit_identical(device, found_inf_dtype):
    params, grads, momenta, ms = bucket(ODD_SHAPES, torch.bfloat16, device, masters=True, missing=(3,))
    steps = [torch.tensor(3.0, device=device) for _ in params]
    found_inf = torch.ones((), dtype=found_inf_dtype, device=device)
    coef_old, coef_new = coefs(torch.bfloat16, device)
    before = [clone(x) for x in (params, momenta, ms, steps)]
    fused_ops.msam_sgd_step_(params, grads, momenta, ms, **SGD, coef_old=coef_old, coef_new=coef_new,
                             found_inf=found_inf)
    fused_ops.msam_sgd_update_(params, grads, momenta, ms, **SGD, coef=coef_old, norm_dtype=torch.float32,
                               found_inf=found_inf)
    fused_ops.adamw_msam_step_(params, grads, momenta, momenta, steps, ms, **ADAMW, coef_old=coef_old,
                               coef_new=coef_new, found_inf=found_inf)
    fused_ops.apply_perturbation_(params, momenta, ms, coef=coef_new, found_inf=found_inf)
    for now, then in zip((params, momenta, ms, steps), before):
        assert_same(now, then, torch.bfloat16, exact=True)
    backups = [torch.empty_like(p) for p in params]
    fused_ops.sam_ascent_(params, [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)],
                          backups, scale=coef_new, adaptive=False, found_inf=found_inf)
    assert_same(params, before[0], torch.bfloat16, exact=True)
    assert_same(backups, before[0], torch.bfloat16, exact=True)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_unscales_inside_the_kernel(device):
    params, grads, momenta, ms = bucket(ODD_SHAPES, torch.float16, device, masters=True)
    scale = torch.tensor(1024.0, device=device)
    scaled = [g * 1024 for g in grads]
    coef_old, coef_new = coefs(torch.float16, device)
    ours, ref = [clone(params), clone(momenta), clone(ms)], [clone(params), clone(momenta), clone(ms)]
    fused_ops.msam_sgd_step_(ours[0], scaled, ours[1], ours[2], **SGD, coef_old=coef_old, coef_new=coef_new,
                             grad_scale=scale)
    reference.msam_sgd_update_(ref[0], scaled, ref[1], ref[2], **SGD, coef=coef_old, norm_dtype=torch.float32,
                               grad_scale=scale)
    reference.apply_perturbation_(ref[0], ref[1], ref[2], coef=coef_new)
    for a, b in zip(ours, ref):
        assert_same(a, b, torch.float16, one_rounding=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [(7, 12_345), (4, 50), (0, 0)])
def test_sum_of_squares_flags_nonfinite_gradients(device, bad, where):
    params, grads, momenta, _ = bucket(ODD_SHAPES, torch.float32, device)
    index, offset = where
    grads[index].view(-1)[offset] = bad
    _, nonfinite = fused_ops.msam_sgd_sum_of_squares(params, grads, momenta, weight_decay=0.0, momentum=0.9,
                                                     norm_dtype=torch.float32)
    _, adam_nonfinite = fused_ops.adamw_msam_sum_of_squares(params, grads, momenta, beta1=0.9,
                                                            norm_dtype=torch.float32)
    assert nonfinite.dtype == torch.bool and bool(nonfinite) and bool(adam_nonfinite)


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
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_the_kernels_cannot_walk_match_reference(device):
    pairs = layouts(device)
    params, grads = [p for p, _ in pairs], [g for _, g in pairs]
    momenta = [torch.randn_like(p) for p in params]  # contiguous, unlike some params
    coef_old, coef_new = coefs(torch.float32, device)
    ours, ref = [clone(params), clone(momenta)], [clone(params), clone(momenta)]
    fused_ops.msam_sgd_step_(ours[0], grads, ours[1], [None] * 4, **SGD, coef_old=coef_old, coef_new=coef_new)
    reference.msam_sgd_update_(ref[0], grads, ref[1], [None] * 4, **SGD, coef=coef_old, norm_dtype=torch.float32)
    reference.apply_perturbation_(ref[0], ref[1], [None] * 4, coef=coef_new)
    assert_same(ours[0] + ours[1], ref[0] + ref[1], torch.float32)
    assert [p.stride() for p in ours[0]] == [p.stride() for p in params]


@pytest.mark.parametrize("device", DEVICES)
def test_many_tiny_tensors_and_one_huge(device):
    shapes = [(1 + i % 5,) for i in range(300)] + [(200_003,)] + [()] * 20
    params, grads, momenta, _ = bucket(shapes, torch.float32, device, missing=(5, 300))
    nones = [None] * len(params)
    coef_old, coef_new = coefs(torch.float32, device)
    ours, ref = [clone(params), clone(momenta)], [clone(params), clone(momenta)]
    sq, _ = fused_ops.msam_sgd_sum_of_squares(params, grads, momenta, weight_decay=SGD["weight_decay"],
                                              momentum=SGD["momentum"], norm_dtype=torch.float32)
    fused_ops.msam_sgd_step_(ours[0], grads, ours[1], nones, **SGD, coef_old=coef_old, coef_new=coef_new)
    ref_sq = reference.msam_sgd_update_(ref[0], grads, ref[1], nones, **SGD, coef=coef_old,
                                        norm_dtype=torch.float32)
    reference.apply_perturbation_(ref[0], ref[1], nones, coef=coef_new)
    torch.testing.assert_close(sq, ref_sq, rtol=1e-6, atol=0)
    assert_same(ours[0] + ours[1], ref[0] + ref[1], torch.float32)


def test_norm_is_the_same_for_any_number_of_threads():
    params, grads, momenta, _ = bucket([(300_001,), (77,), (65_536,)], torch.float32, "cpu")
    threads = torch.get_num_threads()
    sums = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sums.append(fused_ops.msam_sgd_sum_of_squares(params, grads, momenta, weight_decay=1e-3,
                                                          momentum=0.9, norm_dtype=torch.float32)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(s, sums[0]) for s in sums)


# ------------------------------------------------------------------------------ bad input
def sgd_step(params, grads, momenta, masters=None, **overrides):
    coef = torch.tensor(0.1)
    kwargs = {**SGD, "coef_old": coef, "coef_new": coef, **overrides}
    torch.ops.msam_fused.msam_sgd_step_(params, grads, momenta, masters or [], kwargs["lr"],
                                        kwargs["weight_decay"], kwargs["momentum"], kwargs["coef_old"],
                                        kwargs["coef_new"], None, None)


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
    (lambda: ([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], None, {"lr": -1.0}),
     "lr must be a non-negative number"),
    (lambda: ([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], None,
              {"coef_old": torch.tensor(1, dtype=torch.int64)}), "coef_old has dtype Long"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(make, message):
    args = make()
    params, grads, momenta = args[:3]
    masters = args[3] if len(args) > 3 else None
    overrides = args[4] if len(args) > 4 else {}
    before = clone(params) + clone(momenta)
    with pytest.raises(RuntimeError, match=f"msam_fused.msam_sgd_step_: {message}"):
        sgd_step(params, grads, momenta, masters, **overrides)
    assert all(torch.equal(a, b) for a, b in zip(clone(params) + clone(momenta), before))


def test_device_mix_is_a_clear_error():
    with pytest.raises(RuntimeError, match="grads\\[0\\] is on meta but params\\[0\\] is on cpu"):
        sgd_step([torch.ones(3)], [torch.ones(3, device="meta")], [torch.ones(3)])


@pytest.mark.gpu
def test_device_mix_is_a_clear_error_on_cuda():
    with pytest.raises(RuntimeError, match="grads\\[0\\] is on cpu but params\\[0\\] is on cuda:0"):
        sgd_step([torch.ones(3, device="cuda")], [torch.ones(3)], [torch.ones(3, device="cuda")],
                 coef_old=torch.tensor(0.1, device="cuda"), coef_new=torch.tensor(0.1, device="cuda"))


def test_options_the_kernels_lack_are_refused():
    params, grads, momenta, ms = bucket([(3,)], torch.float32, "cpu")
    with pytest.raises(NotImplementedError, match="do not implement \\['adaptive'\\]"):
        fused_ops.apply_perturbation_(params, momenta, ms, coef=torch.tensor(0.1), adaptive=True)
    with pytest.raises(NotImplementedError, match="msam_sgd_step_"):
        fused_ops.msam_sgd_step_(params, grads, momenta, ms, **SGD, coef_old=torch.tensor(0.0),
                                 coef_new=torch.tensor(0.1), bn_only=True)


# -------------------------------------------------------------------------------- opcheck
def op_samples(device):
    """(op, args) for every op: odd sizes, a missing gradient, master weights, found_inf."""
    params, grads, momenta, _ = bucket([(), (7,), (17, 3)], torch.float32, device, missing=(1,))
    bf_params, bf_grads, bf_momenta, bf_masters = bucket([(1,), (33,)], torch.bfloat16, device, masters=True)
    coef, coef_new = coefs(torch.float32, device)
    steps = [torch.tensor(2.0, device=device) for _ in params]
    no = torch.tensor(False, device=device)
    scale = torch.tensor(4.0, device=device)
    ops = torch.ops.msam_fused
    f32 = torch.float32
    return [
        (ops.msam_sgd_sum_of_squares, (params, grads, momenta, 1e-3, 0.9, f32, scale)),
        (ops.msam_sgd_update_, (params, grads, momenta, [], 0.1, 1e-3, 0.9, coef, f32, None, no)),
        (ops.msam_sgd_step_, (bf_params, bf_grads, bf_momenta, bf_masters, 0.1, 1e-3, 0.9, coef, coef_new,
                              scale, no)),
        (ops.adamw_msam_sum_of_squares, (params, grads, momenta, 0.9, f32, None)),
        (ops.adamw_msam_update_, (params, grads, momenta, [m.square() for m in momenta], steps, [], 1e-2, 0.9,
                                  0.99, 1e-8, 0.01, coef, f32, None, None)),
        (ops.adamw_msam_step_, (params, grads, momenta, [m.square() for m in momenta], steps, [], 1e-2, 0.9,
                                0.99, 1e-8, 0.01, coef, coef_new, scale, no)),
        (ops.perturbation_coef, (torch.tensor(4.0, device=device), 1.5, coef, no)),
        (ops.perturb_, (bf_params, bf_momenta, bf_masters, coef, -1.0, None)),
        (ops.sam_ascent_sum_of_squares, (params[:1] + params[2:], momenta[:1] + momenta[2:], True, f32)),
        (ops.sam_ascent_, (params[:1] + params[2:], momenta[:1] + momenta[2:],
                           [torch.empty_like(params[0]), torch.empty_like(params[2])], coef, False, None)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(10))
def test_opcheck(device, index):
    op, args = op_samples(device)[index]
    torch.library.opcheck(op, args)


@pytest.mark.slow
def test_ops_compile_with_fullgraph():
    """The one-pass step traces into one graph (fake kernels) and gives the eager result."""
    def step(params, grads, momenta, coef_old):
        sq, bad = torch.ops.msam_fused.msam_sgd_sum_of_squares(params, grads, momenta, 1e-3, 0.9,
                                                              torch.float32, None)
        coef_new = torch.ops.msam_fused.perturbation_coef(sq, 0.5, coef_old, bad)
        torch.ops.msam_fused.msam_sgd_step_(params, grads, momenta, [], 0.1, 1e-3, 0.9, coef_old, coef_new,
                                            None, bad)
        return coef_new

    params, grads, momenta, _ = bucket([(5,), (33, 2)], torch.float32, "cpu")
    eager = [clone(params), clone(momenta)]
    compiled = [clone(params), clone(momenta)]
    c_eager = step(eager[0], grads, eager[1], torch.tensor(0.1))
    c_compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled[0], grads, compiled[1],
                                                                          torch.tensor(0.1))
    assert torch.equal(c_eager, c_compiled)
    assert_same(eager[0] + eager[1], compiled[0] + compiled[1], torch.float32, exact=True)
