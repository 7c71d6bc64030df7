#!/usr/bin/env bash
# System packages for tests/deploy/test_compose.py: the Docker engine (the test starts its own
# dockerd), debootstrap (the test builds its base image from Debian packages: no registry can
# be pulled from) and prometheus (scrapes the containers from the host, on loopback).
# Idempotent: installs only what is missing, and refreshes apt's lists only then.
set -euo pipefail
source "$(dirname "$0")/apt.sh"

# policy-rc.d (apt.sh): packages must not start daemons here (the test starts its own
# dockerd, and a system prometheus would take port 9090).
apt_ensure install-docker docker.io debootstrap prometheus
