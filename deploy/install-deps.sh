#!/bin/sh
# Install conceptsvc's runtime dependencies (not the project itself) into the active Python;
# with --build-system, the tools that build its wheel instead ([build-system].requires:
# setuptools, wheel, Cython).
#
# Used by deploy/Dockerfile in layers of their own, and run by tests/test_deploy.py, so the
# image's install steps are exercised without a Docker engine. With a lock file, the runtime
# (or build-system) subset of it (runtime_lock.py, next to this script) is installed pinned and
# hash-checked (pip --require-hashes), then `pip check` proves the subset complete; without
# one, pip resolves the ranges in pyproject.toml.
#
# usage: install-deps.sh [--build-system] [LOCK_FILE]   (run from the directory holding
#                                                        pyproject.toml)
set -eu

part="runtime"
subset=""
table="project dependencies"
if [ "${1:-}" = "--build-system" ]; then
    part="build-system"
    subset="--build-system"
    table="build-system requires"
    shift
fi
lock="${1:-requirements.lock}"
here="$(cd "$(dirname "$0")" && pwd)"
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT

if [ -f "$lock" ]; then
    echo "conceptsvc-install-deps: installing the $part part of $lock, hash-checked"
    # shellcheck disable=SC2086  # $subset is one option or nothing
    python "$here/runtime_lock.py" $subset "$lock" pyproject.toml > "$requirements"
    python -m pip install --require-hashes --no-deps -r "$requirements"
    # A dry run installs nothing, so there is nothing to check.
    if [ -z "${PIP_DRY_RUN:-}" ]; then
        python -m pip check
    fi
    exit 0
fi

echo "conceptsvc-install-deps: no $lock; resolving pyproject.toml's $part ranges"
# shellcheck disable=SC2086  # $table is the two keys: section, then list
python - $table <<'PY' > "$requirements"
import sys
import tomllib

section, key = sys.argv[1:]
with open("pyproject.toml", "rb") as fh:
    for requirement in tomllib.load(fh)[section][key]:
        print(requirement)
PY
python -m pip install -r "$requirements"
