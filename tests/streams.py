"""One stream of gradients to drive two implementations identically (docs/design.md, "Numerics").

Gradients come from seeded noise plus a small multiple of the parameter (so the dynamics
react to the weights) rather than from a training model, whose chaotic dynamics amplify a
one-ulp difference to order one within ~150 steps.
"""

import torch

# Three param groups; shapes include 0-d, one element and sizes that are no multiple of a
# vector width or block.
GROUP_SHAPES = [[(5, 3), (7,), (33,)], [(4, 4, 2), (), (129,)], [(1,), (13, 3), (1025,)]]
MSAM_HYPERS = [dict(lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.5),
               dict(lr=0.05, momentum=0.8, weight_decay=1e-3, rho=0.2),
               dict(lr=0.2, momentum=0.95, weight_decay=0.0, rho=1.0)]
ADAMW_HYPERS = [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, rho=0.5),
                dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, rho=0.2),
                dict(lr=2e-2, betas=(0.95, 0.9), eps=1e-8, weight_decay=0.01, rho=1.0)]
GRAD_WEIGHT = 0.1


def initial_params(dtype, seed=0, group_shapes=GROUP_SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]
            for shapes in group_shapes]


class GradientStream:
    """``grad(step, gi, i, p)``: seeded noise for (step, gi, i) plus ``GRAD_WEIGHT * p``.

    ``missing(step, gi, i)`` says which parameters get no gradient in a step: one parameter
    every third step, and one parameter that gets its first gradient only at step 10.
    """

    def __init__(self, seed=1, group_shapes=GROUP_SHAPES):
        self.seed = seed
        self.group_shapes = group_shapes

    def missing(self, step, gi, i):
        if (gi, i) == (1, 1):
            return step % 3 == 2
        if (gi, i) == (2, 0):
            return step < 10
        return False

    def grad(self, step, gi, i, p):
        if self.missing(step, gi, i):
            return None
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + gi * 101 + i)
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        return (noise + GRAD_WEIGHT * p.detach().double()).to(p.dtype)

    def grads(self, step, groups):
        return [[self.grad(step, gi, i, p) for i, p in enumerate(ps)] for gi, ps in enumerate(groups)]


def relative_error(actual, expected):
    """max |a - e| / max |e| over lists (of lists) of tensors, in float64."""
    a = torch.cat([t.double().reshape(-1) for t in _flat(actual)])
    e = torch.cat([t.double().reshape(-1) for t in _flat(expected)])
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-300))


def _flat(nested):
    for x in nested:
        if isinstance(x, torch.Tensor):
            yield x
        else:
            yield from _flat(x)


def finish_step(opt, scaler=None) -> None:
    """The end of a training step: the step (through ``scaler`` when there is one), zero_grad."""
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad()


def drive_sam(sam, params, stream, group: int, device, steps: int = 20) -> None:
    """``steps`` SAM steps whose two gradients (at w and at w + e) come from ``stream``: the
    ascent's at stream step ``step``, the descent's at ``step + 1000``."""
    for step in range(steps):
        for offset, finish in ((0, sam.first_step), (1000, sam.second_step)):
            for i, p in enumerate(params):
                p.grad = stream.grad(step + offset, group, i, p.detach().cpu()).to(device)
            finish(zero_grad=True)


def drive_momentum_ascent(cls, hypers, dtype, backend, device, steps, rho_steps,
                          group_shapes=GROUP_SHAPES, **options):
    """An MSAM-family optimizer (one param group per ``hypers`` entry, parameters from
    :func:`initial_params`) driven ``steps`` steps by a :class:`GradientStream`. At step
    ``rho_steps[0]`` every group's rho grows 2.5x, at ``rho_steps[1]`` group 0's becomes 0.
    Returns the parameters as stored (perturbed), the true weights and the optimizer."""
    params = [[p.to(device).requires_grad_() for p in ps]
              for ps in initial_params(dtype, group_shapes=group_shapes)]
    opt = cls([{"params": ps, **h} for ps, h in zip(params, hypers)], backend=backend, **options)
    stream = GradientStream(group_shapes=group_shapes)
    for step in range(steps):
        if step == rho_steps[0]:
            for g in opt.param_groups:
                g["rho"] *= 2.5
        if step == rho_steps[1]:
            opt.param_groups[0]["rho"] = 0.0
        for gi, ps in enumerate(params):
            for i, p in enumerate(ps):
                grad = stream.grad(step, gi, i, p.detach().cpu())
                p.grad = None if grad is None else grad.to(device)
        opt.step()
    with opt.unperturbed():
        true = [[p.detach().cpu().clone() for p in ps] for ps in params]
    stored = [[p.detach().cpu().clone() for p in ps] for ps in params]
    return stored, true, opt
