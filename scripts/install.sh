#!/usr/bin/env bash
# Install eventagg as a systemd service; safe to run again (that is also how to upgrade).
#
#   scripts/install.sh [--prefix DIR] [--python PYTHON] [--pip-args "ARGS"] [--with-gateway] [--with-postgresql]
#
# Lays out:
#   /opt/eventagg/venv/                     virtualenv with eventagg (a wheel) and its dependencies;
#                                           venv/bin/eventagg is the command (run, stats, events, ...)
#   /opt/eventagg/scripts/                  aggregatord.py, stats.py, health.py, events.py, topics.py, consumers.py, publish.py, keys.py, migrate.py
#                                           (thin wrappers of the same command; the development tools
#                                           bench.py, peers.py and dev.py stay in the checkout)
#   /opt/eventagg/config.toml.default       the shipped default config, for reference
#   /etc/eventagg/config.toml               the config (an edited one is never overwritten)
#   /etc/systemd/system/eventagg.service    the unit (state goes to /var/lib/eventagg at run time)
#   /etc/systemd/system/eventagg-gateway.service   with --with-gateway: the HTTP gateway's unit
# and runs `systemctl daemon-reload` when systemd is running and --prefix is not given.
#
# --prefix DIR      install under a staging root (DIR/opt/eventagg, DIR/etc/...); systemctl is not run
# --python PYTHON   interpreter for the virtualenv (default: python3; must be 3.11 or newer)
# --pip-args ARGS   extra pip arguments, e.g. "--no-index --find-links /srv/wheels" for offline installs
#                   (also read from $EVENTAGG_PIP_ARGS)
# --with-gateway    also install the HTTP gateway: its Python dependencies (the gateway extra:
#                   FastAPI, uvicorn, prometheus-client) and its unit (docs/gateway.md)
# --with-postgresql also install the PostgreSQL backend's dependency (the postgresql extra:
#                   psycopg 3), for [storage] backend = "postgresql" (docs/postgresql.md); an
#                   installed config that names that backend installs it without the flag
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "install: $*" >&2; exit 1; }

PREFIX=""
PYTHON="python3"
PIP_ARGS="${EVENTAGG_PIP_ARGS:-}"
WITH_GATEWAY=0
WITH_POSTGRESQL=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX="$2"; shift 2 ;;
        --prefix=*) PREFIX="${1#*=}"; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON="$2"; shift 2 ;;
        --python=*) PYTHON="${1#*=}"; shift ;;
        --pip-args) [ $# -ge 2 ] || die "--pip-args needs a value"; PIP_ARGS="$2"; shift 2 ;;
        --pip-args=*) PIP_ARGS="${1#*=}"; shift ;;
        --with-gateway) WITH_GATEWAY=1; shift ;;
        --with-postgresql) WITH_POSTGRESQL=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "$PREFIX" ]; then
    mkdir -p "$PREFIX"
    PREFIX="$(cd "$PREFIX" && pwd)"
    [ "$PREFIX" != "/" ] || PREFIX=""
fi
OPT="$PREFIX/opt/eventagg"
VENV="$OPT/venv"
ETC="$PREFIX/etc/eventagg"
UNIT_DIR="$PREFIX/etc/systemd/system"
CONFIG="$ETC/config.toml"
STAMP="$OPT/.config-default.sha256"  # checksum of the default config we last installed

if [ -z "$PREFIX" ] && [ "$(id -u)" -ne 0 ]; then
    die "installing into / needs root: run it with sudo, or pass --prefix DIR to stage elsewhere"
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; pass --python /path/to/python3.11"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "eventagg needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
[ -f "$SRC/pyproject.toml" ] && [ -f "$SRC/scripts/systemd/eventagg.service" ] \
    || die "run this script from an eventagg checkout ($SRC has no pyproject.toml or unit file)"

checksum() { sha256sum "$1" | cut -d' ' -f1; }

# 1. The virtualenv: made once; remade if its interpreter is gone (e.g. the base Python was upgraded).
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "install: using the virtualenv in $VENV"
else
    echo "install: creating a virtualenv in $VENV"
    rm -rf "$VENV"
    mkdir -p "$OPT"
    "$PYTHON" -m venv "$VENV" || die "cannot create a virtualenv; on Debian/Ubuntu: apt-get install python3-venv"
fi

