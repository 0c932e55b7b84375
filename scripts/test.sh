#!/usr/bin/env bash
# The whole test suite: lint, types, unit and integration tests against real containerd/registries.
# Integration tests need root; under CI (CI set) a skipped test or a run without integration tests
# fails (see tests/conftest.py). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "test: integration tests need root (they run containerd, mounts): sudo bash scripts/test.sh" >&2
  exit 1
fi
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
lint_dirs=()
for d in nodeagent tests bench scripts; do [ -d "$d" ] && lint_dirs+=("$d"); done
echo "== ruff"; ruff check .
echo "== ruff format"; ruff format --check "${lint_dirs[@]}"
echo "== mypy"; mypy
echo "== pytest"; python -m pytest "$@"
