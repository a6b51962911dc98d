"""What MSAM and AdamW-MSAM share: the perturbed-weights invariant and everything around it.

Between steps every parameter holds ``p = w - c * x``: the true weights ``w`` minus the
coefficient ``c`` (one per param group, remembered exactly as applied) times the ascent
direction ``x`` (the momentum ``v`` for MSAM, the first moment ``m`` for AdamW-MSAM). A step is

1. one pass per bucket that removes the old perturbation and updates the weights and state
   (``backend.*_update_``), returning the bucket's sum of squares of the new ``x``;
2. the global norm over all buckets (all groups, all devices) and, per group,
   ``c = rho / (||x|| + EPS_NORM)`` (``backend.perturbation_coef``), both on the device;
3. one pass per bucket that applies the new perturbation (``backend.apply_perturbation_``).

Backends that have the one-pass step (``one_pass_functions``, the fused kernels) run step 1
as a read-only pass (``*_sum_of_squares``, which also flags non-finite gradients, so
``nonfinite="skip"`` needs no pass of its own) and steps 1-3 together in ``*_step_``.

A bucket is the parameters of one param group on one device in one dtype. The step never
reads a device value on the host (except ``nonfinite="raise"``, which must).

Sharded parameters (DTensors, FSDP2): buckets hold each rank's local shards, and the sum of
squares and the non-finite flag are all-reduced over the mesh between the passes
(``msam_fused.distributed.sharding``), so every rank applies the coefficient of the global norm.

Two group options change what is perturbed (docs/variants.md):

* ``adaptive=True`` (ASAM-style): the group's perturbation is ``-c * x`` with ``x = w**2 * v``
  and its terms of the global norm are ``|w| * v``; ``x`` is stored as applied (state
  ``"perturbation"``), so the invariant reads ``p = w - c * x`` and is removed exactly.
  Backends that implement it set ``supports_adaptive``.
* ``perturb=False``: the group is never perturbed (``c = 0``, ``p = w``) and stays out of the
  global norm, e.g. everything but the normalization layers (SAM-ON).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from msam_fused import backends, checkpoints
from msam_fused.distributed import sharding
from msam_fused.nonfinite import SkippedStepCount, step_skip_flag
from msam_fused.validation import (ParamPlace, check_flag, check_model_holds_params,
                                   check_new_params, check_nonfinite_policy, check_param_for_step,
                                   describe_param, listed_params, with_plain_params)

STATE_FORMAT = 1
LOW_PRECISION = (torch.float16, torch.bfloat16)
PERTURBATION_KEY = "perturbation"


def is_adaptive(group: dict) -> bool:
    return bool(group.get("adaptive", False))


def perturbs(group: dict) -> bool:
    return bool(group.get("perturb", True))


@dataclass
class Bucket:
    """The tensors of one (param group, device, dtype) that take part in this step."""

    group: dict
    device: torch.device
    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    states: list = field(default_factory=list)
    backend: Any = None
    norm_weight: float = 1.0  # what its sum of squares counts for in the global norm (sharding)
    sharded: bool = False     # params, grads and state are DTensors: hand the backend local shards
    # Overlapped with backward (msam_fused/overlap.py): the first pass's (sum of squares,
    # non-finite flag), computed during backward, and whether that pass stashed (then ``grads``
    # hold the old momenta and the overlapped finish pass completes the step).
    hidden: Optional[tuple] = None
    stashed: bool = False

    def column(self, key: str) -> list:
        values = [state.get(key) for state in self.states]
        return [sharding.local(v) for v in values] if self.sharded else values

    def applied_directions(self, direction_key: str) -> list:
        """What the perturbation was applied along: the stored ``x`` of an adaptive group,
        else the direction state itself."""
        return self.column(PERTURBATION_KEY if is_adaptive(self.group) else direction_key)

    def adaptive_kwargs(self) -> dict:
        """``perturbations=`` for the backend, only for adaptive groups, so backends without
        adaptive support keep seeing the plain contract."""
        return {"perturbations": self.column(PERTURBATION_KEY)} if is_adaptive(self.group) else {}


class MomentumAscentOptimizer(backends.PerDeviceBackends, SkippedStepCount, Optimizer):
    """Base class of :class:`~msam_fused.MSAM` and :class:`~msam_fused.AdamWMSAM`."""

    #: state key of the ascent direction ``x`` (the perturbation is ``-c * x``)
    direction_key: str
    #: group keys every saved param group must carry
    hyperparameter_keys: tuple
    #: the torch optimizer whose state dict warm-starts this one (``load_state_dict``)
    torch_counterpart: str

    # GradScaler hands us ``grad_scale`` and ``found_inf`` instead of unscaling and checking
    # the gradients itself; the unscale happens inside the update pass.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, *, backend: str = "auto", nonfinite: str = "skip",
                 master_weights: bool = False):
        where = type(self).__name__
        if backend not in backends.BACKEND_NAMES:
            raise ValueError(f"{where}: unknown backend {backend!r}; choose one of "
                             f"{', '.join(backends.BACKEND_NAMES)}")
        check_nonfinite_policy(where, nonfinite)
        self.check_group(where, defaults)
        self.backend_request = backend
        self.nonfinite = nonfinite
        self.master_weights = bool(master_weights)
        self._init_runtime()
        super().__init__(params, defaults)

    def _init_runtime(self) -> None:
        self._layouts: dict[int, tuple] = {}      # id(param) -> (device, dtype) at build time
        self._backends: dict[torch.device, Any] = {}
        self._skipped_steps: Optional[Tensor] = None
        self._unperturbed_depth = 0
        self._sharding: Optional[sharding.ShardLayout] = None  # set when parameters are DTensors
        self._overlap = None  # msam_fused.overlap.OverlappedBackward, while one is registered
        # what load_state_dict left to do once the model holds its weights (msam_fused.checkpoints)
        self._loaded_weights: Optional[checkpoints.PendingWeightsCheck] = None
        # inside unperturbed(): (bucket, its saved perturbed copies) per bucket
        self._true_weights_held: Optional[list] = None

    # What deepcopy and pickling keep besides torch's fields, with the value of a pickle that
    # predates them; the rest (backends, layouts) is rebuilt, an overlap registration is not.
    _COPIED_SETTINGS = {"backend_request": "auto", "nonfinite": "skip", "master_weights": False,
                        "_skipped_steps": None, "_loaded_weights": None}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), **{k: getattr(self, k) for k in self._COPIED_SETTINGS}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if not hasattr(self, "_layouts"):
            kept = {k: self.__dict__.get(k, default) for k, default in self._COPIED_SETTINGS.items()}
            self._init_runtime()
            self.__dict__.update(kept)
            for group in self.param_groups:
                self._register_group(group)
            self._sharding = sharding.shard_layout(type(self).__name__, self._all_params())

    # ----------------------------------------------------------------------------- hooks
    @classmethod
    def check_hyperparameters(cls, where: str, group: dict) -> None:
        raise NotImplementedError

    @classmethod
    def check_group(cls, where: str, group: dict) -> None:
        """The optimizer's hyper-parameters and the perturbation options of one group."""
        cls.check_hyperparameters(where, group)
        check_flag(where, "adaptive", group.get("adaptive", False))
        check_flag(where, "perturb", group.get("perturb", True))

    def _state_spec(self, p: Tensor) -> dict[str, tuple]:
        """Each state key of ``p`` mapped to its (shape, dtype)."""
        raise NotImplementedError

    def _update_bucket(self, bucket: Bucket, coef: Tensor, norm_dtype: torch.dtype,
                       grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    # The one-pass step, for backends that have ``one_pass_functions`` (the fused kernels):
    # a read-only pass returns the sum of squares of the new direction and a non-finite flag,
    # then one pass per bucket does the whole step given both coefficients. Same memory
    # traffic as update + apply_perturbation, and the non-finite check comes free.
    one_pass_functions: tuple

    def _bucket_sum_of_squares(self, bucket: Bucket, norm_dtype: torch.dtype,
                               grad_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _step_bucket(self, bucket: Bucket, coef_old: Tensor, coef_new: Tensor,
                     grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict) -> None:
        where = type(self).__name__
        if getattr(self, "_overlap", None) is not None:
            raise RuntimeError(f"{where}.add_param_group: the step is overlapped with backward; call "
                               "remove() on the handle overlap_backward() returned, add the group, and "
                               "call overlap_backward() again")
        group = {**param_group, "params": listed_params(where, param_group["params"])}
        index = len(self.param_groups)
        known = self._all_params()
        check_new_params(where, index, with_plain_params(group), known)
        self.check_group(f"{where} param group {index}", {**self.defaults, **group})
        layout = sharding.shard_layout(where, known + with_plain_params(group)["params"])
        super().add_param_group(group)  # the listed params: an iterator given is spent by now
        self._register_group(self.param_groups[-1])
        self._sharding = layout

    def _all_params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    def _register_group(self, group: dict) -> None:
        for p in group["params"]:
            self._layouts[id(p)] = (p.device, p.dtype)
            self._backend_on(p.device)
            self._bucket_backend(group, p.device)  # fails now if the group cannot run there

    def _bucket_backend(self, group: dict, device: torch.device):
        backend = self._backends[device]
        if is_adaptive(group):
            return backends.with_feature(backend, "supports_adaptive", self.backend_request,
                                         f"{type(self).__name__}(adaptive=True)")
        return backend

    def _norm_dtype(self) -> torch.dtype:
        dtypes = {layout[1] for layout in self._layouts.values()}
        return torch.float64 if torch.float64 in dtypes else torch.float32

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        return torch.float32 if p.dtype in LOW_PRECISION else p.dtype

    def _wants_master(self, p: Tensor) -> bool:
        return self.master_weights and p.dtype in LOW_PRECISION

    def _common_state_spec(self, p: Tensor) -> dict[str, tuple]:
        spec = {"perturbation_coef": ((), self._norm_dtype())}
        if self._wants_master(p):
            spec["master_weight"] = (p.shape, torch.float32)
        return spec

    def _group_state_spec(self, p: Tensor, group: dict) -> dict[str, tuple]:
        """:meth:`_state_spec` plus the stored perturbation of an adaptive group."""
        spec = self._state_spec(p)
        if is_adaptive(group):
            spec[PERTURBATION_KEY] = (p.shape, self._state_dtype(p))
        return spec

    def _init_state(self, p: Tensor, group: dict) -> dict:
        """Zero state; the master copy starts at the weights (no perturbation yet)."""
        state = {k: sharding.zeros_like_param(p, shape, dtype)
                 for k, (shape, dtype) in self._group_state_spec(p, group).items()}
        if "master_weight" in state:
            state["master_weight"].copy_(p.detach())
        return state

    # -------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; see the module docstring for what it does.

        Gradient clipping goes *before* this call, on the gradients at the perturbed point
        (``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)``; with a GradScaler,
        ``scaler.unscale_(opt)`` first): the clipped gradient is ``g`` in SPEC §1.
        """
        self._check_loaded_weights(f"{type(self).__name__}.step", gradient_taken=closure is None)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        where = f"{type(self).__name__}.step"
        if self._unperturbed_depth:
            raise RuntimeError(f"{where}() was called inside unperturbed(); leave the context first")
        if self._sharding is not None:
            self._sharding.check_alive(where)
        # A backward that ran the first pass (overlap_backward) left the rest of the step.
        overlapped = self._overlap.take(where) if self._overlap is not None else None
        # The coefficients last applied, read before new parameters get (zero) state.
        stored_coef = {id(g): self._group_coef(g) for g in self.param_groups}
        if overlapped is not None:
            buckets, grads_at = overlapped.buckets(where), []
        else:
            buckets, grads_at = self._collect_buckets(where)
        if not buckets:
            if overlapped is not None:
                overlapped.release()
            return loss
        norm_device = buckets[0].device
        norm_dtype = self._norm_dtype()
        # A backend with the one-pass step folds the non-finite check into its first pass.
        one_pass = all(self._runs_one_pass(b) for b in buckets)
        scaler_found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if overlapped is not None:
            found_inf = overlapped.skip_flag(self.nonfinite, where, scaler_found_inf, norm_device)
            grad_scale = overlapped.grad_scale  # what the hidden pass divided by
        else:
            fold_check = one_pass and self.nonfinite == "skip"
            found_inf = step_skip_flag(self.nonfinite, where, [] if fold_check else [g for g, _ in grads_at],
                                       [place for _, place in grads_at], norm_device, scaler_found_inf,
                                       all_ranks=self._sharding)
        coef_old = {k: torch.zeros((), dtype=norm_dtype, device=norm_device) if c is None
                    else c.to(norm_device, non_blocking=True) for k, c in stored_coef.items()}
        total = torch.zeros((), dtype=norm_dtype, device=norm_device)
        nonfinite = None
        for b in buckets:
            coef = coef_old[id(b.group)].to(b.device, non_blocking=True)
            if b.hidden is not None:
                sq, _ = b.hidden  # found_inf above already holds its flag
            elif one_pass:
                sq, bad = self._bucket_sum_of_squares(b, norm_dtype, _on(grad_scale, b.device))
                bad = bad.to(norm_device, non_blocking=True)
                nonfinite = bad if nonfinite is None else nonfinite | bad
            else:
                sq = self._update_bucket(b, coef, norm_dtype, _on(grad_scale, b.device),
                                         _on(found_inf, b.device))
            if perturbs(b.group):
                if b.norm_weight != 1.0:
                    sq = sq * b.norm_weight
                total = total + sq.to(norm_device, non_blocking=True)
        if self._sharding is not None:
            total = self._sharding.sum(total)  # the partial sums of all shards: the global norm
        if nonfinite is not None and found_inf is None and self.nonfinite == "skip":
            found_inf = nonfinite if self._sharding is None else self._sharding.any(nonfinite)

        norm_backend = self._backends[norm_device]
        coef_new = {}
        for b in buckets:
            key = id(b.group)
            if key not in coef_new:
                # an unperturbed group keeps c = 0, as the (skipped or not) step leaves it
                rho = b.group["rho"] if perturbs(b.group) else 0.0
                coef_new[key] = norm_backend.perturbation_coef(total, rho, coef_old[key], found_inf)
        for b in buckets:
            coef = coef_new[id(b.group)].to(b.device, non_blocking=True)
            old = coef_old[id(b.group)].to(b.device, non_blocking=True)
            if b.stashed:
                overlapped.finish(b, old, coef, _on(found_inf, b.device))
            elif one_pass or b.hidden is not None:
                self._step_bucket(b, old, coef, _on(grad_scale, b.device), _on(found_inf, b.device))
            # p = w - 0 * x is p = w, which the first pass left there unless w is a master copy
            elif perturbs(b.group) or any(m is not None for m in b.column("master_weight")):
                b.backend.apply_perturbation_(b.params, b.column(self.direction_key),
                                              b.column("master_weight"), coef=coef,
                                              found_inf=_on(found_inf, b.device),
                                              **b.adaptive_kwargs())
        # Only now, with every bucket stepped, may the old coefficients be overwritten.
        remembered = {}
        for b in buckets:
            key = (id(b.group), b.device)
            if key not in remembered:
                remembered[key] = _remember(stored_coef[id(b.group)],
                                            coef_new[id(b.group)].to(b.device, non_blocking=True))
            for state in b.states:
                state["perturbation_coef"] = remembered[key]
        self._count_skipped(found_inf)
        if overlapped is not None:
            overlapped.release()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; after a backward that ran the overlapped first
        pass (:meth:`~msam_fused.MSAM.overlap_backward`) it also undoes that pass."""
        if self._overlap is not None:
            self._overlap.discard()
        super().zero_grad(set_to_none)

    def _check_no_overlapped_update(self, where: str) -> None:
        """Between a backward that ran the overlapped first pass and step(), the momenta hold
        the new momenta already: nothing may read or replace the state then."""
        if getattr(self, "_overlap", None) is not None:
            self._overlap.check_idle(where)

    def _group_coef(self, group: dict) -> Optional[Tensor]:
        """The coefficient last applied to this group (None before its first step)."""
        for p in group["params"]:
            state = self.state.get(p)
            if state:
                return state["perturbation_coef"]
        return None

    def _collect_buckets(self, where: str) -> tuple[list[Bucket], list]:
        """Validate every parameter, create missing state, and group tensors into buckets.

        Everything is checked before anything is written, so a bad parameter changes nothing.
        """
        for gi, group in enumerate(self.param_groups):
            self.check_group(f"{where}: param group {gi}", group)
            self._check_perturbation_options(f"{where}: param group {gi}", group)
            for i, p in enumerate(group["params"]):
                place = ParamPlace(group, gi, i, p)
                check_param_for_step(where, place, p, self._layouts[id(p)])
                if self._sharding is not None:
                    sharding.check_grad(where, str(place), p)
        buckets: dict[tuple, Bucket] = {}
        grads_at = []  # (gradient, where it is): described only if a message needs it
        sharded = self._sharding is not None
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                state = self.state.get(p)
                if p.grad is None and not state:
                    continue  # never had a gradient: no state, no perturbation
                if not state:
                    state = self.state[p] = self._init_state(p, group)
                weight = self._sharding.weight(p) if sharded else 1.0
                key = (gi, p.device, p.dtype, weight)
                if key not in buckets:
                    buckets[key] = Bucket(group, p.device, backend=self._bucket_backend(group, p.device),
                                          norm_weight=weight, sharded=sharded)
                b = buckets[key]
                grad = sharding.local(p.grad) if sharded else p.grad
                b.params.append(sharding.local(p) if sharded else p)
                b.grads.append(grad)
                b.states.append(state)
                if grad is not None:
                    grads_at.append((grad, ParamPlace(group, gi, i, p)))
        return list(buckets.values()), grads_at

    def _runs_one_pass(self, bucket: Bucket) -> bool:
        """The bucket's backend has the one-pass step and the group needs nothing it lacks."""
        return not is_adaptive(bucket.group) and all(
            hasattr(bucket.backend, f) for f in self.one_pass_functions)

    def _check_perturbation_options(self, where: str, group: dict) -> None:
        """The group's backend can run its options, and ``adaptive`` is what its state was
        built for (the stored perturbation exists exactly for adaptive groups)."""
        for device in {p.device for p in group["params"]}:
            self._bucket_backend(group, device)
        state = next((self.state[p] for p in group["params"] if self.state.get(p)), None)
        if state is not None and (PERTURBATION_KEY in state) != is_adaptive(group):
            raise ValueError(f"{where}: adaptive={is_adaptive(group)}, but the group was stepped with "
                             f"adaptive={not is_adaptive(group)}; adaptive cannot change once a "
                             "group has optimizer state")

    # ----------------------------------------------------------------- true weights access
    def _perturbed_buckets(self) -> list[Bucket]:
        buckets: dict[tuple, Bucket] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                key = (gi, p.device, p.dtype)
                if key not in buckets:
                    buckets[key] = Bucket(group, p.device, backend=self._bucket_backend(group, p.device),
                                          sharded=self._sharding is not None)
                buckets[key].params.append(sharding.local(p))
                buckets[key].states.append(state)
        return list(buckets.values())

    @contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Inside, the parameters hold the true weights ``w``; on exit the perturbed values
        come back bit for bit (they are saved, not recomputed). Changes made to the
        parameters inside the context are discarded. Nesting is allowed."""
        if self._unperturbed_depth:
            self._unperturbed_depth += 1
            try:
                yield
            finally:
                self._unperturbed_depth -= 1
            return
        where = f"{type(self).__name__}.unperturbed"
        self._check_no_overlapped_update(where)
        self._check_loaded_weights(where)
        buckets = self._perturbed_buckets()
        with checkpoints.holding_true_weights(buckets, self.direction_key) as saved:
            self._unperturbed_depth = 1
            self._true_weights_held = list(zip(buckets, saved))
            try:
                yield
            finally:
                self._unperturbed_depth = 0
                self._true_weights_held = None

    def unperturbed_state_dict(self, model: torch.nn.Module) -> dict:
        """``model.state_dict()`` at the true weights (copies): what to export or evaluate.
        ``model`` must hold every parameter of this optimizer."""
        check_model_holds_params(f"{type(self).__name__}.unperturbed_state_dict", model,
                                 self.param_groups)
        with self.unperturbed():
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def _check_loaded_weights(self, where: str, gradient_taken: bool = False) -> None:
        """Finish what load_state_dict left to do, now that the model must hold its weights:
        raises if they are neither the perturbed nor the true weights of the loaded state.
        ``gradient_taken``: the gradients in ``.grad`` were computed at the weights as loaded."""
        if self._loaded_weights is not None:
            if self._overlap is not None and self._overlap.pending:
                raise RuntimeError(
                    f"{where}: a backward ran the overlapped first pass before the model's weights "
                    "were checked against the optimizer state loaded by load_state_dict(); with "
                    "overlap_backward, load the model weights before opt.load_state_dict() "
                    "(opt.zero_grad() undoes this backward)")
            checkpoints.resolve_loaded_weights(self, self._loaded_weights, where, final=True,
                                               gradient_taken=gradient_taken)
            self._loaded_weights = None

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        self._check_no_overlapped_update(f"{type(self).__name__}.state_dict")
        sd = super().state_dict()
        # A load not yet checked against the model's weights leaves the state as loaded, so
        # the loaded fingerprint still describes it (and the model may not hold its weights yet).
        fingerprint = (self._loaded_weights.fingerprint if self._loaded_weights is not None
                       else checkpoints.weights_fingerprint(self))
        sd["msam_fused"] = {
            "optimizer": type(self).__name__,
            "format": STATE_FORMAT,
            "master_weights": self.master_weights,
            "skipped_steps": None if self._skipped_steps is None else self._skipped_steps.clone(),
            checkpoints.FINGERPRINT_KEY: fingerprint,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by the same optimizer class for the same parameters, or, as
        a warm start, one of :attr:`torch_counterpart` (no perturbation applied yet).

        Everything is checked first; a state dict from another optimizer or model raises and
        leaves this optimizer untouched. The model's weights may be the perturbed or the true
        weights saved with the state (docs/checkpoints.md): true weights get the perturbation
        applied again, here when the model already holds them (load the model first), else at
        the first :meth:`step` or :meth:`unperturbed`, which raise for weights that are neither.
        """
        where = f"{type(self).__name__}.load_state_dict"
        self._check_no_overlapped_update(where)
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"{where}: not an optimizer state dict (needs 'state' and 'param_groups')")
        state_dict = dict(state_dict)
        tag = state_dict.pop("msam_fused", None)
        state_dict, warm_start = checkpoints.adopt_torch_state_dict(self, state_dict, where)
        self._check_loadable(state_dict, tag)
        fingerprint = (tag or {}).get(checkpoints.FINGERPRINT_KEY)
        if fingerprint is not None:
            checkpoints.check_fingerprint(where, fingerprint, len(self.param_groups))
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to the parameter's dtype (our state keeps
        # fp32 for low-precision parameters and the coefficient in the norm dtype) and may
        # alias the given tensors (so two optimizers would share state): copy instead.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        groups = [g for g in self.param_groups for _ in g["params"]]
        for i, p, group in zip(ids, params, groups):
            if i in saved_state:
                spec = self._group_state_spec(p, group)
                self.state[p] = {k: v.to(device=p.device, dtype=spec[k][1], copy=True)
                                 for k, v in saved_state[i].items()}
        for group in self.param_groups:  # one coefficient object per group, as a step leaves it
            coef = None
            for p in group["params"]:
                if self.state.get(p):
                    coef = self.state[p]["perturbation_coef"] if coef is None else coef
                    self.state[p]["perturbation_coef"] = coef
        skipped = (tag or {}).get("skipped_steps")
        self._skipped_steps = None if skipped is None else skipped.clone()
        self._loaded_weights = None
        if fingerprint is not None and self._sharding is None:  # shards: moments are per rank
            pending = checkpoints.PendingWeightsCheck(fingerprint)
            if not checkpoints.resolve_loaded_weights(self, pending, where, final=False):
                self._loaded_weights = pending  # the model's weights may come later
        elif warm_start and self.master_weights:
            self._loaded_weights = checkpoints.PendingWeightsCheck(None)

    def _check_loadable(self, state_dict: dict, tag: Optional[dict]) -> None:
        where = f"{type(self).__name__}.load_state_dict"
        if tag is not None:
            if tag.get("optimizer") != type(self).__name__:
                raise ValueError(f"{where}: the state dict was saved by {tag.get('optimizer')}, "
                                 f"not {type(self).__name__}")
            if bool(tag.get("master_weights")) != self.master_weights:
                raise ValueError(f"{where}: the state dict was saved with master_weights="
                                 f"{tag.get('master_weights')}, this optimizer has {self.master_weights}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{where}: the state dict has {len(saved_groups)} param groups, "
                             f"this optimizer has {len(self.param_groups)}")
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            missing = [k for k in self.hyperparameter_keys if k not in saved]
            if missing:
                raise ValueError(f"{where}: param group {gi} of the state dict has no {missing}: it "
                                 f"was not saved by msam_fused.{type(self).__name__} (nor by "
                                 f"{self.torch_counterpart}, for a warm start)")
            self.check_group(f"{where}: saved param group {gi}", saved)
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{where}: param group {gi} has {len(saved['params'])} parameters "
                                 f"in the state dict and {len(group['params'])} here: another model?")
            coefs = []
            for index, (i, p) in enumerate(zip(saved["params"], group["params"])):
                state = state_dict["state"].get(i)
                if state is None:
                    continue
                what = describe_param(group, gi, index, p)
                expected = self._group_state_spec(p, saved)  # the saved options come back
                for key, value in state.items():
                    if isinstance(value, Tensor):
                        sharding.check_state_layout(where, what, key, value, p)
                if set(state) != set(expected):
                    raise ValueError(f"{where}: state of {what} has keys {sorted(state)}, expected "
                                     f"{sorted(expected)}: it was not saved by this optimizer")
                for key, value in state.items():
                    if not isinstance(value, Tensor) or value.shape != expected[key][0]:
                        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                        raise ValueError(f"{where}: state '{key}' of {what} has shape {shape}, "
                                         f"expected {tuple(expected[key][0])}: another model?")
                coefs.append(state["perturbation_coef"])
            if coefs and any(bool(c.to(coefs[0].device) != coefs[0]) for c in coefs[1:]):
                raise ValueError(f"{where}: param group {gi} holds different perturbation "
                                 "coefficients; the state dict is corrupt")


def _remember(previous: Optional[Tensor], coef: Tensor) -> Tensor:
    """The tensor that keeps the applied coefficient: the previous step's, overwritten in place
    where possible, so that a step captured in a CUDA graph reads the current value on replay."""
    if previous is None or previous.device != coef.device or previous.dtype != coef.dtype:
        return coef
    return previous.copy_(coef)


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if t is None else t.to(device, non_blocking=True)
