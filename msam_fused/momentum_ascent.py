"""What MSAM and AdamW-MSAM share: the perturbed-weights invariant and the step around it.

Between steps every parameter holds ``p = w - c * x``: the true weights ``w`` minus the
coefficient ``c`` (one per param group, remembered exactly as applied) times the ascent
direction ``x`` (the momentum ``v`` for MSAM, the first moment ``m`` for AdamW-MSAM). A step
follows the step contract of docs/design.md, per bucket (one param group on one device in one
dtype):

1. ``backend.*_partials``: a read-only pass returning per-segment partial sums of squares of
   the new ``x`` and non-finite markers; ``sum_segment_partials`` folds them (so
   ``nonfinite="skip"`` needs no pass of its own);
2. the global sum over all buckets (all groups, all devices, all-reduced over shards) and, per
   group, ``c = rho / (||x|| + EPS_NORM)`` (``backend.perturbation_coef``), on the device;
3. ``backend.*_step_``: one write pass that removes the old perturbation, updates state and
   weights and applies the new one.

An :class:`Algorithm` says what differs between the optimizers: its state columns, the
direction, the hyper-parameters of a group and the two backend passes. The buckets and each
group's ``hyper`` vector are cached across steps and rebuilt only when what they depend on
changes (:class:`StepPlan`); the step never reads a device value on the host (except
``nonfinite="raise"``, which must).

Sharded parameters (DTensors, FSDP2): buckets hold each rank's local shards, and the sum of
squares and the non-finite flag are all-reduced over the mesh between the passes
(``msam_fused.distributed.sharding``), so every rank applies the coefficient of the global norm.

Two group options change what is perturbed (docs/variants.md):

* ``adaptive=True`` (ASAM-style): the group's perturbation is ``-c * x`` with ``x = w**2 * v``
  and its terms of the global norm are ``|w| * v``; ``x`` is stored as applied (state
  ``"perturbation"``), so the invariant reads ``p = w - c * x`` and is removed exactly. Needs a
  backend with the ``"adaptive"`` capability.
* ``perturb=False``: the group is never perturbed (``c = 0``, ``p = w``) and stays out of the
  global norm, e.g. everything but the normalization layers (SAM-ON).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from msam_fused import backends, checkpoints, reference
from msam_fused.distributed import sharding
from msam_fused.nonfinite import SkippedStepCount, raise_nonfinite
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


@dataclass(frozen=True)
class Algorithm:
    """One optimizer's part of the step: everything the shared code needs to know about it."""

    #: state key of the ascent direction ``x`` (the perturbation is ``-c * x``)
    direction_key: str
    #: the state columns, in the order the backend passes take them (after params and grads)
    state_keys: tuple
    #: those of them that are per-parameter 0-d float32 counters; the others are shaped like
    #: the parameter, in its dtype (float32 for bf16/fp16 parameters)
    counter_keys: frozenset
    #: per entry of ``hyper``: the group key it comes from and the index in that value (AdamW's
    #: ``betas``) or None; the last entry is ``rho``
    hyper_sources: tuple
    #: the backend's read-only pass and write pass
    partials: str
    step: str

    @property
    def group_keys(self) -> tuple:
        """The group keys every saved param group must carry."""
        return tuple(dict.fromkeys(key for key, _ in self.hyper_sources))

    def hyper_values(self, group: dict) -> tuple:
        return tuple(group[key] if index is None else group[key][index] for key, index in self.hyper_sources)


@dataclass(eq=False)
class Bucket:
    """The tensors of one (param group, device, dtype) that take part in a step, in group order."""

    group: dict
    group_index: int
    device: torch.device
    dtype: torch.dtype
    backend: Any
    hyper: Tensor                  # the group's hyper-parameters on this device (float64)
    sources: list = field(default_factory=list)   # the parameters (their .grad is read per step)
    indices: list = field(default_factory=list)   # where each is in its group (for messages)
    params: list = field(default_factory=list)    # what the backend works on (local shards)
    states: list = field(default_factory=list)
    norm_weight: float = 1.0  # what its sum of squares counts for in the global norm (sharding)
    sharded: bool = False     # params, grads and state are DTensors: hand the backend local shards

    def column(self, key: str) -> list:
        values = [state.get(key) for state in self.states]
        return [sharding.local(v) for v in values] if self.sharded else values

    def grads(self) -> list:
        grads = [p.grad for p in self.sources]
        return [sharding.local(g) for g in grads] if self.sharded else grads

    def applied_directions(self, direction_key: str) -> list:
        """What the perturbation was applied along: the stored ``x`` of an adaptive group,
        else the direction state itself."""
        return self.column(PERTURBATION_KEY if is_adaptive(self.group) else direction_key)


