#!/usr/bin/env bash
# The whole team path on ONE machine, on loopback (127.0.0.1 only), in a few minutes on 2 cores:
#   1. a throw-away PostgreSQL (scripts/throwaway-postgres) and the team's servers (`alexnet server`);
#   2. a tiny CPU sweep file;
#   3. two workers started separately, as on two machines;
#   4. one of them killed with kill -9 mid-trial, and the same command run again: the dead trial is
#      retried with the same params and the study ends with exactly its count;
#   5. a Ray head kept on loopback, and more trials of the same study through `--ray`;
#   6. a sweep run on a laptop's own stores, copied to the servers with `alexnet push`;
#   7. `alexnet ui --sweep` against the server: the pages to open;
#   8. everything it started stopped, its temp folder removed; nothing else touched.
# Usage: recipes/team-on-one-machine.sh [--quick]   (--quick: fewer, smaller trials)
# Needs the set-up of `scripts/setup --test`: .venv with the `team` and `ray` extras, and PostgreSQL.
# Everything lives in one temp folder, /tmp/alexnet-team-XXXXXX (also the TMPDIR of all it starts);
# only the data cache (~/.cache/alexnet) is kept. Ctrl-C stops it all cleanly.
set -euo pipefail
me=team-on-one-machine
quick=0
case "${1:-}" in
  "") ;;
  --quick) quick=1 ;;
  -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: recipes/team-on-one-machine.sh [--quick]" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$repo/.venv/bin
if [ ! -x "$venv/python" ] || [ ! -x "$venv/alexnet" ] || [ ! -x "$venv/ray" ] \
   || ! "$venv/python" -c 'import sys, importlib.util as u; sys.exit(not (u.find_spec("psycopg") and u.find_spec("ray")))' \
   || ! { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; }; then
  echo "$me: set-up missing (.venv with the team and ray extras, PostgreSQL): run scripts/setup --test first" >&2
  exit 1
fi
# This checkout's `alexnet`, as `source .venv/bin/activate` would give it.
export PATH="$venv:$PATH" PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
unset MLFLOW_TRACKING_URI ALEXNET_STORAGE RAY_ADDRESS

say() { printf '\n== %s\n' "$*"; }                   # a step
note() { printf '   %s\n' "$@"; }                      # what it does
show() { printf '$ %s\n' "$*"; "$@"; }                 # a command, then what it prints
indent() { sed 's/^/   | /' "$@"; }                   # a log file or a background command's output
# The script's own few lines of Python ignore Ctrl-C (the script's trap handles it), so that an
# interrupt shows no traceback of theirs.
py() { ( trap '' INT; exec python "$@" ); }

wait_for() {  # SECONDS WHAT COMMAND...: poll COMMAND until it succeeds; fail after SECONDS
  local limit=$1 what=$2 start=$SECONDS
  shift 2
  until "$@"; do
    if (( SECONDS - start > limit )); then echo "$me: timed out after ${limit}s waiting for $what" >&2; return 1; fi
    sleep 1
  done
}

tree() {  # PIDs of these processes and of everything under them
  [ $# -gt 0 ] || return 0
  ps -e -o pid=,ppid= | awk -v roots="$*" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
    { parent[$1] = $2 }
    END { do { more = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; more = 1 } } while (more)
          for (p in keep) print p }'
}

terminate() {  # SECONDS PID...: SIGTERM, up to SECONDS for them to exit, then SIGKILL
  local limit=$1 pid alive
  shift
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq $((limit * 2))); do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.5
  done
  kill -KILL "$@" 2>/dev/null || true
}

# The Ray head's processes are found by the temp folder on their command lines (`--temp-dir`), their
# workers as their descendants. `ray stop` is never used: it stops every Ray process of the machine,
# other users' clusters included.
ray_head_pids() { [ -n "${tmp:-}" ] && tree $(pgrep -f -- "$tmp/ray( |/|\$)" || true); }

