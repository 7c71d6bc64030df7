# Sourced by deploy/ci/install-*.sh: `apt_ensure TAG PACKAGE...` installs the Debian packages
# that are missing, and nothing else. Idempotent; apt's lists are refreshed only when there
# are none yet or they are too old to install from. Packages start no service here
# (policy-rc.d 101): the tests start their own daemons on ports of their choosing.

apt_ensure() {
    local tag="$1"
    shift
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        echo "$tag: $* already installed"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    echo "$tag: installing ${missing[*]}"
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        made_policy=1
    fi
    local status=0
    if ! compgen -G "/var/lib/apt/lists/*_Packages*" > /dev/null; then
        apt-get update -qq && _apt_install "${missing[@]}" || status=$?
    elif ! _apt_install "${missing[@]}"; then
        apt-get update -qq && _apt_install "${missing[@]}" || status=$?
    fi
    if [ -n "$made_policy" ]; then rm -f "$policy"; fi
    return "$status"
}

_apt_install() { apt-get install -y -qq --no-install-recommends "$@"; }
