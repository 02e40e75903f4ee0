# cython: language_level=3, initializedcheck=False, boundscheck=False, wraparound=False
# cython: cdivision=True, infer_types=False
# distutils: language = c++
"""Compiled approximate matching: CPMerge over the index's mapped trigram lists (Cython).

``conceptsvc/approximate.py`` is the reference: it defines which keys a window finds (every key
whose trigram similarity with it is ≥ the threshold) and how they are ranked. This module finds
the same keys over the same memory-mapped arrays (:mod:`conceptsvc.trigram_index`) without the
interpreter in the loop, the way simstring's CPMerge does:

* each list is cut to the keys whose size can reach the threshold (a bisection of its size
  directory, so no key size is read from elsewhere), and the cut lists are walked one key size
  at a time, ascending — a list's keys of one size are one run of its directory;
* for each size y, the overlap a key of that size needs (``need``, the least that reaches the
  threshold against the query's size) fixes how many runs are read: a key with ``need`` of
  the query's m runs of size y misses at most m − need of them, so it is in at least two of
  any (m − need + 2) of them (pigeonhole; in one of all m when need is 1); the first
  (m − need + 2) are read against a bitmap of the size's keys (``ApproxCounter``: postings are
  size-local key numbers, so a size's keys are a dense range; at 16M rows its bitmap is at most
  32 KB, and survivors' counts go to 2 bytes a key that only they touch), and
  only the keys found twice survive. At UMLS scale almost every key of those runs is in one
  of them only: it costs a bit test and is never searched for (simstring's CPMerge merges the
  (m − need + 1) shortest and looks every key up in the next; reading one more run costs less
  than those lookups). Until 2026-12-06 the runs were counted in a hash table of key numbers
  (≈ 4 ns a posting); the bitmaps made a cold ROCOv2 pass on a 16M-row index ≈ 1.15–1.2×
  faster (BENCHMARKS.md). Runs come in the order of their trigrams' postings over all the
  sizes searched, fewest first, which is nearly their order by length at each size (sorting
  each size's runs cost more than the postings it saved). A size with fewer than ``need``
  runs is skipped unread. ``need`` is
  never below the τ_min of ``approximate.search_bounds`` (the least over all sizes, which the
  reference's pigeonhole uses) and above it at most sizes, so fewer postings are read than one
  cut over all sizes would take;
* before a size's first runs are counted, they are cut to the keys whose count z of trigrams in
  the class C (:mod:`conceptsvc.trigram_index`, a second filter as exact as the size) can reach
  ``need``: a key shares at most min(z, mC) + min(y − z, mN) trigrams with the query (mC, mN:
  its runs of this size in C and not), and a size's keys are numbered by (z, key), so the keys
  that can are one range of local numbers; a run of 48 postings or more is cut by two
  bisections, its ends prefetched first (on a 16M-row index the counted postings of a long
  window fall ≈ 3.4×);
* each remaining run, in that order, is read through the survivors' bitmap (or, when it is
  long and the survivors few, searched for each survivor), and a survivor is dropped as soon
  as even all remaining runs could not lift its overlap to ``need``;
* the runs that are only tested against a bitmap (the last of the counted ones, and the
  remaining ones read whole) are well over half the postings read: on a CPU with AVX-512 they
  are tested 16 postings at a time (a gather of the bitmap words, a compress of the keys
  found), chosen when the module loads; ``set_simd(False)`` switches to the scalar loop, which
  gives the same keys in the same order (the tests run both).

Which runs are read first, and the pruning, change only the work done: a key is kept exactly
when its exact overlap gives a similarity ≥ threshold − 1e-12, as in the reference, computed by
the same float expressions, and ranked by (−similarity, −size, key number) as there.

Windows of one caption share their work: the caption's normalised tokens are joined once, every
position's trigram code is computed once and its trigram number looked up at most once, so a
window's trigram set is a deduplicated range of positions. Each window's best keys are memoised
across captions, in two generations of ``memo_size`` / 2 windows: when the young one is full it
becomes the old one and the old one is dropped, and a window found in the old one moves to the
young one, so the windows of recent captions stay (emptying the whole memo when full made a
cold pass over ROCOv2's 9,904 validation captions search 107,128 windows instead of 102,182;
it has 99,057 distinct ones). The size bounds and
τ_min come from ``approximate.search_bounds`` (one source of the rules), cached per
(measure, threshold, query size); window rules (stopwords, punctuation that ends a phrase,
minimum characters, window length) are handed over by the Python matcher.
"""

cimport cython
from libc.math cimport sqrt
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libcpp.pair cimport pair
from libcpp.vector cimport vector


