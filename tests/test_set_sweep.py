"""`alexnet sweep FILE --set-sweep KEY=VALUE`: the sweep file's own keys from the command line, checked as the
file's keys are (an unknown key or a bad value: one line, exit 2, before anything runs)."""

import pytest

from alexnet import UsageError, cli
from alexnet.sweep import dry_run
from alexnet.sweep.spec import load_sweep

from conftest import ROOT

SMOKE = ROOT / "sweeps" / "smoke.toml"


def test_overrides_replace_the_files_keys(home):
    plain = load_sweep(SMOKE)
    sweep = load_sweep(SMOKE, sweep_sets=["grace_seconds=25", "keep_top=1", "n_trials=4", "pruner=none",
                                          "timeout_minutes=2", "enqueue_base=false"])
    assert (sweep.grace_seconds, sweep.keep_top, sweep.n_trials, sweep.pruner) == (25, 1, 4, "none")
    assert sweep.timeout_minutes == 2.0 and sweep.enqueue_base is False
    assert (plain.grace_seconds, plain.keep_top) != (25, 1)  # the file said otherwise
    assert sweep.space == plain.space and sweep.config == plain.config


def test_n_trials_flag_still_wins(home):
    assert load_sweep(SMOKE, n_trials=2, sweep_sets=["n_trials=7"]).n_trials == 2


@pytest.mark.parametrize("item, words", [
    ("bogus=1", "unknown key 'bogus'"),
    ("lr=0.1", "unknown key 'lr' (a config field: use --set)"),
    ("space=1", "unknown key 'space'"),
    ("grace_seconds", "wants KEY=VALUE"),
    ("keep_top=two", "keep_top must be an integer, got 'two'"),
    ("enqueue_base=maybe", "enqueue_base must be true or false"),
    ("keep_top=-1", "keep_top = -1 is not allowed (use >= 0)"),
    ("grace_seconds=5", "grace_seconds = 5 is not allowed (use more than heartbeat_seconds)"),
    ("pruner=sometimes", "pruner = 'sometimes' is not allowed"),
])
def test_bad_overrides_are_refused_in_one_line(home, item, words):
    with pytest.raises(UsageError, match=None) as e:
        load_sweep(SMOKE, sweep_sets=[item])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_command_line_reaches_the_sweep(home, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(dry_run, "dry_run", lambda sweep, workers, quiet: seen.setdefault("sweep", sweep) and 0)
    assert cli.main(["sweep", str(SMOKE), "--dry-run", "--set-sweep", "keep_top=1",
                     "--set-sweep", "grace_seconds=30"]) == 0
    assert (seen["sweep"].keep_top, seen["sweep"].grace_seconds) == (1, 30)

    assert cli.main(["sweep", str(SMOKE), "--set-sweep", "grace=30"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("alexnet sweep: error: sweep: --set-sweep: unknown key 'grace'")
    assert not (home / "mlruns").exists()  # refused before any store was made
