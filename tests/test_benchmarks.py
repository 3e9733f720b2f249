"""benchmarks/throughput.py runs on the CPU at a tiny size and writes a complete record: structure and
arithmetic are checked here, never speed (timings on a shared CI machine mean nothing)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import pytest
import torch

from alexnet.training.model import flops_per_image
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "throughput.py"
TINY = ["--device", "cpu", "--resize", "67", "--batch-size", "16", "--steps", "2", "--test-limit", "32"]


@pytest.fixture
def no_tracking_libs(tmp_path):
    """A PYTHONPATH where `import mlflow` or `import optuna` fails: the GPU machine has neither."""
    folder = tmp_path / "blocked"
    folder.mkdir()
    for name in ("mlflow", "optuna"):
        (folder / f"{name}.py").write_text(f"raise ImportError('the benchmark must not import {name}')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


def bench(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


def test_throughput_prints_both_pipelines_and_writes_a_full_record(tmp_path, no_tracking_libs):
    out = tmp_path / "record.json"
    result = bench(*TINY, "--rounds", "1", "--out", out, env=no_tracking_libs)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("device: ") and "MFU against" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("pipeline"))
    assert "ex/s (book)" in lines[header] and "MFU" in lines[header] and "x book" in lines[header]
    assert lines[header + 1].split()[:2] == ["book", "fp32"] and lines[header + 2].split()[:2] == ["fast", "fp32"]
    assert lines[-1] == f"record: {out}"

    record = json.loads(out.read_text())
    assert record["kind"] == "throughput" and record["device"]["type"] == "cpu" and record["host"]
    datetime.fromisoformat(record["timestamp"])
    assert record["versions"]["torch"] == torch.__version__ and record["device"]["name"]
    assert record["peak"]["source"] == "measured float32 matmul" and record["peak"]["tflops"] > 0
    s = record["settings"]
    assert (s["resize"], s["batch_size"], s["train_examples_per_epoch"], s["test_examples_per_epoch"]) == (67, 16, 32, 32)
    assert (s["epochs"], s["timed_epochs"]) == (2, 1)
    assert s["forward_gflop_per_image"] == pytest.approx(flops_per_image(67) / 1e9)
    assert list(record["pipelines"]) == ["book", "fast"]

    book, fast = record["pipelines"]["book"], record["pipelines"]["fast"]
    # The book keeps the chapter's path; on the CPU the fast one uses no CUDA-only switch.
    assert book["switches"] == {"precision": "fp32", "channels_last": False, "fused_sgd": False, "cudnn_benchmark": False,
                                "deterministic": False, "compile": False, "eval_batch_size": 16, "sync_each_step": True,
                                "num_workers": 4}
    assert fast["switches"]["precision"] == "fp32" and not fast["switches"]["channels_last"]
    assert not fast["switches"]["fused_sgd"] and not fast["switches"]["sync_each_step"]
    assert fast["switches"]["eval_batch_size"] == 1000 and fast["switches"]["num_workers"] == 0
    forward = flops_per_image(67)
    for p in (book, fast):
        assert [e["epoch"] for e in p["epochs"]] == [1, 2] and p["epochs_timed"] == 1
        assert (p["train_examples"], p["test_examples"]) == (32, 32)
        assert 0 < p["wall_examples_per_sec"] < p["examples_per_sec"]  # evaluation adds to the wall clock only
        assert p["step_seconds"] == pytest.approx(32 / p["epochs"][1]["examples_per_sec"])
        assert p["wall_seconds"] == pytest.approx(p["epochs"][1]["epoch_seconds"])
        assert p["step_tflops"] == pytest.approx(3 * forward * p["examples_per_sec"] / 1e12)
        assert p["wall_tflops"] == pytest.approx((3 * forward * 32 + forward * 32) / p["wall_seconds"] / 1e12)
        assert p["step_mfu"] == pytest.approx(p["step_tflops"] / record["peak"]["tflops"])
    assert record["ratios"]["book"]["wall_examples_per_sec"] == pytest.approx(1.0)
    ratio = record["ratios"]["fast"]["wall_examples_per_sec"]
    assert ratio == pytest.approx(fast["wall_examples_per_sec"] / book["wall_examples_per_sec"])
    assert record["targets"]["fast/book end to end >= 1x"] == {"value": ratio, "limit": 1.0, "met": ratio >= 1.0}


def test_full_mode_records_the_whole_training_of_each_pipeline(tmp_path, no_tracking_libs):
    out = tmp_path / "full.json"
    result = bench(*TINY, "--full", "--epochs", "1", "--out", out, env=no_tracking_libs)
    assert result.returncode == 0, result.stderr
    assert "test acc" in result.stdout and "wall s" in result.stdout
    record = json.loads(out.read_text())
    assert record["kind"] == "full" and record["settings"]["epochs"] == record["settings"]["timed_epochs"] == 1
    for p in record["pipelines"].values():
        full = p["full"]
        assert 0 <= full["test_acc"] <= 1 and full["compile_seconds"] == 0
        # The whole training as a user waits for it: set-up (data, model) on top of the epoch itself.
        assert full["wall_seconds"] >= full["train_eval_seconds"] == pytest.approx(p["wall_seconds"])
        assert full["wall_seconds_excl_compile"] == full["wall_seconds"]


def load_script():
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_pipeline_is_recorded_and_the_others_finish(tmp_path, monkeypatch, capsys):
    """On a borrowed GPU one broken variant (say torch.compile without a C compiler) must not cost
    the figures of the others."""
    throughput = load_script()
    real_train = throughput.train

    def train(cfg, **kwargs):  # a generator, like the real one: it fails at its first epoch
        if cfg.precision == "fp32" and cfg.pipeline == "fast":
            raise RuntimeError("no C compiler")
        yield from real_train(cfg, **kwargs)

    monkeypatch.setattr(throughput, "train", train)
    out = tmp_path / "record.json"
    assert throughput.main([*TINY, "--rounds", "1", "--pipelines", "book,fast-fp32,fast", "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "fast-fp32    FAILED: RuntimeError: no C compiler" in printed
    record = json.loads(out.read_text())
    assert list(record["pipelines"]) == ["book", "fast"] and list(record["ratios"]) == ["book", "fast"]
    assert record["failed"]["fast-fp32"]["error"] == "RuntimeError: no C compiler"


def test_bad_options_are_one_line_and_exit_2_without_a_record(tmp_path, capsys):
    throughput = load_script()
    out = tmp_path / "never.json"
    assert throughput.main(["--device", "cpu", "--pipelines", "book,turbo", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "throughput: unknown pipeline turbo (known: book, fast, fast-compile, fast-fp32)\n"
    assert throughput.main(["--device", "cpu", "--steps", "1000", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("throughput: --steps x --batch-size must be 0 to 60,000")
    assert throughput.main(["--device", "cpu", "--set", "lr=-1", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("throughput: config: lr = -1.0 is out of range")
    assert not out.exists()


@pytest.mark.slow  # about 45 s each on 2 cores: opt-in (scripts/test -m slow), as the benchmarks are
def test_tracking_overhead_breaks_the_cost_down_by_step(tmp_path):
    """benchmarks/tracking_overhead.py --breakdown runs plain, tracked, no-write and metrics-only: the
    same training in each (tracking never touches the math), checkpoints only where they are meant to
    be written, and the per-epoch cost split into its three steps. --steps times the tracked run's steps,
    on the training thread or beside it."""
    out = tmp_path / "tracking.json"
    tiny = ["resize=67", "epochs=2", "train_limit=128", "test_limit=64", "batch_size=32", "eval_batch_size=64"]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tracking_overhead.py"), "--rounds", "1",
                             "--no-warm-up", "--breakdown", "--steps", "--cold", "1", "--keep", "--json", str(out), *[f"--set={s}" for s in tiny]],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("tracked / plain wall time: ") for line in lines)
    for step in ("(tracked - no-write)", "(no-write - metrics-only)", "(metrics-only - plain)"):
        assert sum(step in line for line in lines) == 1, result.stdout
    store = next(line.split(": ", 1)[1] for line in lines if line.startswith("store kept: "))
    for step, thread in [("run creation", "main"), ("the model: build, save, log", "main"),
                         ("checkpoint write and checksum", "beside"), ("learning curves", "beside")]:
        assert any(line.split() and line.strip().startswith(step) and f" {thread} " in line for line in lines), step

    # One full copy of the weights serialized per epoch (last.pt), best.pt only ever linked, the model once.
    copies = next(line for line in lines if line.startswith("  weight copies written per epoch: "))
    assert copies.startswith("  weight copies written per epoch: 1.00 (last.pt)") and copies.endswith("the model 1 time a run")

    assert any(line.startswith("  the epochs after the first (each carries the previous epoch's checkpoint write): ")
               for line in lines)
    # --cold: `alexnet train` and `--no-track` as a user starts them, the difference printed and recorded.
    assert any(re.match(r"  a cold command \(epochs=1 train_limit=256\): alexnet train [0-9.]+ s against --no-track "
                        r"[0-9.]+ s: [+-][0-9.]+ s a command \(target <= \+1 s\), of which [0-9.]+ s is a fresh "
                        r"interpreter importing MLflow and its SQL store, nothing else; [+-][0-9.]+ s beyond that", line)
               for line in lines), result.stdout

    record = json.loads(out.read_text())
    cold = record["cold"]
    assert len(cold["pairs"]) == 1 and cold["tracked_seconds"] > 0 and cold["untracked_seconds"] > 0
    assert cold["difference_seconds"] == pytest.approx(cold["tracked_seconds"] - cold["untracked_seconds"])
    assert 0 < cold["mlflow_import_seconds"] == pytest.approx(cold["pairs"][0]["mlflow_imports"])
    rows = record["rounds"]
    assert [r["kind"] for r in rows] == ["plain", "tracked", "no-write", "metrics-only"]
    assert len({r["test_acc"] for r in rows}) == 1  # one seed, one CPU: the same training in every variant
    assert all(len(r["each_epoch"]) == 2 for r in rows)
    assert set(record["later_epoch_seconds"]) == {"plain", "tracked", "no-write", "metrics-only"}
    assert record["checkpoint_bytes"] > 1e6 and record["config"]["resize"] == 67
    steps = {(r["step"], r["thread"]): r["seconds"] for r in record["steps"]}
    assert steps[("the model: build, save, log", "main")] > 0 and steps[("checkpoint write and checksum", "beside")] > 0

    # The tracked run (and the cold tracked command) wrote checkpoints; the two variants wrote none.
    import shutil

    runs = sorted(Path(store).glob("artifacts/*/artifacts"))
    with_checkpoints = [r for r in runs if (r / "checkpoints" / "last.pt").is_file()]
    assert len(runs) == 4 and len(with_checkpoints) == 2
    shutil.rmtree(Path(store).parent)


@pytest.mark.slow  # about 45 s each on 2 cores: opt-in (scripts/test -m slow), as the benchmarks are
def test_sweep_overhead_compares_a_sweep_with_the_same_trainings_plain(tmp_path):
    """benchmarks/sweep_overhead.py on the CPU, tiny: two trials through `alexnet sweep`, the same two
    trainings plain, a tracked `alexnet train`; every figure in its record, the temporary store gone."""
    out = tmp_path / "sweep.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep_overhead.py"), "--trials", "2",
                             "--set", "train_limit=128", "--set", "epochs=1", "--set", "val_size=100",
                             "--set", "test_limit=100", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "per trial in a warm worker:" in result.stdout and "the sweep's start:" in result.stdout
    record = json.loads(out.read_text())
    assert [r["trial"] for r in record["trials"]] == [0, 1]
    for r in record["trials"]:
        assert r["sweep_cycle_seconds"] > r["sweep_epoch_seconds"] > 0 and r["plain_seconds"] > r["plain_epoch_seconds"] > 0
        assert r["difference_seconds"] == pytest.approx(r["sweep_cycle_seconds"] - r["plain_seconds"])
    assert record["tracked_to_run_seconds"] > 0 and record["sweep_to_first_run_seconds"] > 0 and record["end_seconds"] > 0
    assert not list(Path(tempfile.gettempdir()).glob("alexnet-sweep-bench-*"))


def test_leaderboard_builds_a_store_of_project_shaped_runs_and_times_alexnet_runs(tmp_path):
    out = tmp_path / "board.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "leaderboard.py"), "--runs", "30", "--repeat", "1",
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["runs"] == 30 and sum(record["roles"].values()) == 30 and record["roles"]["parent"] >= 1
    [timing] = record["timings"]
    assert timing["runs"] == 30 and timing["lines"] >= 2 and timing["wall_seconds"] > timing["query_seconds"] > 0
    assert not list(Path(tempfile.gettempdir()).glob("alexnet-leaderboard-bench-*"))
