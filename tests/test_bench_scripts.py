"""bench/micro.py, bench/speed_ratio.py and bench/gpu_suite.sh at tiny sizes: they run, find
every backend at run time, and write the documented JSON and a PNG (no timing asserted)."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import msam_fused
from msam_fused import backends, reference
from bench import micro, provenance, report, speed_ratio

REPO = Path(__file__).resolve().parents[1]
TINY_MICRO = ["--param-sets", "none", "--sweep-totals", "4K", "--sweep-tensors", "1,3",
              "--warmup", "1", "--repeats", "3", "--threads", "1"]
TINY_SPEED = ["--model", "wrn-10-1", "--image-size", "8", "--batch-size", "4", "--rounds", "2",
              "--steps", "1", "--warmup", "1", "--threads", "1"]


@pytest.fixture
def fake_backend(monkeypatch):
    """A backend that appears after the benchmarks were written: the reference under a new name."""
    fake = types.ModuleType("fake")
    fake.__dict__.update({k: v for k, v in vars(reference).items() if not k.startswith("__")})
    fake.name = "fake"
    monkeypatch.setattr(backends, "BACKEND_NAMES", (*backends.BACKEND_NAMES, "fake"))
    monkeypatch.setitem(backends._LOADERS, "fake", lambda device: fake)
    return "fake"


def available_here():
    return {name for name, reason in msam_fused.available_backends("cpu").items() if reason is None}


def test_micro_times_every_available_backend_and_writes_json_and_png(tmp_path, fake_backend):
    out = tmp_path / "micro.json"
    micro.main(TINY_MICRO + ["--out", str(out)])
    result = json.loads(out.read_text())
    assert result["schema"] == "msam-fused/micro/1"
    assert {"date", "device", "versions", "config", "copy_bandwidth_gbps", "results"} <= set(result)
    assert result["versions"]["torch"] == torch.__version__
    rows = [r for r in result["results"] if "time_s" in r]
    for algorithm in ("msam", "adamw-msam", "sam-perturb-restore"):
        assert {r["impl"] for r in rows if r["algorithm"] == algorithm} == available_here() | {fake_backend}
    assert {r["impl"] for r in result["results"] if r["algorithm"] == "sgd"} == \
        {"torch-for-loop", "torch-foreach", "torch-fused"}
    for r in rows:
        assert r["time_s"]["min"] <= r["time_s"]["median"] <= r["time_s"]["max"]
        assert r["gbps"] > 0 and r["copy_fraction"] > 0 and r["launches_per_step"] >= 1
        assert r["param_set"] in ("synthetic-4Kx1", "synthetic-4Kx3")
    # The per-tensor reference dispatches more ops for more tensors; torch's fused SGD does not.
    launches = {(r["algorithm"], r["impl"], r["num_tensors"]): r["launches_per_step"] for r in rows}
    assert launches[("msam", "reference", 3)] > launches[("msam", "reference", 1)]
    assert launches[("sgd", "torch-fused", 3)] == launches[("sgd", "torch-fused", 1)]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    table = report.main([str(out)])
    assert "| msam[reference] |" in table and "synthetic-4Kx3" in table


def test_micro_skips_a_model_set_it_cannot_build(tmp_path, monkeypatch):
    def no_torchvision(name):
        raise RuntimeError("this model needs torchvision, which is not installed")

    monkeypatch.setattr(micro, "parameter_shapes", no_torchvision)
    argv = TINY_MICRO[2:] + ["--param-sets", "resnet50", "--only", "sgd[torch-fused]", "--no-profile"]
    result = micro.main(argv + ["--out", str(tmp_path / "m.json")])
    assert "needs torchvision" in result["skipped_param_sets"]["resnet50"]
    assert {r["param_set"] for r in result["results"]} == {"synthetic-4Kx1", "synthetic-4Kx3"}


def test_minimal_bytes_follow_the_documented_passes():
    n = 1000
    assert micro.minimal_bytes("sgd", n, torch.float32, False) == 5 * 4 * n
    assert micro.minimal_bytes("msam", n, torch.float32, True) == 8 * 4 * n
    # bf16 parameters and gradients with fp32 state: 4 p + 1 g passes of 2 bytes, 3 of 4 bytes.
    assert micro.minimal_bytes("msam", n, torch.bfloat16, True) == (5 * 2 + 3 * 4) * n
    shapes = micro.synthetic_shapes(10_000, 7)
    assert len(shapes) == 7 and sum(s.numel() for s in shapes) == 10_000


def test_speed_ratio_runs_each_backend_and_reports_state_memory(tmp_path, fake_backend):
    out = tmp_path / "sr.json"
    result = speed_ratio.main(TINY_SPEED + ["--out", str(out)])
    assert json.loads(out.read_text())["schema"] == "msam-fused/speed-ratio/1"
    rows = result["results"]
    labels = {f"{o}[{b}]" for o in ("sam", "msam") for b in available_here() | {fake_backend}}
    assert labels | {"sgd[fused]", "nag[fused]"} == set(rows)
    assert rows["sgd[fused]"]["ratio"] == 1.0
    for label, row in rows.items():
        assert row["images_per_s"] > 0 and row["memory_kind"] == "optimizer_state_bytes"
        # MSAM keeps one momentum per parameter, as SGD does; SAM adds a copy of the weights.
        expected = 2.0 if label.startswith("sam") else 1.0
        assert row["memory_ratio"] == pytest.approx(expected, rel=1e-3)
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| sgd[fused] |" in report.main([str(out)])


def test_speed_ratio_adamw_family_is_compared_with_adamw(tmp_path):
    result = speed_ratio.main(TINY_SPEED + ["--optimizers", "adamw,sam-adamw,adamw-msam",
                                            "--backends", "reference", "--out", str(tmp_path / "a.json")])
    rows = result["results"]
    assert {r["base"] for r in rows.values()} == {"adamw"}
    assert rows["adamw-msam[reference]"]["memory_ratio"] == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["--model", "wrn-12-2"], "depth must be 6n+4"),
    (["--optimizers", "sgd,adam"], "unknown optimizer 'adam'"),
    (["--rounds", "-1"], "--rounds must be positive"),
    (TINY_SPEED + ["--backends", "cuda", "--device", "cpu"], "--backends: backend 'cuda'"),
])
def test_speed_ratio_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        speed_ratio.main(argv)
    assert message in capsys.readouterr().err


def test_micro_bad_flags(capsys):
    with pytest.raises(SystemExit):
        micro.main(["--param-sets", "alexnet"])
    assert "unknown set 'alexnet'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        micro.main(["--sweep-totals", "12Q"])
    assert "not a positive size" in capsys.readouterr().err


def test_gpu_suite_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_suite.sh")], check=True)


@pytest.mark.slow
def test_gpu_suite_steps_run_on_cpu(tmp_path):
    """The suite's benchmark steps (torchrun included) on the CPU, at tiny sizes."""
    env = {**os.environ, "OUT": str(tmp_path), "SUITE_DEVICE": "cpu", "SUITE_PYTHON": sys.executable,
           "SUITE_STEPS": "micro,speed,torchrun", "SUITE_MICRO_ARGS": " ".join(TINY_MICRO),
           "SUITE_SPEED_ARGS": " ".join(TINY_SPEED), "SUITE_TORCHRUN_ARGS": " ".join(TINY_SPEED),
           "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh")], env=env, check=True,
                   capture_output=True, timeout=600)
    summary = json.loads((tmp_path / "suite.json").read_text())
    assert [(s["name"], s["rc"]) for s in summary["steps"]] == [("micro", 0), ("speed", 0), ("torchrun", 0)]
    assert {p.name for p in tmp_path.iterdir()} == {"suite.log", "suite.json", "micro.json", "micro.png",
                                                    "speed-ratio-wrn.json", "speed-ratio-wrn.png"}
    assert "sgd[fused]" in (tmp_path / "suite.log").read_text()


