#!/usr/bin/env bash
# Installs stepflow's build dependencies from Debian/Ubuntu packages, only what is missing.
# Fast no-op (no apt-get update) when everything is present.
#
# Usage: scripts/install-deps.sh [--with-fuzz] [--with-plots]
#   --with-fuzz   also clang and libclang-rt-14-dev (libFuzzer)
#   --with-plots  also gnuplot-nox (benchmark report plots)
set -euo pipefail

packages=(cmake ninja-build g++ libtbb-dev libfmt-dev libgtest-dev libgmock-dev libbenchmark-dev
          nlohmann-json3-dev)

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }

for arg in "$@"; do
  case "$arg" in
    --with-fuzz) packages+=(clang libclang-rt-14-dev) ;;
    --with-plots) packages+=(gnuplot-nox) ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install-deps.sh: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
  esac
done

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "install-deps.sh: not a Debian-based system (no dpkg-query); install these yourself:" >&2
  echo "  ${packages[*]}" >&2
  exit 0
fi

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "dependencies: all present"
  exit 0
fi

echo "dependencies: installing ${missing[*]}"
sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo_cmd=(sudo)
  else
    echo "install-deps.sh: not root and no sudo; run as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

# A freshly booted machine's apt-daily or unattended-upgrades may hold apt's locks for a while:
# wait for them (up to 10 minutes) instead of failing at once.
apt_wait=(-o DPkg::Lock::Timeout=600)
"${sudo_cmd[@]}" apt-get "${apt_wait[@]}" update
"${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get "${apt_wait[@]}" install -y --no-install-recommends "${missing[@]}"
echo "dependencies: installed ${missing[*]}"
