"""alexnet/compat.py: the one module that reaches past MLflow's and Optuna's public API. Each use it makes
is checked against the installed libraries here, failing with "MLflow X.Y changed NAME: ..." when one
moved; and no other module of the project may use a private name of either library."""

import ast
import importlib.util
import math
import time
import tomllib
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from packaging.specifiers import SpecifierSet

from alexnet import compat

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alexnet"


def changed(name: str, error: BaseException | str) -> str:
    return f"MLflow {mlflow.__version__} changed {name}: {error} (alexnet/compat.py uses it; see its docstring)"


# --- No private name outside alexnet/compat.py ---

NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}  # documented, underscored to avoid field names
STDLIB_PRIVATE_OK = {("os", "_exit")}  # documented: exit without cleanup (a worker's last resort)
LIBRARIES = ("mlflow", "optuna")


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def internal(module: str) -> bool:
    """A module of MLflow or Optuna that is not on compat's list of documented ones."""
    return module.split(".")[0] in LIBRARIES and module not in compat.PUBLIC_MODULES


def dotted(node: ast.AST) -> list[str] | None:
    """`mlflow.store.x` -> ["mlflow", "store", "x"]; None for anything but a chain of names."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def offences(path: Path, root: Path = ROOT) -> list[str]:
    """Each private use in one file, as 'file:line: what'."""
    found = []
    where = f"{path.relative_to(root)}"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno}: imports internal module {a.name}" for a in node.names
                      if internal(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if internal(node.module):
                found.append(f"{where}:{node.lineno}: imports from internal module {node.module}")
            elif node.module.split(".")[0] in LIBRARIES:
                found += [f"{where}:{node.lineno}: imports private name {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute):
            chain = dotted(node)
            if chain and chain[0] in LIBRARIES and len(chain) > 1:
                # the longest module prefix of `mlflow.a.b.c` must be a documented one
                for i in range(2, len(chain) + 1):
                    name = ".".join(chain[:i])
                    if not is_module(name):
                        break
                    if internal(name):
                        found.append(f"{where}:{node.lineno}: uses internal module {name}")
                        break
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            base = node.value.id if isinstance(node.value, ast.Name) else None
            if private and base not in ("self", "cls") and node.attr not in NAMEDTUPLE_API \
                    and (base, node.attr) not in STDLIB_PRIVATE_OK:
                found.append(f"{where}:{node.lineno}: uses private attribute .{node.attr}")
    return sorted(set(found), key=lambda s: (s.split(":")[0], int(s.split(":")[1])))


def test_no_private_library_name_outside_compat():
    """An underscore attribute (`x._storage`), a private import (`from mlflow.x import _y`) or an internal
    module of MLflow or Optuna (`mlflow.store`, `mlflow.utils`, `optuna.storages._rdb` ...) anywhere in
    alexnet/ but compat.py fails this test, each by file and line."""
    found = [o for path in sorted(PACKAGE.rglob("*.py")) if path != PACKAGE / "compat.py" for o in offences(path)]
    assert not found, ("private MLflow/Optuna names outside alexnet/compat.py (move each there, with a test in "
                       "tests/test_compat.py, or use the public API):\n  " + "\n  ".join(found))


def test_the_scan_finds_each_kind_of_private_use(tmp_path):
    """The scan itself can fail: each kind of private use in a file is reported by line."""
    sample = tmp_path / "sample.py"
    sample.write_text("import mlflow\nimport mlflow.store.tracking\nfrom mlflow.utils import x\n"
                      "from optuna.trial import _private\nstudy._storage.get_trial(1)\nmlflow.utils.y()\n"
                      "self._ok\nparts._replace(a=1)\nimport optuna.trial\nmlflow.pytorch.log_model\n")
    found = offences(sample, tmp_path)
    assert [int(o.split(":")[1]) for o in found] == [2, 3, 4, 5, 6], found


# --- The versions ---

def test_the_supported_ranges_are_the_declared_ones_and_hold_the_installed_versions():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"mlflow{compat.MLFLOW_SUPPORTED}" in declared and f"optuna{compat.OPTUNA_SUPPORTED}" in declared, declared
    assert mlflow.__version__ in SpecifierSet(compat.MLFLOW_SUPPORTED), mlflow.__version__
    assert optuna.__version__ in SpecifierSet(compat.OPTUNA_SUPPORTED), optuna.__version__


# --- Each use ---

@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, exp


def test_dataset_context_tag_is_mlflows():
    try:
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
    except ImportError as e:
        pytest.fail(changed("mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT", e))
    assert compat.DATASET_CONTEXT == MLFLOW_DATASET_CONTEXT, changed("MLFLOW_DATASET_CONTEXT", MLFLOW_DATASET_CONTEXT)


def test_sql_fast_path_matches_search_runs_row_for_row(store):
    """The leaderboard's own query gives what `mlflow.search_runs` gives for the same runs: ids, order
    (newest first), status, times, params, tags, the LATEST value of each metric (NaN as missing), every
    status, and no deleted run."""
    uri, client, exp = store
    other = client.create_experiment("other")
    t0 = 1_700_000_000_000
    ids = []
    for i, status in enumerate(["FINISHED", "FAILED", "KILLED", "RUNNING", "FINISHED", "FINISHED"]):
        run = client.create_run(other if i == 5 else exp, start_time=t0 + 1000 * i, run_name=f"r{i}")
        rid = run.info.run_id
        params = [Param("lr", str(0.1 * (i + 1)))] + ([Param("resize", "67")] if i % 2 else [])
        tags = [RunTag("sweep.study", "s" if i < 3 else "t")] + ([RunTag("host", "h")] if i == 1 else [])
        metrics = [Metric("val/best_acc", 0.1 * i + s / 100, t0 + 1000 * i + s, s) for s in range(3)]
        metrics += [Metric("test/acc", math.nan if i == 2 else 0.5, t0, 0)]
        client.log_batch(rid, metrics=metrics, params=params, tags=tags)
        if status != "RUNNING":
            client.set_terminated(rid, status, end_time=t0 + 1000 * i + 500)
        ids.append(rid)
    client.delete_run(ids[4])

    keys = dict(params=["lr", "resize", "absent"], tags=["sweep.study", "host"], metrics=["val/best_acc", "test/acc"])
    try:
        ours = compat.sql_runs(uri, [exp], **keys)
        every = compat.sql_runs(uri, None, **keys)
        experiments = compat.sql_experiments(uri)
    except Exception as e:
        pytest.fail(changed("mlflow.store.tracking.dbmodels.models (the SQL store's table models)", repr(e)))
    mlflow.set_tracking_uri(uri)
    try:
        theirs = mlflow.search_runs([exp])
    finally:
        mlflow.set_tracking_uri(None)

    assert experiments == {e.name: e.experiment_id for e in client.search_experiments()}
    assert sorted(every["run_id"]) == sorted(set(ids) - {ids[4]})
    assert list(ours["run_id"]) == list(theirs["run_id"]) == [ids[3], ids[2], ids[1], ids[0]]
    columns = ["run_id", "experiment_id", "status", "start_time", "end_time", "tags.mlflow.runName",
               *(f"params.{k}" for k in keys["params"]), *(f"tags.{k}" for k in keys["tags"]),
               *(f"metrics.{k}" for k in keys["metrics"])]
    for mine, theirs_row in zip(ours.to_dict("records"), theirs.to_dict("records")):
        for column in columns:
            a, b = mine.get(column), theirs_row.get(column)
            missing = lambda v: v is None or v is pd.NaT or (isinstance(v, float) and math.isnan(v))  # noqa: E731
            if missing(a) or missing(b):
                assert missing(a) and missing(b), (mine["run_id"], column, a, b)
            elif column.endswith("_time"):
                assert pd.Timestamp(a) == pd.Timestamp(b), (column, a, b)
            else:
                assert a == b, changed("the SQL store's tables", f"{column} of run {mine['run_id']}: {a!r} != {b!r}")
    assert ours.loc[ours.run_id == ids[0], "metrics.val/best_acc"].item() == pytest.approx(0.02)  # the last step's


def test_context_tags_are_what_start_run_gives():
    try:
        tags = compat.context_tags({"mine": "1", "mlflow.source.name": "kept"})
    except (ImportError, AttributeError, TypeError) as e:
        pytest.fail(changed("mlflow.tracking.context.registry.resolve_tags", e))
    assert tags["mine"] == "1" and tags["mlflow.source.name"] == "kept" and "mlflow.user" in tags, \
        changed("resolve_tags", tags)


def test_system_metrics_are_held_until_release_and_none_lost(store):
    """compat.SystemMetrics subclasses MLflow's monitor and overrides `publish_metrics` and `finish`: no
    `system/` metric before `release()`, then the held samples and the new ones."""
    uri, client, exp = store
    mlflow.set_tracking_uri(uri)
    mlflow.set_system_metrics_sampling_interval(0.1)
    mlflow.set_system_metrics_samples_before_logging(1)
    try:
        run_id = client.create_run(exp).info.run_id
        try:
            monitor = compat.SystemMetrics(run_id, resume_logging=False)
            monitor.start()
        except (ImportError, AttributeError, TypeError) as e:
            pytest.fail(changed("mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor", e))
        time.sleep(1.0)
        held = [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
        assert not held and monitor.held, changed("SystemMetricsMonitor.publish_metrics", "samples were not held")
        monitor.release()
        time.sleep(0.5)
        monitor.finish()
        history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
        assert len(history) >= 2, changed("SystemMetricsMonitor", f"{len(history)} samples after release")
    finally:
        mlflow.set_system_metrics_sampling_interval(None)
        mlflow.set_system_metrics_samples_before_logging(None)
        mlflow.set_tracking_uri(None)


def test_requirements_warm_up_fills_mlflows_cache():
    try:
        from mlflow.utils import requirements_utils
        compat.warm_up_requirements()
        cache = requirements_utils._MODULES_TO_PACKAGES
    except (ImportError, AttributeError) as e:
        pytest.fail(changed("mlflow.utils.requirements_utils._init_modules_to_packages_map", e))
    assert cache and "torch" in cache, changed("_init_modules_to_packages_map", "the map stays empty")


def test_delete_artifacts_removes_a_path_or_everything(store, tmp_path):
    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    (tmp_path / "up" / "checkpoints").mkdir(parents=True)
    (tmp_path / "up" / "checkpoints" / "last.pt").write_text("x")
    (tmp_path / "up" / "config.toml").write_text("y")
    client.log_artifacts(run_id, str(tmp_path / "up"))
    artifact_uri = client.get_run(run_id).info.artifact_uri
    try:
        compat.delete_artifacts(artifact_uri, "checkpoints")
    except (ImportError, AttributeError, TypeError) as e:
        pytest.fail(changed("mlflow.store.artifact.artifact_repository_registry.get_artifact_repository", e))
    assert [f.path for f in client.list_artifacts(run_id)] == ["config.toml"]
    compat.delete_artifacts(artifact_uri)
    assert client.list_artifacts(run_id) == []


# --- Public replacements ---

def test_warm_starts_range_check_uses_only_public_attributes():
    """`warm.inside` (was Optuna's private `_contains`): in range, on the step, or one of the choices."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from alexnet.sweep.warm import inside

    lr = FloatDistribution(0.001, 0.1, log=True)
    assert inside(lr, 0.001) and inside(lr, 0.1) and inside(lr, 0.05)
    assert not inside(lr, 0.2) and not inside(lr, 0.0) and not inside(lr, float("nan")) and not inside(lr, "0.05")
    stepped = FloatDistribution(0.0, 0.5, step=0.1)
    assert inside(stepped, 0.3) and inside(stepped, 0.1 + 0.2) and not inside(stepped, 0.25)
    epochs = IntDistribution(1, 9, step=2)
    assert inside(epochs, 5) and not inside(epochs, 4) and not inside(epochs, 11) and not inside(epochs, 5.5)
    resize = IntDistribution(67, 224)
    assert inside(resize, 96) and not inside(resize, 66)
    batch = CategoricalDistribution([64, 128, "auto"])
    assert inside(batch, 128) and inside(batch, "auto") and not inside(batch, 256)
