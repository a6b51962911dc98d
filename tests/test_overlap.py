"""MSAM.overlap_backward(): the first pass of each step runs during backward.

The overlapped step must give the plain step's trajectory bit for bit (same backend), with
param groups, parameters that miss gradients, GradScaler skips, gradient accumulation and
checkpoints; and whatever it cannot do exactly it must refuse with a clear message.

Gradients come from the stream of tests/streams.py through a real backward: the loss
``sum <p, G>`` has gradient ``G``, so the hooks fire as in training.
"""

import io

import pytest
import torch

import msam_fused
from fused_cases import DEVICES, require_extension
from msam_fused.overlap import ConsumedGradient
from streams import GROUP_SHAPES, MSAM_HYPERS, GradientStream, finish_step, initial_params

STEPS = 100
# The stream's groups plus a tensor that spans three CPU segments (and five CUDA blocks).
SHAPES = [GROUP_SHAPES[0] + [(70_001,)]] + GROUP_SHAPES[1:]
TINY_CAP_MB = 1e-4  # ~100 bytes: about one chunk per parameter


@pytest.fixture(scope="module", autouse=True)
def extension():
    require_extension()


def make(dtype=torch.float32, backend="cpu", device="cpu", *, overlap=False, scaler=None,
         cap=TINY_CAP_MB, nonfinite="skip", master_weights=False):
    params = [[p.to(device).requires_grad_() for p in ps] for ps in initial_params(dtype, group_shapes=SHAPES)]
    opt = msam_fused.MSAM([{"params": ps, **h} for ps, h in zip(params, MSAM_HYPERS)], backend=backend,
                          nonfinite=nonfinite, master_weights=master_weights)
    handle = opt.overlap_backward(scaler=scaler, bucket_cap_mb=cap) if overlap else None
    return params, opt, handle


def backward(params, step, *, scale=None, poison=False, stream=GradientStream(group_shapes=SHAPES)):
    """loss = sum <p, G> over the parameters the stream gives a gradient this step."""
    terms = []
    for gi, ps in enumerate(params):
        for i, p in enumerate(ps):
            g = stream.grad(step, gi, i, p.detach().cpu())
            if g is None:
                continue
            if poison and (gi, i) == (0, 3):
                g[5] = float("inf")
            terms.append((p * g.to(p.device)).sum())
    loss = sum(terms)
    (loss if scale is None else scale.scale(loss)).backward()


def train(params, opt, steps, *, start=0, scaler=None, poison=()):
    for step in range(start, start + steps):
        if step == 40:
            for g in opt.param_groups:
                g["rho"] *= 2.5
        backward(params, step, scale=scaler, poison=step in poison)
        finish_step(opt, scaler)


def snapshot(params, opt):
    flat = [p.detach().clone() for ps in params for p in ps]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for ps in params for p in ps if p in opt.state]
    return flat, state


def assert_identical(a, b):
    (pa, sa), (pb, sb) = a, b
    assert len(pa) == len(pb) and len(sa) == len(sb)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


# -------------------------------------------------------------------------- trajectories
CASES = [("cpu", torch.float32, False), ("cpu", torch.float64, False), ("cpu", torch.bfloat16, False),
         ("cpu", torch.float16, True), ("reference", torch.float32, False), ("reference", torch.float64, False),
         ("reference", torch.bfloat16, True)]


@pytest.mark.parametrize("backend, dtype, master_weights", CASES,
                         ids=["cpu-fp32", "cpu-fp64", "cpu-bf16", "cpu-fp16-master", "ref-fp32", "ref-fp64",
                              "ref-bf16-master"])
def test_bit_identical_to_the_plain_step_over_100_steps(backend, dtype, master_weights):
    plain = make(dtype, backend, master_weights=master_weights)
    overlapped = make(dtype, backend, overlap=True, master_weights=master_weights)
    for params, opt, _ in (plain, overlapped):
        train(params, opt, STEPS)
    assert_identical(snapshot(*plain[:2]), snapshot(*overlapped[:2]))
    assert all(p.grad is None for ps in overlapped[0] for p in ps)


