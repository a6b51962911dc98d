"""Variants of SAM and MSAM from the MSAM paper (Table 1 baselines, Table 3/Appendix variants)
and the SAM replication study; docs/variants.md says exactly what each implements.

* :func:`perturbation_param_groups`: adaptive (ASAM-style) and normalization-only perturbation
  for MSAM, AdamW-MSAM and SAM (group options ``adaptive`` and ``perturb``).
* :class:`MultiStepSAM`: SAM with a k-step L2 or sign (L-infinity, FGSM-style) ascent.
* :class:`LookSAM`, :class:`ESAM`, :class:`MESA`: the paper's efficient-SAM baselines.
* :func:`build` and :func:`train_step`: every optimizer by name, and the step each needs.
"""

from msam_fused.variants.esam import ESAM
from msam_fused.variants.factory import OPTIMIZERS, PERTURBING, build, train_step
from msam_fused.variants.looksam import LookSAM
from msam_fused.variants.mesa import MESA
from msam_fused.variants.multistep_sam import MultiStepSAM
from msam_fused.variants.param_groups import NORM_LAYERS, perturbation_param_groups

__all__ = ["ESAM", "LookSAM", "MESA", "MultiStepSAM", "NORM_LAYERS", "OPTIMIZERS", "PERTURBING", "build",
           "perturbation_param_groups", "train_step"]
