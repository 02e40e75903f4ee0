"""The embedded demo index: built from RRF through the normal path, cached, atomic."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from conceptsvc import embedded
from conceptsvc.embedded import DEMO_META, default_cache_dir, demo_index, demo_index_path
from conceptsvc.errors import DictionaryError
from conceptsvc.index import ConceptIndex

FIXTURES = Path(__file__).parent / "fixtures"


def _copy_meta(dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in (FIXTURES / "rrf_small").iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_embedded_builds_once_and_caches(tmp_path: Path) -> None:
    meta = _copy_meta(tmp_path / "META")
    cache = tmp_path / "cache"
    path = demo_index_path(cache, source=meta)
    assert path.parent == cache and path.name.startswith("demo-")
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert demo_index_path(cache, source=meta) == path
    assert (path / "manifest.json").stat().st_mtime_ns == stamp  # not rebuilt
    ix = demo_index(cache, source=meta)
    assert isinstance(ix, ConceptIndex) and "C0041618" in ix
    assert ix.manifest["source_release"] == "conceptsvc demo"
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temp dirs left behind


def test_embedded_cache_key_follows_rrf_content(tmp_path: Path) -> None:
    meta = _copy_meta(tmp_path / "META")
    first = demo_index_path(tmp_path / "cache", source=meta)
    with (meta / "MRCONSO.RRF").open("ab") as fh:
        fh.write(b"\nC8888888|ENG|P|L9|PF|S9|Y|A9||||MSH|MH|X|Pneumothorax|0|N||\n")
    second = demo_index_path(tmp_path / "cache", source=meta)
    assert second != first and "C8888888" in ConceptIndex.load(second)


def test_embedded_concurrent_builds_agree(tmp_path: Path) -> None:
    meta = _copy_meta(tmp_path / "META")
    cache = tmp_path / "cache"
    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(demo_index_path(cache, source=meta))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert len(ConceptIndex.load(results[0])) == 9
    assert [p.name for p in cache.iterdir()] == [results[0].name]


def test_embedded_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONCEPTSVC_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("CONCEPTSVC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "conceptsvc"


def test_embedded_missing_source_is_clear(tmp_path: Path) -> None:
    with pytest.raises(DictionaryError, match="not found"):
        demo_index_path(tmp_path, source=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DictionaryError, match="no RRF files"):
        demo_index_path(tmp_path, source=tmp_path / "empty")


def test_embedded_packaged_demo_builds(tmp_path: Path) -> None:
    # Committed and packaged (package-data data/**): `serve` without --index builds from it.
    assert (DEMO_META / "MRCONSO.RRF").is_file(), f"the demo dictionary is missing: {DEMO_META}"
    ix = demo_index(tmp_path)
    assert len(ix) > 100 and ix.manifest["counts"]["keys"] > 100
    assert os.path.commonpath([ix.path, tmp_path]) == str(tmp_path)
    assert embedded.DEMO_META.name == "META"
