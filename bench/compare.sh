#!/usr/bin/env bash
# Side by side in one run: every fault against direct PostgreSQL, PgBouncer
# (transaction pooling, defaults otherwise) and pgwarden, on one private
# PostgreSQL cluster, with the same load driver (pgwarden-bench).
#
# Direct PostgreSQL, PgBouncer and pgwarden's wire port (`pgwarden-wire`)
# are driven over the Postgres protocol; pgwarden also over its HTTP API.
#
# Usage: bench/compare.sh [duration_s] [clients]   (defaults: 12 s, 16 clients)
# COMPARE_FAULTS picks faults (default: "restart crash terminate stall outage5 failover").
# Writes bench/results/<time>/*.json, *.svg and summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-12}
CLIENTS=${2:-16}
FAULT_AT=4
ONLY=${COMPARE_FAULTS:-restart crash terminate stall outage5 failover}
OUT="bench/results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"

need=()
command -v pgbouncer >/dev/null || need+=(pgbouncer)
command -v pg_config >/dev/null || need+=(postgresql)
command -v python3 >/dev/null || need+=(python3)
command -v socat >/dev/null || need+=(socat)
if [ ${#need[@]} -gt 0 ]; then
    echo "Installing ${need[*]}"
    sudo_or_not=""; [ "$(id -u)" = 0 ] || sudo_or_not=sudo
    $sudo_or_not apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_or_not apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

echo "== Building (release)"
cargo build --release --quiet --bin pgwarden --example pgwarden-bench
BENCH=target/release/examples/pgwarden-bench
PGWARDEN=target/release/pgwarden
PGBIN=$(pg_config --bindir)

WORK=$(mktemp -d /tmp/pgwarden-compare.XXXXXX)
# Server binaries refuse to run as root: when root, run them as `postgres`.
RUNAS=""; [ "$(id -u)" = 0 ] && RUNAS="runuser -u postgres --"
as_pg() { $RUNAS "$@"; }
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PGPORT=$(free_port); BPORT=$(free_port); WPORT=$(free_port); OPORT=$(free_port); GPORT=$(free_port)
DATA="$WORK/data"

cleanup() {
    [ -n "${PGWARDEN_PID:-}" ] && kill "$PGWARDEN_PID" 2>/dev/null || true
    [ -n "${PAIR:-}" ] && { failover_down 2>/dev/null || true; }
    [ -f "$WORK/pgbouncer.pid" ] && kill "$(cat "$WORK/pgbouncer.pid")" 2>/dev/null || true
    local pid; pid=$(postmaster) || true
    [ -n "$pid" ] && kill -CONT "$pid" 2>/dev/null || true
    as_pg "$PGBIN/pg_ctl" -D "$DATA" stop -m immediate >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
postmaster() { head -1 "$DATA/postmaster.pid" 2>/dev/null; }

# new_cluster DIR PORT SOCKET_DIR [EXTRA_SETTING...]: initdb and the settings
# every cluster of this benchmark shares.
new_cluster() {
    local dir=$1 port=$2 sockets=$3; shift 3
    as_pg "$PGBIN/initdb" -D "$dir" -A trust -U postgres >/dev/null
    {
        printf "port = %s\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\n" "$port" "$sockets"
        printf "max_connections = 300\nfsync = off\n"
        printf "%s\n" "$@"
    } >> "$dir/postgresql.conf"
}

echo "== PostgreSQL on port $PGPORT"
new_cluster "$DATA" "$PGPORT" "$WORK" "synchronous_commit = on"
as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$WORK/postgres.log" -w start >/dev/null

echo "== PgBouncer on port $BPORT (transaction pooling)"
echo '"postgres" ""' > "$WORK/userlist.txt"
cat > "$WORK/pgbouncer.ini" <<INI
[databases]
postgres = host=127.0.0.1 port=$PGPORT dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BPORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = transaction
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
[ "$(id -u)" = 0 ] && chown postgres "$WORK"/pgbouncer.ini "$WORK"/userlist.txt
as_pg pgbouncer -d "$WORK/pgbouncer.ini"

echo "== pgwarden on port $WPORT, wire port $GPORT (ops $OPORT)"
"$PGWARDEN" --database-url "postgresql://postgres@127.0.0.1:$PGPORT/postgres?sslmode=disable" \
    --listen "127.0.0.1:$WPORT" --ops-listen "127.0.0.1:$OPORT" --pg-listen "127.0.0.1:$GPORT" > "$WORK/pgwarden.out" 2> "$WORK/pgwarden.log" &
PGWARDEN_PID=$!

wait_ready() {
    for _ in $(seq 1 300); do
        if as_pg "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PGPORT" \
            && curl -sf "http://127.0.0.1:$OPORT/readyz" >/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "not ready" >&2; return 1
}
wait_ready

PGCTL="$PGBIN/pg_ctl"
# Each fault is a shell command the driver runs once (with sh -c).
declare -A FAULTS=(
    [restart]="$RUNAS $PGCTL -D $DATA -l $WORK/postgres.log -w restart -m fast >/dev/null"
    [crash]="$RUNAS $PGCTL -D $DATA stop -m immediate >/dev/null; $RUNAS $PGCTL -D $DATA -l $WORK/postgres.log -w start >/dev/null"
    [terminate]="$PGBIN/psql -X -q -h 127.0.0.1 -p $PGPORT -U postgres -d postgres -c \"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()\" >/dev/null"
    [stall]="P=\$(head -1 $DATA/postmaster.pid); pkill -STOP -P \$P; kill -STOP \$P; sleep 2; kill -CONT \$P; pkill -CONT -P \$P"
    [outage5]="$RUNAS $PGCTL -D $DATA stop -m fast >/dev/null; sleep 5; $RUNAS $PGCTL -D $DATA -l $WORK/postgres.log -w start >/dev/null"
)
ADMIN="postgresql://postgres@127.0.0.1:$PGPORT/postgres?sslmode=disable"
declare -A TARGETS=(
    [direct]="postgresql://postgres@127.0.0.1:$PGPORT/postgres?sslmode=disable"
    [pgbouncer]="postgresql://postgres@127.0.0.1:$BPORT/postgres?sslmode=disable"
    [pgwarden-wire]="postgresql://postgres@127.0.0.1:$GPORT/postgres?sslmode=disable"
    [pgwarden]="http://127.0.0.1:$WPORT/sql"
)

for fault in restart crash terminate stall outage5; do
    [[ " $ONLY " == *" $fault "* ]] || continue
    for target in direct pgbouncer pgwarden-wire pgwarden; do
        echo "== $fault against $target"
        wait_ready
        "$BENCH" --target "${TARGETS[$target]}" --admin-dsn "$ADMIN" --clients "$CLIENTS" \
            --duration-s "$DURATION" --fault "$fault" --fault-at-s "$FAULT_AT" --fault-cmd "${FAULTS[$fault]}" \
            --json "$OUT/$fault-$target.json" --svg "$OUT/$fault-$target.svg" > "$OUT/$fault-$target.txt"
    done
done

# Failover: a primary with a synchronous standby, behind one stable address
# (a socat forwarder standing in for a virtual IP or a DNS name). The fault
# crashes the primary, points the address at the standby and promotes it.
# Every target gets a fresh pair, since a failover cannot be undone; each
# target reaches the database through the forwarder, so all pay for it.
VIP=$(free_port); PPORT=$(free_port); SPORT=$(free_port)
FB_PORT=$(free_port); FW_PORT=$(free_port); FO_PORT=$(free_port); FG_PORT=$(free_port)
PAIR="$WORK/pair"
forward_to() {
    (socat "TCP-LISTEN:$VIP,bind=127.0.0.1,reuseaddr,fork,nodelay" "TCP:127.0.0.1:$1,nodelay" >/dev/null 2>&1 &
     echo $! > "$PAIR/socat.pid")
}
failover_up() {
    rm -rf "$PAIR"; mkdir -p "$PAIR"; [ "$(id -u)" = 0 ] && chown postgres "$PAIR"
    new_cluster "$PAIR/primary" "$PPORT" "$PAIR" "synchronous_standby_names = '*'"
    as_pg "$PGBIN/pg_ctl" -D "$PAIR/primary" -l "$PAIR/primary.log" -w start >/dev/null
    as_pg "$PGBIN/pg_basebackup" -D "$PAIR/standby" -R -X stream -c fast -h 127.0.0.1 -p "$PPORT" -U postgres
    printf "port = %s\nsynchronous_standby_names = ''\n" "$SPORT" >> "$PAIR/standby/postgresql.conf"
    as_pg "$PGBIN/pg_ctl" -D "$PAIR/standby" -l "$PAIR/standby.log" -w start >/dev/null
    for _ in $(seq 1 100); do
        state=$("$PGBIN/psql" -X -Atq -h 127.0.0.1 -p "$PPORT" -U postgres -d postgres \
            -c "SELECT sync_state FROM pg_stat_replication")
        [ "$state" = sync ] && break; sleep 0.1
    done
    [ "$state" = sync ] || { echo "the standby did not become synchronous" >&2; return 1; }
    forward_to "$PPORT"
    cat > "$PAIR/failover.sh" <<SCRIPT
#!/usr/bin/env bash
$RUNAS $PGCTL -D $PAIR/primary stop -m immediate >/dev/null
kill \$(cat $PAIR/socat.pid)
while (exec 3<>/dev/tcp/127.0.0.1/$VIP) 2>/dev/null; do sleep 0.01; done
(socat TCP-LISTEN:$VIP,bind=127.0.0.1,reuseaddr,fork,nodelay TCP:127.0.0.1:$SPORT,nodelay >/dev/null 2>&1 & echo \$! > $PAIR/socat.pid)
$RUNAS $PGCTL -D $PAIR/standby promote -w >/dev/null
SCRIPT
}
failover_down() {
    [ -n "${FW_PID:-}" ] && kill "$FW_PID" 2>/dev/null; FW_PID=""
    [ -f "$PAIR/pgbouncer.pid" ] && kill "$(cat "$PAIR/pgbouncer.pid")" 2>/dev/null
    [ -f "$PAIR/socat.pid" ] && kill "$(cat "$PAIR/socat.pid")" 2>/dev/null
    for node in primary standby; do
        as_pg "$PGBIN/pg_ctl" -D "$PAIR/$node" stop -m immediate >/dev/null 2>&1 || true
    done
    sleep 0.5
}
VIP_DSN="postgresql://postgres@127.0.0.1:$VIP/postgres?sslmode=disable"
for target in direct pgbouncer pgwarden-wire pgwarden; do
    [[ " $ONLY " == *" failover "* ]] || continue
    echo "== failover against $target"
    failover_up
    url=$VIP_DSN
    case $target in
    pgbouncer)
        sed -e "s/port=$PGPORT/port=$VIP/" -e "s/listen_port = $BPORT/listen_port = $FB_PORT/" \
            -e "s#$WORK/pgbouncer#$PAIR/pgbouncer#g" "$WORK/pgbouncer.ini" > "$PAIR/pgbouncer.ini"
        [ "$(id -u)" = 0 ] && chown postgres "$PAIR/pgbouncer.ini"
        as_pg pgbouncer -d "$PAIR/pgbouncer.ini"
        url="postgresql://postgres@127.0.0.1:$FB_PORT/postgres?sslmode=disable" ;;
    pgwarden | pgwarden-wire)
        "$PGWARDEN" --database-url "$VIP_DSN" --listen "127.0.0.1:$FW_PORT" --ops-listen "127.0.0.1:$FO_PORT" \
            --pg-listen "127.0.0.1:$FG_PORT" > /dev/null 2> "$PAIR/pgwarden.log" &
        FW_PID=$!
        for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$FO_PORT/readyz" >/dev/null && break; sleep 0.1; done
        url="http://127.0.0.1:$FW_PORT/sql"
        [ "$target" = pgwarden-wire ] && url="postgresql://postgres@127.0.0.1:$FG_PORT/postgres?sslmode=disable" ;;
    esac
    "$BENCH" --target "$url" --admin-dsn "$VIP_DSN" --clients "$CLIENTS" \
        --duration-s "$DURATION" --fault failover --fault-at-s "$FAULT_AT" --fault-cmd "bash $PAIR/failover.sh" \
        --json "$OUT/failover-$target.json" --svg "$OUT/failover-$target.svg" > "$OUT/failover-$target.txt"
    failover_down
done

python3 - "$OUT" "$CLIENTS" "$DURATION" > "$OUT/summary.md" <<'PY'
import json, os, sys
out, clients, duration = sys.argv[1], sys.argv[2], sys.argv[3]
print(f"Faults at 4 s into a {duration} s run of {clients} clients (point reads and single-row UPDATEs); window = 5 s after the fault.")
print("Direct PostgreSQL, PgBouncer and pgwarden-wire over the Postgres protocol; pgwarden over HTTP.")
print("failover: a fresh primary with a synchronous standby per target, all reached through one socat forwarder;")
print("the fault crashes the primary, points the forwarder at the standby and promotes it.\n")
print("| fault | target | success (window) | errors | fault → last error | fault end → first success | p99 window (ms) | max window (ms) | writes acked | lost | doubled | no answer |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for fault in ["restart", "crash", "terminate", "stall", "outage5", "failover"]:
    for target in ["direct", "pgbouncer", "pgwarden-wire", "pgwarden"]:
        path = os.path.join(out, f"{fault}-{target}.json")
        if not os.path.exists(path):
            continue
        r = json.load(open(path))
        w = r["window"]; l = r["ledger"]
        errors = sum(r["errors"].values())
        last = r["last_error_after_fault_ms"]
        back = r["first_success_after_fault_end_ms"]
        print(f"| {fault} | {target} | {w['success_rate']:.4f} | {errors} | {'-' if last is None else str(last) + ' ms'} | "
              f"{'-' if back is None else str(back) + ' ms'} | "
              f"{w['latency']['p99_ms']:.1f} | {w['latency']['max_ms']:.1f} | {l['acknowledged']} | {l['lost']} | {l['doubled']} | {l['ambiguous'] + l['unknown_08007']} |")
PY
cat "$OUT/summary.md"
echo "Results in $OUT"
