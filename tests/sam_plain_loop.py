"""SAM written as the plain two-pass loop, beside ``msam_fused.SAM`` on one gradient stream.

The loop shares no code with msam_fused: it moves each parameter to ``w + e`` with plain tensor
ops, keeps ``w`` in a clone, puts the clone back and lets a second, identical base optimizer take
its step. A step whose gradients hold inf/NaN is skipped as a whole, as ``nonfinite="skip"``
promises. ``compare_with_plain_loop`` drives both and returns the largest relative difference.
"""

import math

import torch

import msam_fused

from streams import GradientStream, initial_params, relative_error

EPS = 1e-12
# Three groups: one adaptive-capable default group, one with its own rho, one not perturbed
# (a normalization-layer-only setup perturbs only some groups).
GROUP_OPTIONS = [dict(rho=0.05), dict(rho=0.1), dict(rho=0.05, perturb=False)]
# Steps whose second gradient holds an inf (the whole SAM step is then skipped).
NONFINITE_STEPS = (7, 23)


def plain_sam_step(groups, base, g1, g2, adaptive):
    """One SAM step by hand: ``g1``/``g2`` are per-group lists of ascent and descent gradients."""
    if any(not torch.isfinite(g).all() for gs in (g1, g2) for grads in gs for g in grads):
        return
    moved = [gi for gi, g in enumerate(groups) if g.get("perturb", True)]
    sq = 0.0
    for gi in moved:
        for p, g in zip(groups[gi]["params"], g1[gi]):
            term = p.detach().abs() * g if adaptive else g
            sq += float((term.double() ** 2).sum())
    norm = math.sqrt(sq)
    saved = [[p.clone() for p in g["params"]] for g in groups]
    with torch.no_grad():
        for gi in moved:
            for p, g in zip(groups[gi]["params"], g1[gi]):
                e = groups[gi]["rho"] * g / (norm + EPS)
                p.add_(e * p * p if adaptive else e)
        for group, copies in zip(groups, saved):
            for p, w in zip(group["params"], copies):
                p.copy_(w)
    for group, grads in zip(groups, g2):
        for p, g in zip(group["params"], grads):
            p.grad = g.clone()
    base.step()


def compare_with_plain_loop(backend, base_cls, base_kwargs, *, adaptive=False, restore="swap",
                            scaler=False, steps=50, device="cpu", dtype=torch.float64):
    """Relative difference after ``steps`` SAM steps between ``msam_fused.SAM`` and the loop.

    With ``scaler`` the gradients are scaled as a ``GradScaler`` scales them and the second step
    goes through ``scaler.step(sam)``; otherwise the non-finite steps are skipped by SAM's own
    check. Either way the loop sees unscaled gradients and skips those steps itself.
    """
    stream = GradientStream()
    stream.missing = lambda step, gi, i: False  # both passes use every parameter
    ours = [[p.to(device).requires_grad_() for p in ps] for ps in initial_params(dtype)]
    loop = [[p.to(device).requires_grad_() for p in ps] for ps in initial_params(dtype)]
    sam = msam_fused.SAM([{"params": ps, **o} for ps, o in zip(ours, GROUP_OPTIONS)], base_cls,
                         adaptive=adaptive, backend=backend, restore=restore, **base_kwargs)
    loop_groups = [{"params": ps, **o} for ps, o in zip(loop, GROUP_OPTIONS)]
    loop_base = base_cls([{"params": g["params"]} for g in loop_groups], **base_kwargs)
    grad_scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=5) if scaler else None
    if scaler:
        grad_scaler.scale(torch.ones((), device=device))  # what scaling a loss does first
    scale = grad_scaler.get_scale() if scaler else 1.0
    for step in range(steps):
        g1 = stream.grads(step, ours)
        g2 = stream.grads(step + 10_000, ours)
        if step in NONFINITE_STEPS:
            g2[0][0] = g2[0][0].clone()
            g2[0][0].view(-1)[0] = float("inf")
        plain_sam_step(loop_groups, loop_base, [[g.to(device) for g in gs] for gs in g1],
                       [[g.to(device) for g in gs] for gs in g2], adaptive)
        for gradients, finish in ((g1, None), (g2, "second")):
            for ps, gs in zip(ours, gradients):
                for p, g in zip(ps, gs):
                    p.grad = g.to(device) * scale
            if finish is None:
                sam.first_step(zero_grad=True)
            elif scaler:
                grad_scaler.step(sam)
                grad_scaler.update()
                scale = grad_scaler.get_scale()
                sam.zero_grad()
            else:
                sam.second_step(zero_grad=True)
    expected_skips = len([s for s in NONFINITE_STEPS if s < steps])
    assert sam.skipped_steps == expected_skips  # counted whoever found them
    return relative_error([[p.detach().cpu() for p in ps] for ps in ours],
                          [[p.detach().cpu() for p in ps] for ps in loop])