@pytest.mark.parametrize("cap", [TINY_CAP_MB, 0.1, msam_fused.overlap.DEFAULT_BUCKET_CAP_MB])
def test_any_chunk_size_gives_the_same_bits(cap):
    plain = make()
    overlapped = make(overlap=True, cap=cap)
    for params, opt, _ in (plain, overlapped):
        train(params, opt, 12)
    assert_identical(snapshot(*plain[:2]), snapshot(*overlapped[:2]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_to_the_plain_step_on_cuda(dtype):
    plain = make(dtype, "cuda", "cuda")
    overlapped = make(dtype, "cuda", "cuda", overlap=True)
    for params, opt, _ in (plain, overlapped):
        train(params, opt, STEPS)
    assert_identical(snapshot(*plain[:2]), snapshot(*overlapped[:2]))


def test_passes_run_during_backward_as_gradients_arrive():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = msam_fused.MSAM(model.parameters(), backend="cpu")
    handle = opt.overlap_backward(model, bucket_cap_mb=TINY_CAP_MB)
    calls, at_end = [], []
    run_pass, end = handle._run_pass, handle._end
    handle._run_pass = lambda b, rows, grads: (calls.append((rows, model[0].weight.grad is None,
                                                             bool(at_end))), run_pass(b, rows, grads))
    handle._end = lambda: (at_end.append(True), end())
    model(torch.randn(4, 5)).square().sum().backward()
    assert [rows for rows, _, _ in calls] == [[2, 3], [0, 1]]  # ~100 bytes each, last layer first
    assert calls[0][1] and not any(late for _, _, late in calls)  # before the first layer's gradient
    opt.step()


# --------------------------------------------------------------------- GradScaler, inf/NaN
def test_grad_scaler_skips_exactly_like_the_plain_step():
    """A real GradScaler on the CPU; an inf in the gradients at two steps."""
    poison = (3, 17)
    runs = []
    for overlap in (False, True):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
        params, opt, _ = make(overlap=overlap, scaler=scaler)
        train(params, opt, 30, scaler=scaler, poison=poison)
        runs.append((snapshot(params, opt), scaler.get_scale(), opt.skipped_steps))
    assert_identical(runs[0][0], runs[1][0])
    assert runs[0][1:] == runs[1][1:]
    assert runs[1][2] == len(poison)


@pytest.mark.parametrize("device", DEVICES)
def test_a_skipped_step_leaves_everything_bit_identical(device):
    backend = "cuda" if device == "cuda" else "cpu"
    params, opt, handle = make(backend=backend, device=device, overlap=True)
    train(params, opt, 3)
    before = snapshot(params, opt)
    backward(params, 3, poison=True)
    assert handle.pending
    opt.step()
    assert opt.skipped_steps == 1 and not handle.pending
    assert_identical(before, snapshot(params, opt))


def test_nonfinite_raise_undoes_the_hidden_pass():
    params, opt, _ = make(overlap=True, nonfinite="raise")
    train(params, opt, 3)
    before = snapshot(params, opt)
    backward(params, 3, poison=True)
    with pytest.raises(FloatingPointError, match=r"param group\(s\) \[0\].*nothing was changed"):
        opt.step()
    assert_identical(before, snapshot(params, opt))
    train(params, opt, 2, start=4)  # and training goes on


# ---------------------------------------------------------- what happens between backward and step
def test_consumed_gradients_refuse_to_be_used():
    params, opt, _ = make(overlap=True)
    backward(params, 0)
    grad = params[0][0].grad
    assert isinstance(grad, ConsumedGradient)
    with pytest.raises(RuntimeError, match="consumed by MSAM's update.*Clipping"):
        torch.nn.utils.clip_grad_norm_([p for ps in params for p in ps], 1.0)
    with pytest.raises(RuntimeError, match="consumed"):
        grad.sum()
    opt.step()
    assert params[0][0].grad is None


def test_a_grad_scaler_that_was_not_handed_over_is_refused():
    params, opt, _ = make(overlap=True)
    scaler = torch.amp.GradScaler("cpu")
    backward(params, 0, scale=scaler)
    with pytest.raises(RuntimeError, match=r"GradScaler must be handed over"):
        scaler.step(opt)


def test_a_second_backward_before_step_is_refused_and_zero_grad_recovers():
    params, opt, _ = make(overlap=True)
    train(params, opt, 2)
    before = snapshot(params, opt)
    backward(params, 2)
    with pytest.raises(RuntimeError, match="consumed"):
        backward(params, 2)  # accumulating into a consumed gradient
    opt.zero_grad()
    assert_identical(before, snapshot(params, opt))
    for p in (p for ps in params for p in ps):  # a gradient-less backward leaves none consumed
        p.grad = None
    backward(params, 2)
    opt.step()


def test_zero_grad_undoes_the_hidden_pass():
    plain = make()
    overlapped = make(overlap=True)
    for params, opt, _ in (plain, overlapped):
        train(params, opt, 3)
    before = snapshot(*overlapped[:2])
    backward(overlapped[0], 3)
    overlapped[1].zero_grad()
    assert_identical(before, snapshot(*overlapped[:2]))
    for params, opt, _ in (plain, overlapped):
        train(params, opt, 3, start=4)
    assert_identical(snapshot(*plain[:2]), snapshot(*overlapped[:2]))


def test_paused_backward_passes_accumulate_like_the_plain_step():
    plain = make()
    overlapped = make(overlap=True)
    for params, opt, handle in (plain, overlapped):
        for step in range(4):
            for micro in range(3):
                if handle is not None and micro < 2:
                    with handle.paused():
                        backward(params, 10 * step + micro)
                else:
                    backward(params, 10 * step + micro)
            opt.step()
            opt.zero_grad()
    assert_identical(snapshot(*plain[:2]), snapshot(*overlapped[:2]))


def test_hyperparameters_changed_between_backward_and_step_are_refused():
    params, opt, _ = make(overlap=True)
    train(params, opt, 2)
    before = snapshot(params, opt)
    backward(params, 2)
    opt.param_groups[1]["momentum"] = 0.5
    opt.param_groups[0]["lr"] = 0.3  # used after backward: allowed
    with pytest.raises(ValueError, match="momentum or weight_decay.*nothing was changed"):
        opt.step()
    assert_identical(before, snapshot(params, opt))


def test_state_access_between_backward_and_step_is_refused():
    params, opt, _ = make(overlap=True)
    train(params, opt, 2)
    backward(params, 2)
    for call in (opt.state_dict, lambda: opt.load_state_dict({}), lambda: opt.unperturbed().__enter__()):
        with pytest.raises(RuntimeError, match="step\\(\\) has not applied it"):
            call()
    opt.step()
    with opt.unperturbed():  # fine again after the step
        pass


def test_activation_checkpointing_works_without_reentrant_backward_and_is_refused_with_it():
    from torch.utils.checkpoint import checkpoint

    def run(overlap, reentrant=None):
        torch.manual_seed(0)
        layers = [torch.nn.Linear(6, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)]
        opt = msam_fused.MSAM([p for m in layers for p in m.parameters()], backend="cpu")
        if overlap:
            opt.overlap_backward(bucket_cap_mb=TINY_CAP_MB)
        for step in range(3):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step), requires_grad=True)
            body = lambda t: torch.tanh(layers[1](torch.tanh(layers[0](t))))  # noqa: E731
            h = body(x) if reentrant is None else checkpoint(body, x, use_reentrant=reentrant)
            layers[2](h).square().sum().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach() for m in layers for p in m.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True, reentrant=False)))
    with pytest.raises(RuntimeError, match="reentrant activation checkpointing"):
        run(True, reentrant=True)


