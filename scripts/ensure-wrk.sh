#!/bin/sh
# wrk (Debian's package), the load generator of bench/rpc.py: installed when missing.
set -eu
command -v wrk >/dev/null 2>&1 && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-wrk: wrk is missing; install Debian's wrk package (apt-get install wrk)" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk
