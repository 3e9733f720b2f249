"""A sweep file (`sweeps/*.toml`), read and checked before anything runs: no torch, MLflow or Optuna
is imported here, so `alexnet sweep FILE` answers a bad file at once.

A sweep file names the base experiment, the fields every trial fixes (`[set]`), the search space
(`[space]`: `{low, high, log, step}` or `{choices}` per config field), the trial count and time budget,
the objective and its direction, the sampler, the pruner, retention and the heartbeat. Every value it
can take is checked against the config: a space whose corner makes an invalid config is refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from alexnet import UsageError
from alexnet.training.config import FIELDS, MIN_RESIZE, Config, _f, check_keys, parse_sets, read_toml
from alexnet.home import default_storage
from alexnet.redact import redact

SPEC_ENV = "ALEXNET_SWEEP_SPEC"  # the resolved sweep, as JSON, handed by the launcher to its workers
PARENT_ENV = "ALEXNET_SWEEP_PARENT_PID"  # set by a Ray task: its worker stops once that process is gone


@dataclass(frozen=True)
class Sweep:
    # --- Keys of a sweep file (sweeps/*.toml), besides the tables [space] and [set] ---
    study: str = _f("", "study name (Optuna) and parent run name (MLflow); empty: the file's name")
    base: str = _f("", "experiment file every trial starts from, relative to the sweep file; empty: the defaults")
    n_trials: int = _f(20, "trials to finish in all, across workers and resumes (trials seeded by --warm-start are not "
                           "counted: they are not trained); 0: no count, only the time budget")
    timeout_minutes: float = _f(0.0, "stop starting new trials after this many minutes of this command; 0: none")
    objective: str = _f("val/best_acc", "the per-epoch metric reported to the pruner; its last value is the trial's (never a test/ metric: the test set is for the final figure only)")
    direction: str = _f("maximize", "maximize or minimize the objective")
    cost: str = _f("", "a second objective, minimised: seconds (a trial's training time), flops (FLOPs per trained "
                       "image, 3x the forward pass at its resize) or inverse_throughput (seconds per training "
                       "example); the study then has a Pareto front and cannot prune; empty: none")
    max_epoch_seconds: float = _f(0.0, "a constraint: a trial whose epochs take longer on average is infeasible and "
                                       "never ranked best (one objective, pruning kept); 0: none")
    sampler: str = _f("tpe", "tpe (multivariate, constant liar) or random; both seeded")
    seed: int = _f(0, "sampler seed of the study's first worker; each later worker gets the next one")
    pruner: str = _f("median", "median, hyperband or none; a trial that reaches its last epoch is never pruned")
    pruner_startup_trials: int = _f(5, "median pruner: trials that must finish before any is pruned")
    pruner_warmup_epochs: int = _f(1, "epochs every trial trains before it may be pruned")
    keep_top: int = _f(3, "keep the checkpoints and models of this many best trials (and of a cost-aware sweep's Pareto "
                          "front); params, metrics, plots always stay")
    enqueue_base: bool = _f(True, "run the base experiment's own values as the first trial (the baseline to beat)")
    heartbeat_seconds: int = _f(10, "a running trial writes a heartbeat this often")
    grace_seconds: int = _f(60, "a trial silent this long is failed (its worker died) and retried with the same params")
    max_retry: int = _f(3, "times in a row a trial is retried with the same params when its worker died or a tracking "
                           "server or database refused one of its calls")
    pack: int = _f(1, "trials a worker trains at once as one trial pack (same network and data, their own lr, dropout, "
                      "Optuna trial and MLflow run); 1: one trial at a time")
    # --- Resolved by load_sweep, not keys of the file ---
    space: dict = field(default_factory=dict)   # config field -> {low, high, log, step} or {choices}
    config: dict = field(default_factory=dict)  # the base config every trial starts from, checked
    source: str = ""                            # the sweep file
    storage: str = ""                           # Optuna RDB URL


FILE_KEYS = {f.name for f in dataclasses.fields(Sweep) if "help" in f.metadata}
SPEC_KEYS = ("low", "high", "log", "step", "choices")
SAMPLERS, PRUNERS, DIRECTIONS = ("tpe", "random"), ("median", "hyperband", "none"), ("maximize", "minimize")
# A cost-aware sweep's second objective, always minimised: its name -> what it measures, in words.
COSTS = {"seconds": "training seconds", "flops": "FLOPs per trained image",
         "inverse_throughput": "seconds per training example"}


# The keys of `EpochRecord.metrics()` with a validation split (listed here so that checking a sweep file
# needs no torch; tests/test_sweep.py checks the two agree). A sweep may select on any but the test ones.
OBJECTIVES = ("train/loss", "train/acc", "test/acc", "test/best_acc", "val/acc", "val/best_acc",
              "test/acc_at_best_val", "perf/examples_per_sec", "perf/wall_examples_per_sec", "perf/epoch_seconds")
SWEEP_VAL_SIZE = 5000  # the validation split a sweep holds out unless its base experiment or [set] says otherwise


def load_sweep(path: str | Path, sets: list[str] = (), n_trials: int | None = None,
               storage: str | None = None, pack: int | None = None, sweep_sets: list[str] = ()) -> Sweep:
    """Read and check a sweep file; `--set` fixes config fields for every trial (a searched field
    that is `--set` leaves the search space); `--set-sweep` replaces the file's own keys, checked as
    the file's are."""
    path = Path(path)
    where = f"sweep {path}"
    table = read_toml(path)
    unknown = sorted(set(table) - FILE_KEYS - {"space", "set"})
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(FILE_KEYS))}, [space], [set])")
    table.update(parse_sweep_sets(sweep_sets))
    space, fixed = table.pop("space", {}), table.pop("set", {})
    if not isinstance(space, dict) or not isinstance(fixed, dict):
        raise UsageError(f"{where}: space and set must be tables ([space] / [set])")
    check_keys(fixed, f"{where} [set]")
    both = sorted(set(space) & set(fixed))
    if both:
        raise UsageError(f"{where}: {both[0]!r} is both searched ([space]) and fixed ([set]): keep one")
    for f in dataclasses.fields(Sweep):  # TOML types against the field types
        if f.name in table:
            if f.type == "float" and type(table[f.name]) is int:
                table[f.name] = float(table[f.name])
            elif type(table[f.name]).__name__ != f.type:
                raise UsageError(f"{where}: {f.name} must be {f.type}, got {table[f.name]!r}")
    if table.get("cost") and "pruner" not in table:
        table["pruner"] = "none"  # a multi-objective study cannot prune: a cost alone turns the default off
    sweep = Sweep(**table)
    cli = parse_sets(list(sets))

    # The base config: defaults, the base experiment file, the file's [set], then --set.
    base_file = (path.parent / sweep.base) if sweep.base else None
    values = {}
    if base_file is not None:
        values = read_toml(base_file)
        check_keys(values, str(base_file))
    values.update(fixed)
    values.update(cli)
    values.setdefault("val_size", SWEEP_VAL_SIZE)  # selection needs images the score is not reported on
    try:
        config = Config(**values)
    except UsageError as e:
        raise UsageError(f"{where}: base config: {e}") from None
    for name in cli:
        space.pop(name, None)  # --set fixes a searched field for every trial

    checks = {
        "study": (sweep.study == "" or sweep.study.strip() != "", "a name"),
        "n_trials": (sweep.n_trials >= 0, ">= 0"),
        "timeout_minutes": (sweep.timeout_minutes >= 0, ">= 0"),
        "objective": (sweep.objective in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}"),
        "direction": (sweep.direction in DIRECTIONS, " or ".join(DIRECTIONS)),
        "cost": (sweep.cost in ("", *COSTS), ", ".join(COSTS) + ", or leave it out"),
        "max_epoch_seconds": (sweep.max_epoch_seconds >= 0, ">= 0; 0: no constraint"),
        "sampler": (sweep.sampler in SAMPLERS, " or ".join(SAMPLERS)),
        "pruner": (sweep.pruner in PRUNERS, ", ".join(PRUNERS)),
        "seed": (sweep.seed >= 0, ">= 0"),
        "pruner_startup_trials": (sweep.pruner_startup_trials >= 0, ">= 0"),
        "pruner_warmup_epochs": (sweep.pruner_warmup_epochs >= 0, ">= 0"),
        "keep_top": (sweep.keep_top >= 0, ">= 0"),
        "heartbeat_seconds": (sweep.heartbeat_seconds >= 1, ">= 1"),
        "grace_seconds": (sweep.grace_seconds > sweep.heartbeat_seconds, "more than heartbeat_seconds"),
        "max_retry": (sweep.max_retry >= 0, ">= 0"),
        "pack": (sweep.pack >= 1, ">= 1"),
    }
    for name, (ok, allowed) in checks.items():
        if not ok:
            raise UsageError(f"{where}: {name} = {getattr(sweep, name)!r} is not allowed (use {allowed})")
    check_objective(where, sweep.objective, config)
    if sweep.cost and sweep.pruner != "none":
        raise UsageError(f"{where}: cost = {sweep.cost!r} makes the study multi-objective, and Optuna cannot prune a "
                         f"multi-objective study: set pruner = \"none\", or keep one objective and pruning and bound "
                         f"the cost with a constraint instead (max_epoch_seconds = S)")
    if n_trials is not None:
        if n_trials < 0:
            raise UsageError(f"sweep: --n-trials must be >= 0, got {n_trials}")
        sweep = dataclasses.replace(sweep, n_trials=n_trials)
    if pack is not None:
        if pack < 1:
            raise UsageError(f"sweep: --pack must be >= 1, got {pack}")
        sweep = dataclasses.replace(sweep, pack=pack)
    if sweep.n_trials == 0 and sweep.timeout_minutes == 0:
        raise UsageError(f"{where}: neither n_trials nor timeout_minutes is set: the sweep would never end")

    space = {name: _check_space(where, name, spec, config, sweep.enqueue_base) for name, spec in space.items()}
    if not space:
        raise UsageError(f"{where}: [space] searches nothing: add e.g. lr = {{ low = 0.001, high = 0.1, log = true }}")
    return dataclasses.replace(sweep, study=sweep.study or path.stem, space=space, config=asdict(config),
                               source=str(path), storage=check_storage(storage or default_storage()))


