"""The `alexnet` command. Each subcommand imports torch, mlflow or optuna only when it runs, so
`alexnet --help` answers at once."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from alexnet import UsageError


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
    if resume:  # the run's own config, from its store
        if args.file or args.sets or args.no_track:
            raise UsageError("--resume continues a run with its own config: drop the experiment file, --set and --no-track")
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
            from alexnet import home, tracking

            home.announce(cfg.experiment)

            def on_start(run_id):
                started["run_id"] = run_id
                say(f"{what}\nmlflow run {run_id} (if it stops early: alexnet train --resume {run_id})")

            run = tracking.tracked_train(cfg, source=args.file, progress=not args.quiet, resume_run_id=resume,
                                         on_start=on_start, on_epoch=lambda record, run_id: say(epoch_line(record, cfg.epochs)))
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


def epoch_line(r, epochs: int) -> str:
    return (f"epoch {r.epoch}/{epochs}: loss {r.train_loss:.3f}, train acc {r.train_acc:.3f}, "
            f"test acc {r.test_acc:.3f}, {r.examples_per_sec:,.0f} examples/s "
            f"({r.wall_examples_per_sec:,.0f} end to end), {r.epoch_seconds:.1f} s")


def summary_line(r) -> str:
    """The book's closing line (`loss 0.327, train acc 0.880, test acc 0.882` / `4171.0 examples/sec`)."""
    return (f"loss {r.train_loss:.3f}, train acc {r.train_acc:.3f}, test acc {r.test_acc:.3f} "
            f"(best {r.best_test_acc:.3f} at epoch {r.best_epoch}), {r.examples_per_sec:,.1f} examples/sec "
            f"({r.wall_examples_per_sec:,.1f} end to end)")


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
    args.file, args.no_track, args.resume = str(file), False, None
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
    if args.dry_run:
        from alexnet.sweep.dry_run import dry_run

        return dry_run(sweep, args.workers, quiet=args.quiet)
    from alexnet import runs
    from alexnet.sweep import launcher, report

    result = launcher.run_sweep(sweep, args.workers, quiet=args.quiet)
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
    from alexnet import home, plots, runs, store

    store.set_up_store()
    home.announce(args.experiment or (None if args.sweep or args.parent else store.DEFAULT_EXPERIMENT))
    select = dict(experiment=args.experiment, sweep=args.sweep, parent=args.parent, status=args.status,
                  role=args.role, sort=args.sort, reverse=args.reverse, limit=args.limit)
    board = runs.leaderboard(**select)
    if args.kill_stale:
        stale = runs.stale_runs(board)
        for run_id, why, resume in stale:
            store.mark_killed(run_id, why)
            print(f"marked run {run_id} KILLED ({why}); resume it with: {resume}", file=sys.stderr)
        if not stale:
            running = (board["status"] == "RUNNING").sum()
            print(f"no stale runs: {'no run is RUNNING' if not running else f'the {running} RUNNING runs are alive'} "
                  f"among the {len(board)} selected", file=sys.stderr)
        board = runs.leaderboard(**select)
    if args.plot:
        if board.empty:
            raise UsageError(f"--plot: nothing to draw: {runs.empty_words(board, select)}")
        labels = [name if isinstance(name, str) and name else r[:8] for name, r in zip(board["run"], board["run_id"])]
        print(f"wrote {plots.plot_curves(list(board['run_id']), args.plot, labels)}", file=sys.stderr)
    if args.csv:
        board.to_csv(sys.stdout, index=False)
    elif args.json:
        print(board.to_json(orient="records", indent=1))
    elif board.empty:
        print(runs.empty_words(board, select), file=sys.stderr)
    else:
        print(runs.format_table(board))
        if (board["status"] == "STALE").any():
            print("STALE: RUNNING in MLflow but its process is gone; `alexnet runs --kill-stale` marks them KILLED, "
                  "`alexnet train --resume RUN_ID` continues one (a sweep's: run the sweep again)", file=sys.stderr)
    if args.sweep and not args.role:
        others = runs.leaderboard(sweep=args.sweep, role="confirm")
        if len(others):
            print(f"and {len(others)} confirm runs of this sweep: alexnet runs --sweep {args.sweep} --role confirm",
                  file=sys.stderr)
    return 0


def cmd_gc(args) -> int:
    """The retention policy applied to every run; MLflow-deleted runs removed for good (alexnet/cleanup.py)."""
    from alexnet import cleanup, home, store

    store.set_up_store()
    home.announce(None)
    return cleanup.gc(args.yes)


def cmd_ui(args) -> int:
    """The MLflow UI on the project's store (alexnet/ui.py)."""
    from alexnet import ui

    return ui.serve(args.host, args.port, args.allowed_hosts, args.experiment, sweep=args.sweep, top=args.top,
                    open_browser=args.open)