launchers=()   # the `alexnet sweep` commands started in the background
server_pid=""
pg_started=0
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  set +e
  [ -n "${tmp:-}" ] || exit $status
  say "Stopping everything this walkthrough started"
  local pid kids
  for pid in "${launchers[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      # SIGTERM to the launcher alone: it passes one SIGINT to its workers, which end their trials KILLED
      # and queue them again (a second signal would interrupt that).
      note "sweep launcher (pid $pid)"
      kids=$(tree "$pid")
      terminate 150 "$pid"
      terminate 10 $kids
    fi
  done
  if [ -n "$(ray_head_pids)" ]; then note "the Ray head (only its own processes, found by $tmp/ray)"; terminate 30 $(ray_head_pids); fi
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    note "alexnet server (pid $server_pid), which stops its mlflow server"
    kids=$(tree "$server_pid")
    terminate 60 "$server_pid"
    terminate 10 $kids
  fi
  if (( pg_started )); then note "PostgreSQL"; "$repo/scripts/throwaway-postgres" stop "$tmp/pg"; fi
  # Whatever is left that inherited this walkthrough's TMPDIR was started by it (no other process has it).
  export TMPDIR=/tmp
  local left
  left=$(grep -lzx "TMPDIR=$tmp/tmp" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx "$$" || true)
  if [ -n "$left" ]; then note "left over: $(echo $left)"; terminate 10 $left; fi
  rm -rf "$tmp"
  note "removed $tmp"
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_ports() {  # three free TCP ports on loopback
  py - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
}

