#!/usr/bin/env bash
# Runs the sbatch script `runner run --emit-slurm --nodes 2 --gpus-per-node 1` writes on a real
# Slurm: Debian's slurm-wlm on this one machine, as two nodes (two slurmd daemons, one per node
# name, both on this host), so the job's two tasks are two ranks on two Slurm nodes joined through
# loopback. Pipeline: the quickstart (Fashion-MNIST), one short epoch per training stage.
#
#   sudo scripts/slurm-check.sh target/release/runner results/slurm
#
# Needs root: it installs slurm-wlm if missing and starts munged, slurmctld and two slurmd, all
# with their state, logs and config in a temporary folder, and stops them at the end. Writes the
# script, the job's output, Slurm's logs and a summary (check.txt) into OUT_DIR. Exits non-zero
# when the job fails or rank 1 did not train with rank 0.
set -euo pipefail
[ $# = 2 ] || { echo "usage: $0 RUNNER OUT_DIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: run as root (it starts Slurm's daemons)" >&2; exit 2; }
runner=$(realpath "$1")
out=$(realpath -m "$2")
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
command -v slurmctld >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null

work=$(mktemp -d /tmp/slurm-check.XXXXXX)
chmod 755 "$work"
cleanup() {
  for pid in "$work"/*.pid; do [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true; done
  sleep 1
  cp "$work"/*.log "$out"/ 2>/dev/null || true
  [ -f "$work/hosts" ] && cat "$work/hosts" >/etc/hosts
  rm -rf "$work"
}
trap cleanup EXIT

# munge authenticates Slurm's messages; Debian's package leaves a key in /etc/munge.
mkdir -p /run/munge "$work/munge"
chown munge:munge /run/munge "$work/munge" 2>/dev/null || true
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- munged --pid-file="$work/munge/munged.pid" --log-file="$work/munge/munged.log"
  cp "$work/munge/munged.pid" "$work/munged.pid"
fi

host=$(hostname -s)
# The ranks find their coordinator by the job's first node name, as on a cluster: both names
# stand for this machine until the check ends.
cp /etc/hosts "$work/hosts"
echo "127.0.0.1 node1 node2" >>/etc/hosts
export SLURM_CONF="$work/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=nvit-check
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool-%n
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd-%n.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=16 RealMemory=131072 State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=16 RealMemory=131072 State=UNKNOWN
PartitionName=check Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF
mkdir -p "$work/state"
slurmctld -i
for node in node1 node2; do slurmd -N "$node"; done
for _ in $(seq 30); do
  sinfo -h -o '%T' 2>/dev/null | grep -qx idle && [ "$(sinfo -h -N -o '%T' | grep -cx idle)" = 2 ] && break
  sleep 1
done
sinfo -N | tee "$out/sinfo.txt"

# The quickstart, each training stage one short epoch; cache and runs in the work folder.
layer="$work/short.toml"
cat >"$layer" <<EOF
[pipeline]
results_dir = "$work/results"
runs_dir = "$work/runs"
[stages.train]
epochs = 1
steps_per_epoch = 20
[stages.prune]
interval = 5
max_prune_steps = 2
[stages.distill]
epochs = 1
steps_per_epoch = 20
EOF
export RUNNER_CACHE="$work/cache"
cd "$repo"
"$runner" run pipelines/quickstart.toml --with "$layer" --emit-slurm --nodes 2 --gpus-per-node 1 >"$out/job.sbatch"
cd "$work"
start=$SECONDS
rc=0
sbatch --wait --parsable "$out/job.sbatch" >"$work/job-id" || rc=$?
wall=$((SECONDS - start))
cp "$work"/runs/slurm/*.out "$out/job.out" 2>/dev/null || true
{
  echo "# scripts/slurm-check.sh on $(hostname -s): $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs))"
  echo "slurm: $(sinfo -V)"
  echo "job $(cat "$work/job-id" 2>/dev/null): exit $rc after ${wall} s"
  grep -E "rank [0-9]|error" "$out/job.out" 2>/dev/null || true
} | tee "$out/check.txt"
[ $rc = 0 ] || exit $rc
for stage in train prune distill; do
  grep -q "rank 1: $stage: running $stage with rank 0" "$out/job.out" || { echo "rank 1 did not run $stage with rank 0" >&2; exit 1; }
done
