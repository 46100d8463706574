#!/usr/bin/env bash
# A real Slurm cluster on one machine, for trying the sbatch scripts before spending cluster time
# (and for tests/test_slurm.py). N emulated nodes (node1..nodeN), each its own slurmd on 127.0.0.1,
# one slurmctld, one munged; every file (config, key, state, spool, logs, pid files) under one folder.
#
#   slurm/local_cluster.sh up N [DIR]   # start N nodes; prints the SLURM_CONF line to export
#   slurm/local_cluster.sh down [DIR]   # cancel every job, stop the daemons by pid, keep DIR for reading
#   slurm/local_cluster.sh status [DIR]
#   slurm/local_cluster.sh install      # only the packages (root, apt-get)
#
# DIR defaults to $HDPO_LOCAL_SLURM_DIR, else /tmp/hdpo-slurm-<user>. Needs Debian's slurmctld, slurmd,
# slurm-client and munge; `up` and `install` install them with apt-get when they are missing (as root).
# Ports are picked free at `up`, so several such clusters (one per folder) can run side by side.
# Node names do not resolve as host names here: scripts must take a node's address from
# `scontrol show node` (NodeAddr), as slurm/train.sbatch does.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

cmd=${1:-}
case "$cmd" in
  up) nodes=${2:-}; dir=${3:-} ;;
  down | status) nodes=; dir=${2:-} ;;
  install) nodes=; dir= ;;
  *) usage ;;
esac
dir=${dir:-${HDPO_LOCAL_SLURM_DIR:-/tmp/hdpo-slurm-$(id -un)}}
if [[ "$cmd" != install ]]; then
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
fi
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"
# Every daemon carries this marker in its environment; `down` finds what is left by it, by pid.
marker="HDPO_LOCAL_SLURM=$dir"

pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
read_pid() { [[ -s "$1" ]] && tr -dc '0-9' <"$1" || true; }

