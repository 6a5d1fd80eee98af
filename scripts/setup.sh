#!/usr/bin/env bash
# Set up everything rebalab needs on a Debian/Ubuntu host: apt packages, the venv,
# the built-in guest image. Idempotent: a second run only checks and says so.
# As root it installs missing apt packages itself; otherwise it prints the command.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
# dosfstools+mtools: the Windows kit builds its provisioning drive as a FAT image
APT_PKGS=(qemu-system-x86 qemu-utils kmod cpio gzip xz-utils zstd ca-certificates dosfstools mtools)
if [ -f images/linux/host-packages.txt ]; then
  while read -r p; do
    p=${p%%#*}; p=$(echo "$p" | tr -d '[:space:]')
    [ -n "$p" ] && APT_PKGS+=("$p")
  done < images/linux/host-packages.txt
fi
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  APT_PKGS+=(python3-venv)
fi

missing=()
for p in $(printf '%s\n' "${APT_PKGS[@]}" | sort -u); do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "setup: missing apt packages. Run:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 2
  fi
fi
# apt-get download (the guest image) needs package lists even when nothing is missing
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then
  if [ "$(id -u)" = 0 ]; then apt-get update -q; else
    echo "setup: apt package lists are empty; run: sudo apt-get update" >&2; exit 2; fi
fi

stamp=$VENV/.rebalab-installed
if [ ! -x $VENV/bin/python ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv $VENV
fi
if [ ! -f $stamp ] || [ pyproject.toml -nt $stamp ]; then
  echo "setup: installing rebalab and its dependencies into $VENV"
  $VENV/bin/python -m pip install -q --upgrade pip
  $VENV/bin/python -m pip install -q -e '.[test]'
  touch $stamp
fi

$VENV/bin/python images/linux/build.py
echo "setup: ready"