cdef extern from *:
    """
    #include <algorithm>
    #include <vector>
    #include <cstdint>
    struct GramCursor {
        int64_t e, db, dend;          /* next directory run e, up to db (size > hi); dend: the
                                         list's last */
        int64_t base, lend;           /* where the whole list starts and ends */
        int64_t span;                 /* postings of the sizes searched (the cut list) */
        int64_t cls;                  /* 1: the trigram is in the class C (trigram_index) */
    };
    struct ApproxRun { int64_t length, start, end; };  /* postings [start, end) of one size */
    struct ApproxHit { double sim; uint32_t size; uint32_t kid; };
    static inline bool approx_hit_before(const ApproxHit& a, const ApproxHit& b) {
        if (a.sim != b.sim) return a.sim > b.sim;
        if (a.size != b.size) return a.size > b.size;
        return a.kid < b.kid;
    }
    static inline void approx_sort_cursors(std::vector<GramCursor>& v) {
        std::sort(v.begin(), v.end(),
                  [](const GramCursor& a, const GramCursor& b) { return a.span < b.span; });
    }
    /* Written in place, field by field. A run assembled on the stack and copied whole (a
       Cython struct, or a braced temporary) made the copy's 16-byte load wait on the two
       8-byte stores before it (store forwarding fails): a third of _search's samples. */
    static inline void approx_push_run(std::vector<ApproxRun>& v, int64_t start, int64_t end) {
        v.emplace_back();
        ApproxRun& r = v.back();
        r.length = end - start;
        r.start = start;
        r.end = end;
    }
    /* The first n runs cut to the keys of local numbers [lo, hi) (postings are ascending in
       a run): the second filter's range of z (trigram_index), found by two bisections of a
       run only where its first or last key is outside it. */
    static const int64_t APPROX_CUT_MIN = 48;
    static inline void approx_cut_runs(const uint32_t* keys, ApproxRun* runs, int n,
                                       uint32_t lo, uint32_t hi) {
        for (int i = 0; i < n; ++i) {
            if (runs[i].length >= APPROX_CUT_MIN) {
                __builtin_prefetch(keys + runs[i].start);
                __builtin_prefetch(keys + runs[i].end - 1);
            }
        }
        for (int i = 0; i < n; ++i) {
            ApproxRun& r = runs[i];
            if (r.length < APPROX_CUT_MIN) continue;
            if (keys[r.start] < lo)
                r.start = std::lower_bound(keys + r.start, keys + r.end, lo) - keys;
            if (r.start < r.end && keys[r.end - 1] >= hi)
                r.end = std::lower_bound(keys + r.start, keys + r.end, hi) - keys;
            r.length = r.end - r.start;
        }
    }
    static inline void approx_sort_hits(std::vector<ApproxHit>& v) {
        std::sort(v.begin(), v.end(), approx_hit_before);
    }
    static inline void approx_sort_u64(std::vector<uint64_t>& v) {
        std::sort(v.begin(), v.end());
    }
    static inline void approx_sort_pairs(std::vector<std::pair<uint64_t, int64_t> >& v) {
        std::sort(v.begin(), v.end());
    }
    /* The keys of postings [p, e), masked by `kmask`, whose bit is set in the bitmap `bm`,
       appended in order to `out`; returns how many. This is the loop of the runs that are
       only tested against a bitmap (the last of the P runs, and the later runs against the
       survivors'), well over half the postings a search reads. On a CPU with AVX-512 it
       tests 16 postings at a time (a gather of their bitmap words, a compress of the keys
       whose bit is set); elsewhere, or when switched off (approx_set_simd), one at a time.
       Both give the same keys in the same order. */
    static inline size_t approx_select_scalar(const uint32_t* p, const uint32_t* e,
                                              uint32_t kmask, const uint64_t* bm,
                                              uint32_t* out) {
        size_t n = 0;
        for (; p < e; ++p) {
            const uint32_t k = *p & kmask;
            out[n] = k;
            n += (bm[k >> 6] >> (k & 63)) & 1;
        }
        return n;
    }
    #if defined(__x86_64__) && defined(__GNUC__)
    #include <immintrin.h>
    __attribute__((target("avx512f")))
    static size_t approx_select_avx512(const uint32_t* p, const uint32_t* e, uint32_t kmask,
                                       const uint64_t* bm, uint32_t* out) {
        size_t n = 0;
        const __m512i km = _mm512_set1_epi32(int(kmask));
        const __m512i low5 = _mm512_set1_epi32(31);
        const __m512i one = _mm512_set1_epi32(1);
        const int* const words = reinterpret_cast<const int*>(bm);  /* 32-bit words */
        for (; p + 16 <= e; p += 16) {
            const __m512i k = _mm512_and_si512(_mm512_loadu_si512(p), km);
            const __m512i w = _mm512_i32gather_epi32(_mm512_srli_epi32(k, 5), words, 4);
            const __mmask16 hit = _mm512_test_epi32_mask(
                _mm512_srlv_epi32(w, _mm512_and_si512(k, low5)), one);
            if (hit) {
                _mm512_mask_compressstoreu_epi32(out + n, hit, k);
                n += size_t(__builtin_popcount(hit));
            }
        }
        return n + approx_select_scalar(p, e, kmask, bm, out + n);
    }
    static int approx_has_avx512() {
        __builtin_cpu_init();  /* this initialiser may run before libgcc's own */
        return __builtin_cpu_supports("avx512f") ? 1 : 0;
    }
    static int approx_simd_on = approx_has_avx512();
    static inline size_t approx_select(const uint32_t* p, const uint32_t* e, uint32_t kmask,
                                       const uint64_t* bm, uint32_t* out) {
        if (approx_simd_on) return approx_select_avx512(p, e, kmask, bm, out);
        return approx_select_scalar(p, e, kmask, bm, out);
    }
    /* switch the AVX-512 loop on or off (the tests run both); returns whether it is on */
    static int approx_set_simd(int on) {
        approx_simd_on = on && approx_has_avx512() ? 1 : 0;
        return approx_simd_on;
    }
    #else
    static inline size_t approx_select(const uint32_t* p, const uint32_t* e, uint32_t kmask,
                                       const uint64_t* bm, uint32_t* out) {
        return approx_select_scalar(p, e, kmask, bm, out);
    }
    static int approx_set_simd(int on) { (void)on; return 0; }
    static const int approx_simd_on = 0;
    #endif
    /* the bits of the keys of postings [p, e), masked by kmask, set in `o` (the loop's end
       is a local: read from a run in memory, it was loaded again after every store) */
    static inline void approx_mark(const uint32_t* p, const uint32_t* const e, uint32_t kmask,
                                   uint64_t* o) {
        for (; p < e; ++p) {
            const uint32_t k = *p & kmask;
            o[k >> 6] |= uint64_t(1) << (k & 63);
        }
    }
    /* How many of a size's m runs are counted for an overlap of `need` (the pigeonhole of
       ApproxCounter.search: a key with `need` of the m runs is in two of the first
       m − need + 2, or in one of all m) — the runs _search cuts to the second filter's range */
    static inline int approx_counted_runs(int m, int need) {
        return m - need + 2 < m ? m - need + 2 : m;
    }
    struct ApproxCand { uint32_t kid; int count; };
    /* A search's scratch above this many entries is freed when it ends (ApproxCounter and
       TrigramSearcher._search's candidates): a query whose runs are huge (a low threshold,
       the overlap measure) must not leave it behind in a long-lived worker. */
    static const size_t APPROX_RELEASE = size_t(1) << 20;
    static inline uint32_t approx_key_hash(uint32_t kid) { return kid * 0x9E3779B1u; }
    /* The slot of `kid` in a counting table `t` of stamp `sk`: where it is, or the empty
       slot (of another stamp) where it would go; `hk` is approx_key_hash(kid). */
    static inline uint32_t approx_probe(const uint64_t* t, uint32_t kid, uint32_t hk,
                                        uint64_t sk, uint32_t shift, uint32_t mask) {
        uint32_t h = hk >> shift;
        for (;;) {
            const uint64_t v = t[h];
            if ((v >> 48) != sk || uint32_t(v) == kid) return h;
            h = (h + 1) & mask;
        }
    }
    /* ApproxCounter.search_hashed, the count of ApproxCounter.search in a hash table (what
       every search used before the bitmaps, and still those whose bar is one): the first
       P runs are counted in an open-addressing table (a slot: stamp 16 bits, count
       16 bits, key 32 bits; a slot of another stamp is empty, so the table is never cleared
       between uses), and the keys that reach the bar are the survivors. Each later run p is
       then either read through a 4,096-bit filter of the survivors' hashes (a key that passes
       is probed in the table and its count raised) or, when it is long and the survivors
       few, searched for each survivor by bisection; after it a survivor needs
       need − (m − 1 − p), and the others are dropped. */
    struct ApproxCounter {
        std::vector<uint64_t> slots;
        uint64_t stamp = 0;
        std::vector<uint32_t> live;  /* slots of the survivors */
        std::vector<uint64_t> once, twice;  /* bitmaps over a size's local key numbers ("seen",
                                               "a survivor"), all zero between searches */
        std::vector<uint16_t> reps;  /* per local key number: sightings after the first (zero
                                        between searches) */
        std::vector<uint32_t> surv;  /* the survivors' local numbers */
        std::vector<uint32_t> dup;   /* keys found seen again while the P runs are read, then
                                        the survivors found in each later run */
        std::vector<ApproxRun> pruns;  /* the P runs, in the order they are read */
        /* The keys of one key size (`ny` of them; postings are their size-local numbers,
           ascending in each run) with at least `need` of the query's m runs (runs[0:m],
           the shortest nearly first), with their exact counts, into `out` (local numbers).

           A key with `need` of m runs misses at most m − need of them, so it is in at least
           two of the first P = m − need + 2 (in one, when need is 1 and P = m). When that
           bar is two, the P runs are read against a bitmap of ny bits ("seen": at most
           32 KB at 16M rows, in the first-level cache, so a posting costs a bit test and a
           store, no hashing or probing); a key seen again is a survivor, marked in a second
           bitmap, and its further sightings are counted in a per-key array that only
           survivors touch. Each later run
           p is then read through the survivors' bitmap (or, when it is long and they are few,
           bisected for each), and after it a survivor needs need − (m − 1 − p): the others
           are dropped. A key's count rises by at most one a run and the bar by exactly one, so
           a key once dropped never comes back. When the bar is one (need is 1), every key of
           every run is an answer: they are counted in the hash table (search_hashed). */
        void search(const uint32_t* keys, const ApproxRun* runs, int m, int need, uint32_t ny,
                    std::vector<ApproxCand>& out) {
            const int n = approx_counted_runs(m, need);
            if (need - (m - n) < 2) { search_hashed(keys, runs, m, need, out); return; }
            /* the structures cover a power of two ≥ ny, and every posting is masked to it: a
               damaged index (loaded unverified) can give wrong keys, which _search refuses
               when they reach it, but never an access outside them */
            uint64_t span = 64;
            while (span < ny) span <<= 1;
            const uint32_t kmask = uint32_t(span - 1);
            if (reps.size() < span) {
                once.assign(span >> 6, 0);
                twice.assign(span >> 6, 0);
                reps.assign(span, 0);
            }
            uint64_t* const o = once.data();
            uint64_t* const t2 = twice.data();
            uint16_t* const rp = reps.data();
            surv.clear();
            /* the first run only marks its keys (they are distinct and nothing is seen yet),
               the last only tests them (a key first seen there is seen once); the runs
               between do both, which costs the most a posting. So of the P runs the longest
               is read last and the next longest first. Every key read from the second run on
               is written to `dup`, and the write is kept (its end moved on) only when the key
               was seen: no branch on the bit. The keys kept, seen again, are counted after
               the P runs */
            pruns.assign(runs, runs + n);
            {
                int l = 0;
                for (int i = 1; i < n; ++i) if (pruns[i].length > pruns[l].length) l = i;
                std::swap(pruns[l], pruns[n - 1]);
                int f = 0;
                for (int i = 1; i < n - 1; ++i) if (pruns[i].length > pruns[f].length) f = i;
                std::swap(pruns[f], pruns[0]);
            }
            const ApproxRun* const cr = pruns.data();
            int64_t marked = cr[0].length, rest = 0;
            for (int i = 1; i < n; ++i) rest += cr[i].length;
            if (dup.size() < size_t(rest) + 1) dup.resize(size_t(rest) + 1);
            uint32_t* const d = dup.data();
            size_t nd = 0;
            approx_mark(keys + cr[0].start, keys + cr[0].end, kmask, o);
            for (int i = 1; i < n - 1; ++i) {
                marked += cr[i].length;
                const uint32_t* const e = keys + cr[i].end;
                /* a run's keys are distinct: test them all against the runs before it,
                   then mark them (no load waits on a store of the same run). The test is
                   approx_select_scalar's loop written out: called here, that function
                   measured 1.03× slower (in-process A/B on a Zen 2 VM, 2026-12-06) */
                for (const uint32_t* p = keys + cr[i].start; p < e; ++p) {
                    const uint32_t k = *p & kmask;
                    d[nd] = k;
                    nd += (o[k >> 6] >> (k & 63)) & 1;
                }
                approx_mark(keys + cr[i].start, e, kmask, o);
            }
            nd += approx_select(keys + cr[n - 1].start, keys + cr[n - 1].end, kmask, o,
                                d + nd);
            for (size_t i = 0; i < nd; ++i) {  /* a key seen again: a survivor */
                const uint32_t k = d[i];
                if (rp[k] == 0) { surv.push_back(k); t2[k >> 6] |= uint64_t(1) << (k & 63); }
                ++rp[k];
            }
            /* "seen" back to all zero: the whole span at once when it is small beside the
               postings marked (a store of 64 bytes costs about what one posting's clear
               does), else only the words written */
            if ((span >> 6) <= uint64_t(16 * marked)) {
                std::fill(o, o + (span >> 6), uint64_t(0));
            } else {
                for (int i = 0; i < n - 1; ++i) {
                    const uint32_t* p = keys + cr[i].start;
                    const uint32_t* const e = keys + cr[i].end;
                    for (; p < e; ++p) o[(*p & kmask) >> 6] = 0;
                }
            }
            for (int r = n; r < m && !surv.empty(); ++r) {
                const uint32_t* const b = keys + runs[r].start;
                const uint32_t* const e = keys + runs[r].end;
                if (runs[r].length > 64 * int64_t(surv.size())) {
                    for (size_t i = 0; i < surv.size(); ++i)  /* a survivor k is < span */
                        if (std::binary_search(b, e, surv[i])) ++rp[surv[i]];
                } else if (approx_simd_on) {
                    if (dup.size() < size_t(runs[r].length) + 1)
                        dup.resize(size_t(runs[r].length) + 1);
                    const size_t nh = approx_select(b, e, kmask, t2, dup.data());
                    for (size_t i = 0; i < nh; ++i) ++rp[dup[i]];
                } else {  /* one at a time: a branch on the rare survivor beats a buffer */
                    for (const uint32_t* p = b; p < e; ++p) {
                        const uint32_t k = *p & kmask;
                        if ((t2[k >> 6] >> (k & 63)) & 1) ++rp[k];
                    }
                }
                const int bar = need - (m - 1 - r);  /* a count is 1 + rp */
                size_t w = 0;
                for (size_t i = 0; i < surv.size(); ++i) {
                    const uint32_t k = surv[i];
                    if (int(rp[k]) + 1 >= bar) {
                        surv[w++] = k;
                    } else {
                        t2[k >> 6] &= ~(uint64_t(1) << (k & 63));
                        rp[k] = 0;
                    }
                }
                surv.resize(w);
            }
            out.resize(surv.size());
            for (size_t i = 0; i < surv.size(); ++i) {
                const uint32_t k = surv[i];
                out[i].kid = k;
                out[i].count = int(rp[k]) + 1;
                rp[k] = 0;
                t2[k >> 6] = 0;
            }
            release();
        }
        /* need 1: the hash-table count (see search) */
        void search_hashed(const uint32_t* keys, const ApproxRun* runs, int m, int need,
                           std::vector<ApproxCand>& out) {
            const int n = approx_counted_runs(m, need);
            const uint32_t cmin = uint32_t(need - (m - n));
            int64_t total = 0;
            for (int i = 0; i < n; ++i) total += runs[i].length;
            int bits = 6;
            /* load ≤ 1/4 while the table fits the CPU's caches, ≤ 1/2 beyond */
            const int64_t want = total > (int64_t(1) << 18) ? 2 * total : 4 * total;
            while (bits < 31 && (int64_t(1) << bits) < want) ++bits;
            const size_t cap = size_t(1) << bits;
            if (slots.size() < cap) { slots.assign(cap, 0); stamp = 0; }
            stamp = (stamp + 1) & 0xFFFF;
            if (stamp == 0) { std::fill(slots.begin(), slots.end(), 0); stamp = 1; }
            const uint64_t sk = stamp, st = sk << 48, one = uint64_t(1) << 32;
            const uint32_t mask = uint32_t(cap - 1), shift = 32 - bits;  /* bits ≤ 31 */
            const uint32_t reach = uint32_t(sk) << 16 | cmin;  /* stamp and count cmin */
            uint64_t* const t = slots.data();
            live.clear();
            for (int i = 0; i < n; ++i) {
                const uint32_t* p = keys + runs[i].start;
                const uint32_t* const e = keys + runs[i].end;
                for (; p < e; ++p) {
                    const uint32_t kid = *p;
                    const uint32_t h = approx_probe(t, kid, approx_key_hash(kid), sk, shift, mask);
                    const uint64_t v = t[h];
                    if ((v >> 48) != sk) {
                        t[h] = st | one | kid;
                        if (cmin == 1) live.push_back(h);
                    } else {
                        const uint64_t w = v + one;
                        t[h] = w;
                        if (uint32_t(w >> 32) == reach) live.push_back(h);
                    }
                }
            }
            for (int r = n; r < m && !live.empty(); ++r) {
                const uint32_t* const b = keys + runs[r].start;
                const uint32_t* const e = keys + runs[r].end;
                if (runs[r].length <= 64 * int64_t(live.size())) {
                    /* the survivors' hashes in a 4,096-bit filter: most of the run's keys
                       are not survivors and cost one bit test, not a probe */
                    uint64_t filt[64];
                    std::fill(filt, filt + 64, 0);
                    for (size_t i = 0; i < live.size(); ++i) {
                        const uint32_t f = approx_key_hash(uint32_t(t[live[i]])) >> 20;
                        filt[f >> 6] |= uint64_t(1) << (f & 63);
                    }
                    for (const uint32_t* p = b; p < e; ++p) {
                        const uint32_t kid = *p;
                        const uint32_t hk = approx_key_hash(kid);
                        const uint32_t f = hk >> 20;
                        if (!((filt[f >> 6] >> (f & 63)) & 1)) continue;
                        const uint32_t h = approx_probe(t, kid, hk, sk, shift, mask);
                        if ((t[h] >> 48) == sk) t[h] += one;  /* a key of the table */
                    }
                } else {
                    for (size_t i = 0; i < live.size(); ++i) {
                        const uint32_t kid = uint32_t(t[live[i]]);
                        const uint32_t* q = std::lower_bound(b, e, kid);
                        if (q != e && *q == kid) t[live[i]] += one;
                    }
                }
                const uint32_t bar = uint32_t(need - (m - 1 - r));
                size_t w = 0;
                for (size_t i = 0; i < live.size(); ++i)
                    if (((t[live[i]] >> 32) & 0xFFFF) >= bar) live[w++] = live[i];
                live.resize(w);
            }
            out.resize(live.size());
            for (size_t i = 0; i < live.size(); ++i) {
                const uint64_t v = t[live[i]];
                out[i].kid = uint32_t(v);
                out[i].count = int((v >> 32) & 0xFFFF);
            }
            release();
        }
        void release() {  /* see APPROX_RELEASE */
            if (slots.size() > APPROX_RELEASE) {
                std::vector<uint64_t>().swap(slots);
                stamp = 0;
            }
            if (live.capacity() > APPROX_RELEASE) std::vector<uint32_t>().swap(live);
            if (surv.capacity() > APPROX_RELEASE) std::vector<uint32_t>().swap(surv);
            if (dup.capacity() > APPROX_RELEASE) std::vector<uint32_t>().swap(dup);
            if (reps.size() > APPROX_RELEASE) {  /* a size of over a million keys */
                std::vector<uint16_t>().swap(reps);
                std::vector<uint64_t>().swap(once);
                std::vector<uint64_t>().swap(twice);
            }
        }
        size_t scratch_bytes() const {  /* per key of the largest size: 2 bits and 2 bytes */
            return slots.capacity() * sizeof(uint64_t) + live.capacity() * sizeof(uint32_t)
                + (once.capacity() + twice.capacity()) * sizeof(uint64_t)
                + reps.capacity() * sizeof(uint16_t)
                + (surv.capacity() + dup.capacity()) * sizeof(uint32_t)
                + pruns.capacity() * sizeof(ApproxRun);
        }
    };
    """
    struct GramCursor:
        int64_t e, db, dend
        int64_t base, lend, span, cls
    struct ApproxRun:
        int64_t length, start, end
    struct ApproxHit:
        double sim
        uint32_t size
        uint32_t kid
    void approx_sort_cursors(vector[GramCursor]& v)
    void approx_sort_hits(vector[ApproxHit]& v)
    void approx_cut_runs(const uint32_t* keys, ApproxRun* runs, int n, uint32_t lo, uint32_t hi)
    int approx_counted_runs(int m, int need)
    void approx_push_run(vector[ApproxRun]& v, int64_t start, int64_t end)
    int approx_set_simd(int on)
    void approx_sort_u64(vector[uint64_t]& v)
    void approx_sort_pairs(vector[pair[uint64_t, int64_t]]& v)
    const size_t APPROX_RELEASE
    struct ApproxCand:
        uint32_t kid
        int count
    cppclass ApproxCounter:
        void search(const uint32_t* keys, const ApproxRun* runs, int m, int need, uint32_t ny,
                    vector[ApproxCand]& out)
        size_t scratch_bytes()


