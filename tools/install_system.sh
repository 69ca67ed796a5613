#!/usr/bin/env bash
# Debian packages the demo and the tests need, installed once with apt-get (needs root; a no-op when
# everything is present). Starting services is the tests' job (tests/conftest.py, tests/slurmcluster.py):
# Debian's package scripts do not start daemons where PID 1 is not systemd.
#   bash tools/install_system.sh          # the demo: FluidSynth and a General MIDI soundfont
#   bash tools/install_system.sh --test   # also Chromium (page test) and a single-node SLURM with munge
set -euo pipefail
wanted=(libfluidsynth3 timgm6mb-soundfont)
if [ "${1:-}" = "--test" ]; then
  # --no-install-recommends keeps SLURM to 8 packages (~3 MB) instead of slurm-wlm's 43.
  wanted+=(chromium chromium-driver slurmctld slurmd slurm-client munge)
fi
need=()
for pkg in "${wanted[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "[system] missing Debian packages: ${need[*]} (run as root, or: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
echo "[system] apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
