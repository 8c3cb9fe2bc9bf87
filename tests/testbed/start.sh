#!/usr/bin/env bash
# Start a real single-node Slurm 22.05 cluster with accounting, for tests.
#
# Idempotent: a second run while everything is up is a fast no-op; a run after
# a partial failure starts only what is missing. Everything (configs, state,
# logs, pid files, MariaDB datadir, munge key) lives under one base folder:
#   SLURM_TESTBED_DIR   (default /tmp/slurm-testbed)
# Other knobs (rarely needed):
#   SLURM_TESTBED_DB_PORT   MariaDB TCP port on 127.0.0.1 (default 33306)
#   SLURM_TESTBED_CPUS      CPUs the node advertises (default 16, see below)
#   SLURM_TESTBED_NO_INSTALL=1  never run apt-get (fail if packages are missing)
#   SLURM_TESTBED_NO_ETC_LINK=1 do not symlink /etc/slurm/slurm.conf
#
# Must run as root (Slurm daemons as root, MariaDB drops to mysql, munged runs
# as munge). Works without systemd as PID 1. Stop with tests/testbed/stop.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BASE="${SLURM_TESTBED_DIR:-/tmp/slurm-testbed}"
DB_PORT="${SLURM_TESTBED_DB_PORT:-33306}"
# The machine may have 2 cores; tests run several jobs at once (a time-limit
# job, a long "running" job, array tasks). With CR_Core_Memory each job holds
# a core, so advertise more CPUs than exist (SlurmdParameters=config_overrides).
NODE_CPUS="${SLURM_TESTBED_CPUS:-16}"
CLUSTER=testbed
ACCOUNT=testbed
DB_PASS=slurmtestbed # local-only throwaway database on 127.0.0.1
START_TIMEOUT=60

