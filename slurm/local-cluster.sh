#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for tests and for users without a cluster.
#
#   slurm/local-cluster.sh start  [--dir DIR] [--cpus N] [--ctld-port P] [--slurmd-port P]
#   slurm/local-cluster.sh stop   [--dir DIR]
#   slurm/local-cluster.sh status [--dir DIR]
#
# Runs munged (own key and socket), slurmctld and slurmd, with every file they write under
# one folder: DIR, else $BAM_SLURM_DIR, else /tmp/bam-slurm. slurm.conf is written there
# (node line from `slurmd -C`, CPUs raised to --cpus so oversubscribed jobs can be submitted),
# on its own ports (default 16817/16818, or $BAM_SLURM_CTLD_PORT / $BAM_SLURM_SLURMD_PORT),
# so a real Slurm on the same machine is not disturbed. Client commands need
#   export SLURM_CONF=DIR/slurm.conf
# which `start` prints. `start` is idempotent; `stop` cancels the jobs, waits for the queue
# to empty, shuts Slurm down and stops munged, touching only the processes named in DIR's
# pid files. Needs the Debian packages `slurm-wlm munge`; meant to run as root.
# Environment: BAM_SLURM_DIR, BAM_SLURM_CPUS (default max(8, nproc)), BAM_SLURM_CTLD_PORT,
# BAM_SLURM_SLURMD_PORT, BAM_SLURM_START_TIMEOUT (seconds, default 30),
# BAM_SLURM_STOP_TIMEOUT (seconds, default 60), BAM_SLURM_CRED_EXPIRE (seconds a requeued
# job waits before it may start again, default 5; Slurm's own default is 120).
set -euo pipefail

die() { echo "local-cluster: $*" >&2; exit 1; }
say() { echo "local-cluster: $*"; }
usage() {
  sed -n '4,6s/^# *//p' "$0" >&2
  exit 2
}

