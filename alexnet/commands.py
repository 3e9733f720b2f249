"""What each `alexnet` command does, given its parsed arguments (`alexnet/cli.py` parses them). Each
imports torch, MLflow or Optuna only when it runs, so `alexnet --help` and a bad argument answer at once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from alexnet import UsageError


def cmd_train(args) -> int:
    from alexnet.training.config import load_config

    resume = args.resume
    parse_tags(args.tags)  # checked before anything starts
    if resume:  # the run's own config, from its store
        if args.file or args.sets or args.no_track or args.tags:
            raise UsageError("--resume continues a run with its own config and tags: drop the experiment file, --set, "
                             "--tag and --no-track")
        from alexnet.tracking import lifecycle

        cfg = lifecycle.resume_config(resume)
    elif not args.file:
        raise UsageError("name an experiment file (e.g. experiments/smoke.toml), or --resume RUN_ID")
    else:
        cfg = load_config(args.file, args.sets)  # checked before torch is even imported
    from tqdm import tqdm

    from alexnet.training import data
    from alexnet.training.train import Diverged, check_device, resolve_precision, train

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
            from alexnet import home
            from alexnet.tracking import lifecycle

            home.announce(cfg.experiment)

            def on_start(run_id):
                started["run_id"] = run_id
                say(f"{what}\nmlflow run {run_id} (if it stops early: alexnet train --resume {run_id})")

            run = lifecycle.tracked_train(cfg, source=args.file, progress=not args.quiet, resume_run_id=resume,
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
    """Train a run again from its record and compare, epoch by epoch (alexnet/team/reproduce.py)."""
    from alexnet.team import reproduce

    return reproduce.reproduce(args.run_id, force=args.force, quiet=args.quiet)


def cmd_summary(args) -> int:
    from alexnet.training.model import summary

    print(summary(args.resize))
    return 0


def cmd_config(args) -> int:
    from alexnet.training.config import load_config, to_toml

    print(to_toml(load_config(args.file, args.sets)), end="")
    return 0


def cmd_demo(args) -> int:
    """The README's main job: the chapter's baseline on a GPU (the smoke experiment on a CPU), then a
    small smoke sweep, the sweep's leaderboard and the command that opens the MLflow UI."""
    import torch

    from alexnet.compare import runs
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
    print(f"demo 2/2: sweeps/demo.toml: {sweep.n_trials} trials of {spec.describe_space(sweep.space)}", file=sys.stderr)
    result = launcher.run_sweep(sweep, 1, quiet=args.quiet)
    print(report.summary_text(sweep, result))
    print(runs.format_table(runs.leaderboard(sweep=sweep.study, limit=10), {"sweep": sweep.study}))
    print("compare every run, metric and checkpoint in the MLflow UI:  .venv/bin/alexnet ui")
    return result["status"]


def cmd_sweep(args) -> int:
    """An Optuna study; every trial a child MLflow run under one parent run (alexnet/sweep/)."""
    from alexnet.sweep.spec import load_sweep

    sweep = load_sweep(args.file, args.sets, n_trials=args.n_trials, storage=args.storage,
                       pack=args.pack, sweep_sets=args.sweep_sets)  # before torch or MLflow
    if not args.ray and (args.gpus_per_worker is not None or args.cpus_per_worker is not None):
        raise UsageError("--gpus-per-worker and --cpus-per-worker ask Ray for resources: add --ray ADDRESS")
    if args.dry_run:
        if args.ray:
            raise UsageError("--dry-run runs on this machine, in a temporary store: drop --ray")
        if args.warm_start or args.enqueue:
            raise UsageError("--dry-run runs in a temporary store, without earlier studies or runs: drop --warm-start "
                             "and --enqueue")
        from alexnet.sweep.dry_run import dry_run

        return dry_run(sweep, args.workers, quiet=args.quiet)
    cluster = None
    if args.ray:
        try:
            from alexnet.sweep.ray_workers import Cluster
        except ImportError as e:
            raise UsageError(f"--ray needs Ray ({e}): pip install 'alexnet-sweeps[ray]'") from None
        cluster = Cluster(args.ray, args.gpus_per_worker, args.cpus_per_worker or 1.0)
    waiting = None
    if cluster is None:  # they import torch and MLflow while this process imports its own and checks
        from alexnet.sweep import local_workers

        waiting = local_workers.start(args.workers, sweep.config["device"])
    from alexnet.compare import runs
    from alexnet.sweep import launcher, report

    result = launcher.run_sweep(sweep, args.workers, quiet=args.quiet, cluster=cluster, waiting=waiting,
                                warm_start=args.warm_start, enqueue_runs=args.enqueue)
    print(report.summary_text(sweep, result))
    if not args.quiet:
        print(runs.format_table(runs.leaderboard(sweep=sweep.study, limit=10), {"sweep": sweep.study}))
    if result["status"] == 130:
        print("alexnet sweep: interrupted; run the same command again to resume", file=sys.stderr)
    return result["status"]


