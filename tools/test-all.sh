#!/usr/bin/env bash
# Install everything virtnet's tests need on a fresh Debian 12 machine, then run them all.
# Needs root (apt, hugepages, network namespaces, TAP). Used as-is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    # Say so before apt-get does, less clearly. Root without sudo: `bash tools/test-all.sh`.
    echo "tools/test-all.sh needs root: sudo bash tools/test-all.sh (as root: bash tools/test-all.sh)" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# iperf3: real traffic; dpdk-dev: dpdk-testpmd (the `dpdk` package has only the libraries);
# qemu-system-x86 + linux-image-cloud-amd64 + busybox-static: a real Linux guest;
# iproute2: ip netns; tshark: reading --pcap output; python3-venv: the test venv;
# ethtool: copied into the guest's initramfs (ethtool -L / -S on a multi-queue eth0);
# build-essential + python3-dev: the compiled build (mypyc); valgrind: callgrind counts.
apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-pip iproute2 iputils-ping iperf3 dpdk-dev qemu-system-x86 \
    linux-image-cloud-amd64 busybox-static tshark kmod cpio zstd xz-utils ethtool \
    build-essential python3-dev valgrind >/dev/null

# What users get: a regular (not editable) install, the data plane compiled by mypyc.
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q '.[test]'
build=$(.venv/bin/virtnet --version)
echo "$build"
case "$build" in
    *"compiled (mypyc"*) ;;
    *) echo "tools/test-all.sh: the install is not compiled ($build)" >&2; exit 1 ;;
esac

.venv/bin/ruff check src tests benchmarks tools setup.py
.venv/bin/python tools/typecheck.py

# Root, TAP, netns, hugepages, QEMU and DPDK are all installed above: a peer test that
# cannot find its facility must fail here, not skip.
export VIRTNET_REQUIRE_PEERS=1
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
# The same unit, property and fuzz tests on the pure modules of the same install.
if [ $# -eq 0 ]; then
    echo "the sans-I/O core again, pure Python (VIRTNET_PURE=1):"
    VIRTNET_PURE=1 .venv/bin/python -m pytest -q tests/virtio tests/net tests/fuzz \
        tests/vhost_user/test_messages.py
    pure=$?
    [ $rc -eq 0 ] && rc=$pure
fi
set -e
# pytest's 5 means "no tests ran": that must fail CI, like any other error.
exit $rc