@dataclass(eq=False)
class PlannedBucket(Bucket):
    """A bucket of the cached step plan, with its backend calls bound once."""

    columns: tuple = ()            # the algorithm's state columns, then the master copies
    adaptive: dict = field(default_factory=dict)  # perturbations= for adaptive groups
    partials_pass: Optional[Callable] = None
    write_pass: Optional[Callable] = None
    checked_grads: bool = False    # the gradients' layouts were checked once
    coef_shared: bool = False      # every state holds the same coefficient tensor


@dataclass(eq=False)
class StepPlan:
    """The buckets of a step, valid while :meth:`MomentumAscentOptimizer._plan_key` is."""

    key: tuple
    buckets: list
    absent: list      # parameters without state and gradient: a gradient on one changes the plan
    norm_device: torch.device
    norm_dtype: torch.dtype
    coefs: dict       # group index -> the coefficient tensor its state holds (None: never stepped)
    zero: Tensor      # c = 0 on the norm device, for groups never stepped


@dataclass(eq=False)
class GroupHyper:
    """A group's ``hyper`` vector per device, rebuilt when one of its float values changes;
    0-d tensor values (LR schedulers and rho schedules update them in place) are copied in on
    the device each step, so nothing is read on the host and a captured step stays live."""

    key: tuple
    vectors: dict = field(default_factory=dict)   # device -> float64 vector
    live: list = field(default_factory=list)      # (entry of a vector, 0-d tensor value)


