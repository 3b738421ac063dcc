#!/usr/bin/env bash
# Where RouteCall's time and allocations go (issue 5, item 4).
#
# 1. CPU: `perf record -e cpu-clock -g` on the `deskline serve` process while h2load repeats one
#    routed request and while examples/loadgen runs the mixed workload; prints the top symbols
#    (self time) of each. (This machine exposes no hardware counters, so cpu-clock sampling.)
# 2. Allocations per request: valgrind's DHAT on three short serve processes of a small account
#    (allocations per call do not depend on the index size): idle, N h2load calls, ~N mixed calls;
#    (blocks(run) - blocks(idle)) / calls.
#
# Env: USERS (perf part, default 1000000 like load.sh; DHAT uses DHAT_USERS, default 5000),
#      SECS (default 8), SERVER_CPU (1), CLIENT_CPU (0).
set -euo pipefail
cd "$(dirname "$0")/.."

USERS=${USERS:-1000000}
DHAT_USERS=${DHAT_USERS:-5000}
SECS=${SECS:-8}
SERVER_CPU=${SERVER_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
SIM_PORT=${SIM_PORT:-18490}
DL_PORT=${DL_PORT:-50081}

command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null; }
command -v perf >/dev/null || apt-get install -y -qq linux-perf >/dev/null
command -v valgrind >/dev/null || apt-get install -y -qq valgrind >/dev/null

cargo build --release --bin deskline --example loadgen
BIN=target/release/deskline
LOADGEN=target/release/examples/loadgen

WORK=$(mktemp -d /tmp/deskline-profile.XXXXXX)
# perf data is kept for `perf report -i target/profile/h2.perf -G` and the like.
OUT=${PROFILE_OUT:-target/profile}
mkdir -p "$OUT"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start_sim() { # users
  taskset -c "$CLIENT_CPU" "$BIN" sim --listen "127.0.0.1:$SIM_PORT" --users "$1" --tickets "$1" \
    --requests-per-minute 100000000 --export-requests-per-minute 100000000 >"$WORK/sim.log" 2>&1 &
  SIM_PID=$!
  PIDS+=("$SIM_PID")
}

config() { # users data_dir
  cat <<EOF
[server]
listen = "127.0.0.1:$DL_PORT"
[zendesk]
url = "http://127.0.0.1:$SIM_PORT"
email = "admin@deskline.test"
token = "sim-token"
requests_per_minute = 1000000
export_requests_per_minute = 1000000
[storage]
data_dir = "$2"
[index]
poll_seconds = 3600
# Today's full warm-up: SERVING means loaded, so the load meets the finished index, not a
# bootstrap still reading pages (DESIGN §10).
bootstrap = false
EOF
  "$LOADGEN" directory --users "$1" --tickets "$1"
}

h2() { # calls
  taskset -c "$CLIENT_CPU" h2load -n "$1" -c 4 -m 16 -t 1 -d "$WORK/body.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://127.0.0.1:$DL_PORT/deskline.v1.Resolver/RouteCall" | grep -E '^(finished|requests:)'
}

echo "# profile: $(nproc) cores, loadavg $(cut -d' ' -f1-3 /proc/loadavg)"

# --- 1. CPU samples at USERS customers ---
start_sim "$USERS"
config "$USERS" "$WORK/data" >"$WORK/deskline.toml"
RUST_LOG=warn taskset -c "$SERVER_CPU" "$BIN" serve --config "$WORK/deskline.toml" >"$WORK/serve.log" 2>&1 &
DL_PID=$!
PIDS+=("$DL_PID")
"$LOADGEN" health "127.0.0.1:$DL_PORT" --timeout-secs 900
"$LOADGEN" pick "127.0.0.1:$DL_PORT" --users "$USERS" --tickets "$USERS" --body "$WORK/body.bin"
"$LOADGEN" run "127.0.0.1:$DL_PORT" --users "$USERS" --tickets "$USERS" --seconds 1 \
  --queries "$WORK/queries.txt" >/dev/null

