#!/usr/bin/env bash
# System packages for tests/integration/test_netns.py: iproute2 (`ip netns`, veth pairs and a
# Linux bridge; the test runs each service in a network namespace of its own). The test needs
# root as well; without either it is skipped, except under CI=true, where it fails.
set -euo pipefail
source "$(dirname "$0")/apt.sh"

apt_ensure install-netns iproute2
ip -V
