"""Where the first epoch's extra seconds go: each one-time cost of the fast pipeline, timed apart.

On an H200 the baseline's first epoch took 7.96 s against 2.33 s for each later one
(results/full-nvidia-h200-20261126-050523.json). Candidates: CUDA's lazy initialisation, the model's and
the data's move to the device, the allocator growing its pools, and cuDNN's autotuning, which times every
algorithm for each new convolution shape (the training batch, the shorter last batch, the evaluation
batch) the first time it runs. Each is timed here in a fresh process, in the order `train()` meets them,
with a device sync around each, for cuDNN autotuning on and off; then the same step again, to show what
a step costs once nothing is new.

    python benchmarks/first_epoch.py                            # GPU: the baseline's shapes (resize 224)
    python benchmarks/first_epoch.py --device cpu --resize 67   # CPU: the same stages (no autotuning)

Prints one line per stage and writes a JSON record to benchmarks/results/first-epoch-<device>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROBE = """
import json, sys, time
import torch, torch.nn.functional as F
t_import = time.perf_counter()
from alexnet.training import data
from alexnet.training.config import Config
from alexnet.training.model import alexnet, init_weights
from alexnet.training.train import batch_sizes, resolve_device, set_determinism, speed_switches
cfg = Config(**json.loads(sys.argv[1]))
device = resolve_device(cfg)
cuda = device.type == "cuda"
sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
stages = []
def timed(name, fn):
    sync(); t0 = time.perf_counter(); out = fn(); sync()
    stages.append({"stage": name, "seconds": time.perf_counter() - t0})
    return out
timed("device init (CUDA context, first allocation)", lambda: (torch.ones(8, device=device) * 2).sum().item())
switches = speed_switches(cfg, device)
set_determinism(switches)
amp = torch.bfloat16 if switches["precision"] == "bf16" else None
def build():
    torch.manual_seed(cfg.seed)
    m = alexnet(cfg.dropout, cfg.resize); init_weights(m); m.to(device)
    if switches["channels_last"]:
        m.to(memory_format=torch.channels_last)
    return m
model = timed("model built and moved to the device", build)
opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, fused=True if switches["fused_sgd"] else None)
splits = timed("data loaded and moved to the device", lambda: data.Splits(cfg, device, switches["eval_batch_size"], switches["channels_last"]))
fmt = torch.channels_last if switches["channels_last"] else torch.contiguous_format
def step(b):
    x = torch.rand(b, 1, cfg.resize, cfg.resize, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (b,), device=device)
    model.train(); opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        loss = F.cross_entropy(model(x), y)
    loss.backward(); opt.step()
@torch.no_grad()
def infer(b):
    x = torch.rand(b, 1, cfg.resize, cfg.resize, device=device).contiguous(memory_format=fmt)
    model.eval()
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        model(x).argmax(1)
n_train = splits.sizes["train"]
for b in batch_sizes(n_train, cfg.batch_size):
    timed(f"training step, batch {b}, first time", lambda: step(b))
    timed(f"training step, batch {b}, again", lambda: step(b))
for b in batch_sizes(splits.sizes["test"], switches["eval_batch_size"]):
    timed(f"evaluation batch {b}, first time", lambda: infer(b))
    timed(f"evaluation batch {b}, again", lambda: infer(b))
peak = torch.cuda.max_memory_reserved(device) if cuda else 0
print(json.dumps({"stages": stages, "switches": switches, "peak_reserved_bytes": peak}))
"""


def probe(settings: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(settings)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise SystemExit(f"first_epoch: the probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--resize", type=int, default=224)
    p.add_argument("--train-limit", type=int, default=0, help="training images (0: all 60,000)")
    p.add_argument("--test-limit", type=int, default=0, help="test images (0: all 10,000)")
    p.add_argument("--out", help="JSON record path (default: benchmarks/results/first-epoch-<device>-<time>.json)")
    args = p.parse_args(argv)
    base = {"device": args.device, "resize": args.resize, "train_limit": args.train_limit,
            "test_limit": args.test_limit}
    variants = {"autotuning on (the default)": {**base, "cudnn_benchmark": True},
                "autotuning off": {**base, "cudnn_benchmark": False}}
    result = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
              "command": " ".join(["python", *sys.argv]), "python": platform.python_version(), "variants": {}}
    for name, settings in variants.items():
        r = probe(settings)
        result["variants"][name] = r
        print(f"{name}:")
        for s in r["stages"]:
            print(f"  {s['seconds']:8.3f} s  {s['stage']}")
        print(f"  {sum(s['seconds'] for s in r['stages']):8.3f} s  in all")
    import torch

    device = "cpu" if args.device == "cpu" or not torch.cuda.is_available() else torch.cuda.get_device_name()
    result["device"] = device
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")[:40]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"first-epoch-{slug}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
