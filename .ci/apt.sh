# shellcheck shell=bash
# Sourced by the CI service scripts (slurm.sh, container.sh): Debian packages installed within the caller's
# time budget. Uses the caller's `left` (seconds of the budget left), `give_up MESSAGE` and `$dir` (apt.log).

# apt_install_within_budget WHAT PACKAGE...
# shellcheck disable=SC2154  # dir: the caller's folder
apt_install_within_budget() {
    local what=$1
    shift
    local apt=(apt-get -q -y -o DPkg::Lock::Timeout=10 --no-install-recommends)
    export DEBIAN_FRONTEND=noninteractive
    # The download is what can take long, so the budget bounds it; unpacking from the cache takes seconds,
    # and is given more room: dpkg killed half-way would leave the machine's packages broken.
    if ! timeout "$(left)" "${apt[@]}" --download-only install "$@" >"$dir/apt.log" 2>&1; then
        # A fresh image may have no package lists yet.
        (($(left) > 5)) || give_up "downloading $what took too long"
        timeout "$(left)" apt-get -q update >>"$dir/apt.log" 2>&1
        (($(left) > 5)) || give_up "apt-get update took too long"
        timeout "$(left)" "${apt[@]}" --download-only install "$@" >>"$dir/apt.log" 2>&1 \
            || give_up "apt-get could not download $what in time, see $dir/apt.log"
    fi
    timeout 300 "${apt[@]}" install "$@" >>"$dir/apt.log" 2>&1 \
        || give_up "apt-get could not install $what, see $dir/apt.log"
}
