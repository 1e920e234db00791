#!/usr/bin/env bash
# Make a headless Chromium and its WebDriver available for the browser tests:
# install Debian's chromium and chromium-driver when either is missing. Idempotent.
# The tests drive /usr/bin/chromium through /usr/bin/chromedriver; selenium-manager
# never downloads a browser or a driver.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi

echo "ensure-chromium: installing chromium and chromium-driver" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null

for binary in /usr/bin/chromium /usr/bin/chromedriver; do
    if [ ! -x "$binary" ]; then
        echo "ensure-chromium: $binary is missing after the install" >&2
        exit 1
    fi
done
