"""The `alexnet` command. Each subcommand imports torch, mlflow or optuna only when it runs, so
`alexnet --help` answers at once."""

from __future__ import annotations

import argparse
import os
import sys

from alexnet import UsageError, commands


def integer(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]; anything else is argparse's one-line error, exit 2."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"want {low} to {high}, got {value}" if high is not None
                                             else f"want {low} or more, got {value}")
        return value
    return parse


def add_storage_arg(p: argparse.ArgumentParser):
    p.add_argument("--storage", metavar="URL", help="Optuna RDB storage (default: $ALEXNET_STORAGE, else "
                   "sqlite:///<project>/mlruns/optuna.db)")


def add_config_args(p: argparse.ArgumentParser, file_required: bool = True):
    p.add_argument("file", nargs=None if file_required else "?", help="experiment TOML file (overrides of the defaults)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field; repeatable (e.g. --set lr=0.05 --set resize=96)")


def add_tracking_arg(p: argparse.ArgumentParser):
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow store or server, e.g. http://host:5000 "
                   "(default: $MLFLOW_TRACKING_URI, else the project's mlruns/)")


def build_parser() -> argparse.ArgumentParser:
    from alexnet.training.config import describe_fields
    from alexnet.sweep.spec import describe_keys

    parser = argparse.ArgumentParser(
        prog="alexnet", description="AlexNet on Fashion-MNIST (d2l 7.1): train, track in MLflow, sweep with Optuna.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fields_help = "config fields (default, meaning):\n" + describe_fields()

    p = sub.add_parser("train", help="train one experiment", epilog=fields_help,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train AlexNet on Fashion-MNIST with an experiment file's settings.")
    add_config_args(p, file_required=False)
    p.add_argument("--resume", metavar="RUN_ID", help="continue a stopped run (killed, crashed, Ctrl-C) in the same "
                   "MLflow run from its last checkpoint, with its own config (no file, no --set)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-epoch lines; print only the summary")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow (pure speed runs)")
    p.add_argument("--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra tag on the MLflow run; repeatable")
    add_tracking_arg(p)
    p.set_defaults(run=commands.cmd_train)

    p = sub.add_parser("reproduce", help="train a run again from its record and compare both, epoch by epoch",
                       description="Re-create a run from its record alone: its config, its git commit and the patch of "
                                   "an uncommitted work tree (applied in a temporary git worktree; yours is not "
                                   "touched), after checking the data's checksums. The new run is tagged "
                                   "reproduces=RUN_ID; a per-epoch table shows both runs' metrics and the differences. "
                                   "Exit status 1 when it differs where it should be identical (the CPU, or "
                                   "deterministic = true, with the same device and versions).")
    p.add_argument("run_id", metavar="RUN_ID", help="the MLflow run to re-create")
    p.add_argument("--force", action="store_true", help="train it with this checkout's code even though the run was "
                   "trained at another commit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-epoch lines")
    add_tracking_arg(p)
    p.set_defaults(run=commands.cmd_reproduce)

    p = sub.add_parser("demo", help="the README's main job: smoke run on a CPU, the baseline on a GPU",
                       description="Train experiments/baseline.toml on a GPU (experiments/smoke.toml elsewhere), then sweep sweeps/demo.toml; all logged to MLflow.")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=commands.cmd_demo)

    p = sub.add_parser("summary", help="print the network's layer shapes and parameter count",
                       description="The chapter's layer-by-layer output shapes for one input image.")
    p.add_argument("--resize", type=integer(1), default=224, help="input side in pixels (default: 224)")
    p.set_defaults(run=commands.cmd_summary)

    p = sub.add_parser("config", help="print the resolved config as TOML", epilog=fields_help,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Defaults, then the file, then --set overrides, checked, printed as TOML.")
    add_config_args(p, file_required=False)
    p.set_defaults(run=commands.cmd_config)

    p = sub.add_parser("sweep", help="an Optuna sweep: each trial a child MLflow run; resumable, parallel",
                       description="Search the space of a sweep file (sweeps/*.toml). Running the same command "
                                   "again resumes the study; more workers may join from another terminal.",
                       epilog="sweep-file keys (default, meaning):\n" + describe_keys(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="sweep TOML file (sweeps/*.toml: base experiment, [space], trials, sampler, pruner)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="fix one config field for every trial (a searched field leaves the space); repeatable")
    p.add_argument("--set-sweep", dest="sweep_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one of the sweep file's own keys (listed below: grace_seconds, keep_top, n_trials, "
                        "pruner, ...); repeatable (e.g. --set-sweep grace_seconds=20 --set-sweep keep_top=1)")
    p.add_argument("--n-trials", type=integer(0), metavar="N", help="trials to finish in all (overrides the file)")
    p.add_argument("--pack", type=integer(1), metavar="K", help="train K trials at once as one trial pack on each "
                   "worker's device (overrides the file's pack)")
    add_storage_arg(p)
    p.add_argument("--workers", type=integer(1), default=1, metavar="N", help="worker processes (one GPU each, or a share of the CPU cores)")
    add_tracking_arg(p)
    p.add_argument("--ray", metavar="ADDRESS", help="run the workers as tasks on a Ray cluster: HOST:PORT of its head, "
                   "or auto (this machine's cluster, or $RAY_ADDRESS); needs a tracking server and a database storage")
    p.add_argument("--gpus-per-worker", type=float, metavar="G", help="with --ray: GPUs each worker asks for (default: "
                   "1, or 0 on a cluster without GPUs; a fraction such as 0.5 puts two workers on one GPU)")
    p.add_argument("--cpus-per-worker", type=float, metavar="C", help="with --ray: CPUs each worker asks for, also its "
                   "torch threads (default: 1)")
    p.add_argument("--warm-start", metavar="STUDY[@STORAGE]", help="seed a new study with the COMPLETE trials of an "
                   "earlier one that fit this space (same config outside it, values inside it); they are not trained "
                   "again and do not count toward n_trials (STORAGE: default, this sweep's)")
    p.add_argument("--enqueue", dest="enqueue", action="append", default=[], metavar="RUN_ID",
                   help="queue this MLflow run's values of the searched fields as one of the first trials; repeatable")
    p.add_argument("--dry-run", action="store_true", help="print the plan, then run 3 tiny trials in a temporary store")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-trial lines")
    p.set_defaults(run=commands.cmd_sweep)

    p = sub.add_parser("confirm", help="re-run a sweep's top configurations and the baseline with fresh seeds",
                       description="Mean +/- std of the objective over fresh seeds for the top K trials and the "
                                   "baseline, and whether the winner beats the baseline beyond seed noise "
                                   "(Welch's t-test, one-sided, p < 0.05).")
    p.add_argument("study", help="the study name (a sweep file's `study`, or its file name)")
    p.add_argument("--top", type=integer(1), default=3, metavar="K", help="configurations to confirm (default: 3)")
    p.add_argument("--seeds", type=integer(2), default=3, metavar="S", help="fresh seeds per configuration, at least 2 to measure seed noise (default: 3)")
    add_storage_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    add_tracking_arg(p)
    p.set_defaults(run=commands.cmd_confirm)

    p = sub.add_parser("promote", help="register a sweep's confirmed winner in MLflow's model registry as 'champion'",
                       description="Read the study's confirmation (alexnet confirm's confirm.json on its parent run), "
                                   "refuse a winner it did not find better than the baseline unless --force, and "
                                   "register the winner's logged model (logged again from its best checkpoint if the "
                                   "model is gone) as a version of the experiment's registered model (e.g. "
                                   "alexnet-fashion-mnist), tagged with the study, the trial, the confirmation's "
                                   "statistics and the data's digests, with the alias 'champion'. Load it with "
                                   "mlflow.pytorch.load_model(\"models:/alexnet-fashion-mnist@champion\").")
    p.add_argument("study", help="the study name (a sweep file's `study`, or its file name)")
    p.add_argument("--force", action="store_true", help="promote the winner even though confirm did not find it "
                   "better than the baseline beyond seed noise")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    add_tracking_arg(p)
    p.set_defaults(run=commands.cmd_promote)

    p = sub.add_parser("runs", help="leaderboard of MLflow runs: filter, sort, CSV/JSON, learning curves",
                       description="One row per run, best first (by best validation accuracy where runs have a "
                                   "validation split, else best test accuracy): name, role, status, lr, dropout, "
                                   "resize, epochs, the data size, pipeline and seed where runs differ, val_best and "
                                   "test@val (test accuracy at the epoch validation chose), best and final test "
                                   "accuracy, examples/s, trial, duration, disk use, run id; then the disk used in all.")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: alexnet-fashion-mnist; "
                   "all experiments with --sweep or --parent)")
    p.add_argument("--sweep", metavar="STUDY", help="only the runs of this sweep study (tag sweep.study): its "
                   "trials, or with --role its confirm runs")
    p.add_argument("--parent", metavar="RUN_ID", help="only the child runs of this parent run")
    p.add_argument("--role", choices=["run", "trial", "parent", "confirm"], help="only runs of this role: run "
                   "(alexnet train), trial (a sweep's), parent (a sweep's study), confirm (alexnet confirm's)")
    p.add_argument("--status", type=str.upper, choices=["RUNNING", "FINISHED", "FAILED", "KILLED", "STALE", "PRUNED", "RETRIED"],
                   help="only runs in this state (STALE: RUNNING, but its process is gone; PRUNED: a trial the "
                   "sweep's pruner stopped; RETRIED: a trial whose worker died, run again as a new trial)")
    p.add_argument("--sort", metavar="COLUMN", help="column to sort by, as the header names it (default: val_best, the "
                   "best validation accuracy, where runs have a validation split, else best_acc; numbers best first, "
                   "duration and disk smallest first, names A-Z)")
    p.add_argument("--reverse", action="store_true", help="reverse the sort order")
    p.add_argument("--limit", type=integer(1), metavar="N", help="show the first N runs only")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    out.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.add_argument("--pareto", action="store_true", help="with --sweep: the Pareto front of a cost-aware sweep (its "
                   "trials no other beats on both the objective and the cost), from its parent run's pareto.csv")
    p.add_argument("--plot", metavar="FILE", help="also draw the selected runs' learning curves in one PNG")
    p.add_argument("--kill-stale", action="store_true", help="mark the selected STALE runs KILLED (resumable)")
    add_tracking_arg(p)
    p.set_defaults(run=commands.cmd_runs)

    p = sub.add_parser("ui", help="the MLflow UI on the project's runs (127.0.0.1:5000)",
                       description="Start the MLflow UI on the project's store, wait until it answers and print "
                                   "the URLs of its pages in the model-training view: the experiment's runs (best "
                                   "first, the params and accuracies as columns), each sweep's trials; with --sweep, "
                                   "that sweep's trials and the compare page of its top trials. Ctrl-C stops it.")
    p.add_argument("--port", type=integer(1, 65535), default=5000, help="port (default: 5000)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--allowed-hosts", metavar="HOSTS", help="comma-separated Host names clients may use; "
                   "required with a --host beyond loopback (e.g. myserver:5000)")
    p.add_argument("--experiment", default="alexnet-fashion-mnist", metavar="NAME", help="experiment whose page to print")
    p.add_argument("--sweep", metavar="STUDY", help="print the pages of this sweep: its trials, and its top trials compared")
    p.add_argument("--top", type=integer(1), default=3, metavar="K", help="trials to compare with --sweep (default: 3)")
    p.add_argument("--open", action="store_true", help="also open the first page in a web browser")
    add_tracking_arg(p)
    p.set_defaults(run=commands.cmd_ui)

    p = sub.add_parser("server", help="the team's MLflow tracking server on PostgreSQL, and the Optuna database",
                       description="Create the MLflow and Optuna databases on a PostgreSQL server if missing, start "
                                   "`mlflow server` on the first with served artifacts, and print what each worker "
                                   "exports. The password comes from PGPASSWORD (or ~/.pgpass) or --password-file, "
                                   "never from the command line. Ctrl-C stops it.")
    p.add_argument("--database", required=True, metavar="URL", help="the PostgreSQL server, without password or "
                   "database: postgresql+psycopg://USER@HOST:PORT")
    p.add_argument("--artifacts", required=True, metavar="DIR", help="where the server keeps every run's artifacts "
                   "(checkpoints, models, plots): a folder, or an s3://... URI")
    p.add_argument("--host", required=True, help="address to bind: 127.0.0.1 (this machine only) or 0.0.0.0 "
                   "(with --allowed-hosts)")
    p.add_argument("--port", type=integer(1, 65535), default=5000, help="port (default: 5000)")
    p.add_argument("--allowed-hosts", metavar="HOSTS", help="comma-separated Host names workers use (e.g. "
                   "mlflow.lab:5000); required with a --host beyond loopback; the first is the URL printed")
    p.add_argument("--password-file", metavar="FILE", help="read the database password from FILE's first line "
                   "(default: PGPASSWORD or ~/.pgpass)")
    p.add_argument("--mlflow-db", default="alexnet_mlflow", metavar="NAME", help="MLflow's database (default: alexnet_mlflow)")
    p.add_argument("--optuna-db", default="alexnet_optuna", metavar="NAME", help="Optuna's database (default: alexnet_optuna)")
    p.set_defaults(run=commands.cmd_server)

    p = sub.add_parser("push", help="copy local runs, and a sweep's study, to the team's tracking server and database",
                       description="Copy runs (params, metric histories, tags, artifacts, logged models, parent links, "
                                   "start and end times) from the project's store to a tracking server, and with "
                                   "--study the sweep's Optuna study to the team's database, its run ids rewritten. "
                                   "New run ids; pushing again copies only what is not there yet.")
    p.add_argument("--to-tracking-uri", metavar="URL", help="the team's tracking server, http://HOST:PORT "
                   "(default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--to-storage", metavar="URL", help="with --study: the team's Optuna storage, "
                   "postgresql+psycopg://USER@HOST:PORT/DB (default: $ALEXNET_STORAGE)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--study", metavar="NAME", help="a sweep: its parent, trial and confirmation runs, and its study")
    which.add_argument("--experiment", metavar="NAME", help="every run of this experiment (default: every run)")
    p.add_argument("--from-tracking-uri", metavar="URI", help="where the runs are (default: the project's mlruns/)")
    p.add_argument("--from-storage", metavar="URL", help="where the study is (default: the project's mlruns/optuna.db)")
    p.set_defaults(run=commands.cmd_push)

    p = sub.add_parser("gc", help="free disk: the retention policy on every run; MLflow-deleted runs for good",
                       description="Apply the retention policy to every run of the store (a sweep's trials outside "
                                   "its top keep_top, confirm runs, finished runs' best.pt beside their model) and "
                                   "remove the runs deleted in MLflow for good; say how much it frees. A dry run "
                                   "unless --yes.")
    p.add_argument("--yes", action="store_true", help="delete (default: only say what would go and how much it frees)")
    add_tracking_arg(p)
    p.set_defaults(run=commands.cmd_gc)
    return parser


def run() -> None:
    """The `alexnet` command (`python -m alexnet` too): `main`, then exit at once. Python's own teardown of
    the ~1,800 modules torch and MLflow bring takes 0.5-1.2 s after the last line, and nothing needs it
    here: every thread is joined and every file closed by then."""
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    from alexnet import home

    parser = build_parser()
    args = parser.parse_args(argv)
    home.announced = False  # each command names its store once
    if getattr(args, "tracking_uri", None):  # one place for every command; sweep workers inherit it
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    try:
        return args.run(args)
    except UsageError as e:
        print(f"alexnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's trouble (a full disk, a permission), not the code's: one line
        print(f"alexnet {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"alexnet {args.command}: interrupted", file=sys.stderr)
        return 130
