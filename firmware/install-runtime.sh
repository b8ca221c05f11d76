#!/usr/bin/env bash
# Install edgekit-runtime on a device and trust a signing key.
#   install-runtime.sh --engine onnxruntime|openvino|tflite|tensorrt --key host.pub
#                      [--source DIR_OR_WHEEL | --spec 'edgekit-runtime==0.1.0'] [--agent]
#                      [--prefix /opt/edgekit] [--keyring /etc/edgekit/keys] [--bindir /usr/local/bin]
# --spec installs from the configured package index instead of a checkout or a wheel.
# --agent adds the device agent (the [agent] extra: paho-mqtt); without it the device can verify,
# run and benchmark bundles, and edgekit-agent says which extra it lacks.
# tensorrt: the venv sees the system site-packages, where JetPack puts TensorRT (python3-libnvinfer).
# bootstrap.sh runs this; run it alone to (re)install just the runtime.
set -euo pipefail

engine=onnxruntime
key=""
source_dir=""
if [ -d "$(dirname "$0")/../runtime" ]; then
  source_dir="$(cd "$(dirname "$0")/../runtime" && pwd)"
fi
spec=""
prefix=/opt/edgekit
keyring=/etc/edgekit/keys
bindir=/usr/local/bin
extras=""

while [ $# -gt 0 ]; do
  case "$1" in
    --engine) engine="$2"; shift 2 ;;
    --key) key="$2"; shift 2 ;;
    --source) source_dir="$2"; shift 2 ;;
    --spec) spec="$2"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --keyring) keyring="$2"; shift 2 ;;
    --bindir) bindir="$2"; shift 2 ;;
    --agent) extras="agent,"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case "$engine" in
  onnxruntime|openvino|tflite|tensorrt) ;;
  *) echo "--engine must be onnxruntime, openvino, tflite or tensorrt" >&2; exit 2 ;;
esac
[ -n "$source_dir" ] || [ -n "$spec" ] || {
  echo "--source: path to runtime/ or an edgekit_runtime wheel (or --spec edgekit-runtime==VERSION)" >&2; exit 2; }
[ -z "$key" ] || [ -f "$key" ] || { echo "key $key not found" >&2; exit 2; }

venv_opts=()
[ "$engine" != tensorrt ] || venv_opts+=(--system-site-packages)
python3 -m venv "${venv_opts[@]}" "$prefix/venv"
"$prefix/venv/bin/python" -m pip install --quiet --upgrade pip
if [ -n "$spec" ]; then
  # pip merges the two requirements: the version (or URL) from SPEC, the engine as an extra
  "$prefix/venv/bin/python" -m pip install --quiet "$spec" "edgekit-runtime[${extras}${engine}]"
else
  "$prefix/venv/bin/python" -m pip install --quiet "${source_dir}[${extras}${engine}]"
fi
# OpenVINO sends usage telemetry on import unless opted out; a device does not phone home.
if [ -x "$prefix/venv/bin/opt_in_out" ]; then
  "$prefix/venv/bin/opt_in_out" --opt_out >/dev/null || echo "warning: could not opt out of OpenVINO telemetry" >&2
fi
install -d "$bindir"
for tool in edgekit-runtime edgekit-agent; do
  [ ! -e "$prefix/venv/bin/$tool" ] || ln -sf "$prefix/venv/bin/$tool" "$bindir/$tool"
done

install -d -m 755 "$keyring"
if [ -n "$key" ]; then
  install -m 644 "$key" "$keyring/$(basename "$key")"
fi
held=$(find "$keyring" -maxdepth 1 -name '*.pub' -printf '%f ')
echo "edgekit-runtime installed in $prefix/venv; keyring $keyring holds: ${held:-no keys}"
