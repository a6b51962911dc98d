"""The ops of the overlapped MSAM step, one call at a time, against the reference backend
(msam_fused/reference.py) and against the plain step's ops; opcheck on each."""

import pytest
import torch

from fused_cases import DEVICES, ODD_SHAPES, bucket, clone, require_extension
from msam_fused import fused_ops, reference

HYPER = dict(weight_decay=1e-3, momentum=0.9)
MISSING = (1, 4)


@pytest.fixture(scope="module", autouse=True)
def extension():
    require_extension()


def norm_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def split(params, grads, momenta):
    """The rows with a gradient (stashed) and those without (norm only), as the optimizer
    calls the passes, and a function that puts their partial sums back in row order."""
    with_grad = [i for i, g in enumerate(grads) if g is not None]
    without = [i for i, g in enumerate(grads) if g is None]

    def pick(rows, *lists):
        return [[xs[i] for i in rows] for xs in lists]

    def in_row_order(backend, device, first, second):
        pieces, taken = [], {0: 0, 1: 0}
        for i, p in enumerate(params):
            part, which = (first, 0) if i in with_grad else (second, 1)
            n = backend.segment_count(p.numel(), device)
            pieces.append(part[taken[which]:taken[which] + n])
            taken[which] += n
        return torch.cat(pieces)

    return with_grad, without, pick, in_row_order


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_stashed_step_is_the_plain_one_pass_step_bit_for_bit(device, dtype):
    params, grads, momenta, _ = bucket(ODD_SHAPES, dtype, device, missing=MISSING)
    nd = norm_dtype(dtype)
    coef_old = torch.tensor(0.3, dtype=nd, device=device)
    scale = torch.tensor(4.0, device=device)
    plain = [clone(params), clone(momenta)]
    sq, bad = fused_ops.msam_sgd_sum_of_squares(plain[0], grads, plain[1], **HYPER, norm_dtype=nd,
                                                grad_scale=scale)
    coef_new = fused_ops.perturbation_coef(sq, 0.5, coef_old)
    fused_ops.msam_sgd_step_(plain[0], grads, plain[1], [], lr=0.1, **HYPER, coef_old=coef_old,
                             coef_new=coef_new, grad_scale=scale)

    ours = [clone(params), clone(grads), clone(momenta)]
    with_grad, without, pick, in_row_order = split(*ours)
    p1, g1, v1 = pick(with_grad, *ours)
    first = fused_ops.msam_sgd_overlap_stash_(p1, g1, v1, **HYPER, norm_dtype=nd, grad_scale=scale)
    p2, v2 = pick(without, ours[0], ours[2])
    second = fused_ops.msam_sgd_overlap_norm(p2, [None] * len(p2), v2, **HYPER, norm_dtype=nd)
    assert first.dtype == torch.float64 and first.shape[1] == 2
    sq2, bad2 = fused_ops.sum_segment_partials(in_row_order(fused_ops, device, first, second), nd)
    assert torch.equal(sq2, sq) and not bad2 and not bad
    assert all(torch.equal(g, v) for g, v in zip(g1, pick(with_grad, momenta)[0]))  # the old momenta
    fused_ops.msam_sgd_overlap_finish_(ours[0], ours[1], ours[2], lr=0.1, coef_old=coef_old,
                                       coef_new=coef_new)
    for a, b in zip(ours[0] + ours[2], plain[0] + plain[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_partials_flag_nonfinite_gradients(device):
    params, grads, momenta, _ = bucket(ODD_SHAPES, torch.float32, device, missing=MISSING)
    grads[-1][40_000] = float("inf")
    for stash in (False, True):
        rows = [i for i, g in enumerate(grads) if g is not None]
        p, g, v = ([xs[i].clone() for i in rows] for xs in (params, grads, momenta))
        run = fused_ops.msam_sgd_overlap_stash_ if stash else fused_ops.msam_sgd_overlap_norm
        _, bad = fused_ops.sum_segment_partials(run(p, g, v, **HYPER, norm_dtype=torch.float32), torch.float32)
        assert bool(bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_skipped_finish_puts_the_old_momenta_back(device, dtype):
    params, grads, momenta, _ = bucket(ODD_SHAPES, dtype, device, missing=MISSING)
    ours = [clone(params), clone(grads), clone(momenta)]
    rows = [i for i, g in enumerate(grads) if g is not None]
    fused_ops.msam_sgd_overlap_stash_([ours[0][i] for i in rows], [ours[1][i] for i in rows],
                                      [ours[2][i] for i in rows], **HYPER, norm_dtype=norm_dtype(dtype))
    coef = torch.tensor(0.3, dtype=norm_dtype(dtype), device=device)
    fused_ops.msam_sgd_overlap_finish_(ours[0], ours[1], ours[2], lr=0.1, coef_old=coef, coef_new=coef,
                                       found_inf=torch.tensor(True, device=device))
    for a, b in zip(ours[0] + ours[2], params + momenta):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_overlapped_passes_match_the_reference(device, dtype):
    params, grads, momenta, _ = bucket(ODD_SHAPES, dtype, device, missing=MISSING)
    nd = norm_dtype(dtype)
    tol = dict(rtol=1e-6, atol=0) if nd == torch.float32 else dict(rtol=1e-13, atol=0)
    sums = {}
    for backend in (fused_ops, reference):
        read_only = [clone(params), clone(momenta)]
        partials = backend.msam_sgd_overlap_norm(read_only[0], grads, read_only[1], **HYPER, norm_dtype=nd)
        sums[backend] = backend.sum_segment_partials(partials, nd)
        assert all(torch.equal(a, b) for a, b in zip(read_only[0] + read_only[1], params + momenta))
    torch.testing.assert_close(sums[fused_ops][0], sums[reference][0], **tol)
    assert not sums[fused_ops][1] and not sums[reference][1]
    if dtype not in (torch.float32, torch.float64):
        return
    results = {}
    coef_old, coef_new = (torch.tensor(c, dtype=nd, device=device) for c in (0.3, 0.7))
    rows = [i for i, g in enumerate(grads) if g is not None]
    for backend in (fused_ops, reference):
        p, g, v = clone(params), clone(grads), clone(momenta)
        partials = backend.msam_sgd_overlap_stash_([p[i] for i in rows], [g[i] for i in rows],
                                                   [v[i] for i in rows], **HYPER, norm_dtype=nd)
        stashed_sq = backend.sum_segment_partials(partials, nd)[0]
        backend.msam_sgd_overlap_finish_(p, g, v, lr=0.1, coef_old=coef_old, coef_new=coef_new)
        results[backend] = (stashed_sq, p, g, v)
    torch.testing.assert_close(results[fused_ops][0], results[reference][0], **tol)
    for a, b in zip(results[fused_ops][1:], results[reference][1:]):
        for x, y in zip(a, b):
            if x is not None:
                torch.testing.assert_close(x, y)


def test_bad_input_is_refused_with_a_message():
    params, grads, momenta, _ = bucket([(3,)], torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="msam_sgd_overlap_stash_: params have dtype BFloat16.*float32 or float64"):
        fused_ops.msam_sgd_overlap_stash_(params, grads, momenta, **HYPER, norm_dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"sum_segment_partials: partials must be a contiguous float64 tensor"):
        fused_ops.sum_segment_partials(torch.zeros(4, 3, dtype=torch.float64), torch.float32)
    with pytest.raises(RuntimeError, match="segment_length: no kernels for device type meta"):
        torch.ops.msam_fused.segment_length(torch.device("meta"))


def op_samples(device):
    params, grads, momenta, _ = bucket([(), (7,), (17, 3)], torch.float32, device, missing=(1,))
    coef = torch.tensor(0.3, device=device)
    scale = torch.tensor(4.0, device=device)
    ops, f32 = torch.ops.msam_fused, torch.float32
    stash = [clone(params), [g for g in grads if g is not None]]
    return [
        (ops.msam_sgd_overlap_norm, (params, grads, momenta, 1e-3, 0.9, f32, scale)),
        (ops.msam_sgd_overlap_stash_, (params[:1] + params[2:], stash[1], momenta[:1] + momenta[2:], 1e-3,
                                       0.9, f32, scale)),
        (ops.msam_sgd_overlap_finish_, (params, grads, momenta, 0.1, coef, coef, torch.tensor(False, device=device))),
        (ops.sum_segment_partials, (torch.rand(5, 2, dtype=torch.float64, device=device), f32)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(4))
def test_opcheck(device, index):
    op, args = op_samples(device)[index]
    torch.library.opcheck(op, args)
