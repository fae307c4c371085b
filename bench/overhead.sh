#!/usr/bin/env bash
# Overhead without faults: throughput and latency of SELECT 1 and of point
# reads through pgwarden's HTTP API against direct Postgres-protocol access,
# at 1, 16 and 64 clients, with pgwarden's CPU and RSS during each run.
#
# Usage: bench/overhead.sh [seconds per case]   (default 8)
# Writes bench/results/overhead-<time>/*.json and summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_CASE=${1:-8}
OUT="bench/results/overhead-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"

echo "== Building (release)"
cargo build --release --quiet --bin pgwarden --example pgwarden-bench
BENCH=target/release/examples/pgwarden-bench
PGBIN=$(pg_config --bindir)
WORK=$(mktemp -d /tmp/pgwarden-overhead.XXXXXX)
RUNAS=""; [ "$(id -u)" = 0 ] && RUNAS="runuser -u postgres --" && chown postgres "$WORK"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PGPORT=$(free_port); WPORT=$(free_port); OPORT=$(free_port)
DATA="$WORK/data"
cleanup() {
    [ -n "${PGWARDEN_PID:-}" ] && kill "$PGWARDEN_PID" 2>/dev/null || true
    $RUNAS "$PGBIN/pg_ctl" -D "$DATA" stop -m immediate >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

$RUNAS "$PGBIN/initdb" -D "$DATA" -A trust -U postgres >/dev/null
printf "port = %s\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\nmax_connections = 300\nfsync = off\n" \
    "$PGPORT" "$WORK" >> "$DATA/postgresql.conf"
$RUNAS "$PGBIN/pg_ctl" -D "$DATA" -l "$WORK/postgres.log" -w start >/dev/null

PGWARDEN_MAX_CONNECTIONS=64 target/release/pgwarden \
    --database-url "postgresql://postgres@127.0.0.1:$PGPORT/postgres?sslmode=disable" \
    --listen "127.0.0.1:$WPORT" --ops-listen "127.0.0.1:$OPORT" --pg-listen "" > /dev/null 2> "$WORK/pgwarden.log" &
PGWARDEN_PID=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$OPORT/readyz" >/dev/null && break; sleep 0.1; done

ADMIN="postgresql://postgres@127.0.0.1:$PGPORT/postgres?sslmode=disable"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$PGWARDEN_PID/stat"; }
for clients in 1 16 64; do
    for mix in select1 reads; do
        for target in direct pgwarden; do
            url=$ADMIN; [ "$target" = pgwarden ] && url="http://127.0.0.1:$WPORT/sql"
            echo "== $mix, $clients clients, $target"
            before=$(cpu_ticks); peak=0
            "$BENCH" --target "$url" --admin-dsn "$ADMIN" --clients "$clients" --duration-s "$SECONDS_PER_CASE" \
                --mix "$mix" --json "$OUT/$mix-$clients-$target.json" > /dev/null &
            bench=$!
            while kill -0 "$bench" 2>/dev/null; do
                rss=$(awk '/VmRSS/ {print $2}' "/proc/$PGWARDEN_PID/status"); [ "$rss" -gt "$peak" ] && peak=$rss
                sleep 0.5
            done
            wait "$bench"
            after=$(cpu_ticks)
            echo "{\"cpu_percent\": $(( (after - before) * 100 / $(getconf CLK_TCK) / SECONDS_PER_CASE )), \"rss_kib\": $peak}" > "$OUT/$mix-$clients-$target.proc.json"
        done
    done
done

python3 - "$OUT" > "$OUT/summary.md" <<'PY'
import json, os, sys
out = sys.argv[1]
print("| mix | clients | direct ops/s | pgwarden ops/s | throughput ratio | direct p50 / p99 (ms) | pgwarden p50 / p99 (ms) | pgwarden CPU | pgwarden RSS |")
print("|---|---|---|---|---|---|---|---|---|")
for clients in (1, 16, 64):
    for mix in ("select1", "reads"):
        r = {t: json.load(open(os.path.join(out, f"{mix}-{clients}-{t}.json"))) for t in ("direct", "pgwarden")}
        p = json.load(open(os.path.join(out, f"{mix}-{clients}-pgwarden.proc.json")))
        ops = {t: r[t]["ops"] / r[t]["duration_s"] for t in r}
        lat = {t: f"{r[t]['latency']['p50_ms']:.2f} / {r[t]['latency']['p99_ms']:.2f}" for t in r}
        print(f"| {mix} | {clients} | {ops['direct']:.0f} | {ops['pgwarden']:.0f} | {ops['pgwarden'] / ops['direct']:.2f} | "
              f"{lat['direct']} | {lat['pgwarden']} | {p['cpu_percent']} % | {p['rss_kib'] / 1024:.0f} MiB |")
PY
cat "$OUT/summary.md"
echo "Results in $OUT"
