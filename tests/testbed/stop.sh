#!/usr/bin/env bash
# Stop the test cluster started by tests/testbed/start.sh.
#
# Stops only the processes named in the pid files under the base folder
# (SLURM_TESTBED_DIR, default /tmp/slurm-testbed), in reverse start order:
# slurmd, slurmctld, slurmdbd, munged, MariaDB. SIGTERM, wait, SIGKILL after a
# timeout. Jobs still on the cluster are cancelled first so no job processes
# outlive it. State and data stay; start.sh picks them up again.
#   SLURM_TESTBED_ONLY_SLURM=1  stop the Slurm daemons only (used on config change)
#   SLURM_TESTBED_STOP_TIMEOUT  seconds to wait per daemon before SIGKILL (default 30)
set -euo pipefail

BASE="${SLURM_TESTBED_DIR:-/tmp/slurm-testbed}"
RUN="$BASE/run"
TIMEOUT="${SLURM_TESTBED_STOP_TIMEOUT:-30}"
export SLURM_CONF="$BASE/etc/slurm.conf"
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf 'testbed: %s\n' "$*" >&2; }

# Print the pid in pid file $1 if that process is alive and named $2.
live_pid() {
    local pidfile=$1 name=$2 pid comm
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name"* ]] || return 1
    printf '%s\n' "$pid"
}

stop_one() {
    local name=$1 pidfile=$2 pid i
    if ! pid=$(live_pid "$pidfile" "$name"); then
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < TIMEOUT * 10; i++)); do
        [[ -d /proc/$pid ]] || break
        # A zombie is already dead; its parent will reap it.
        [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && break
        sleep 0.1
    done
    if [[ -d /proc/$pid ]] && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]; then
        log "$name did not stop after ${TIMEOUT}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

if live_pid "$RUN/slurmctld.pid" slurmctld >/dev/null && [[ ${SLURM_TESTBED_KEEP_JOBS:-0} != 1 ]]; then
    # Cancel what is still queued or running so job steps do not outlive slurmd.
    jobs=$(timeout 10 squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [[ -n ${jobs// /} ]]; then
        log "cancelling jobs still on the cluster: $jobs"
        # shellcheck disable=SC2086
        timeout 20 scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            [[ -z $(timeout 5 squeue -h -t PD,R,CG,S -o '%A' 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
fi

stop_one slurmd "$RUN/slurmd.pid"
stop_one slurmctld "$RUN/slurmctld.pid"
stop_one slurmdbd "$RUN/slurmdbd.pid"
if [[ ${SLURM_TESTBED_ONLY_SLURM:-0} != 1 ]]; then
    stop_one munged "$RUN/munge/munged.pid"
    stop_one mariadbd "$RUN/mysqld/mariadb.pid"
    rm -f "$BASE/READY"
fi
log "stopped"
