#!/usr/bin/env bash
# The whole test suite: lint, types, unit and integration tests against real containerd/registries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check .
echo "== ruff format"; ruff format --check nodeagent tests bench scripts
echo "== mypy"; mypy
echo "== pytest"; python -m pytest "$@"
