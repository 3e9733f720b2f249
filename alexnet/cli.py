"""The `alexnet` command. Each subcommand imports torch, mlflow or optuna only when it runs, so
`alexnet --help` answers at once."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from alexnet import UsageError


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


def add_config_args(p: argparse.ArgumentParser, file_required: bool = True):
    p.add_argument("file", nargs=None if file_required else "?", help="experiment TOML file (overrides of the defaults)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field; repeatable (e.g. --set lr=0.05 --set resize=96)")


def add_tracking_arg(p: argparse.ArgumentParser):
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow store or server, e.g. http://host:5000 "
                   "(default: $MLFLOW_TRACKING_URI, else the project's mlruns/)")


def cmd_train(args) -> int:
    from alexnet.config import load_config

    resume = args.resume
    parse_tags(args.tags)  # checked before anything starts
    if resume:  # the run's own config, from its store
        if args.file or args.sets or args.no_track or args.tags:
            raise UsageError("--resume continues a run with its own config and tags: drop the experiment file, --set, "
                             "--tag and --no-track")
        from alexnet import tracking

        cfg = tracking.resume_config(resume)
    elif not args.file:
        raise UsageError("name an experiment file (e.g. experiments/smoke.toml), or --resume RUN_ID")
    else:
        cfg = load_config(args.file, args.sets)  # checked before torch is even imported
    from tqdm import tqdm

    from alexnet import data
    from alexnet.train import Diverged, check_device, resolve_precision, train

    say = (lambda line: None) if args.quiet else (lambda line: tqdm.write(line, file=sys.stderr))
    device = check_device(cfg)  # a missing or unusable device: one line, before anything else
    what = (f"{f'resuming run {resume}' if resume else f'training {args.file}'}: {cfg.epochs} epochs, "
            f"resize {cfg.resize}, lr {cfg.lr}, batch {cfg.batch_size}, on {device} "
            f"({cfg.pipeline} pipeline, {resolve_precision(cfg, device)})")
    started = {}
    try:
        if args.no_track:
            data.prepare(cfg.data_dir)
            say(what)
            records = []
            for record in train(cfg, progress=not args.quiet):
                records.append(record)
                say(epoch_line(record, cfg.epochs))
        else:
            from alexnet import tracking
            from alexnet.home import tracking_uri, where
            from alexnet.redact import redact

            def on_start(run_id):
                started["run_id"] = run_id
                say(f"{what}\nmlflow run {run_id} in experiment {cfg.experiment!r} at {redact(where(tracking_uri()))} "
                    f"(if it stops early: alexnet train --resume {run_id})")

            run = tracking.tracked_train(cfg, source=args.file, progress=not args.quiet, resume_run_id=resume,
                                         tags=parse_tags(args.tags), on_start=on_start,
                                         on_epoch=lambda record, run_id: say(epoch_line(record, cfg.epochs)))
            records = run.records
    except Diverged as e:
        print(f"alexnet train: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume_with = f"; resume with: alexnet train --resume {started['run_id']}" if started else ""
        print(f"alexnet train: interrupted{resume_with}", file=sys.stderr)
        return 130
    print(summary_line(records[-1]) if records else f"run {resume}: all {cfg.epochs} epochs were already trained; now FINISHED")
    return 0


def parse_tags(items: list[str]) -> dict[str, str]:
    """`["reproduces=abc"]` -> `{"reproduces": "abc"}`."""
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--tag wants key=value, got {item!r}")
        tags[key.strip()] = value
    return tags


def epoch_line(r, epochs: int) -> str:
    val = f"val acc {r.val_acc:.3f}, " if r.val_acc is not None else ""
    return (f"epoch {r.epoch}/{epochs}: loss {r.train_loss:.3f}, train acc {r.train_acc:.3f}, {val}"
            f"test acc {r.test_acc:.3f}, {r.examples_per_sec:,.0f} examples/s "
            f"({r.wall_examples_per_sec:,.0f} end to end), {r.epoch_seconds:.1f} s")


def summary_line(r) -> str:
    """The book's closing line (`loss 0.327, train acc 0.880, test acc 0.882` / `4171.0 examples/sec`);
    with a validation split, the epoch it chose and that epoch's test accuracy."""
    if r.val_acc is None:
        best = f"best {r.best_test_acc:.3f} at epoch {r.best_epoch}"
    else:
        best = f"validation chose epoch {r.best_epoch}: val acc {r.best_val_acc:.3f}, test acc {r.test_acc_at_best_val:.3f}"
    return (f"loss {r.train_loss:.3f}, train acc {r.train_acc:.3f}, test acc {r.test_acc:.3f} "
            f"({best}), {r.examples_per_sec:,.1f} examples/sec ({r.wall_examples_per_sec:,.1f} end to end)")


