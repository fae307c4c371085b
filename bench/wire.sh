#!/usr/bin/env bash
# The Postgres wire front end against PgBouncer and direct access, with
# pgbench: `-S` (point reads) in simple, extended and prepared mode, and a
# connection per transaction (`-C`, as serverless functions do), at 1, 16
# and 64 clients. All three are measured in the same run, case by case, on
# the same server; every client authenticates with SCRAM-SHA-256. The CPU
# of pgwarden and PgBouncer is measured over each run and reported per
# transaction.
#
# Usage: bench/wire.sh [seconds per case]   (default 8)
# Needs pgbench and pgbouncer (Debian: postgresql-client, pgbouncer).
# Writes bench/results/wire-<time>/results.json and summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_CASE=${1:-8}
OUT="bench/results/wire-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
command -v pgbouncer >/dev/null || { echo "pgbouncer is missing: apt-get install pgbouncer" >&2; exit 1; }
command -v pgbench >/dev/null || { echo "pgbench is missing: apt-get install postgresql-client" >&2; exit 1; }

echo "== Building (release)"
cargo build --release --quiet --bin pgwarden
PGBIN=$(pg_config --bindir)
WORK=$(mktemp -d /tmp/pgwarden-wire.XXXXXX)
RUNAS=""; [ "$(id -u)" = 0 ] && RUNAS="runuser -u postgres --" && chown postgres "$WORK"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PGPORT=$(free_port); BPORT=$(free_port); WPORT=$(free_port); HPORT=$(free_port); OPORT=$(free_port)
DATA="$WORK/data"
POOL=16
PASSWORD=bench-secret
cleanup() {
    [ -n "${PGWARDEN_PID:-}" ] && kill "$PGWARDEN_PID" 2>/dev/null || true
    [ -n "${BOUNCER_PID:-}" ] && kill "$BOUNCER_PID" 2>/dev/null || true
    pkill -f "pgbouncer $WORK/pgbouncer.ini" 2>/dev/null || true
    $RUNAS "$PGBIN/pg_ctl" -D "$DATA" stop -m immediate >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== PostgreSQL on $PGPORT, PgBouncer on $BPORT, pgwarden on $WPORT"
echo "$PASSWORD" > "$WORK/pwfile"
chmod 644 "$WORK/pwfile"
$RUNAS "$PGBIN/initdb" -D "$DATA" -A scram-sha-256 -U postgres --pwfile="$WORK/pwfile" >/dev/null
printf "port = %s\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\nmax_connections = 300\nfsync = off\n" \
    "$PGPORT" "$WORK" >> "$DATA/postgresql.conf"
$RUNAS "$PGBIN/pg_ctl" -D "$DATA" -l "$WORK/postgres.log" -w start >/dev/null
export PGPASSWORD=$PASSWORD PGSSLMODE=disable
pgbench -h 127.0.0.1 -p "$PGPORT" -U postgres -i -s 10 -q postgres >/dev/null 2>&1

cat > "$WORK/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PGPORT dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BPORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
min_pool_size = $POOL
max_client_conn = 2000
logfile = $WORK/pgbouncer.log
EOF
# The SCRAM secret, as a production userlist holds it (a plain password
# would make PgBouncer derive the secret again for every client).
secret=$(psql -h 127.0.0.1 -p "$PGPORT" -U postgres -tAc "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'" postgres)
echo "\"postgres\" \"$secret\"" > "$WORK/userlist.txt"
chown -R "$(stat -c %U "$WORK")" "$WORK"
$RUNAS pgbouncer "$WORK/pgbouncer.ini" &
BOUNCER_PID=$!

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
PGWARDEN_MAX_CONNECTIONS=$POOL PGWARDEN_MIN_CONNECTIONS=$POOL PGWARDEN_PG_MAX_CLIENTS=12000 target/release/pgwarden \
    --database-url "postgresql://postgres:$PASSWORD@127.0.0.1:$PGPORT/postgres?sslmode=disable" \
    --listen "127.0.0.1:$HPORT" --ops-listen "127.0.0.1:$OPORT" --pg-listen "127.0.0.1:$WPORT" \
    > /dev/null 2> "$WORK/pgwarden.log" &
PGWARDEN_PID=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$OPORT/readyz" >/dev/null && break; sleep 0.1; done
sleep 1
# The PgBouncer process itself (runuser forks it).
BOUNCER_PROC=$(pgrep -n -x pgbouncer)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
port_of() { case $1 in direct) echo "$PGPORT";; pgbouncer) echo "$BPORT";; pgwarden) echo "$WPORT";; esac; }
proc_of() { case $1 in pgbouncer) echo "$BOUNCER_PROC";; pgwarden) echo "$PGWARDEN_PID";; *) echo "";; esac; }