def set_simd(bint on):
    """Switch the AVX-512 loop of the runs only tested against a bitmap on (the default
    where the CPU has it) or off, for every searcher of the process; returns whether it is
    on. Results do not depend on it: the tests run the parity suites both ways."""
    return bool(approx_set_simd(on))


cdef uint64_t SHORT = (<uint64_t>1) << 63
cdef uint64_t HASH_MUL = 0x9E3779B97F4A7C15ULL
cdef int MAX_SIZE = 0xFFFF

cdef dict MEASURES = {u"jaccard": 0, u"cosine": 1, u"dice": 2, u"overlap": 3}


cdef inline double sim_of(int measure, int s, int x, int y) noexcept:
    # the reference's expressions (approximate.similarity), in the same float operations
    if measure == 0:
        return s / <double>(x + y - s)
    if measure == 1:
        return s / sqrt(<double>(<int64_t>x * y))
    if measure == 2:
        return (2.0 * s) / <double>(x + y)
    return s / <double>(x if x < y else y)


cdef inline uint64_t code3(Py_UCS4 a, Py_UCS4 b, Py_UCS4 c) noexcept:
    return ((<uint64_t>a) << 42) | ((<uint64_t>b) << 21) | <uint64_t>c


cdef class TrigramSearcher:
    """Approximate search and window scanning over one index's mapped trigram lists."""

    cdef const uint64_t[::1] codes
    cdef const uint64_t[::1] table
    cdef const uint64_t[::1] offsets
    cdef const uint32_t[::1] keys
    cdef const uint64_t[::1] dir_offsets
    cdef const uint16_t[::1] dir_size
    cdef const uint32_t[::1] dir_start
    cdef const uint64_t[::1] size_offsets
    cdef const uint32_t[::1] size_keys
    cdef const uint8_t[::1] classes
    cdef const uint64_t[::1] zc_offsets
    cdef const uint32_t[::1] zc_starts
    cdef uint64_t mask
    cdef object key_string, bounds
    cdef frozenset stopwords, break_chars
    cdef int min_chars, window
    cdef Py_ssize_t memo_size, memo_n, old_n, memo_chars, young_chars, old_chars
    cdef readonly Py_ssize_t searches  # windows searched by scan (not found in the memo)
    cdef dict memos  # (measure, threshold) → [young, old]: window → its best keys
    # bounds of the current (measure, threshold) by query size; -2: not asked yet
    cdef int cur_mcode
    cdef double cur_alpha
    cdef vector[int] b_lo, b_hi, b_tau
    # _search's scratch (it calls no Python, so no other thread can enter it meanwhile)
    cdef vector[GramCursor] curs
    cdef vector[ApproxRun] runs
    cdef vector[ApproxCand] cands
    cdef ApproxCounter counter

    def __init__(self, arrays, key_string, bounds, *, frozenset stopwords not None,
                 frozenset break_chars not None, int min_chars, int window,
                 Py_ssize_t memo_size, Py_ssize_t memo_chars=1 << 22):
        self.codes = arrays.codes
        self.table = arrays.table
        self.offsets = arrays.offsets
        self.keys = arrays.keys
        self.dir_offsets = arrays.dir_offsets
        self.dir_size = arrays.dir_size
        self.dir_start = arrays.dir_start
        self.size_offsets = arrays.size_offsets
        self.size_keys = arrays.size_keys
        self.classes = arrays.classes
        self.zc_offsets = arrays.zc_offsets
        self.zc_starts = arrays.zc_starts
        if self.classes.shape[0] != self.codes.shape[0]:
            raise ValueError("trigram classes do not match the trigrams")
        if self.table.shape[0] == 0 or self.table.shape[0] & (self.table.shape[0] - 1):
            raise ValueError("trigram table size must be a power of two")
        self.mask = self.table.shape[0] - 1
        self.key_string = key_string
        self.bounds = bounds
        self.stopwords = stopwords
        self.break_chars = break_chars
        self.min_chars = min_chars
        self.window = window
        self.memo_size = memo_size
        self.memo_chars = memo_chars
        self.memo_n = 0
        self.old_n = 0
        self.young_chars = 0
        self.old_chars = 0
        self.searches = 0
        self.memos = {}
        self.cur_mcode = -1
        self.cur_alpha = -1.0

    @property
    def scratch_bytes(self):
        """Bytes the search keeps between queries (its bitmaps, hash table and candidate
        buffers); a query that needed more than a few MB gives them back when it ends."""
        return self.counter.scratch_bytes() + self.cands.capacity() * sizeof(ApproxCand)

    @property
    def memo_entries(self):
        """Windows memoised now, in both generations (≤ memo_size)."""
        return self.memo_n + self.old_n

    @property
    def memo_key_chars(self):
        """Characters of the windows memoised now, in both generations (≤ memo_chars)."""
        return self.young_chars + self.old_chars

    cdef int _remember(self, list gens, str key, object res) except -1:
        """Memoise ``res`` for window ``key`` in the young generation of ``gens``.

        A generation holds at most memo_size / 2 windows and memo_chars / 2 characters of
        them: windows of long tokens (a base64 blob in a caption) fill it by characters long
        before the count, so the memo stays a few MB whatever the captions hold."""
        cdef Py_ssize_t half = self.memo_size >> 1
        cdef Py_ssize_t kc = len(key)
        cdef list g
        cdef dict young, old
        if half == 0:  # no room for two generations: emptied when full
            if self.memo_n >= self.memo_size or (
                    self.memo_n and self.young_chars + kc > self.memo_chars):
                for g in self.memos.values():
                    (<dict>g[0]).clear()
                self.memo_n = 0
                self.young_chars = 0
        elif self.memo_n >= half or (
                self.memo_n and self.young_chars + kc > (self.memo_chars >> 1)):
            for g in self.memos.values():
                young = g[0]
                old = g[1]
                old.clear()
                g[0] = old
                g[1] = young
            self.old_n = self.memo_n
            self.old_chars = self.young_chars
            self.memo_n = 0
            self.young_chars = 0
        (<dict>gens[0])[key] = res
        self.memo_n += 1
        self.young_chars += kc
        return 0

    cdef int64_t gram_id(self, uint64_t code) noexcept:
        cdef uint64_t h = (code * HASH_MUL) >> 32
        cdef uint64_t slot = h & self.mask
        cdef uint64_t entry
        cdef int64_t t
        while True:
            entry = self.table[slot]
            if entry == 0:
                return -1
            if (entry >> 32) == h:
                t = <int64_t>(entry & 0xFFFFFFFFULL) - 1
                if self.codes[t] == code:
                    return t
            slot = (slot + 1) & self.mask

    cdef int _bounds(self, int mcode, str measure, double alpha, int x, int* lo, int* hi,
                     int* tau) except -1:
        """(lo, hi, τ_min) of ``approximate.search_bounds``, asked once per query size."""
        cdef tuple b
        cdef Py_ssize_t k
        if mcode != self.cur_mcode or alpha != self.cur_alpha:
            self.b_lo.clear()
            self.b_hi.clear()
            self.b_tau.clear()
            self.cur_mcode = mcode
            self.cur_alpha = alpha
        if <Py_ssize_t>self.b_lo.size() <= x:
            k = x + 16
            self.b_lo.resize(k, -2)
            self.b_hi.resize(k, -2)
            self.b_tau.resize(k, -2)
        if self.b_lo[x] == -2:
            b = self.bounds(measure, alpha, x)
            self.b_hi[x] = b[1] if b[1] < MAX_SIZE else MAX_SIZE
            self.b_tau[x] = b[2]
            self.b_lo[x] = b[0]
        lo[0] = self.b_lo[x]
        hi[0] = self.b_hi[x]
        tau[0] = self.b_tau[x]
        return 0

    cdef int _search(self, vector[int64_t]& gids, int measure, double alpha, int lo, int hi,
                     int tau_min, vector[ApproxHit]& out) except -1:
        """Every key at similarity ≥ alpha − 1e-12 with the query whose trigram numbers are
        ``gids`` (-1: a trigram no key has), ranked, into ``out``."""
        cdef int x = <int>gids.size()
        cdef double floor = alpha - 1e-12
        cdef vector[GramCursor]* curs = &self.curs
        cdef vector[ApproxRun]* runs = &self.runs
        cdef vector[ApproxCand]* cands = &self.cands
        cdef const uint32_t* keys = &self.keys[0] if self.keys.shape[0] else NULL
        cdef GramCursor cur
        cdef GramCursor* cp
        cdef int64_t g, a, b, mid
        cdef int k, m, y, need, yi, present, mc, zlo, zhi, zn
        cdef Py_ssize_t i, nc
        cdef int64_t sbase
        cdef uint64_t zo
        cdef uint32_t ny, zl, zh
        cdef ApproxHit hit
        out.clear()
        if x == 0 or x - tau_min + 1 <= 0:
            return 0
        if hi > MAX_SIZE:
            hi = MAX_SIZE
        if lo < 1:
            lo = 1
        if lo > hi:
            return 0
        # a key shares only trigrams some key has: too few of those, and nothing can match
        # (most caption windows stop here, before any list is read)
        present = 0
        for k in range(x):
            if gids[k] >= 0:
                present += 1
        if present < tau_min:
            return 0
        # each present trigram's directory, cut to the sizes [lo, hi]
        curs.clear()
        for k in range(x):
            g = gids[k]
            if g < 0:
                continue
            cur.base = <int64_t>self.offsets[g]
            cur.lend = <int64_t>self.offsets[g + 1]
            a = <int64_t>self.dir_offsets[g]
            cur.dend = <int64_t>self.dir_offsets[g + 1]
            b = cur.dend
            while a < b:  # first run of size ≥ lo
                mid = (a + b) >> 1
                if self.dir_size[mid] < lo:
                    a = mid + 1
                else:
                    b = mid
            cur.e = a
            cur.cls = self.classes[g]
            b = cur.dend
            while a < b:  # first run of size > hi
                mid = (a + b) >> 1
                if self.dir_size[mid] <= hi:
                    a = mid + 1
                else:
                    b = mid
            cur.db = a
            if cur.e < cur.db:
                cur.span = ((<int64_t>self.dir_start[cur.db] if cur.db < cur.dend
                             else cur.lend - cur.base) - <int64_t>self.dir_start[cur.e])
                curs.push_back(cur)
        # the trigrams by their postings over the sizes searched: at each size their runs
        # then come nearly shortest first, and are read in that order
        approx_sort_cursors(curs[0])
        # one key size at a time, ascending: the overlap a key needs depends on its size, so
        # each size reads only as many of its runs as its own need allows
        need = tau_min
        while True:
            y = MAX_SIZE + 1
            for k in range(<int>curs.size()):
                if curs[0][k].e < curs[0][k].db:
                    yi = self.dir_size[curs[0][k].e]
                    if yi < y:
                        y = yi
            if y > MAX_SIZE:
                break
            runs.clear()
            mc = 0
            for k in range(<int>curs.size()):
                cp = &curs[0][k]
                if cp.e < cp.db and self.dir_size[cp.e] == y:
                    a = cp.base + self.dir_start[cp.e]
                    b = cp.base + self.dir_start[cp.e + 1] if cp.e + 1 < cp.dend else cp.lend
                    approx_push_run(runs[0], a, b)
                    mc += <int>cp.cls
                    cp.e += 1
            m = <int>runs.size()
            # the least overlap reaching the threshold at this size, never below τ_min
            # (which bounds every size); it only grows with the size (at a given overlap a
            # key's similarity falls as the key grows), so it is searched from the last one
            while need <= x and sim_of(measure, need, x, y) < floor:
                need += 1
            if need > present:  # no key of this size or a larger one can match
                break
            if need > m:  # fewer of the query's trigrams have keys of this size
                continue
            # the keys of this size with `need` of the m runs, counted exactly
            # (ApproxCounter.search: the pigeonhole over the first runs, then the others);
            # postings are the size's local numbers, [0, ny)
            if (y + 1 >= <int>self.size_offsets.shape[0]
                    or self.size_offsets[y] > self.size_offsets[y + 1]
                    or self.size_offsets[y + 1] > <uint64_t>self.size_keys.shape[0]):
                raise ValueError(f"trigram_size_offsets does not cover the keys of size {y} "
                                 "that the trigram lists hold; rebuild the index")
            sbase = <int64_t>self.size_offsets[y]
            ny = <uint32_t>(<int64_t>self.size_offsets[y + 1] - sbase)
            # the second filter (trigram_index): a key of this size with z of its trigrams in
            # the class C shares at most min(z, mc) + min(y - z, m - mc) with the query, so
            # only need - (m - mc) <= z <= y + mc - need can reach `need`: one range of local
            # numbers, to which the counted runs are cut (the later runs are read against the
            # survivors, all in it)
            if (y + 1 >= <int>self.zc_offsets.shape[0]
                    or self.zc_offsets[y] >= self.zc_offsets[y + 1]
                    or self.zc_offsets[y + 1] > <uint64_t>self.zc_starts.shape[0]):
                raise ValueError(f"trigram_zc_offsets does not cover the keys of size {y}; "
                                 "rebuild the index")
            zo = self.zc_offsets[y]
            zn = <int>(self.zc_offsets[y + 1] - zo)  # z = 0 .. zn - 2, and the size's end
            zlo = need - (m - mc)
            zhi = y + mc - need
            if zlo < 0:
                zlo = 0
            if zhi > zn - 2:
                zhi = zn - 2
            if zlo > zhi:
                continue
            zl = self.zc_starts[zo + zlo]
            zh = self.zc_starts[zo + zhi + 1]
            if zh > ny:
                zh = ny
            if zl >= zh:
                continue
            if zl > 0 or zh < ny:
                approx_cut_runs(keys, runs.data(), approx_counted_runs(m, need), zl, zh)
            self.counter.search(keys, runs.data(), m, need, ny, cands[0])
            nc = <Py_ssize_t>cands.size()
            for i in range(nc):  # each has at least `need` of the runs
                if cands[0][i].kid >= ny:
                    raise ValueError(f"a trigram list holds a key number that keys of "
                                     f"size {y} do not have; rebuild the index")
                hit.sim = sim_of(measure, cands[0][i].count, x, y)
                if hit.sim >= floor:
                    hit.size = <uint32_t>y
                    hit.kid = self.size_keys[sbase + cands[0][i].kid]
                    out.push_back(hit)
        if cands.capacity() > APPROX_RELEASE:  # a huge query's scratch is not kept
            self.cands = vector[ApproxCand]()
        if out.size() > 1:
            approx_sort_hits(out)
        return 0

    cdef int _query(self, str query, vector[int64_t]& gids) except -1:
        """Trigram numbers of ``query``'s distinct grams (no padding; a short string is its
        own gram), into ``gids``."""
        cdef Py_ssize_t n = len(query), p
        cdef vector[uint64_t] codes
        cdef uint64_t prev = 0
        gids.clear()
        if n == 0:
            return 0
        if n < 3:
            if n == 2:
                codes.push_back(SHORT | ((<uint64_t>2) << 42)
                                | ((<uint64_t>query[0]) << 21) | <uint64_t>query[1])
            else:
                codes.push_back(SHORT | ((<uint64_t>1) << 42) | ((<uint64_t>query[0]) << 21))
        else:
            for p in range(n - 2):
                codes.push_back(code3(query[p], query[p + 1], query[p + 2]))
            approx_sort_u64(codes)
        for p in range(<Py_ssize_t>codes.size()):
            if p and codes[p] == prev:
                continue
            prev = codes[p]
            gids.push_back(self.gram_id(prev))
        return 0

    def search(self, str query not None, str measure not None, double alpha):
        """Every key at similarity ≥ ``alpha`` with ``query``: (key number, similarity),
        best first (the reference's ``TrigramIndex.search``)."""
        cdef vector[int64_t] gids
        cdef vector[ApproxHit] hits
        cdef int mcode, lo, hi, tau
        self._query(query, gids)
        if gids.size() == 0:
            return []
        mcode = MEASURES.get(measure, -1)
        self._bounds(mcode, measure, alpha, <int>gids.size(), &lo, &hi, &tau)
        self._search(gids, mcode, alpha, lo, hi, tau, hits)
        return [(hits[i].kid, hits[i].sim) for i in range(<Py_ssize_t>hits.size())]

    cdef tuple _best(self, vector[int64_t]& gids, int mcode, str measure, double alpha):
        cdef vector[ApproxHit] hits
        cdef int lo, hi, tau
        cdef double top
        cdef Py_ssize_t i
        cdef list res
        self._bounds(mcode, measure, alpha, <int>gids.size(), &lo, &hi, &tau)
        self._search(gids, mcode, alpha, lo, hi, tau, hits)
        if hits.size() == 0:
            return ()
        top = hits[0].sim
        res = []
        for i in range(<Py_ssize_t>hits.size()):
            if hits[i].sim < top - 1e-12:
                break
            res.append((hits[i].kid, self.key_string(hits[i].kid), hits[i].sim))
        return tuple(res)

    def scan(self, str text not None, list norms not None, list starts not None,
             list ends not None, list covered not None, str measure not None, double alpha):
        """The best key(s) of every window of a caption: (start token, end token, key number,
        key, similarity), in window order — the windows of ``ApproximateMatcher.match``."""
        cdef Py_ssize_t n = len(norms), i, j, lim, t, p, q, ws, we, chars
        cdef int mcode, d_lo, d_hi, d_tau
        cdef str joined, key, tok
        cdef vector[Py_ssize_t] tok_off
        cdef vector[uint64_t] pos_code
        cdef vector[int64_t] pos_gid
        cdef vector[pair[uint64_t, int64_t]] grams
        cdef vector[int64_t] gids
        cdef uint64_t prev
        cdef list gens
        cdef object res
        cdef frozenset stop = self.stopwords
        cdef list out = []
        cdef Py_ssize_t left, right
        if n == 0:
            return out
        # validates the measure as the reference does (ExtractionError for an unknown one)
        mcode = MEASURES.get(measure, -1)
        self._bounds(mcode, measure, alpha, 1, &d_lo, &d_hi, &d_tau)
        gens = self.memos.get((mcode, alpha))
        if gens is None:
            gens = self.memos[(mcode, alpha)] = [{}, {}]
        joined = u" ".join(norms)
        tok_off.resize(n + 1)
        t = 0
        for i in range(n):
            tok_off[i] = t
            t += len(<str>norms[i]) + 1
        tok_off[n] = t
        ws = len(joined)
        pos_code.resize(ws if ws > 2 else 1)
        pos_gid.assign(ws if ws > 2 else 1, -2)
        for p in range(ws - 2):
            pos_code[p] = code3(joined[p], joined[p + 1], joined[p + 2])
        for i in range(n):
            tok = <str>norms[i]
            if covered[i] or tok in stop:
                continue
            chars = len(tok)
            lim = i + self.window
            if lim > n:
                lim = n
            for j in range(i + 1, lim + 1):
                if j > i + 1:
                    if covered[j - 1]:
                        break
                    left = ends[j - 2]
                    right = starts[j - 1]
                    if (right - left != 1 or text[left] != u" ") and not \
                            self.break_chars.isdisjoint(text[left:right]):
                        break
                    tok = <str>norms[j - 1]
                    chars += len(tok)
                else:
                    tok = <str>norms[i]
                if tok in stop or chars < self.min_chars:
                    continue
                ws = tok_off[i]
                we = tok_off[j - 1] + len(tok)
                key = joined[ws:we]
                res = (<dict>gens[0]).get(key)
                if res is None:
                    res = (<dict>gens[1]).get(key)
                    if res is not None:
                        self._remember(gens, key, res)
                if res is None:
                    if we - ws < 3:
                        self._query(key, gids)
                    else:
                        grams.clear()
                        for p in range(ws, we - 2):
                            if pos_gid[p] == -2:
                                pos_gid[p] = self.gram_id(pos_code[p])
                            grams.push_back(pair[uint64_t, int64_t](pos_code[p], pos_gid[p]))
                        approx_sort_pairs(grams)
                        gids.clear()
                        for q in range(<Py_ssize_t>grams.size()):
                            if q and grams[q].first == prev:
                                continue
                            prev = grams[q].first
                            gids.push_back(grams[q].second)
                    res = self._best(gids, mcode, measure, alpha)
                    self.searches += 1
                    self._remember(gens, key, res)
                for hit in <tuple>res:
                    out.append((i, j, hit[0], hit[1], hit[2]))
        return out
