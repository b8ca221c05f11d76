#!/usr/bin/env bash
# Turn a fresh Debian/Ubuntu/JetPack device into an edgekit device: the edgekit user, the
# trusted keys, the broker credentials, the agent's state directory, the runtime, agent.toml
# and the two systemd units. Run as root on the device, from the firmware/ folder it came with.
# Re-running it is safe: what exists is kept (agent.toml, keys and credentials are replaced
# only with --force), modes and owners are repaired, the units are updated.
set -euo pipefail
export LC_ALL=C  # [A-Za-z] in the name checks means ASCII letters, whatever the locale

usage() {
  cat <<'EOF'
usage: sudo firmware/bootstrap.sh --device-id ID --fleet FLEET --broker-url mqtts://HOST:8883 --key HOST.pub [options]

  --device-id ID              this device's name (also its MQTT user name / certificate CN)
  --fleet FLEET               the fleet it belongs to (the topic tree edgekit/v1/<fleet>/<device>/...)
  --broker-url URL            mqtt://host[:port] or mqtts://host[:port]
  --key FILE.pub              a trusted bundle/command signing key (repeat for several; keys rotate)
  --username U --password-file FILE
                              broker user name and a file holding its password
  --ca FILE                   CA certificate of the broker (mqtts)
  --cert FILE --client-key FILE
                              this device's client certificate and its private key (mqtts)
  --engine NAME               onnxruntime (default), openvino, tflite or tensorrt
  --runtime-wheel PATH        install edgekit-runtime from this wheel
  --runtime-spec SPEC         ... or from the package index (e.g. 'edgekit-runtime==0.1.0');
                              default: the runtime/ folder next to firmware/
  --admin-user NAME           add NAME (e.g. the user `edgekit flash --host` logs in as) to the
                              group edgekit, so it can hand installs to the running agent (repeatable)
  --force                     rewrite agent.toml and replace keys/credentials that differ
  --no-pip                    do not install the runtime (it is installed already, or comes later)
  --no-systemctl              install the units but do not enable or start them
  --root DIR                  write everything under DIR (an OS image, a test sandbox); as a non-root
                              user, or without DIR/etc/passwd, the user, owner and systemctl steps
                              are skipped (and listed)
  --device-paths              with --root: agent.toml names the device's own paths (/etc/edgekit/...),
                              right for an image that boots with DIR as /. Default with --root: the
                              paths include DIR, so the staged agent can run where it is (tests)
  -h, --help                  this text

Exit status: 0 done, 2 a usage problem (nothing written), 1 a step failed (re-run after fixing it).
EOF
}

die() {  # usage errors: nothing has been written yet
  printf 'bootstrap.sh: %s\n' "$@" >&2
  echo "run 'bootstrap.sh --help' for the options" >&2
  exit 2
}
fail() { echo "bootstrap.sh: $*" >&2; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NAME_RE='^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'  # fleet_protocol.check_name

device_id="" fleet="" broker_url="" username="" password_file="" ca="" cert="" client_key=""
engine=onnxruntime runtime_wheel="" runtime_spec="" root="" force=0 no_pip=0 no_systemctl=0 device_paths=0
keys=() admin_users=()

while [ $# -gt 0 ]; do
  opt=$1
  value=""
  inline=0
  case "$opt" in
    --*=*) value=${opt#*=}; opt=${opt%%=*}; inline=1; shift; set -- "$opt" "$value" "$@" ;;
  esac
  case "$opt" in
    --device-id|--fleet|--broker-url|--key|--username|--password-file|--ca|--cert|--client-key|--engine|\
    --runtime-wheel|--runtime-spec|--root|--admin-user)
      if [ $# -lt 2 ] || [ -z "$2" ]; then die "option $opt needs a value"; fi
      value=$2; shift 2 ;;
    --force|--no-pip|--no-systemctl|--device-paths)
      [ $inline -eq 0 ] || die "option $opt takes no value"
      shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $opt" ;;
  esac
  case "$opt" in
    --device-id) device_id=$value ;;
    --fleet) fleet=$value ;;
    --broker-url) broker_url=$value ;;
    --key) keys+=("$value") ;;
    --username) username=$value ;;
    --password-file) password_file=$value ;;
    --ca) ca=$value ;;
    --cert) cert=$value ;;
    --client-key) client_key=$value ;;
    --engine) engine=$value ;;
    --runtime-wheel) runtime_wheel=$value ;;
    --runtime-spec) runtime_spec=$value ;;
    --root) root=$value ;;
    --admin-user) admin_users+=("$value") ;;
    --force) force=1 ;;
    --no-pip) no_pip=1 ;;
    --no-systemctl) no_systemctl=1 ;;
    --device-paths) device_paths=1 ;;
  esac