class MomentumAscentOptimizer(backends.PerDeviceBackends, SkippedStepCount, Optimizer):
    """Base class of :class:`~msam_fused.MSAM` and :class:`~msam_fused.AdamWMSAM`."""

    algorithm: Algorithm
    #: the torch optimizer whose state dict warm-starts this one (``load_state_dict``)
    torch_counterpart: str

    @property
    def direction_key(self) -> str:
        """State key of the ascent direction ``x`` (the perturbation is ``-c * x``)."""
        return self.algorithm.direction_key

    # GradScaler hands us ``grad_scale`` and ``found_inf`` instead of unscaling and checking
    # the gradients itself; the unscale happens inside the passes.
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
        self._overlap = None  # msam_fused.overlap.OverlappedBackward, while one is attached
        self._plan: Optional[StepPlan] = None
        self._plan_epoch = 0  # bumped by whatever replaces state or groups wholesale
        self._hypers: dict[int, GroupHyper] = {}  # id(group) -> its hyper vectors
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

    # --------------------------------------------------------------------------- the group
    @classmethod
    def check_hyperparameters(cls, where: str, group: dict) -> None:
        raise NotImplementedError

    @classmethod
    def check_group(cls, where: str, group: dict) -> None:
        """The optimizer's hyper-parameters and the perturbation options of one group."""
        cls.check_hyperparameters(where, group)
        check_flag(where, "adaptive", group.get("adaptive", False))
        check_flag(where, "perturb", group.get("perturb", True))

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
            self.bucket_backend(group, p.device)  # fails now if the group cannot run there
        self._plan_epoch += 1

    def bucket_backend(self, group: dict, device: torch.device):
        """The backend that runs ``group``'s tensors on ``device``."""
        backend = self._backends[device]
        if is_adaptive(group):
            return backends.with_capability(backend, backends.ADAPTIVE, self.backend_request,
                                            f"{type(self).__name__}(adaptive=True)")
        return backend

    def norm_dtype(self) -> torch.dtype:
        """The dtype of the global norm and of the perturbation coefficients."""
        return reference.norm_dtype(layout[1] for layout in self._layouts.values())

    # ------------------------------------------------------------------------------ state
    def _state_dtype(self, p: Tensor) -> torch.dtype:
        return torch.float32 if p.dtype in LOW_PRECISION else p.dtype

    def _group_state_spec(self, p: Tensor, group: dict) -> dict[str, tuple]:
        """Each state key of ``p`` in ``group`` mapped to its (shape, dtype)."""
        dtype = self._state_dtype(p)
        spec = {k: ((), torch.float32) if k in self.algorithm.counter_keys else (p.shape, dtype)
                for k in self.algorithm.state_keys}
        spec["perturbation_coef"] = ((), self.norm_dtype())
        if self.master_weights and p.dtype in LOW_PRECISION:
            spec["master_weight"] = (p.shape, torch.float32)
        if is_adaptive(group):
            spec[PERTURBATION_KEY] = (p.shape, dtype)
        return spec

    def _init_state(self, p: Tensor, group: dict) -> dict:
        """Zero state; the master copy starts at the weights (no perturbation yet)."""
        state = {k: sharding.zeros_like_param(p, shape, dtype)
                 for k, (shape, dtype) in self._group_state_spec(p, group).items()}
        if "master_weight" in state:
            state["master_weight"].copy_(p.detach())
        return state

    def ensure_state(self, p: Tensor, group: dict) -> dict:
        """``p``'s state, created (zero, sharing its group's coefficient tensor, as a step
        leaves it) if it has none yet."""
        state = self.state.get(p)
        if state:
            return state
        coef = self._group_coef(group)
        state = self._init_state(p, group)
        if coef is not None:
            state["perturbation_coef"] = coef
        self.state[p] = state
        return state

    def _group_coef(self, group: dict) -> Optional[Tensor]:
        """The coefficient last applied to this group (None before its first step)."""
        for p in group["params"]:
            state = self.state.get(p)
            if state:
                return state["perturbation_coef"]
        return None

    # -------------------------------------------------------------------- hyper-parameters
    def refresh_hypers(self, where: str) -> None:
        """Once per step: a group whose float values (or options) changed is checked and its
        vectors rewritten in place (the buckets keep them); tensor values are copied in."""
        live = []
        for gi, group in enumerate(self.param_groups):
            values = self.algorithm.hyper_values(group)
            key = (tuple(("tensor", id(v)) if isinstance(v, Tensor) else v for v in values),
                   group.get("adaptive", False), group.get("perturb", True))
            entry = self._hypers.get(id(group))
            if entry is None or entry.key != key:
                self.check_group(f"{where}: param group {gi}", group)
                if entry is None:
                    entry = self._hypers[id(group)] = GroupHyper(key)
                entry.key = key
                entry.live = []
                for vector in entry.vectors.values():
                    self._fill_hyper(group, vector, entry)
            live += entry.live
        if live:
            torch._foreach_copy_([d for d, _ in live], [v for _, v in live])

    def hyper(self, group: dict, device: torch.device) -> Tensor:
        """``group``'s ``hyper`` vector on ``device``: float64, in the algorithm's order, with
        ``rho`` zero for a group that is not perturbed; as of the last step's refresh (a new
        vector is current)."""
        entry = self._hypers.get(id(group))
        if entry is None:
            entry = self._hypers[id(group)] = GroupHyper(None)
        vector = entry.vectors.get(device)
        if vector is None:
            vector = entry.vectors[device] = torch.zeros(len(self.algorithm.hyper_sources),
                                                         dtype=torch.float64, device=device)
            self._fill_hyper(group, vector, entry)
        return vector

    def _fill_hyper(self, group: dict, vector: Tensor, entry: GroupHyper) -> None:
        values = self.algorithm.hyper_values(group)
        if not perturbs(group):
            values = values[:-1] + (0.0,)
        floats = [0.0 if isinstance(v, Tensor) else float(v) for v in values]
        vector.copy_(torch.tensor(floats, dtype=torch.float64), non_blocking=True)
        for i, v in enumerate(values):
            if isinstance(v, Tensor):
                entry.live.append((vector[i], v))
                vector[i].copy_(v)

    # ----------------------------------------------------------------------------- the plan
    def _plan_key(self) -> tuple:
        """What the buckets depend on, cheap to compute every step: the groups and their
        parameter lists, the options that change the state, the state's size and the epoch
        (``load_state_dict``, ``add_param_group``). Which parameters have gradients is checked
        in :meth:`_step_plan`."""
        return (self._plan_epoch, id(self.state), len(self.state),
                tuple((id(g["params"]), len(g["params"]), g.get("adaptive", False), g.get("perturb", True))
                      for g in self.param_groups))

    def _step_plan(self, where: str) -> StepPlan:
        """The cached buckets of a step, rebuilt when something they depend on changed."""
        self.refresh_hypers(where)
        plan = self._plan
        if plan is None or plan.key != self._plan_key() or any(p.grad is not None for p in plan.absent):
            plan = self._plan = self._build_plan(where)
        return plan

    def _build_plan(self, where: str) -> StepPlan:
        """Check every parameter, create missing state and group the tensors into buckets.

        Everything is checked before anything is written, so a bad parameter changes nothing."""
        for gi, group in enumerate(self.param_groups):
            self._check_perturbation_options(f"{where}: param group {gi}", group)
            for i, p in enumerate(group["params"]):
                self.check_param(where, gi, i, p)
        coefs = {gi: self._group_coef(g) for gi, g in enumerate(self.param_groups)}
        entries, absent = [], []
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None and not self.state.get(p):
                    absent.append(p)  # never had a gradient: no state, no perturbation
                    continue
                entries.append((gi, i, group, p, self.ensure_state(p, group)))
        buckets = self._make_buckets(where, entries, PlannedBucket)
        for b in buckets:
            self._bind(b)
        device = buckets[0].device if buckets else torch.device("cpu")
        norm_dtype = self.norm_dtype()
        return StepPlan(self._plan_key(), buckets, absent, device, norm_dtype, coefs,
                        torch.zeros((), dtype=norm_dtype, device=device))

    def _make_buckets(self, where: str, entries, kind=Bucket) -> list:
        """The one bucketing rule: (group, device, dtype, shard weight), in group order."""
        sharded = self._sharding is not None
        buckets: dict[tuple, Bucket] = {}
        for gi, i, group, p, state in entries:
            weight = self._sharding.weight(p) if sharded else 1.0
            key = (gi, p.device, p.dtype, weight)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = kind(group, gi, p.device, p.dtype, self.bucket_backend(group, p.device),
                                        self.hyper(group, p.device), norm_weight=weight,
                                        sharded=sharded)
            b.sources.append(p)
            b.indices.append(i)
            b.params.append(sharding.local(p) if sharded else p)
            b.states.append(state)
        return list(buckets.values())

    def _bind(self, b: PlannedBucket) -> None:
        algo = self.algorithm
        b.columns = tuple(b.column(k) for k in algo.state_keys) + (b.column("master_weight"),)
        b.adaptive = {"perturbations": b.column(PERTURBATION_KEY)} if is_adaptive(b.group) else {}
        b.partials_pass = getattr(b.backend, algo.partials)
        b.write_pass = getattr(b.backend, algo.step)

    def check_param(self, where: str, gi: int, i: int, p: Tensor) -> None:
        place = ParamPlace(self.param_groups[gi], gi, i, p)
        check_param_for_step(where, place, p, self._layouts[id(p)])
        if self._sharding is not None:
            sharding.check_grad(where, str(place), p)

    def _check_params(self, where: str, b: PlannedBucket) -> None:
        """Every step: the bucket's parameters are still of its device and dtype (one grouping
        call; the per-parameter checks run only to name the culprit). Their gradients match
        them (torch's ``grad`` setter and autograd see to that); a gradient's layout is checked
        once per parameter (:meth:`_check_layouts`)."""
        if not b.sharded:
            groups = torch._C._group_tensors_by_device_and_dtype([b.params], False)
            if len(groups) == 1 and (b.device, b.dtype) in groups:
                return
        for i, p in zip(b.indices, b.sources):
            self.check_param(where, b.group_index, i, p)

    def _check_perturbation_options(self, where: str, group: dict) -> None:
        """The group's backend can run its options, and ``adaptive`` is what its state was
        built for (the stored perturbation exists exactly for adaptive groups)."""
        for device in {p.device for p in group["params"]}:
            self.bucket_backend(group, device)
        state = next((self.state[p] for p in group["params"] if self.state.get(p)), None)
        if state is not None and (PERTURBATION_KEY in state) != is_adaptive(group):
            raise ValueError(f"{where}: adaptive={is_adaptive(group)}, but the group was stepped with "
                             f"adaptive={not is_adaptive(group)}; adaptive cannot change once a "
                             "group has optimizer state")

    # -------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; see the module docstring for what it does.

        Gradient clipping goes *before* this call, on the gradients at the perturbed point
        (``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)``; with a GradScaler,
        ``scaler.unscale_(opt)`` first): the clipped gradient is the ``g`` of docs/design.md.
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
        hidden = self._overlap.take(where) if self._overlap is not None else None
        plan = self._step_plan(where)
        if not plan.buckets:
            if hidden is not None:
                self._overlap.release()
            return loss
        norm_device, norm_dtype = plan.norm_device, plan.norm_dtype
        scaler_found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if hidden is not None:
            grad_scale = self._overlap.grad_scale  # what the hidden passes divided by
        coef_old = {gi: plan.zero if c is None else c.to(norm_device, non_blocking=True)
                    for gi, c in plan.coefs.items()}

        # 1. the read-only passes (or what backward computed): partial sums, non-finite flags
        total, nonfinite, grads_of, stashed = None, None, [], []
        for b in plan.buckets:
            ready = None if hidden is None else hidden.get((b.group_index, b.device, b.dtype))
            if ready is not None:
                grads, partials, was_stashed = ready
            else:
                was_stashed = False
                grads = b.grads()
                if not b.checked_grads:
                    self._check_layouts(where, b, grads)
                self._check_params(where, b)
                partials = b.partials_pass(b.params, grads, *b.columns, hyper=b.hyper, norm_dtype=norm_dtype,
                                           grad_scale=_on(grad_scale, b.device), **self._adaptive(b, coef_old))
            grads_of.append(grads)
            stashed.append(was_stashed)
            sq, bad = b.backend.sum_segment_partials(partials, norm_dtype)
            bad = bad.to(norm_device, non_blocking=True)
            nonfinite = bad if nonfinite is None else nonfinite | bad
            if perturbs(b.group):
                sq = (sq * b.norm_weight if b.norm_weight != 1.0 else sq).to(norm_device, non_blocking=True)
                total = sq if total is None else total + sq
        if total is None:  # no group is perturbed
            total = torch.zeros((), dtype=norm_dtype, device=norm_device)
        if self._sharding is not None:
            total = self._sharding.sum(total)  # the partial sums of all shards: the global norm
        found_inf = self._skip_flag(where, plan, grads_of, nonfinite, scaler_found_inf)

        # 2. the coefficients
        norm_backend = self._backends[norm_device]
        coef_new = {}
        for b in plan.buckets:
            if b.group_index not in coef_new:
                rho = self.hyper(b.group, norm_device)[-1]
                coef_new[b.group_index] = norm_backend.perturbation_coef(total, rho, coef_old[b.group_index],
                                                                         found_inf)
        # 3. the write passes
        for b, grads, was_stashed in zip(plan.buckets, grads_of, stashed):
            new = coef_new[b.group_index].to(b.device, non_blocking=True)
            old = coef_old[b.group_index].to(b.device, non_blocking=True)
            skip = _on(found_inf, b.device)
            if was_stashed:
                b.backend.msam_sgd_overlap_finish_(b.params, grads, b.columns[0], hyper=b.hyper,
                                                   coef_old=old, coef_new=new, found_inf=skip)
            else:
                b.write_pass(b.params, grads, *b.columns, hyper=b.hyper, coef_old=old, coef_new=new,
                             grad_scale=_on(grad_scale, b.device), found_inf=skip, **b.adaptive)
        self._remember_coefs(plan, coef_new)
        self._count_skipped(found_inf)
        if hidden is not None:
            self._overlap.release()
        return loss

    def _adaptive(self, b: PlannedBucket, coef_old: dict) -> dict:
        """The read-only pass's extra arguments for an adaptive group (it needs ``w``)."""
        if not b.adaptive:
            return b.adaptive
        return {**b.adaptive, "coef_old": coef_old[b.group_index].to(b.device, non_blocking=True)}

    def _check_layouts(self, where: str, b: PlannedBucket, grads: list) -> None:
        for i, p, g in zip(b.indices, b.sources, grads):
            if g is not None and g.layout != torch.strided:
                self.check_param(where, b.group_index, i, p)
        b.checked_grads = True

    def _skip_flag(self, where: str, plan: StepPlan, grads_of: list, nonfinite: Tensor,
                   scaler_found_inf: Optional[Tensor]) -> Optional[Tensor]:
        """The device flag that makes the step a no-op (None: nothing to skip): the
        GradScaler's, else the passes' non-finite markers; ``nonfinite="raise"`` reads them on
        the host and raises, naming the tensors, before anything is written."""
        ranks = self._sharding
        if scaler_found_inf is not None:
            return scaler_found_inf if ranks is None else ranks.any(scaler_found_inf)
        flag = nonfinite if ranks is None else ranks.any(nonfinite)
        if self.nonfinite == "skip":
            return flag
        if bool(flag):
            if self._overlap is not None and self._overlap.pending:
                groups = self._overlap.nonfinite_groups()
                self._overlap.discard()
                raise FloatingPointError(
                    f"{where}: non-finite gradient (inf or NaN) in param group(s) {groups}; the update "
                    "the backward pass started was undone and nothing was changed (nonfinite='skip' "
                    "would skip the step instead)")
            raise_nonfinite(where, [(g, ParamPlace(b.group, b.group_index, i, p))
                                    for b, grads in zip(plan.buckets, grads_of)
                                    for i, p, g in zip(b.indices, b.sources, grads) if g is not None])
        return None

    def _remember_coefs(self, plan: StepPlan, coef_new: dict) -> None:
        """Only now, with every bucket stepped, may the old coefficients be overwritten: in
        place where possible, so that a step captured in a CUDA graph reads the current value
        on replay; all states of a bucket hold one tensor."""
        for b in plan.buckets:
            coef = _remember(b.states[0]["perturbation_coef"], coef_new[b.group_index].to(b.device, non_blocking=True))
            if not b.coef_shared or coef is not b.states[0]["perturbation_coef"]:
                for state in b.states:
                    state["perturbation_coef"] = coef
                b.coef_shared = True
            if plan.coefs[b.group_index] is None:
                plan.coefs[b.group_index] = coef

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; after a backward that ran the overlapped first
        pass (:meth:`~msam_fused.MSAM.overlap_backward`) it also undoes that pass."""
        if self._overlap is not None:
            self._overlap.discard()
        super().zero_grad(set_to_none)

    # -------------------------------------------------------- the overlapped step's handle
    def attach_overlap(self, handle) -> None:
        """Called by :class:`msam_fused.overlap.OverlappedBackward`: ``step()`` takes what its
        backward prepared (``handle.take``), ``zero_grad()`` discards it."""
        if self._overlap is not None:
            raise RuntimeError(f"{type(self).__name__}.overlap_backward: this optimizer already overlaps "
                               "its step with backward; call remove() on the handle overlap_backward() "
                               "returned first")
        self._overlap = handle

    def detach_overlap(self, handle) -> None:
        if self._overlap is handle:
            self._overlap = None

    @property
    def overlap_handle(self):
        """The attached :class:`msam_fused.overlap.OverlappedBackward`, or None."""
        return self._overlap

    @property
    def is_sharded(self) -> bool:
        return self._sharding is not None

    @property
    def in_unperturbed(self) -> bool:
        """Inside :meth:`unperturbed` (the parameters hold the true weights)."""
        return self._unperturbed_depth > 0

    def _check_no_overlapped_update(self, where: str) -> None:
        """Between a backward that ran the overlapped first pass and step(), the momenta hold
        the new momenta already: nothing may read or replace the state then."""
        if getattr(self, "_overlap", None) is not None:
            self._overlap.check_idle(where)

    # ----------------------------------------------------------------- true weights access
    def layout(self, with_state_only: bool = False) -> list[Bucket]:
        """Every parameter (or every one with state), bucketed as a step buckets them; the
        overlapped step plans its passes on these."""
        entries = [(gi, i, g, p, self.state.get(p)) for gi, g in enumerate(self.param_groups)
                   for i, p in enumerate(g["params"]) if self.state.get(p) or not with_state_only]
        return self._make_buckets(type(self).__name__, entries)

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
        buckets = self.layout(with_state_only=True)
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
        self._plan_epoch += 1
        self._hypers.clear()  # torch replaced the group dicts
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
            missing = [k for k in self.algorithm.group_keys if k not in saved]
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
    where possible."""
    if previous is None or previous.device != coef.device or previous.dtype != coef.dtype:
        return coef
    return previous.copy_(coef)


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if t is None else t.to(device, non_blocking=True)