def cmd_confirm(args) -> int:
    """Re-run the study's top configurations and its baseline with fresh seeds (alexnet/sweep/confirm.py)."""
    from alexnet.sweep import confirm

    return confirm.confirm(args.study, top=args.top, seeds=args.seeds, storage=args.storage, quiet=args.quiet)


def cmd_promote(args) -> int:
    """A sweep's confirmed winner into MLflow's model registry, alias 'champion' (alexnet/team/promote.py)."""
    from alexnet.team import promote

    return promote.promote(args.study, force=args.force, quiet=args.quiet)


def cmd_runs(args) -> int:
    """The leaderboard: one row per run, best first (alexnet/compare/runs.py)."""
    from alexnet import home
    from alexnet.compare import runs
    from alexnet.sweep import ledger
    from alexnet.tracking import store

    if args.pareto and not args.sweep:
        raise UsageError("--pareto prints a sweep's Pareto front: name the sweep with --sweep STUDY")
    # the board reads the store's tables itself (alexnet/compare/query.py); the front goes through MLflow
    store.set_up_store(open_store=args.pareto)
    home.announce(args.experiment or (None if args.sweep or args.parent else store.DEFAULT_EXPERIMENT))
    if args.pareto:
        from alexnet.sweep.pareto import format_front, read_front

        print(format_front(read_front(ledger.parent_run(args.sweep)), args.sweep))
        return 0
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
        from alexnet.compare import plots  # matplotlib: only for --plot

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
        tags = ledger.parent_run(args.sweep).data.tags
        if tags.get("sweep.warm_start"):  # seeded trials: measured by another study, no runs of their own here
            print(f"and {tags.get('sweep.warm_start.seeded')} trials seeded from study {tags['sweep.warm_start']!r}: "
                  f"alexnet runs --sweep {tags['sweep.warm_start'].split('@')[0]}", file=sys.stderr)
    return 0


def cmd_gc(args) -> int:
    """The retention policy applied to every run; MLflow-deleted runs removed for good (alexnet/team/cleanup.py)."""
    from alexnet.team import cleanup
    from alexnet import home
    from alexnet.tracking import store

    store.set_up_store()
    home.announce(None)
    return cleanup.gc(args.yes)


def cmd_ui(args) -> int:
    """The MLflow UI on the project's store (alexnet/compare/ui.py)."""
    from alexnet.compare import ui

    return ui.serve(args.host, args.port, args.allowed_hosts, args.experiment, sweep=args.sweep, top=args.top,
                    open_browser=args.open)


def cmd_server(args) -> int:
    """The team's MLflow tracking server on PostgreSQL, with the Optuna database (alexnet/team/server.py)."""
    from alexnet.team import server

    return server.serve(args.database, args.artifacts, args.host, args.port, args.allowed_hosts,
                        args.password_file, args.mlflow_db, args.optuna_db)


def cmd_push(args) -> int:
    """Copy local runs, and a sweep's Optuna study, to the team's servers (alexnet/team/push.py)."""
    from alexnet.team import push

    to_uri = args.to_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not to_uri or not to_uri.startswith(("http://", "https://")):
        raise UsageError("push: name the team's tracking server: --to-tracking-uri http://HOST:PORT (or export "
                         "MLFLOW_TRACKING_URI)")
    return push.push(to_uri, args.to_storage or os.environ.get("ALEXNET_STORAGE"), args.experiment, args.study,
                     args.from_tracking_uri, args.from_storage)
