"""Config: the chapter's defaults, TOML files with --set overrides, bad input refused before work."""

import os
import subprocess
import sys

import pytest

from alexnet import UsageError
from alexnet.training.config import Config, load_config, to_toml
from conftest import ROOT, run_cli


def test_defaults_are_the_chapters_values():
    cfg = Config()
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.dropout, cfg.resize) == (128, 0.01, 10, 0.5, 224)
    assert load_config(ROOT / "experiments" / "baseline.toml") == cfg


def test_file_then_set_overrides(tmp_path):
    cfg = load_config(ROOT / "experiments" / "smoke.toml", ["lr=0.05", "resize=96", "channels_last=false"])
    assert (cfg.lr, cfg.resize, cfg.channels_last, cfg.epochs) == (0.05, 96, False, 2)
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg  # the resolved TOML reads back to the same config


def test_an_integer_is_accepted_for_a_float_field(tmp_path):
    (tmp_path / "x.toml").write_text("lr = 1\n")
    assert load_config(tmp_path / "x.toml").lr == 1.0


@pytest.mark.parametrize("sets, words", [
    (["lr=0"], "lr > 0"),
    (["lr=-1"], "lr > 0"),
    (["lr=nan"], "lr > 0"),
    (["dropout=1"], "0 <= dropout < 1"),
    (["dropout=-0.1"], "0 <= dropout < 1"),
    (["batch_size=0"], "batch_size >= 1"),
    (["epochs=0"], "epochs >= 1"),
    (["resize=66"], "67 <= resize"),
    (["device=tpu"], "cuda:N"),
    (["pipeline=turbo"], "fast or book"),
    (["batch_size=1.5"], "batch_size must be an integer"),
    (["compile=maybe"], "compile must be true or false"),
    (["nosuchkey=1"], "unknown key 'nosuchkey'"),
    (["lr"], "--set wants key=value"),
])
def test_bad_values_name_the_key_and_the_allowed_range(sets, words):
    with pytest.raises(UsageError, match=None) as e:
        load_config(None, sets)
    assert words in str(e.value)


def test_bad_toml_files(tmp_path):
    (tmp_path / "unknown.toml").write_text("learning_rate = 0.1\n")
    (tmp_path / "type.toml").write_text('epochs = "ten"\n')
    (tmp_path / "broken.toml").write_text("lr = = 1\n")
    with pytest.raises(UsageError, match="unknown key 'learning_rate'"):
        load_config(tmp_path / "unknown.toml")
    with pytest.raises(UsageError, match="epochs must be an integer"):
        load_config(tmp_path / "type.toml")
    with pytest.raises(UsageError, match="invalid TOML"):
        load_config(tmp_path / "broken.toml")
    with pytest.raises(UsageError, match="no such file"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("args, words", [
    (["experiments/smoke.toml", "--set", "lr=0"], "lr > 0"),
    (["experiments/smoke.toml", "--set", "dropout=1.0"], "0 <= dropout < 1"),
    (["experiments/smoke.toml", "--set", "batch_size=0"], "batch_size >= 1"),
    (["experiments/smoke.toml", "--set", "epochs=0"], "epochs >= 1"),
    (["experiments/smoke.toml", "--set", "resize=32"], "67 <= resize"),
    (["experiments/smoke.toml", "--set", "momentum=0.9"], "unknown key 'momentum'"),
    (["experiments/smoke.toml", "--set", "lr=fast"], "lr must be a number"),
    (["experiments/nope.toml"], "no such file"),
])
def test_cli_exits_2_with_one_line_before_any_work(home, args, words):
    result = run_cli("train", *args, env={"ALEXNET_HOME": str(home)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert not (home / "mlruns").exists()  # refused before the store was even opened


def test_help_is_instant_and_imports_no_framework():
    code = ("import sys; from alexnet.cli import build_parser; build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'mlflow', 'optuna', 'pandas') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    result = run_cli("--help")
    assert result.returncode == 0 and "train" in result.stdout


def test_mlflow_telemetry_is_off_unless_the_user_chose():
    code = "import os, alexnet; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    for given, expected in [(None, "true"), ("false", "false")]:
        run_env = env if given is None else {**env, "MLFLOW_DISABLE_TELEMETRY": given}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env, capture_output=True, text=True)
        assert out.stdout.strip() == expected, out.stderr


@pytest.mark.parametrize("text", ['two\nlines', 'a "quoted" \\ back\\slash', "tab\tand unicode é ✓", "[not] = a table"])
def test_the_written_config_reads_back_whatever_the_strings_hold(tmp_path, text):
    """config.toml is what `--resume` and `reproduce` read: a run name or folder with a newline or quotes
    must survive the round trip (a hand-written writer emitted invalid TOML for a newline)."""
    cfg = Config(run_name=text, data_dir=text)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
