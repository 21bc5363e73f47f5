#!/usr/bin/env bash
# The container image for tests/test_container_image.py, built on this machine.
#
#   .ci/container.sh [DIR]   install podman (and runc, debootstrap) if missing, build the image with
#                            workflows/build_container.sh (tag normdiff-bids:ci), check that Podman can run
#                            it; DIR/env then exports NORMDIFF_CONTAINER_IMAGE (and CONTAINERS_CONF, when
#                            this machine needs settings of its own to run containers)
#
# DIR defaults to $NORMDIFF_CONTAINER_DIR, else ${TMPDIR:-/tmp}/normdiff-container. It never fails: when the
# image cannot be built and run within $NORMDIFF_CONTAINER_TIMEOUT seconds (default 600: a cold start here,
# the install, the Debian base and the build, takes about 4 minutes; with the layers cached, seconds) it
# says why in one line and exits 0, and the test skips. In a container that lacks CAP_SYS_RESOURCE (and
# mounts cgroups v1 beside a v2 hierarchy), Podman's defaults cannot start a container: then runc, and
# resource limits no higher than this shell's, are written to DIR/containers.conf.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=.ci/apt.sh
. "$root/.ci/apt.sh"
dir=${1:-${NORMDIFF_CONTAINER_DIR:-${TMPDIR:-/tmp}/normdiff-container}}
timeout_s=${NORMDIFF_CONTAINER_TIMEOUT:-600}
tag=${NORMDIFF_CONTAINER_TAG_CI:-normdiff-bids:ci}
test_says="tests/test_container_image.py"
own_conf=${CONTAINERS_CONF:-}  # a setting of the caller's own is tried first, and kept if it works

give_up() {
    rm -f "$dir/env"
    echo "container image not available ($1); $test_says will skip"
    exit 0
}

# Seconds left of the budget, at least 1 (`timeout 0` would mean no limit at all).
left() { local n=$((timeout_s - SECONDS)); echo $((n > 0 ? n : 1)); }

install() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    ((${#missing[@]})) || return 0
    if ! command -v podman >/dev/null && { [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; }; then
        give_up "podman is not installed, and apt-get is not usable here"
    fi
    [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null || return 0  # podman is there: try with it
    apt_install_within_budget "${missing[*]}" "${missing[@]}"
}

# podman run works, as is or with DIR/containers.conf; on success CONTAINERS_CONF is set if needed.
runnable() {
    local image=$1 runtime nproc hard_nproc
    if [[ -n $own_conf ]]; then export CONTAINERS_CONF=$own_conf; else unset CONTAINERS_CONF; fi
    podman run --rm --network none --entrypoint true "$image" >"$dir/run.log" 2>&1 && return 0
    hard_nproc=$(ulimit -Hu)
    [[ $hard_nproc == unlimited ]] && hard_nproc=1048576
    for runtime in crun runc; do
        command -v "$runtime" >/dev/null || continue
        # The hard limit of processes that this shell reports is not always one that may be set again
        # (seen here: 96365 refused, 32768 taken): try lower ones.
        for nproc in "$hard_nproc" 32768 4096; do
            ((nproc <= hard_nproc)) || continue
            cat >"$dir/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Sn):$(ulimit -Hn)", "nproc=$nproc:$nproc"]

[engine]
runtime = "$runtime"
EOF
            if CONTAINERS_CONF="$dir/containers.conf" podman run --rm --network none --entrypoint true \
                "$image" >>"$dir/run.log" 2>&1; then
                export CONTAINERS_CONF="$dir/containers.conf"
                return 0
            fi
        done
    done
    rm -f "$dir/containers.conf"
    if [[ -n $own_conf ]]; then export CONTAINERS_CONF=$own_conf; else unset CONTAINERS_CONF; fi
    return 1
}

mkdir -p "$dir" || give_up "cannot create $dir"
rm -f "$dir/env"
install
command -v podman >/dev/null || give_up "podman is not installed"

base=$(timeout "$(left)" "$root/workflows/build_container.sh" --base-only 2>"$dir/base.log") \
    || give_up "no base image: $(tail -n 1 "$dir/base.log")"
runnable "$base" || give_up "podman cannot run a container here: $(grep -v '^$' "$dir/run.log" | tail -n 1)"

before=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null)
(($(left) > 30)) || give_up "no time left to build the image"
containers=$(podman ps -a --external -q --no-trunc | sort)
if ! NORMDIFF_BASE_IMAGE=$base timeout --kill-after=30 "$(left)" "$root/workflows/build_container.sh" \
        --tag "$tag" >"$dir/build.log" 2>&1; then
    # A build cut short leaves its working containers behind (the layers it finished stay cached).
    comm -13 <(echo "$containers") <(podman ps -a --external -q --no-trunc | sort) \
        | xargs -r podman rm -f >/dev/null 2>&1
    give_up "the image did not build in time, see $dir/build.log: $(grep -v '^$' "$dir/build.log" | tail -n 1)"
fi
after=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null)
# The image this tag named before is not needed any more (its layers shared with the new one stay).
[[ -n $before && $before != "$after" ]] && podman rmi "$before" >/dev/null 2>&1
runnable "localhost/$tag" || give_up "podman cannot run the image: $(grep -v '^$' "$dir/run.log" | tail -n 1)"

{
    echo "export NORMDIFF_CONTAINER_IMAGE=localhost/$tag"
    [[ -n ${CONTAINERS_CONF:-} ]] && echo "export CONTAINERS_CONF=$CONTAINERS_CONF"
} >"$dir/env"
built=$(sed -n 's/^build_container: built [^ ]* in \(.*\)$/\1/p' "$dir/build.log" | tail -n 1)
echo "container image localhost/$tag ready in ${SECONDS} s (its build: $built); $test_says will run (source $dir/env)"
