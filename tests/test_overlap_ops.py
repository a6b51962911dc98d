"""The ops of the overlapped MSAM-SGD step (capability "stash", docs/overlap.md), one call at a
time, against the plain step's ops (bit for bit) and the reference backend; opcheck on each."""

import pytest
import torch

from fused_cases import DEVICES, ODD_SHAPES, bucket, clone, msam_sgd_hyper, require_extension
from msam_fused import fused_ops, reference

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
def test_a_stashed_step_is_the_plain_step_bit_for_bit(device, dtype):
    """The partials of the rows with a gradient (stash_) and of those without (msam_sgd_partials),
    put back in row order, sum to the one-pass norm's bits; finish_ then writes the plain
    step's weights and momenta."""
    params, grads, momenta, _ = bucket(ODD_SHAPES, dtype, device, missing=MISSING)
    nd, hyper, nones = norm_dtype(dtype), msam_sgd_hyper(device), [None] * len(params)
    coef_old = torch.tensor(0.3, dtype=nd, device=device)
    scale = torch.tensor(4.0, device=device)
    plain = [clone(params), clone(momenta)]
    partials = fused_ops.msam_sgd_partials(plain[0], grads, plain[1], nones, hyper=hyper, norm_dtype=nd,
                                           grad_scale=scale)
    sq, bad = fused_ops.sum_segment_partials(partials, nd)
    coef_new = fused_ops.perturbation_coef(sq, hyper[3], coef_old)
    fused_ops.msam_sgd_step_(plain[0], grads, plain[1], nones, hyper=hyper, coef_old=coef_old, coef_new=coef_new,
                             grad_scale=scale)

    ours = [clone(params), clone(grads), clone(momenta)]
    with_grad, without, pick, in_row_order = split(*ours)
    p1, g1, v1 = pick(with_grad, *ours)
    first = fused_ops.msam_sgd_overlap_stash_(p1, g1, v1, hyper=hyper, norm_dtype=nd, grad_scale=scale)
    p2, v2 = pick(without, ours[0], ours[2])
    second = fused_ops.msam_sgd_partials(p2, [None] * len(p2), v2, [None] * len(p2), hyper=hyper, norm_dtype=nd)
    assert first.dtype == torch.float64 and first.shape[1] == 2
    joined = in_row_order(fused_ops, device, first, second)
    assert torch.equal(joined, partials)
    sq2, bad2 = fused_ops.sum_segment_partials(joined, nd)
    assert torch.equal(sq2, sq) and not bad2 and not bad
    assert all(torch.equal(g, v) for g, v in zip(g1, pick(with_grad, momenta)[0]))  # the old momenta
    fused_ops.msam_sgd_overlap_finish_(ours[0], ours[1], ours[2], hyper=hyper, coef_old=coef_old,
                                       coef_new=coef_new)
    for a, b in zip(ours[0] + ours[2], plain[0] + plain[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_stash_flags_nonfinite_gradients(device):
    params, grads, momenta, _ = bucket(ODD_SHAPES, torch.float32, device, missing=MISSING)
    grads[-1][40_000] = float("inf")
    rows = [i for i, g in enumerate(grads) if g is not None]
    p, g, v = ([xs[i].clone() for i in rows] for xs in (params, grads, momenta))
    partials = fused_ops.msam_sgd_overlap_stash_(p, g, v, hyper=msam_sgd_hyper(device), norm_dtype=torch.float32)
    assert bool(fused_ops.sum_segment_partials(partials, torch.float32)[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_skipped_finish_puts_the_old_momenta_back(device, dtype):
    params, grads, momenta, _ = bucket(ODD_SHAPES, dtype, device, missing=MISSING)
    ours = [clone(params), clone(grads), clone(momenta)]
    rows = [i for i, g in enumerate(grads) if g is not None]
    hyper = msam_sgd_hyper(device)
    fused_ops.msam_sgd_overlap_stash_([ours[0][i] for i in rows], [ours[1][i] for i in rows],
                                      [ours[2][i] for i in rows], hyper=hyper, norm_dtype=norm_dtype(dtype))
    coef = torch.tensor(0.3, dtype=norm_dtype(dtype), device=device)
    fused_ops.msam_sgd_overlap_finish_(ours[0], ours[1], ours[2], hyper=hyper, coef_old=coef, coef_new=coef,
                                       found_inf=torch.tensor(True, device=device))
    for a, b in zip(ours[0] + ours[2], params + momenta):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stash_and_finish_match_the_reference(device, dtype):
    """Both do the reference's operations in its order: bit for bit on the CPU, within the
    ulps of a fused multiply-add on CUDA (see tests/test_fused_ops.py)."""
    params, grads, momenta, _ = bucket(ODD_SHAPES, dtype, device, missing=MISSING)
    nd, hyper = norm_dtype(dtype), msam_sgd_hyper(device)
    coef_old, coef_new = (torch.tensor(c, dtype=nd, device=device) for c in (0.3, 0.7))
    rows = [i for i, g in enumerate(grads) if g is not None]
    results = {}
    for backend in (fused_ops, reference):
        p, g, v = clone(params), clone(grads), clone(momenta)
        partials = backend.msam_sgd_overlap_stash_([p[i] for i in rows], [g[i] for i in rows],
                                                   [v[i] for i in rows], hyper=hyper, norm_dtype=nd)
        stashed_sq = backend.sum_segment_partials(partials, nd)[0]
        backend.msam_sgd_overlap_finish_(p, g, v, hyper=hyper, coef_old=coef_old, coef_new=coef_new)
        results[backend] = (stashed_sq, p, g, v)
    torch.testing.assert_close(results[fused_ops][0], results[reference][0], rtol=1e-6 if nd == torch.float32
                               else 1e-13, atol=0)
    eps = torch.finfo(dtype).eps
    for a, b in zip(results[fused_ops][1:], results[reference][1:]):
        for x, y in zip(a, b):
            if x is None:
                assert y is None
            elif device == "cpu":
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y, rtol=4 * eps, atol=4 * eps * float(y.abs().max()))


def test_bad_input_is_refused_with_a_message():
    params, grads, momenta, _ = bucket([(3,)], torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="msam_sgd_overlap_stash_: params have dtype BFloat16.*float32 or float64"):
        fused_ops.msam_sgd_overlap_stash_(params, grads, momenta, hyper=msam_sgd_hyper("cpu"),
                                          norm_dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"sum_segment_partials: partials must be a contiguous float64 tensor"):
        fused_ops.sum_segment_partials(torch.zeros(4, 3, dtype=torch.float64), torch.float32)
    with pytest.raises(RuntimeError, match="segment_length: no kernels for device type meta"):
        torch.ops.msam_fused.segment_length(torch.device("meta"))


def op_samples(device):
    params, grads, momenta, _ = bucket([(), (7,), (17, 3)], torch.float32, device, missing=(1,))
    coef = torch.tensor(0.3, device=device)
    scale = torch.tensor(4.0, device=device)
    ops, f32, hyper = torch.ops.msam_fused, torch.float32, msam_sgd_hyper(device)
    stash = [clone(params), [g for g in grads if g is not None]]
    return [
        (ops.msam_sgd_overlap_stash_, (params[:1] + params[2:], stash[1], momenta[:1] + momenta[2:], hyper, f32,
                                       scale)),
        (ops.msam_sgd_overlap_finish_, (params, grads, momenta, hyper, coef, coef,
                                        torch.tensor(False, device=device))),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(2))
def test_opcheck(device, index):
    op, args = op_samples(device)[index]
    torch.library.opcheck(op, args)
