#!/usr/bin/env bash
# Install the Debian packages listed in infra/apt-packages.txt that are missing (root with apt only).
# `make test` and `make install` call this; as a non-root user it only reports what is missing.
set -euo pipefail
cd "$(dirname "$0")"
mapfile -t want < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^\s*$/d' apt-packages.txt)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "sysdeps: missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})" >&2
  exit 0
fi
echo "sysdeps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
