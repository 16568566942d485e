#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, then ruff and mypy.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh" --test
cd "$root"
.venv/bin/ruff check streamer tests tools
.venv/bin/mypy streamer tools
exec .venv/bin/python -m pytest "$@"
