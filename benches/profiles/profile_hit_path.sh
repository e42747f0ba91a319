#!/bin/bash
# Profiles the `cache-redis` contender of the load bench while it serves 1 KiB hits, and
# renders a flame graph. Needs perf and inferno (`cargo install inferno`). Run from the
# repository root; writes into target/profile/ and benches/profiles/hit_path_flamegraph.svg.
set -euo pipefail
cargo bench --no-run --bench load
BIN=$(ls -t target/release/deps/load-* | grep -v '\.d$' | head -1)
OUT=target/profile
mkdir -p "$OUT"
# The bench starts its own redis-server and one server process per contender.
SCENARIOS="hits 1 KiB" SECS=10 ROUNDS=2 "$BIN" > "$OUT/load.txt" 2>&1 &
LOAD=$!
PID=""
for _ in $(seq 1 100); do
  for c in $(pgrep -P "$LOAD"); do
    if tr '\0' '\n' < "/proc/$c/environ" 2>/dev/null | grep -qx "LOAD_SERVE=cache-redis"; then PID=$c; fi
  done
  [ -n "$PID" ] && break
  sleep 0.1
done
echo "cache-redis server: pid $PID"
# perf ends (non-zero, its sleep terminated) when the server exits with the bench.
perf record -F 999 -g --call-graph dwarf,16384 -p "$PID" -o "$OUT/perf.data" -- sleep 85 || true
wait "$LOAD" || true
perf script -i "$OUT/perf.data" | inferno-collapse-perf --kernel > "$OUT/hit_path.folded"
inferno-flamegraph --minwidth 0.5 \
  --title "cache-redis serving 1 KiB hits (load bench), perf -F 999 dwarf" \
  < "$OUT/hit_path.folded" > benches/profiles/hit_path_flamegraph.svg
python3 benches/profiles/attribute.py "$OUT/hit_path.folded"
