#!/bin/sh
# Install conceptsvc's runtime dependencies (not the project itself) into the active Python.
#
# Used by deploy/Dockerfile in a layer of its own, and run by tests/test_deploy.py, so the
# image's install step is exercised without a Docker engine. With a lock file, every
# dependency is pinned and hash-checked (pip --require-hashes); without one, pip resolves the
# ranges in pyproject.toml's [project].dependencies.
#
# usage: install-deps.sh [LOCK_FILE]      (run from the directory holding pyproject.toml)
set -eu

lock="${1:-requirements.lock}"

if [ -f "$lock" ]; then
    echo "conceptsvc-install-deps: installing the hash-pinned set from $lock"
    exec python -m pip install --require-hashes --no-deps -r "$lock"
fi

echo "conceptsvc-install-deps: no $lock; resolving pyproject.toml's dependency ranges"
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT
python - <<'PY' > "$requirements"
import tomllib

with open("pyproject.toml", "rb") as fh:
    for requirement in tomllib.load(fh)["project"]["dependencies"]:
        print(requirement)
PY
python -m pip install -r "$requirements"
