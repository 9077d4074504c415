#!/usr/bin/env bash
# Sets up a Debian/Ubuntu host for gputrace, then runs what was asked:
#   contrib/setup.sh watch [ARGS...]   install, then `gputrace watch ARGS...`
#   contrib/setup.sh test  [PYTEST...] install (with test tools), then the test suite
#   contrib/setup.sh install           install only
# Idempotent: a second run only checks.  Needs root (apt, tracefs, BPF).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$here/.venv"
mode=${1:-install}
[ $# -gt 0 ] && shift

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 $mode): apt, tracefs and BPF need it"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian and Ubuntu"

export DEBIAN_FRONTEND=noninteractive
apt_updated=
need_pkgs() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -z "$apt_updated" ]; then apt-get update -q >&2; apt_updated=1; fi
    say "installing ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# Runtime: BCC from the distribution (never PyPI's unrelated "bcc"), libbpf for BTF.
need_pkgs python3 python3-venv python3-pip python3-bpfcc libbpf1 ca-certificates
if [ "$mode" = test ] || [ "$mode" = bench ]; then
    # Real scenarios: users, ACLs, rootless/rootful podman with runc and crun, audit.
    need_pkgs bpfcc-tools gcc libc6-dev make acl attr passwd uidmap busybox-static \
        podman runc crun catatonit auditd util-linux procps e2fsprogs prometheus systemd \
        docker.io
    # contrib/kubernetes is checked by kubectl itself (offline); where no repository
    # carries it, say so: tests/test_kubernetes_manifests.py then fails, one line
    need_pkgs kubectl || say "kubectl is not installable here: the manifest test will fail"
fi

# Kernel headers only let BCC compile; struct offsets come from BTF at run time.
rel=$(uname -r)
if [ ! -e "/lib/modules/$rel/build/include" ] && ! ls -d /usr/src/linux-headers-* >/dev/null 2>&1; then
    if [ -z "$apt_updated" ]; then apt-get update -q >&2; apt_updated=1; fi
    if apt-cache show "linux-headers-$rel" >/dev/null 2>&1; then
        need_pkgs "linux-headers-$rel"
    else
        arch=$(dpkg --print-architecture)
        say "no linux-headers-$rel package; installing generic linux-headers-$arch (offsets come from BTF)"
        need_pkgs "linux-headers-$arch" || need_pkgs linux-headers-generic
    fi
fi

# tracefs: BCC attaches tracepoints through it.
if [ ! -d /sys/kernel/tracing/events ]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null \
        || die "cannot mount tracefs on /sys/kernel/tracing"
fi

# The venv sees the distribution's bcc through --system-site-packages.
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp="$venv/.installed-$(sha1sum "$here/pyproject.toml" | cut -c1-12)-$mode"
# an install with the test extras (test, bench) covers a plain install
covered=$(ls "${stamp%-*}"-* 2>/dev/null | head -1 || true)
if [ ! -e "$stamp" ] && { [ "$mode" != install ] && [ "$mode" != watch ] || [ -z "$covered" ]; }; then
    extras=""
    [ "$mode" = test ] || [ "$mode" = bench ] && extras="[test]"
    say "installing gputrace$extras into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$here$extras" >&2
    touch "$stamp"
fi
"$venv/bin/python" -c 'import bcc' 2>/dev/null || die "python cannot import bcc (python3-bpfcc)"

case "$mode" in
    install) say "ready: $venv/bin/gputrace" ;;
    watch)   exec "$venv/bin/gputrace" watch "$@" ;;
    test)    cd "$here" && exec "$venv/bin/python" -m pytest "$@" ;;
    bench)   cd "$here" && exec "$venv/bin/python" -m contrib.bench "$@" ;;
    *)       die "unknown mode '$mode' (watch, test, bench or install)" ;;
esac
