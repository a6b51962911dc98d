"""bench/train.py at tiny sizes: accuracy, outputs, bad flags, and exact resumption."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import checkpoint, train

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--threads", "1", "--no-progress"]
TRAJECTORY_FIELDS = ("epoch", "steps", "lr", "rho", "train_loss", "train_acc", "test_loss", "test_acc")


def test_digits_msam_reaches_95_percent_on_unperturbed_weights():
    results = train.main(["--data", "digits", "--optimizer", "msam", *QUIET])
    assert results["msam"]["test_acc"] >= 0.95


def test_compare_prints_the_table_and_writes_logs_and_plots(tmp_path, capsys):
    results = train.main(["--data", "digits", "--compare", "sgd,sam,msam", "--epochs", "1",
                          "--out-dir", str(tmp_path), *QUIET])
    table = capsys.readouterr().out
    for name in ("sgd", "sam", "msam"):
        assert f"\n{name} " in table
        log = json.loads((tmp_path / name / "log.json").read_text())
        assert log["optimizer"] == name and len(log["epochs"]) == 1
        assert (tmp_path / name / "curves.png").stat().st_size > 0
        assert results[name]["images_per_s"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"sgd", "sam", "msam"}
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_tiny_wide_resnet_on_synthetic_data_with_amp_and_channels_last():
    results = train.main(["--data", "synthetic", "--model", "wrn-10-1", "--image-size", "16",
                          "--num-classes", "5", "--batch-size", "8", "--synthetic-steps", "2",
                          "--epochs", "1", "--compare", "nag,sam-adamw,adamw-msam", "--amp", "bf16",
                          "--channels-last", *QUIET])
    assert all(0 <= r["test_acc"] <= 1 for r in results.values())


def test_rho_schedule_sets_rho_step_by_step():
    """warmup_zero over the first epoch: rho is 0 through it and MSAM's rho from then on."""
    results = train.main(["--data", "digits", "--optimizer", "msam", "--epochs", "2", "--batch-size",
                          "256", "--rho-schedule", "warmup_zero", "--rho-schedule-epochs", "1.4",
                          "--msam-rho", "0.5", *QUIET])
    assert [h["rho"] for h in results["msam"]["history"]] == [0.0, 0.5]


def test_variants_train_through_their_own_steps():
    """The paper's baselines and the SAM/MSAM variants of msam_fused.variants, one epoch each."""
    tiny = ["--data", "digits", "--epochs", "1", "--batch-size", "256", *QUIET]
    results = train.main(tiny + ["--compare", "looksam,esam,mesa", "--looksam-k", "2"])
    results.update(train.main(tiny + ["--compare", "sam,sam-adamw", "--ascent-steps", "2",
                                      "--ascent-norm", "linf"]))
    results.update(train.main(tiny + ["--optimizer", "msam", "--perturb", "norm", "--adaptive",
                                      "weights"]))
    assert set(results) == {"looksam", "esam", "mesa", "sam", "sam-adamw", "msam"}
    for r in results.values():
        assert 0 < r["test_acc"] <= 1 and r["history"][0]["train_acc"] > 0


def test_a_line_per_epoch_when_stdout_is_not_a_terminal(capsys):
    train.main(["--data", "digits", "--optimizer", "msam", "--epochs", "2", "--batch-size", "256", *QUIET])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2
    for epoch, line in enumerate(lines, 1):
        assert re.fullmatch(rf"epoch {epoch}/2 msam: train loss \d+\.\d{{4}} acc \d+\.\d\d%, test loss "
                            r"\d+\.\d{4} acc \d+\.\d\d%, \d+ images/s, \d+\.\d s", line), line


def test_compare_times_torchs_fused_baselines_with_each_familys_recipe(tmp_path):
    results = train.main(["--data", "digits", "--compare", "sgd,adamw,sam", "--out-dir", str(tmp_path),
                          *QUIET])
    flags = {name: json.loads((tmp_path / name / "log.json").read_text())["flags"] for name in results}
    assert results["sgd"]["backend"] == results["adamw"]["backend"] == "fused"
    assert flags["sam"]["torch_impl"] == "fused"  # SAM's base optimizer too
    for family, names in (("sgd", ("sgd", "sam")), ("adamw", ("adamw",))):
        for name in names:
            assert {k: flags[name][k] for k in train.RECIPE_FLAGS} == train.FAMILY_RECIPES[family]
    # each family at its own recipe learns the digits
    assert min(r["test_acc"] for r in results.values()) >= 0.95


