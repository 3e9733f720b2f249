"""The package's shape: every module imports on its own in a fresh interpreter (so no module leans on
another having been imported first), no two modules import each other (imports inside functions count),
and the modules the CLI's fast paths use stay free of torch."""

import ast
import subprocess
import sys


from conftest import ROOT

PATHS = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
         for p in (ROOT / "alexnet").rglob("*.py")}
MODULES = sorted(PATHS)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, at the top or inside a function."""
    graph = {}
    for module, path in PATHS.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in PATHS:
                    name = name.rpartition(".")[0]
                if name and name != module and not module.startswith(name + "."):
                    edges.add(name)
        graph[module] = edges
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert len(graph) == len(MODULES) > 20

    def reaches(start, goal, seen=()):
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen + (nxt,))) for nxt in graph[start])

    cycles = sorted(m for m in graph if reaches(m, m))
    assert cycles == [], f"modules on an import cycle: {cycles}"



def test_the_checkpoint_format_knows_nothing_of_runs():
    """`tracking/checkpoint.py` is the file format and its writer; where a run's files live is
    `tracking/run_files.py`'s, which calls it. A checkpoint that reached for the store or the disk
    would send one trial's data back up the path it came down."""
    graph = import_graph()
    assert graph["alexnet.tracking.checkpoint"] <= {"alexnet", "alexnet.files"}  # alexnet: its UsageError
    assert "alexnet.tracking.checkpoint" in graph["alexnet.tracking.run_files"]


# A parent interpreter imports the third-party libraries once (none of the package), then forks one child
# per module: each child imports its module with nothing of the package imported before it. Forking
# spares the 2-3 s that a fresh interpreter spends importing torch and MLflow, 30 times over.
FORK_EACH = """
import importlib, os, sys, traceback
for lib in sys.argv[1].split(","):
    if lib:
        importlib.import_module(lib)
assert not [m for m in sys.modules if m.startswith("alexnet")]
for name in sys.argv[2:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
            heavy = sorted(m for m in ("torch", "torchvision") if m in sys.modules)
            print(name, "ok", ",".join(heavy) or "-", flush=True)
            os._exit(0)
        except BaseException:
            print(name, "FAILED", traceback.format_exc().strip().splitlines()[-1], flush=True)
            os._exit(1)
    os.waitpid(pid, 0)
"""


def import_each(modules, preloaded: str) -> dict[str, tuple[str, str]]:
    out = subprocess.run([sys.executable, "-c", FORK_EACH, preloaded, *modules], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return {name: (state, rest) for name, state, rest in (line.split(" ", 2) for line in out.stdout.splitlines())}


def test_every_module_imports_alone():
    modules = [m for m in MODULES if m != "alexnet.__main__"]
    results = import_each(modules, "torch,torchvision,mlflow,optuna,pandas,matplotlib.pyplot,scipy.stats")
    assert sorted(results) == sorted(modules)
    assert {m: r for m, (state, r) in results.items() if state != "ok"} == {}


FAST_PATHS = ["alexnet.cli", "alexnet.sweep.spec", "alexnet.sweep.launcher", "alexnet.sweep.dry_run", "alexnet.compare.runs",
              "alexnet.tracking.store", "alexnet.training.datafiles", "alexnet.home", "alexnet.redact", "alexnet.compare.ui", "alexnet.tracking.disk",
              "alexnet.sweep.pareto", "alexnet.sweep.warm", "alexnet.training.sizes"]


def test_the_fast_paths_do_not_load_torch():
    """`alexnet --help`, a bad sweep file, the sweep launcher, the leaderboard and the UI answer without
    torch (2-3 s and hundreds of MB saved each time)."""
    results = import_each(FAST_PATHS, "mlflow,optuna,pandas")
    assert {m: heavy for m, (state, heavy) in results.items()} == {m: "-" for m in FAST_PATHS}
