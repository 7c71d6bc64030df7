#!/usr/bin/env bash
# System packages for tests/integration/test_netns.py: iproute2 (`ip netns`, veth pairs and a
# Linux bridge; the test runs each service in a network namespace of its own). The test needs
# root as well; without either it is skipped, except under CI=true, where it fails.
# Idempotent: installs only what is missing, and refreshes apt's lists only then.
set -euo pipefail

packages=(iproute2)

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-netns: ${packages[*]} already installed"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-netns: installing ${missing[*]}"
install() { apt-get install -y -qq --no-install-recommends "${missing[@]}"; }
# apt-get update only when needed: no package lists yet, or they are too old to install from.
if ! compgen -G "/var/lib/apt/lists/*_Packages*" > /dev/null; then
    apt-get update -qq
    install
elif ! install; then
    apt-get update -qq
    install
fi
ip -V