report() { # title data
  echo "## $1: top symbols by self time (cpu-clock samples of the serve process)"
  { perf report -i "$2" --no-children --sort symbol --stdio 2>/dev/null || true; } |
    grep -E '^ +[0-9]+\.[0-9]+%' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//' | head -40 || true
}
perf record -e cpu-clock -g -p "$DL_PID" -o "$OUT/h2.perf" -- sleep "$SECS" >/dev/null 2>&1 &
PERF=$!
h2 2000000 >/dev/null 2>&1 &
H2=$!
wait "$PERF"; kill "$H2" 2>/dev/null || true; wait "$H2" 2>/dev/null || true
report "h2load, one routed request repeated" "$OUT/h2.perf"

perf record -e cpu-clock -g -p "$DL_PID" -o "$OUT/lg.perf" -- sleep "$SECS" >/dev/null 2>&1 &
PERF=$!
taskset -c "$CLIENT_CPU" "$LOADGEN" run "127.0.0.1:$DL_PORT" --users "$USERS" --tickets "$USERS" \
  --seconds "$SECS" --queries "$WORK/queries.txt"
wait "$PERF"
report "loadgen, mixed workload" "$OUT/lg.perf"
kill "$DL_PID" "$SIM_PID"; wait "$DL_PID" "$SIM_PID" 2>/dev/null || true

# --- 2. Allocations per call (DHAT) at DHAT_USERS customers ---
start_sim "$DHAT_USERS"
dhat_run() { # name workload(idle|h2|mixed)
  local data="$WORK/dhat-data-$1"
  config "$DHAT_USERS" "$data" >"$WORK/dhat.toml"
  RUST_LOG=warn valgrind --tool=dhat --dhat-out-file="$WORK/dhat.$1.json" \
    "$BIN" serve --config "$WORK/dhat.toml" >"$WORK/dhat.$1.log" 2>&1 &
  local pid=$!
  "$LOADGEN" health "127.0.0.1:$DL_PORT" --timeout-secs 600 >/dev/null
  [[ -f "$WORK/body.small" ]] ||
    "$LOADGEN" pick "127.0.0.1:$DL_PORT" --users "$DHAT_USERS" --tickets "$DHAT_USERS" \
      --body "$WORK/body.small" >/dev/null
  local calls=0
  case $2 in
    h2)
      cp "$WORK/body.small" "$WORK/body.bin"
      calls=3000
      h2 "$calls" >/dev/null ;;
    mixed)
      calls=$("$LOADGEN" run "127.0.0.1:$DL_PORT" --users "$DHAT_USERS" --tickets "$DHAT_USERS" \
        --seconds 6 --rps 500 --concurrency 8 --queries "$WORK/queries.small" |
        sed -n 's/^requests=\([0-9]*\) .*/\1/p') ;;
  esac
  # `pick` made calls of its own in the first run; count them as part of every run's start-up.
  kill -TERM "$pid"; wait "$pid" || true
  local blocks
  blocks=$(sed -n 's/.*Total: *[0-9,]* bytes in \([0-9,]*\) blocks.*/\1/p' "$WORK/dhat.$1.log" | tr -d ,)
  echo "$1 $calls $blocks"
}
# Warm the parse of the same account and the `pick` lookup once, outside the measured runs.
read -r _ _ idle < <(dhat_run idle idle)
read -r _ _ idle2 < <(dhat_run idle2 idle)
read -r _ hc hb < <(dhat_run h2 h2)
read -r _ mc mb < <(dhat_run mixed mixed)
echo "## allocations per RouteCall (DHAT; idle runs: $idle and $idle2 blocks)"
awk -v i="$idle2" -v c="$hc" -v b="$hb" 'BEGIN { printf "h2load routed request: %d calls, %.1f blocks per call\n", c, (b - i) / c }'
awk -v i="$idle2" -v c="$mc" -v b="$mb" 'BEGIN { printf "mixed workload:        %d calls, %.1f blocks per call\n", c, (b - i) / c }'
