"""MSAM and SAM under DistributedDataParallel: 2 CPU processes, gloo.

DDP averages the gradients, so 2 ranks with half a batch each must train like one process on
the whole batch (to fp32 rounding: the average of two means is not bit for bit the mean), and
the ranks must stay bit-identical. SAM's ascent is local (each rank's own batch) or global.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msam_fused
from distributed_harness import check_passed, job_outcomes
from msam_fused.distributed import check_replicas_identical, sam_step

STEPS = 20
HALF_BATCH = 6
# fp32 training on the concatenated batch vs DDP, and SAM vs its emulation: measured 1.6e-7 to
# 2.6e-7 after 20 steps; local vs global ascent differ by 0.14.
FP32_RTOL = 1e-5
MSAM_HYPERS = dict(lr=0.1, momentum=0.9, weight_decay=5e-3, rho=0.5)
SAM_HYPERS = dict(rho=0.2, lr=0.1, momentum=0.9, weight_decay=5e-3)

DDP_CHECKS = ["msam_ranks_bit_identical", "msam_equals_concatenated_batch",
              "msam_unperturbed_evaluation", "sam_local_ascent_equals_per_rank_ascent",
              "sam_global_ascent_equals_concatenated_batch", "sam_local_and_global_ascent_differ",
              "sam_local_ascent_skips_on_every_rank_together", "sam_second_pass_leaves_batchnorm_stats",
              "sam_step_rejects_unwrapped_model"]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))


def batch(step):
    """The concatenated batch of all ranks at a step: rank r trains on half r."""
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(2 * HALF_BATCH, 6, generator=gen), torch.randn(2 * HALF_BATCH, 3, generator=gen)


def half(t, rank):
    return t[rank * HALF_BATCH:(rank + 1) * HALF_BATCH]


def relative_error(a, b):
    a = torch.cat([t.detach().reshape(-1) for t in a])
    b = torch.cat([t.detach().reshape(-1) for t in b])
    return float((a - b).abs().max() / b.abs().max())


def train_msam(model, rank=None):
    opt = msam_fused.MSAM(model.parameters(), **MSAM_HYPERS)
    for step in range(STEPS):
        x, y = batch(step)
        if rank is not None:
            x, y = half(x, rank), half(y, rank)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return opt


def emulate_sam(model, step_batches):
    """SAM written out by hand in one process, for an ascent per chunk of the batch.

    ``step_batches``: per step, the list of chunks that ascend separately. Each chunk's
    gradient at ``w`` gives its own ``e``; the descent gradient is the mean over chunks of the
    gradient at ``w + e_chunk``; SGD with momentum takes the step from ``w``.
    """
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=SAM_HYPERS["lr"], momentum=SAM_HYPERS["momentum"],
                           weight_decay=SAM_HYPERS["weight_decay"])
    for chunks in step_batches:
        descent = [torch.zeros_like(p) for p in params]
        for x, y in chunks:
            g1 = torch.autograd.grad(F.mse_loss(model(x), y), params)
            norm = torch.sqrt(sum((g * g).sum() for g in g1))
            w = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, g in zip(params, g1):
                    p.add_(SAM_HYPERS["rho"] * g / (norm + msam_fused.EPS_NORM))
            g2 = torch.autograd.grad(F.mse_loss(model(x), y), params)
            with torch.no_grad():
                for p, saved in zip(params, w):
                    p.copy_(saved)
            for d, g in zip(descent, g2):
                d.add_(g / len(chunks))
        for p, d in zip(params, descent):
            p.grad = d
        base.step()
        base.zero_grad()


def train_sam_ddp(ascent, rank, steps=STEPS):
    model = nn.parallel.DistributedDataParallel(mlp())
    sam = msam_fused.SAM(model.parameters(), torch.optim.SGD, **SAM_HYPERS)
    for step in range(steps):
        x, y = batch(step)
        x, y = half(x, rank), half(y, rank)
        sam_step(model, sam, lambda: F.mse_loss(model(x), y), ascent=ascent)
    return model, sam


def ddp_job(rank, checks, workdir):
    model = nn.parallel.DistributedDataParallel(mlp())
    opt = train_msam(model, rank)
    with checks("msam_ranks_bit_identical"):
        check_replicas_identical(model, opt)
    single = mlp()
    single_opt = train_msam(single)
    with checks("msam_equals_concatenated_batch"):
        assert relative_error(model.parameters(), single.parameters()) <= FP32_RTOL
    with checks("msam_unperturbed_evaluation"):
        x, _ = batch(STEPS)
        before = [p.detach().clone() for p in model.parameters()]
        with opt.unperturbed(), single_opt.unperturbed(), torch.no_grad():
            assert relative_error([model(x)], [single(x)]) <= FP32_RTOL
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    local, local_sam = train_sam_ddp("local", rank)
    global_, global_sam = train_sam_ddp("global", rank)
    with checks("sam_local_ascent_equals_per_rank_ascent"):
        check_replicas_identical(local, local_sam)
        expected = mlp()
        emulate_sam(expected, [[(half(x, r), half(y, r)) for r in range(2)]
                               for x, y in map(batch, range(STEPS))])
        assert relative_error(local.parameters(), expected.parameters()) <= FP32_RTOL
    with checks("sam_global_ascent_equals_concatenated_batch"):
        check_replicas_identical(global_, global_sam)
        expected = mlp()
        emulate_sam(expected, [[batch(step)] for step in range(STEPS)])
        assert relative_error(global_.parameters(), expected.parameters()) <= FP32_RTOL
    with checks("sam_local_and_global_ascent_differ"):
        assert relative_error(local.parameters(), global_.parameters()) > 100 * FP32_RTOL

    with checks("sam_local_ascent_skips_on_every_rank_together"):
        # Rank 1's first-pass gradient is inf, its second-pass gradient finite. Without the
        # agreement rank 0 would step and rank 1 skip: the replicas would drift apart.
        model = nn.parallel.DistributedDataParallel(mlp())
        sam = msam_fused.SAM(model.parameters(), torch.optim.SGD, **SAM_HYPERS)
        before = [p.detach().clone() for p in model.parameters()]
        passes = []
        x, y = batch(0)

        def loss():
            passes.append(None)
            poison = float("inf") if rank == 1 and len(passes) == 1 else 1.0
            return poison * F.mse_loss(model(half(x, rank)), half(y, rank))

        sam_step(model, sam, loss)
        assert sam.skipped_steps == 1
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        check_replicas_identical(model, sam)
    with checks("sam_second_pass_leaves_batchnorm_stats"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
        expected = copy.deepcopy(net)
        bn_model = nn.parallel.DistributedDataParallel(net)
        sam = msam_fused.SAM(bn_model.parameters(), torch.optim.SGD, **SAM_HYPERS)
        x, y = batch(0)
        sam_step(bn_model, sam, lambda: F.mse_loss(bn_model(half(x, rank)), half(y, rank)))
        expected(half(x, rank))  # one update, by the first pass on this rank's batch
        bn, bn_expected = net[1], expected[1]
        assert int(bn.num_batches_tracked) == 1
        assert torch.equal(bn.running_mean, bn_expected.running_mean)
        assert torch.equal(bn.running_var, bn_expected.running_var)
        check_replicas_identical(bn_model, sam)

    with checks("sam_step_rejects_unwrapped_model"):
        plain = mlp()
        sam = msam_fused.SAM(plain.parameters(), torch.optim.SGD, **SAM_HYPERS)
        with pytest.raises(ValueError, match="neither DistributedDataParallel"):
            sam_step(plain, sam, lambda: plain(batch(0)[0]).sum())


@pytest.mark.parametrize("name", DDP_CHECKS)
def test_ddp(name):
    check_passed(job_outcomes(ddp_job), name)


def test_sam_step_in_one_process_is_the_documented_recipe():
    """Without torch.distributed, sam_step is SAM's two passes (the ascent option is moot)."""
    x, y = batch(0)
    stepped, manual = mlp(), mlp()
    sam = msam_fused.SAM(stepped.parameters(), torch.optim.SGD, **SAM_HYPERS)
    ref = msam_fused.SAM(manual.parameters(), torch.optim.SGD, **SAM_HYPERS)
    for _ in range(3):
        sam_step(stepped, sam, lambda: F.mse_loss(stepped(x), y))
        F.mse_loss(manual(x), y).backward()
        ref.first_step(zero_grad=True)
        F.mse_loss(manual(x), y).backward()
        ref.second_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(stepped.parameters(), manual.parameters()))


