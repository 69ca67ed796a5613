#!/usr/bin/env bash
# A real single-node SLURM for tests/test_slurm.py: installs Debian's slurmctld, slurmd, the client
# tools and munge, once (needs root; skipped when present). Starting the daemons is the tests' job
# (tests/slurmcluster.py): Debian's package scripts do not start services where PID 1 is not systemd.
set -euo pipefail
need=()
for pkg in slurmctld slurmd slurm-client munge; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "[slurm] missing Debian packages: ${need[*]} (run as root or install them)" >&2
  exit 1
fi
echo "[slurm] apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
# --no-install-recommends: 8 packages (~3 MB) instead of the 43 that slurm-wlm's recommends pull.
if ! apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