log() { printf 'testbed: %s\n' "$*" >&2; }
die() {
    printf 'testbed: error: %s\n' "$*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (Slurm daemons, MariaDB and munged need it)"

ETC="$BASE/etc"
RUN="$BASE/run"
LOGS="$BASE/log"
SLURM_CONF_PATH="$ETC/slurm.conf"
export SLURM_CONF="$SLURM_CONF_PATH"

# pid files (written by the daemons themselves, all under $RUN)
PID_MARIADB="$RUN/mysqld/mariadb.pid" # MariaDB writes it as user mysql
PID_MUNGED="$RUN/munge/munged.pid" # munged writes it as user munge
PID_SLURMDBD="$RUN/slurmdbd.pid"
PID_SLURMCTLD="$RUN/slurmctld.pid"
PID_SLURMD="$RUN/slurmd.pid"

MYSQL_SOCK="$RUN/mysqld/mysqld.sock"
MUNGE_SOCK="$RUN/munge/munge.socket.2"

# Is the process in pid file $1 alive and named $2 (guards against pid reuse)?
alive() {
    local pidfile=$1 name=$2 pid comm
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name"* ]] || return 1
    # A zombie (dead, not yet reaped by PID 1) is not a running daemon.
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

cluster_answers() {
    local states
    states=$(timeout 5 sinfo -h -N -o '%T' 2>/dev/null) || return 1
    [[ $states == idle* || $states == mixed* || $states == allocated* ]] || return 1
    timeout 10 sacct -n -X -S now-1minute >/dev/null 2>&1
}

all_alive() {
    alive "$PID_MARIADB" mariadbd && alive "$PID_MUNGED" munged &&
        alive "$PID_SLURMDBD" slurmdbd && alive "$PID_SLURMCTLD" slurmctld &&
        alive "$PID_SLURMD" slurmd
}

announce() {
    log "cluster '$CLUSTER' is up (base $BASE)"
    printf 'export SLURM_CONF=%s\n' "$SLURM_CONF_PATH"
}

# ---------------------------------------------------------------- fast path
# The configs are regenerated (and daemons restarted if they differ) whenever
# this script or its knobs changed since the last full run.
STAMP="$(cat "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)-$DB_PORT-$NODE_CPUS"
if [[ -f $SLURM_CONF_PATH ]] && [[ $(cat "$BASE/start.stamp" 2>/dev/null) == "$STAMP" ]] &&
    all_alive && cluster_answers; then
    announce
    exit 0
fi

# ---------------------------------------------------------------- packages
need_install() {
    local b
    for b in munged mungekey slurmctld slurmd slurmdbd sinfo sacct sacctmgr sbatch \
        mariadbd mariadb-install-db mariadb; do
        command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || return 0
    done
    return 1
}
export PATH="$PATH:/usr/sbin:/sbin"
if need_install; then
    [[ ${SLURM_TESTBED_NO_INSTALL:-0} == 1 ]] && die "Slurm/MariaDB/munge packages missing and SLURM_TESTBED_NO_INSTALL=1"
    log "installing Debian packages (munge, slurm, mariadb)"
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        # Keep apt from starting the services: we start our own instances.
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    restore_policy() { [[ $created_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d; return 0; }
    trap restore_policy EXIT
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq </dev/null
    timeout 1200 apt-get install -y -qq --no-install-recommends \
        munge slurmctld slurmd slurm-client slurmdbd mariadb-server </dev/null >/dev/null
    restore_policy
    trap - EXIT
    need_install && die "packages installed but some binaries are still missing"
fi

# ---------------------------------------------------------------- folders
mkdir -p "$BASE" "$ETC" "$RUN" "$LOGS" "$BASE/state" "$BASE/spool" \
    "$BASE/mysql/data" "$RUN/mysqld" "$BASE/munge" "$RUN/munge"
chmod 755 "$BASE" "$ETC" "$RUN" "$LOGS"
chown mysql:mysql "$BASE/mysql" "$BASE/mysql/data" "$RUN/mysqld"
chown munge:munge "$BASE/munge" "$RUN/munge"
chmod 700 "$BASE/munge"
chmod 755 "$RUN/munge"
touch "$LOGS/mariadb.log" "$LOGS/munged.log"
chown mysql:mysql "$LOGS/mariadb.log"
chown munge:munge "$LOGS/munged.log"

wait_for() { # wait_for SECONDS DESCRIPTION CMD...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    while ((SECONDS < deadline)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "timed out after ${secs}s waiting for $what (logs in $LOGS)"
}

# ---------------------------------------------------------------- MariaDB
if ! alive "$PID_MARIADB" mariadbd; then
    if [[ ! -d $BASE/mysql/data/mysql ]]; then
        log "initialising MariaDB datadir"
        timeout 120 mariadb-install-db --no-defaults --user=mysql \
            --datadir="$BASE/mysql/data" --skip-test-db --auth-root-authentication-method=socket \
            >"$LOGS/mariadb-install.log" 2>&1 || die "mariadb-install-db failed, see $LOGS/mariadb-install.log"
    fi
    log "starting MariaDB on 127.0.0.1:$DB_PORT"
    rm -f "$PID_MARIADB"
    setsid -f mariadbd --no-defaults --user=mysql --datadir="$BASE/mysql/data" \
        --socket="$MYSQL_SOCK" --pid-file="$PID_MARIADB" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --skip-name-resolve --log-error="$LOGS/mariadb.log" \
        --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1
    wait_for 60 "MariaDB" mariadb-admin --no-defaults -S "$MYSQL_SOCK" ping
    wait_for 10 "MariaDB pid file" alive "$PID_MARIADB" mariadbd
fi
timeout 30 mariadb --no-defaults -S "$MYSQL_SOCK" -u root <<SQL || die "could not create slurm_acct_db"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

# ---------------------------------------------------------------- munge
if ! alive "$PID_MUNGED" munged; then
    if [[ ! -s $BASE/munge/munge.key ]]; then
        timeout 30 mungekey --create --keyfile="$BASE/munge/munge.key"
        chown munge:munge "$BASE/munge/munge.key"
        chmod 400 "$BASE/munge/munge.key"
    fi
    log "starting munged"
    rm -f "$PID_MUNGED" "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    # munged refuses to run as root; it daemonizes and writes its pid file.
    timeout 30 runuser -u munge -- munged --key-file="$BASE/munge/munge.key" \
        --socket="$MUNGE_SOCK" --pid-file="$PID_MUNGED" --log-file="$LOGS/munged.log" \
        --seed-file="$BASE/munge/munged.seed" </dev/null
    wait_for 20 "munged" alive "$PID_MUNGED" munged
    wait_for 20 "munge socket" test -S "$MUNGE_SOCK"
fi

# ---------------------------------------------------------------- configs
HOST="$(hostname -s)"
CGROUP_OK=0
cgroup_v1_writable() {
    local c probe
    for c in memory freezer; do
        # Must be a v1 hierarchy: on a cgroup2 host a folder of that name is just a v2 group.
        [[ $(stat -f -c %T "/sys/fs/cgroup/$c" 2>/dev/null) == cgroupfs ]] || return 1
        probe="/sys/fs/cgroup/$c/slurm-testbed-probe.$$"
        mkdir "$probe" 2>/dev/null || return 1
        rmdir "$probe"
    done
}
if cgroup_v1_writable; then
    CGROUP_OK=1
elif [[ $(stat -f -c %T /sys/fs/cgroup 2>/dev/null) == tmpfs ]]; then
    # A v1 layout without these controllers mounted: try to mount them (privileged
    # containers allow it). Never on a cgroup2 host, where mkdir would make v2 groups.
    for c in memory freezer; do
        if ! mountpoint -q "/sys/fs/cgroup/$c"; then
            mkdir -p "/sys/fs/cgroup/$c" 2>/dev/null &&
                mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c" 2>/dev/null || true
        fi
    done
    cgroup_v1_writable && CGROUP_OK=1
fi

node_line() {
    # `slurmd -C` reports the real hardware; keep memory, override the CPU layout.
    local mem
    mem=$(timeout 30 slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
    [[ -n $mem ]] || mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024))
    mem=$((mem > 2048 ? mem - 512 : mem))
    printf 'NodeName=%s NodeAddr=127.0.0.1 CPUs=%s Boards=1 SocketsPerBoard=1 CoresPerSocket=%s ThreadsPerCore=1 RealMemory=%s State=UNKNOWN\n' \
        "$HOST" "$NODE_CPUS" "$NODE_CPUS" "$mem"
}

if [[ $CGROUP_OK == 1 ]]; then
    MEMORY_CONF="ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
JobAcctGatherParams=NoOverMemoryKill"
    cat >"$ETC/cgroup.conf.new" <<EOF
# Generated by tests/testbed/start.sh: cgroup v1 memory limits give a real OUT_OF_MEMORY.
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
EOF
    MEMORY_MODE=cgroup
else
    # Without cgroups an over-memory job is killed by the accounting poller and
    # ends FAILED 0:9 ("Exceeded job memory limit"), not OUT_OF_MEMORY.
    MEMORY_CONF="ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherParams=OverMemoryKill"
    printf '# cgroups unavailable: not used\n' >"$ETC/cgroup.conf.new"
    MEMORY_MODE=overmemorykill
fi

cat >"$ETC/slurm.conf.new" <<EOF
# Generated by tests/testbed/start.sh — a single-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$PID_SLURMCTLD
SlurmdPidFile=$PID_SLURMD
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MinJobAge=60
KillWait=5
OverTimeLimit=0
InactiveLimit=0
Waittime=0
ReturnToService=2
MailProg=/bin/true
MaxArraySize=10001
# Job ids of 3+ digits, as on real clusters (log-name parsing treats short numbers as names).
FirstJobId=1000
$MEMORY_CONF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
# For slurmdbd connections this field names the munge socket (not a password).
AccountingStoragePass=$MUNGE_SOCK
AccountingStoreFlags=job_comment,job_script,job_env
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobCompType=jobcomp/none
$(node_line)
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

cat >"$ETC/slurmdbd.conf.new" <<EOF
# Generated by tests/testbed/start.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$PID_SLURMDBD
LogFile=$LOGS/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 600 "$ETC/slurmdbd.conf.new"

# Replace a config only when it changed, and then restart the daemons that
# read it (plugin changes need a full restart, not a reconfigure).
CONF_CHANGED=0
for f in slurm.conf cgroup.conf slurmdbd.conf; do
    if ! cmp -s "$ETC/$f.new" "$ETC/$f" 2>/dev/null; then
        [[ -f $ETC/$f ]] && CONF_CHANGED=1
        mv -f "$ETC/$f.new" "$ETC/$f"
    else
        rm -f "$ETC/$f.new"
    fi
done
chmod 600 "$ETC/slurmdbd.conf"
chmod 644 "$ETC/slurm.conf" "$ETC/cgroup.conf"
printf '%s\n' "$MEMORY_MODE" >"$BASE/memory_mode"

if [[ $CONF_CHANGED == 1 ]] && { alive "$PID_SLURMCTLD" slurmctld || alive "$PID_SLURMD" slurmd || alive "$PID_SLURMDBD" slurmdbd; }; then
    log "configuration changed: restarting the Slurm daemons"
    # Running jobs survive a restart of the daemons (state is kept): do not cancel them.
    SLURM_TESTBED_ONLY_SLURM=1 SLURM_TESTBED_KEEP_JOBS=1 "$HERE/stop.sh"
fi

# Let every client (sbatch, sacct, the daemon under test) find the config.
if [[ ${SLURM_TESTBED_NO_ETC_LINK:-0} != 1 ]]; then
    mkdir -p /etc/slurm
    if [[ -L /etc/slurm/slurm.conf || ! -e /etc/slurm/slurm.conf ]]; then
        ln -sfn "$SLURM_CONF_PATH" /etc/slurm/slurm.conf
    else
        log "/etc/slurm/slurm.conf exists and is not ours: leaving it; export SLURM_CONF"
    fi
fi

# ---------------------------------------------------------------- slurmdbd
if ! alive "$PID_SLURMDBD" slurmdbd; then
    log "starting slurmdbd"
    rm -f "$PID_SLURMDBD"
    timeout 60 slurmdbd </dev/null >>"$LOGS/slurmdbd.stdout" 2>&1 || die "slurmdbd failed to start, see $LOGS/slurmdbd.log"
    wait_for 30 "slurmdbd" alive "$PID_SLURMDBD" slurmdbd
    wait_for 30 "slurmdbd to answer" timeout 5 sacctmgr -n -P list cluster
fi

if [[ -z $(timeout 10 sacctmgr -n -P list cluster format=cluster where cluster="$CLUSTER") ]]; then
    timeout 30 sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if [[ -z $(timeout 10 sacctmgr -n -P list account format=account where account="$ACCOUNT") ]]; then
    timeout 30 sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" Description=testbed Organization=testbed >/dev/null
fi
if [[ -z $(timeout 10 sacctmgr -n -P list user format=user where user=root account="$ACCOUNT") ]]; then
    timeout 30 sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
fi

# ---------------------------------------------------------------- slurmctld
if ! alive "$PID_SLURMCTLD" slurmctld; then
    log "starting slurmctld"
    rm -f "$PID_SLURMCTLD"
    timeout 60 slurmctld </dev/null >>"$LOGS/slurmctld.stdout" 2>&1 || die "slurmctld failed to start, see $LOGS/slurmctld.log"
    wait_for 30 "slurmctld" alive "$PID_SLURMCTLD" slurmctld
    wait_for 30 "slurmctld to answer" timeout 5 scontrol ping
fi

# ---------------------------------------------------------------- slurmd
if ! alive "$PID_SLURMD" slurmd; then
    log "starting slurmd"
    rm -f "$PID_SLURMD"
    timeout 60 slurmd </dev/null >>"$LOGS/slurmd.stdout" 2>&1 || die "slurmd failed to start, see $LOGS/slurmd.log"
    wait_for 30 "slurmd" alive "$PID_SLURMD" slurmd
fi

# A node left DOWN/DRAIN by an earlier unclean stop: bring it back.
state=$(timeout 5 sinfo -h -N -o '%T' 2>/dev/null || true)
if [[ $state == down* || $state == drain* ]]; then
    timeout 10 scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
fi

wait_for "$START_TIMEOUT" "the node to be idle and sacct to answer" cluster_answers
printf '%s\n' "$STAMP" >"$BASE/start.stamp"
announce