# 2. The project, built from a clean copy so the checkout is never written to: pip builds a wheel
#    of it and installs that (not editable), so the installation does not need the checkout.
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
cp -r "$SRC/pyproject.toml" "$SRC/actors" "$SRC/transport" "$BUILD/"
[ ! -f "$SRC/README.md" ] || cp "$SRC/README.md" "$BUILD/"
find "$BUILD" -name __pycache__ -prune -exec rm -rf {} +
# An upgrade keeps the backend the installed config names: without psycopg it would not start.
# Read as TOML (any quoting, an inline table), not matched as text.
if [ -f "$ETC/config.toml" ] && "$VENV/bin/python" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as file:
    storage = tomllib.load(file).get("storage", {})
sys.exit(0 if isinstance(storage, dict) and storage.get("backend") == "postgresql" else 1)
' "$ETC/config.toml" 2>/dev/null; then
    WITH_POSTGRESQL=1
fi
EXTRAS=""
[ "$WITH_GATEWAY" = 0 ] || EXTRAS="gateway"
[ "$WITH_POSTGRESQL" = 0 ] || EXTRAS="${EXTRAS:+$EXTRAS,}postgresql"
TARGET="$BUILD${EXTRAS:+[$EXTRAS]}"
echo "install: installing eventagg and its dependencies"
# shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $PIP_ARGS "$TARGET" \
    || die "pip could not install eventagg; for an offline machine pass --pip-args \"--no-index --find-links DIR\""

# 3. The scripts of the operator's contract, wrappers of the installed command. Nothing that
#    imports the tests (bench.py, peers.py) or builds a checkout's virtualenv (dev.py) goes here.
#    Their first line names the virtualenv's python, so they run as they are, by path.
mkdir -p "$OPT/scripts"
for script in aggregatord.py stats.py health.py events.py topics.py consumers.py publish.py keys.py migrate.py; do
    install -m 0755 "$SRC/scripts/$script" "$OPT/scripts/"
    sed -i "1s|^#!.*|#!$VENV/bin/python|" "$OPT/scripts/$script"
done
for gone in _bootstrap.py bench.py peers.py dev.py; do  # left by an older install
    rm -f "$OPT/scripts/$gone"
done
[ ! -f "$SRC/README.md" ] || install -m 0644 "$SRC/README.md" "$OPT/README.md"
if [ -d "$SRC/docs" ]; then  # the README's links lead here
    mkdir -p "$OPT/docs"
    install -m 0644 "$SRC"/docs/*.md "$OPT/docs/"
fi
"$VENV/bin/python" -m compileall -q "$OPT/scripts" >/dev/null || true

# 4. The config: a new default replaces an unedited old default, never an edited file.
install -m 0644 "$SRC/config.toml" "$OPT/config.toml.default"
mkdir -p "$ETC"
new_sum="$(checksum "$SRC/config.toml")"
old_sum="$(cat "$STAMP" 2>/dev/null || true)"
if [ ! -f "$CONFIG" ]; then
    install -m 0644 "$SRC/config.toml" "$CONFIG"
    echo "install: wrote the default config to $CONFIG"
elif [ "$(checksum "$CONFIG")" = "$new_sum" ]; then
    echo "install: $CONFIG is up to date"
elif [ "$(checksum "$CONFIG")" = "$old_sum" ]; then
    install -m 0644 "$SRC/config.toml" "$CONFIG"
    echo "install: updated the unedited $CONFIG to the new default"
else
    echo "install: kept your edited $CONFIG"
    if [ "$new_sum" != "$old_sum" ]; then
        install -m 0644 "$SRC/config.toml" "$CONFIG.dist"
        echo "install: the default config changed: compare $CONFIG.dist with yours"
    fi
fi
echo "$new_sum" > "$STAMP"

# 5. The unit.
mkdir -p "$UNIT_DIR"
install -m 0644 "$SRC/scripts/systemd/eventagg.service" "$UNIT_DIR/eventagg.service"
echo "install: installed $UNIT_DIR/eventagg.service"
if [ "$WITH_GATEWAY" = 1 ]; then
    install -m 0644 "$SRC/scripts/systemd/eventagg-gateway.service" "$UNIT_DIR/eventagg-gateway.service"
    echo "install: installed $UNIT_DIR/eventagg-gateway.service"
    install -m 0755 "$SRC/scripts/gateway.py" "$OPT/scripts/"
    sed -i "1s|^#!.*|#!$VENV/bin/python|" "$OPT/scripts/gateway.py"
fi

if [ -z "$PREFIX" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    echo "install: systemd reloaded. Start it with: systemctl enable --now eventagg"
    [ "$WITH_GATEWAY" = 0 ] || echo "install: and the gateway with: systemctl enable --now eventagg-gateway"
    if systemctl is-active --quiet eventagg.service; then
        echo "install: eventagg is running the old version; apply the upgrade with: systemctl restart eventagg"
    fi
else
    echo "install: systemd is not running here (or --prefix was given); systemctl daemon-reload skipped"
fi
