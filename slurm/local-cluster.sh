#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (munge + slurmctld + slurmd), to try the sbatch
# scripts and run the slurm tests without a site cluster. Needs root and Debian's Slurm 22.05 packages:
#   apt-get update && apt-get install -y slurmctld slurmd slurm-client munge
#
#   slurm/local-cluster.sh up       start munge, slurmctld, slurmd; wait until the node is idle
#   slurm/local-cluster.sh down     stop the daemons started by `up` and cancel their jobs
#   slurm/local-cluster.sh status   daemons, node state and queue
#   slurm/local-cluster.sh install  apt-get install the packages above (then `up`)
#
# Config and state live in $GENART_SLURM_DIR (default /tmp/genart-slurm). Clients find the config
# through /etc/slurm/slurm.conf, which `up` writes only when it is absent or was written by this
# script; otherwise export SLURM_CONF=$GENART_SLURM_DIR/slurm.conf.
set -euo pipefail

DIR="${GENART_SLURM_DIR:-/tmp/genart-slurm}"
CONF="$DIR/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
MARK="# written by genart-lightning slurm/local-cluster.sh"
HOST="$(hostname -s)"
CPUS="$(nproc)"
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local-cluster: $*" >&2; exit 1; }

need_tools() {
    local missing=()
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [[ ${#missing[@]} -eq 0 ]] || die "missing ${missing[*]}; run: $0 install (or apt-get install -y ${PACKAGES[*]})"
    [[ $EUID -eq 0 ]] || die "must run as root (slurmd and munge start system daemons); retry with sudo"
}

write_conf() {
    mkdir -p "$DIR"/{ctld,d,log,run}
    local mem_mb
    mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512))
    # linuxproc/task none: containers rarely expose writable cgroups; cons_tres with CR_CPU lets
    # each task of a small job take one CPU; JobRequeue lets jobs requeue themselves.
    cat >"$CONF" <<EOF
$MARK
ClusterName=genart-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# requeued jobs wait cred_expire seconds before they may start again (default 120)
AuthInfo=cred_expire=5
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# schedule every few seconds: a requeued job becomes eligible without a new event to trigger scheduling
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=300
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# twice the cores, with config_overrides: the test jobs mostly sleep between paced steps, so an uninterrupted
# reference job runs beside the job that gets signalled instead of queueing behind it
SlurmdParameters=config_overrides
NodeName=$HOST CPUs=$((2 * CPUS)) RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ ! -e $ETC_CONF ]] || grep -qF "$MARK" "$ETC_CONF"; then
        mkdir -p "$(dirname "$ETC_CONF")"
        cp "$CONF" "$ETC_CONF"
    elif ! cmp -s "$CONF" "$ETC_CONF"; then
        echo "local-cluster: $ETC_CONF belongs to another setup; clients need: export SLURM_CONF=$CONF" >&2
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile /etc/munge/munge.key && chown munge:munge /etc/munge/munge.key; }
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged
    munge -n | unmunge >/dev/null || die "munged started but credentials do not verify; see /var/log/munge/munged.log"
}

running() { [[ -s "$DIR/run/$1.pid" ]] && kill -0 "$(cat "$DIR/run/$1.pid")" 2>/dev/null; }

node_state() { SLURM_CONF="$CONF" sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1; }

up() {
    need_tools
    write_conf
    start_munge
    running slurmctld || slurmctld -f "$CONF"
    running slurmd || slurmd -f "$CONF"
    local state=""
    for _ in $(seq 60); do
        state="$(node_state)"
        case "$state" in
            idle|mixed|allocated|completing) echo "local-cluster: up ($HOST, $((2 * CPUS)) CPUs on $CPUS cores, partition local, config $CONF)"; return 0 ;;
            down*|drain*) SLURM_CONF="$CONF" scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    die "node $HOST not idle after 60 s (state: ${state:-no answer}); see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
}

down() {
    if running slurmctld; then SLURM_CONF="$CONF" scancel --full --quiet --nodelist="$HOST" 2>/dev/null || true; fi
    for daemon in slurmd slurmctld; do
        if running "$daemon"; then
            kill "$(cat "$DIR/run/$daemon.pid")"
            for _ in $(seq 20); do running "$daemon" || break; sleep 0.5; done
        fi
    done
    echo "local-cluster: down (munge left running; state kept in $DIR)"
}

status() {
    for daemon in slurmctld slurmd; do
        if running "$daemon"; then echo "$daemon: running (pid $(cat "$DIR/run/$daemon.pid"))"; else echo "$daemon: stopped"; fi
    done
    if running slurmctld; then
        SLURM_CONF="$CONF" sinfo
        SLURM_CONF="$CONF" squeue
    else
        return 3
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    install) apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${PACKAGES[@]}" ;;
    *) echo "usage: $0 up|down|status|install" >&2; exit 2 ;;
esac
