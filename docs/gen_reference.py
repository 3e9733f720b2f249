"""The manual's reference pages, generated at build time from the code itself (an MkDocs hook, named in
mkdocs.yml), so that they cannot drift from it:

- reference/cli.md         from the argparse parser `alexnet.cli.build_parser()` builds;
- reference/config.md      from `Config`'s fields, their defaults, help texts and allowed ranges;
- reference/sweep-file.md  from `Sweep`'s documented fields (the keys of a sweep file) and the spec's choices;
- reference/numbers.md     from the module-level constants the prose quotes (read with `ast`, so no module
                           that needs MLflow, Optuna or Ray is imported).

Run alone (`python docs/gen_reference.py DIR`) it writes the four pages into DIR.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout's package, whether or not it is installed

# The constants the manual quotes: (module file, name, what it is).
NUMBERS = [
    ("alexnet/home.py", "SQLITE_TIMEOUT_S", "seconds a SQLite writer (MLflow's store and Optuna's) waits for another's lock"),
    ("alexnet/tracking/store.py", "OPEN_ATTEMPTS", "times a first open of the project's SQLite store is tried, when another program creates it at the same moment"),
    ("alexnet/tracking/store.py", "OPEN_RETRY_S", "seconds between those tries"),
    ("alexnet/training/sizes.py", "MIN_RESIZE", "the smallest `resize` the network takes (its third max-pool needs 3 px)"),
    ("alexnet/training/config.py", "MAX_VAL_SIZE", "the largest `val_size`: at least half the training images stay for training"),
    ("alexnet/sweep/spec.py", "SWEEP_VAL_SIZE", "the validation split a sweep holds out unless its base experiment or `[set]` says otherwise"),
    ("alexnet/sweep/confirm.py", "FIRST_SEED", "the first of the fresh seeds `alexnet confirm` trains with (then +1, +2, ...)"),
    ("alexnet/sweep/confirm.py", "ALPHA", "the significance level of confirm's one-sided Welch t-test, applied to the Holm-adjusted p-value"),
    ("alexnet/team/reproduce.py", "GPU_ACC_TOLERANCE", "accuracy difference `alexnet reproduce` accepts for a GPU run with cuDNN autotuning"),
    ("alexnet/tracking/store.py", "HEARTBEAT_S", "seconds between a running run's `heartbeat` tag updates"),
    ("alexnet/tracking/store.py", "STALE_AFTER_S", "seconds without a heartbeat after which a run from another machine or container (another pid namespace) is STALE"),
    ("alexnet/tracking/checkout.py", "MAX_UNTRACKED_BYTES", "bytes: an untracked file larger than this is left out of a run's `code.patch`"),
    ("alexnet/sweep/ray_workers.py", "MAX_RETRIES", "times Ray runs a worker's task again when its node or process died"),
    ("alexnet/sweep/ray_workers.py", "STOP_S", "seconds a cancelled Ray worker may take to end its trial before it is killed"),
]


def constants() -> dict[str, object]:
    """Every constant of NUMBERS, by name, evaluated from its module's source without importing it."""
    out = {}
    for rel, name, _ in NUMBERS:
        found = {}
        for node in ast.parse((ROOT / rel).read_text()).body:
            if isinstance(node, ast.AnnAssign):
                targets, value = [node.target], node.value
            elif isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            else:
                continue
            evaluate = lambda expr: eval(compile(ast.Expression(expr), rel, "eval"), {}, dict(found))  # noqa: E731
            for target in targets:
                if isinstance(target, ast.Name):
                    try:
                        found[target.id] = evaluate(value)
                    except NameError:
                        pass  # built from something imported: not a plain number
                elif isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                    for t, v in zip(target.elts, value.elts):
                        if isinstance(t, ast.Name):
                            found[t.id] = evaluate(v)
        if name not in found:
            raise LookupError(f"{rel}: no constant {name}")
        out[name] = found[name]
    return out


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def code(value) -> str:
    return f"`{json.dumps(value)}`" if not isinstance(value, str) or value else '`""`'


# --- The CLI ------------------------------------------------------------------------------------------

def option_row(action: argparse.Action) -> str:
    if action.option_strings:
        name = ", ".join(f"`{o}`" for o in action.option_strings)
        if action.nargs != 0:
            name += f" `{action.metavar or action.dest.upper()}`"
    else:
        name = f"`{action.metavar or action.dest.upper()}`"
    if action.choices and not isinstance(action.choices, dict):
        name += " (" + ", ".join(map(str, action.choices)) + ")"
    default = "" if action.default in (None, False, [], argparse.SUPPRESS) or action.nargs == 0 else code(action.default)
    extra = "; required" if action.required and action.option_strings else ""
    extra += "; repeatable" if isinstance(action, argparse._AppendAction) and "repeatable" not in (action.help or "") else ""
    return f"| {name} | {default} | {cell((action.help or '') + extra)} |"