trial_of() {  # PID: the trial a sweep worker process is training, once its MLflow run is RUNNING on the server
  py - "$1" <<'PY'
import json, os, sys, urllib.request
base = os.environ["MLFLOW_TRACKING_URI"]
def call(path, body=None):
    request = urllib.request.Request(base + path, json.dumps(body).encode() if body else None,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)
try:
    exp = call("/api/2.0/mlflow/experiments/get-by-name?experiment_name=alexnet-fashion-mnist")["experiment"]
    runs = call("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                "filter": f"tags.pid = '{sys.argv[1]}' and attributes.status = 'RUNNING'"}).get("runs", [])
except OSError:  # the experiment is not made yet
    runs = []
tags = {t["key"]: t["value"] for r in runs for t in r["data"].get("tags", [])}
print(tags.get("sweep.trial", ""))
sys.exit(0 if "sweep.trial" in tags else 1)
PY
}

# ---------------------------------------------------------------------------------------------------
tmp=$(mktemp -d /tmp/alexnet-team-XXXXXX)   # short: PostgreSQL's and Ray's sockets live under it
chmod 711 "$tmp"                              # as root the database runs as `postgres`, which must reach pg/
mkdir "$tmp/tmp"
export TMPDIR=$tmp/tmp ALEXNET_HOME=$tmp/team-home
cd "$tmp"
read -r pg_port mlflow_port ray_port < <(free_ports)
if (( quick )); then n1=3 n2=5 images=256 held=100; else n1=4 n2=6 images=512 held=200; fi

say "0. Where this runs"
note "checkout: $repo (its .venv/bin first on PATH)" \
     "temp folder: $tmp (removed at the end; the TMPDIR of everything started here)" \
     "ports on 127.0.0.1: PostgreSQL $pg_port, MLflow $mlflow_port, Ray $ray_port"

say "1. A throw-away PostgreSQL on 127.0.0.1:$pg_port"
note "A team runs its own database server; this one lives in $tmp/pg and is gone afterwards."
printf '$ %s\n' "scripts/throwaway-postgres start $tmp/pg $pg_port"
pg_started=1
database=$("$repo/scripts/throwaway-postgres" start "$tmp/pg" "$pg_port")
echo "$database"
note "Every worker needs the database password in its environment (or in ~/.pgpass), never on a command line:"
printf '$ %s\n' "export PGPASSWORD=\$(cat $tmp/pg/password)"
PGPASSWORD=$(cat "$tmp/pg/password")
export PGPASSWORD

say "2. The team's servers: alexnet server"
note "It creates the databases alexnet_mlflow (runs) and alexnet_optuna (studies), starts an MLflow tracking" \
     "server on the first with served artifacts (checkpoints and models travel over HTTP), and prints what" \
     "every worker exports. It runs until stopped; here it runs in the background."
printf '$ %s\n' "alexnet server --database $database --artifacts $tmp/artifacts --host 127.0.0.1 --port $mlflow_port > server.log 2>&1 &"
alexnet server --database "$database" --artifacts "$tmp/artifacts" --host 127.0.0.1 --port "$mlflow_port" \
  > server.log 2>&1 &
server_pid=$!
server_ready() {
  kill -0 "$server_pid" 2>/dev/null || { indent server.log >&2; echo "$me: alexnet server exited" >&2; exit 1; }
  grep -qs '^export ALEXNET_STORAGE=' server.log
}
wait_for 300 "alexnet server to answer" server_ready
indent server.log
eval "$(grep '^export ' server.log)"
note "The exports, as on every worker:"
grep '^export ' server.log | sed 's/^/$ /'

say "3. A tiny CPU sweep file: $tmp/team.toml"
note "Real Fashion-MNIST, $images images at resize 67, 2 epochs a trial, median pruning. At this size every" \
     "trial stays near chance (0.1): it shows the plumbing, not a result. heartbeat_seconds and" \
     "grace_seconds are short so that a dead worker's trial is retried within seconds (defaults: 10 and 60)." \
     "No base experiment: trial 0 is the chapter's lr 0.01 and dropout 0.5, the baseline."
cat > team.toml <<EOF
study = "team"
n_trials = $n1
pruner = "median"
pruner_startup_trials = 2
pruner_warmup_epochs = 0    # a trial may be stopped after its first epoch
keep_top = 2                # checkpoints and models of the best 2 trials only
heartbeat_seconds = 2
grace_seconds = 10

[set]
resize = 67
batch_size = 64
epochs = 2
train_limit = $images
val_size = $held
test_limit = $held

[space]
lr = { low = 0.01, high = 0.3, log = true }
dropout = { low = 0.0, high = 0.7 }
EOF
show cat team.toml

say "4. Two workers, started separately (as on two machines)"
note "The same command twice, each in the background with its own log. Both join one study in PostgreSQL" \
     "and one parent run on the tracking server; the study lock keeps the trial count exact."
for i in 1 2; do
  printf '$ %s\n' "alexnet sweep team.toml > worker-$i.log 2>&1 &"
  alexnet sweep team.toml > "worker-$i.log" 2>&1 &
  launchers+=($!)
done

say "5. A worker dies: kill -9 mid-trial, then the same command again"
worker_of() { pgrep -P "${launchers[0]}" -f alexnet.sweep.worker; }
wait_for 300 "worker 1's training process" worker_of >/dev/null
worker=$(worker_of)
note "Worker 1's training process is pid $worker (a child of the launcher; kill -9 on the launcher alone" \
     "would leave it training). Waiting until its trial shows RUNNING on the tracking server ..."
start=$SECONDS
until trial=$(trial_of "$worker"); do
  if (( SECONDS - start > 600 )); then echo "$me: timed out waiting for worker 1's trial to start" >&2; exit 1; fi
  sleep 1
done
note "It is training trial $trial. A machine that dies is a kill -9:"
show kill -9 "$worker"
if trial_of "$worker" >/dev/null; then
  note "Trial $trial's run stays RUNNING on the server: nothing will end it but the study's heartbeat check."
else
  echo "$me: trial $trial ended before the kill: there is no dead trial to retry" >&2; exit 1
fi
wait "${launchers[0]}" || true
note "Worker 1's launcher saw its worker die and stopped (worker-1.log):"
indent worker-1.log
note "The same command again, in the foreground this time. The dead trial keeps its RUNNING state until its" \
     "heartbeat is grace_seconds old; then a worker fails it and retries it with the same params."
show alexnet sweep team.toml
note "Worker 2 ends once the study has its $n1 trials (worker-2.log, its trial lines and summary):"
wait "${launchers[1]}" || true
grep -E "^(trial |sweep 'team': [0-9]+ trials|alexnet sweep: )" worker-2.log | indent

say "6. Ray on loopback: more trials of the same study"
cat <<'EOF'
   WARNING: `ray stop` stops EVERY Ray process on this machine (other users' clusters too), not only
   the head started here. This walkthrough never runs it: it gives its head a temp folder of its own
   (--temp-dir) and, at the end, stops only the processes under that folder. On a machine of your
   own, `ray stop` is the usual way.
EOF
note "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps a local head on 127.0.0.1 (otherwise it listens on every" \
     "interface); --disable-usage-stats skips Ray's question; PGPASSWORD and the exports are in the head's" \
     "environment when it starts, which is where its workers get them."
printf '$ %s\n' "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
printf '$ %s\n' "ray start --head --node-ip-address=127.0.0.1 --port=$ray_port --num-cpus=2 --include-dashboard=false --disable-usage-stats --temp-dir=$tmp/ray"
if ! ray start --head --node-ip-address=127.0.0.1 --port="$ray_port" --num-cpus=2 --include-dashboard=false \
     --disable-usage-stats --temp-dir="$tmp/ray" > ray-start.log 2>&1; then
  indent ray-start.log >&2; echo "$me: ray start failed" >&2; exit 1
fi
grep -E 'Local node IP|Ray runtime started' ray-start.log | sed 's/^.* -- /   | /'
if command -v ss >/dev/null; then
  note "What its processes listen on (ss -ltnp):"
  pids=$(ray_head_pids | sed 's/^/pid=/; s/$/,/' | paste -sd'|')
  [ -z "$pids" ] || ss -ltnpH | grep -E "$pids" | awk '{print "   | " $4 "  " $6}' || true
fi
note "Two Ray workers raise the study to $n2 trials (--n-trials: the sweep file's n_trials, overridden):"
show alexnet sweep team.toml --ray "127.0.0.1:$ray_port" --workers 2 --n-trials "$n2"
note "Stopping this head only (SIGTERM to the processes under $tmp/ray, then SIGKILL):"
terminate 30 $(ray_head_pids)
note "done; no Ray process of this walkthrough is left."

say "7. The study as Optuna holds it in PostgreSQL"
note "Read with Optuna's own API (optuna.load_study): the count is exact, and the trial that died is FAIL," \
     "retried once with its params; nothing is left RUNNING or WAITING."
py - <<'PY'
import os
import warnings

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # retried_trial_number: public, marked experimental

trials = optuna.load_study(study_name="team", storage=os.environ["ALEXNET_STORAGE"]).get_trials(deepcopy=False)
n = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
print(f"study 'team': {n['COMPLETE'] + n['PRUNED']} trials finished ({n['COMPLETE']} COMPLETE, {n['PRUNED']} PRUNED); "
      f"{n['FAIL']} FAIL, {n['RUNNING']} RUNNING, {n['WAITING']} WAITING")
for t in trials:
    if t.state.name == "FAIL":
        for r in (r for r in trials if Retry.retried_trial_number(r) == t.number):
            same = "the same params" if r.params == t.params else f"other params ({r.params} vs {t.params})"
            print(f"trial {t.number} FAIL ({t.user_attrs.get('fail_reason') or 'its heartbeat stopped'}): retried as trial {r.number}, "
                  f"{r.state.name}, with {same}")
PY

say "8. Local work to the team: alexnet push"
note "A sweep run on a laptop's own stores (its project folder $tmp/laptop: SQLite, no server) ..."
sed -e 's/^study = "team"/study = "laptop"/' -e 's/^n_trials = .*/n_trials = 1/' team.toml > laptop.toml
printf '$ %s\n' "env -u MLFLOW_TRACKING_URI -u ALEXNET_STORAGE ALEXNET_HOME=$tmp/laptop alexnet sweep laptop.toml"
env -u MLFLOW_TRACKING_URI -u ALEXNET_STORAGE ALEXNET_HOME="$tmp/laptop" alexnet sweep laptop.toml
note "... copied to the team's servers (the targets default to the exports):"
printf '$ %s\n' "ALEXNET_HOME=$tmp/laptop alexnet push --study laptop"
ALEXNET_HOME="$tmp/laptop" alexnet push --study laptop
note "Now on the tracking server:"
show alexnet runs --sweep laptop

say "9. The MLflow UI: alexnet ui --sweep team"
note "Against a tracking server it starts no UI of its own: it prints the server's pages and exits."
show alexnet ui --sweep team
note "Open them in a browser on this machine while the server runs."

say "Done: the team path ran end to end"
