#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for tests and for trying the sbatch scripts.
#
#   slurm/local-cluster.sh start     # idempotent; prints the SLURM_CONF line to export
#   slurm/local-cluster.sh status    # exit 0 only if slurmctld and both nodes answer
#   slurm/local-cluster.sh stop      # stops only the daemons this script started (pid files)
#   slurm/local-cluster.sh env       # prints `export SLURM_CONF=...`
#
# Everything (slurm.conf, state, spools, pid files, logs) lives in $S3REC_CLUSTER_DIR (default
# .cluster/ in the repository root, git-ignored). Nodes node1 and node2 are two slurmd daemons
# on 127.0.0.1 with their own ports; slurmctld listens on $S3REC_CLUSTER_PORT (default 16817).
#
# Authentication: auth/none + cred/none, so no munge daemon is needed. That is only safe because
# every daemon listens on loopback of a single-user machine; never copy this conf to a real cluster.
#
# Accounting: none (no slurmdbd), so `sacct` is disabled. A finished job stays visible to
# `scontrol show job` for MinJobAge (600 s here) with its exact state (COMPLETED, CANCELLED,
# TIMEOUT, ...); launch/ reads that plus submitit's result files.
#
# Partitions: debug (the default) and urgent, on both nodes; an urgent job preempts debug jobs
# (PreemptMode=REQUEUE, GraceTime=60 s), so preemption is tested for real.
#
# Client commands (sbatch, squeue, srun) find this cluster through SLURM_CONF. If the system has no
# /etc/slurm/slurm.conf, `start` links it to ours so they work without SLURM_CONF too.
#
# Needs root (slurmd runs jobs as the submitting user) and the Debian packages `slurm-wlm`
# (tools/setup.sh installs them). Linux only.
set -eo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${S3REC_CLUSTER_DIR:-$REPO/.cluster}"
CTL_PORT="${S3REC_CLUSTER_PORT:-16817}"
NODE_PORT0=$((CTL_PORT + 184))     # 17001, 17002 with the default controller port
NODES=(node1 node2)
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"

die() { echo "local-cluster: $*" >&2; exit 1; }

# The pid in a pid file, if that process is alive and is the daemon we expect.
live_pid() {  # $1 = pid file, $2 = program name
  local f="$1" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f" 2>/dev/null)"
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  grep -q "$2" "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

write_conf() {
  # RealMemory must not exceed what slurmd -C reports, or the node goes INVAL; two fake nodes
  # share this machine's memory, so each advertises a quarter of it (at least 512 MB).
  local cpus mem
  cpus="$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')"
  mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
  [ -n "$cpus" ] && [ -n "$mem" ] || die "could not read CPUs/RealMemory from 'slurmd -C'"
  mem=$((mem / 4)); ((mem >= 512)) || mem=512
  mkdir -p "$DIR"/{state,log,run} "$DIR/spool/node1" "$DIR/spool/node2"
  cat > "$CONF.tmp" <<EOF
# Written by slurm/local-cluster.sh; rewritten at every start.
ClusterName=s3rec-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTL_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# cgroup proctrack loads here but then scancel leaves job processes running.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# Jobs start in ~0.5 s instead of ~2.5 s; a requeued job is looked at again within 2 s.
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2
# Finished jobs stay visible to scontrol/squeue this long (there is no accounting database).
MinJobAge=600
# Requeued jobs (preemption, submitit's checkpoint) may start again at once.
JobRequeue=1
# A requeued job may start again after cred_expire + 1 s (default 120 s): preempted or
# timed-out jobs resume at once. cred_expire is also how long job credentials stay valid.
AuthInfo=cred_expire=5
KillWait=10
InactiveLimit=0
# With no accounting, walltime limits are still enforced by the controller.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=node1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$NODE_PORT0 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((NODE_PORT0 + 1)) CPUs=$cpus RealMemory=$mem State=UNKNOWN
# Preemption as many real clusters have it: a job of the higher tier (partition urgent) takes
# the nodes of debug jobs, which SLURM requeues. The preempted tasks get SIGTERM at once and
# SIGKILL GraceTime seconds later; they save a checkpoint in between and resume when requeued.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=node[1-2] MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=2 PreemptMode=OFF
EOF
  # Unchanged: keep the file as it is (a running cluster then needs nothing).
  if cmp -s "$CONF.tmp" "$CONF"; then rm -f "$CONF.tmp"; return 1; fi
  mv "$CONF.tmp" "$CONF"
}

ensure_hosts() {
  # submitit and the sbatch scripts use node names as MASTER_ADDR: they must resolve.
  local n
  for n in "${NODES[@]}"; do
    getent hosts "$n" >/dev/null && continue
    [ -w /etc/hosts ] || die "$n does not resolve and /etc/hosts is not writable; add '127.0.0.1 ${NODES[*]}'"
    echo "127.0.0.1 ${NODES[*]}  # added by s3rec slurm/local-cluster.sh" >> /etc/hosts
    break
  done
}

ensure_default_conf() {
  local sys=/etc/slurm/slurm.conf
  [ -d /etc/slurm ] && [ -w /etc/slurm ] || return 0
  # A link left by a checkout that is gone (or stopped uncleanly) is replaced; a real file is
  # the machine's own SLURM and is left alone (our commands pass SLURM_CONF anyway).
  if [ -L "$sys" ] && [ ! -e "$sys" ]; then rm -f "$sys"; fi
  if [ ! -e "$sys" ]; then ln -s "$CONF" "$sys"; fi
}

drop_default_conf() {  # only our own link
  local sys=/etc/slurm/slurm.conf
  if [ -L "$sys" ] && [ "$(readlink "$sys")" = "$CONF" ]; then rm -f "$sys"; fi
}

sinfo_ok() {  # both nodes answer: idle, mixed, allocated or completing (no '*' = not responding)
  local out
  out="$(SLURM_CONF="$CONF" timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
  local n
  for n in "${NODES[@]}"; do
    echo "$out" | grep -Eq "^$n (idle|mix|alloc|comp)$" || return 1
  done
}

start() {
  command -v slurmctld >/dev/null || die "slurmctld not found: run tools/setup.sh (apt slurm-wlm)"
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd starts jobs as the submitting user)"
  if live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null \
     && live_pid "$DIR/run/slurmd-node1.pid" slurmd >/dev/null \
     && live_pid "$DIR/run/slurmd-node2.pid" slurmd >/dev/null; then
    # A running cluster started by an older checkout gets this one's slurm.conf (partitions and
    # scheduling take effect on reconfigure; node definitions would need a stop and start).
    if write_conf; then
      SLURM_CONF="$CONF" scontrol reconfigure || die "scontrol reconfigure failed after slurm.conf changed"
      echo "local-cluster: slurm.conf changed; reconfigured"
    fi
    resume_nodes
    wait_ready && { echo "local-cluster: already running"; print_env; return 0; }
  fi
  ensure_hosts
  write_conf || true
  ensure_default_conf
  export SLURM_CONF="$CONF"
  if ! live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
    # -c would wipe queued jobs; keep state so a restart does not lose the queue.
    slurmctld -f "$CONF" || die "slurmctld failed to start; see $DIR/log/slurmctld.log"
  fi
  local n
  for n in "${NODES[@]}"; do
    if ! live_pid "$DIR/run/slurmd-$n.pid" slurmd >/dev/null; then
      slurmd -f "$CONF" -N "$n" || die "slurmd $n failed to start; see $DIR/log/slurmd-$n.log"
    fi
  done
  resume_nodes
  wait_ready || die "cluster did not become ready in 30 s; see $DIR/log/"
  echo "local-cluster: running (conf $CONF)"
  print_env
}

