"""pytest-benchmark cases of one optimizer step, for every case bench/micro.py times.

On demand only (``make test`` runs tests/, not this)::

    pytest bench/test_micro_bench.py --benchmark-only --benchmark-json step.json
    pytest bench/test_micro_bench.py --benchmark-only -k "msam and wrn"
"""

import pytest
import torch

from bench import micro
from bench.models import parameter_shapes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES, _ = micro.cases(DEVICE)
PARAM_SETS = {"wrn-16-4": lambda: parameter_shapes("wrn-16-4"),
              "synthetic-4Mx256": lambda: micro.synthetic_shapes(4 << 20, 256)}


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
@pytest.mark.parametrize("set_name", list(PARAM_SETS))
def test_optimizer_step(benchmark, case, set_name):
    shapes = PARAM_SETS[set_name]()
    params, grads = micro.make_params(shapes, DEVICE, torch.float32)
    for p, g in zip(params, grads):
        p.requires_grad_()
        p.grad = g
    try:
        step = case.make(params)
        micro.call_prepared(step)
    except (RuntimeError, ValueError) as err:  # e.g. a fused torch optimizer this device lacks
        pytest.skip(str(err).splitlines()[0])

    def synchronized_step():
        step()
        micro.synchronize(DEVICE)

    def prepare():  # msam-overlap: the backward that runs the first pass, untimed
        getattr(step, "prepare", lambda: None)()
        micro.synchronize(DEVICE)
        return (), {}

    numel = sum(s.numel() for s in shapes)
    benchmark.extra_info.update(algorithm=case.algorithm, impl=case.impl, numel=numel,
                                num_tensors=len(shapes),
                                minimal_bytes=micro.minimal_bytes(case.algorithm, numel, torch.float32,
                                                                  case.state_fp32))
    benchmark.pedantic(synchronized_step, setup=prepare, rounds=10, warmup_rounds=2)