CMD=${1:-}
[[ $CMD == start || $CMD == stop || $CMD == status ]] || usage
shift
DIR=${BAM_SLURM_DIR:-/tmp/bam-slurm}
CPUS=${BAM_SLURM_CPUS:-}
CTLD_PORT=${BAM_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${BAM_SLURM_SLURMD_PORT:-16818}
START_TIMEOUT=${BAM_SLURM_START_TIMEOUT:-30}
STOP_TIMEOUT=${BAM_SLURM_STOP_TIMEOUT:-60}
CRED_EXPIRE=${BAM_SLURM_CRED_EXPIRE:-5}
while (($#)); do
  case "$1" in
    --dir) [[ $# -ge 2 ]] || usage; DIR=$2; shift 2 ;;
    --dir=*) DIR=${1#--dir=}; shift ;;
    --cpus) [[ $# -ge 2 ]] || usage; CPUS=$2; shift 2 ;;
    --ctld-port) [[ $# -ge 2 ]] || usage; CTLD_PORT=$2; shift 2 ;;
    --slurmd-port) [[ $# -ge 2 ]] || usage; SLURMD_PORT=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "local-cluster: unknown argument '$1'" >&2; usage ;;
  esac
done
[[ -n $DIR ]] || die "empty --dir"
[[ $CTLD_PORT =~ ^[0-9]+$ && $SLURMD_PORT =~ ^[0-9]+$ && $CTLD_PORT != "$SLURMD_PORT" ]] ||
  die "ports must be two different numbers (slurmctld $CTLD_PORT, slurmd $SLURMD_PORT)"
if [[ $CMD == start ]]; then mkdir -p "$DIR" || die "cannot create $DIR"; fi
if [[ -d $DIR ]]; then DIR=$(cd "$DIR" && pwd); fi
# munged's socket path must fit a Unix socket address (108 bytes).
((${#DIR} + 19 < 108)) || die "--dir path too long for munged's socket: $DIR"

CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
MUNGE_KEY=$DIR/munge.key
MUNGED_PID=$DIR/run/munged.pid
CTLD_PID=$DIR/run/slurmctld.pid
SLURMD_PID=$DIR/run/slurmd.pid
LOG=$DIR/log
export SLURM_CONF=$CONF
# Client commands must talk to this cluster only, whatever the caller's environment says.
unset SLURM_JOB_ID SLURM_JOBID SLURM_CLUSTERS SLURM_PARTITION 2>/dev/null || true

need() {
  local missing=()
  for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  ((${#missing[@]} == 0)) || die "missing ${missing[*]}: install the Debian packages 'slurm-wlm munge' (apt-get install slurm-wlm munge)"
}

# alive PIDFILE NAME: the pid in PIDFILE is running and is the program NAME (no reused pids).
alive() {
  local pid comm
  [[ -s $1 ]] || return 1
  pid=$(tr -dc '0-9' <"$1")
  [[ -n $pid ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == "$2" ]]
}
pidof_file() { tr -dc '0-9' <"$1"; }

log_tail() { # log_tail FILE...
  local f
  for f in "$@"; do
    [[ -s $f ]] || continue
    echo "---- last lines of $f" >&2
    tail -n 15 "$f" >&2
  done
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -1; }

write_conf() {
  local line name mem cpus
  line=$(slurmd -C | head -1)
  name=$(sed -n 's/.*NodeName=\([^ ]*\).*/\1/p' <<<"$line")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$line")
  [[ -n $name && -n $mem && -n $cpus ]] || die "cannot parse 'slurmd -C' output: $line"
  if [[ -z $CPUS ]]; then CPUS=$((cpus > 8 ? cpus : 8)); fi
  [[ $CPUS =~ ^[0-9]+$ && $CPUS -ge 1 ]] || die "--cpus must be a positive integer, not '$CPUS'"
  local user
  user=$(id -un)
  cat >"$CONF.tmp" <<EOF
# Written by slurm/local-cluster.sh: a single-node Slurm cluster with all state in
# $DIR. Client commands need: export SLURM_CONF=$CONF
ClusterName=bam-local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# The cgroup tracker needs cgroup controllers this machine may not have mounted.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
# Debian's Open MPI has no PMI1/PMI2: srun launches MPI ranks through PMIx.
MpiDefault=pmix
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2
MailProg=/bin/true
ReturnToService=2
# Jobs may be requeued (sbatch --requeue, scontrol requeue, preemption).
JobRequeue=1
KillWait=15
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=120
SlurmdTimeout=300
MessageTimeout=10
# The node advertises CPUs=$CPUS (the machine has $cpus) so that jobs with more tasks than
# cores can be submitted without --overcommit; config_overrides makes slurmd accept it.
SlurmdParameters=config_overrides
NodeName=$name NodeAddr=127.0.0.1 NodeHostname=$name CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$name Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv "$CONF.tmp" "$CONF"
}

port_busy() { # port_busy PORT: something other than our own daemons listens on it
  command -v ss >/dev/null 2>&1 || return 1
  ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

start_munged() {
  if alive "$MUNGED_PID" munged; then return 0; fi
  if [[ ! -s $MUNGE_KEY ]]; then
    mungekey --create --keyfile="$MUNGE_KEY" >/dev/null 2>&1 ||
      die "mungekey --create --keyfile=$MUNGE_KEY failed"
  fi
  chmod 0600 "$MUNGE_KEY"
  mkdir -p "$MUNGE_DIR"
  chmod 0755 "$MUNGE_DIR"   # clients must reach the socket
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" --pid-file="$MUNGED_PID" \
    --log-file="$LOG/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
    </dev/null >>"$LOG/munged.log" 2>&1 || { log_tail "$LOG/munged.log"; die "munged failed to start"; }
  local i
  for ((i = 0; i < 50; i++)); do
    if munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  log_tail "$LOG/munged.log"
  die "munged does not answer on $MUNGE_SOCKET"
}

do_start() {
  need slurmd slurmctld sinfo scontrol munged mungekey munge unmunge
  [[ $(id -u) -eq 0 ]] || say "warning: not root; slurmd can then run jobs only as $(id -un)"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/run" "$LOG" || die "cannot create folders under $DIR"
  chmod 0755 "$DIR"
  if alive "$MUNGED_PID" munged && alive "$CTLD_PID" slurmctld && alive "$SLURMD_PID" slurmd; then
    say "already running in $DIR"
    sinfo 2>/dev/null || true
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  local t0=$SECONDS
  # A partly running cluster keeps its slurm.conf; a stopped one gets a fresh one.
  if ! alive "$CTLD_PID" slurmctld && ! alive "$SLURMD_PID" slurmd; then
    local p
    for p in "$CTLD_PORT" "$SLURMD_PORT"; do
      port_busy "$p" && die "port $p is already in use (another Slurm?): choose others with --ctld-port/--slurmd-port or BAM_SLURM_CTLD_PORT/BAM_SLURM_SLURMD_PORT"
    done
    write_conf
  fi
  [[ -s $CONF ]] || die "no $CONF"
  start_munged
  if ! alive "$CTLD_PID" slurmctld; then
    slurmctld -f "$CONF" </dev/null >>"$LOG/slurmctld.out" 2>&1 ||
      { log_tail "$LOG/slurmctld.out" "$LOG/slurmctld.log"; die "slurmctld failed to start"; }
  fi
  local name
  name=$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$CONF" | head -1)
  if ! alive "$SLURMD_PID" slurmd; then
    slurmd -f "$CONF" -N "$name" </dev/null >>"$LOG/slurmd.out" 2>&1 ||
      { log_tail "$LOG/slurmd.out" "$LOG/slurmd.log"; die "slurmd failed to start"; }
  fi
  # Wait until the node is idle (or busy with jobs recovered from a previous run).
  local state="" resumed=0
  while ((SECONDS - t0 < START_TIMEOUT)); do
    state=$(node_state || true)
    case "$state" in
      idle|mixed|allocated|completing) break ;;
      drained*|draining*|down*)
        if ((resumed == 0)); then
          scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true
          resumed=1
        fi ;;
    esac
    if ! alive "$CTLD_PID" slurmctld || ! alive "$SLURMD_PID" slurmd; then
      sleep 0.3
      alive "$CTLD_PID" slurmctld || { log_tail "$LOG/slurmctld.out" "$LOG/slurmctld.log"; die "slurmctld exited"; }
      alive "$SLURMD_PID" slurmd || { log_tail "$LOG/slurmd.out" "$LOG/slurmd.log"; die "slurmd exited"; }
    fi
    sleep 0.2
  done
  case "$state" in
    idle|mixed|allocated|completing) ;;
    *)
      log_tail "$LOG/slurmctld.log" "$LOG/slurmd.log"
      die "node $name is not idle after ${START_TIMEOUT}s (state '${state:-no answer}'); logs in $LOG; stop with: $0 stop --dir $DIR" ;;
  esac
  say "up in $((SECONDS - t0))s: node $name ($(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' "$CONF" | head -1) CPUs), $state, state in $DIR"
  sinfo
  echo "export SLURM_CONF=$CONF"
}

# stop_pid PIDFILE NAME: TERM, then KILL after a bounded wait; only if it is our process.
stop_pid() {
  local pid i
  alive "$1" "$2" || { rm -f "$1"; return 0; }
  pid=$(pidof_file "$1")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    alive "$1" "$2" || { rm -f "$1"; return 0; }
    sleep 0.1
  done
  say "$2 (pid $pid) ignored SIGTERM for 10s: killing it"
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.2
  rm -f "$1"
}

do_stop() {
  [[ -d $DIR ]] || { say "nothing to stop: no $DIR"; return 0; }
  local t0=$SECONDS i
  if alive "$CTLD_PID" slurmctld; then
    local jobs
    jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ' || true)
    if [[ -n ${jobs// /} ]]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      while ((SECONDS - t0 < STOP_TIMEOUT)); do
        [[ -z $(squeue -h -o '%A' 2>/dev/null) ]] && break
        sleep 0.3
      done
      if [[ -n $(squeue -h -o '%A' 2>/dev/null) ]]; then
        say "jobs still in the queue after ${STOP_TIMEOUT}s: killing them"
        # shellcheck disable=SC2086
        scancel --signal=KILL $jobs 2>/dev/null || true
        sleep 1
      fi
    fi
    scontrol shutdown >/dev/null 2>&1 || true
    for ((i = 0; i < 150; i++)); do
      alive "$CTLD_PID" slurmctld || alive "$SLURMD_PID" slurmd || break
      sleep 0.1
    done
  fi
  stop_pid "$SLURMD_PID" slurmd
  stop_pid "$CTLD_PID" slurmctld
  if alive "$MUNGED_PID" munged; then
    munged --stop --socket="$MUNGE_SOCKET" >/dev/null 2>&1 || true
    for ((i = 0; i < 50; i++)); do alive "$MUNGED_PID" munged || break; sleep 0.1; done
    stop_pid "$MUNGED_PID" munged
  fi
  rm -f "$MUNGED_PID"
  say "stopped ($DIR) in $((SECONDS - t0))s"
}

do_status() {
  local up=1 n p
  for n in munged slurmctld slurmd; do
    case $n in munged) p=$MUNGED_PID ;; slurmctld) p=$CTLD_PID ;; slurmd) p=$SLURMD_PID ;; esac
    if alive "$p" "$n"; then
      say "$n running (pid $(pidof_file "$p"))"
    else
      say "$n not running"; up=0
    fi
  done
  if ((up)); then
    say "up: export SLURM_CONF=$CONF"
    sinfo || true
    squeue || true
    return 0
  fi
  say "down ($DIR)"
  return 1
}

case "$CMD" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
esac
