#!/usr/bin/env bash
# A fleet's TLS material (openssl): a CA, the broker's certificate, one client certificate per device.
#   make-certs.sh OUT_DIR [--days N] [--san DNS:broker.example.com|IP:10.0.0.5]... [DEVICE...]
#
#   OUT_DIR/ca.crt ca.key               the fleet CA (keep ca.key off the broker and the devices)
#   OUT_DIR/server.crt server.key       the broker: SAN localhost, 127.0.0.1 and every --san
#   OUT_DIR/devices/DEVICE.crt .key     a device: CN=DEVICE (its MQTT user name with
#                                       use_identity_as_username), client authentication only
# Re-running keeps an existing CA and adds what is missing. Keys are P-256 EC, mode 600;
# on a Debian broker: chgrp mosquitto server.key && chmod 640 server.key.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
out=$1; shift
days=825
sans="DNS:localhost,IP:127.0.0.1"
devices=()
while [ $# -gt 0 ]; do
  case "$1" in
    --days) days=$2; shift 2 ;;
    --san) sans="$sans,$2"; shift 2 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) devices+=("$1"); shift ;;
  esac
done
command -v openssl >/dev/null || { echo "openssl missing: apt-get install openssl" >&2; exit 2; }
umask 077
mkdir -p "$out/devices"
cd "$out"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -f ca.crt ]; then
  key ca.key
  openssl req -x509 -new -key ca.key -days 3650 -subj "/CN=edgekit fleet CA" -out ca.crt \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash"
fi

sign() {  # sign NAME CN EXTENSIONS
  key "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
  printf '%b' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
common="basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nauthorityKeyIdentifier=keyid\n"
[ -f server.crt ] || sign server "edgekit broker" "${common}extendedKeyUsage=serverAuth\nsubjectAltName=$sans\n"
for d in "${devices[@]}"; do
  case "$d" in [A-Za-z0-9]*) ;; *) echo "device id $d must start with a letter or digit" >&2; exit 2 ;; esac
  [ -f "devices/$d.crt" ] || sign "devices/$d" "$d" "${common}extendedKeyUsage=clientAuth\n"
done
chmod 644 ca.crt server.crt devices/*.crt 2>/dev/null || true
echo "CA $out/ca.crt; broker $out/server.crt (SAN $sans); devices: ${devices[*]:-none}"
