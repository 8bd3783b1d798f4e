#!/usr/bin/env bash
# Install model-proxy's systemd unit: the system user, the unit file, a first config.yml and the
# demo profile (never overwritten once there), then `systemctl daemon-reload`. Safe to run again.
# The code and its venv come first (README, Deploying):
#   sudo git clone <this repository> /opt/model-proxy
#   sudo /opt/model-proxy/deploy/docker/install.sh --venv /opt/model-proxy/.venv --demo
#   sudo /opt/model-proxy/deploy/systemd/install.sh && sudo systemctl enable --now model-proxy
#
# Usage: deploy/systemd/install.sh [options]
#   --prefix DIR      where the code and its .venv are (default: /opt/model-proxy)
#   --config-dir DIR  config.yml and model_configs/ (default: /etc/model-proxy)
#   --destdir DIR     stage every file under DIR instead of /, for packaging or a dry run: no user
#                     is created and systemd is not told (env DESTDIR)
# The state folder is /var/lib/model-proxy, which systemd creates (the unit's StateDirectory=).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
prefix=/opt/model-proxy
config_dir=/etc/model-proxy
destdir=${DESTDIR:-}
user=model-proxy
state_dir=/var/lib/model-proxy

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

fail() {
  echo "install.sh: $*" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case $1 in
    --prefix) prefix=${2:?--prefix needs a folder}; shift 2 ;;
    --config-dir) config_dir=${2:?--config-dir needs a folder}; shift 2 ;;
    --destdir) destdir=${2:?--destdir needs a folder}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) fail "unknown argument: $1 (see --help)" ;;
  esac
done
case $prefix$config_dir in
  # What sed's replacement below would read as its own syntax.
  *'#'* | *'&'* | *\\*) fail "--prefix and --config-dir cannot contain '#', '&' or a backslash" ;;
esac
case $prefix in /*) ;; *) fail "--prefix must be an absolute path, got $prefix" ;; esac
case $config_dir in /*) ;; *) fail "--config-dir must be an absolute path, got $config_dir" ;; esac
destdir=${destdir%/}

if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
  fail "run as root (sudo), or stage the files with --destdir DIR"
fi

# The system user the unit runs as: no login, its home the state folder.
if [ -n "$destdir" ]; then
  echo "install.sh: --destdir: not creating the user $user (useradd --system --user-group ...)"
elif ! getent passwd "$user" > /dev/null; then
  useradd --system --user-group --home-dir "$state_dir" --no-create-home \
    --shell /usr/sbin/nologin --comment "model-proxy" "$user"
  echo "install.sh: created the system user $user"
fi

# The unit, with this install's folders in place of the defaults it names.
unit=$destdir/etc/systemd/system/model-proxy.service
mkdir -p "$(dirname "$unit")"
sed -e "s#/opt/model-proxy#$prefix#g" -e "s#/etc/model-proxy#$config_dir#g" \
  "$here/model-proxy.service" > "$unit.tmp"
chmod 0644 "$unit.tmp"
mv "$unit.tmp" "$unit"
echo "install.sh: installed $unit"

# A first config and the demo profile; an existing config.yml or profile folder is left alone.
mkdir -p "$destdir$config_dir"
if [ ! -e "$destdir$config_dir/config.yml" ]; then
  sed -e "s#/etc/model-proxy#$config_dir#g" "$here/config.yml" > "$destdir$config_dir/config.yml"
  chmod 0644 "$destdir$config_dir/config.yml"
  echo "install.sh: installed $destdir$config_dir/config.yml"
fi
if [ ! -e "$destdir$config_dir/model_configs" ]; then
  mkdir -p "$destdir$config_dir/model_configs"
  cp "$repo"/model_configs/*.yml "$destdir$config_dir/model_configs/"
  echo "install.sh: installed the demo profile in $destdir$config_dir/model_configs"
fi

if [ ! -x "$prefix/.venv/bin/python" ] || [ ! -f "$prefix/proxy.py" ]; then
  echo "install.sh: note: $prefix has no proxy.py and .venv yet; install them before starting" \
    "(deploy/docker/install.sh --venv $prefix/.venv)" >&2
fi

if [ -n "$destdir" ]; then
  echo "install.sh: --destdir: not running systemctl daemon-reload"
elif [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "install.sh: done; start it with: systemctl enable --now model-proxy"
else
  echo "install.sh: systemd is not running here; the unit is in place for its next boot"
fi
