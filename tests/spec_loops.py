"""Plain per-tensor loops written from the algorithms of docs/design.md, sharing no code with msam_fused.

They are the independent check on the reference optimizers: a different hand wrote the same
algorithm, tensor by tensor, in the most literal way. Parameters are lists of tensors, groups
are dicts of hyper-parameters, and ``grads[i] is None`` means "no gradient this step".
"""

import math

import torch

EPS = 1e-12


class SpecMSAM:
    def __init__(self, groups):
        # groups: list of dicts with "params" (list of tensors) and lr, momentum, weight_decay, rho
        self.groups = groups
        self.v = {}
        self.c = [0.0 for _ in groups]  # python floats in float64: the coefficient applied

    def step(self, grads):
        # grads: list (per group) of lists (per param) of tensors or None
        sq = 0.0
        for gi, group in enumerate(self.groups):
            for i, p in enumerate(group["params"]):
                g = grads[gi][i]
                key = (gi, i)
                if g is None and key not in self.v:
                    continue
                if key not in self.v:
                    self.v[key] = torch.zeros_like(p)
                v = self.v[key]
                if g is None:
                    p.add_(self.c[gi] * v)            # remove the perturbation, nothing else
                else:
                    d = g + group["weight_decay"] * p
                    p.add_(self.c[gi] * v)
                    v.mul_(group["momentum"]).add_(d)
                    p.sub_(group["lr"] * v)
                sq += float((v.double() ** 2).sum())
        norm = math.sqrt(sq)
        for gi, group in enumerate(self.groups):
            self.c[gi] = group["rho"] / (norm + EPS)
            for i, p in enumerate(group["params"]):
                if (gi, i) in self.v:
                    p.sub_(self.c[gi] * self.v[(gi, i)])

    def true_weights(self):
        return [[p + self.c[gi] * self.v[(gi, i)] if (gi, i) in self.v else p.clone()
                 for i, p in enumerate(group["params"])] for gi, group in enumerate(self.groups)]


class SpecAdamWMSAM:
    def __init__(self, groups):
        self.groups = groups
        self.m, self.s, self.t = {}, {}, {}
        self.c = [0.0 for _ in groups]

    def step(self, grads):
        sq = 0.0
        for gi, group in enumerate(self.groups):
            b1, b2 = group["betas"]
            for i, p in enumerate(group["params"]):
                g = grads[gi][i]
                key = (gi, i)
                if g is None and key not in self.m:
                    continue
                if key not in self.m:
                    self.m[key], self.s[key], self.t[key] = torch.zeros_like(p), torch.zeros_like(p), 0
                m, s = self.m[key], self.s[key]
                p.add_(self.c[gi] * m)
                if g is not None:
                    self.t[key] += 1
                    t = self.t[key]
                    m.mul_(b1).add_((1 - b1) * g)
                    s.mul_(b2).add_((1 - b2) * g * g)
                    denom = s.sqrt() / math.sqrt(1 - b2 ** t) + group["eps"]
                    p.sub_((group["lr"] / (1 - b1 ** t)) * m / denom)
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                sq += float((m.double() ** 2).sum())
        norm = math.sqrt(sq)
        for gi, group in enumerate(self.groups):
            self.c[gi] = group["rho"] / (norm + EPS)
            for i, p in enumerate(group["params"]):
                if (gi, i) in self.m:
                    p.sub_(self.c[gi] * self.m[(gi, i)])


def sgd_momentum_step_(p, d, buffers, key, lr, momentum):
    """torch.optim.SGD's update without dampening: the buffer starts at d, then mu * buffer + d."""
    if key not in buffers:
        buffers[key] = d.clone()
    else:
        buffers[key].mul_(momentum).add_(d)
    p.sub_(lr * buffers[key])


def spec_sam_sgd_step(groups, buffers, grad_at, adaptive=False):
    """One SAM step around SGD with momentum; ``grad_at(gi, i, p)`` gives the gradient at p.

    A group's own ``adaptive`` overrides the argument; a group with ``perturb=False`` is not
    moved and stays out of the norm."""
    g1 = [[grad_at(gi, i, p) for i, p in enumerate(g["params"])] for gi, g in enumerate(groups)]
    moved = [gi for gi, g in enumerate(groups) if g.get("perturb", True)]
    scaled = [groups[gi].get("adaptive", adaptive) for gi in range(len(groups))]
    sq = 0.0
    for gi in moved:
        for p, g in zip(groups[gi]["params"], g1[gi]):
            x = p.abs() * g if scaled[gi] else g
            sq += float((x.double() ** 2).sum())
    norm = math.sqrt(sq)
    saved = [[p.clone() for p in g["params"]] for g in groups]
    for gi in moved:
        for p, g in zip(groups[gi]["params"], g1[gi]):
            e = groups[gi]["rho"] * g / (norm + EPS)
            p.add_(e * p * p if scaled[gi] else e)
    g2 = [[grad_at(gi, i, p) for i, p in enumerate(g["params"])] for gi, g in enumerate(groups)]
    for gi, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            p.copy_(saved[gi][i])
            d = g2[gi][i] + group["weight_decay"] * p
            sgd_momentum_step_(p, d, buffers, (gi, i), group["lr"], group["momentum"])
