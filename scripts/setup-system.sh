#!/usr/bin/env bash
# Installs what the project needs from the system: toolchains for the sandbox's
# eight languages, the isolation tools, the Chromium used by the dashboard test,
# and the PostgreSQL/Redis servers used by the tests. Starts the servers when
# they are installed but stopped. Idempotent: a second run changes nothing.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# --- Debian packages --------------------------------------------------------
# Each line: a command (or file) that proves the need is met, then the Debian
# package that provides it. Checking the command rather than the package keeps
# toolchains installed another way (e.g. a newer Node.js with its own npm).
NEEDS=(
    # toolchains for the sandbox (python3 comes with the machine)
    "g++ g++"
    "javac default-jdk-headless"
    "node nodejs"
    "npm npm"
    "php php-cli"
    "mcs mono-mcs"
    "mono mono-runtime"
    # isolation
    "bwrap bubblewrap"
    "/usr/include/seccomp.h libseccomp-dev"
    # servers for the real-database tests
    "pg_ctlcluster postgresql"
    "redis-server redis-server"
    # data versioning and the dashboard's browser test
    "git git"
    "chromium chromium"
    # --- sandbox section: needs of the sandbox go here ---
)

missing=()
for need in "${NEEDS[@]}"; do
    read -r probe package <<<"$need"
    if [[ "$probe" == /* ]]; then [ -e "$probe" ] && continue; else command -v "$probe" >/dev/null && continue; fi
    missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- the unprivileged user that starts bubblewrap ---------------------------
if ! id sandbox >/dev/null 2>&1; then
    $SUDO useradd --system --no-create-home --shell /usr/sbin/nologin sandbox
fi
# --- sandbox section: further system steps go here ---

# --- servers ----------------------------------------------------------------
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    for version in $(ls /etc/postgresql); do
        $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
# The tests connect as postgres with trust auth on loopback, to database `test`.
if ! psql -h 127.0.0.1 -U postgres -d test -c 'select 1' >/dev/null 2>&1; then
    hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -1)
    if ! grep -q "rewardranker-trust" "$hba"; then
        $SUDO sed -i '1i host all all 127.0.0.1/32 trust # rewardranker-trust\nhost all all ::1/128 trust # rewardranker-trust' "$hba"
        for version in $(ls /etc/postgresql); do
            $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main reload || true
        done
    fi
    $SUDO -u postgres createdb test 2>/dev/null || true
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    for _ in $(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
echo "setup: system ready"
