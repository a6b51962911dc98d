"""Checkpoints that are both the model and the resume point (docs/checkpoints.md).

Between steps MSAM's parameters hold the perturbed weights ``p = w - c * x``. A trainer saves
the model's weights next to the optimizer state, and either kind may be in the file: the
perturbed ``p`` (``model.state_dict()``) or the true ``w`` (``opt.unperturbed_state_dict(model)``,
what is worth shipping). The optimizer state dict therefore records, per param group, a
fingerprint of both, and a load compares the model's weights with them:

* the perturbed weights: nothing to do, the run continues bit for bit;
* the true weights: the perturbation is applied again (``p = w - c * x``, the backend's
  ``apply_perturbation_``), and the run continues up to the rounding of that subtraction;
* neither: the weights belong to another model or another step, and continuing would follow a
  different trajectory without a word; the first ``step()`` or ``unperturbed()`` raises.

The check runs in ``load_state_dict`` when the model already holds its weights (load the model
first and the first forward pass already sees the perturbed weights), else at the first
``step()`` or ``unperturbed()``.

A fingerprint is a few float64 moments per group of the parameters that have optimizer state:
``sum t``, ``sum t**2``, ``sum t * x`` (``x`` the applied direction, which separates ``p`` from
``w`` by ``c * ||x||**2``) and, as their scales, ``sum |t|`` and ``sum |t * x|``. The true
weights are fingerprinted as the export computes them (the same backend call on the same
tensors), so a saved file matches its fingerprint up to the order of a float64 summation:
:data:`TOLERANCE` is far below what one optimizer step changes.

Warm starts: a ``torch.optim.SGD`` state dict loads into MSAM and an ``AdamW`` one into
AdamW-MSAM (momenta carried over, no perturbation applied yet: ``c = 0``), see
:func:`adopt_torch_state_dict`.
"""

from __future__ import annotations

import numbers
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

#: the key of the fingerprint in ``state_dict()["msam_fused"]``
FINGERPRINT_KEY = "weights"
#: largest relative difference of a moment (to its scale) that still counts as the same weights
TOLERANCE = 1e-6
# group options of torch.optim's SGD/AdamW that a warm start drops: implementation choices
# (the MSAM optimizers pick their own backend) and the two checked before they are dropped
TORCH_IMPLEMENTATION_FLAGS = ("foreach", "fused", "differentiable", "capturable",
                              "decoupled_weight_decay", "maximize")
# the group options MSAM adds to torch's, which a warm start takes from this optimizer
OWN_GROUP_KEYS = ("rho", "adaptive", "perturb")


@dataclass
class PendingWeightsCheck:
    """What a load left to do once the model holds its weights: compare them with the saved
    fingerprint (``fingerprint``), or, after a warm start (``fingerprint is None``), take them as
    the true weights of the fp32 master copies."""

    fingerprint: Optional[dict]


# -------------------------------------------------------------------- true weights in place
@contextmanager
def holding_true_weights(buckets: list, direction_key: str) -> Iterator[list]:
    """The buckets' parameters hold the true weights ``w`` inside (``remove_perturbation_``);
    on exit the perturbed values come back bit for bit (saved, not recomputed). Yields the
    saved perturbed copies, one list per bucket."""
    saved = [[p.detach().clone() for p in b.params] for b in buckets]
    with torch.no_grad():
        for b in buckets:
            b.backend.remove_perturbation_(b.params, b.applied_directions(direction_key),
                                           b.column("master_weight"),
                                           coef=b.states[0]["perturbation_coef"])
    try:
        yield saved
    finally:
        with torch.no_grad():
            for b, copies in zip(buckets, saved):
                for p, copy in zip(b.params, copies):
                    p.copy_(copy)


def apply_perturbation_again(buckets: list, direction_key: str) -> None:
    """``p = w - c * x`` for parameters that hold the true weights ``w``, with the stored
    coefficient and direction (for adaptive groups the stored ``x``, applied as is)."""
    with torch.no_grad():
        for b in buckets:
            b.backend.apply_perturbation_(b.params, b.applied_directions(direction_key),
                                          b.column("master_weight"),
                                          coef=b.states[0]["perturbation_coef"])


