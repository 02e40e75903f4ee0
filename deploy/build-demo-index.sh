#!/bin/sh
# Build the embedded demo index through the normal ingestion path and place it at OUT_DIR.
#
# Used by deploy/Dockerfile at image build and run by tests/test_deploy.py. The index is built
# in a throw-away cache directory, copied to OUT_DIR and then loaded with full hash
# verification, so a broken build fails here rather than when the first container starts.
#
# usage: build-demo-index.sh OUT_DIR
set -eu

if [ "$#" -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
out="$1"
if [ -e "$out" ]; then
    echo "conceptsvc-build-demo-index: $out already exists; give a new directory" >&2
    exit 2
fi

cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT
python - "$out" "$cache" <<'PY'
import shutil
import sys

from conceptsvc.embedded import demo_index_path
from conceptsvc.index import ConceptIndex

out, cache = sys.argv[1], sys.argv[2]
shutil.copytree(demo_index_path(cache), out)
index = ConceptIndex.load(out, verify=True)
print(f"conceptsvc-build-demo-index: {out}: {len(index)} concepts, content hash {index.content_hash}")
PY
