from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conceptsvc import trigram_index
from conceptsvc.approximate import (
    APPROX,
    ApproximateMatcher,
    TrigramIndex,
    search_bounds,
    similarity,
    size_bounds,
    trigrams,
)
from conceptsvc.errors import ConceptIndexError, ExtractionError
from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex, build_index
from conceptsvc.matcher import MIN_MATCH_CHARS, ExactMatcher
from conceptsvc.model import SIMILARITIES, ExtractOptions
from conceptsvc.normalize import STOPWORDS, tokenize_spans


def test_approximate_trigrams_without_padding() -> None:
    assert trigrams("lung") == {"lun", "ung"}
    assert trigrams("ct") == {"ct"}
    assert trigrams("") == frozenset()


def test_approximate_similarity_formulas() -> None:
    # |X| = 4, |Y| = 6, overlap 3
    assert similarity("jaccard", 3, 4, 6) == pytest.approx(3 / 7)
    assert similarity("cosine", 3, 4, 6) == pytest.approx(3 / (24**0.5))
    assert similarity("dice", 3, 4, 6) == pytest.approx(6 / 10)
    assert similarity("overlap", 3, 4, 6) == pytest.approx(3 / 4)
    with pytest.raises(ExtractionError):
        similarity("levenshtein", 1, 1, 1)


@settings(max_examples=300)
@given(
    st.sampled_from(SIMILARITIES),
    st.integers(1, 40),
    st.integers(1, 40),
    st.floats(0.05, 1.0),
    st.data(),
)
def test_approximate_size_bounds_never_exclude_a_match(
    measure: str, x: int, y: int, alpha: float, data: st.DataObject
) -> None:
    overlap = data.draw(st.integers(0, min(x, y)))
    if similarity(measure, overlap, x, y) >= alpha:
        lo, hi = size_bounds(measure, x, alpha)
        assert lo <= y <= hi


WORDS = st.text(alphabet="abcdeflmnortu ", min_size=1, max_size=14)
# beyond ASCII as well: trigrams pack code points, astral ones included
UNICODE_WORDS = st.text(alphabet="aeé ñ\u4e2d\U0001f600lt", min_size=1, max_size=10)


def compiled_searcher(tri: TrigramIndex) -> object:
    """The compiled search over the same lists as ``tri`` (the engines' shared structure)."""
    assert APPROX is not None, "conceptsvc._approx is not built: run `make install`"
    return APPROX.TrigramSearcher(
        tri.arrays, tri.string, search_bounds, stopwords=frozenset(STOPWORDS),
        break_chars=frozenset(ExactMatcher.break_chars), min_chars=MIN_MATCH_CHARS, window=5,
        memo_size=64,
    )


def brute_force(strings: list[str], query: str, measure: str,
                alpha: float) -> set[tuple[str, float]]:
    """The definition: every string whose trigram similarity with ``query`` is ≥ ``alpha``."""
    q = trigrams(query)
    out = set()
    for s in strings:
        y = trigrams(s)
        sim = similarity(measure, len(q & y), len(q), len(y)) if q and y else 0.0
        # sim > 0: ≥ alpha > 0 implies it; the 1e-12 (the search's own rounding allowance)
        # would otherwise admit every string at thresholds below 1e-12
        if sim > 0 and sim >= alpha - 1e-12:
            out.add((s, round(sim, 9)))
    return out


def near(strings: list[str], data: st.DataObject) -> str:
    """A query near the dictionary: one of its strings, with up to two characters edited."""
    query = data.draw(st.sampled_from(strings), label="base")
    for pos, c in data.draw(st.lists(st.tuples(st.integers(0, 30), st.sampled_from("aeln ")),
                                     max_size=2), label="edits"):
        p = pos % (len(query) + 1)
        query = query[:p] + c + query[p + 1 :] if pos % 2 else query[:p] + c + query[p:]
    return query


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(WORDS, UNICODE_WORDS), min_size=1, max_size=25, unique=True),
    st.data(),
    st.sampled_from(SIMILARITIES),
    st.sampled_from([0.05, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0]),
    st.sampled_from([0, 1, 2, 4, 8, trigram_index.CLASS_SIZE]),
)
def test_approximate_search_equals_brute_force(
    strings: list[str], data: st.DataObject, measure: str, alpha: float, class_size: int
) -> None:
    # (small classes make the compiled search cut its runs to a range of z often: the class
    # of a small dictionary's index would otherwise hold nearly every trigram)
    query = data.draw(st.one_of(WORDS, UNICODE_WORDS) if data.draw(st.booleans())
                      else st.just(near(strings, data)), label="query")
    tri = TrigramIndex.from_strings(strings, class_size=class_size)
    expected = brute_force(strings, query, measure, alpha)
    got = {(tri.string(i), round(sim, 9)) for i, sim in tri.search(query, measure, alpha)}
    assert got == expected
    fast = compiled_searcher(tri).search(query, measure, alpha)  # type: ignore[attr-defined]
    assert {(tri.string(i), round(sim, 9)) for i, sim in fast} == expected
    # and the same ranking, to the bit
    assert fast == tri.search(query, measure, alpha)


