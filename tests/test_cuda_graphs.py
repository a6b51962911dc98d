"""The CUDA ops under CUDA graphs and on several streams (docs/kernels.md: the table cache's
rules). Each compares against the same ops run eagerly on one stream, which give the same bits
(the kernels are deterministic), so any stale or unfilled table shows as a mismatch."""

import pytest
import torch

from fused_cases import ODD_SHAPES, adamw_msam_hyper, bucket, clone, msam_sgd_hyper, require_extension
from msam_fused import fused_ops

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def extension():
    require_extension()
    reason = fused_ops.unavailable_reason("cuda")
    if reason:
        pytest.skip(reason)


def msam_sgd_step(state, hyper):
    """One step of the contract on ``state = [params, grads, momenta, coef]``, rho read from
    ``hyper``; the new coefficient is copied into ``coef``, so the step can be replayed."""
    params, grads, momenta, coef = state
    nones = [None] * len(params)
    partials = fused_ops.msam_sgd_partials(params, grads, momenta, nones, hyper=hyper, norm_dtype=torch.float32)
    sum_of_squares, nonfinite = fused_ops.sum_segment_partials(partials, torch.float32)
    coef_new = fused_ops.perturbation_coef(sum_of_squares, hyper[3], coef, nonfinite)
    fused_ops.msam_sgd_step_(params, grads, momenta, nones, hyper=hyper, coef_old=coef, coef_new=coef_new,
                             found_inf=nonfinite)
    coef.copy_(coef_new)


def adamw_msam_step(state, hyper):
    params, grads, exp_avgs, exp_avg_sqs, steps, coef = state
    nones = [None] * len(params)
    partials = fused_ops.adamw_msam_partials(params, grads, exp_avgs, exp_avg_sqs, steps, nones, hyper=hyper,
                                             norm_dtype=torch.float32)
    sum_of_squares, nonfinite = fused_ops.sum_segment_partials(partials, torch.float32)
    coef_new = fused_ops.perturbation_coef(sum_of_squares, hyper[5], coef, nonfinite)
    fused_ops.adamw_msam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, nones, hyper=hyper, coef_old=coef,
                               coef_new=coef_new, found_inf=nonfinite)
    coef.copy_(coef_new)


def msam_sgd_state():
    params, grads, momenta, _ = bucket(ODD_SHAPES, torch.float32, "cuda", missing=(1,))
    return [params, grads, momenta, torch.zeros((), device="cuda")]


def adamw_msam_state():
    params, grads, exp_avgs, _ = bucket(ODD_SHAPES, torch.float32, "cuda", missing=(1,))
    return [params, grads, exp_avgs, [m.square() for m in exp_avgs],
            [torch.zeros((), device="cuda") for _ in params], torch.zeros((), device="cuda")]


def copy_state(state):
    return [clone(x) if isinstance(x, list) else x.clone() for x in state]


def assert_same_state(a, b):
    for x, y in zip(a, b):
        for s, t in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
            assert (s is None and t is None) or torch.equal(s, t)


def new_gradients(state, step):
    gen = torch.Generator().manual_seed(step)
    for g in state[1]:
        if g is not None:
            g.copy_(torch.randn(g.shape, generator=gen))


def capture(step_fn, state, hyper):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step_fn(copy_state(state), hyper.clone())  # warm up outside the graph (its own tensors)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_fn(state, hyper)
    return graph


@pytest.mark.parametrize("step_fn, make_state, make_hyper, rho", [
    (msam_sgd_step, msam_sgd_state, msam_sgd_hyper, 3),
    (adamw_msam_step, adamw_msam_state, adamw_msam_hyper, 5),
])
def test_a_captured_step_follows_lr_and_rho_changed_between_replays(step_fn, make_state, make_hyper, rho):
    state, hyper = make_state(), make_hyper("cuda")
    graph_state, eager_state, eager_hyper = state, copy_state(state), hyper.clone()
    graph = capture(step_fn, graph_state, hyper)
    # the capture ran nothing: the graph state is still the initial one
    assert_same_state(graph_state, eager_state)
    for step, (lr, rho_value) in enumerate([(0.1, 0.05), (0.02, 0.05), (0.02, 0.5), (0.0, 0.0), (0.05, 0.2)]):
        for h in (hyper, eager_hyper):
            h[0], h[rho] = lr, rho_value  # in place, as LR schedules and rho schedules do
        new_gradients(graph_state, step)
        new_gradients(eager_state, step)
        graph.replay()
        step_fn(eager_state, eager_hyper)
        torch.cuda.synchronize()
        assert_same_state(graph_state, eager_state)


def test_a_capture_abandoned_then_redone_reads_filled_tables():
    state, hyper = msam_sgd_state(), msam_sgd_hyper("cuda")
    eager_state = copy_state(state)
    abandoned = capture(msam_sgd_step, state, hyper)  # uploads its tables inside the capture
    del abandoned  # never replayed: those uploads never ran
    torch.cuda.synchronize()
    graph = capture(msam_sgd_step, state, hyper)  # the same tables again
    for step in range(3):
        new_gradients(state, step)
        new_gradients(eager_state, step)
        graph.replay()
        msam_sgd_step(eager_state, hyper)  # outside any capture: must not use the graphs' tables
        torch.cuda.synchronize()
        assert_same_state(state, eager_state)


def test_two_streams_share_tables_safely():
    state, hyper = msam_sgd_state(), msam_sgd_hyper("cuda")
    expected = copy_state(state)
    msam_sgd_step(expected, hyper)
    torch.cuda.synchronize()
    first, second = torch.cuda.Stream(), torch.cuda.Stream()
    ours = copy_state(state)
    for s in (first, second):
        s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(first):
        # a table uploaded here is then found by its contents from the other stream
        partials = fused_ops.msam_sgd_partials(ours[0], ours[1], ours[2], [None] * len(ours[0]), hyper=hyper,
                                               norm_dtype=torch.float32)
    with torch.cuda.stream(second):
        again = fused_ops.msam_sgd_partials(ours[0], ours[1], ours[2], [None] * len(ours[0]), hyper=hyper,
                                            norm_dtype=torch.float32)
        second.wait_stream(first)
        msam_sgd_step(ours, hyper)
    torch.cuda.synchronize()
    assert torch.equal(partials, again)
    assert_same_state(ours, expected)