resume_nodes() {
  # A node left DOWN or DRAIN (killed slurmd, failed job) is put back in service.
  local n st
  for ((i = 0; i < 20; i++)); do
    SLURM_CONF="$CONF" timeout 5 scontrol ping >/dev/null 2>&1 && break
    sleep 0.5
  done
  for n in "${NODES[@]}"; do
    st="$(SLURM_CONF="$CONF" timeout 5 sinfo -h -n "$n" -N -o '%t' 2>/dev/null || true)"
    case "$st" in
      down*|drain*|drng*|fail*|inval*)
        SLURM_CONF="$CONF" scontrol update nodename="$n" state=resume 2>/dev/null || true ;;
    esac
  done
}

wait_ready() {
  for ((i = 0; i < 60; i++)); do
    sinfo_ok && return 0
    sleep 0.5
  done
  return 1
}

print_env() { echo "export SLURM_CONF=$CONF"; }

# This cluster's step daemons: slurmd's children run in its log folder, and outlive slurmd
# (re-parented to init) when it stops while a job is still running or still ending.
cluster_steps() {
  local pid
  for pid in $(pgrep -x slurmstepd); do
    [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == "$DIR/"* ]] && echo "$pid"
  done
  return 0
}

kill_tree() {  # $1 = pid: its descendants first, so none is re-parented and missed
  local child
  for child in $(pgrep -P "$1"); do kill_tree "$child"; done
  kill -9 "$1" 2>/dev/null || true
}

stop() {
  local f pid name stopped=0
  # Ask the controller first (clean state save); then make sure every pid we wrote is gone.
  if live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
    SLURM_CONF="$CONF" timeout 10 scontrol shutdown >/dev/null 2>&1 || true
  fi
  for f in "$DIR/run/slurmctld.pid" "$DIR/run/slurmd-node1.pid" "$DIR/run/slurmd-node2.pid"; do
    name=slurmd; [[ "$f" == *slurmctld* ]] && name=slurmctld
    for ((i = 0; i < 20; i++)); do
      pid="$(live_pid "$f" "$name")" || break
      ((i == 0)) && kill "$pid" 2>/dev/null || true
      ((i == 19)) && kill -9 "$pid" 2>/dev/null || true
      sleep 0.25
    done
    if pid="$(live_pid "$f" "$name")"; then die "could not stop $name (pid $pid)"; fi
    [ -f "$f" ] && stopped=1 && rm -f "$f"
  done
  # A job's tasks (a training) would otherwise run on unwatched, taking the cores.
  for pid in $(cluster_steps); do kill_tree "$pid"; done
  drop_default_conf
  echo "local-cluster: stopped"
}

status() {
  local ok=0 f name
  for f in slurmctld slurmd-node1 slurmd-node2; do
    name=slurmd; [ "$f" = slurmctld ] && name=slurmctld
    if pid="$(live_pid "$DIR/run/$f.pid" "$name")"; then echo "$f: pid $pid"
    else echo "$f: not running"; ok=1; fi
  done
  if ((ok == 0)) && sinfo_ok; then
    SLURM_CONF="$CONF" sinfo -N -o '%N %P %t %c %m'
    print_env
    return 0
  fi
  [ -f "$CONF" ] && SLURM_CONF="$CONF" timeout 5 sinfo -N -o '%N %P %t' 2>/dev/null || true
  return 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) print_env ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
