"""SAM: the two-pass baseline MSAM is measured against, wrapping any base optimizer."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from msam_fused import backends, reference
from msam_fused.distributed import sharding
from msam_fused.momentum_ascent import perturbs
from msam_fused.nonfinite import SkippedStepCount, raise_nonfinite
from msam_fused.validation import (ParamPlace, check_flag, check_hyperparameter, check_new_params,
                                   check_nonfinite_policy, describe_param, listed_params,
                                   with_plain_params)


# How second_step() returns to w exactly: by handing each parameter its backup's storage (no
# memory moved), or by copying the backup back (one read and one write of the parameters).
RESTORE_MODES = ("swap", "copy")


class SAM(backends.PerDeviceBackends, SkippedStepCount, Optimizer):
    r"""Sharpness-Aware Minimization (Foret et al.) around any ``torch.optim`` optimizer.

    Each step takes two forward/backward passes: the gradient ``g1`` at ``w`` gives the ascent
    ``e = rho * g1 / (||g1|| + EPS_NORM)`` (adaptive: ``e = rho * w**2 * g1 / || |w| * g1 ||``,
    the norm global over all param groups); the gradient ``g2`` at ``w + e`` drives the base
    optimizer's step from ``w``. ``w`` is remembered, not recomputed, so the return is exact.

    Usage (the second pass must not update BatchNorm statistics)::

        sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()                 # g1 at w
        sam.first_step(zero_grad=True)                  # move to w + e
        with disable_running_stats(model):
            loss_fn(model(x), y).backward()             # g2 at w + e
        sam.second_step(zero_grad=True)                 # back to w, base step with g2

    or ``sam.step(closure)``: after the first backward, with a closure that runs the second
    forward/backward (inside ``disable_running_stats``), or, as torch calls optimizers, with no
    gradient yet and a closure that runs both (see :meth:`step`). Clip gradients (if at all) on ``g2``,
    just before :meth:`second_step`. Under an AMP ``GradScaler``, call ``scaler.step(sam)``
    in place of ``second_step()``: the ascent is scale-invariant, and the scaler's
    ``found_inf`` skips the base step.

    The wrapper shares ``param_groups`` and ``state`` with the base optimizer (the same
    objects): LR schedulers may be attached to either, ``add_param_group`` fills in the base
    optimizer's defaults, and ``state_dict()`` is the base optimizer's (groups also carry
    ``rho`` and ``adaptive``), so a resumed run continues exactly.

    Param groups may carry ``perturb=False``: such a group is not moved and stays out of the
    norm (e.g. all but the normalization layers, SAM-ON:
    :func:`msam_fused.variants.perturbation_param_groups`); its ``g2`` still drives the step.

    Non-finite gradients (``nonfinite="skip"``): a non-finite ``g1`` or ``g2`` skips the
    perturbation and the base step. With a base optimizer that takes ``grad_scale`` and
    ``found_inf`` (torch's ``fused=True`` optimizers) the skip happens on the device, with no
    host sync; any other base optimizer cannot be told to skip on the device, so deciding it
    reads one flag on the host per step.

    ``restore`` (how ``w`` is kept and returned to, exactly either way): ``"swap"`` (default)
    writes ``w + e`` into a spare buffer of the parameter's shape, and parameter and buffer
    trade storage: the parameter holds ``w + e``, the buffer ``w``; :meth:`second_step` trades
    them back, so ``w`` is never copied. ``"copy"`` copies ``w`` aside and back; parameters
    that share their storage (views into a flat buffer, shards) and steps inside a CUDA graph
    capture are always copied. Code that remembers the parameters' memory addresses across
    steps (CUDA graphs of the model's forward/backward made outside this optimizer) needs
    ``"copy"``.

    Distributed: under DDP use :func:`msam_fused.distributed.sam_step`, which runs the ascent
    pass locally per rank (the default) or globally synchronised. With DTensor parameters
    (FSDP2) the ascent norm is global: one all-reduce of the partial sums of squares.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, base_optimizer: type, rho: float = 0.05, adaptive: bool = False, *,
                 backend: str = "auto", nonfinite: str = "skip", restore: str = "swap",
                 **base_kwargs: Any):
        if isinstance(base_optimizer, Optimizer) or not callable(base_optimizer):
            raise TypeError("SAM: base_optimizer must be an optimizer class such as torch.optim.SGD "
                            f"(its arguments go to SAM as keywords), got {base_optimizer!r}")
        check_hyperparameter("SAM", "rho", rho)
        check_nonfinite_policy("SAM", nonfinite)
        if backend not in backends.BACKEND_NAMES:
            raise ValueError(f"SAM: unknown backend {backend!r}; choose one of "
                             f"{', '.join(backends.BACKEND_NAMES)}")
        if restore not in RESTORE_MODES:
            raise ValueError(f"SAM: unknown restore {restore!r}; choose one of {', '.join(RESTORE_MODES)}")
        self.base_optimizer = base_optimizer(params, **base_kwargs)
        self.backend_request = backend
        self.nonfinite = nonfinite
        self.restore = restore
        self._backends: dict[torch.device, Any] = {}
        self._backups: dict[Tensor, Tensor] = {}
        self._swap_pairs: dict[Tensor, tuple] = {}  # parameter -> the two storages it trades between
        self._pending: Optional[tuple] = None
        self._skipped_steps: Optional[Tensor] = None
        self._sharding: Optional[sharding.ShardLayout] = None
        self._adopting = True
        defaults = {**self.base_optimizer.defaults, "rho": rho, "adaptive": bool(adaptive)}
        super().__init__(self.base_optimizer.param_groups, defaults)
        self._adopting = False
        self._share_base()

    # Runtime caches rebuilt after deepcopy or unpickling; torch's hook registries (``_optimizer_*``)
    # are left out as torch's own __getstate__ leaves them out.
    _REBUILT = ("_backends", "_backups", "_swap_pairs", "_sharding")

    def __getstate__(self) -> dict:
        """Everything the constructor took (the base optimizer, ``rho``, ``backend``,
        ``nonfinite``, a variant's settings) survives ``copy.deepcopy`` and pickling."""
        if self._pending is not None:
            raise RuntimeError(f"{type(self).__name__}: cannot copy or pickle between first_step() "
                               "and second_step(); finish the step first")
        return {k: v for k, v in self.__dict__.items()
                if k not in self._REBUILT and not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._backends, self._backups, self._swap_pairs = {}, {}, {}
        params = [p for g in self.param_groups for p in with_plain_params(g)["params"]]
        for p in params:
            self._backend_on(p.device)
        self._sharding = sharding.shard_layout(type(self).__name__, params)

    def _share_base(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict) -> None:
        where = "SAM"
        index = len(self.param_groups)
        known = [p for g in self.param_groups for p in g["params"]]
        if not self._adopting:  # the base optimizer has checked and listed its own groups
            param_group["params"] = listed_params(where, param_group["params"])
            check_new_params(where, index, with_plain_params(param_group), known)
        plain = with_plain_params(param_group)["params"]
        layout = sharding.shard_layout(where, known + plain)
        param_group.setdefault("rho", self.defaults["rho"])
        param_group.setdefault("adaptive", self.defaults["adaptive"])
        _check_group(f"SAM param group {index}", param_group)
        for p in plain:
            self._backend_on(p.device)
        if self._adopting:
            self.param_groups.append(param_group)  # already in the base optimizer
        else:
            self.base_optimizer.add_param_group(param_group)
        self._sharding = layout

    def _buckets(self, where: str) -> tuple[list[tuple], list]:
        """(group, device, params, grads) per bucket, for parameters that have a gradient.

        The gradients are the local tensors (shards of DTensors); the parameters are the
        parameters themselves: they key the backups."""
        buckets: dict[tuple, tuple] = {}
        labelled = []
        for gi, group in enumerate(self.param_groups):
            _check_group(f"{where}: param group {gi}", group)
            if not perturbs(group):
                continue
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                what = ParamPlace(group, gi, i, p)  # formatted only if a message needs it
                if p.grad.is_sparse or p.grad.is_complex():
                    raise RuntimeError(f"{where}: {what} has a sparse or complex gradient; SAM needs "
                                       "dense real gradients")
                weight = 1.0
                if self._sharding is not None:
                    sharding.check_grad(where, what, p)
                    weight = self._sharding.weight(p)
                key = (gi, p.device, p.dtype, weight)
                if key not in buckets:
                    buckets[key] = (group, p.device, [], [], weight)
                grad = p.grad if self._sharding is None else sharding.local(p.grad)
                buckets[key][2].append(p)
                buckets[key][3].append(grad)
                labelled.append((grad, what))
        return list(buckets.values()), labelled

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, local_ascent_group: Any = None) -> None:
        """Move from ``w`` to ``w + e`` using the gradients now in ``.grad``.

        ``local_ascent_group``: the process group of a local ascent under DDP (the first
        backward ran under ``no_sync()``, so each rank's ``g1`` is its own). The norm stays
        per rank, but a non-finite ``g1`` on any rank skips the step on all of them, so the
        ranks stay identical. :func:`msam_fused.distributed.sam_step` passes it for you.
        """
        where = f"{type(self).__name__}.first_step"
        if self._pending is not None:
            raise RuntimeError(f"{where}() was called twice; call second_step() in between")
        self._pending = self._ascend(where, True, local_ascent_group)
        if zero_grad:
            self.zero_grad()

    def _ascent_ranks(self, where: str, local_ascent_group: Any):
        """The ranks whose skip decisions must agree: the mesh of sharded parameters, or the
        group of a local ascent; None for a single process."""
        all_ranks = self._sharding
        if local_ascent_group is not None:
            if all_ranks is not None:
                raise ValueError(f"{where}: a local ascent needs every rank to hold whole "
                                 "parameters; these are DTensor shards (FSDP2): use the global ascent")
            all_ranks = sharding.RankGroup(local_ascent_group)
        if all_ranks is not None:
            all_ranks.check_alive(where)
        return all_ranks

    def _ascend(self, where: str, from_w: bool, local_ascent_group: Any = None) -> tuple[list, Optional[Tensor]]:
        """One ascent from where the parameters are, along the gradients now in ``.grad``:
        ``p + scale * direction`` per bucket (:meth:`_ascent_directions`). From ``w`` (the first
        ascent of a step), ``w`` is kept for the return (:meth:`_ascent_outs`); later ascents
        (MultiStepSAM's) move the parameters in place. Returns the moved (device, params,
        swapped: which of them hold their backup's storage) and the skip flag."""
        all_ranks = self._ascent_ranks(where, local_ascent_group)
        buckets, labelled = self._buckets(where)
        if not buckets:
            raise RuntimeError(f"{where}(): no parameter has a gradient (in a group with "
                               "perturb=True); run backward() first")
        norm_device = buckets[0][1]
        norm_dtype = reference.norm_dtype(p.dtype for b in buckets for p in b[2])
        total, found_inf = self._ascent_norm(where, buckets, norm_device, norm_dtype, labelled, all_ranks)
        ascents = self._ascent_directions(buckets, total, found_inf)
        moved = []
        for (group, device, params, _, _), (directions, scale) in zip(buckets, ascents):
            backups = [self._backup_of(p) for p in params] if from_w else None
            swapped = self._swaps(params, backups) if from_w else [False] * len(params)
            self._backends[device].sam_ascent_(
                self._locals(params), directions, self._ascent_outs(params, backups, swapped),
                scale=scale.to(device, non_blocking=True), adaptive=group["adaptive"],
                found_inf=None if found_inf is None else found_inf.to(device, non_blocking=True))
            for p in _picked(params, swapped):
                self._trade_storage(p)
            moved.append((device, params, swapped))
        return moved, found_inf

    def _ascent_norm(self, where: str, buckets: list, norm_device: torch.device, norm_dtype: torch.dtype,
                     labelled: list, all_ranks) -> tuple[Tensor, Optional[Tensor]]:
        """The global sum of squares of the ascent terms (``g``, or ``|w| * g`` when adaptive)
        and the skip flag, from one read-only pass per bucket (its non-finite markers are the
        check of ``g``); ``nonfinite="raise"`` reads the flag and raises, naming the tensors."""
        total = torch.zeros((), dtype=norm_dtype, device=norm_device)
        flag = torch.zeros((), dtype=torch.bool, device=norm_device)
        for group, device, params, grads, weight in buckets:
            backend = self._backends[device]
            partials = backend.sam_ascent_partials(self._locals(params), grads, adaptive=group["adaptive"],
                                                   norm_dtype=norm_dtype)
            sq, bad = backend.sum_segment_partials(partials, norm_dtype)
            if weight != 1.0:
                sq = sq * weight
            total = total + sq.to(norm_device, non_blocking=True)
            flag = flag | bad.to(norm_device, non_blocking=True)
        if self._sharding is not None:
            total = self._sharding.sum(total)  # the partial sums of all shards: the global norm
        if all_ranks is not None:
            flag = all_ranks.any(flag)
        if self.nonfinite == "skip":
            return total, flag
        if bool(flag):
            raise_nonfinite(where, labelled)
        return total, None

    def _ascent_directions(self, buckets: list, total: Tensor, found_inf: Optional[Tensor]) -> list[tuple]:
        """(direction, scale) per bucket, ``e = scale * direction`` (``* w**2`` when adaptive):
        SAM's ``g`` and ``radius / ||g||`` (``total``: the global sum of squares)."""
        zero = torch.zeros((), dtype=total.dtype, device=total.device)
        norm_backend = self._backends[total.device]
        return [(grads, norm_backend.perturbation_coef(total, self._ascent_radius(group), zero, found_inf))
                for group, _, _, grads, _ in buckets]

    def _ascent_radius(self, group: dict) -> float:
        """The length of one ascent (SAM: ``rho``)."""
        return group["rho"]

    def _locals(self, params: list) -> list:
        """The tensors the backends work on: the parameters, or their local shards."""
        return params if self._sharding is None else [sharding.local(p) for p in params]

    def _backup_of(self, p: Tensor) -> Tensor:
        """Where ``w`` of ``p`` (of its local shard) is kept during the second pass: a
        reusable tensor like ``p`` (like its local shard)."""
        x = p if self._sharding is None else sharding.local(p)
        backup = self._backups.get(p)
        if backup is None or backup.shape != x.shape or backup.dtype != x.dtype:
            backup = self._backups[p] = torch.empty_like(x, memory_format=torch.preserve_format)
        return backup

    def _ascent_outs(self, params: list, backups: Optional[list], swapped: list) -> list:
        """Where the ascent writes ``w + e``: a parameter that swaps, into its backup's memory
        (``w`` is only read, and the two then trade storage); any other, in place, after ``w``
        was copied into its backup. Later ascents (no ``backups``): in place."""
        locals_ = self._locals(params)
        if backups is None:
            return locals_
        kept = [not s for s in swapped]
        if any(kept):
            torch._foreach_copy_(_picked(backups, kept), _picked(locals_, kept))
        return [b if s else x for b, x, s in zip(backups, locals_, swapped)]

    def second_step(self, zero_grad: bool = False) -> None:
        """Return to ``w`` exactly and take the base optimizer's step with the new gradients.

        Runs through :meth:`step`, so LR schedulers and step hooks see every SAM step."""
        if self._pending is None:
            raise RuntimeError("SAM.second_step() was called without first_step()")
        self.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def _finish_step(self) -> Optional[Tensor]:
        """Back to ``w``, then :meth:`_descend`; returns the step's skip flag."""
        perturbed, first_inf = self._pending
        for device, params, swapped in perturbed:
            for p in _picked(params, swapped):
                self._trade_storage(p)
            copied = _picked(params, [not s for s in swapped])
            if copied:
                self._backends[device].sam_restore_(self._locals(copied), [self._backups[p] for p in copied])
        self._pending = None
        return self._descend(f"{type(self).__name__}.second_step", first_inf)

    def _swaps(self, params: list, backups: list) -> list[bool]:
        """Which parameters keep ``w`` without copying it (``restore="swap"``): the ascent writes
        ``w + e`` into the backup's memory and parameter and backup trade storage; after the
        second pass they trade back. Not those whose storage is not theirs alone (views, flat
        buffers, shards), none with ``restore="copy"`` or while a CUDA graph is being captured
        (the graph holds addresses): these copy ``w`` into the backup and back."""
        if self.restore == "copy" or self._sharding is not None or _capturing(params):
            return [False] * len(params)
        return [self._can_swap(p, b) for p, b in zip(params, backups)]

    def _can_swap(self, p: Tensor, backup: Tensor) -> bool:
        """Whether ``p`` and its backup may trade storage. Decided once per pair of storages
        (the pair stays the same while they trade), again when either changes."""
        pair = self._swap_pairs.get(p)
        if pair is not None and p.data_ptr() in pair and backup.data_ptr() in pair:
            return True
        swaps = _owns_storage(p) and _owns_storage(backup) and backup.stride() == p.stride()
        if swaps:
            self._swap_pairs[p] = (p.data_ptr(), backup.data_ptr())
        return swaps

    def _trade_storage(self, p: Tensor) -> None:
        self._backups[p], p.data = p.data, self._backups[p]

    def _descend(self, where: str, first_inf: Optional[Tensor]) -> Optional[Tensor]:
        """The base optimizer's step with the gradients now in ``.grad``, skipped (on the device)
        when they or the ascent's are not finite; returns the skip flag."""
        grads = [(p.grad if self._sharding is None else sharding.local(p.grad),
                  ParamPlace(g, gi, i, p)) for gi, g in enumerate(self.param_groups)
                 for i, p in enumerate(g["params"]) if p.grad is not None]
        scaler_found_inf = getattr(self, "found_inf", None)
        second_inf = None
        if grads and scaler_found_inf is None:
            second_inf = self._nonfinite_flag(where, grads)
        elif scaler_found_inf is not None:
            second_inf = scaler_found_inf if self._sharding is None else self._sharding.any(scaler_found_inf)
        found_inf = _either(first_inf, second_inf)
        self._base_step(found_inf, getattr(self, "grad_scale", None), [g for g, _ in grads])
        self._count_skipped(found_inf)
        return found_inf

    def _nonfinite_flag(self, where: str, labelled: list) -> Optional[Tensor]:
        """Whether any of the gradients ``g2`` holds inf or NaN, from the non-finite markers of
        the backends' read-only pass (one read of ``g2``, fused, no host sync); ``None`` when
        ``nonfinite="raise"`` found them finite (that reads the flag on the host)."""
        by_kind: dict[tuple, list[Tensor]] = {}
        for g, _ in labelled:
            if g.numel():
                by_kind.setdefault((g.device, g.dtype), []).append(g)
        device = labelled[0][0].device
        flag = torch.zeros((), dtype=torch.bool, device=device)
        for (where_on, dtype), grads in by_kind.items():
            backend = self._backend_on(where_on)
            norm_dtype = reference.norm_dtype([dtype])
            partials = backend.sam_ascent_partials(grads, grads, adaptive=False, norm_dtype=norm_dtype)
            flag = flag | backend.sum_segment_partials(partials, norm_dtype)[1].to(device, non_blocking=True)
        if self._sharding is not None:
            flag = self._sharding.any(flag)
        if self.nonfinite == "skip":
            return flag
        if bool(flag):
            raise_nonfinite(where, labelled)
        return None

    def _base_step(self, found_inf: Optional[Tensor], grad_scale: Optional[Tensor], grads: list) -> None:
        base = self.base_optimizer
        device_side = getattr(base, "_step_supports_amp_scaling", False) and all(
            g.get("fused", False) for g in self.param_groups)
        if found_inf is None and grad_scale is None:
            base.step()
        elif device_side:
            base.grad_scale, base.found_inf = grad_scale, (found_inf if found_inf is None else found_inf.float())
            try:
                base.step()
            finally:
                del base.grad_scale, base.found_inf
        else:
            if grad_scale is not None:
                torch._foreach_div_(grads, grad_scale.to(grads[0].device))
            if found_inf is None or not bool(found_inf):
                base.step()

    def step(self, closure=None):
        """``step(closure)``, ``closure`` running a forward/backward and returning the loss:

        * torch's convention (Lightning's automatic optimization, LBFGS-style callers): no
          parameter has a gradient yet, so the closure runs twice, at ``w`` for ``g1`` and at
          ``w + e`` for ``g2``; returns the loss at ``w``, as ``torch.optim`` optimizers do;
        * the convention of the original SAM code: the first backward ran before the call, so
          the closure runs once, at ``w + e``; returns that loss.

        The closure cannot tell its calls apart, so each updates BatchNorm statistics unless
        it prevents that; :meth:`first_step` / :meth:`second_step` keep them those of ``w``.
        ``step()`` with no closure finishes a step begun with :meth:`first_step` (this is
        what ``GradScaler.step(sam)`` calls)."""
        if closure is None:
            if self._pending is None:
                raise RuntimeError("SAM.step() needs a closure that runs the second forward and "
                                   "backward pass, or a first_step() before it")
            return self._finish_step()
        loss_at_w = None
        if not any(p.grad is not None for g in self.param_groups if perturbs(g) for p in g["params"]):
            with torch.enable_grad():
                loss_at_w = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self._finish_step()
        return loss if loss_at_w is None else loss_at_w

    def state_dict(self) -> dict:
        """The base optimizer's state dict (loadable into it alone), plus the skipped-step count."""
        sd = self.base_optimizer.state_dict()
        skipped = None if self._skipped_steps is None else self._skipped_steps.clone()
        sd["msam_fused"] = {"optimizer": type(self).__name__, "skipped_steps": skipped}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        where = "SAM.load_state_dict"
        if self._pending is not None:
            raise RuntimeError(f"{where}: a step is half done (first_step without second_step)")
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if groups is None or "state" not in state_dict:
            raise ValueError(f"{where}: not an optimizer state dict (needs 'state' and 'param_groups')")
        for gi, group in enumerate(groups):
            if "rho" not in group or "adaptive" not in group:
                raise ValueError(f"{where}: param group {gi} has no 'rho'/'adaptive': the state "
                                 "dict was not saved by msam_fused.SAM")
            check_hyperparameter(f"{where}: saved param group {gi}", "rho", group["rho"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{where}: the state dict has {len(groups)} param groups, "
                             f"this optimizer has {len(self.param_groups)}")
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{where}: param group {gi} has {len(saved['params'])} parameters "
                                 f"in the state dict and {len(group['params'])} here: another model?")
            for i, (key, p) in enumerate(zip(saved["params"], group["params"])):
                for name, value in state_dict["state"].get(key, {}).items():
                    if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                        raise ValueError(
                            f"{where}: state '{name}' of {describe_param(group, gi, i, p)} has shape "
                            f"{tuple(value.shape)}: the state dict is from another model")
        tag = state_dict.get("msam_fused") or {}
        self.base_optimizer.load_state_dict(
            with_copied_state({k: v for k, v in state_dict.items() if k != "msam_fused"}))
        self._share_base()
        skipped = tag.get("skipped_steps")
        self._skipped_steps = None if skipped is None else skipped.clone()


def with_copied_state(state_dict: dict) -> dict:
    """``state_dict`` with copies of its state tensors: torch's ``load_state_dict`` may alias
    the given tensors (two optimizers loaded from one dict would then share momentum buffers)."""
    return {**state_dict, "state": {k: {n: v.clone() if isinstance(v, Tensor) else v
                                        for n, v in s.items()}
                                    for k, s in state_dict["state"].items()}}


def _check_group(where: str, group: dict) -> None:
    check_hyperparameter(where, "rho", group["rho"])
    check_flag(where, "adaptive", group["adaptive"])
    check_flag(where, "perturb", group.get("perturb", True))


def _either(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None or b is None:
        return a if b is None else b
    return (a != 0) | (b.to(a.device) != 0)


def _owns_storage(t: Tensor) -> bool:
    """``t`` is the only tensor over all of its storage (not a view into a larger buffer), so
    handing its storage to another tensor changes nothing else."""
    return (t.storage_offset() == 0 and t._base is None
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _picked(items: list, which: list) -> list:
    return [x for x, w in zip(items, which) if w]


def _capturing(params: list) -> bool:
    return bool(params) and params[0].is_cuda and torch.cuda.is_current_stream_capturing()
