"""The compiled index: round trips (property-based), lookups, integrity and truncation."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conceptsvc.errors import ConceptIndexError
from conceptsvc.index import (
    FLAG_ABBREVIATION,
    FLAG_PREFERRED,
    FORMAT_VERSION,
    MAX_LOAD,
    ConceptIndex,
    IndexBuilder,
    Posting,
    build_index,
    trie_slot,
)
from conceptsvc.normalize import normalize_term

CONCEPTS = [
    ("C0041618", "Ultrasonography", ("T060",)),
    ("C0024485", "Magnetic Resonance Imaging", ("T060",)),
    ("C0000726", "Abdomen", ("T029", "T023")),
]
TERMS = [
    ("C0041618", "Ultrasonography", "MSH", "MH", 0),
    ("C0041618", "US", "NCI", "AB", FLAG_ABBREVIATION),
    ("C0041618", "Echography", "SNOMEDCT_US", "SY", 0),
    ("C0024485", "Magnetic Resonance Imaging", "MSH", "MH", 0),
    ("C0024485", "MR imaging", "SNOMEDCT_US", "SY", 0),
    ("C0024485", "MRI", "NCI", "AB", FLAG_ABBREVIATION),
    ("C0000726", "Abdomen", "MSH", "MH", 0),
    ("C0000726", "Abdomens", "NCI", "SY", 0),  # same key as "Abdomen"
    ("C0000726", "us", "XYZ", "SY", 0),  # contrived: the key "us" is ambiguous
    ("C0000726", "Abdomen", "MSH", "MH", 0),  # exact duplicate: merged
    ("C0000726", "---", "MSH", "SY", 0),  # normalises to nothing: dropped
]


@pytest.fixture(params=[True, False], ids=["dict", "hashed"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> ConceptIndex:
    build_index(tmp_path / "ix", CONCEPTS, TERMS, source_release="test")
    return ConceptIndex.load(tmp_path / "ix", materialize=request.param)


def test_index_lookups(index: ConceptIndex) -> None:
    assert len(index) == 3 and list(index.cuis) == ["C0000726", "C0024485", "C0041618"]
    assert "C0041618" in index and "C9999999" not in index and 5 not in index
    kid = index.key_id("ultrasonography")
    assert kid is not None and index.key_ids["ultrasonography"] == kid
    assert index.key(kid) == "ultrasonography"
    assert index.key_id("nope") is None and "nope" not in index.key_ids
    assert index.key_ids.get("nope") is None
    with pytest.raises(KeyError):
        index.key_ids["nope"]
    assert index.postings("ultrasonography") == (
        Posting("C0041618", "Ultrasonography", "MSH", "MH", FLAG_PREFERRED),
    )
    abdomen = index.postings("abdomen")
    assert [(p.string, p.sab) for p in abdomen] == [("Abdomen", "MSH"), ("Abdomens", "NCI")]
    assert abdomen[0].flags == FLAG_PREFERRED and abdomen[1].flags == 0
    assert {p.cui for p in index.postings("us")} == {"C0000726", "C0041618"}
    assert index.postings("") == ()
    assert index.max_tokens_from("magnetic") == 3 and index.max_tokens_from("zzz") == 0
    assert index.first_token_max.get("mr") == 2 and index.max_key_tokens == 3
    assert sorted(index.keys()) == list(index.keys())
    assert set(index.key_ids) == set(index.keys()) and len(index.key_ids) == index.n_keys
    assert dict(index.key_ids.items()) == {k: index.key_ids[k] for k in index.keys()}
    assert dict(index.first_token_max.items())["magnetic"] == 3


def test_index_concepts(index: ConceptIndex) -> None:
    info = index.concept("C0000726")
    assert info is not None
    assert info.preferred_name == "Abdomen" and info.semantic_types == ("T029", "T023")
    assert info.sources == ("MSH", "NCI", "XYZ")
    assert index.concept("C1") is None and index.concept_postings("C1") == ()
    assert {p.string for p in index.concept_postings("C0024485")} == {
        "Magnetic Resonance Imaging", "MR imaging", "MRI"
    }
    assert sorted(index.sabs) == ["MSH", "NCI", "SNOMEDCT_US", "XYZ"]
    assert set(index.tuis) == {"T023", "T029", "T060"}


def test_index_ambiguous_keys(index: ConceptIndex) -> None:
    assert list(index.ambiguous_keys()) == [("us", ("C0000726", "C0041618"))]


def test_index_manifest(index: ConceptIndex) -> None:
    m = index.manifest
    assert m["format_version"] == FORMAT_VERSION and m["source_release"] == "test"
    c = m["counts"]
    assert c["concepts"] == 3 and c["postings"] == 9 and c["keys"] == index.n_keys
    assert c["per_sab"]["NCI"] == 3 and c["concepts_per_sab"]["NCI"] == 3
    assert c["per_semantic_type"] == {"T023": 1, "T029": 1, "T060": 2}
    assert len(m["content_hash"]) == 64 and index.content_hash == m["content_hash"]


def test_index_content_hash_is_reproducible(tmp_path: Path) -> None:
    a = ConceptIndex.load(build_index(tmp_path / "a", CONCEPTS, TERMS))
    b = ConceptIndex.load(build_index(tmp_path / "b", CONCEPTS, TERMS))
    assert a.content_hash == b.content_hash  # same input, same bytes (created_at is not hashed)
    c = ConceptIndex.load(build_index(tmp_path / "c", CONCEPTS, TERMS[:-3]))
    assert c.content_hash != a.content_hash


def test_index_empty(tmp_path: Path) -> None:
    ix = ConceptIndex.load(build_index(tmp_path / "e", [], []))
    assert len(ix) == 0 and list(ix.keys()) == [] and ix.postings("x") == ()
    assert list(ix.ambiguous_keys()) == [] and ix.max_key_tokens == 0
    assert ConceptIndex.load(tmp_path / "e", materialize=False).key_id("x") is None


def test_index_overwrite_keeps_path(tmp_path: Path) -> None:
    build_index(tmp_path / "ix", CONCEPTS, TERMS)
    build_index(tmp_path / "ix", CONCEPTS[:1], TERMS[:1])
    assert len(ConceptIndex.load(tmp_path / "ix")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o027, 0o750)])
def test_index_directory_takes_the_umask_mode(tmp_path: Path, umask: int, mode: int) -> None:
    """An index is read by other users (an image builds it as root and serves it as a service
    user): its directory gets the umask's mode, as mkdir gives, not a temporary directory's
    0700; its files are readable as the umask allows."""
    old = os.umask(umask)
    try:
        out = build_index(tmp_path / "ix", CONCEPTS, TERMS)
        build_index(out, CONCEPTS[:1], TERMS[:1])  # a rebuild in place, too
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == mode
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]


def test_index_refuses_to_overwrite_non_index(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("x")
    with pytest.raises(ConceptIndexError, match="not an index"):
        build_index(tmp_path / "data", CONCEPTS, TERMS)
    assert (tmp_path / "data" / "precious.txt").exists()


def test_index_builder_rejects_bad_ids(tmp_path: Path) -> None:
    b = IndexBuilder()
    with pytest.raises(ConceptIndexError, match="concept id"):
        b.add_term("", "Lung", sab="X", tty="SY")
    with pytest.raises(ConceptIndexError, match="source"):
        b.add_term("C1", "Lung", sab="A\nB", tty="SY")
    b.add_term("C2", "Heart", sab="X", tty="SY")
    with pytest.raises(ConceptIndexError, match="no preferred name"):
        b.write(tmp_path / "ix")


def test_index_newlines_in_strings_become_spaces(tmp_path: Path) -> None:
    ix = ConceptIndex.load(
        build_index(tmp_path / "ix", [("C1", "Left\nlung", ["T023"])],
                    [("C1", "Left\nlung", "X", "SY", 0)])
    )
    assert ix.concept("C1").preferred_name == "Left lung"  # type: ignore[union-attr]
    assert ix.postings("left lung")[0].flags == FLAG_PREFERRED


# -- integrity -------------------------------------------------------------------------------


@pytest.fixture
def built(tmp_path: Path) -> Path:
    return build_index(tmp_path / "ix", CONCEPTS, TERMS)


def test_index_corrupted_file_detected(built: Path) -> None:
    data = bytearray((built / "strings.bin").read_bytes())
    data[3] ^= 0x20
    (built / "strings.bin").write_bytes(bytes(data))
    with pytest.raises(ConceptIndexError, match=r"strings\.bin: content hash mismatch"):
        ConceptIndex.load(built)


def test_index_truncated_file_detected_even_without_verify(built: Path) -> None:
    blob = built / "keys.bin"
    blob.write_bytes(blob.read_bytes()[:-5])
    with pytest.raises(ConceptIndexError, match="content hash mismatch"):
        ConceptIndex.load(built)
    with pytest.raises(ConceptIndexError, match="truncated or inconsistent"):
        ConceptIndex.load(built, verify=False)


def test_index_truncated_array_detected_without_verify(built: Path) -> None:
    arr = built / "post_cui.npy"
    arr.write_bytes(arr.read_bytes()[:-4])
    with pytest.raises(ConceptIndexError, match=r"cannot load index|truncated"):
        ConceptIndex.load(built, verify=False)


def test_index_missing_file_detected(built: Path) -> None:
    (built / "post_flags.npy").unlink()
    with pytest.raises(ConceptIndexError, match=r"post_flags\.npy is missing"):
        ConceptIndex.load(built)


def test_index_manifest_problems(built: Path, tmp_path: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    for change, message in (
        ({"format_version": 1}, "format version 1 is not supported"),
        ({"normalizer_version": "0"}, "normaliser version"),
        ({"content_hash": "0" * 64}, "content_hash does not match"),
        ({"files": {}}, "lists no files"),
    ):
        (built / "manifest.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(ConceptIndexError, match=message):
            ConceptIndex.load(built)
    (built / "manifest.json").write_text("{not json")
    with pytest.raises(ConceptIndexError, match="unreadable manifest"):
        ConceptIndex.load(built)
    with pytest.raises(ConceptIndexError, match=r"no manifest\.json"):
        ConceptIndex.load(tmp_path / "nowhere")
    shutil.rmtree(built)


# -- property tests --------------------------------------------------------------------------

_words = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "Zs", "P")), min_size=1,
    max_size=20,
)
_cui = st.from_regex(r"C[0-9]{7}", fullmatch=True)
_terms = st.lists(
    st.tuples(_cui, _words, st.sampled_from(["MSH", "NCI", "SNOMEDCT_US", "LOCAL"]),
              st.sampled_from(["PT", "SY", "AB"]), st.integers(0, 7)),
    max_size=40,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(terms=_terms, materialize=st.booleans())
def test_index_roundtrip_is_identity(
    tmp_path_factory: pytest.TempPathFactory, terms: list[tuple[str, str, str, str, int]],
    materialize: bool,
) -> None:
    """What goes in (after normalisation and dedup) is exactly what the loaded index gives."""
    cuis = sorted({t[0] for t in terms})
    pref = {c: next(t[1] for t in terms if t[0] == c) for c in cuis}
    concepts = [(c, pref[c], ["T047"] if int(c[1:]) % 2 else ["T023", "T029"]) for c in cuis]
    out = build_index(tmp_path_factory.mktemp("rt") / "ix", concepts, terms)
    ix = ConceptIndex.load(out, materialize=materialize)

    expected: dict[str, dict[tuple[str, str, str, str], int]] = {}
    for cui, s, sab, tty, flags in terms:
        key = normalize_term(s)
        if not key:
            continue
        s_clean = s.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
        row = (cui, s_clean, sab, tty)
        expected.setdefault(key, {})
        expected[key][row] = expected[key].get(row, 0) | flags | (
            FLAG_PREFERRED if pref[cui].replace("\n", " ") == s_clean else 0
        )
    got = {
        k: {(p.cui, p.string, p.sab, p.tty): p.flags for p in ix.postings(k)} for k in ix.keys()
    }
    assert got == expected
    assert set(ix.keys()) == set(expected)
    for c, name, stys in concepts:
        info = ix.concept(c)
        if info is None:  # a concept only reaches the index with a term
            continue
        assert info.preferred_name == name.replace("\r\n", " ").replace("\n", " ").replace(
            "\r", " ")
        assert info.semantic_types == tuple(stys)
    for k in expected:
        assert ix.key_id(k) is not None
        toks = k.split(" ")
        assert ix.max_tokens_from(toks[0]) >= len(toks)
    check_trie(ix)


def trie_node(ix: ConceptIndex, phrase: str) -> int:
    """The token trie's node of a space-joined phrase, or -1: the compiled engine's walk."""
    trie = ix.key_trie
    mask = len(trie.edge_keys) - 1
    node = 0
    for tok in phrase.split(" "):
        tid = trie.token_ids.get(tok)
        if tid is None:
            return -1
        edge = ((node + 1) << 32) | (tid + 1)
        slot = int(trie_slot(np.array([edge], dtype=np.uint64), mask)[0])
        while int(trie.edge_keys[slot]) not in (0, edge):
            slot = (slot + 1) & mask
        if int(trie.edge_keys[slot]) == 0:
            return -1
        node = int(trie.edge_child[slot])
    return node


def check_trie(ix: ConceptIndex) -> None:
    """Every key's path ends on a node naming that key; its proper prefixes name no other key
    unless they are keys; one node per distinct prefix, no node without a key below it."""
    trie = ix.key_trie
    keys = list(ix.keys())
    prefixes = {" ".join(k.split(" ")[:n]) for k in keys for n in range(1, k.count(" ") + 2)}
    assert len(trie.node_key) == len(prefixes) + 1  # (+ the root)
    assert int((trie.node_key >= 0).sum()) == len(keys)
    assert np.count_nonzero(trie.edge_keys) == len(prefixes)
    for p in prefixes:
        node = trie_node(ix, p)
        assert node > 0
        kid = ix.key_id(p)
        assert int(trie.node_key[node]) == (-1 if kid is None else kid)
    assert trie_node(ix, "no such phrase in any key") == -1


def test_index_token_trie(index: ConceptIndex) -> None:
    check_trie(index)
    assert trie_node(index, "magnetic resonance") > 0 and index.key_id("magnetic resonance") is None
    assert trie_node(index, "resonance imaging") == -1


def test_index_format_2_is_refused_with_rebuild(built: Path) -> None:
    # indexes of format 2 have no token trie: loading one says to rebuild it
    manifest = json.loads((built / "manifest.json").read_text())
    (built / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(ConceptIndexError, match=r"format version 2 is not supported.*token "
                       r"trie.*rebuild the index.*conceptsvc index build"):
        ConceptIndex.load(built)


def test_index_hash_table_with_many_collisions(tmp_path: Path) -> None:
    """Thousands of keys in the hashed mode: every key found, near-misses not."""
    terms = [(f"C{i:07d}", f"term{i} x{i % 7}", "X", "SY", 0) for i in range(5000)]
    concepts = [(c, s, ["T047"]) for c, s, *_ in terms]
    ix = ConceptIndex.load(build_index(tmp_path / "ix", concepts, terms), materialize=False)
    table = np.load(tmp_path / "ix" / "keys_table.npy")
    # the densest power of two within MAX_LOAD: 5000 of 8192 slots, clusters to probe past
    assert 5000 <= MAX_LOAD * len(table) < 2 * 5000 and np.count_nonzero(table) == 5000
    for i in range(0, 5000, 7):
        kid = ix.key_id(f"term{i} x{i % 7}")
        assert kid is not None and ix.postings_of(kid)[0].cui == f"C{i:07d}"
        assert ix.key_id(f"term{i} x{(i + 1) % 7}") is None
        assert f"C{i:07d}" in ix


# -- how the files are mapped (conceptsvc/mapping.py) ----------------------------------------

_SMAPS = Path("/proc/self/smaps")


def _mappings_under(directory: Path) -> dict[str, list[tuple[int, str]]]:
    """This process's mappings of files in ``directory``: file name → [(Rss kB, VmFlags)]."""
    out: dict[str, list[tuple[int, str]]] = {}
    current: list[tuple[int, str]] | None = None
    rss = 0
    for line in _SMAPS.read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) == 6 and "-" in head[0] and head[5].startswith("/"):
            path = Path(head[5])
            current = out.setdefault(path.name, []) if path.parent == directory else None
        elif len(head) == 5 and "-" in head[0] and ":" not in head[0]:
            current = None  # an anonymous mapping
        elif current is not None and line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif current is not None and line.startswith("VmFlags:"):
            current.append((rss, line))
    return out