def cmd_reproduce(args) -> int:
    """Train a run again from its record and compare, epoch by epoch (alexnet/reproduce.py)."""
    from alexnet import reproduce

    return reproduce.reproduce(args.run_id, force=args.force, quiet=args.quiet)


def cmd_summary(args) -> int:
    from alexnet.model import summary

    print(summary(args.resize))
    return 0


def cmd_config(args) -> int:
    from alexnet.config import load_config, to_toml

    print(to_toml(load_config(args.file, args.sets)), end="")
    return 0


def cmd_demo(args) -> int:
    """The README's main job: the chapter's baseline on a GPU (the smoke experiment on a CPU), then a
    small smoke sweep, the sweep's leaderboard and the command that opens the MLflow UI."""
    import torch

    from alexnet import runs
    from alexnet.sweep import launcher, report, spec

    root = Path(__file__).resolve().parents[1]
    gpu = torch.cuda.is_available()
    file = root / "experiments" / ("baseline.toml" if gpu else "smoke.toml")
    print(f"demo 1/2: {'GPU' if gpu else 'no GPU'}: training {file.relative_to(root)}", file=sys.stderr)
    args.file, args.no_track, args.resume, args.tags = str(file), False, None, []
    status = cmd_train(args)
    if status != 0:
        return status
    sweep = spec.load_sweep(root / "sweeps" / "demo.toml")
    print(f"demo 2/2: sweeps/demo.toml: {sweep.n_trials} trials of lr, dropout and resize", file=sys.stderr)
    result = launcher.run_sweep(sweep, 1, quiet=args.quiet)
    print(report.summary_text(sweep, result))
    print(runs.format_table(runs.leaderboard(sweep=sweep.study, limit=10)))
    print("compare every run, metric and checkpoint in the MLflow UI:  .venv/bin/alexnet ui")
    return result["status"]


def cmd_sweep(args) -> int:
    """An Optuna study; every trial a child MLflow run under one parent run (alexnet/sweep/)."""
    from alexnet.sweep.spec import load_sweep

    sweep = load_sweep(args.file, args.sets, n_trials=args.n_trials, storage=args.storage)  # before torch or MLflow
    if not args.ray and (args.gpus_per_worker is not None or args.cpus_per_worker is not None):
        raise UsageError("--gpus-per-worker and --cpus-per-worker ask Ray for resources: add --ray ADDRESS")
    if args.dry_run:
        if args.ray:
            raise UsageError("--dry-run runs on this machine, in a temporary store: drop --ray")
        from alexnet.sweep.dry_run import dry_run

        return dry_run(sweep, args.workers, quiet=args.quiet)
    cluster = None
    if args.ray:
        try:
            from alexnet.sweep.ray_workers import Cluster
        except ImportError as e:
            raise UsageError(f"--ray needs Ray ({e}): pip install 'alexnet-sweeps[ray]'") from None
        cluster = Cluster(args.ray, args.gpus_per_worker, args.cpus_per_worker or 1.0)
    from alexnet import runs
    from alexnet.sweep import launcher, report

    result = launcher.run_sweep(sweep, args.workers, quiet=args.quiet, cluster=cluster)
    print(report.summary_text(sweep, result))
    if not args.quiet:
        print(runs.format_table(runs.leaderboard(sweep=sweep.study, limit=10)))
    if result["status"] == 130:
        print("alexnet sweep: interrupted; run the same command again to resume", file=sys.stderr)
    return result["status"]


def cmd_confirm(args) -> int:
    """Re-run the study's top configurations and its baseline with fresh seeds (alexnet/sweep/confirm.py)."""
    from alexnet.sweep import confirm

    return confirm.confirm(args.study, top=args.top, seeds=args.seeds, storage=args.storage, quiet=args.quiet)


