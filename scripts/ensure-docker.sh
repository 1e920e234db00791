#!/usr/bin/env bash
# Make a Docker engine answer on this machine: install docker.io from Debian
# and start dockerd in the background when `docker info` fails. Idempotent.
set -euo pipefail

if docker info >/dev/null 2>&1; then
    exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
    echo "ensure-docker: installing docker.io" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq docker.io >/dev/null
fi

if ! pgrep -x dockerd >/dev/null 2>&1; then
    echo "ensure-docker: starting dockerd" >&2
    log=${DOCKERD_LOG:-/var/log/fluster-dockerd.log}
    # setsid: dockerd must outlive the make/CI process group that started it.
    setsid nohup dockerd >"$log" 2>&1 </dev/null &
fi

for _ in $(seq 1 120); do
    if docker info >/dev/null 2>&1; then
        exit 0
    fi
    sleep 0.5
done
echo "ensure-docker: dockerd did not answer within 60 s; see ${DOCKERD_LOG:-/var/log/fluster-dockerd.log}" >&2
exit 1
