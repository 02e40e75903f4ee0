"""The embedded demo dictionary: packaged RRF in, a cached compiled index out.

The package ships the demo dictionary as RRF text (``conceptsvc/data/demo/META/``) rather than
as a compiled index, so it goes through exactly the ingestion path a real UMLS release takes
and can never drift from the index format of the installed code. It is compiled on first use
into a cache directory whose name hashes the RRF files and the index-format, normaliser and
dictionary term-rule versions: an upgrade that changes any of them simply builds a new entry.

The build is atomic across processes: each builder writes its own temporary directory and
renames it into place; if another process got there first, its index (identical by
construction) is kept and ours discarded. No lock file, nothing half-written is ever visible.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from conceptsvc.dictionary import (
    TERM_RULES_VERSION,
    DictionaryFilters,
    UmlsSource,
    build_dictionary_index,
)
from conceptsvc.errors import DictionaryError
from conceptsvc.index import FORMAT_VERSION, ConceptIndex
from conceptsvc.normalize import NORMALIZER_VERSION

__all__ = ["DEMO_META", "default_cache_dir", "demo_index", "demo_index_path"]

log = logging.getLogger(__name__)

DEMO_META = Path(__file__).parent / "data" / "demo" / "META"

# The demo dictionary is curated: every string is meant to be there, so only the language
# filter (the RRF is English anyway) and the default suppress flags apply.
_DEMO_FILTERS = DictionaryFilters()


def default_cache_dir() -> Path:
    """``$CONCEPTSVC_CACHE_DIR``, else ``$XDG_CACHE_HOME/conceptsvc``, else ``~/.cache/conceptsvc``.

    It reads the environment itself, outside ``config.py`` (as the CLI's token and
    ``CONCEPTSVC_PURE_PYTHON`` do): the contract lets a library user call
    :func:`demo_index_path` without building Settings first.
    """
    explicit = os.environ.get("CONCEPTSVC_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "conceptsvc"


def _fingerprint(meta: Path) -> str:
    h = hashlib.sha256(
        f"format={FORMAT_VERSION};normalizer={NORMALIZER_VERSION};terms={TERM_RULES_VERSION}\n"
        .encode()
    )
    files = sorted(p for p in meta.iterdir() if p.is_file() and ".RRF" in p.name)
    if not files:
        raise DictionaryError(f"{meta}: no RRF files; the demo dictionary is missing.")
    for p in files:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


def demo_index_path(
    cache_dir: str | Path | None = None, *, source: str | Path | None = None
) -> Path:
    """Path of the compiled demo index, building it into the cache if it is not there.

    ``source`` is a META directory to compile instead of the packaged one (tests use small
    fixtures); ``cache_dir`` overrides :func:`default_cache_dir`.
    """
    meta = Path(source) if source is not None else DEMO_META
    if not meta.is_dir():
        raise DictionaryError(
            f"{meta}: demo dictionary RRF directory not found; reinstall conceptsvc."
        )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"demo-{_fingerprint(meta)}"
    if (final / "manifest.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=root))
    try:
        built = work / "index"
        report = build_dictionary_index(
            [UmlsSource(meta)], built, filters=_DEMO_FILTERS, source_release="conceptsvc demo"
        )
        try:
            built.rename(final)
            log.info("built the demo index at %s (%d concepts)", final, report.concepts)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
            log.debug("another process built %s first; keeping its copy", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def demo_index(
    cache_dir: str | Path | None = None, *, source: str | Path | None = None
) -> ConceptIndex:
    """The demo index, loaded (built into the cache first if needed)."""
    return ConceptIndex.load(demo_index_path(cache_dir, source=source))
