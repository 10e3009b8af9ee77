#!/usr/bin/env bash
# Remove what scripts/install.sh installed; safe to run again.
#
#   scripts/uninstall.sh [--prefix DIR] [--purge]
#
# Stops and disables the service and the gateway (when systemd is running and --prefix is not
# given), removes their units and /opt/eventagg. The config (/etc/eventagg) and the data (/var/lib/eventagg) stay
# unless --purge is given: the database holds every event ever stored.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "uninstall: $*" >&2; exit 1; }

PREFIX=""
PURGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX="$2"; shift 2 ;;
        --prefix=*) PREFIX="${1#*=}"; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
if [ -n "$PREFIX" ]; then
    [ -d "$PREFIX" ] || { echo "uninstall: $PREFIX does not exist; nothing to do"; exit 0; }
    PREFIX="$(cd "$PREFIX" && pwd)"
    [ "$PREFIX" != "/" ] || PREFIX=""
fi
if [ -z "$PREFIX" ] && [ "$(id -u)" -ne 0 ]; then
    die "uninstalling from / needs root: run it with sudo, or pass --prefix DIR"
fi

UNIT="$PREFIX/etc/systemd/system/eventagg.service"
GATEWAY_UNIT="$PREFIX/etc/systemd/system/eventagg-gateway.service"
SYSTEMD=0
if [ -z "$PREFIX" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    SYSTEMD=1
fi

if [ "$SYSTEMD" = 1 ] && systemctl cat eventagg-gateway.service >/dev/null 2>&1; then
    echo "uninstall: stopping and disabling eventagg-gateway"
    systemctl disable --now eventagg-gateway.service || echo "uninstall: could not stop eventagg-gateway; continuing"
fi
if [ -f "$GATEWAY_UNIT" ]; then
    rm -f "$GATEWAY_UNIT"
    echo "uninstall: removed $GATEWAY_UNIT"
fi
if [ "$SYSTEMD" = 1 ] && systemctl cat eventagg.service >/dev/null 2>&1; then
    echo "uninstall: stopping and disabling eventagg"
    systemctl disable --now eventagg.service || echo "uninstall: could not stop eventagg; continuing"
fi
if [ -f "$UNIT" ]; then
    rm -f "$UNIT"
    echo "uninstall: removed $UNIT"
fi
if [ "$SYSTEMD" = 1 ]; then
    systemctl daemon-reload
    systemctl reset-failed eventagg.service eventagg-gateway.service >/dev/null 2>&1 || true
fi
if [ -d "$PREFIX/opt/eventagg" ]; then
    rm -rf "$PREFIX/opt/eventagg"
    echo "uninstall: removed $PREFIX/opt/eventagg"
fi

# DynamicUser= keeps the state in /var/lib/private/eventagg behind a /var/lib/eventagg symlink.
STATE_DIRS=("$PREFIX/var/lib/eventagg" "$PREFIX/var/lib/private/eventagg")
if [ "$PURGE" = 1 ]; then
    rm -rf "$PREFIX/etc/eventagg" "${STATE_DIRS[@]}"
    echo "uninstall: purged $PREFIX/etc/eventagg and the data in $PREFIX/var/lib/eventagg"
else
    [ ! -d "$PREFIX/etc/eventagg" ] || echo "uninstall: kept the config in $PREFIX/etc/eventagg (--purge removes it)"
    for dir in "${STATE_DIRS[@]}"; do
        if [ -e "$dir" ]; then
            echo "uninstall: kept the data in $dir (--purge removes it)"
        fi
    done
fi
