#!/usr/bin/env bash
# Build the CPU image on a machine with no registry access and run a 3-rank job inside it.
#
#   sudo bash docker/build_cpu_image.sh            # needs: debootstrap buildah podman (Debian)
#   sudo ARCH=arm64 bash docker/build_cpu_image.sh # arm64 on an x86 host: + qemu-user-static
#
# The base filesystem comes from debootstrap (Debian bookworm, what debian:bookworm-slim is)
# and is imported as localhost/debian:bookworm (-arm64). The RUN steps see, through build-time
# volumes (not stored in any layer): a pip.conf with this machine's CA bundle (CA_BUNDLE) for its
# HTTPS proxy and, on amd64, find-links to the local CPU torch wheel (WHEELS, default /opt/wheels).
# arm64 takes torch from PyPI, whose aarch64 torch 2.13.0 is a CUDA build (it also runs on CPU).
# Builds use --isolation=chroot and the vfs storage driver: no daemon, no user namespaces.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
arch="${ARCH:-amd64}"
case "$arch" in
  amd64) sfx="" ;;
  arm64) sfx="-arm64" ;;
  *) echo "ARCH must be amd64 or arm64" >&2; exit 2 ;;
esac
tag="${IMAGE_TAG:-localhost/splitlora-mpi:cpu$sfx}"
base="localhost/debian:bookworm$sfx"
wheels="${WHEELS:-/opt/wheels}"
ca="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
steps="${STEPS:-20}"
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
work="$(mktemp -d)"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
t0=$(date +%s)

step "base filesystem: debootstrap --arch=$arch bookworm (minbase)"
debootstrap --arch="$arch" --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian \
  >"$work/debootstrap.log"
tar -C "$work/rootfs" -c . | podman import --arch "$arch" - "$base" >/dev/null
t_base=$(date +%s)

step "image: buildah bud --arch $arch docker/Dockerfile.cpu"
printf '[global]\ncert = /etc/ssl/certs/build-ca.crt\n' >"$work/pip.conf"
vols=(-v "$work/pip.conf:/etc/pip.conf:ro" -v "$ca:/etc/ssl/certs/build-ca.crt:ro")
if [ "$arch" = amd64 ]; then
  printf 'find-links = /opt/wheels\n' >>"$work/pip.conf"
  vols+=(-v "$wheels:/opt/wheels:ro")
fi
buildah bud --isolation=chroot --layers=false --arch "$arch" -f "$repo/docker/Dockerfile.cpu" \
  --build-arg BASE_IMAGE="$base" --build-arg TORCH_PIP_ARGS= "${vols[@]}" -t "$tag" "$repo"
t_build=$(date +%s)
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "splitlora-mpi|debian"

step "run: mpirun -n 3 python -m splitlora_mpi inside the image ($arch)"
ctr=$(buildah from --arch "$arch" "$tag")
run=(buildah run --isolation=chroot --user 10001 "$ctr" --)
if [ "$arch" = arm64 ] && [ "$(uname -m)" != aarch64 ]; then
  # qemu-user 7.2 shows the host's /proc/cpuinfo, on which torch's cpuinfo_arm_linux_init
  # segfaults at `import torch`: bind an ARM one (Cortex-A76) over it, then drop to uid 10001.
  # It lacks process_vm_readv (ENOSYS), MPICH's CMA copy for local messages >= 64 KiB: CMA off.
  printf 'processor\t: %s\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' \
    $(seq 0 $(($(getconf _NPROCESSORS_CONF) - 1))) >"$work/cpuinfo"
  run=(buildah run --isolation=chroot --user 0 --cap-add CAP_SYS_ADMIN -v "$work/cpuinfo:/tmp/cpuinfo:ro" "$ctr" --
    sh -c 'mount --bind /tmp/cpuinfo /proc/cpuinfo && exec setpriv --reuid 10001 --regid 10001 --init-groups env HOME=/home/splitlora MPIR_CVAR_CH4_CMA_ENABLE=0 "$@"' sh)
fi
"${run[@]}" uname -m
"${run[@]}" python -c "import torch, mpi4py; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'mpi4py', mpi4py.__version__)"
t_job=$(date +%s)
"${run[@]}" mpirun -n 3 python -m splitlora_mpi --set train.steps="$steps" --set train.eval_every=10 --set run.out_dir=/tmp/run
t_job=$(($(date +%s) - t_job))
"${run[@]}" cat /tmp/run/summary.json
buildah rm "$ctr" >/dev/null
t_run=$(date +%s)
printf '\nbase %ss, build %ss, run %ss (job %ss)\n' "$((t_base - t0))" "$((t_build - t_base))" "$((t_run - t_build))" "$t_job"