# ----------------------------------------------------------------------------- fingerprints
def _moments(tensors: list, directions: list) -> Tensor:
    """``[sum t, sum t**2, sum t*x, sum |t|, sum |t*x|]`` in float64, on the tensors' device."""
    total = torch.zeros(5, dtype=torch.float64, device=tensors[0].device)
    for t, x in zip(tensors, directions):
        t = t.detach().to(torch.float64)
        tx = t * x.to(torch.float64)
        total += torch.stack([t.sum(), t.square().sum(), tx.sum(), t.abs().sum(), tx.abs().sum()])
    return total


def _by_group(opt, buckets: list, moments_of) -> Tensor:
    """Per param group (rows), the sum of ``moments_of(bucket)`` over its buckets; one copy to
    the host per bucket device."""
    index = {id(g): gi for gi, g in enumerate(opt.param_groups)}
    rows = torch.zeros(len(opt.param_groups), 5, dtype=torch.float64)
    per_device: dict = {}
    for b in buckets:
        per_device.setdefault(b.device, []).append((index[id(b.group)], moments_of(b)))
    for items in per_device.values():
        values = torch.stack([m for _, m in items]).cpu()
        for (gi, _), value in zip(items, values):
            rows[gi] += value
    return rows


def weights_fingerprint(opt) -> Optional[dict]:
    """The moments of the perturbed and of the true weights, per param group (``[groups, 5]``
    float64 CPU tensors); None for sharded parameters, whose moments are per rank."""
    if opt._sharding is not None:
        return None
    key = opt.direction_key
    held = opt._true_weights_held  # inside unperturbed(): parameters hold w, copies hold p
    if held is not None:
        buckets = [b for b, _ in held]
        copies = {id(b): saved for b, saved in held}
        perturbed = _by_group(opt, buckets, lambda b: _moments(copies[id(b)], b.applied_directions(key)))
        true = _by_group(opt, buckets, lambda b: _moments(b.params, b.applied_directions(key)))
        return {"perturbed": perturbed, "true": true}
    buckets = opt.layout(with_state_only=True)
    perturbed = _by_group(opt, buckets, lambda b: _moments(b.params, b.applied_directions(key)))

    def true_moments(b):  # one bucket at a time: one bucket's copy in memory, not the model's
        with holding_true_weights([b], key):
            return _moments(b.params, b.applied_directions(key))

    return {"perturbed": perturbed, "true": _by_group(opt, buckets, true_moments)}


def check_fingerprint(where: str, fingerprint, groups: int) -> None:
    """A fingerprint read from a state dict has the layout :func:`weights_fingerprint` writes."""
    ok = isinstance(fingerprint, dict) and all(
        isinstance(fingerprint.get(k), Tensor) and fingerprint[k].shape == (groups, 5)
        for k in ("perturbed", "true"))
    if not ok:
        raise ValueError(f"{where}: state_dict['msam_fused']['{FINGERPRINT_KEY}'] is not a weights "
                         "fingerprint of this optimizer's param groups; the state dict is corrupt")


def _distance(loaded: Tensor, reference: Tensor) -> float:
    """The largest difference of a moment relative to its scale (``sum |t|``, ``sum t**2``,
    ``sum |t*x|`` of the reference)."""
    scale = torch.stack([reference[3], reference[1], reference[4]]).clamp_min(torch.finfo(torch.float64).tiny)
    return float(((loaded[:3] - reference[:3]).abs() / scale).max())