def parse_sweep_sets(items: list[str]) -> dict:
    """`["grace_seconds=20", "keep_top=1"]` -> `{"grace_seconds": 20, "keep_top": 1}`: keys of the sweep file
    (not [space] or [set]: those are config fields, which --set fixes), values in the key's type."""
    words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}
    out = {}
    for item in items:
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise UsageError(f"sweep: --set-sweep wants KEY=VALUE, got {item!r}")
        if key not in FILE_KEYS:
            hint = " (a config field: use --set)" if key in FIELDS else ""
            raise UsageError(f"sweep: --set-sweep: unknown key {key!r}{hint} (known: {', '.join(sorted(FILE_KEYS))})")
        kind = Sweep.__dataclass_fields__[key].type
        try:
            out[key] = {"int": int, "float": float, "str": str,
                        "bool": lambda t: {"true": True, "false": False}[t.lower()]}[kind](text)
        except (ValueError, KeyError):
            raise UsageError(f"sweep: --set-sweep: {key} must be {words[kind]}, got {text!r}") from None
    return out


def check_objective(where: str, objective: str, config: Config) -> None:
    """A sweep selects on validation, or on anything but the test set: a winner picked by its test
    accuracy is optimistically biased, the more so the more trials there are."""
    if objective.startswith("test/"):
        raise UsageError(f"{where}: objective = {objective!r} is a test metric: selecting on the test set biases the "
                         f"winner's score upwards; use val/best_acc (the default) and keep the test set for the end")
    if objective.startswith("val/") and config.val_size == 0:
        raise UsageError(f"{where}: objective = {objective!r} needs a validation split, but val_size = 0: "
                         f"set val_size (e.g. val_size = {SWEEP_VAL_SIZE} in [set])")