def test_sam_step_with_grad_scaler_and_clipping_matches_the_plain_recipe():
    """The scaler's power-of-two scale cancels; the clipping acts on g2, after unscaling."""
    x, y = batch(0)
    stepped, manual = mlp(), mlp()
    sam = msam_fused.SAM(stepped.parameters(), torch.optim.SGD, **SAM_HYPERS)
    ref = msam_fused.SAM(manual.parameters(), torch.optim.SGD, **SAM_HYPERS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for _ in range(3):
        sam_step(stepped, sam, lambda: F.mse_loss(stepped(x), y), scaler=scaler, max_grad_norm=0.05)
        F.mse_loss(manual(x), y).backward()
        ref.first_step(zero_grad=True)
        F.mse_loss(manual(x), y).backward()
        torch.nn.utils.clip_grad_norm_(manual.parameters(), 0.05)
        ref.second_step(zero_grad=True)
    assert relative_error(stepped.parameters(), manual.parameters()) <= 1e-6
    assert all(p.grad is None for p in stepped.parameters())


def test_sam_step_rejects_unknown_ascent():
    model = mlp()
    sam = msam_fused.SAM(model.parameters(), torch.optim.SGD, **SAM_HYPERS)
    with pytest.raises(ValueError, match="ascent must be one of"):
        sam_step(model, sam, lambda: model(batch(0)[0]).sum(), ascent="both")


def test_replica_check_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        check_replicas_identical(mlp())
