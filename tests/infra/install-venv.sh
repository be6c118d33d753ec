#!/usr/bin/env bash
# Create .venv and install the projects (api, operator, cli, trainer) (editable) with the pinned lock, using uv.
# uv keeps its wheel cache in ~/.cache/uv and hard-links from it, so the multi-GB torch CUDA wheel
# is downloaded once per machine and a second install (or a fresh clone) takes seconds.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
UV_VERSION=0.13.8
stamp=.venv/.installed
lock_hash=$(cat requirements/dev.lock api/pyproject.toml operator/pyproject.toml cli/pyproject.toml trainer/pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$lock_hash" ]]; then
  exit 0
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
if ! .venv/bin/uv --version 2>/dev/null | grep -q "$UV_VERSION"; then
  .venv/bin/python -m pip install --quiet "uv==$UV_VERSION"
fi
export UV_LINK_MODE=${UV_LINK_MODE:-hardlink}
.venv/bin/uv pip install --quiet --python .venv/bin/python -r requirements/dev.lock
.venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps -e api -e operator -e cli -e trainer
echo "$lock_hash" >"$stamp"
echo "[install] .venv ready"