# The storages whose workers can share a lock (see alexnet/sweep/study.py), which keeps the trial count
# exact: a SQLite file lives on one machine, and its lock is a file lock beside it.
LOCKABLE = ("sqlite", "postgresql", "mysql")


def check_storage(url: str) -> str:
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme in ("http", "https"):
        raise UsageError(f"sweep: storage {redact(url)} is a web address, not a database URL: the tracking server "
                         f"goes to --tracking-uri; --storage is Optuna's database, e.g. "
                         f"postgresql+psycopg://USER@HOST:PORT/DB or sqlite:////ABS/PATH/optuna.db")
    if "://" not in url:
        raise UsageError(f"sweep: storage {redact(url)} is not a database URL (DIALECT+DRIVER://USER@HOST:PORT/DB): "
                         f"use e.g. postgresql+psycopg://USER@HOST:PORT/DB or sqlite:////ABS/PATH/optuna.db")
    if scheme not in LOCKABLE:
        raise UsageError(f"sweep: storage {redact(url)}: the sweep locks its study across workers to keep the trial "
                         f"count exact, which only {', '.join(LOCKABLE)} storages allow: use e.g. "
                         f"postgresql+psycopg://USER@HOST/DB or sqlite:////ABS/PATH/optuna.db")
    return url


# Fields that decide which images a trial is judged on: searching them would rank trials on different
# validation (or test) sets, and choosing the split is itself a selection on the data.
FIXED_DATA = {"val_size": "the validation split's size decides what trials are compared on",
              "split_seed": "the validation split decides what trials are compared on",
              "test_limit": "the test set is never searched over"}


