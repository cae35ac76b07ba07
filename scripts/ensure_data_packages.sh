#!/usr/bin/env bash
# Install the Debian packages whose real images the demo data is built from, when missing.
# --bench adds those the benchmarks draw on (real photos and clipart sources for the copy-detection set).
set -euo pipefail
pkgs=(dataset-fashion-mnist openclipart-png crawl-tiles-data)
if [ "${1:-}" = "--bench" ]; then pkgs+=(mate-backgrounds openclipart-svg); fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing Debian data packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
