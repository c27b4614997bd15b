#!/usr/bin/env bash
# Build the CPU image on a machine with no registry access and run a 3-rank job inside it.
#
#   sudo bash docker/build_cpu_image.sh            # needs: debootstrap buildah podman (Debian)
#
# The base filesystem comes from debootstrap (Debian bookworm, what debian:bookworm-slim is)
# and is imported as localhost/debian:bookworm. The RUN steps see, through build-time volumes
# (not stored in any layer): a pip.conf whose find-links holds the local CPU torch wheel
# (WHEELS, default /opt/wheels) and this machine's CA bundle (CA_BUNDLE) for its HTTPS proxy.
# Builds use --isolation=chroot and the vfs storage driver: no daemon, no user namespaces.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tag="${IMAGE_TAG:-localhost/splitlora-mpi:cpu}"
wheels="${WHEELS:-/opt/wheels}"
ca="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
work="$(mktemp -d)"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
t0=$(date +%s)

step "base filesystem: debootstrap bookworm (minbase)"
debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log"
tar -C "$work/rootfs" -c . | podman import - localhost/debian:bookworm >/dev/null
t_base=$(date +%s)

step "image: buildah bud docker/Dockerfile.cpu"
printf '[global]\ncert = /etc/ssl/certs/build-ca.crt\nfind-links = /opt/wheels\n' >"$work/pip.conf"
buildah bud --isolation=chroot --layers=false -f "$repo/docker/Dockerfile.cpu" \
  --build-arg BASE_IMAGE=localhost/debian:bookworm --build-arg TORCH_PIP_ARGS= \
  -v "$work/pip.conf:/etc/pip.conf:ro" -v "$ca:/etc/ssl/certs/build-ca.crt:ro" -v "$wheels:/opt/wheels:ro" \
  -t "$tag" "$repo"
t_build=$(date +%s)
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "splitlora-mpi|debian"

step "run: mpirun -n 3 python -m splitlora_mpi inside the image"
ctr=$(buildah from "$tag")
buildah run --isolation=chroot --user 10001 "$ctr" -- \
  mpirun -n 3 python -m splitlora_mpi --set train.steps=20 --set train.eval_every=10 --set run.out_dir=/tmp/run
buildah run --isolation=chroot --user 10001 "$ctr" -- cat /tmp/run/summary.json
buildah rm "$ctr" >/dev/null
t_run=$(date +%s)
printf '\nbase %ss, build %ss, run %ss\n' "$((t_base - t0))" "$((t_build - t_base))" "$((t_run - t_build))"
