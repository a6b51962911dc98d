"""MSAM, AdamW-MSAM and SAM with sharded state (FSDP2, DTensor parameters): 2 CPU processes, gloo.

Each rank updates its shard; the global norm is one all-reduce of the partial sums of squares.
The sharded optimizers must equal unsharded ones (one gradient stream drives both: docs/design.md, "Numerics"),
with uneven shards (3 + 2 rows, 1 + 0 rows: an empty shard) and a replicated parameter.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msam_fused
from distributed_harness import check_passed, job_outcomes
from msam_fused.distributed import load_checkpoint, sam_step, save_checkpoint, unperturbed
from streams import ADAMW_HYPERS, MSAM_HYPERS, GradientStream, relative_error

STEPS = 20
# The bound. Measured after 20 fp32 steps (the norm's partial sums are added in another
# order): MSAM 8e-8, AdamW-MSAM 6e-8. Without the all-reduce: 5e-3; without the weight of the
# replicated parameter: 3e-5.
RTOL = 1e-6
# GradientStream's shapes with the 0-d parameter made (2,) (0-d DTensors are rejected, as in
# fully_shard). Shard(0) over 2 ranks: (5, 3) -> 3 + 2 rows, (1,) -> 1 + 0, (1025,) -> 513 + 512.
GROUP_SHAPES = [[(5, 3), (7,), (33,)], [(4, 4, 2), (2,), (129,)], [(1,), (13, 3), (1025,)]]
REPLICATED = (0, 1)  # this parameter is Replicate()d, not sharded: its norm counts once

FSDP_CHECKS = ["msam_sharded_equals_unsharded", "adamw_msam_sharded_equals_unsharded",
               "msam_on_hsdp_mesh_equals_unsharded", "bf16_master_weights_sharded_equal_unsharded", "full_state_dict_round_trip_is_exact",
               "sam_sharded_equals_unsharded", "fully_shard_msam_trains_like_one_process",
               "evaluation_under_unperturbed_leaves_training_alone",
               "checkpoint_resumes_exactly_MSAM", "checkpoint_resumes_exactly_AdamWMSAM",
               "checkpoint_resumes_exactly_SAM", "rank_local_state_dict_resumes_exactly",
               "full_state_into_shards_is_refused", "mixing_sharded_and_plain_params_is_refused",
               "params_on_different_meshes_are_refused", "grad_sharded_unlike_param_is_refused",
               "local_ascent_on_shards_is_refused", "step_without_process_group_is_refused"]


def full_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=gen) for shape in shapes] for shapes in GROUP_SHAPES]


def gathered(params):
    """Copies of the full tensors of (lists of) DTensor parameters."""
    if isinstance(params, list):
        return [gathered(p) for p in params]
    return params.full_tensor().detach().clone()


def shard(t, mesh, gi, i):
    """Shard(0) on the last mesh dimension (Replicate() for REPLICATED), replicated over the
    others, as HSDP does on a (replicas, shards) mesh."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    last = Replicate() if (gi, i) == REPLICATED else Shard(0)
    return distribute_tensor(t, mesh, [Replicate()] * (mesh.ndim - 1) + [last])


def set_grads(params, stream, step, mesh=None):
    """``stream``'s gradients at the full parameters; sharded like them when ``mesh``."""
    for gi, ps in enumerate(params):
        for i, p in enumerate(ps):
            g = stream.grad(step, gi, i, p if mesh is None else p.full_tensor())
            p.grad = g if g is None or mesh is None else shard(g, mesh, gi, i)


def drive(opt, params, stream, steps, mesh=None):
    for step in range(steps):
        set_grads(params, stream, step, mesh)
        opt.step()


def stream_matches_unsharded(cls, hypers, mesh, dtype=torch.float32, **options):
    stream = GradientStream(group_shapes=GROUP_SHAPES)
    plain = [[t.to(dtype).requires_grad_() for t in ts] for ts in full_params()]
    sharded = [[nn.Parameter(shard(t.to(dtype), mesh, gi, i)) for i, t in enumerate(ts)]
               for gi, ts in enumerate(full_params())]
    plain_opt = cls([{"params": ps, **h} for ps, h in zip(plain, hypers)], **options)
    sharded_opt = cls([{"params": ps, **h} for ps, h in zip(sharded, hypers)], **options)
    drive(plain_opt, plain, stream, STEPS)
    drive(sharded_opt, sharded, stream, STEPS, mesh)
    assert relative_error(gathered(sharded), plain) <= RTOL
    if options.get("master_weights"):
        masters = [[opt.state[p]["master_weight"] for p in sum(params, [])]
                   for opt, params in ((sharded_opt, sharded), (plain_opt, plain))]
        assert relative_error(gathered(masters[0]), masters[1]) <= RTOL
    with plain_opt.unperturbed(), sharded_opt.unperturbed():
        assert relative_error(gathered(sharded), plain) <= RTOL


