"""Trials per hour on one device, three ways: one trial at a time, K worker processes sharing the device,
and packs of K (alexnet/training/pack.py: K trials trained as one stacked model).

Each way trains the same K short trials (the same settings but lr and dropout, one epoch of --steps
steps and --test-limit test images each) with the project's own trainers, `train` and `train_pack`,
each in fresh processes: the serial process runs the K trials one after another; K worker processes run
one trial each, side by side, each with its share of the CPU threads; the pack process runs one pack.
Every process first trains one warm-up step of the same shape (library start-up, cuDNN autotuning),
then waits until all are ready, so the clock covers training and evaluation alone (a sweep pays the
start-up once per worker, not per trial). MLflow and Optuna are not involved: it runs on a bare GPU
machine with torch and torchvision.

  python benchmarks/sweep_throughput.py                                  # GPU: resize 67, 96, 224; K 2, 4, 8
  python benchmarks/sweep_throughput.py --device cpu --ks 2,4 --steps 3 --batch-size 32 --test-limit 64

Printed and recorded per (resize, K, way): trials per hour, training examples per second (all K trials'
images / the wall time of the way), peak memory per trial (CUDA: the allocator's peak; CPU: the
processes' peak resident size, torch's own included, divided by the trials they held), MFU (against the
device's peak: alexnet/training/perf.py), and the speed-up over one trial at a time. A K that does not
fit in memory (`pack.check_fits`) is skipped and said so. A JSON record goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a plain checkout, installed or not

import torch  # noqa: E402

from alexnet import UsageError  # noqa: E402
from alexnet.training import perf  # noqa: E402
from alexnet.training.config import Config, parse_sets  # noqa: E402
from alexnet.training.pack import check_fits, train_pack  # noqa: E402
from alexnet.training.train import resolve_device, train  # noqa: E402

WAYS = ("serial", "workers", "pack")
LRS = (0.01, 0.02, 0.05, 0.03, 0.015, 0.04, 0.025, 0.008)  # the K trials' settings: a sweep's spread
DROPOUTS = (0.5, 0.3, 0.4, 0.6, 0.2, 0.5, 0.35, 0.45)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--resizes", default="67,96,224", help="comma-separated image sides (default: 67,96,224)")
    p.add_argument("--ks", default="2,4,8", help="comma-separated trials per pack / workers (default: 2,4,8)")
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, from: {', '.join(WAYS)}")
    p.add_argument("--steps", type=int, default=50, help="training steps per trial (default: 50)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (default: 128, the chapter's)")
    p.add_argument("--test-limit", type=int, default=1000, help="test images evaluated per trial (default: 1000)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config field for every trial, e.g. --set data_dir=/data")
    p.add_argument("--out", help="JSON record path (default: benchmarks/results/packs-<device>-<time>.json)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} wants comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} wants integers >= 1, got {text!r}")
    return values


def trial_configs(base: Config, k: int) -> list[Config]:
    return [replace(base, lr=LRS[i % len(LRS)], dropout=DROPOUTS[i % len(DROPOUTS)]) for i in range(k)]


# --- A measuring process ---------------------------------------------------------------------------

def child() -> int:
    """Orders on stdin (one JSON line), then 'ready' on stdout, a 'go' line on stdin, the figures on stdout."""
    orders = json.loads(sys.stdin.readline())
    torch.set_num_threads(orders["threads"])
    cfgs = [Config(**c) for c in orders["cfgs"]]
    device = resolve_device(cfgs[0])
    warm = [replace(c, train_limit=c.batch_size, test_limit=min(c.test_limit, c.batch_size)) for c in cfgs]
    run = (lambda cs: [list(train_pack(cs, progress=False))]) if orders["way"] == "pack" else \
        (lambda cs: [list(train(c, progress=False)) for c in cs])
    run(warm)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    run(cfgs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.time()
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"start": start, "end": end, "peak_bytes": peak}), flush=True)
    return 0


def measure(way: str, cfgs: list[Config], threads: int) -> dict:
    """Start the way's processes, let them warm up, start their clocks together, collect their figures."""
    groups = [cfgs] if way in ("serial", "pack") else [[c] for c in cfgs]
    each = threads if way != "workers" else max(1, threads // len(groups))
    procs = [subprocess.Popen([sys.executable, __file__, "--child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=ROOT) for _ in groups]
    try:
        for proc, group in zip(procs, groups):
            proc.stdin.write(json.dumps({"way": way, "threads": each, "cfgs": [asdict(c) for c in group]}) + "\n")
            proc.stdin.flush()
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{way}: a process failed while warming up (exit {proc.wait()})")
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [json.loads(proc.stdout.readline()) for proc in procs]
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait()
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    trials = len(cfgs)
    return {"processes": len(procs), "threads_each": each, "seconds": seconds, "trials": trials,
            "peak_bytes_per_process": [r["peak_bytes"] for r in results],
            "peak_bytes_per_trial": sum(r["peak_bytes"] for r in results) / trials}


def figures(m: dict, cfg: Config, peak_tflops: float) -> dict:
    train_examples, test_examples = m["trials"] * cfg.train_limit, m["trials"] * cfg.test_limit
    tflops = perf.training_flops(cfg.resize, train_examples, test_examples) / m["seconds"] / 1e12
    return {**m, "trials_per_hour": m["trials"] * 3600 / m["seconds"],
            "examples_per_sec": train_examples / m["seconds"], "tflops": tflops, "mfu": tflops / peak_tflops}


# --- The run ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child()
    try:
        return benchmark(args, argv)
    except UsageError as e:
        print(f"sweep_throughput: {e}", file=sys.stderr)
        return 2


def benchmark(args, argv) -> int:
    from throughput import environment, write_json  # benchmarks/throughput.py: the record's common keys

    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    resizes, ks = ints(args.resizes, "--resizes"), ints(args.ks, "--ks")
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not ways or set(ways) - set(WAYS):
        raise UsageError(f"--ways: from {', '.join(WAYS)}, got {args.ways!r}")
    sets = parse_sets(args.sets)
    bases = {r: Config(**{"epochs": 1, "device": args.device, **sets, "resize": r, "batch_size": args.batch_size,
                          "train_limit": args.steps * args.batch_size, "test_limit": args.test_limit})
             for r in resizes}
    device = resolve_device(bases[resizes[0]])
    started = datetime.now(timezone.utc)
    env = environment(device)
    threads = torch.get_num_threads()
    say(f"sweep throughput on {env['device']['name']}: measuring the matmul peak")
    peak = perf.device_peak(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows = []
    for resize in resizes:
        for k in ks:
            cfgs = trial_configs(bases[resize], k)
            row = {"resize": resize, "k": k, "ways": {}, "skipped": {}}
            for way in ways:
                try:
                    if way != "serial":
                        check_fits(k, cfgs[0], device)
                except UsageError as e:
                    row["skipped"][way] = str(e)
                    say(f"resize {resize}, K {k}, {way}: skipped ({e})")
                    continue
                say(f"resize {resize}, K {k}: {way} ...")
                row["ways"][way] = figures(measure(way, cfgs, threads), cfgs[0], peak["tflops"])
            serial = row["ways"].get("serial")
            for f in row["ways"].values():
                f["x_serial"] = f["trials_per_hour"] / serial["trials_per_hour"] if serial else None
            rows.append(row)

    result = {"kind": "packs", "timestamp": started.isoformat(timespec="seconds"), "host": platform.node(),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              **env, "peak": peak,
              "settings": {"steps": args.steps, "batch_size": args.batch_size, "test_limit": args.test_limit,
                           "epochs": 1, "threads": threads, "lrs": LRS, "dropouts": DROPOUTS, "sets": sets,
                           "flops_counted": "conv+linear multiply-adds x2; training image 3x forward, test image 1x"},
              "rows": rows}
    print_table(result)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"]["name"].lower()).strip("-") or device.type
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"packs-{slug}-{started:%Y%m%d-%H%M%S}.json"
    write_json(out, result)
    print(f"record: {out}")
    return 0


def print_table(result: dict) -> None:
    peak, s = result["peak"], result["settings"]
    print(f"device: {result['device']['name']} ({result['device']['type']}), torch {result['versions']['torch']}; "
          f"MFU against {peak['tflops']:.4g} TFLOP/s ({peak['source']})")
    print(f"each trial: 1 epoch of {s['steps']} steps at batch {s['batch_size']}, {s['test_limit']} test images; "
          f"{s['threads']} threads in all")
    print(f"{'resize':>6}{'K':>3}  {'way':<8}{'trials/h':>10}{'ex/s':>9}{'MiB/trial':>10}{'MFU':>7}{'x serial':>9}")
    for row in result["rows"]:
        for way, f in row["ways"].items():
            print(f"{row['resize']:>6}{row['k']:>3}  {way:<8}{f['trials_per_hour']:>10,.0f}{f['examples_per_sec']:>9,.1f}"
                  f"{f['peak_bytes_per_trial'] / 2**20:>10,.0f}{f['mfu']:>7.1%}{f['x_serial']:>8.2f}x")
        for way, why in row["skipped"].items():
            print(f"{row['resize']:>6}{row['k']:>3}  {way:<8}skipped: {why}")


if __name__ == "__main__":
    sys.exit(main())