@pytest.fixture(scope="module")
def approx(engine_index_path: Path) -> ApproximateMatcher:
    return ApproximateMatcher(ExactMatcher(ConceptIndex.load(engine_index_path)))


def run(am: ApproximateMatcher, text: str, covered_words: set[str] = frozenset(),
        alpha: float = 0.6) -> list[tuple[str, str, float]]:
    norms, starts, ends = tokenize_spans(text)
    covered = [text[s:e] in covered_words for s, e in zip(starts, ends, strict=True)]
    out = []
    for m in am.match(text, norms, starts, ends, covered, "jaccard", alpha):
        out.append((text[starts[m.start_tok] : ends[m.end_tok - 1]], m.key, round(m.score, 3)))
    return out


def test_approximate_matches_misspellings(approx: ApproximateMatcher) -> None:
    found = run(approx, "left pleural efusion")
    # 12 shared trigrams of 13 and 14: jaccard 12 / (13 + 14 - 12) = 0.8
    assert ("pleural efusion", "pleural effusion", 0.8) in found


def test_approximate_skips_covered_tokens_and_stopwords(approx: ApproximateMatcher) -> None:
    assert run(approx, "pleural efusion", covered_words={"pleural"}) == []
    # windows never start or end with a stopword
    assert all(not w[0].startswith("the ") for w in run(approx, "the pleural efusion"))


def test_approximate_best_is_memoised(approx: ApproximateMatcher) -> None:
    a = approx.best("pleural efusion", "jaccard", 0.6)
    assert a is approx.best("pleural efusion", "jaccard", 0.6)
    assert a[0][0] == "pleural effusion"


# Every threshold the (0, 1] validation lets through, subnormals included (issue 18: 1e-310
# overflowed x / alpha, and cosine's alpha² underflowed to 0 below about 1e-162).
THRESHOLDS = st.floats(min_value=0, max_value=1, exclude_min=True, allow_subnormal=True)
TINY = (5e-324, 1e-310, 2.2250738585072014e-308, 1e-200, 1e-162, 1e-9)


@settings(max_examples=300)
@given(st.sampled_from(SIMILARITIES), st.integers(1, 60), st.integers(1, 60), THRESHOLDS,
       st.data())
def test_issue_18_size_bounds_hold_for_every_threshold(
    measure: str, x: int, y: int, alpha: float, data: st.DataObject
) -> None:
    lo, hi = size_bounds(measure, x, alpha)
    assert isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi
    overlap = data.draw(st.integers(0, min(x, y)))
    if similarity(measure, overlap, x, y) >= alpha:
        assert lo <= y <= hi


@pytest.mark.parametrize("alpha", TINY)
@pytest.mark.parametrize("measure", SIMILARITIES)
def test_issue_18_tiny_thresholds_have_no_size_bound(measure: str, alpha: float) -> None:
    lo, hi = size_bounds(measure, 13, alpha)
    assert lo <= 1 and hi >= 1 << 20


@pytest.fixture(scope="module")
def keys(engine_index_path: Path) -> list[str]:
    return sorted(ConceptIndex.load(engine_index_path).keys())


@settings(max_examples=200, deadline=None)
@given(
    st.data(),
    st.sampled_from(SIMILARITIES),
    st.one_of(THRESHOLDS, st.sampled_from(TINY)),
)
def test_issue_18_search_at_any_threshold_equals_brute_force(
    approx: ApproximateMatcher, keys: list[str], data: st.DataObject, measure: str, alpha: float
) -> None:
    # a dictionary key with a few characters dropped, doubled or replaced, or random letters
    base = data.draw(st.sampled_from(keys))
    edits = data.draw(st.lists(st.tuples(st.integers(0, 40), st.sampled_from("aeflnrstu ")),
                               max_size=4))
    query = base
    for pos, c in edits:
        p = pos % (len(query) + 1)
        query = query[:p] + c + query[p + 1 :] if pos % 2 else query[:p] + c + query[p:]
    got = {(k, round(sim, 9)) for k, sim in approx.search(query, measure, alpha)}
    assert got == brute_force(keys, query, measure, alpha)