def sam_matches_unsharded(mesh):
    stream = GradientStream(group_shapes=GROUP_SHAPES)
    models = []
    for params in ([[t.clone().requires_grad_() for t in ts] for ts in full_params()],
                   [[nn.Parameter(shard(t, mesh, gi, i)) for i, t in enumerate(ts)]
                    for gi, ts in enumerate(full_params())]):
        sam = msam_fused.SAM([p for ps in params for p in ps], torch.optim.SGD, rho=0.3, lr=0.05,
                             momentum=0.9)
        models.append((params, sam))
    for step in range(STEPS):
        for (params, sam), m in zip(models, (None, mesh)):
            set_grads(params, stream, 2 * step, m)  # g1 at w
            sam.first_step()
            set_grads(params, stream, 2 * step + 1, m)  # g2 at w + e
            sam.second_step()
    (plain, _), (sharded, _) = models
    assert relative_error(gathered(sharded), plain) <= RTOL


def fsdp_mlp(mesh=None):
    """Odd widths, so every layer's rows split unevenly; fully_shard per layer when ``mesh``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model[::2]:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def batch(step, rank=None):
    gen = torch.Generator().manual_seed(500 + step)
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)
    return (x, y) if rank is None else (x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])


def make_optimizer(name, model):
    if name == "MSAM":
        return msam_fused.MSAM(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2, rho=0.5)
    if name == "AdamWMSAM":
        return msam_fused.AdamWMSAM(model.parameters(), lr=1e-2, weight_decay=0.1, rho=0.5)
    return msam_fused.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9,
                          weight_decay=1e-2)


def train(model, opt, steps, rank=None, start=0):
    for step in range(start, start + steps):
        x, y = batch(step, rank)
        if isinstance(opt, msam_fused.SAM):
            sam_step(model, opt, lambda: F.mse_loss(model(x), y), ascent="global")
        else:
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()


def local_tensors(opt):
    """Copies of this rank's shards of the parameters (the optimizer's: the sharded ones, even
    while FSDP2 has the root's all-gathered) and of the optimizer state."""
    out = [p.to_local().clone() for g in opt.param_groups for p in g["params"]]
    for state in opt.state.values():
        out += [v.to_local().clone() if hasattr(v, "to_local") else v.clone()
                for _, v in sorted(state.items()) if isinstance(v, torch.Tensor)]
    return out


def checkpoint_resumes(name, mesh, path):
    model = fsdp_mlp(mesh)
    opt = make_optimizer(name, model)
    train(model, opt, 5)
    save_checkpoint(path, model, opt)
    train(model, opt, 5, start=5)
    resumed = fsdp_mlp(mesh)
    resumed_opt = make_optimizer(name, resumed)
    load_checkpoint(path, resumed, resumed_opt)
    train(resumed, resumed_opt, 5, start=5)
    expected, actual = local_tensors(opt), local_tensors(resumed_opt)
    assert len(expected) == len(actual) and all(torch.equal(a, b) for a, b in zip(expected, actual))


