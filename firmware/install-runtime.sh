#!/usr/bin/env bash
# Install edgekit-runtime on a device and trust a signing key.
#   install-runtime.sh --engine onnxruntime|openvino --key host.pub [--source DIR_OR_WHEEL]
#                      [--prefix /opt/edgekit] [--keyring /etc/edgekit/keys] [--bindir /usr/local/bin]
set -euo pipefail

engine=onnxruntime
key=""
source_dir="$(cd "$(dirname "$0")/../runtime" 2>/dev/null && pwd || true)"
prefix=/opt/edgekit
keyring=/etc/edgekit/keys
bindir=/usr/local/bin

while [ $# -gt 0 ]; do
  case "$1" in
    --engine) engine="$2"; shift 2 ;;
    --key) key="$2"; shift 2 ;;
    --source) source_dir="$2"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --keyring) keyring="$2"; shift 2 ;;
    --bindir) bindir="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case "$engine" in onnxruntime|openvino) ;; *) echo "--engine must be onnxruntime or openvino" >&2; exit 2 ;; esac
[ -n "$source_dir" ] || { echo "--source: path to runtime/ or an edgekit_runtime wheel" >&2; exit 2; }
[ -z "$key" ] || [ -f "$key" ] || { echo "key $key not found" >&2; exit 2; }

python3 -m venv "$prefix/venv"
"$prefix/venv/bin/python" -m pip install --quiet --upgrade pip
"$prefix/venv/bin/python" -m pip install --quiet "${source_dir}[${engine}]"
# OpenVINO sends usage telemetry on import unless opted out; a device does not phone home.
if [ -x "$prefix/venv/bin/opt_in_out" ]; then
  "$prefix/venv/bin/opt_in_out" --opt_out >/dev/null || echo "warning: could not opt out of OpenVINO telemetry" >&2
fi
install -d "$bindir"
ln -sf "$prefix/venv/bin/edgekit-runtime" "$bindir/edgekit-runtime"

install -d -m 755 "$keyring"
if [ -n "$key" ]; then
  install -m 644 "$key" "$keyring/$(basename "$key")"
fi
echo "edgekit-runtime installed in $prefix/venv; keyring $keyring holds: $(ls "$keyring" | tr '\n' ' ')"
