#!/usr/bin/env bash
# Installs Membrane on one VM as a systemd service (deploy/systemd/membrane.service):
#
#   sudo deploy/install.sh            # from a checkout of the repository
#   sudoedit /etc/membrane/membrane.toml    # your sites; secrets in /etc/membrane/membrane.env
#   sudo systemctl enable --now membrane
#
# It makes the system user `membrane`, a virtualenv in /opt/membrane/venv with every version
# from requirements.lock (checked by hash), the config in /etc/membrane (kept if it exists;
# the first install writes the example config and an environment file with a new JWT
# secret), the data directory /var/lib/membrane and the unit. Run it again to upgrade: a new
# virtualenv is built beside the old one and swapped in; then `systemctl restart membrane`
# (a drain: calls move to other nodes, or see docs/OPERATIONS.md for one node).
#
# DESTDIR=/some/dir installs under that directory instead, without touching users or
# systemd (for packaging, and for tests/test_deploy.py).
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
dest="${DESTDIR:-}"
python="${PYTHON:-python3}"
if [ -z "$dest" ] && [ "$(id -u)" != 0 ]; then
  echo "run as root (or set DESTDIR)" >&2
  exit 1
fi
"$python" -c 'import sys; assert sys.version_info >= (3, 11)' || {
  echo "Membrane needs Python 3.11 or newer" >&2; exit 1; }

prefix="$dest/opt/membrane"
etc="$dest/etc/membrane"
install -d -m 0755 "$prefix" "$dest/etc/systemd/system"
install -d -m 0750 "$etc" "$dest/var/lib/membrane"

# A new virtualenv for each install (its scripts name its path), switched to by renaming a
# symbolic link, so a running node keeps its files until it restarts; the one before stays
# for a rollback (`ln -sfn venv-<previous> venv.new && mv -T venv.new venv`).
stamp="$(date -u +%Y%m%d%H%M%S)-$$"
venv="$prefix/venv-$stamp"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q --require-hashes -r "$src/requirements.lock"
"$venv/bin/python" -m pip install -q --no-deps "$src"
previous="$(readlink "$prefix/venv" 2>/dev/null || true)"
ln -sfn "venv-$stamp" "$prefix/venv.new"
mv -T "$prefix/venv.new" "$prefix/venv"
for old in "$prefix"/venv-*; do
  case "$(basename "$old")" in "venv-$stamp"|"$previous") ;; *) rm -rf "$old" ;; esac
done
# The pages the gateway serves (server.web_client_dir, set in the unit), and the guide.
rm -rf "$prefix/web_client.new"
cp -R "$src/web_client" "$prefix/web_client.new"
rm -rf "$prefix/web_client"
mv "$prefix/web_client.new" "$prefix/web_client"
mkdir -p "$prefix/src/docs"
cp "$src/docs/OPERATIONS.md" "$prefix/src/docs/"

if [ ! -f "$etc/membrane.toml" ]; then
  install -m 0640 "$src/deploy/membrane.example.toml" "$etc/membrane.toml"
fi
if [ ! -f "$etc/membrane.env" ]; then
  umask 077
  secret="$("$python" -c 'import secrets; print(secrets.token_urlsafe(48))')"
  cat > "$etc/membrane.env" <<ENV
# Read by systemd for the membrane service (root only). See docs/OPERATIONS.md.
MEMBRANE_JWT_SECRET=$secret
# MEMBRANE_REDIS_URL=redis://:password@10.0.0.5:6379/0
# MEMBRANE_HISTORY_URL=postgresql://membrane:password@10.0.0.6/membrane
# MEMBRANE_TWILIO_AUTH_TOKEN=
ENV
  umask 022
fi
install -m 0644 "$src/deploy/systemd/membrane.service" "$dest/etc/systemd/system/membrane.service"

if [ -z "$dest" ]; then
  getent group membrane >/dev/null || groupadd --system membrane
  getent passwd membrane >/dev/null ||
    useradd --system --gid membrane --home-dir /var/lib/membrane --shell /usr/sbin/nologin membrane
  chown root:membrane "$etc" "$etc/membrane.toml"
  chown membrane:membrane /var/lib/membrane
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "installed; start with: systemctl enable --now membrane"
  else
    echo "installed (systemd is not running here: start membrane yourself)"
  fi
fi
