#!/usr/bin/env bash
# Build the local job base image (Debian bookworm minbase + python3, venv,
# ca-certificates) with debootstrap and `docker import`, unless it exists.
# A real deployment points --base-image at a registry image instead.
set -euo pipefail

image=${FLUSTER_WORKER_BASE_IMAGE:-fluster-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$image" >/dev/null 2>&1; then
    exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    echo "ensure-base-image: installing debootstrap" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq debootstrap >/dev/null
fi

root=$(mktemp -d /var/tmp/fluster-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "ensure-base-image: debootstrap bookworm into $root" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# Keep the image small: package lists and caches are not needed at run time.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/usr/bin/python3"]' \
    - "$image" >/dev/null
echo "ensure-base-image: built $image" >&2