# -- the structure lives in the index ----------------------------------------------------------


def test_approximate_loading_builds_no_trigram_lists(
    engine_index_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the trigram lists were built at load or request time")

    monkeypatch.setattr(trigram_index, "build_arrays", no_build)
    monkeypatch.setattr("conceptsvc.approximate.build_arrays", no_build)
    index = ConceptIndex.load(engine_index_path)
    for name, arr in index.trigrams.as_files().items():
        assert isinstance(arr, np.memmap), f"{name} is not memory-mapped"
        assert Path(arr.filename).name == f"{name}.npy"  # type: ignore[arg-type]
    for engine in ("compiled", "reference"):
        ex = Extractor(index, engine=engine)
        ann = ex.extract("Right pleural efusion.", ExtractOptions(mode="approximate"))
        assert [m.text for m in ann.mentions] == ["pleural efusion"]
        assert ex.search("pleural efusion")[0].matched_string.lower() == "pleural effusion"
        am = ex._approximate()
        assert am.compiled == (engine == "compiled")
        # the matcher reads the index's own mapped arrays, no copy
        assert am._tri.arrays is index.trigrams


def test_approximate_index_without_trigram_lists_is_refused(tmp_path: Path) -> None:
    from conceptsvc.index import _content_hash

    ix = build_index(tmp_path / "ix", [("C0000001", "Pleural effusion", ("T047",))],
                     [("C0000001", "Pleural effusion", "MSH", "PT", 0)])
    manifest = json.loads((ix / "manifest.json").read_text())
    files = {k: v for k, v in manifest["files"].items()
             if not k.startswith(("trigram_", "key_trigram"))}
    for name in set(manifest["files"]) - set(files):
        (ix / name).unlink()
    manifest.update(files=files, content_hash=_content_hash(files))
    (ix / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConceptIndexError, match=r"no approximate-matching structure.*rebuild"):
        ConceptIndex.load(ix)


def _effusion_index(path: Path) -> Path:
    """A one-concept index with two strings (for the damaged-file tests)."""
    return build_index(path, [("C0000001", "Pleural effusion", ("T047",))],
                       [("C0000001", "Pleural effusion", "MSH", "PT", 0),
                        ("C0000001", "Effusion", "MSH", "SY", 0)])


def test_approximate_truncated_trigram_lists_are_refused(tmp_path: Path) -> None:
    ix = _effusion_index(tmp_path / "ix")
    keys = np.load(ix / "trigram_keys.npy")
    np.save(ix / "trigram_keys.npy", keys[:-1], allow_pickle=False)
    with pytest.raises(ConceptIndexError, match="trigram_offsets does not match"):
        ConceptIndex.load(ix, verify=False)


def test_approximate_truncated_size_keys_are_refused(tmp_path: Path) -> None:
    ix = _effusion_index(tmp_path / "ix")
    size_keys = np.load(ix / "trigram_size_keys.npy")
    np.save(ix / "trigram_size_keys.npy", size_keys[:-1], allow_pickle=False)
    with pytest.raises(ConceptIndexError, match=r"trigram_size_keys has .* entries"):
        ConceptIndex.load(ix, verify=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(WORDS, UNICODE_WORDS), min_size=1, max_size=40, unique=True),
       st.integers(0, 12))
def test_approximate_postings_are_size_local_key_numbers(
    strings: list[str], class_size: int
) -> None:
    # every run of a trigram's list, its postings read back through the size's key list, is
    # exactly the keys of that size holding the trigram, ascending in local number (so the
    # compiled search may count a size's keys in a bitmap of that size's range); a size's
    # keys are ordered by (z, key), z their trigrams in the class C — the class_size
    # space-free trigrams with the most postings — and zc_starts says where each z starts
    from conceptsvc.approximate import _grams_of
    from conceptsvc.index import build_hash_table

    a = trigram_index.build_arrays(strings, build_hash_table, class_size=class_size)
    grams = [_grams_of(k) for k in strings]
    sizes = [len(g) for g in grams]
    ids = [{a.gram_id(g) for g in gs} for gs in grams]
    assert a.key_counts.tolist() == sizes
    postings = [sum(t in i for i in ids) for t in range(len(a.codes))]
    free = [t for t in range(len(a.codes))
            if a.codes[t] < 1 << 63 and all((int(a.codes[t]) >> s) & 0x1FFFFF != 32
                                             for s in (0, 21, 42))]
    chosen = sorted(free, key=lambda t: (-postings[t], t))[:class_size]
    assert sorted(np.flatnonzero(a.classes).tolist()) == sorted(chosen)
    z = [sum(a.classes[t] for t in i) for i in ids]
    for y in set(sizes):
        lo, hi = int(a.size_offsets[y]), int(a.size_offsets[y + 1])
        ordered = sorted((k for k, n in enumerate(sizes) if n == y), key=lambda k: (z[k], k))
        assert a.size_keys[lo:hi].tolist() == ordered
        zs = a.zc_starts[int(a.zc_offsets[y]):int(a.zc_offsets[y + 1])].tolist()
        assert len(zs) == max(z[k] for k in ordered) + 2
        assert zs == [sum(z[k] < v for k in ordered) for v in range(len(zs))]
    for t in range(len(a.codes)):
        run_sizes, starts, end = a.size_runs(t)
        for r, y in enumerate(run_sizes):
            stop = starts[r + 1] if r + 1 < len(starts) else end
            assert a.keys[starts[r]:stop].tolist() == sorted(a.keys[starts[r]:stop].tolist())
            holders = {k for k in range(len(strings)) if sizes[k] == y and t in ids[k]}
            assert set(a.run_keys(y, starts[r], stop)) == holders