def test_a_handed_over_grad_scaler_needs_no_unscale():
    params, opt, _ = make(overlap=True, scaler=torch.amp.GradScaler("cpu"))
    scaler = opt.overlap_handle.scaler
    backward(params, 0, scale=scaler)
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()


def test_a_backward_inside_unperturbed_runs_no_pass():
    params, opt, handle = make(overlap=True)
    train(params, opt, 2)
    with opt.unperturbed():
        backward(params, 2)
        assert not handle.pending and not isinstance(params[0][0].grad, ConsumedGradient)
    opt.zero_grad()


# ------------------------------------------------------------------- checkpoints, memory
def test_checkpoint_resume_while_overlapping_is_bit_identical():
    straight = make(overlap=True)
    train(*straight[:2], 12)
    first = make(overlap=True)
    train(*first[:2], 6)
    buffer = io.BytesIO()
    torch.save({"params": [[p.detach() for p in ps] for ps in first[0]], "opt": first[1].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make()
    with torch.no_grad():
        for ps, qs in zip(resumed[0], saved["params"]):
            for p, q in zip(ps, qs):
                p.copy_(q)
    resumed[1].load_state_dict(saved["opt"])
    resumed[1].overlap_backward(bucket_cap_mb=TINY_CAP_MB)
    train(*resumed[:2], 6, start=6)
    assert_identical(snapshot(*straight[:2]), snapshot(*resumed[:2]))


def test_no_copy_of_the_parameters():
    """The stash is the gradient's own memory, and the overlap keeps only O(segments) bytes."""
    params, opt, _ = make()
    train(params, opt, 2)
    flat = [p for ps in params for p in ps]
    grad_storage = {}
    for p in flat:  # registered before the overlap's hooks: sees each gradient as autograd made it
        p.register_post_accumulate_grad_hook(lambda p: grad_storage.__setitem__(id(p), p.grad.data_ptr()))
    handle = opt.overlap_backward(bucket_cap_mb=0.1)
    backward(params, 2)
    stashes = {id(p): g for b in handle._buckets.values() for p, g in zip(b.params, b.grads) if g is not None}
    assert stashes.keys() == grad_storage.keys()
    assert all(stashes[k].data_ptr() == grad_storage[k] for k in stashes)
    known = _storages([flat, list(stashes.values()), opt.state])
    held = {k: v for k, v in _storages(vars(handle)).items() if k not in known}
    param_bytes = sum(p.numel() * p.element_size() for p in flat)
    assert sum(held.values()) < 0.05 * param_bytes
    opt.step()


def _storages(obj, seen=None, out=None) -> dict:
    """Storage bytes of every tensor reachable from obj (dicts, lists, dataclasses)."""
    seen = set() if seen is None else seen
    out = {} if out is None else out
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    if isinstance(obj, ConsumedGradient):
        return out
    if isinstance(obj, torch.Tensor):
        out[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    elif isinstance(obj, dict):
        for v in list(obj.values()) + list(obj.keys()):
            _storages(v, seen, out)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _storages(v, seen, out)
    elif hasattr(obj, "__dataclass_fields__"):
        _storages(vars(obj), seen, out)
    return out


# -------------------------------------------------------------------- setup and refusals
def test_remove_goes_back_to_the_plain_step():
    plain = make()
    overlapped = make(overlap=True)
    train(*plain[:2], 6)
    train(*overlapped[:2], 3)
    backward(overlapped[0], 3)
    overlapped[2].remove()  # undoes the pending pass, as zero_grad() would
    overlapped[1].zero_grad()
    train(*overlapped[:2], 3, start=3)
    assert overlapped[1].overlap_handle is None
    assert_identical(snapshot(*plain[:2]), snapshot(*overlapped[:2]))


def test_refusals_name_the_problem():
    params, opt, handle = make(overlap=True)
    with pytest.raises(RuntimeError, match="already overlaps"):
        opt.overlap_backward()
    with pytest.raises(RuntimeError, match="remove\\(\\) on the handle"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)]})
    handle.remove()
    with pytest.raises(ValueError, match="bucket_cap_mb must be a positive number"):
        opt.overlap_backward(bucket_cap_mb=0)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        opt.overlap_backward(scaler=object())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        opt.overlap_backward(params)
    adaptive = msam_fused.MSAM([torch.zeros(3, requires_grad=True)], adaptive=True, backend="reference")
    with pytest.raises(NotImplementedError, match="adaptive=True"):
        adaptive.overlap_backward()
    sharded = msam_fused.MSAM([torch.zeros(3, requires_grad=True)])
    sharded._sharding = object()  # what DTensor (FSDP2) parameters set
    with pytest.raises(NotImplementedError, match="DTensor shards"):
        sharded.overlap_backward()