@pytest.mark.parametrize("argv, recipes", [
    (["--compare", "sgd,adamw", "--lr", "0.01"], {"sgd": (0.01, 5e-4), "adamw": (0.01, 0.05)}),
    (["--compare", "sgd,adamw", "--wd", "0"], {"sgd": (0.05, 0.0), "adamw": (1e-3, 0.0)}),
    # a preset's lr and weight decay are its own optimizer's family's
    (["--preset", "imagenet-vit-s32", "--compare", "msam,adamw-msam"], {"msam": (0.05, 5e-4),
                                                                        "adamw-msam": (1e-3, 0.1)}),
    (["--preset", "cifar100-wrn28-10", "--compare", "sam,adamw"], {"sam": (0.5, 5e-4), "adamw": (1e-3, 0.05)}),
])
def test_recipe_flags_override_every_family_and_presets_set_their_own(argv, recipes):
    args = train.resolve_flags(train.build_parser().parse_args(argv))
    assert {name: (r["lr"], r["weight_decay"]) for name, r in args.recipes.items()} == recipes


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "sgd", "--perturb", "norm"], "sgd does not perturb the weights"),
    (["--optimizer", "esam", "--clip-grad", "1"], "without GradScaler, gradient clipping or DDP"),
    (["--optimizer", "sam-nag", "--adaptive", "all"], "the variant options"),
    (["--optimizer", "adam"], "invalid choice: 'adam'"),
    (["--compare", "sgd,lion"], "unknown optimizer 'lion'"),
    (["--compare", "sgd,sgd"], "lists an optimizer twice"),
    (["--model", "wrn-11-2"], "depth must be 6n+4"),
    (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in"),
    (["--rho-schedule", "cosine"], "needs --rho-schedule-epochs > 0"),
    (["--data", "cifar100"], "--data cifar100 needs --data-dir"),
    (["--data", "cifar10", "--data-dir", "/no/such/dir"], "does not exist"),
    (["--data", "imagenet", "--data-dir", "."], "train is not a directory"),
    (["--resume", "/no/such/checkpoint.pt"], "no checkpoint file"),
    (["--resume"], "needs --out-dir"),
    (["--batch-size", "5000"], "larger than the 1437 training images"),
    (["--backend", "cuda", "--optimizer", "msam", "--device", "cpu"], "backend 'cuda'"),
])
def test_bad_flags_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv + ["--epochs", "1"] * ("--epochs" not in argv) + QUIET)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_empty_cifar_dir_says_what_is_expected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--data", "cifar10", "--data-dir", str(tmp_path), *QUIET])
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "never downloads" in err


def test_fake_cifar_and_image_folder_train_end_to_end(tmp_path):
    from test_bench_data import write_fake_cifar, write_image_folder

    write_fake_cifar(tmp_path / "c100", "cifar100", per_file=16)
    r = train.main(["--data", "cifar100", "--data-dir", str(tmp_path / "c100"), "--model", "wrn-10-1",
                    "--batch-size", "8", "--epochs", "1", "--optimizer", "msam", *QUIET])
    assert r["msam"]["history"][0]["steps"] == 2
    pytest.importorskip("torchvision")
    write_image_folder(tmp_path / "inet")
    r = train.main(["--data", "imagenet", "--data-dir", str(tmp_path / "inet"), "--model", "wrn-10-1",
                    "--image-size", "16", "--workers", "0", "--batch-size", "3", "--epochs", "1",
                    "--optimizer", "sam", *QUIET])
    assert r["sam"]["history"][0]["steps"] == 3