def test_approximate_scan_memo_stays_bounded(engine_index_path: Path) -> None:
    am = ApproximateMatcher(ExactMatcher(ConceptIndex.load(engine_index_path)), memo_size=8,
                            compiled=True)
    text = " ".join(f"word{i}x lung{i}" for i in range(40))
    norms, starts, ends = tokenize_spans(text)
    am.match(text, norms, starts, ends, [False] * len(norms), "jaccard", 0.7)
    assert 0 < am._fast.memo_entries <= 8


def test_approximate_huge_query_leaves_no_scratch_behind() -> None:
    """A query whose runs hold hundreds of thousands of keys (the overlap measure at a low
    threshold counts every run) needs a hash table of several MB: it is freed when the query
    ends, so a long-lived worker does not keep the largest query's memory; smaller queries
    keep theirs (the bitmaps and survivor buffers, reused, zero between queries). Dropping the
    release fails the first assertion."""
    strings = [f"abcdef{i:06d}" for i in range(300_000)]
    tri = TrigramIndex.from_strings(strings)
    fast = compiled_searcher(tri)
    found = fast.search("abcdef", "overlap", 0.05)  # type: ignore[attr-defined]
    assert len(found) == len(strings)
    # its 2^22-slot table (32 MB) is gone; the survivor buffers (≈ 3.6 MB here) stay
    assert fast.scratch_bytes < 1 << 23  # type: ignore[attr-defined]
    kept = fast.scratch_bytes  # type: ignore[attr-defined]
    # runs of ≈ 30,000 keys, read against the bitmaps and bisected for the few survivors
    hits = fast.search("abcdef000123", "jaccard", 0.9)  # type: ignore[attr-defined]
    assert hits == tri.search("abcdef000123", "jaccard", 0.9) and hits
    assert kept < fast.scratch_bytes < 1 << 24  # type: ignore[attr-defined]
    # and the same searcher again, after those: nothing left over from them changes a result
    search = fast.search  # type: ignore[attr-defined]
    for q, measure, alpha in (("abcdef00012", "dice", 0.8), ("bcdef12345", "jaccard", 0.6),
                              ("abcdef000123", "jaccard", 0.9)):
        assert search(q, measure, alpha) == tri.search(q, measure, alpha)


def test_approximate_sparse_searches_over_a_large_size_leave_the_bitmap_clean() -> None:
    """A search whose runs are short beside its size's keys clears only the bitmap words it
    wrote (a long one clears the whole span): 80,000 keys of one size (random 10-letter
    strings: 8 trigrams, ≈ 36 keys a run, a 2,048-word bitmap), and queries that each mark
    ≈ 70 postings. A word left set would count a key seen once as seen twice, and a later
    search would answer what the reference does not (dropping that clear fails here)."""
    rng = np.random.default_rng(11)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    strings = sorted({"".join(w) for w in rng.choice(letters, size=(80_000, 10))})
    tri = TrigramIndex.from_strings(strings)
    sizes = np.diff(tri.arrays.size_offsets)
    assert int(sizes.max()) > 65_536  # the largest size's bitmap: 2,048 words or more
    fast = compiled_searcher(tri)
    search = fast.search  # type: ignore[attr-defined]
    hits = 0
    for i in rng.choice(len(strings), size=300, replace=False):
        key = strings[int(i)]
        q = key[:-1] + ("a" if key[-1] != "a" else "b")  # one trigram of 8 replaced
        found = search(q, "jaccard", 0.7)
        assert found == tri.search(q, "jaccard", 0.7), q
        hits += len(found)
    assert hits >= 300  # each query finds at least the key it came from


