#!/usr/bin/env bash
# Shared by deploy/run-demo and tests/run: make .venv with Membrane installed.
# Usage: source deploy/bootstrap.sh [extra]   (extra: "test" installs the test tools too)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extra="${1:-}"

apt_install() {
  # Installs Debian packages when root (or with sudo); returns 1 if it cannot.
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    return 1
  fi
}

if ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "Membrane needs Python 3.11 or newer (python3 is $(python3 --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$root/.venv/bin/python" ]; then
  if ! python3 -m venv "$root/.venv" 2>/dev/null; then
    rm -rf "$root/.venv"
    apt_install python3-venv || { echo "install python3-venv first" >&2; exit 1; }
    python3 -m venv "$root/.venv"
  fi
fi
# Every version comes from a lock (deploy/lock makes them from pyproject.toml), so a fresh
# .venv runs exactly what the suite passed with; Membrane itself goes on top without deps.
lock="$root/requirements.lock"
[ "$extra" = test ] && lock="$root/requirements-test.lock"
stamp="$root/.venv/.installed-$extra-$(cat "$root/pyproject.toml" "$lock" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  # (Each step exits on failure itself: errexit is off when the caller sources this in a
  # condition, and the stamp must not be written then.)
  "$root/.venv/bin/python" -m pip install -q --upgrade pip || exit 1
  "$root/.venv/bin/python" -m pip install -q --require-hashes -r "$lock" || exit 1
  (cd "$root" && "$root/.venv/bin/python" -m pip install -q --no-deps -e .) || exit 1
  # A requirement added to pyproject.toml but not to the lock fails here, not in a test.
  "$root/.venv/bin/python" - "$extra" "$(basename "$lock")" <<'PY' || exit 1
import sys
from importlib.metadata import PackageNotFoundError, requires, version

from pip._vendor.packaging.requirements import Requirement

unmet = []
for line in requires("membrane") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": sys.argv[1]}):
        continue
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        unmet.append(f"{req} (not in the lock)")
        continue
    if not req.specifier.contains(installed, prereleases=True):
        unmet.append(f"{req} (locked {installed})")
if unmet:
    print(f"{sys.argv[2]} does not satisfy pyproject.toml; run deploy/lock:", *unmet,
          sep="\n  ", file=sys.stderr)
    sys.exit(1)
PY
  touch "$stamp"
fi
