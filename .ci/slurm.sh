#!/usr/bin/env bash
# A one-node SLURM on this machine, for the end-to-end test of the HPC recipes (tests/test_slurm.py).
#
#   .ci/slurm.sh start [DIR]   install slurm-wlm if missing, write DIR/slurm.conf, start slurmctld and
#                              slurmd, wait until the node is idle; DIR/env then exports SLURM_CONF
#   .ci/slurm.sh stop [DIR]    stop the two daemons by the PIDs that start recorded in DIR
#
# DIR defaults to $NORMDIFF_SLURM_DIR, else ${TMPDIR:-/tmp}/normdiff-slurm. `start` never fails: when SLURM
# cannot be up within $NORMDIFF_SLURM_TIMEOUT seconds (default 60, the download included) it says so, stops
# what it started and exits 0, and the test skips. No munge: auth/none and cred/none, the node is this host
# (reached on 127.0.0.1), processes are tracked through /proc (no cgroups), and memory is not scheduled.
set -uo pipefail
# shellcheck source=.ci/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

cmd=${1:-}
dir=${2:-${NORMDIFF_SLURM_DIR:-${TMPDIR:-/tmp}/normdiff-slurm}}
timeout_s=${NORMDIFF_SLURM_TIMEOUT:-60}
port=${NORMDIFF_SLURM_PORT:-6817}  # slurmctld, or the first free pair after it; slurmd: the next port
daemons=(slurmctld slurmd)

stop() {
    local name pid
    # Jobs still running would outlive slurmd (their slurmstepd): cancel them while the controller answers.
    if [[ -f "$dir/slurmctld.pid" ]] && kill -0 "$(<"$dir/slurmctld.pid")" 2>/dev/null; then
        SLURM_CONF="$dir/slurm.conf" timeout 10 scancel --user "$(id -un)" 2>/dev/null
        for _ in $(seq 20); do
            [[ -z $(SLURM_CONF="$dir/slurm.conf" timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    for name in slurmd slurmctld; do
        [[ -f "$dir/$name.pid" ]] || continue
        pid=$(<"$dir/$name.pid")
        if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
        fi
        rm -f "$dir/$name.pid"
    done
    rm -f "$dir/env"
}

give_up() {
    stop
    echo "SLURM is not available ($1); tests/test_slurm.py will skip"
    exit 0
}

# Seconds left of the budget, at least 1 (`timeout 0` would mean no limit at all).
left() { local n=$((timeout_s - SECONDS)); echo $((n > 0 ? n : 1)); }

in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_ports() {
    # Another SLURM (or a start into another folder) may hold the usual ports: its controller would
    # answer our sinfo.
    for _ in $(seq 20); do
        in_use "$port" || in_use $((port + 1)) || return 0
        port=$((port + 2))
    done
    give_up "no free port pair from ${NORMDIFF_SLURM_PORT:-6817} on"
}

install() {
    local missing=0 name
    for name in "${daemons[@]}" sbatch sinfo squeue scontrol; do
        command -v "$name" >/dev/null || missing=1
    done
    [[ $missing == 0 ]] && return 0
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        give_up "slurm-wlm is not installed, and apt-get is not usable here"
    fi
    apt_install_within_budget slurm-wlm slurmctld slurmd slurm-client
}

write_conf() {
    local node user
    node=$(hostname -s)
    user=$(id -un)
    mkdir -p "$dir/state" "$dir/spool"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=normdiff-ci
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.daemon.pid
SlurmdPidFile=$dir/slurmd.daemon.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=1
MinJobAge=300
NodeName=$node NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    echo "export SLURM_CONF=$dir/slurm.conf" >"$dir/env"
}

start() {
    mkdir -p "$dir" || give_up "cannot create $dir"
    stop  # a previous start into the same folder
    install
    free_ports
    write_conf
    export SLURM_CONF="$dir/slurm.conf"
    local name state=""
    for name in "${daemons[@]}"; do
        # -D: stay in the foreground, so $! is the daemon itself; setsid: outlive this script's session
        setsid "$name" -D -f "$SLURM_CONF" >"$dir/$name.out" 2>&1 </dev/null &
        echo $! >"$dir/$name.pid"
    done
    while (( SECONDS < timeout_s )); do
        for name in "${daemons[@]}"; do
            kill -0 "$(<"$dir/$name.pid")" 2>/dev/null \
                || give_up "$name exited: $(cat "$dir/$name.out" "$dir/$name.log" 2>/dev/null | grep -v '^$' | tail -n 1)"
        done
        state=$(timeout 5 sinfo -h -N -o '%N %T %c' 2>/dev/null)
        if [[ "$state" == *" idle "* ]] && kill -0 "$(<"$dir/slurmctld.pid")" "$(<"$dir/slurmd.pid")" 2>/dev/null
        then
            echo "SLURM is up: node $state (SLURM_CONF=$SLURM_CONF; source $dir/env)"
            exit 0
        fi
        sleep 1
    done
    give_up "the node was not idle within ${timeout_s}s${state:+ (sinfo: $state)}"
}

case "$cmd" in
    start) start ;;
    stop) stop; echo "SLURM daemons in $dir stopped" ;;
    *) echo "usage: $0 {start|stop} [DIR]" >&2; exit 2 ;;
esac
