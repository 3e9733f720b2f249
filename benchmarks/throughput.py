"""The book's pipeline against the fast one, side by side: one device, one process, alternating.

Each pipeline is the project's own `train()` (alexnet/training/train.py) with `pipeline = "book"` or "fast";
the script advances the trainings in turn, one epoch each, so every pipeline meets the device in the
same state and any drift in the machine's speed hits them alike. Two modes:

  throughput (default): one warm-up epoch each (data loading, worker start-up, cuDNN autotuning,
    compilation), then --rounds timed epochs each of --steps steps, evaluation included.
  --full: the whole baseline (10 epochs, evaluations included, nothing excluded but torch.compile's
    one-time compilation), with the project's targets checked: on an H100 or H200 the fast pipeline
    in <= 30 s of wall time, >= 5x the book's end-to-end examples/s, test accuracy 0.88 +/- 0.01 on both.

  python benchmarks/throughput.py                  # the chapter's settings: resize 224, batch 128, full epochs
  python benchmarks/throughput.py --full --pipelines book,fast,fast-compile
  python benchmarks/throughput.py --device cpu --resize 67 --steps 8 --test-limit 256 --rounds 1   # CPU smoke

Printed per pipeline: examples/s as the book counts them (training examples / summed step time:
data loading and evaluation left out), examples/s end to end (training examples / whole epochs,
evaluation included), achieved TFLOP/s and MFU on both clocks (what is counted: alexnet/training/perf.py),
and the ratio to the book pipeline. A JSON record goes to benchmarks/results/ (see its README).
It imports neither mlflow nor optuna, so it runs on a bare GPU machine with torch and torchvision.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a plain checkout, installed or not

import torch  # noqa: E402
import torchvision  # noqa: E402

# The book's 4 workers are the point of the book pipeline, even where torch suggests fewer.
warnings.filterwarnings("ignore", message="This DataLoader will create")

from alexnet import UsageError  # noqa: E402
from alexnet.training import perf
from alexnet.training.config import Config, parse_sets  # noqa: E402
from alexnet.training.train import resolve_device, speed_switches, train  # noqa: E402

# Pipelines by name: config overrides on top of the shared settings.
VARIANTS = {
    "book": {"pipeline": "book"},                            # the chapter: PIL in 4 workers, fp32, sync each step
    "fast": {"pipeline": "fast"},                            # the default: every speed switch on
    "fast-compile": {"pipeline": "fast", "compile": True},   # plus torch.compile (compile time apart)
    "fast-fp32": {"pipeline": "fast", "precision": "fp32"},  # the fast pipeline in the chapter's arithmetic
}
FULL_TRAIN, FULL_TEST = 60_000, 10_000
TARGET_GPUS = ("H100", "H200")  # the targets are set for these
TARGET_WALL_SECONDS, TARGET_ACC, TARGET_ACC_TOL = 30.0, 0.88, 0.01


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--pipelines", default="book,fast", help=f"comma-separated, from: {', '.join(VARIANTS)} (default: book,fast)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--resize", type=int, default=224, help="image side in pixels (default: 224, the chapter's)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (default: 128, the chapter's)")
    p.add_argument("--steps", type=int, default=0, help="training steps per epoch; 0: the whole training set (469 at batch 128)")
    p.add_argument("--test-limit", type=int, default=0, help="test images evaluated per epoch; 0: all 10,000")
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per pipeline after the warm-up (default: 3)")
    p.add_argument("--full", action="store_true", help="train the full baseline (--epochs, default 10) and check the targets")
    p.add_argument("--epochs", type=int, default=10, help="epochs of --full (default: 10, the chapter's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config field for every pipeline, e.g. --set data_dir=/data --set lr=0.01")
    p.add_argument("--out", help="JSON record path (default: benchmarks/results/<mode>-<device>-<time>.json)")
    return p.parse_args(argv)


def build_configs(args) -> dict[str, Config]:
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise UsageError(f"unknown pipeline {', '.join(unknown) or '(none)'} (known: {', '.join(VARIANTS)})")
    if args.steps < 0 or args.steps * args.batch_size > FULL_TRAIN:
        raise UsageError(f"--steps x --batch-size must be 0 to {FULL_TRAIN:,} training images, "
                         f"got {args.steps} x {args.batch_size}")
    if args.rounds < 1 or args.epochs < 1:
        raise UsageError("--rounds and --epochs must be >= 1")
    shared = {"resize": args.resize, "batch_size": args.batch_size, "seed": args.seed, "device": args.device,
              "train_limit": args.steps * args.batch_size, "test_limit": args.test_limit,
              "epochs": args.epochs if args.full else 1 + args.rounds}
    shared.update(parse_sets(args.sets))
    return {name: Config(**{**shared, **VARIANTS[name]}) for name in dict.fromkeys(names)}


def alternate(cfgs: dict[str, Config], epochs: int, say) -> tuple[dict[str, list[tuple]], dict[str, str]]:
    """One `train()` per pipeline, advanced in turn one epoch at a time. Returns {name: [(record,
    seconds)]}, seconds being the wall time of that epoch's `next()` (the first includes the set-up),
    and {name: error} for a pipeline that failed (say, no C compiler for torch.compile): the others
    go on, so one broken variant does not cost the whole run on a borrowed GPU."""
    runs = {name: train(cfg, progress=False) for name, cfg in cfgs.items()}
    out, errors = {name: [] for name in cfgs}, {}
    try:
        for epoch in range(1, epochs + 1):
            for name, run in runs.items():
                if name in errors:
                    continue
                t0 = time.perf_counter()
                try:
                    record = next(run)
                except UsageError:
                    raise
                except Exception as e:  # noqa: BLE001 - recorded, reported, and the run goes on
                    errors[name] = f"{type(e).__name__}: {e}"[:2000]
                    say(f"{name:>12} FAILED at epoch {epoch}: {errors[name]}")
                    continue
                out[name].append((record, time.perf_counter() - t0))
                say(f"{name:>12} epoch {epoch}/{epochs}: loss {record.train_loss:.3f}, test acc {record.test_acc:.3f}, "
                    f"{record.examples_per_sec:,.0f} examples/s ({record.wall_examples_per_sec:,.0f} end to end), "
                    f"{record.epoch_seconds:.2f} s" + (f", compile {record.compile_seconds:.1f} s" if record.compile_seconds else ""))
    finally:
        for run in runs.values():
            run.close()
    return out, errors


def figures(cfg: Config, epochs: list[tuple], peak_tflops: float) -> dict:
    """Speed over the given epochs: examples/s on both clocks, TFLOP/s and MFU on both."""
    n_train, n_test = cfg.train_limit or FULL_TRAIN, cfg.test_limit or FULL_TEST
    step_seconds = sum(n_train / r.examples_per_sec for r, _ in epochs)
    wall_seconds = sum(r.epoch_seconds for r, _ in epochs)
    step_tflops = perf.training_flops(cfg.resize, n_train * len(epochs)) / step_seconds / 1e12
    wall_tflops = perf.training_flops(cfg.resize, n_train * len(epochs), n_test * len(epochs)) / wall_seconds / 1e12
    return {
        "epochs_timed": len(epochs), "train_examples": n_train * len(epochs), "test_examples": n_test * len(epochs),
        "step_seconds": step_seconds, "wall_seconds": wall_seconds,
        "examples_per_sec": n_train * len(epochs) / step_seconds,
        "wall_examples_per_sec": n_train * len(epochs) / wall_seconds,
        "step_tflops": step_tflops, "wall_tflops": wall_tflops,
        "step_mfu": step_tflops / peak_tflops, "wall_mfu": wall_tflops / peak_tflops,
    }


def epoch_rows(epochs: list[tuple]) -> list[dict]:
    return [{**{k: v for k, v in asdict(r).items() if k != "state"}, "next_seconds": s} for r, s in epochs]


def full_run_figures(epochs: list[tuple]) -> dict:
    """The whole training as a user waits for it: set-up, every epoch and evaluation; compile apart."""
    last, compile_seconds, warmup_seconds = epochs[-1][0], epochs[0][0].compile_seconds, epochs[0][0].warmup_seconds
    wall = sum(s for _, s in epochs)
    return {"test_acc": last.test_acc, "train_acc": last.train_acc, "train_loss": last.train_loss,
            "best_test_acc": last.best_test_acc, "best_epoch": last.best_epoch, "compile_seconds": compile_seconds,
            "warmup_seconds": warmup_seconds, "wall_seconds": wall, "wall_seconds_excl_compile": wall - compile_seconds,
            "wall_seconds_excl_warmup": wall - warmup_seconds,
            "train_eval_seconds": sum(r.epoch_seconds for r, _ in epochs)}


def check_targets(result: dict, device_label: str, full: bool) -> dict:
    """The targets, each {value, limit, met}; `applies` says whether this device is one they
    were set for (H100/H200 on CUDA; the CPU has its own: fast no slower than book)."""
    cpu = result["device"]["type"] == "cpu"
    targets = {"applies": cpu or any(g in device_label for g in TARGET_GPUS)}
    book = result["pipelines"].get("book")
    for name, p in result["pipelines"].items():
        if name not in ("fast", "fast-compile"):  # the speed targets are the fast default's, compiled or not
            continue
        if book is not None:
            limit = 1.0 if cpu else 5.0
            ratio = p["wall_examples_per_sec"] / book["wall_examples_per_sec"]
            targets[f"{name}/book end to end >= {limit:g}x"] = {"value": ratio, "limit": limit, "met": ratio >= limit}
        if full and not cpu:
            wall = p["full"]["wall_seconds_excl_warmup"]
            targets[f"{name} full baseline <= {TARGET_WALL_SECONDS:g} s"] = {
                "value": wall, "limit": TARGET_WALL_SECONDS, "met": wall <= TARGET_WALL_SECONDS}
    if full and not cpu:
        for name, p in result["pipelines"].items():
            acc = p["full"]["test_acc"]
            targets[f"{name} test acc {TARGET_ACC} +/- {TARGET_ACC_TOL}"] = {
                "value": acc, "limit": [TARGET_ACC - TARGET_ACC_TOL, TARGET_ACC + TARGET_ACC_TOL],
                "met": abs(acc - TARGET_ACC) <= TARGET_ACC_TOL + 1e-9}
    return targets


def environment(device: torch.device) -> dict:
    return {
        "device": {"type": device.type, "name": perf.device_name(device),
                   **({"capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                       "memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)}
                      if device.type == "cuda" else {"threads": torch.get_num_threads(), "cpus": os.cpu_count()})},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None},
        # PyTorch's defaults, left alone: fp32 convolutions may use TF32 on Ampere and newer; matmuls do not.
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
    }


def print_table(result: dict) -> None:
    peak = result["peak"]
    print(f"device: {result['device']['name']} ({result['device']['type']}), torch {result['versions']['torch']}; "
          f"MFU against {peak['tflops']:.4g} TFLOP/s ({peak['source']}); "
          f"measured {peak['measured_dtype']} matmul: {peak['measured_matmul_tflops']:.4g} TFLOP/s")
    s = result["settings"]
    print(f"settings: resize {s['resize']}, batch {s['batch_size']}, {s['train_examples_per_epoch']:,} training and "
          f"{s['test_examples_per_epoch']:,} test images an epoch; " + (
              f"{s['epochs']} epochs, alternating" if s["mode"] == "full" else
              f"1 warm-up + {s['timed_epochs']} timed epoch(s) each, alternating"))
    print(f"FLOPs: {s['forward_gflop_per_image']:.3f} GFLOP forward per image; a training image counts 3x, a test image 1x")
    head = (f"{'pipeline':<13}{'precision':<10}{'ex/s (book)':>12}{'ex/s (e2e)':>12}{'TFLOP/s':>9}"
            f"{'(e2e)':>8}{'MFU':>7}{'(e2e)':>7}{'x book':>8}{'(e2e)':>7}")
    print(head)
    for name, p in result["pipelines"].items():
        r = result["ratios"].get(name, {})
        ratio = (f"{r['examples_per_sec']:>7.2f}x{r['wall_examples_per_sec']:>6.2f}x" if r else "")
        print(f"{name:<13}{p['switches']['precision']:<10}{p['examples_per_sec']:>12,.0f}{p['wall_examples_per_sec']:>12,.0f}"
              f"{p['step_tflops']:>9.3g}{p['wall_tflops']:>8.3g}{p['step_mfu']:>7.1%}{p['wall_mfu']:>7.1%}{ratio}")
    for name, failed in result.get("failed", {}).items():
        print(f"{name:<13}FAILED: {failed['error'].splitlines()[0][:200]}")
    if s["mode"] == "full":
        # warm-up: what runs before the clock (compiling, cuDNN's autotuning); wall: the rest of the run
        print(f"{'pipeline':<13}{'test acc':>9}{'train acc':>10}{'loss':>7}{'wall s':>9}{'warm-up s':>10}{'compile s':>10}")
        for name, p in result["pipelines"].items():
            f = p["full"]
            print(f"{name:<13}{f['test_acc']:>9.3f}{f['train_acc']:>10.3f}{f['train_loss']:>7.3f}"
                  f"{f['wall_seconds_excl_warmup']:>9.1f}{f['warmup_seconds']:>10.1f}{f['compile_seconds']:>10.1f}")
    targets = dict(result["targets"])
    applies = targets.pop("applies")
    for what, t in targets.items():
        value = f"{t['value']:.3f}" if isinstance(t["value"], float) else t["value"]
        print(f"target {what}: {'met' if t['met'] else 'NOT met'} ({value})"
              + ("" if applies else " [set for an H100/H200; informative here]"))


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)  # never a half-written record


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return benchmark(args, argv)
    except UsageError as e:  # a bad option or missing data: one line, exit 2, no record written
        print(f"throughput: {e}", file=sys.stderr)
        return 2


def benchmark(args, argv) -> int:
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    cfgs = build_configs(args)
    device = resolve_device(next(iter(cfgs.values())))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device here (use --device cpu)")
    started = datetime.now(timezone.utc)
    mode = "full" if args.full else "throughput"
    env = environment(device)
    say(f"{mode}: {', '.join(cfgs)} on {env['device']['name']}; measuring the matmul peak")
    peak = perf.device_peak(device)
    any_cfg = next(iter(cfgs.values()))
    epochs = any_cfg.epochs
    runs, errors = alternate(cfgs, epochs, say)

    result = {
        "kind": mode, "timestamp": started.isoformat(timespec="seconds"), "host": platform.node(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        **env, "peak": peak,
        "settings": {"mode": mode, "resize": any_cfg.resize, "batch_size": any_cfg.batch_size, "seed": any_cfg.seed,
                     "train_examples_per_epoch": any_cfg.train_limit or FULL_TRAIN,
                     "test_examples_per_epoch": any_cfg.test_limit or FULL_TEST,
                     "epochs": epochs, "timed_epochs": epochs if args.full else args.rounds,
                     "forward_gflop_per_image": perf.flops_per_image(any_cfg.resize) / 1e9,
                     "flops_counted": "conv+linear multiply-adds x2; training image 3x forward, test image 1x"},
        "pipelines": {}, "ratios": {},
    }
    for name, cfg in cfgs.items():
        if name in errors:
            result.setdefault("failed", {})[name] = {"config": asdict(cfg), "error": errors[name]}
            continue
        timed = runs[name] if args.full else runs[name][1:]  # throughput mode: the first epoch is warm-up
        entry = {"config": asdict(cfg), "switches": speed_switches(cfg, device),
                 **figures(cfg, timed, peak["tflops"]), "epochs": epoch_rows(runs[name])}
        if args.full:
            entry["full"] = full_run_figures(runs[name])
        result["pipelines"][name] = entry
    if not result["pipelines"]:
        raise RuntimeError(f"every pipeline failed: {errors}")
    reference = "book" if "book" in result["pipelines"] else next(iter(result["pipelines"]))
    ref = result["pipelines"][reference]
    for name, p in result["pipelines"].items():
        result["ratios"][name] = {"reference": reference,
                                  "examples_per_sec": p["examples_per_sec"] / ref["examples_per_sec"],
                                  "wall_examples_per_sec": p["wall_examples_per_sec"] / ref["wall_examples_per_sec"]}
    result["targets"] = check_targets(result, peak.get("label", env["device"]["name"]), args.full)

    print_table(result)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"]["name"].lower()).strip("-") or device.type
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{mode}-{slug}-{started:%Y%m%d-%H%M%S}.json"
    write_json(out, result)
    print(f"record: {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
