# Source me: sets SLURM_CONF for the test cluster started by tests/testbed/start.sh.
export SLURM_CONF="${SLURM_TESTBED_DIR:-/tmp/slurm-testbed}/etc/slurm.conf"
