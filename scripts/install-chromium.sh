#!/usr/bin/env bash
# Installs Debian's chromium for the admin browser tests. Needs root (CI and dev machines
# here run as root); elsewhere install it yourself or the browser tests are skipped.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium is not installed and this is not root: the admin browser tests will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
