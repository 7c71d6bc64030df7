#!/usr/bin/env bash
# System packages for tests/deploy/test_compose.py: the Docker engine (the test starts its own
# dockerd), debootstrap (the test builds its base image from Debian packages: no registry can
# be pulled from) and prometheus (scrapes the containers from the host, on loopback).
# Idempotent: installs only what is missing, and refreshes apt's lists only then.
set -euo pipefail

packages=(docker.io debootstrap prometheus)

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-docker: ${packages[*]} already installed"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-docker: installing ${missing[*]}"
# policy-rc.d 101: packages must not start daemons here (the test starts its own dockerd,
# and a system prometheus would take port 9090).
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi
install() { apt-get install -y -qq --no-install-recommends "${missing[@]}"; }
# apt-get update only when needed: no package lists yet, or they are too old to install from.
if ! compgen -G "/var/lib/apt/lists/*_Packages*" > /dev/null; then
    apt-get update -qq
    install
elif ! install; then
    apt-get update -qq
    install
fi
