#!/usr/bin/env bash
# The project's test command (README.md, .ci/run), after `pip install -e ".[test]"`:
# system packages some tests use, lint and format check, the import contract, the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
ruff check .
ruff format --check .
lint-imports --no-cache
python -m pytest -q "$@"
