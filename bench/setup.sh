#!/usr/bin/env bash
# Install the peers the end-to-end benchmark compares minismtp against, idempotently:
#   - Postfix's smtp-sink (server) and smtp-source (load generator), from Debian's package;
#   - aiosmtpd and trustme, from PyPI, into the Python that runs bench/run.py.
# The same postfix package gives the TLS scenarios their C reference: the harness starts a
# private instance of Postfix's smtpd (bench/e2e/postfix.py); the package makes the postfix
# user it runs as.
# Postfix is not set up as the machine's mail system: the "No configuration" answer keeps it
# from that, and any postfix master the install started is
# stopped and disabled. Run as root (or with sudo available).
#
#   bash bench/setup.sh            # PYTHON=python3.11 bash bench/setup.sh for another Python
set -euo pipefail

PYTHON=${PYTHON:-python}
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

have_postfix_tools() {
    for tool in smtp-sink smtp-source; do
        command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || return 1
    done
}

if have_postfix_tools; then
    echo "setup: smtp-sink and smtp-source already installed"
else
    echo "setup: installing postfix (for smtp-sink and smtp-source)"
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postfix
fi

# Not a system MTA here: stop the postfix master if the install (or a boot) started it.
if command -v systemctl >/dev/null 2>&1; then
    if [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now postfix >/dev/null 2>&1 || true
    else  # no running systemd (a container): still drop the boot-time link
        $SUDO systemctl disable postfix >/dev/null 2>&1 || true
    fi
fi
if [ -x /usr/sbin/postfix ] && $SUDO /usr/sbin/postfix status >/dev/null 2>&1; then
    $SUDO /usr/sbin/postfix stop >/dev/null 2>&1 || true
fi

if "$PYTHON" -c "import aiosmtpd" >/dev/null 2>&1; then
    version=$("$PYTHON" -c 'import aiosmtpd; print(aiosmtpd.__version__)')
    echo "setup: aiosmtpd already installed ($version)"
else
    echo "setup: installing aiosmtpd"
    "$PYTHON" -m pip install -q aiosmtpd
fi

# The TLS scenarios (S7-S9) make their certificate with trustme (minismtp's test extra).
if "$PYTHON" -c "import trustme" >/dev/null 2>&1; then
    echo "setup: trustme already installed"
else
    echo "setup: installing trustme"
    "$PYTHON" -m pip install -q trustme
fi

# minismtp itself: the harness runs `python -m minismtp` from this checkout.
"$PYTHON" -c "import yaml" >/dev/null 2>&1 || "$PYTHON" -m pip install -q PyYAML

for tool in smtp-sink smtp-source; do
    path=$(command -v "$tool" 2>/dev/null || echo "/usr/sbin/$tool")
    [ -x "$path" ] && echo "setup: $tool: $path" || { echo "setup: $tool missing" >&2; exit 1; }
done
echo "setup: done"
