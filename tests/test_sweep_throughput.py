"""benchmarks/sweep_throughput.py runs the three ways at a tiny size without MLflow or Optuna and writes
a complete record: structure and arithmetic are checked here, never speed."""

import json
import subprocess
import sys

import pytest

from alexnet.training.perf import training_flops
from conftest import ROOT
from test_benchmarks import no_tracking_libs  # noqa: F401 (a fixture)

SCRIPT = ROOT / "benchmarks" / "sweep_throughput.py"


def bench(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=env)


def test_three_ways_side_by_side_and_a_full_record(tmp_path, no_tracking_libs):  # noqa: F811
    out = tmp_path / "record.json"
    result = bench("--device", "cpu", "--resizes", "67", "--ks", "2", "--steps", "1", "--batch-size", "8",
                   "--test-limit", "8", "--out", out, env=no_tracking_libs)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("device: ") and "MFU against" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("resize"))
    assert [line.split()[:3] for line in lines[header + 1:header + 4]] == [["67", "2", way] for way in ("serial", "workers", "pack")]
    assert lines[header + 1].endswith("1.00x") and lines[-1] == f"record: {out}"

    record = json.loads(out.read_text())
    assert record["kind"] == "packs" and record["device"]["type"] == "cpu" and record["peak"]["tflops"] > 0
    assert record["settings"]["steps"] == 1 and record["settings"]["batch_size"] == 8
    (row,) = record["rows"]
    assert (row["resize"], row["k"], list(row["ways"]), row["skipped"]) == (67, 2, ["serial", "workers", "pack"], {})
    for way, processes in (("serial", 1), ("workers", 2), ("pack", 1)):
        f = row["ways"][way]
        assert f["processes"] == processes and f["trials"] == 2 and f["seconds"] > 0
        assert f["trials_per_hour"] == pytest.approx(2 * 3600 / f["seconds"])
        assert f["examples_per_sec"] == pytest.approx(2 * 8 / f["seconds"])
        assert f["tflops"] == pytest.approx(training_flops(67, 16, 16) / f["seconds"] / 1e12)
        assert f["peak_bytes_per_trial"] == pytest.approx(sum(f["peak_bytes_per_process"]) / 2)
        assert f["x_serial"] == pytest.approx(f["trials_per_hour"] / row["ways"]["serial"]["trials_per_hour"])


def test_a_k_that_does_not_fit_is_skipped_and_said_so(tmp_path):
    result = bench("--device", "cpu", "--resizes", "67", "--ks", "100000", "--ways", "pack", "--out", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert "skipped: pack: 100000 members at resize 67" in result.stdout and "at most" in result.stdout
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["ways"] == {}


def test_bad_flags_are_one_line():
    result = bench("--ks", "2,x")
    assert result.returncode == 2 and result.stderr.strip() == "sweep_throughput: --ks wants comma-separated integers, got '2,x'"