def build_parser() -> argparse.ArgumentParser:
    from alexnet.config import describe_fields
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
    add_tracking_arg(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("demo", help="the README's main job: smoke run on a CPU, the baseline on a GPU",
                       description="Train experiments/baseline.toml on a GPU (experiments/smoke.toml elsewhere), then sweep sweeps/demo.toml; all logged to MLflow.")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("summary", help="print the network's layer shapes and parameter count",
                       description="The chapter's layer-by-layer output shapes for one input image.")
    p.add_argument("--resize", type=int, default=224, help="input side in pixels (default: 224)")
    p.set_defaults(run=cmd_summary)

    p = sub.add_parser("config", help="print the resolved config as TOML", epilog=fields_help,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Defaults, then the file, then --set overrides, checked, printed as TOML.")
    add_config_args(p, file_required=False)
    p.set_defaults(run=cmd_config)

    p = sub.add_parser("sweep", help="an Optuna sweep: each trial a child MLflow run; resumable, parallel",
                       description="Search the space of a sweep file (sweeps/*.toml). Running the same command "
                                   "again resumes the study; more workers may join from another terminal.",
                       epilog="sweep-file keys (default, meaning):\n" + describe_keys(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="sweep TOML file (sweeps/*.toml: base experiment, [space], trials, sampler, pruner)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="fix one config field for every trial (a searched field leaves the space); repeatable")
    p.add_argument("--n-trials", type=int, metavar="N", help="trials to finish in all (overrides the file)")
    p.add_argument("--storage", metavar="URL", help="Optuna RDB storage (default: $ALEXNET_STORAGE, else sqlite:///<project>/mlruns/optuna.db)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (one GPU each, or a share of the CPU cores)")
    add_tracking_arg(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan, then run 3 tiny trials in a temporary store")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-trial lines")
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser("confirm", help="re-run a sweep's top configurations and the baseline with fresh seeds",
                       description="Mean +/- std of the objective over fresh seeds for the top K trials and the "
                                   "baseline, and whether the winner beats the baseline beyond seed noise "
                                   "(Welch's t-test, one-sided, p < 0.05).")
    p.add_argument("study", help="the study name (a sweep file's `study`, or its file name)")
    p.add_argument("--top", type=int, default=3, metavar="K", help="configurations to confirm (default: 3)")
    p.add_argument("--seeds", type=int, default=3, metavar="S", help="fresh seeds per configuration (default: 3)")
    p.add_argument("--storage", metavar="URL", help="Optuna RDB storage (default: $ALEXNET_STORAGE, else sqlite:///<project>/mlruns/optuna.db)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    add_tracking_arg(p)
    p.set_defaults(run=cmd_confirm)

    p = sub.add_parser("runs", help="leaderboard of MLflow runs: filter, sort, CSV/JSON, learning curves",
                       description="One row per run, best test accuracy first: name, role, status, lr, dropout, "
                                   "resize, epochs, the data size, pipeline and seed where runs differ, best and final "
                                   "test accuracy, examples/s, trial, duration, disk use, run id; then the disk used "
                                   "in all.")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: alexnet-fashion-mnist; "
                   "all experiments with --sweep or --parent)")
    p.add_argument("--sweep", metavar="STUDY", help="only the runs of this sweep study (tag sweep.study): its "
                   "trials, or with --role its confirm runs")
    p.add_argument("--parent", metavar="RUN_ID", help="only the child runs of this parent run")
    p.add_argument("--role", choices=["run", "trial", "parent", "confirm"], help="only runs of this role: run "
                   "(alexnet train), trial (a sweep's), parent (a sweep's study), confirm (alexnet confirm's)")
    p.add_argument("--status", type=str.upper, choices=["RUNNING", "FINISHED", "FAILED", "KILLED", "STALE", "PRUNED"],
                   help="only runs in this state (STALE: RUNNING, but its process is gone; PRUNED: a trial the "
                   "sweep's pruner stopped)")
    p.add_argument("--sort", default="best_acc", metavar="COLUMN", help="column to sort by, as the header names "
                   "it (default: best_acc; numbers best first, duration and disk smallest first, names A-Z)")
    p.add_argument("--reverse", action="store_true", help="reverse the sort order")
    p.add_argument("--limit", type=int, metavar="N", help="show the first N runs only")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    out.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.add_argument("--plot", metavar="FILE", help="also draw the selected runs' learning curves in one PNG")
    p.add_argument("--kill-stale", action="store_true", help="mark the selected STALE runs KILLED (resumable)")
    add_tracking_arg(p)
    p.set_defaults(run=cmd_runs)

    p = sub.add_parser("ui", help="the MLflow UI on the project's runs (127.0.0.1:5000)",
                       description="Start the MLflow UI on the project's store, wait until it answers and print "
                                   "the URLs of its pages in the model-training view: the experiment's runs (best "
                                   "first, the params and accuracies as columns), each sweep's trials; with --sweep, "
                                   "that sweep's trials and the compare page of its top trials. Ctrl-C stops it.")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--allowed-hosts", metavar="HOSTS", help="comma-separated Host names clients may use; "
                   "required with a --host beyond loopback (e.g. myserver:5000)")
    p.add_argument("--experiment", default="alexnet-fashion-mnist", metavar="NAME", help="experiment whose page to print")
    p.add_argument("--sweep", metavar="STUDY", help="print the pages of this sweep: its trials, and its top trials compared")
    p.add_argument("--top", type=int, default=3, metavar="K", help="trials to compare with --sweep (default: 3)")
    p.add_argument("--open", action="store_true", help="also open the first page in a web browser")
    add_tracking_arg(p)
    p.set_defaults(run=cmd_ui)

    p = sub.add_parser("gc", help="free disk: the retention policy on every run; MLflow-deleted runs for good",
                       description="Apply the retention policy to every run of the store (a sweep's trials outside "
                                   "its top keep_top, confirm runs, finished runs' best.pt beside their model) and "
                                   "remove the runs deleted in MLflow for good; say how much it frees. A dry run "
                                   "unless --yes.")
    p.add_argument("--yes", action="store_true", help="delete (default: only say what would go and how much it frees)")
    add_tracking_arg(p)
    p.set_defaults(run=cmd_gc)
    return parser


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