# ------------------------------------------------------------------------------- resume
def assert_same(a, b, where="checkpoint"):
    """Equal bit for bit: tensors with torch.equal, containers recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(dir_a: Path, dir_b: Path) -> None:
    a = checkpoint.load(dir_a / "checkpoint.pt", "cpu")
    b = checkpoint.load(dir_b / "checkpoint.pt", "cpu")
    for key in ("model", "optimizer", "scheduler", "scaler", "position", "epoch_sums", "flags"):
        assert_same(a[key], b[key], key)
    trajectory = [[{k: h[k] for k in TRAJECTORY_FIELDS} for h in c["history"]] for c in (a, b)]
    assert trajectory[0] == trajectory[1]


@pytest.mark.parametrize("recipe", [
    ["--optimizer", "msam"],
    ["--optimizer", "sam", "--amp", "bf16", "--label-smoothing", "0.1"],
    # fp16 convolutions are very slow on CPU: tiny synthetic images keep this one quick.
    ["--optimizer", "adamw-msam", "--lr", "3e-3", "--amp", "fp16", "--clip-grad", "1.0",
     "--warmup-epochs", "0.5", "--rho-schedule", "warmup_zero", "--rho-schedule-epochs", "1",
     "--data", "synthetic", "--image-size",
     "4", "--synthetic-steps", "6", "--batch-size", "8", "--model", "digits-cnn"],
], ids=["msam", "sam-bf16", "adamw-msam-fp16-clip-warmup"])
def test_resume_mid_epoch_continues_exactly(tmp_path, monkeypatch, recipe):
    common = ["--data", "digits", "--epochs", "2", "--batch-size", "256", "--deterministic", *QUIET,
              *recipe]  # later flags win
    train.main(common + ["--out-dir", str(tmp_path / "straight")])

    real_save = train.Run.save

    def save_then_die(run):
        real_save(run)
        if (run.epoch, run.step) == (1, 4):  # die mid-way through the second epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Run, "save", save_then_die)
    interrupted = common + ["--out-dir", str(tmp_path / "resumed"), "--checkpoint-every", "4"]
    with pytest.raises(KeyboardInterrupt):
        train.main(interrupted)
    monkeypatch.setattr(train.Run, "save", real_save)
    state = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt", "cpu")
    assert state["position"] == {"epoch": 1, "step": 4}
    train.main(interrupted + ["--resume"])
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, capsys):
    base = ["--data", "digits", "--epochs", "1", "--batch-size", "256", "--out-dir", str(tmp_path), *QUIET]
    train.main(base + ["--optimizer", "msam"])
    with pytest.raises(SystemExit):
        train.main(base + ["--optimizer", "msam", "--msam-rho", "0.5", "--resume"])
    assert "msam_rho: 0.3 in the checkpoint, 0.5 now" in capsys.readouterr().err


def test_a_finished_run_extends_with_more_epochs(tmp_path, capsys):
    common = ["--data", "digits", "--optimizer", "msam", "--batch-size", "256", "--schedule", "constant",
              "--deterministic", *QUIET]
    train.main(common + ["--epochs", "2", "--out-dir", str(tmp_path / "straight")])
    train.main(common + ["--epochs", "1", "--out-dir", str(tmp_path / "extended")])
    train.main(common + ["--epochs", "2", "--out-dir", str(tmp_path / "extended"), "--resume"])
    assert "extending the finished run from 1 to 2 epochs" in capsys.readouterr().err
    # a constant LR makes the extended run the two-epoch run (the flags now say 2 epochs too)
    assert_same_run(tmp_path / "straight", tmp_path / "extended")


def test_only_a_finished_run_extends_and_only_in_epochs(tmp_path, capsys):
    common = ["--data", "digits", "--optimizer", "msam", "--batch-size", "256", *QUIET]
    train.main(common + ["--epochs", "2", "--out-dir", str(tmp_path)])
    refused = {"--msam-rho": (["--epochs", "3", "--msam-rho", "0.5"], "msam_rho: 0.3 in the checkpoint, 0.5 now"),
               "fewer epochs": (["--epochs", "1"], "epochs: 2 in the checkpoint, 1 now")}
    for argv, message in refused.values():
        with pytest.raises(SystemExit):
            train.main(common + argv + ["--out-dir", str(tmp_path), "--resume"])
        assert message in capsys.readouterr().err
    path = tmp_path / "checkpoint.pt"
    state = checkpoint.load(path, "cpu")
    checkpoint.save({**state, "position": {"epoch": 1, "step": 2}}, path)  # as if killed mid-run
    with pytest.raises(SystemExit):
        train.main(common + ["--epochs", "3", "--out-dir", str(tmp_path), "--resume"])
    assert "epochs: 2 in the checkpoint, 3 now" in capsys.readouterr().err


def test_temporary_files_of_killed_writers_are_removed_at_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    orphan = tmp_path / f".checkpoint.pt.tmp-{dead.stdout.strip()}"
    live = tmp_path / f".checkpoint.pt.tmp-{os.getppid()}"  # a writer still at work
    other = tmp_path / ".log.json.tmp-1"  # another file's
    for f in (orphan, live, other):
        f.write_bytes(b"partial")
    checkpoint.save({"step": 1}, tmp_path / "checkpoint.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint.pt", live.name, other.name])


def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save({"step": 1}, path)

    def dies_halfway(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_atomic(path, dies_halfway)
    assert checkpoint.load(path, "cpu") == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.slow
def test_resume_after_the_process_is_killed_matches_an_uninterrupted_run(tmp_path):
    """A subprocess checkpointing every step is SIGKILLed mid-run (possibly while saving),
    then resumed; its final state equals a run that was never stopped, bit for bit."""
    cmd = [sys.executable, str(REPO / "bench" / "train.py"), "--data", "digits", "--optimizer", "msam",
           "--epochs", "3", "--batch-size", "64", "--checkpoint-every", "1", "--deterministic", *QUIET]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd + ["--out-dir", str(tmp_path / "straight")], check=True, env=env,
                   capture_output=True)

    victim = subprocess.Popen(cmd + ["--out-dir", str(tmp_path / "killed")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # let it train (and save) a few more steps
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    position = checkpoint.load(ckpt, "cpu")["position"]
    assert position["epoch"] < 3

    subprocess.run(cmd + ["--out-dir", str(tmp_path / "killed"), "--resume"], check=True, env=env,
                   capture_output=True)
    assert_same_run(tmp_path / "straight", tmp_path / "killed")


@pytest.mark.slow
def test_torchrun_trains_digits_on_two_cpu_processes(tmp_path):
    """DDP over gloo: SAM with a per-rank ascent (no_sync) and MSAM, one table from rank 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "bench" / "train.py"), "--data", "digits", "--compare", "sam,msam",
           "--epochs", "2", "--out-dir", str(tmp_path), *QUIET]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("sam ", "msam "))]
    assert len(rows) == 2
    log = json.loads((tmp_path / "msam" / "log.json").read_text())
    assert log["flags"]["world_size"] == 2 and log["epochs"][-1]["test_acc"] > 0.9