def fsdp_job(rank, checks, workdir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    with checks("msam_sharded_equals_unsharded"):
        stream_matches_unsharded(msam_fused.MSAM, MSAM_HYPERS, mesh)
    with checks("adamw_msam_sharded_equals_unsharded"):
        stream_matches_unsharded(msam_fused.AdamWMSAM, ADAMW_HYPERS, mesh)
    with checks("msam_on_hsdp_mesh_equals_unsharded"):  # 2 replicas of 1 shard: weights 1/2
        stream_matches_unsharded(msam_fused.MSAM, MSAM_HYPERS, init_device_mesh("cpu", (2, 1)))
    with checks("bf16_master_weights_sharded_equal_unsharded"):  # measured: bit-identical
        for cls, hypers in ((msam_fused.MSAM, MSAM_HYPERS), (msam_fused.AdamWMSAM, ADAMW_HYPERS)):
            stream_matches_unsharded(cls, hypers, mesh, torch.bfloat16, master_weights=True)
    with checks("sam_sharded_equals_unsharded"):
        sam_matches_unsharded(mesh)
    with checks("fully_shard_msam_trains_like_one_process"):
        sharded, plain = fsdp_mlp(mesh), fsdp_mlp()
        sharded_opt, plain_opt = make_optimizer("MSAM", sharded), make_optimizer("MSAM", plain)
        train(sharded, sharded_opt, STEPS, rank)
        train(plain, plain_opt, STEPS)
        # fp32 rounding of the reduce-scatter's average of half-batch means: measured 1.8e-7.
        assert relative_error(gathered(list(sharded.parameters())), list(plain.parameters())) <= 1e-5
    with checks("evaluation_under_unperturbed_leaves_training_alone"):
        # The root owns parameters: FSDP2 keeps its all-gathered copies after a forward.
        runs = []
        for evaluate in (False, True):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 1))
            plain = copy.deepcopy(model)
            fully_shard(model, mesh=mesh)
            opt, plain_opt = make_optimizer("MSAM", model), make_optimizer("MSAM", plain)
            for step in range(3):
                train(model, opt, 1, rank, start=step)
                train(plain, plain_opt, 1, start=step)
                if evaluate:
                    with unperturbed(model, opt), plain_opt.unperturbed(), torch.no_grad():
                        x = batch(9)[0]
                        assert relative_error([model(x)], [plain(x)]) <= 1e-5
            runs.append(local_tensors(opt))
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    for name in ("MSAM", "AdamWMSAM", "SAM"):
        with checks(f"checkpoint_resumes_exactly_{name}"):
            checkpoint_resumes(name, mesh, os.path.join(workdir, name))

    with checks("rank_local_state_dict_resumes_exactly"):
        model = fsdp_mlp(mesh)
        opt = make_optimizer("AdamWMSAM", model)
        train(model, opt, 3)
        saved = copy.deepcopy((model.state_dict(), opt.state_dict()))  # what torch.save keeps
        train(model, opt, 3, start=3)
        resumed = fsdp_mlp(mesh)
        resumed_opt = make_optimizer("AdamWMSAM", resumed)
        resumed.load_state_dict(saved[0])
        resumed_opt.load_state_dict(saved[1])
        train(resumed, resumed_opt, 3, start=3)
        expected, actual = local_tensors(opt), local_tensors(resumed_opt)
        assert all(torch.equal(a, b) for a, b in zip(expected, actual))
    with checks("full_state_dict_round_trip_is_exact"):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                             set_state_dict)

        full = StateDictOptions(full_state_dict=True)
        model = fsdp_mlp(mesh)
        opt = make_optimizer("MSAM", model)
        train(model, opt, 3)
        model_sd, optim_sd = get_state_dict(model, opt, options=full)
        assert not any(hasattr(v, "to_local") for v in optim_sd["state"]["0.weight"].values())
        loaded = fsdp_mlp(mesh)
        loaded_opt = make_optimizer("MSAM", loaded)
        set_state_dict(loaded, loaded_opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=full)
        expected, actual = local_tensors(opt), local_tensors(loaded_opt)
        assert len(expected) == len(actual) and all(torch.equal(a, b) for a, b in zip(expected, actual))
    with checks("full_state_into_shards_is_refused"):
        plain = fsdp_mlp()
        plain_opt = make_optimizer("MSAM", plain)
        train(plain, plain_opt, 1)
        model = fsdp_mlp(mesh)
        opt = make_optimizer("MSAM", model)
        with pytest.raises(ValueError, match="is a DTensor but its saved state 'momentum_buffer' is "
                                             "a plain tensor"):
            opt.load_state_dict(plain_opt.state_dict())
        assert not opt.state

    sharded_param = nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
    with checks("mixing_sharded_and_plain_params_is_refused"):
        with pytest.raises(ValueError, match="plain tensor while others are DTensors"):
            msam_fused.MSAM([sharded_param, nn.Parameter(torch.ones(3))])
        opt = msam_fused.MSAM([sharded_param])
        with pytest.raises(ValueError, match="plain tensor while others are DTensors"):
            opt.add_param_group({"params": [nn.Parameter(torch.ones(3))]})
        assert len(opt.param_groups) == 1
        with pytest.raises(ValueError, match="plain tensor while others are DTensors"):
            msam_fused.SAM([sharded_param, nn.Parameter(torch.ones(3))], torch.optim.SGD, lr=0.1)
    with checks("params_on_different_meshes_are_refused"):
        other_mesh = init_device_mesh("cpu", (1, 2))
        other = nn.Parameter(distribute_tensor(torch.ones(4, 3), other_mesh, [Replicate(), Shard(0)]))
        with pytest.raises(ValueError, match="all parameters of one optimizer must share one mesh"):
            msam_fused.AdamWMSAM([sharded_param, other])
    with checks("grad_sharded_unlike_param_is_refused"):
        opt = msam_fused.MSAM([sharded_param], lr=0.1, rho=0.5)
        before = sharded_param.detach().to_local().clone()
        sharded_param.grad = distribute_tensor(torch.ones(4, 3), mesh, [Replicate()])
        with pytest.raises(RuntimeError, match="must be sharded like the parameter"):
            opt.step()
        assert torch.equal(sharded_param.to_local(), before) and not opt.state
    with checks("local_ascent_on_shards_is_refused"):
        model = fsdp_mlp(mesh)
        sam = make_optimizer("SAM", model)
        with pytest.raises(ValueError, match="use ascent='global'"):
            sam_step(model, sam, lambda: model(batch(0)[0]).sum(), ascent="local")
    with checks("step_without_process_group_is_refused"):
        opt = msam_fused.MSAM([sharded_param], lr=0.1, rho=0.5)
        sharded_param.grad = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
        before = sharded_param.detach().to_local().clone()
        torch.distributed.destroy_process_group()
        with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
            opt.step()
        assert torch.equal(sharded_param.to_local(), before) and not opt.state


@pytest.mark.parametrize("name", FSDP_CHECKS)
def test_fsdp(name):
    check_passed(job_outcomes(fsdp_job), name)