daemon_pids() {
  local f pid
  for f in "$dir"/run/*.pid "$dir"/munge/munged.pid; do
    [[ -e "$f" ]] || continue
    pid=$(read_pid "$f")
    pid_alive "$pid" && echo "$pid"
  done
  return 0
}

# Processes started from this cluster: the daemons and slurmstepd (marked), and all their descendants
# (batch scripts, srun, the ranks).
cluster_pids() {
  python3 - "$marker" <<'EOF'
import os, sys
marker = sys.argv[1].encode()
parent, marked = {}, set()
for name in os.listdir("/proc"):
    if not name.isdigit():
        continue
    try:
        with open(f"/proc/{name}/stat", "rb") as f:
            parent[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
        with open(f"/proc/{name}/environ", "rb") as f:
            if marker in f.read().split(b"\0"):
                marked.add(int(name))
    except (OSError, IndexError, ValueError):
        continue
found, changed = set(marked), True
while changed:
    changed = False
    for pid, ppid in parent.items():
        if ppid in found and pid not in found:
            found.add(pid); changed = True
found -= {os.getpid(), os.getppid()}
print(" ".join(map(str, sorted(found))))
EOF
}

install_packages() {
  local missing=()
  for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$bin" >/dev/null 2>&1 ||
      missing+=("$bin")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "local_cluster: missing ${missing[*]}; install as root: apt-get install -y --no-install-recommends" \
      "slurmctld slurmd slurm-client munge" >&2
    exit 3
  fi
  echo "local_cluster: installing slurmctld slurmd slurm-client munge (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

# N+1 consecutive free TCP ports on 127.0.0.1 (slurmctld, then one per slurmd).
free_ports() {
  python3 - "$1" <<'EOF'
import random, socket, sys
count = int(sys.argv[1])
for _ in range(200):
    base = random.randrange(20000, 60000 - count)
    socks = []
    try:
        for port in range(base, base + count):
            s = socket.socket(); s.bind(("127.0.0.1", port)); socks.append(s)
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
    print(base); break
else:
    sys.exit("no free port range")
EOF
}

write_config() {
  local n=$1 base=$2 cpus mem
  cpus=${HDPO_LOCAL_SLURM_CPUS:-$(nproc)}
  mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / n))
  cat >"$conf" <<EOF
# Written by slurm/local_cluster.sh: $n emulated nodes on this machine; everything under $dir.
ClusterName=hdpolocal
SlurmctldHost=localhost
SlurmctldPort=$base
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# The emulated nodes share this machine's cores and memory: take the node lines below as given.
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# SIGTERM -> SIGKILL grace at cancel / requeue (a real cluster's default is 30 s too).
KillWait=30
InactiveLimit=0
MinJobAge=600
NodeName=node[1-$n] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$((base + 1))-$((base + n))] CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  mkdir -p "$dir/munge"
  chmod 711 "$dir" "$dir/munge" # 700 makes munged refuse its socket
  if [[ ! -s "$dir/munge/munge.key" ]]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1k count=1 status=none
    chmod 400 "$dir/munge/munge.key"
  fi
  local socket="$dir/munge/munge.socket"
  ((${#socket} < 100)) || { echo "local_cluster: $socket is too long for a Unix socket; use a shorter DIR" >&2; exit 2; }
  # --force: munged otherwise refuses a socket below a folder that not everyone may enter (pytest's
  # temporary folders are 700); it only warns then.
  env "$marker" munged --socket="$socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" \
    --log-file="$dir/munge/munged.log" --force
}

wait_idle() {
  local n=$1 idle
  for _ in $(seq 1 120); do
    idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle"' | wc -l)
    [[ "$idle" -ge "$n" ]] && return 0
    sleep 0.5
  done
  echo "local_cluster: the nodes did not come up idle within 60 s; logs in $dir/log" >&2
  sinfo -N >&2 || true
  return 1
}

up() {
  [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || usage
  if [[ -n "$(daemon_pids)" ]]; then
    echo "local_cluster: a cluster is already running from $dir; run: $0 down $dir" >&2
    exit 1
  fi
  install_packages
  export PATH="$PATH:/usr/sbin:/sbin"
  rm -rf "$dir/state" "$dir/spool" "$dir/run"
  mkdir -p "$dir/state" "$dir/run" "$dir/log"
  for k in $(seq 1 "$nodes"); do mkdir -p "$dir/spool/node$k"; done
  write_config "$nodes" "$(free_ports $((nodes + 1)))"
  start_munge
  # -i: ignore any saved state (a fresh cluster every time).
  env "$marker" slurmctld -i
  for k in $(seq 1 "$nodes"); do env "$marker" slurmd -N "node$k"; done
  if ! wait_idle "$nodes"; then
    down
    exit 1
  fi
  echo "local_cluster: $nodes nodes up in $dir"
  echo "export SLURM_CONF=$conf"
}

down() {
  export PATH="$PATH:/usr/sbin:/sbin"
  if [[ -f "$conf" ]] && pid_alive "$(read_pid "$dir/run/slurmctld.pid")"; then
    # Jobs first: slurmd's shutdown leaves running steps (slurmstepd and the ranks) behind.
    squeue -h -o %i 2>/dev/null | xargs -r scancel --full --signal=KILL 2>/dev/null || true
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  local pids pid
  for _ in $(seq 1 20); do
    [[ -z "$(daemon_pids)" ]] && break
    sleep 0.25
  done
  pids="$(daemon_pids) $(cluster_pids)"
  for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 20); do
    pids=$(for pid in $pids; do if pid_alive "$pid"; then echo "$pid"; fi; done)
    [[ -z "$pids" ]] && break
    sleep 0.25
  done
  for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -f "$dir"/run/*.pid "$dir/munge/munged.pid"
  echo "local_cluster: stopped (files kept in $dir)"
}

status() {
  export PATH="$PATH:/usr/sbin:/sbin"
  if [[ -z "$(daemon_pids)" ]]; then
    echo "local_cluster: not running in $dir"
    return 1
  fi
  echo "export SLURM_CONF=$conf"
  sinfo -N
  squeue
}

if [[ "$cmd" == install ]]; then
  install_packages
else
  "$cmd"
fi
