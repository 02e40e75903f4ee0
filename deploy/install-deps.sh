#!/bin/sh
# Install conceptsvc's runtime dependencies (not the project itself) into the active Python.
#
# Used by deploy/Dockerfile in a layer of its own, and run by tests/test_deploy.py, so the
# image's install step is exercised without a Docker engine. With a lock file, the runtime
# subset of it (runtime_lock.py, next to this script) is installed pinned and hash-checked
# (pip --require-hashes), then `pip check` proves the subset complete; without one, pip
# resolves the ranges in pyproject.toml's [project].dependencies.
#
# usage: install-deps.sh [LOCK_FILE]      (run from the directory holding pyproject.toml)
set -eu

lock="${1:-requirements.lock}"
here="$(cd "$(dirname "$0")" && pwd)"
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT

if [ -f "$lock" ]; then
    echo "conceptsvc-install-deps: installing the runtime part of $lock, hash-checked"
    python "$here/runtime_lock.py" "$lock" pyproject.toml > "$requirements"
    python -m pip install --require-hashes --no-deps -r "$requirements"
    # A dry run installs nothing, so there is nothing to check.
    if [ -z "${PIP_DRY_RUN:-}" ]; then
        python -m pip check
    fi
    exit 0
fi

echo "conceptsvc-install-deps: no $lock; resolving pyproject.toml's dependency ranges"
python - <<'PY' > "$requirements"
import tomllib

with open("pyproject.toml", "rb") as fh:
    for requirement in tomllib.load(fh)["project"]["dependencies"]:
        print(requirement)
PY
python -m pip install -r "$requirements"
