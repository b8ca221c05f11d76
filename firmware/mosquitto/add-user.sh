#!/usr/bin/env bash
# Add (or replace) a user in a Mosquitto password file; prints the password it set.
#   add-user.sh PASSWD_FILE USER [PASSWORD]      (no PASSWORD: a random one)
# Devices: USER is the device id (the ACL's %u). Monitors: a user named in edgekit.acl.
# Then: `systemctl reload mosquitto` (or send it SIGHUP) to re-read the file.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,5p' "$0" >&2; exit 2; }
file=$1 user=$2 password=${3:-$(openssl rand -base64 18)}
command -v mosquitto_passwd >/dev/null || { echo "mosquitto_passwd missing: apt-get install mosquitto" >&2; exit 2; }
case "$user" in *:*|"") echo "user name must be non-empty and without ':'" >&2; exit 2 ;; esac
umask 077
if [ -f "$file" ]; then
  mosquitto_passwd -b "$file" "$user" "$password"
else
  mosquitto_passwd -c -b "$file" "$user" "$password"
fi
echo "$password"