def cli_page() -> str:
    from alexnet.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    lines = ["# Command line", "",
             "Generated from the `alexnet` command's own argument parser (`alexnet/cli.py`) each time the manual "
             "is built: what `alexnet COMMAND --help` prints, as tables.", "",
             "| command | what it does |", "|---|---|"]
    lines += [f"| [`alexnet {name}`](#alexnet-{name}) | {cell(helps[name])} |" for name in sub.choices]
    for name, p in sub.choices.items():
        p.prog = f"alexnet {name}"
        p.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100)
        usage = [line.removeprefix("usage: ").removeprefix(" " * len("usage: ")) for line in p.format_usage().splitlines()]
        lines += ["", f"## alexnet {name}", "", "```", *usage, "```", ""]
        if p.description:
            lines += [p.description, ""]
        lines += ["| argument | default | meaning |", "|---|---|---|"]
        lines += [option_row(a) for a in p._actions if not isinstance(a, argparse._HelpAction)]
        if name in ("train", "config"):
            lines += ["", "Config fields for `--set`: see [Config fields](config.md)."]
        if name == "sweep":
            lines += ["", "Keys of the sweep file: see [Sweep-file keys](sweep-file.md)."]
    return "\n".join(lines) + "\n"


# --- Config fields ------------------------------------------------------------------------------------

def config_page() -> str:
    from alexnet.training import config

    lines = ["# Config fields", "",
             "Generated from `alexnet.training.config.Config` (its fields, defaults and help texts) and the ranges "
             "the config checks. An experiment file (`experiments/*.toml`) sets any of them; `--set KEY=VALUE` "
             "overrides one on the command line; `alexnet config FILE` prints the resolved config.", "",
             "| field | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(config.Config):
        allowed = config._RANGES.get(f.name, (None, "true or false" if f.type == "bool" else ""))[1]
        lines.append(f"| `{f.name}` | {f.type} | {code(f.default)} | {cell(allowed)} | {cell(f.metadata['help'])} |")
    return "\n".join(lines) + "\n"


# --- Sweep-file keys ----------------------------------------------------------------------------------

def sweep_page() -> str:
    from alexnet.sweep import spec

    lines = ["# Sweep-file keys", "",
             "Generated from `alexnet.sweep.spec.Sweep`'s documented fields: the keys a sweep file "
             "(`sweeps/*.toml`) may set besides its tables `[space]` and `[set]`.", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(spec.Sweep):
        if "help" in f.metadata:
            lines.append(f"| `{f.name}` | {f.type} | {code(f.default)} | {cell(f.metadata['help'])} |")
    lines += ["", "## Tables", "", "| table | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {cell(v)} |" for k, v in spec.SPACE_HELP.items()]
    lines += ["", "## Allowed values", "",
              f"- an entry of `[space]`: the keys {', '.join(f'`{k}`' for k in spec.SPEC_KEYS)}",
              f"- `sampler`: {', '.join(f'`{s}`' for s in spec.SAMPLERS)}",
              f"- `pruner`: {', '.join(f'`{s}`' for s in spec.PRUNERS)}",
              f"- `direction`: {', '.join(f'`{s}`' for s in spec.DIRECTIONS)}",
              "- `cost`: " + "; ".join(f"`{k}` ({v})" for k, v in spec.COSTS.items()),
              "- `objective`: " + ", ".join(f"`{o}`" for o in spec.OBJECTIVES if not o.startswith("test/"))
              + " (a `test/` metric is refused)",
              f"- the storage (`--storage`, `$ALEXNET_STORAGE`): {', '.join(f'`{s}`' for s in spec.LOCKABLE)} "
              "(storages that can be locked across the study's workers)",
              f"- unless the base experiment or `[set]` says otherwise, a sweep holds out `val_size = "
              f"{spec.SWEEP_VAL_SIZE}` training images for validation"]
    return "\n".join(lines) + "\n"


# --- Numbers ------------------------------------------------------------------------------------------

def numbers_page() -> str:
    values = constants()
    lines = ["# Numbers the code holds", "",
             "Generated from the constants themselves: the limits, timeouts and tolerances the manual quotes.", "",
             "| constant | value | what it is | where |", "|---|---|---|---|"]
    for rel, name, what in NUMBERS:
        lines.append(f"| `{name}` | `{values[name]!r}` | {cell(what)} | `{rel}` |")
    return "\n".join(lines) + "\n"


PAGES = {"reference/cli.md": cli_page, "reference/config.md": config_page,
         "reference/sweep-file.md": sweep_page, "reference/numbers.md": numbers_page}


def on_files(files, config):
    """MkDocs hook: add the generated pages to the site's files (nothing is written into docs/)."""
    from mkdocs.structure.files import File

    for path, page in PAGES.items():
        files.append(File.generated(config, path, content=page()))
    return files


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "site-reference")
    for path, page in PAGES.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_text(page())
        print(out / path)