echo "[" > "$OUT/results.json"
first=1
for clients in 1 16 64; do
    threads=$(( clients < 2 ? clients : 2 ))
    for mode in simple extended prepared connect; do
        for target in direct pgbouncer pgwarden; do
            args=(-S -M "$mode")
            [ "$mode" = connect ] && args=(-S -C -M simple)
            proc=$(proc_of "$target")
            before=0; [ -n "$proc" ] && before=$(cpu_ticks "$proc")
            log="$OUT/$mode-$clients-$target.txt"
            status=ok
            pgbench -h 127.0.0.1 -p "$(port_of "$target")" -U postgres "${args[@]}" \
                -c "$clients" -j "$threads" -T "$SECONDS_PER_CASE" postgres > "$log" 2>&1 || status=failed
            after=0; [ -n "$proc" ] && after=$(cpu_ticks "$proc")
            tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$log" | head -n 1)
            processed=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$log")
            failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$log")
            grep -q "aborted\|error" "$log" && status=failed
            echo "== $mode, $clients clients, $target: ${tps:-?} tps ($status)"
            [ $first = 1 ] || echo "," >> "$OUT/results.json"
            first=0
            printf '{"mode": "%s", "clients": %s, "target": "%s", "tps": %s, "processed": %s, "failed": %s, "status": "%s", "cpu_ticks": %s}' \
                "$mode" "$clients" "$target" "${tps:-0}" "${processed:-0}" "${failed:-0}" "$status" "$((after - before))" >> "$OUT/results.json"
        done
    done
done
echo "]" >> "$OUT/results.json"

echo "== Memory: pgwarden's RSS with idle clients (SCRAM, then idle)"
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
printf '{"baseline_kib": %s' "$(rss_kib "$PGWARDEN_PID")" > "$OUT/memory.json"
for idle in 1000 10000; do
    coproc IDLE { python3 bench/idle_clients.py 127.0.0.1 "$WPORT" postgres postgres "$idle"; }
    read -r ready <&"${IDLE[0]}"
    sleep 2
    held=$(rss_kib "$PGWARDEN_PID")
    echo "== $ready: $((held / 1024)) MiB"
    echo >&"${IDLE[1]}"
    wait "$IDLE_PID" || true
    printf ', "clients_%s_kib": %s' "$idle" "$held" >> "$OUT/memory.json"
    sleep 2
done
echo "}" >> "$OUT/memory.json"

python3 - "$OUT" "$(getconf CLK_TCK)" > "$OUT/summary.md" <<'PY'
import json, sys
out, hz = sys.argv[1], int(sys.argv[2])
runs = {(r["mode"], r["clients"], r["target"]): r for r in json.load(open(f"{out}/results.json"))}
def tps(r):
    return f"{r['tps']:.0f}" if r["status"] == "ok" else "fails"
def cpu_us(r):
    done = r["processed"]
    return f"{r['cpu_ticks'] / hz * 1e6 / done:.1f}" if r["status"] == "ok" and done else "–"
print("| `-S` mode | clients | direct tps | PgBouncer tps | pgwarden tps | pgwarden / PgBouncer | pgwarden / direct | CPU µs per tx, PgBouncer | CPU µs per tx, pgwarden |")
print("|---|---|---|---|---|---|---|---|---|")
for clients in (1, 16, 64):
    for mode in ("simple", "extended", "prepared", "connect"):
        d, b, w = (runs[(mode, clients, t)] for t in ("direct", "pgbouncer", "pgwarden"))
        vs_b = f"{w['tps'] / b['tps']:.2f}" if b["status"] == "ok" and w["status"] == "ok" and b["tps"] else "–"
        vs_d = f"{w['tps'] / d['tps']:.2f}" if w["status"] == "ok" and d["tps"] else "–"
        label = "`-C` (simple)" if mode == "connect" else mode
        print(f"| {label} | {clients} | {tps(d)} | {tps(b)} | {tps(w)} | {vs_b} | {vs_d} | {cpu_us(b)} | {cpu_us(w)} |")
memory = json.load(open(f"{out}/memory.json"))
base = memory["baseline_kib"]
print()
print("| idle wire clients | pgwarden RSS | per idle client |")
print("|---|---|---|")
print(f"| 0 | {base / 1024:.0f} MiB | – |")
for n in (1000, 10000):
    held = memory[f"clients_{n}_kib"]
    print(f"| {n:,} | {held / 1024:.0f} MiB | {(held - base) * 1024 / n / 1024:.1f} KiB |")
PY
cat "$OUT/summary.md"
echo "Results in $OUT"
