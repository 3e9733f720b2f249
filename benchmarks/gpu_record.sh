#!/usr/bin/env bash
# The GPU record in one call, for a borrowed GPU machine (its python3 has torch, not MLflow or Optuna):
#   1. where the first epoch's one-time seconds go (first_epoch.py);
#   2. the whole 10-epoch baseline in the book's pipeline, the fast one and the compiled one, alternating
#      in one process (throughput.py --full), with a fresh compile cache: the cold compile;
#   3. the compiled pipeline again in a new process on the same cache: the warm compile;
#   4. what tracking costs on the baseline, broken down (tracking_overhead.py --baseline --breakdown;
#      MLflow from the carried wheels in .whl/);
#   5. trials an hour one at a time, as K workers and as packs of K (sweep_throughput.py).
# Each part has its own time limit and writes its record as soon as it ends, so one part that fails or
# runs out of time costs only itself. Records go to $OUT (the device tool brings that folder back) or
# benchmarks/results/.
#
#   benchmarks/gpu_record.sh              # on the GPU machine, from the repository root: every part
#   benchmarks/gpu_record.sh tracking sweep-throughput   # only these parts (a second call, say)
#   benchmarks/gpu_record.sh --cpu-dry-run  # here: every part on tiny settings, to catch mistakes first
# Parts: first-epoch, full-baseline, warm-compile, tracking, sweep-throughput (together about 10 minutes on
# an H200, more than one call may run: split them over two calls; warm-compile reuses the cache that
# full-baseline fills, so keep the two in one call).
# It needs the dataset's four .gz files in data/fashion-mnist/ and, for part 4, the wheels in .whl/
# (both ignored by git; carried along with the checkout).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0; [ "${1:-}" = "--cpu-dry-run" ] && { dry=1; shift; }
parts=" ${*:-first-epoch full-baseline warm-compile tracking sweep-throughput} "
out=${OUT:-benchmarks/results}; mkdir -p "$out"
export ALEXNET_DATA_DIR=$PWD/data/fashion-mnist ALEXNET_CACHE_DIR=${ALEXNET_CACHE_DIR:-/tmp/alexnet-cache}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d /tmp/inductor-XXXXXX)}  # fresh: part 2 compiles cold
py=${PYTHON:-python3}
stamp=$(date -u +%Y%m%d-%H%M%S)
if [ $dry = 1 ]; then
  kind=cpu-dry-run
  first=(--device cpu --resize 67 --train-limit 256 --test-limit 200)
  full=(--full --device cpu --resize 67 --steps 2 --test-limit 200 --epochs 1 --pipelines book,fast)
  warm=(--device cpu --resize 67 --steps 2 --rounds 1 --test-limit 200 --pipelines fast)
  tracking=(--rounds 1 --breakdown --no-warm-up --set epochs=1 --set train_limit=256)
  sweep=(--device cpu --resizes 67 --ks 2 --steps 2 --batch-size 32 --test-limit 64)
else
  kind=$($py -c 'import torch; print(torch.cuda.get_device_name().lower().replace(" ", "-"))' 2>/dev/null || echo gpu)
  first=()
  full=(--full --pipelines book,fast,fast-compile)
  warm=(--pipelines fast-compile --rounds 1 --steps 20 --test-limit 1000)
  tracking=(--baseline --rounds 1 --breakdown)
  sweep=(--resizes 67,96,224 --ks 2,4,8 --steps 30)
fi

part() {  # part SECONDS NAME COMMAND...: run it within SECONDS, if asked for; say how it ended
  local secs=$1 name=$2; shift 2
  case "$parts" in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (at most ${secs} s): $*"
  local t0=$SECONDS
  timeout "$secs" "$@"; local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

nvidia-smi -L 2>/dev/null || echo "no NVIDIA GPU visible"
if ! $py -c 'import mlflow' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d /tmp/site-XXXXXX)
    $py -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl && export PYTHONPATH=$PWD:$site
  fi
fi
$py -c 'import mlflow, optuna; print("mlflow", mlflow.__version__, "optuna", optuna.__version__)' \
  || echo "MLflow or Optuna missing: part 4 will fail"

part 75 first-epoch $py benchmarks/first_epoch.py "${first[@]}" --out "$out/first-epoch-$kind-$stamp.json"
part 260 full-baseline $py benchmarks/throughput.py "${full[@]}" --out "$out/full-$kind-$stamp.json"
part 50 warm-compile $py benchmarks/throughput.py "${warm[@]}" --out "$out/warm-compile-$kind-$stamp.json"
part 160 tracking $py benchmarks/tracking_overhead.py "${tracking[@]}" --json "$out/tracking-$kind-$stamp.json"
if [ -f benchmarks/sweep_throughput.py ]; then
  part 240 sweep-throughput $py benchmarks/sweep_throughput.py "${sweep[@]}" --out "$out/sweep-throughput-$kind-$stamp.json"
fi
rm -rf "$TORCHINDUCTOR_CACHE_DIR"
ls -la "$out"
