#!/usr/bin/env bash
# Build the normdiff-bids image from the Containerfile, with Podman (or Docker).
#
#   workflows/build_container.sh [options] [-- more build options]
#
#   -t, --tag TAG            image tag (default normdiff-bids:VERSION, VERSION from the package)
#   -f, --file FILE          the Containerfile (default: the project's)
#   -e, --engine NAME        podman or docker (default: podman when on PATH, else docker)
#   -b, --base IMAGE         base image (default: the Containerfile's, python:3.11-slim-bookworm)
#       --torch-index-url U  where torch comes from (default: the Containerfile's, the CPU builds)
#   -w, --wheels DIR         a folder of wheels, mounted read-only into the build for pip to look in
#                            (repeatable; Podman only; default: the find-links folders of this machine's pip)
#       --no-wheels          mount no wheel folder
#       --ca-bundle FILE     certificates pip trusts in the build, for a network whose TLS is intercepted
#                            (Podman only; default: this machine's pip `cert` setting, if any)
#       --make-base          build the stand-in base below even when the base image can be pulled
#       --base-only          only make sure the base image is there, and print its name
#   -h, --help
#
# On a machine that reaches a container registry and download.pytorch.org this is just `podman build`
# (or `docker build`) with the version, date and commit recorded in the image's labels. Where neither is
# reachable (a closed network with a PyPI or Debian mirror only), it falls back on its own, saying so:
#   * base image: when it is neither present nor pullable, a stand-in with the same Python is made, a
#     Debian bookworm (`debootstrap --variant=minbase`) with python3 (3.11), python3-pip and python3-venv,
#     imported as $NORMDIFF_STANDIN_BASE (default localhost/normdiff-base:bookworm-python3.11); needs root
#     and debootstrap; an existing stand-in is reused (--make-base rebuilds it);
#   * torch: when the torch index does not answer, a local CPU wheel of the pinned release in a wheel
#     folder is used, with PyPI (or pip's configured index) for the rest.
#
# Settings may also come from the environment: NORMDIFF_IMAGE_TAG, CONTAINER_ENGINE, NORMDIFF_BASE_IMAGE,
# NORMDIFF_TORCH_INDEX_URL, NORMDIFF_WHEELS (folders separated by spaces), NORMDIFF_CA_BUNDLE,
# NORMDIFF_DEBIAN_MIRROR (for the stand-in base, default http://deb.debian.org/debian) and
# NORMDIFF_PULL_TIMEOUT (seconds, default 120).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
containerfile="$root/Containerfile"

say() { echo "build_container: $*" >&2; }
die() { say "error: $*"; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

# The Containerfile's own default of an ARG: one source of truth for the base and the torch index.
containerfile_arg() { sed -n "s/^ARG $1=//p" "$containerfile" | head -n 1; }

version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$root/normdiff_bids/_version.py")
[[ -n $version ]] || die "cannot read the version from normdiff_bids/_version.py"

tag=${NORMDIFF_IMAGE_TAG:-normdiff-bids:$version}
engine=${CONTAINER_ENGINE:-}
base=${NORMDIFF_BASE_IMAGE:-}
torch_index=${NORMDIFF_TORCH_INDEX_URL:-}
read -r -a wheels <<<"${NORMDIFF_WHEELS:-}"
wheels_given=${NORMDIFF_WHEELS:+1}
make_base=0
base_only=0
standin=${NORMDIFF_STANDIN_BASE:-localhost/normdiff-base:bookworm-python3.11}
mirror=${NORMDIFF_DEBIAN_MIRROR:-http://deb.debian.org/debian}
pull_timeout=${NORMDIFF_PULL_TIMEOUT:-120}
ca_bundle=${NORMDIFF_CA_BUNDLE:-}
extra=()

while (($#)); do
    case "$1" in
        -t|--tag) tag=${2:?"$1 needs a value"}; shift ;;
        -f|--file) containerfile=${2:?"$1 needs a value"}; shift ;;
        -e|--engine) engine=${2:?"$1 needs a value"}; shift ;;
        -b|--base) base=${2:?"$1 needs a value"}; shift ;;
        --torch-index-url) torch_index=${2:?"$1 needs a value"}; shift ;;
        -w|--wheels) wheels+=("${2:?"$1 needs a value"}"); wheels_given=1; shift ;;
        --no-wheels) wheels=(); wheels_given=1 ;;
        --ca-bundle) ca_bundle=${2:?"$1 needs a value"}; shift ;;
        --make-base) make_base=1 ;;
        --base-only) base_only=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done

