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


def cmd_train(args) -> int:
    from tqdm import tqdm

    from alexnet.config import load_config
    from alexnet.train import Diverged, resolve_device, resolve_precision, train

    cfg = load_config(args.file, args.sets)
    say = (lambda line: None) if args.quiet else (lambda line: tqdm.write(line, file=sys.stderr))
    device = resolve_device(cfg)
    say(f"training {args.file}: {cfg.epochs} epochs, resize {cfg.resize}, lr {cfg.lr}, batch {cfg.batch_size}, "
        f"on {device} ({cfg.pipeline} pipeline, {resolve_precision(cfg, device)})")
    try:
        if args.no_track:
            records = []
            for record in train(cfg, progress=not args.quiet):
                records.append(record)
                say(epoch_line(record, cfg.epochs))
        else:
            from alexnet import tracking

            if args.tracking_uri:
                os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
            run = tracking.tracked_train(cfg, source=args.file, progress=not args.quiet,
                                         on_epoch=lambda record, run_id: say(epoch_line(record, cfg.epochs)))
            records = run.records
            say(f"mlflow run {run.run_id} in experiment {cfg.experiment!r} at {tracking.redact(tracking.tracking_uri())}")
    except Diverged as e:
        print(f"alexnet train: {e}", file=sys.stderr)
        return 1
    print(summary_line(records[-1]))
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
    """The README's main job: the chapter's baseline on a GPU, the smoke experiment elsewhere."""
    import torch

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    file = experiments / ("baseline.toml" if torch.cuda.is_available() else "smoke.toml")
    print(f"demo: {'a GPU is' if torch.cuda.is_available() else 'no GPU:'} running {file.relative_to(Path.cwd()) if file.is_relative_to(Path.cwd()) else file}",
          file=sys.stderr)
    args.file, args.sets, args.no_track, args.tracking_uri = str(file), list(args.sets), False, None
    return cmd_train(args)


def build_parser() -> argparse.ArgumentParser:
    from alexnet.config import describe_fields

    parser = argparse.ArgumentParser(
        prog="alexnet", description="AlexNet on Fashion-MNIST (d2l 7.1): train, track in MLflow, sweep with Optuna.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fields_help = "config fields (default, meaning):\n" + describe_fields()

    p = sub.add_parser("train", help="train one experiment", epilog=fields_help,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train AlexNet on Fashion-MNIST with an experiment file's settings.")
    add_config_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-epoch lines; print only the summary")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow (pure speed runs)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow store or server (default: $MLFLOW_TRACKING_URI, else ./mlruns)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("demo", help="the README's main job: smoke run on a CPU, the baseline on a GPU",
                       description="Train experiments/baseline.toml on a GPU, experiments/smoke.toml elsewhere, logged to MLflow.")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        print(f"alexnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alexnet {args.command}: interrupted", file=sys.stderr)
        return 130
