"""The documented command: ``torchrun --nproc_per_node=2 examples/ddp_digits.py`` on 2 CPU processes."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_torchrun_trains_digits_on_two_cpu_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "examples", "ddp_digits.py"), "--epochs", "2",
               "--save", str(tmp_path / "checkpoint")]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    accuracies = [float(a) for a in re.findall(r"test accuracy\s+([\d.]+)%", run.stdout)]
    assert len(accuracies) == 2 and accuracies[-1] > 90, run.stdout  # measured: 97.8%
    assert "ranks bit-identical" in run.stdout
    assert os.listdir(tmp_path / "checkpoint")