if [[ -z $engine ]]; then
    if command -v podman >/dev/null; then engine=podman
    elif command -v docker >/dev/null; then engine=docker
    else die "neither podman nor docker is on PATH (Debian/Ubuntu: apt-get install podman)"
    fi
fi
command -v "$engine" >/dev/null || die "$engine is not on PATH"
"$engine" info >/dev/null 2>&1 || die "$engine info fails: $("$engine" info 2>&1 | grep -v '^$' | tail -n 1)"
[[ -f $containerfile ]] || die "no Containerfile at $containerfile"
base=${base:-$(containerfile_arg BASE_IMAGE)}

image_exists() {
    if [[ $engine == podman ]]; then podman image exists "$1"; else docker image inspect "$1" >/dev/null 2>&1; fi
}

reachable() {  # URL answers within 10 s (any HTTP status)
    if command -v curl >/dev/null; then
        curl -s -o /dev/null --max-time 10 "$1"
    else
        python3 - "$1" <<'EOF' 2>/dev/null
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=10)
except urllib.error.HTTPError:
    pass
EOF
    fi
}

# A Debian bookworm with python3 3.11, standing in for python:3.11-slim-bookworm: like that image it lets
# pip install into the system Python, and keeps no apt lists, manuals, translations or documentation.
make_standin_base() {
    [[ $(id -u) == 0 ]] || die "making the stand-in base needs root (debootstrap); or pass --base IMAGE"
    command -v debootstrap >/dev/null \
        || die "the base $base cannot be pulled, and debootstrap is missing to make a stand-in (apt-get install debootstrap), or pass --base IMAGE"
    local dir
    dir=$(mktemp -d "${TMPDIR:-/var/tmp}/normdiff-base.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$dir'" EXIT
    say "making the stand-in base $standin: debootstrap bookworm from $mirror (about a minute; log: $dir.log)"
    if ! debootstrap --variant=minbase --include=python3,python3-pip,python3-venv \
            bookworm "$dir/root" "$mirror" >"$dir.log" 2>&1; then
        tail -n 5 "$dir.log" >&2
        die "debootstrap failed, see $dir.log"
    fi
    rm -f "$dir"/root/usr/lib/python3*/EXTERNALLY-MANAGED
    rm -rf "$dir"/root/var/lib/apt/lists/* "$dir"/root/var/cache/apt/* "$dir"/root/var/log/* \
        "$dir"/root/usr/share/man/* "$dir"/root/usr/share/info/* "$dir"/root/usr/share/locale/*
    find "$dir/root/usr/share/doc" -type f ! -name copyright -delete
    tar -C "$dir/root" -c . | "$engine" import \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$standin" >/dev/null
    rm -rf "$dir" "$dir.log"
    trap - EXIT
    say "stand-in base $standin made ($("$engine" image inspect --format '{{.Size}}' "$standin" | numfmt --to=iec 2>/dev/null || true))"
}

# 1. The base image.
if ((make_base)); then
    make_standin_base
    base=$standin
elif image_exists "$base"; then
    say "base image $base (present)"
elif timeout "$pull_timeout" "$engine" pull -q "$base" >/dev/null 2>&1; then
    say "base image $base (pulled)"
elif image_exists "$standin"; then
    say "base image $base cannot be pulled; using the stand-in $standin made earlier (--make-base to remake it)"
    base=$standin
else
    say "base image $base cannot be pulled"
    make_standin_base
    base=$standin
fi

if ((base_only)); then
    echo "$base"
    exit 0
fi

# 2. Wheel folders (Podman mounts them into the build; `docker build` has no such option).
if [[ -z $wheels_given ]] && command -v python3 >/dev/null; then
    # pip's own find-links, as `pip config list` shows them (files and PIP_FIND_LINKS alike).
    while read -r value; do
        read -r -a found <<<"$value"
        for dir in "${found[@]}"; do
            dir=${dir#file://}
            [[ -d $dir && " ${wheels[*]} " != *" $dir "* ]] && wheels+=("$dir")
        done
    done < <(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.find-links='\(.*\)'$/\1/p")
fi
mounts=()
if ((${#wheels[@]})); then
    if [[ $engine != podman ]]; then
        say "wheel folders are ignored with $engine (only podman build mounts folders)"
        wheels=()
    else
        for dir in "${wheels[@]}"; do
            [[ -d $dir ]] || die "wheel folder $dir does not exist"
            dir=$(cd "$dir" && pwd)
            mounts+=(--volume "$dir:$dir:ro")
        done
        say "wheel folders mounted read-only for pip: ${wheels[*]}"
    fi
fi

# 3. Where torch comes from.
torch_spec=$(containerfile_arg TORCH_SPEC)
if [[ -z $torch_index ]]; then
    torch_index=$(containerfile_arg TORCH_INDEX_URL)
    if ! reachable "$torch_index/"; then
        torch_version=${torch_spec#*==}
        local_wheel=""
        for dir in "${wheels[@]}"; do
            local_wheel=$(find "$dir" -maxdepth 1 -name "torch-${torch_version}+cpu-cp311-*.whl" | head -n 1)
            [[ -n $local_wheel ]] && break
        done
        [[ -n $local_wheel ]] || die "$torch_index does not answer, and no wheel folder holds a CPU wheel of \
$torch_spec for Python 3.11 (PyPI's is a CUDA build of several GB): pass --torch-index-url URL or --wheels DIR"
        # pip prefers the local 2.x.y+cpu to PyPI's 2.x.y: a local version label sorts after the bare one.
        torch_index=$(python3 -m pip config get global.index-url 2>/dev/null || echo https://pypi.org/simple)
        say "$(containerfile_arg TORCH_INDEX_URL) does not answer; torch from $local_wheel, the rest from $torch_index"
    fi
fi

build=("$engine" build -f "$containerfile" -t "$tag"
       --build-arg "BASE_IMAGE=$base"
       --build-arg "TORCH_INDEX_URL=$torch_index"
       --build-arg "VERSION=$version"
       --build-arg "IMAGE_TAG=$tag"
       --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
if revision=$(git -C "$root" rev-parse HEAD 2>/dev/null); then
    build+=(--build-arg "REVISION=$revision")
fi
if ((${#mounts[@]})); then
    build+=("${mounts[@]}" --build-arg "PIP_FIND_LINKS=${wheels[*]}")
fi
# 4. Certificates: behind a TLS-intercepting proxy pip in the build trusts what this machine's pip trusts.
if [[ -z $ca_bundle ]] && command -v python3 >/dev/null; then
    ca_bundle=$(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.cert='\(.*\)'$/\1/p" | head -n 1)
fi
if [[ -n $ca_bundle ]]; then
    if [[ $engine != podman ]]; then
        say "the CA bundle $ca_bundle is ignored with $engine (only podman build mounts files)"
    else
        [[ -f $ca_bundle ]] || die "CA bundle $ca_bundle does not exist"
        build+=(--volume "$(realpath "$ca_bundle"):/run/pip-cert.pem:ro" --build-arg PIP_CERT=/run/pip-cert.pem)
        say "pip in the build trusts the certificates of $ca_bundle"
    fi
fi
if [[ $engine == podman && $base == "$standin" ]]; then
    # The stand-in is made on machines without a registry, which are often containers themselves: the
    # chroot isolation needs no nested OCI runtime, and the host's network is the one that reaches PyPI.
    build+=(--isolation chroot --network host)
fi
build+=("${extra[@]}" "$root")

say "${build[*]}"
start=$SECONDS
"${build[@]}"
size=$("$engine" image inspect --format '{{.Size}}' "$tag")
say "built $tag in $((SECONDS - start)) s, $(numfmt --to=iec --format=%.2f "$size" 2>/dev/null || echo "$size bytes")"
echo "$tag"