done

# -- validate everything before writing anything (every problem at once) -------------------
problems=()
problem() { problems+=("$1"); }
file_ok() {  # file_ok OPTION PATH: an existing, readable regular file
  if [ ! -e "$2" ]; then problem "$1 $2: no such file"
  elif [ ! -f "$2" ]; then problem "$1 $2: not a regular file"
  elif [ ! -r "$2" ]; then problem "$1 $2: not readable"
  else return 0
  fi
  return 1
}

[ -n "$device_id" ] || problem "missing --device-id ID (the device's name, also its MQTT user name)"
[ -n "$fleet" ] || problem "missing --fleet FLEET"
[ -n "$broker_url" ] || problem "missing --broker-url mqtts://HOST:8883"
[ ${#keys[@]} -gt 0 ] || problem "missing --key FILE.pub (the host's public key: edgekit keys generate writes it)"
for pair in "device id:$device_id" "fleet:$fleet"; do
  what=${pair%%:*} name=${pair#*:}
  [ -z "$name" ] || [[ $name =~ $NAME_RE ]] ||
    problem "$what '$name' must be 1-64 of [A-Za-z0-9_.-], starting with a letter or digit"
done
tls=0
if [ -n "$broker_url" ]; then
  host_re='([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])'
  if [[ $broker_url =~ ^(mqtts?)://${host_re}(:([0-9]{1,5}))?/?$ ]]; then
    [ "${BASH_REMATCH[1]}" = mqtt ] || tls=1
    port=${BASH_REMATCH[5]}
    if [ -n "$port" ] && { [ $((10#$port)) -lt 1 ] || [ $((10#$port)) -gt 65535 ]; }; then
      problem "--broker-url $broker_url: the port must be 1-65535"
    fi
  else
    problem "--broker-url '$broker_url' must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (credentials go in --username/--password-file)"
  fi
fi
declare -A key_names=()
for key in "${keys[@]}"; do
  file_ok --key "$key" || continue
  base=$(basename "$key")
  case "$base" in
    *.pub) ;;
    *) problem "--key $key: the keyring loads only *.pub files; rename it to end in .pub" ;;
  esac
  if grep -q "PRIVATE KEY" "$key"; then
    problem "--key $key is a PRIVATE key: give the .pub file (the private key stays on the signing host)"
  elif ! grep -q "BEGIN PUBLIC KEY" "$key"; then
    problem "--key $key is not a PEM public key (use the .pub file written by edgekit keys generate)"
  fi
  [ -z "${key_names[$base]:-}" ] || problem "--key $key and ${key_names[$base]} have the same file name $base"
  key_names[$base]=$key
done
if [ -n "$username" ] && ! [[ $username =~ ^[A-Za-z0-9_.@+-]{1,128}$ ]]; then
  problem "--username '$username' must be 1-128 of [A-Za-z0-9_.@+-]"
fi
if [ -n "$password_file" ]; then
  file_ok --password-file "$password_file" || true
  [ -n "$username" ] || problem "--password-file needs --username (the device's MQTT user name, normally its device id)"
fi
[ -z "$ca" ] || file_ok --ca "$ca" || true
[ -z "$cert" ] || file_ok --cert "$cert" || true
[ -z "$client_key" ] || file_ok --client-key "$client_key" || true
if [ -n "$cert" ] && [ -z "$client_key" ]; then problem "--cert needs --client-key (the certificate's private key)"; fi
if [ -z "$cert" ] && [ -n "$client_key" ]; then problem "--client-key needs --cert"; fi
if [ -n "$broker_url" ] && [ $tls -eq 0 ] && { [ -n "$ca" ] || [ -n "$cert" ]; }; then
  problem "--ca/--cert are for TLS: use an mqtts://HOST:8883 broker URL"
fi
case "$engine" in
  onnxruntime|openvino|tflite|tensorrt) ;;
  *) problem "--engine $engine: one of onnxruntime, openvino, tflite, tensorrt" ;;
esac
if [ -n "$runtime_wheel" ] && [ -n "$runtime_spec" ]; then
  problem "--runtime-wheel and --runtime-spec are alternatives: give one"
fi
runtime_source=""
if [ $no_pip -eq 0 ]; then
  if [ -n "$runtime_wheel" ]; then
    if file_ok --runtime-wheel "$runtime_wheel"; then
      case "$runtime_wheel" in
        *.whl) runtime_source="$(cd "$(dirname "$runtime_wheel")" && pwd)/$(basename "$runtime_wheel")" ;;
        *) problem "--runtime-wheel $runtime_wheel is not a .whl file" ;;
      esac
    fi
  elif [ -z "$runtime_spec" ]; then
    if [ -f "$here/../runtime/pyproject.toml" ]; then
      runtime_source=$(cd "$here/../runtime" && pwd)
    else
      problem "no runtime to install: give --runtime-wheel PATH or --runtime-spec SPEC (or --no-pip)"
    fi
  fi
  [ -x "$here/install-runtime.sh" ] || problem "$here/install-runtime.sh is missing: run bootstrap.sh from its firmware/ folder"
fi
for unit in edgekit-agent.service edgekit-workload.service; do
  [ -f "$here/systemd/$unit" ] || problem "$here/systemd/$unit is missing: run bootstrap.sh from its firmware/ folder"
done
for admin in "${admin_users[@]}"; do
  [[ $admin =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || problem "--admin-user '$admin' is not a valid user name"
done
if [ -n "$root" ]; then
  case "$root" in *[[:cntrl:]]*) problem "--root must not contain control characters" ;; esac
  if [ -d "$root" ]; then
    root=$(cd "$root" && pwd)
    [ "$root" != / ] || root=""
  else
    problem "--root $root: no such directory"
  fi
fi
[ $device_paths -eq 0 ] || [ -n "$root" ] || problem "--device-paths only applies with --root DIR"

# who may do what: creating users, chown and systemctl need root, and with --root an OS tree
is_root=0
[ "$(id -u)" -ne 0 ] || is_root=1
manage=1 skip_why=""
if [ $is_root -eq 0 ]; then
  [ -n "$root" ] || problem "run as root (sudo), or give --root DIR to stage the files into a directory"
  manage=0 skip_why="not root"
elif [ -n "$root" ] && [ ! -f "$root/etc/passwd" ]; then
  manage=0 skip_why="$root/etc/passwd is missing: not an OS tree"
fi

lookup() {  # lookup passwd|group NAME -> its numeric id, or nothing
  if [ -z "$root" ]; then
    getent "$1" "$2" | cut -d: -f3 || true  # not found: nothing
  elif [ -f "$root/etc/$1" ]; then
    awk -F: -v n="$2" '$1 == n { print $3; exit }' "$root/etc/$1"
  fi
}
if [ $manage -eq 1 ]; then
  for admin in "${admin_users[@]}"; do
    [ -z "$admin" ] || [ -n "$(lookup passwd "$admin")" ] || problem "--admin-user $admin: no such user"
  done
fi

if [ ${#problems[@]} -gt 0 ]; then
  die "${problems[@]}"
fi

# -- paths --------------------------------------------------------------------------------
etc=$root/etc/edgekit
state=$root/var/lib/edgekit-agent
uploads=$root/var/tmp/edgekit-uploads
unitdir=$root/etc/systemd/system
conf=$etc/agent.toml
# the paths written into agent.toml: the device's own, or (--root without --device-paths) DIR's
cp_prefix=$root
[ $device_paths -eq 0 ] || cp_prefix=""

written=() unchanged=() kept=() skipped=()
changed=0
skip() { skipped+=("$1"); }

umask 077  # a file is private until it has its final mode and owner
tmps=()     # temporary files, removed whatever happens
cleanup() { [ ${#tmps[@]} -eq 0 ] || rm -f "${tmps[@]}"; }
trap cleanup EXIT

owner() {  # owner USER GROUP PATH...: chown by name on the device, by the image's ids with --root
  local user=$1 group=$2 uid gid
  shift 2
  [ $manage -eq 1 ] || return 0
  uid=$(lookup passwd "$user") gid=$(lookup group "$group")
  if [ -z "$uid" ] || [ -z "$gid" ]; then fail "user $user or group $group not found (chown $*)"; fi
  chown "$uid:$gid" "$@"
}

mkparents() { (umask 022 && mkdir -p "$@"); }  # missing parents as a system would have them

ensure_dir() {  # ensure_dir MODE USER GROUP DIR
  if [ -d "$4" ]; then
    unchanged+=("$4/")
  else
    mkparents "$4"
    written+=("$4/")
  fi
  chmod "$1" "$4"
  owner "$2" "$3" "$4"
}

place() {  # place SRC DEST MODE USER GROUP REPLACE: REPLACE=1 updates a differing file, 0 keeps it
  local src=$1 dest=$2 mode=$3 user=$4 group=$5 replace=$6 tmp
  if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
    unchanged+=("$dest")
  elif [ -e "$dest" ] && [ "$replace" -eq 0 ]; then
    kept+=("$dest (differs from $src; --force replaces it)")
  else
    tmp=$(mktemp "$dest.tmp.XXXXXX")
    tmps+=("$tmp")
    cat "$src" > "$tmp"
    chmod "$mode" "$tmp"
    owner "$user" "$group" "$tmp"
    mv -f "$tmp" "$dest"
    written+=("$dest")
    changed=1
    return 0
  fi
  chmod "$mode" "$dest"
  owner "$user" "$group" "$dest"
}

toml_str() {  # a TOML basic string (names are validated; paths may hold quotes or backslashes)
  local s=${1//\\/\\\\}
  printf '"%s"' "${s//\"/\\\"}"
}

render_config() {
  local p=$cp_prefix
  cat <<EOF
# /etc/edgekit/agent.toml: the device agent's settings, written by firmware/bootstrap.sh.
# Every key: edgekit_runtime.agent.config (firmware/systemd/agent.toml explains them).
# bootstrap.sh keeps this file when it runs again; --force rewrites it.
device_id = $(toml_str "$device_id")
fleet = $(toml_str "$fleet")
broker_url = $(toml_str "$broker_url")
EOF
  if [ -n "$username" ]; then
    echo "username = $(toml_str "$username")"
  fi
  if [ -n "$password_file" ]; then
    echo "password_file = $(toml_str "$p/etc/edgekit/agent.password")"
  fi
  if [ -n "$ca" ]; then
    echo "ca_file = $(toml_str "$p/etc/edgekit/ca.crt")"
  fi
  if [ -n "$cert" ]; then
    echo "cert_file = $(toml_str "$p/etc/edgekit/$device_id.crt")"
    echo "key_file = $(toml_str "$p/etc/edgekit/$device_id.key")"
  fi
  cat <<EOF
state_dir = $(toml_str "$p/var/lib/edgekit-agent")
keyring = $(toml_str "$p/etc/edgekit/keys")
telemetry_interval_s = 10
keepalive_s = 30
spool_max_bytes = 67108864
spool_policy = "drop_oldest"
EOF
}

# -- the edgekit user and group -----------------------------------------------------------
if [ $manage -eq 1 ]; then
  rootopt=()
  [ -z "$root" ] || rootopt=(--root "$root")
  if [ -z "$(lookup group edgekit)" ]; then
    groupadd "${rootopt[@]}" --system edgekit
    written+=("group edgekit")
  fi
  if [ -z "$(lookup passwd edgekit)" ]; then
    useradd "${rootopt[@]}" --system --gid edgekit --home-dir /var/lib/edgekit-agent --no-create-home \
      --shell /usr/sbin/nologin --comment "edgekit device agent" edgekit
    written+=("user edgekit")
  fi
  # JetPack: the GPU device nodes and tegrastats belong to the video group
  if [ -e "$root/etc/nv_tegra_release" ] && [ -n "$(lookup group video)" ]; then
    usermod "${rootopt[@]}" -aG video edgekit
  fi
  for admin in "${admin_users[@]}"; do
    usermod "${rootopt[@]}" -aG edgekit "$admin"
    written+=("$admin added to group edgekit (takes effect at its next login)")
  done
else
  skip "create the system user and group edgekit ($skip_why)"
  skip "chown to root:edgekit / edgekit:edgekit ($skip_why)"
  [ ${#admin_users[@]} -eq 0 ] || skip "add ${admin_users[*]} to group edgekit ($skip_why)"
fi

# -- /etc/edgekit: keys, broker credentials -----------------------------------------------
ensure_dir 0755 root root "$etc"
ensure_dir 0755 root root "$etc/keys"
for key in "${keys[@]}"; do
  place "$key" "$etc/keys/$(basename "$key")" 0644 root root "$force"
done
if [ -n "$password_file" ]; then
  place "$password_file" "$etc/agent.password" 0640 root edgekit "$force"
fi
if [ -n "$ca" ]; then
  place "$ca" "$etc/ca.crt" 0644 root root "$force"
fi
if [ -n "$cert" ]; then
  place "$cert" "$etc/$device_id.crt" 0644 root root "$force"
  place "$client_key" "$etc/$device_id.key" 0640 root edgekit "$force"
fi

# -- the agent's state directory (systemd's StateDirectory=edgekit-agent) -----------------
ensure_dir 0750 edgekit edgekit "$state"
ensure_dir 0750 edgekit edgekit "$state/slots"
ensure_dir 0750 edgekit edgekit "$state/slots/a"
ensure_dir 0750 edgekit edgekit "$state/slots/b"
ensure_dir 0750 edgekit edgekit "$state/downloads"
# a local admin in group edgekit hands install/rollback requests to the running agent here
ensure_dir 0770 edgekit edgekit "$state/inbox"
ensure_dir 0770 edgekit edgekit "$state/outbox"
# `edgekit flash --host` uploads bundles here as its SSH user (edgekit or not); sticky like /tmp
ensure_dir 1777 root root "$uploads"

# -- agent.toml ---------------------------------------------------------------------------
new_conf=$(mktemp "$etc/.agent.toml.XXXXXX")
tmps+=("$new_conf")
render_config > "$new_conf"
if [ -e "$conf" ] && [ $force -eq 0 ]; then
  if cmp -s "$new_conf" "$conf"; then
    unchanged+=("$conf")
  else
    kept+=("$conf (differs from these options; --force rewrites it)")
  fi
  rm -f "$new_conf"
  chmod 0640 "$conf"
  owner root edgekit "$conf"
else
  if [ -e "$conf" ] && ! cmp -s "$new_conf" "$conf"; then
    cp -p "$conf" "$conf.bak"
    written+=("$conf.bak (the previous agent.toml)")
  fi
  chmod 0640 "$new_conf"
  owner root edgekit "$new_conf"
  mv -f "$new_conf" "$conf"
  written+=("$conf")
  changed=1
fi

# -- systemd units (ours: updated in place; local changes go in drop-ins, systemctl edit) ---
mkparents "$unitdir"
for unit in edgekit-agent.service edgekit-workload.service; do
  place "$here/systemd/$unit" "$unitdir/$unit" 0644 root root 1
done
# systemd-tmpfiles ages out /var/tmp; the uploads folder must stay (the agent has it bind-mounted)
mkparents "$root/etc/tmpfiles.d"
tmpfiles_conf=$(mktemp "$root/etc/tmpfiles.d/.edgekit.conf.XXXXXX")
tmps+=("$tmpfiles_conf")
cat > "$tmpfiles_conf" <<'EOF'
# edgekit: `edgekit flash --host` uploads bundles here; the agent (edgekit-agent.service) reads them.
# Age "-": never cleaned, so the agent's bind mount of it stays valid.
d /var/tmp/edgekit-uploads 1777 root root -
EOF
place "$tmpfiles_conf" "$root/etc/tmpfiles.d/edgekit.conf" 0644 root root 1
rm -f "$tmpfiles_conf"

# -- the runtime (slow, needs the network or a wheel: after everything local is in place) ---
if [ $no_pip -eq 1 ]; then
  skip "install edgekit-runtime (--no-pip)"
else
  # --agent: this device runs edgekit-agent.service, so it needs the runtime's [agent] extra
  rt_args=(--engine "$engine" --prefix "$root/opt/edgekit" --keyring "$etc/keys" --bindir "$root/usr/local/bin"
           --agent)
  if [ -n "$runtime_spec" ]; then rt_args+=(--spec "$runtime_spec"); else rt_args+=(--source "$runtime_source"); fi
  [ -z "$root" ] || echo "note: the venv under $root is built with this machine's python3; for an image of" \
    "another OS or architecture use --no-pip and run install-runtime.sh inside the image" >&2
  umask 022
  "$here/install-runtime.sh" "${rt_args[@]}" ||
    fail "installing the runtime failed (see above); fix it and run bootstrap.sh again: it keeps what is done"
  umask 077
  written+=("$root/opt/edgekit/venv (edgekit-runtime[agent,$engine])")
  changed=1
fi

# -- systemctl ----------------------------------------------------------------------------
workload_exe=$root/opt/edgekit/bin/workload
if [ $no_systemctl -eq 1 ]; then
  skip "systemctl daemon-reload && systemctl enable --now edgekit-agent (--no-systemctl)"
elif [ -n "$root" ]; then
  if [ $manage -eq 1 ] && command -v systemctl >/dev/null; then
    systemctl --root="$root" enable edgekit-agent.service
    written+=("enabled edgekit-agent.service in $root (starts at its first boot)")
    if [ -x "$workload_exe" ]; then
      systemctl --root="$root" enable edgekit-workload.service
      written+=("enabled edgekit-workload.service in $root")
    fi
  else
    skip "systemctl --root=$root enable edgekit-agent.service (${skip_why:-no systemctl})"
  fi
elif ! command -v systemctl >/dev/null; then
  skip "systemctl enable --now edgekit-agent (no systemctl on this machine)"
elif [ ! -d /run/systemd/system ]; then
  # a chroot or a container without systemd: enable for the next boot, start nothing
  systemctl enable edgekit-agent.service
  [ ! -x "$workload_exe" ] || systemctl enable edgekit-workload.service
  written+=("enabled edgekit-agent.service (systemd is not running here: it starts at the next boot)")
else
  systemctl daemon-reload
  was_active=0
  ! systemctl is-active --quiet edgekit-agent.service || was_active=1
  systemctl enable --now edgekit-agent.service
  if [ $was_active -eq 1 ] && [ $changed -eq 1 ]; then
    systemctl restart edgekit-agent.service  # new settings, units or runtime
    written+=("restarted edgekit-agent.service")
  else
    written+=("enabled and started edgekit-agent.service")
  fi
  if [ -x "$workload_exe" ]; then
    systemctl enable --now edgekit-workload.service
    written+=("enabled and started edgekit-workload.service")
  else
    skip "enable edgekit-workload.service ($workload_exe does not exist yet; then: systemctl enable --now edgekit-workload)"
  fi
fi

# -- summary ------------------------------------------------------------------------------
section() {  # section TITLE ITEMS...
  local title=$1
  shift
  [ $# -gt 0 ] || return 0
  echo "$title"
  printf '  %s\n' "$@"
}
echo "edgekit device $device_id (fleet $fleet, broker $broker_url, engine $engine)"
section "written:" "${written[@]}"
section "unchanged:" "${unchanged[@]}"
section "kept:" "${kept[@]}"
section "skipped:" "${skipped[@]}"
if [ -n "$root" ] && [ $device_paths -eq 0 ]; then
  echo "agent.toml names paths under $root (a sandbox); for an image use --device-paths"
fi
if [ -z "$username" ] && [ -z "$cert" ]; then
  echo "note: no broker credentials given: the broker must accept this device without them"
fi
agent_bin=/opt/edgekit/venv/bin/edgekit-agent
[ -z "$root" ] || [ ! -e "$root$agent_bin" ] || agent_bin=$root$agent_bin
echo "next:"
echo "  $agent_bin status --config $cp_prefix/etc/edgekit/agent.toml"
[ -n "$root" ] || echo "  journalctl -u edgekit-agent -f"
echo "  from the host: edgekit flash --host USER@DEVICE ... (firmware/README.md: the SSH flash path)"
