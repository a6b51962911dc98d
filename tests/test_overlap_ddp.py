"""MSAM.overlap_backward() under DistributedDataParallel: 2 CPU processes, gloo.

The hidden pass runs in DDP's communication hook on the all-reduced gradients, so the
overlapped trajectory must be the plain DDP trajectory bit for bit, on every rank, with
gradient accumulation under no_sync() and with a GradScaler skip that only one rank's
gradients cause.
"""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msam_fused
from distributed_harness import check_passed, job_outcomes
from msam_fused.distributed import check_replicas_identical
from streams import finish_step

STEPS = 12
HALF_BATCH = 6
HYPERS = dict(lr=0.1, momentum=0.9, weight_decay=5e-3, rho=0.5)

CHECKS = ["passes_run_in_the_communication_hook", "bit_identical_to_plain_ddp", "bit_identical_with_gradient_as_bucket_view",
          "no_sync_accumulation_matches_plain_ddp", "grad_scaler_skips_on_every_rank_together",
          "remove_goes_back_to_plain_ddp", "find_unused_parameters_is_refused"]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3))


def half_batch(step, rank, micro=0):
    gen = torch.Generator().manual_seed(100 + 10 * step + micro)
    x, y = torch.randn(2 * HALF_BATCH, 6, generator=gen), torch.randn(2 * HALF_BATCH, 3, generator=gen)
    return x[rank * HALF_BATCH:(rank + 1) * HALF_BATCH], y[rank * HALF_BATCH:(rank + 1) * HALF_BATCH]


def build(overlap, *, scaler=None, **ddp_options):
    net = mlp()
    model = nn.parallel.DistributedDataParallel(net, **ddp_options)
    groups = [{"params": net[0].parameters()}, {"params": [*net[2].parameters(), *net[4].parameters()],
                                                 "lr": 0.05}]
    opt = msam_fused.MSAM(groups, **HYPERS)
    handle = opt.overlap_backward(model, scaler=scaler, bucket_cap_mb=1e-4) if overlap else None
    return model, opt, handle


def train(model, opt, rank, steps=STEPS, *, start=0, micro_batches=1, scaler=None, poison=None):
    for step in range(start, start + steps):
        for micro in range(micro_batches):
            x, y = half_batch(step, rank, micro)
            loss = F.mse_loss(model(x), y)
            if poison == (step, rank):
                loss = loss * float("inf")
            loss = loss if scaler is None else scaler.scale(loss)
            if micro < micro_batches - 1:
                with model.no_sync():
                    loss.backward()
            else:
                loss.backward()
        finish_step(opt, scaler)


def assert_identical(a, b):
    (model_a, opt_a), (model_b, opt_b) = a, b
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        for key in opt_a.state[p]:
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key]), key


def overlap_job(rank, checks, workdir):
    with checks("passes_run_in_the_communication_hook"):
        model, opt, handle = build(True)
        inside, passes = threading.local(), []
        after_all_reduce, run_pass = handle._after_all_reduce, handle._run_pass

        def in_hook(*args):
            inside.yes = True
            try:
                return after_all_reduce(*args)
            finally:
                inside.yes = False

        def counted(*args):
            passes.append(getattr(inside, "yes", False))
            return run_pass(*args)

        handle._after_all_reduce, handle._run_pass = in_hook, counted
        train(model, opt, rank, 2)
        assert passes and all(passes)  # none left for the end of backward
    with checks("bit_identical_to_plain_ddp"):
        plain, overlapped = build(False), build(True)
        for model, opt, _ in (plain, overlapped):
            train(model, opt, rank)
        assert_identical(plain[:2], overlapped[:2])
        check_replicas_identical(*overlapped[:2])
    with checks("bit_identical_with_gradient_as_bucket_view"):
        plain, overlapped = build(False), build(True, gradient_as_bucket_view=True)
        for model, opt, _ in (plain, overlapped):
            train(model, opt, rank)
        assert_identical(plain[:2], overlapped[:2])
    with checks("no_sync_accumulation_matches_plain_ddp"):
        plain, overlapped = build(False), build(True)
        for model, opt, _ in (plain, overlapped):
            train(model, opt, rank, micro_batches=3)
        assert_identical(plain[:2], overlapped[:2])
        check_replicas_identical(*overlapped[:2])
    with checks("grad_scaler_skips_on_every_rank_together"):
        runs = []
        for overlap in (False, True):
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
            model, opt, _ = build(overlap, scaler=scaler)
            train(model, opt, rank, scaler=scaler, poison=(3, 1))  # an inf on rank 1 only
            runs.append((model, opt))
            assert (opt.skipped_steps, scaler.get_scale()) == (1, 2.0**7)
        assert_identical(*runs)
        check_replicas_identical(*runs[1])
    with checks("remove_goes_back_to_plain_ddp"):
        plain, overlapped = build(False), build(True)
        train(*plain[:2], rank, 2 * STEPS // 3)
        train(*overlapped[:2], rank, STEPS // 3)
        overlapped[2].remove()
        train(*overlapped[:2], rank, STEPS // 3, start=STEPS // 3)
        assert_identical(plain[:2], overlapped[:2])
    with checks("find_unused_parameters_is_refused"):
        model = nn.parallel.DistributedDataParallel(mlp(), find_unused_parameters=True)
        opt = msam_fused.MSAM(model.parameters(), **HYPERS)
        with pytest.raises(NotImplementedError, match="find_unused_parameters=True"):
            opt.overlap_backward(model)


@pytest.mark.parametrize("name", CHECKS)
def test_overlap_under_ddp(name):
    check_passed(job_outcomes(overlap_job), name)