def _damaged(tri: TrigramIndex, **changes: object) -> Any:
    """The compiled searcher's ``search`` over ``tri``'s arrays with some of them replaced."""
    from dataclasses import replace

    searcher = compiled_searcher(TrigramIndex(replace(tri.arrays, **changes), tri.string))
    return searcher.search  # type: ignore[attr-defined]


def test_approximate_damaged_size_local_postings_raise_not_crash() -> None:
    # a posting beyond its size's keys (an index damaged after its hash was checked, or loaded
    # unverified) is masked to the counting structures, so it never reads or writes outside
    # them, and a key it makes a candidate is refused, not answered
    strings = [f"pleural effusion {i}" for i in range(40)] + ["pleural effusions"]
    tri = TrigramIndex.from_strings(strings)
    assert int(np.diff(tri.arrays.size_offsets).max()) < 63  # each size has fewer keys
    keys = tri.arrays.keys.copy()
    keys[:] = np.uint32(63)  # within the smallest structures (64 keys), beyond every size
    bad_key = r"key number that keys of size .* do not have"
    with pytest.raises(ValueError, match=bad_key):
        _damaged(tri, keys=keys)("pleural efusion 7", "jaccard", 0.7)
    offsets = tri.arrays.size_offsets.copy()
    offsets[1:] = np.uint64(1 << 40)  # past the keys: not a range of them
    with pytest.raises(ValueError, match="trigram_size_offsets does not cover"):
        _damaged(tri, size_offsets=offsets)("pleural efusion 7", "jaccard", 0.7)
    for measure, alpha in (("overlap", 0.05), ("cosine", 0.9)):  # the hash-table count too
        with pytest.raises(ValueError, match=bad_key):
            _damaged(tri, keys=keys)("pleural efusion 7", measure, alpha)


def test_approximate_scan_memo_keeps_the_last_generation(engine_index_path: Path) -> None:
    """The memo holds two generations of memo_size / 2 windows: a window of the generation
    before the current one is not searched again (emptying the whole memo when full would
    search it again), and the bound holds."""
    am = ApproximateMatcher(ExactMatcher(ConceptIndex.load(engine_index_path)), memo_size=4,
                            compiled=True)
    words = ["pleuralx", "effusionx", "pneumothoraxx", "consolidationx", "atelectasisx"]

    def scan(word: str) -> None:
        norms, starts, ends = tokenize_spans(word)
        am.match(word, norms, starts, ends, [False] * len(norms), "jaccard", 0.7)

    for w in words:  # one window each; the 3rd and the 5th start a new generation
        scan(w)
    assert am._fast.searches == 5
    scan(words[3])  # in the old generation: moved to the young one, not searched
    scan(words[4])  # in the young generation
    assert am._fast.searches == 5
    assert am._fast.memo_entries <= 4
    scan(words[0])  # dropped with its generation: searched again
    assert am._fast.searches == 6


@settings(max_examples=20, deadline=None)
@given(st.lists(st.one_of(WORDS, UNICODE_WORDS), min_size=1, max_size=60, unique=True),
       st.integers(1, 7), st.integers(1, 40))
def test_approximate_trigram_lists_do_not_depend_on_chunks_or_buckets(
    strings: list[str], chunk: int, bucket: int
) -> None:
    # the build works per chunk of keys and per bucket of trigrams to bound its memory; the
    # arrays must come out the same whatever the cut
    from conceptsvc.index import build_hash_table

    whole = trigram_index.build_arrays(strings, build_hash_table).as_files()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trigram_index, "_CHUNK_KEYS", chunk)
        mp.setattr(trigram_index, "_BUCKET_PAIRS", bucket)
        cut = trigram_index.build_arrays(strings, build_hash_table).as_files()
    for name, arr in whole.items():
        assert arr.dtype == cut[name].dtype and np.array_equal(arr, cut[name]), name


def test_approximate_format_3_index_is_refused_with_rebuild(tmp_path: Path) -> None:
    # format 3 (issue 13's token trie) had no trigram lists
    ix = build_index(tmp_path / "ix", [("C0000001", "Pleural effusion", ("T047",))],
                     [("C0000001", "Pleural effusion", "MSH", "PT", 0)])
    manifest = json.loads((ix / "manifest.json").read_text())
    (ix / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))
    with pytest.raises(ConceptIndexError, match=r"format version 3 is not supported.*trigram "
                       r"lists.*rebuild the index"):
        ConceptIndex.load(ix)
