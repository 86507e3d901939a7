#!/usr/bin/env bash
# Starts and stops the benchmark Synapse (installed by setup.sh, run.sh calls it first).
#
# usage: benches/synapse/run.sh start <datadir> <port> [sqlite|postgres:<dbname>]
#        benches/synapse/run.sh stop <datadir>
#        benches/synapse/run.sh status <datadir>
#
# start  writes <datadir>/homeserver.yaml from homeserver.yaml.template (server_name localhost,
#        client API on http://127.0.0.1:<port>), generates the signing key, starts Synapse in the
#        background, writes its pid to <datadir>/synapse.pid and waits (at most
#        SYNAPSE_START_TIMEOUT s, default 120) until GET /_matrix/client/versions answers.
#        sqlite (the default) keeps the database in <datadir>/homeserver.db and reuses it if it is
#        there; postgres:<dbname> DROPS and recreates database <dbname> on the PostgreSQL server at
#        127.0.0.1:5432 (user postgres, trust auth) with C collation, as Synapse requires.
# stop   sends SIGTERM to the pid in <datadir>/synapse.pid and waits for it to exit (at most
#        SYNAPSE_STOP_TIMEOUT s, default 60, then SIGKILL). Nothing else is ever signalled.
#
# env:   SYNAPSE_VENV                        as for setup.sh
#        SYNAPSE_REGISTRATION_SHARED_SECRET  default: hearth-bench-registration-secret
#        SYNAPSE_PGHOST / SYNAPSE_PGPORT / SYNAPSE_PGUSER   default: 127.0.0.1 / 5432 / postgres
#        SYNAPSE_PG_CP_MIN / SYNAPSE_PG_CP_MAX  PostgreSQL pool size (default: Twisted's 3 / 5)
#        SYNAPSE_ALLOW_LOOPBACK_PUSH         set: outbound HTTP to 127.0.0.0/8 is allowed (push gateways
#                                            of the push benchmark); everything else stays blocked
#        SYNAPSE_SQLITE_SYNCHRONOUS          unset (stock Synapse: SQLite's default, FULL) or
#                                            NORMAL/FULL/OFF: applied to every SQLite connection
#                                            through launch.py (see README.md)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${SYNAPSE_VENV:-target/bench/synapse-venv}"
case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac
python="$venv/bin/python"
# The venv normally sits inside this repository's checkout; without this, Synapse runs git from its
# package directory, finds Hearth's repository and reports its version as "1.x (b=main,<hearth sha>)".
export GIT_CEILING_DIRECTORIES="$venv"

log() { printf '[synapse run] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
usage() {
    sed -n '3,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# True while $1 is a live (not zombie) process.
alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null || true)"
    [ "$state" != "Z" ]
}

# True if $1 is the Synapse that was started with config file $2 (guards against pid reuse).
is_our_synapse() {
    local cmdline
    cmdline="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true)"
    case "$cmdline" in *"$2"*) return 0 ;; *) return 1 ;; esac
}

# True if something accepts TCP connections on 127.0.0.1:$1.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

abs_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

# Replaces @NAME@ placeholders; values must not contain '|', '&' or '\'.
fill() {
    sed -e "s|@PORT@|$port|g" \
        -e "s|@DATA_DIR@|$datadir|g" \
        -e "s|@REGISTRATION_SHARED_SECRET@|$shared_secret|g" \
        -e "s|@MACAROON_SECRET_KEY@|$macaroon_secret|g" \
        -e "s|@FORM_SECRET@|$form_secret|g" \
        "$1"
}

random_secret() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

