"""Save mid-training, resume in a fresh process: the trajectory is bit-identical, or, from
the true weights the checkpoint exported, identical up to re-applying the perturbation."""

import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "checkpoint_worker.py")


def run_worker(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(WORKER)), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, WORKER, *map(str, args)], check=True, env=env)


NAMES = ("MSAM", "AdamWMSAM", "SAM")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    straight, first, resumed, from_true = (tmp / f for f in ("straight.pt", "first.pt", "resumed.pt",
                                                             "from_true.pt"))
    run_worker(",".join(NAMES), 0, 10, straight)
    run_worker(",".join(NAMES), 0, 4, first)
    run_worker(",".join(NAMES), 4, 10, resumed, first)
    run_worker(",".join(NAMES[:2]), 4, 10, from_true, first, "true")
    return [torch.load(f, weights_only=True) for f in (straight, resumed, from_true)]


@pytest.mark.parametrize("name", NAMES)
def test_resume_in_a_fresh_process_is_bit_identical(name, runs):
    a, b = runs[0][name], runs[1][name]
    for part in ("model", "true"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        for key in state_a[i]:
            assert torch.equal(state_a[i][key], state_b[i][key]), (i, key)


@pytest.mark.parametrize("name", NAMES[:2])
def test_resume_in_a_fresh_process_from_the_exported_true_weights(name, runs):
    straight, from_true = runs[0][name], runs[2][name]
    for key, value in straight["true"].items():
        torch.testing.assert_close(from_true["true"][key], value, rtol=1e-5, atol=1e-6)
