#!/usr/bin/env bash
# Debian packages the tests and the demo need, installed once (needs root; skipped when present).
set -euo pipefail
need=()
command -v fluidsynth >/dev/null 2>&1 || dpkg -s libfluidsynth3 >/dev/null 2>&1 || need+=(libfluidsynth3)
[ -e /usr/share/sounds/sf2/TimGM6mb.sf2 ] || need+=(timgm6mb-soundfont)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "[system] missing Debian packages: ${need[*]} (run as root or install them)" >&2
    exit 1
  fi
  echo "[system] apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