def cmd_runs(args) -> int:
    """The leaderboard: one row per run, best first (alexnet/runs.py)."""
    from alexnet import plots, runs, store

    store.set_up_store()
    select = dict(experiment=args.experiment, sweep=args.sweep, parent=args.parent, status=args.status,
                  sort=args.sort, reverse=args.reverse, limit=args.limit)
    board = runs.leaderboard(**select)
    if args.kill_stale:
        for run_id, why, resume in runs.stale_runs(board):
            store.mark_killed(run_id, why)
            print(f"marked run {run_id} KILLED ({why}); resume it with: {resume}", file=sys.stderr)
        board = runs.leaderboard(**select)
    if args.plot:
        if board.empty:
            raise UsageError("--plot: no runs selected, nothing to draw")
        labels = [name if isinstance(name, str) and name else r[:8] for name, r in zip(board["run"], board["run_id"])]
        print(f"wrote {plots.plot_curves(list(board['run_id']), args.plot, labels)}", file=sys.stderr)
    if args.csv:
        board.to_csv(sys.stdout, index=False)
    elif args.json:
        print(board.to_json(orient="records", indent=1))
    elif board.empty:
        print("no runs match", file=sys.stderr)
    else:
        print(runs.format_table(board))
        if (board["status"] == "STALE").any():
            print("STALE: RUNNING in MLflow but its process is gone; `alexnet runs --kill-stale` marks them KILLED, "
                  "`alexnet train --resume RUN_ID` continues one (a sweep's: run the sweep again)", file=sys.stderr)
    return 0


def cmd_ui(args) -> int:
    """The MLflow UI on the project's store (alexnet/ui.py)."""
    from alexnet import ui

    return ui.serve(args.host, args.port, args.allowed_hosts, args.experiment)


def cmd_server(args) -> int:
    """The team's MLflow tracking server on PostgreSQL, with the Optuna database (alexnet/server.py)."""
    from alexnet import server

    return server.serve(args.database, args.artifacts, args.host, args.port, args.allowed_hosts,
                        args.password_file, args.mlflow_db, args.optuna_db)


def cmd_push(args) -> int:
    """Copy local runs, and a sweep's Optuna study, to the team's servers (alexnet/push.py)."""
    from alexnet import push

    to_uri = args.to_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not to_uri or not to_uri.startswith(("http://", "https://")):
        raise UsageError("push: name the team's tracking server: --to-tracking-uri http://HOST:PORT (or export "
                         "MLFLOW_TRACKING_URI)")
    return push.push(to_uri, args.to_storage or os.environ.get("ALEXNET_STORAGE"), args.experiment, args.study,
                     args.from_tracking_uri, args.from_storage)


