#!/usr/bin/env bash
# Exit 0 iff the test cluster answers: the node is up in sinfo and sacct replies.
# Prints the `export SLURM_CONF=...` line on success.
set -uo pipefail
BASE="${SLURM_TESTBED_DIR:-/tmp/slurm-testbed}"
export SLURM_CONF="${SLURM_CONF:-$BASE/etc/slurm.conf}"
export PATH="$PATH:/usr/sbin:/sbin"
[[ -f $SLURM_CONF ]] || { echo "testbed: no config at $SLURM_CONF" >&2; exit 1; }
state=$(timeout 5 sinfo -h -N -o '%T' 2>/dev/null) || { echo "testbed: sinfo does not answer" >&2; exit 1; }
case $state in
    idle* | mixed* | allocated* | completing*) ;;
    *) echo "testbed: node state is '${state:-none}'" >&2; exit 1 ;;
esac
timeout 10 sacct -n -X -S now-1minute >/dev/null 2>&1 || { echo "testbed: sacct does not answer" >&2; exit 1; }
printf 'export SLURM_CONF=%s\n' "$SLURM_CONF"