def _check_space(where: str, name: str, spec, config: Config, enqueue_base: bool) -> dict:
    """One [space] entry, checked: every value it can take must make a valid config."""
    check_keys([name], f"{where} [space]")
    where = f"{where}: space.{name}"
    if name in FIXED_DATA:
        raise UsageError(f"{where}: {FIXED_DATA[name]}: fix it for every trial in [set] instead")
    if not isinstance(spec, dict):
        raise UsageError(f"{where}: want a table like {{ low = 0.001, high = 0.1, log = true }} or {{ choices = [...] }}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (use {', '.join(SPEC_KEYS)})")
    kind = FIELDS[name].type

    def valid(value, what):
        try:
            return getattr(Config(**{**asdict(config), name: value}), name)
        except UsageError as e:
            hint = f" (the network needs resize >= {MIN_RESIZE})" if name == "resize" else ""
            raise UsageError(f"{where}: {what} {value!r}: {str(e).removeprefix('config: ')}{hint}") from None

    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise UsageError(f"{where}: choices = [...] is a non-empty list and goes alone")
        out = {"choices": [valid(v, "choice") for v in spec["choices"]]}
        inside = getattr(config, name) in out["choices"]
    else:
        if kind not in ("int", "float"):
            raise UsageError(f"{where}: {name} is {kind}: search it with choices = [...]")
        if "low" not in spec or "high" not in spec:
            raise UsageError(f"{where}: give low and high (or choices)")
        low, high = valid(spec["low"], "low"), valid(spec["high"], "high")
        if low > high:
            raise UsageError(f"{where}: low {low!r} > high {high!r}")
        log, step = spec.get("log", False), spec.get("step")
        if not isinstance(log, bool):
            raise UsageError(f"{where}: log must be true or false")
        if log and step is not None:
            raise UsageError(f"{where}: log and step cannot go together (Optuna)")
        if step is not None and not (isinstance(step, (int, float)) and step > 0 and (kind == "float" or isinstance(step, int))):
            raise UsageError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}")
        out = {"low": low, "high": high, "log": log, "step": step}
        inside = low <= getattr(config, name) <= high
    if enqueue_base and not inside:
        raise UsageError(f"{where}: the base value {getattr(config, name)!r} is outside the space: "
                         f"widen it, or set enqueue_base = false")
    return out


SPACE_HELP = {
    "[space]": "the search space, one entry per config field: { low, high } (numbers; log = true for a "
               "log scale, step = N for a grid) or { choices = [...] }",
    "[set]": "config fields every trial fixes (as an experiment file's keys)",
}


def describe_keys() -> str:
    """One line per key of a sweep file, from `Sweep`'s documented fields, for `alexnet sweep --help`."""
    fields = [f for f in dataclasses.fields(Sweep) if "help" in f.metadata]
    width = max(len(f.name) for f in fields)
    lines = [f"  {f.name:<{width}}  {json.dumps(f.default):<16} {f.metadata['help']}" for f in fields]
    return "\n".join(lines + [f"  {k:<{width}}  {'':<16} {v}" for k, v in SPACE_HELP.items()])


def describe_space(space: dict) -> str:
    parts = []
    for name, s in space.items():
        if "choices" in s:
            parts.append(f"{name} one of {s['choices']}")
        else:
            kind = "log-uniform" if s["log"] else "uniform"
            parts.append(f"{name} {kind} [{s['low']:g}, {s['high']:g}]" + (f" step {s['step']:g}" if s["step"] else ""))
    return "; ".join(parts)


def format_params(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def directions(sweep: Sweep) -> list[str]:
    """The study's directions: the objective's, then, in a cost-aware sweep, the cost's (minimised)."""
    return [sweep.direction] + (["minimize"] if sweep.cost else [])


def base_params(sweep: Sweep) -> dict:
    return {name: sweep.config[name] for name in sweep.space}