def build_parser() -> argparse.ArgumentParser:
    from alexnet.config import describe_fields

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
    p.set_defaults(run=cmd_train)

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
    p.set_defaults(run=cmd_reproduce)

    p = sub.add_parser("demo", help="the README's main job: smoke run on a CPU, the baseline on a GPU",
                       description="Train experiments/baseline.toml on a GPU (experiments/smoke.toml elsewhere), then sweep sweeps/demo.toml; all logged to MLflow.")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("summary", help="print the network's layer shapes and parameter count",
                       description="The chapter's layer-by-layer output shapes for one input image.")
    p.add_argument("--resize", type=integer(1), default=224, help="input side in pixels (default: 224)")
    p.set_defaults(run=cmd_summary)

    p = sub.add_parser("config", help="print the resolved config as TOML", epilog=fields_help,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Defaults, then the file, then --set overrides, checked, printed as TOML.")
    add_config_args(p, file_required=False)
    p.set_defaults(run=cmd_config)

    p = sub.add_parser("sweep", help="an Optuna sweep: each trial a child MLflow run; resumable, parallel",
                       description="Search the space of a sweep file (sweeps/*.toml). Running the same command "
                                   "again resumes the study; more workers may join from another terminal.")
    p.add_argument("file", help="sweep TOML file (sweeps/*.toml: base experiment, [space], trials, sampler, pruner)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="fix one config field for every trial (a searched field leaves the space); repeatable")
    p.add_argument("--n-trials", type=integer(0), metavar="N", help="trials to finish in all (overrides the file)")
    p.add_argument("--storage", metavar="URL", help="Optuna RDB storage (default: $ALEXNET_STORAGE, else sqlite:///<project>/mlruns/optuna.db)")
    p.add_argument("--workers", type=integer(1), default=1, metavar="N", help="worker processes (one GPU each, or a share of the CPU cores)")
    add_tracking_arg(p)
    p.add_argument("--ray", metavar="ADDRESS", help="run the workers as tasks on a Ray cluster: HOST:PORT of its head, "
                   "or auto (this machine's cluster, or $RAY_ADDRESS); needs a tracking server and a database storage")
    p.add_argument("--gpus-per-worker", type=float, metavar="G", help="with --ray: GPUs each worker asks for (default: "
                   "1, or 0 on a cluster without GPUs; a fraction such as 0.5 puts two workers on one GPU)")
    p.add_argument("--cpus-per-worker", type=float, metavar="C", help="with --ray: CPUs each worker asks for, also its "
                   "torch threads (default: 1)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, then run 3 tiny trials in a temporary store")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-trial lines")
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser("confirm", help="re-run a sweep's top configurations and the baseline with fresh seeds",
                       description="Mean +/- std of the objective over fresh seeds for the top K trials and the "
                                   "baseline, and whether the winner beats the baseline beyond seed noise "
                                   "(Welch's t-test, one-sided, p < 0.05).")
    p.add_argument("study", help="the study name (a sweep file's `study`, or its file name)")
    p.add_argument("--top", type=integer(1), default=3, metavar="K", help="configurations to confirm (default: 3)")
    p.add_argument("--seeds", type=integer(2), default=3, metavar="S", help="fresh seeds per configuration, at least 2 to measure seed noise (default: 3)")
    p.add_argument("--storage", metavar="URL", help="Optuna RDB storage (default: $ALEXNET_STORAGE, else sqlite:///<project>/mlruns/optuna.db)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    add_tracking_arg(p)
    p.set_defaults(run=cmd_confirm)

    p = sub.add_parser("runs", help="leaderboard of MLflow runs: filter, sort, CSV/JSON, learning curves",
                       description="One row per run, best first: name, status, lr, dropout, resize, epochs, "
                                   "val_best (best validation accuracy) and test@val (test accuracy at that epoch), "
                                   "best and final test accuracy, examples/s, duration, run id.")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: alexnet-fashion-mnist; "
                   "all experiments with --sweep or --parent)")
    p.add_argument("--sweep", metavar="STUDY", help="only the trials of this sweep study (tag sweep.study)")
    p.add_argument("--parent", metavar="RUN_ID", help="only the child runs of this parent run")
    p.add_argument("--status", type=str.upper, choices=["RUNNING", "FINISHED", "FAILED", "KILLED", "STALE"],
                   help="only runs in this state (STALE: RUNNING, but its process is gone)")
    p.add_argument("--sort", metavar="COLUMN", help="column to sort by (default: val_best, the best validation "
                   "accuracy, where runs have a validation split, else best_acc; best first; names A-Z)")
    p.add_argument("--reverse", action="store_true", help="reverse the sort order")
    p.add_argument("--limit", type=integer(1), metavar="N", help="show the first N runs only")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    out.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.add_argument("--plot", metavar="FILE", help="also draw the selected runs' learning curves in one PNG")
    p.add_argument("--kill-stale", action="store_true", help="mark the selected STALE runs KILLED (resumable)")
    add_tracking_arg(p)
    p.set_defaults(run=cmd_runs)

    p = sub.add_parser("ui", help="the MLflow UI on the project's runs (127.0.0.1:5000)",
                       description="Start the MLflow UI on the project's store, wait until it answers and print "
                                   "the URL of the experiment's runs page. Ctrl-C stops it.")
    p.add_argument("--port", type=integer(1, 65535), default=5000, help="port (default: 5000)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--allowed-hosts", metavar="HOSTS", help="comma-separated Host names clients may use; "
                   "required with a --host beyond loopback (e.g. myserver:5000)")
    p.add_argument("--experiment", default="alexnet-fashion-mnist", metavar="NAME", help="experiment whose page to print")
    add_tracking_arg(p)
    p.set_defaults(run=cmd_ui)

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
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p.add_argument("--allowed-hosts", metavar="HOSTS", help="comma-separated Host names workers use (e.g. "
                   "mlflow.lab:5000); required with a --host beyond loopback; the first is the URL printed")
    p.add_argument("--password-file", metavar="FILE", help="read the database password from FILE's first line "
                   "(default: PGPASSWORD or ~/.pgpass)")
    p.add_argument("--mlflow-db", default="alexnet_mlflow", metavar="NAME", help="MLflow's database (default: alexnet_mlflow)")
    p.add_argument("--optuna-db", default="alexnet_optuna", metavar="NAME", help="Optuna's database (default: alexnet_optuna)")
    p.set_defaults(run=cmd_server)

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
    p.set_defaults(run=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