@pytest.mark.skipif(not _SMAPS.is_file(), reason="needs /proc/self/smaps (Linux)")
def test_index_mapped_files_carry_random_access_advice(built: Path) -> None:
    index = ConceptIndex.load(built, materialize=False)
    mapped = _mappings_under(built.resolve())
    expected = {n for n in index.manifest["files"] if n.endswith((".npy", ".bin"))
                and (built / n).stat().st_size}
    assert set(mapped) == expected
    for name, maps in mapped.items():
        # "rr": VM_RAND_READ, what MADV_RANDOM sets (no read-around on a fault)
        assert all(" rr" in flags for _, flags in maps), (name, maps)
    assert index.max_key_tokens == int(np.asarray(index._a["first_token_max"]).max())


@pytest.mark.skipif(not _SMAPS.is_file(), reason="needs /proc/self/smaps (Linux)")
def test_index_settled_file_maps_single_pages(tmp_path: Path) -> None:
    from conceptsvc.mapping import map_array, settle_page_cache

    path = tmp_path / "big.npy"
    np.save(path, np.arange(4 << 20, dtype=np.uint64), allow_pickle=False)  # 32 MB
    with path.open("rb") as fh:  # written back, as an index is long after its build (the
        os.fsync(fh.fileno())    # kernel drops no dirty page)
    with path.open("rb") as fh:  # a sequential read, as hashing or copying an index does
        while fh.read(1 << 22):
            pass
    middle = (2 << 20) + 12_345

    def rss_after_one_read() -> int:
        arr = map_array(path)
        assert int(arr[middle]) == middle
        ((rss, flags),) = _mappings_under(tmp_path)["big.npy"]
        assert " rr" in flags
        del arr
        return rss

    unsettled = rss_after_one_read()
    if unsettled <= 256:
        pytest.skip(f"this kernel maps {unsettled} kB on one fault without settling: "
                    "no large folios to avoid")
    settle_page_cache(path)
    # one page and the neighbours of the kernel's fault-around window (64 KB by default)
    assert rss_after_one_read() <= 256, unsettled


@pytest.mark.parametrize("version", [4, 5, 6])
def test_index_formats_4_to_6_are_refused_with_rebuild(tmp_path: Path, version: int) -> None:
    # their trigram lists hold key numbers (4, 5), or size-local ones in key order (6), where
    # format 7's are size-local in the order of the second filter: read as the other, they
    # would find wrong keys, so they are refused, not misread
    ix = tmp_path / "ix"
    build_index(ix, CONCEPTS, TERMS)
    manifest = json.loads((ix / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 7
    (ix / "manifest.json").write_text(json.dumps({**manifest, "format_version": version}))
    with pytest.raises(ConceptIndexError, match=rf"format version {version} is not supported.*"
                       r"formats 4 to 6 number the keys of approximate matching's trigram "
                       r"lists differently"
                       r".*rebuild the index"):
        ConceptIndex.load(ix)