cmd_start() {
    if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage; fi
    datadir="$(abs_dir "$1")"
    port="$2"
    local db="${3:-sqlite}"
    case "$port" in '' | *[!0-9]*) die "port must be a number: $port" ;; esac
    if [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then die "port out of range: $port"; fi
    case "$datadir" in *[\|\&\\\ ]*) die "data directory path must not contain '|', '&', '\\' or spaces: $datadir" ;; esac

    local config="$datadir/homeserver.yaml"
    local pidfile="$datadir/synapse.pid"
    if [ -f "$pidfile" ]; then
        local old
        old="$(cat "$pidfile")"
        if alive "$old" && is_our_synapse "$old" "$config"; then
            die "Synapse is already running from $datadir (pid $old); run '$0 stop $datadir' first"
        fi
        rm -f "$pidfile"
    fi
    if port_in_use "$port"; then
        die "something already listens on 127.0.0.1:$port"
    fi

    "$here/setup.sh"

    # Secrets: registration secret from the environment, the others once per data directory.
    shared_secret="${SYNAPSE_REGISTRATION_SHARED_SECRET:-hearth-bench-registration-secret}"
    case "$shared_secret" in *[\|\&\\\"]*) die "SYNAPSE_REGISTRATION_SHARED_SECRET must not contain '|', '&', '\\' or '\"'" ;; esac
    local secrets="$datadir/bench-secrets"
    if [ ! -s "$secrets" ]; then
        printf '%s\n%s\n' "$(random_secret)" "$(random_secret)" >"$secrets.tmp"
        mv "$secrets.tmp" "$secrets"
    fi
    macaroon_secret="$(sed -n 1p "$secrets")"
    form_secret="$(sed -n 2p "$secrets")"

    # Database section.
    local database
    case "$db" in
        sqlite)
            database="database:
  name: sqlite3
  args:
    database: \"$datadir/homeserver.db\""
            ;;
        postgres:*)
            local dbname="${db#postgres:}"
            local pghost="${SYNAPSE_PGHOST:-127.0.0.1}" pgport="${SYNAPSE_PGPORT:-5432}" pguser="${SYNAPSE_PGUSER:-postgres}"
            case "$dbname" in
                '' | *[!A-Za-z0-9_]*) die "database name must be [A-Za-z0-9_]+: '$dbname'" ;;
                postgres | template0 | template1) die "refusing to drop and recreate database '$dbname'" ;;
            esac
            case "$pghost" in
                127.* | localhost | ::1) ;;
                *) die "SYNAPSE_PGHOST must be a loopback address, not $pghost" ;;
            esac
            command -v createdb >/dev/null || die "createdb not found (PostgreSQL client tools)"
            log "recreating PostgreSQL database $dbname on $pghost:$pgport"
            PGOPTIONS="-c client_min_messages=warning" dropdb -h "$pghost" -p "$pgport" -U "$pguser" --if-exists "$dbname"
            createdb -h "$pghost" -p "$pgport" -U "$pguser" -E UTF8 --locale=C -T template0 "$dbname"
            database="database:
  name: psycopg2
  args:
    user: \"$pguser\"
    dbname: \"$dbname\"
    host: \"$pghost\"
    port: $pgport"
            # Pool size: Twisted's default (3..5 connections) unless asked otherwise.
            local cp
            for cp in min max; do
                local var="SYNAPSE_PG_CP_${cp^^}"
                if [ -n "${!var:-}" ]; then
                    case "${!var}" in *[!0-9]*) die "$var must be a number" ;; esac
                    database="$database
    cp_$cp: ${!var}"
                fi
            done
            ;;
        *) die "database must be 'sqlite' or 'postgres:<dbname>', not '$db'" ;;
    esac

    {
        fill "$here/homeserver.yaml.template"
        printf '\n# Database (written by run.sh for "%s").\n%s\n' "$db" "$database"
        if [ -n "${SYNAPSE_ALLOW_LOOPBACK_PUSH:-}" ]; then
            # Outbound HTTP to loopback only (the push benchmark's gateway); everything else stays blocked.
            printf '\nip_range_whitelist:\n  - "127.0.0.0/8"\n'
        fi
    } >"$config.tmp"
    mv "$config.tmp" "$config"
    fill "$here/log.config.template" >"$datadir/log.config"

    # Signing key (only if missing: keeping it keeps the server's identity across restarts).
    "$python" -m synapse.app.homeserver --config-path "$config" --generate-keys >/dev/null

    local launcher=(-m synapse.app.homeserver)
    if [ -n "${SYNAPSE_SQLITE_SYNCHRONOUS:-}" ]; then
        case "$SYNAPSE_SQLITE_SYNCHRONOUS" in
            OFF | NORMAL | FULL | EXTRA) ;;
            *) die "SYNAPSE_SQLITE_SYNCHRONOUS must be OFF, NORMAL, FULL or EXTRA" ;;
        esac
        [ "$db" = sqlite ] || die "SYNAPSE_SQLITE_SYNCHRONOUS only applies to the sqlite database"
        launcher=("$here/launch.py")
        log "SQLite connections will use PRAGMA synchronous = $SYNAPSE_SQLITE_SYNCHRONOUS (patched, not stock)"
    fi

    log "starting Synapse on http://127.0.0.1:$port (data: $datadir, database: $db)"
    # nohup execs the interpreter, so $! is Synapse's own pid.
    nohup "$python" "${launcher[@]}" --config-path "$config" \
        </dev/null >"$datadir/synapse.out" 2>&1 &
    local pid=$! started=$SECONDS
    echo "$pid" >"$pidfile"

    local timeout="${SYNAPSE_START_TIMEOUT:-120}"
    local deadline=$((SECONDS + timeout))
    while :; do
        if ! alive "$pid"; then
            rm -f "$pidfile"
            log "Synapse exited during startup; last lines of synapse.out and homeserver.log:"
            tail -n 30 "$datadir/synapse.out" >&2 || true
            tail -n 30 "$datadir/homeserver.log" >&2 2>/dev/null || true
            exit 1
        fi
        if curl -fsS --max-time 2 -o /dev/null "http://127.0.0.1:$port/_matrix/client/versions" 2>/dev/null; then
            break
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "Synapse did not answer within $timeout s; stopping it"
            cmd_stop "$datadir"
            exit 1
        fi
        sleep 0.5
    done
    log "Synapse is up (pid $pid) after $((SECONDS - started)) s"
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    [ -d "$1" ] || die "no such data directory: $1"
    local dir
    dir="$(cd "$1" && pwd)"
    local pidfile="$dir/synapse.pid" config="$dir/homeserver.yaml"
    if [ ! -f "$pidfile" ]; then
        log "no pid file in $dir: not running"
        return 0
    fi
    local pid
    pid="$(cat "$pidfile")"
    case "$pid" in '' | *[!0-9]*) die "bad pid file $pidfile" ;; esac
    if ! alive "$pid"; then
        log "pid $pid is not running; removing stale pid file"
        rm -f "$pidfile"
        return 0
    fi
    is_our_synapse "$pid" "$config" || die "pid $pid is not the Synapse of $dir; leaving it alone"

    log "stopping Synapse (pid $pid)"
    kill -TERM "$pid"
    local timeout="${SYNAPSE_STOP_TIMEOUT:-60}"
    local deadline=$((SECONDS + timeout))
    while alive "$pid"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "pid $pid still running after $timeout s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            local hard=$((SECONDS + 10))
            while alive "$pid" && [ "$SECONDS" -lt "$hard" ]; do sleep 0.2; done
            break
        fi
        sleep 0.2
    done
    alive "$pid" && die "pid $pid did not exit"
    rm -f "$pidfile"
    log "stopped"
}

cmd_status() {
    [ $# -eq 1 ] || usage
    local dir
    dir="$(cd "$1" && pwd)"
    local pidfile="$dir/synapse.pid"
    if [ -f "$pidfile" ] && alive "$(cat "$pidfile")" && is_our_synapse "$(cat "$pidfile")" "$dir/homeserver.yaml"; then
        echo "running (pid $(cat "$pidfile"))"
    else
        echo "not running"
        return 1
    fi
}

[ $# -ge 1 ] || usage
action="$1"
shift
case "$action" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    *) usage ;;
esac
