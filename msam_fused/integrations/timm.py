"""timm: ``msam``, ``adamwmsam`` and ``sam`` in timm's optimizer factory (registered on import).

    import msam_fused.integrations.timm  # noqa: F401  (registers the names)
    opt = timm.optim.create_optimizer_v2(model, "msam", lr=0.5, weight_decay=5e-4, rho=3.0)

timm's param groups (no weight decay on biases and norm layers, layer decay) and schedulers
work as with any timm optimizer, and so does ``timm.utils.NativeScaler`` (``scaler.step(opt)``
hands MSAM the scale and the non-finite flag, docs/design.md). AdamW-MSAM is ``adamwmsam``:
timm reads the part of a name after its last ``_`` as the optimizer (``adamw_msam`` would be
``msam``). ``sam`` wraps ``torch.optim.SGD`` (pass ``base_optimizer=`` for another) and needs
SAM's two passes per step: ``opt.step(closure)`` or ``first_step``/``second_step``, not timm's
one-backward ``train.py`` loop.

timm has no public registration call; this uses its default registry
(``timm.optim._optim_factory.default_registry``), the one its own optimizers are registered in.
"""

from __future__ import annotations

import torch
from timm.optim import OptimInfo
from timm.optim._optim_factory import default_registry

from msam_fused.adamw_msam import AdamWMSAM
from msam_fused.msam import MSAM
from msam_fused.sam import SAM

OPTIMIZERS = (
    OptimInfo(name="msam", opt_class=MSAM, has_eps=False, has_momentum=True,
              description="Momentum-SAM: SGD with momentum at the point the momentum says is uphill"),
    OptimInfo(name="adamwmsam", opt_class=AdamWMSAM, has_betas=True,
              description="AdamW-MSAM: AdamW at the point its first moment says is uphill"),
    OptimInfo(name="sam", opt_class=SAM, has_eps=False, has_momentum=True,
              defaults={"base_optimizer": torch.optim.SGD},
              description="SAM around a base optimizer (torch.optim.SGD unless base_optimizer= is given)"),
)

for _info in OPTIMIZERS:
    default_registry.register(_info)
