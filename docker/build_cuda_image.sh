#!/usr/bin/env bash
# Build the CUDA image on a machine with no Docker engine (x86_64; no GPU needed) and run a
# 3-rank job inside it, on CPU (the CUDA build falls back to CPU when no GPU is visible).
#
#   sudo bash docker/build_cuda_image.sh           # needs: debootstrap buildah podman (Debian)
#
# The base filesystem comes from debootstrap (Debian bookworm, what debian:bookworm-slim is)
# and is imported as BASE_TAG (default localhost/debian:bookworm-amd64). torch comes from PyPI's
# default index (its linux x86_64 wheel is the CUDA build; the nvidia-* wheels it pulls carry
# the CUDA runtime): several GB of downloads. The RUN steps see, through build-time volumes
# (not stored in any layer), a pip.conf that holds only this machine's CA bundle (CA_BUNDLE)
# for its HTTPS proxy -- no find-links, so no local +cpu torch wheel can stand in for PyPI's.
# Builds use --isolation=chroot and the vfs storage driver: no daemon, no user namespaces
# (vfs copies every layer in full: keep ~25 GB free).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tag="${IMAGE_TAG:-localhost/splitlora-mpi:cuda}"
base="${BASE_TAG:-localhost/debian:bookworm-amd64}"
ca="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
work="$(mktemp -d)"
ctr=""
cleanup() {
  [[ -z "$ctr" ]] || buildah rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
t0=$(date +%s)

step "base filesystem: debootstrap bookworm (minbase) -> $base"
debootstrap --variant=minbase --arch=amd64 bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log"
tar -C "$work/rootfs" -c . | podman import - "$base" >/dev/null
rm -rf "$work/rootfs"
t_base=$(date +%s)

step "image: buildah bud docker/Dockerfile.cuda"
printf '[global]\ncert = /etc/ssl/certs/build-ca.crt\n' >"$work/pip.conf"
buildah bud --isolation=chroot --layers=false -f "$repo/docker/Dockerfile.cuda" \
  --build-arg BASE_IMAGE="$base" \
  -v "$work/pip.conf:/etc/pip.conf:ro" -v "$ca:/etc/ssl/certs/build-ca.crt:ro" \
  -t "$tag" "$repo"
t_build=$(date +%s)
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "splitlora-mpi|debian"

step "check: torch is the CUDA build, no GPU here"
ctr=$(buildah from "$tag")
buildah run --isolation=chroot --user 10001 "$ctr" -- python -c \
  "import torch; print(torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

step "run: mpirun -n 3 python -m splitlora_mpi inside the image (on CPU)"
t_job=$(date +%s)
buildah run --isolation=chroot --user 10001 "$ctr" -- \
  mpirun -n 3 python -m splitlora_mpi --set train.steps=20 --set train.eval_every=10 --set run.out_dir=/tmp/run
t_run=$(date +%s)
buildah run --isolation=chroot --user 10001 "$ctr" -- cat /tmp/run/summary.json
printf '\nbase %ss, build %ss, job %ss\n' "$((t_base - t0))" "$((t_build - t_base))" "$((t_run - t_job))"