@pytest.mark.gpu
def test_micro_and_speed_ratio_on_cuda(tmp_path):
    """The CUDA paths: device timers, kernel counts from the profiler, peak memory."""
    result = micro.main(TINY_MICRO[:-2] + ["--device", "cuda", "--out", str(tmp_path / "m.json")])
    rows = [r for r in result["results"] if "time_s" in r]
    assert {r["timer"] for r in rows} <= {"triton.testing.do_bench", "cuda events"}
    fused = [r for r in rows if r["impl"] == "torch-fused" and r["algorithm"] == "sgd"]
    assert fused and all(r["launches_per_step"] >= 1 for r in fused)
    assert "cuda" in {r["impl"] for r in rows if r["algorithm"] == "msam"} | set(result["unavailable_backends"])
    result = speed_ratio.main(TINY_SPEED[:-2] + ["--device", "cuda", "--out", str(tmp_path / "s.json")])
    for row in result["results"].values():
        assert row["memory_kind"] == "peak_memory_bytes" and row["peak_memory_bytes"] > 0


def test_overlapped_msam_reports_exposed_and_hidden_time(tmp_path):
    needs = "cpu" if "cpu" in available_here() else "reference"
    result = micro.main(TINY_MICRO + ["--only", f"msam-overlap[{needs}]", "--no-profile",
                                      "--out", str(tmp_path / "m.json")])
    rows = [r for r in result["results"] if "time_s" in r]
    assert rows and all(r["algorithm"] == "msam-overlap" for r in rows)
    for r in rows:
        assert r["backward_with_pass_s"]["median"] > 0 and isinstance(r["hidden_s"], float)
    assert micro.minimal_bytes("msam-overlap", 10, torch.float32, True) == 4 * 4 * 10
    speed = speed_ratio.main(TINY_SPEED + ["--optimizers", "sgd,sam,msam-overlap", "--backends", needs,
                                           "--out", str(tmp_path / "s.json")])["results"]
    assert speed[f"msam-overlap[{needs}]"]["exposed_step_s"]["median"] > 0
    assert speed["sgd[fused]"]["exposed_step_s"]["median"] > 0
    assert speed[f"sam[{needs}]"]["exposed_step_s"] is None  # two backward passes: no such time
    assert "| msam-overlap" in report.main([str(tmp_path / "s.json")])


def test_overlapped_msam_refuses_gradient_clipping():
    from bench.optimizers import Hyper, StepConfig, build_optimizer, overlap_backward

    model = torch.nn.Linear(3, 2)
    opt = build_optimizer("msam-overlap", model, Hyper(), backend="reference")
    with pytest.raises(ValueError, match="cannot be clipped"):
        overlap_backward("msam-overlap", opt, model, StepConfig(clip_grad=1.0))


def test_micro_on_a_cpu_prints_no_profiler_noise(tmp_path):
    """The profiler's log lines (kineto's USDT lines, its GPU probe's error) stay out of the output."""
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "micro.py"), *TINY_MICRO, "--only", "msam",
                           "--device", "cpu", "--out", str(tmp_path / "m.json")],
                          env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert json.loads((tmp_path / "m.json").read_text())["results"][0]["launches_per_step"] > 0
    assert "USDT" not in output and "gpuGetDeviceCount" not in output, output[-3000:]


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs a git checkout")
def test_default_outputs_go_under_runs_which_git_ignores():
    assert provenance.RUNS == REPO / "runs"
    assert subprocess.run(["git", "check-ignore", "-q", str(provenance.RUNS / "micro.json")], cwd=REPO).returncode == 0