def resolve_loaded_weights(opt, pending: PendingWeightsCheck, where: str, *, final: bool,
                           gradient_taken: bool = False) -> bool:
    """Do what a load left to do, if the model holds weights it can be done with: returns
    whether it is done. ``final``: the model must hold them by now; weights that match neither
    the perturbed nor the true weights of the loaded state raise, changing nothing.
    ``gradient_taken``: the gradients were computed at the weights as loaded; if those are the
    true weights, the step goes on from the perturbed ones, and says that it is not exact."""
    buckets = opt.layout(with_state_only=True)
    if pending.fingerprint is None:  # a warm start: the model's weights are the true weights
        with torch.no_grad():
            for b in buckets:
                for p, master in zip(b.params, b.column("master_weight")):
                    if master is not None:
                        master.copy_(p.detach())
        return True
    key = opt.direction_key
    loaded = _by_group(opt, buckets, lambda b: _moments(b.params, b.applied_directions(key)))
    saved_p, saved_w = pending.fingerprint["perturbed"], pending.fingerprint["true"]
    again = []
    for gi in range(min(len(loaded), len(saved_p))):
        to_p, to_w = _distance(loaded[gi], saved_p[gi]), _distance(loaded[gi], saved_w[gi])
        if to_p <= TOLERANCE and to_p <= to_w:
            continue
        if to_w <= TOLERANCE:
            again.append(opt.param_groups[gi])
            continue
        if not final:
            return False
        raise RuntimeError(
            f"{where}: the weights of param group {gi} match neither the perturbed weights "
            "(model.state_dict()) nor the true weights (opt.unperturbed_state_dict(model)) that the "
            "optimizer state loaded by load_state_dict() was saved with: the model holds another "
            "model's weights, or those of another step. Load the model weights saved together with "
            "that optimizer state (model.load_state_dict(...)) before stepping. Nothing was changed. "
            f"To continue from these weights on purpose, delete state_dict['msam_fused']"
            f"['{FINGERPRINT_KEY}'] before opt.load_state_dict(state_dict)")
    apply_perturbation_again([b for b in buckets if any(b.group is g for g in again)], key)
    if again and gradient_taken:
        warnings.warn(
            f"{where}: the model was loaded with the true weights after the optimizer state; the "
            "perturbation is applied again, but this step's gradients were taken at the true "
            "weights, so the run differs slightly from an uninterrupted one. For an exact resume "
            "load the model weights before opt.load_state_dict() (or step with a closure)",
            stacklevel=6)  # the caller of step(), past torch's step wrappers
    return True


# ------------------------------------------------------------------------------ warm starts
def adopt_torch_state_dict(opt, state_dict: dict, where: str) -> tuple[dict, bool]:
    """A state dict of the torch optimizer this one extends (``SGD`` for MSAM, ``AdamW`` for
    AdamW-MSAM) as one of this optimizer: groups keep their saved hyper-parameters and take
    this optimizer's ``rho``/``adaptive``/``perturb``; state gets a zero coefficient (nothing
    applied yet: ``p = w``) and, with ``master_weights``, a master copy of the weights.
    Returns the state dict (unchanged when it is not such a warm start) and whether it was one.
    Python-number state entries (torch's older ``step``) become tensors either way."""
    state_dict = {**state_dict, "state": {k: {n: torch.tensor(float(v)) if _is_number(v) else v
                                              for n, v in s.items()}
                                          for k, s in state_dict["state"].items()}}
    groups = state_dict["param_groups"]
    if not all(isinstance(g, dict) for g in groups) or len(groups) != len(opt.param_groups) or \
            any("rho" in g for g in groups):
        return state_dict, False
    for gi, saved in enumerate(groups):
        if saved.get("maximize", False):
            raise ValueError(f"{where}: param group {gi} of the state dict has maximize=True; "
                             f"{type(opt).__name__} minimizes")
        if saved.get("decoupled_weight_decay") is False and saved.get("weight_decay"):
            raise ValueError(f"{where}: param group {gi} of the state dict has L2 weight decay "
                             "(torch.optim.Adam); AdamWMSAM's decay is decoupled, as AdamW's")
    adopted = [{**{k: current[k] for k in OWN_GROUP_KEYS if k in current},
                **{k: v for k, v in saved.items() if k not in TORCH_IMPLEMENTATION_FLAGS},
                "params": saved["params"]}
               for saved, current in zip(groups, opt.param_groups)]
    state = {}
    for saved, group in zip(adopted, opt.param_groups):
        for i, p in zip(saved["params"], group["params"]):
            if i not in state_dict["state"]:
                continue
            entry = dict(state_dict["state"][i])
            spec = opt._group_state_spec(p, saved)
            for name, (shape, dtype) in spec.items():
                if entry.get(name) is None and name != "master_weight":
                    entry[name] = torch.zeros(shape, dtype=dtype)  # SGD without momentum: None
            if "master_weight" in spec:
                entry["master_weight"] = p.detach().to(torch.float32, copy=True)
            state[i] = entry
    return {**state_dict, "state": state, "param_groups": adopted}, True


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
