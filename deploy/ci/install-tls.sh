#!/usr/bin/env bash
# System packages for tests/test_http_auth.py: the openssl command, which makes the
# self-signed certificate the TLS tests of `traci http` (REST and gRPC) serve. Without it
# those tests are skipped, except under CI=true, where they fail.
set -euo pipefail
source "$(dirname "$0")/apt.sh"

apt_ensure install-tls openssl
openssl version
