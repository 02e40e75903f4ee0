# cython: language_level=3, initializedcheck=False
# cython: cdivision=True, infer_types=False
"""Compiled hot path of the extraction engine (Cython).

The pure-Python modules (``normalize``, ``matcher``, ``abbreviations``, ``negation``,
``profile``, ``extractor``) are the reference: they define what the engine does. This module
runs the same steps for one caption with the interpreter out of the loop — tokenising and
normalising ASCII tokens, matching over a trie of token ids, caption definitions
(Schwartz–Hearst), overlap resolution, negation scopes and profiles all in C, candidates as
plain tuples, mentions built without their dataclass ``__init__`` — and calls back into the
Python modules only for what is rare (normalising a non-ASCII token, a key's check rules on
first use, surface case checks, ambiguous spans, approximate matching). A key's postings are
filtered over the index's memory-mapped arrays (:class:`PostingFilter`): no ``Posting`` object
is built but for the concepts kept.

One source of the rules: this module holds no rule constant of its own. Character sets,
lengths, windows and tables are handed over at construction by the module that owns them
(``normalize`` builds :class:`AsciiNormalizer` and :class:`SpanTokenizer`, ``abbreviations``
builds :class:`DefinitionFinder`) or read through the public accessors of the object mirrored
(``ExactMatcher.key_trie``/``crossed_postings``/``break_chars``, ``matcher.posting_checks``,
``NegationDetector.phrase_table``/``trigger_words``/..., ``Profile.slots``/``phrase_table``);
what an inner loop tests is copied once into C tables (:c:type:`CharSet`, the mark ranges).
``_speedups.pyi`` types what Python calls.

Equivalence with the reference is a test (``tests/test_speedups.py``, which runs
``Extractor(index, engine="compiled")`` against ``engine="reference"``): the same annotations
for every demo caption under many option sets and for generated captions, the same tokens for
every code point and random Unicode. ``CONCEPTSVC_PURE_PYTHON=1`` turns this module off.
"""

cimport cython
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport Py_UNICODE_ISALNUM, Py_UNICODE_ISUPPER

from cpython.ref cimport Py_XDECREF, Py_XINCREF
from libc.stdint cimport int8_t, int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort
from libc.string cimport memcmp, memcpy, memset


cdef extern from "Python.h":
    # Python 3.11 still has "legacy" strings (made by the deprecated Py_UNICODE API) whose
    # length is 0 and data NULL until PyUnicode_READY: every entry point that reads a caption's
    # code units or sizes an array from its length readies it first (a no-op on other strings).
    int _uready "PyUnicode_READY"(object o) except -1
    int _ukind "PyUnicode_KIND"(object o)
    void *_udata "PyUnicode_DATA"(object o)
    Py_UCS4 _uread "PyUnicode_READ"(int kind, void *data, Py_ssize_t index) nogil


cdef extern from *:
    """
    /* Set one __slots__ field through its member descriptor: what object.__setattr__ does for
       a frozen dataclass, without the attribute lookup. */
    static int __cs_set_slot(PyObject *descr, PyObject *obj, PyObject *value) {
        return Py_TYPE(descr)->tp_descr_set(descr, obj, value);
    }
    """
    int _set_slot "__cs_set_slot"(object descr, object obj, object value) except -1


# -- tokenisation ------------------------------------------------------------------------------

# -- character sets handed over by the Python modules -------------------------------------------

cdef enum:
    _CHARSET_OTHER = 16     # code points beyond ASCII a CharSet holds
    _MAX_MARK_RANGES = 32   # combining-mark ranges of TokenRules

# A set of code points filled once from a Python constant: a bitmap for ASCII (a probe is one
# shift), and a short list for the others.
cdef struct CharSet:
    uint64_t ascii[2]
    Py_UCS4 other[_CHARSET_OTHER]
    int n_other


cdef int _charset_init(CharSet *cs, object chars, str name) except -1:
    cdef uint32_t c
    memset(cs, 0, sizeof(CharSet))
    for ch in chars:
        if not isinstance(ch, str) or len(ch) != 1:
            raise TypeError(f"{name} must hold single characters, not {ch!r}")
        c = ord(ch)
        if c < 128:
            cs.ascii[c >> 6] |= (<uint64_t>1) << (c & 63)
        elif cs.n_other == _CHARSET_OTHER:
            raise ValueError(f"{name}: at most {_CHARSET_OTHER} characters beyond ASCII")
        else:
            cs.other[cs.n_other] = c
            cs.n_other += 1
    return 0


cdef inline bint _charset_has(const CharSet *cs, Py_UCS4 ch) noexcept:
    cdef uint32_t c = <uint32_t>ch  # (Py_UCS4 arithmetic would make str)
    cdef int k
    if c < 128:
        return (cs.ascii[c >> 6] >> (c & 63)) & 1
    for k in range(cs.n_other):
        if cs.other[k] == ch:
            return True
    return False


cdef inline bint _gap_has(str text, Py_ssize_t left, Py_ssize_t right,
                          const CharSet *chars) noexcept:
    """The gap text[left:right] between two tokens is not one space and holds one of
    ``chars`` (``matcher.crosses_break``; negation's scope and trigger-phrase breaks)."""
    cdef Py_ssize_t k
    if right - left == 1 and text[left] == u" ":
        return False
    for k in range(left, right):
        if _charset_has(chars, text[k]):
            return True
    return False


# -- tokenisation ------------------------------------------------------------------------------

# normalize's token rules beyond [^\W_]: its combining-mark ranges (part of a word) and its
# apostrophes (join two words), handed to SpanTokenizer.
cdef struct TokenRules:
    Py_UCS4 marks[_MAX_MARK_RANGES][2]
    int n_marks
    Py_UCS4 mark_min               # no code point below it is a mark
    CharSet apostrophes


cdef int _token_rules_init(TokenRules *r, object marks, object apostrophes) except -1:
    cdef Py_UCS4 lo, hi
    memset(r, 0, sizeof(TokenRules))
    r.mark_min = 0x10FFFF
    for lo, hi in marks:
        if r.n_marks == _MAX_MARK_RANGES:
            raise ValueError(f"marks: at most {_MAX_MARK_RANGES} ranges")
        if hi < lo:
            raise ValueError(f"marks: empty range {lo:#x}-{hi:#x}")
        r.marks[r.n_marks][0] = lo
        r.marks[r.n_marks][1] = hi
        r.n_marks += 1
        if lo < r.mark_min:
            r.mark_min = lo
    _charset_init(&r.apostrophes, apostrophes, "apostrophes")
    return 0


cdef inline bint _is_word(Py_UCS4 c) noexcept:
    """``[^\\W_]`` of Python's ``re`` for str patterns: an alphanumeric code point."""
    if c < 128:
        return (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122)
    return Py_UNICODE_ISALNUM(c)


cdef inline bint _is_mark(const TokenRules *r, Py_UCS4 c) noexcept:
    cdef int k
    if c < r.mark_min:
        return False
    for k in range(r.n_marks):
        if r.marks[k][0] <= c <= r.marks[k][1]:
            return True
    return False


# -- normalisation of ASCII tokens --------------------------------------------------------------

@cython.auto_pickle(False)
cdef class AsciiNormalizer:
    """``normalize.normalize_token`` for tokens of ASCII letters, digits and apostrophes (what
    the tokeniser cuts from ASCII text), with the reference's own tables and rules, handed
    over by ``normalize``; everything else — and any word with a British stem marker
    ("ae"/"oe", whose stems are a regular expression) — goes to the reference function.
    ``tests/test_speedups.py`` checks the two agree on every token of the demo dictionary and
    captions, on every short token and on random words."""

    cdef object reference
    cdef dict british, irregular
    cdef frozenset not_plural
    cdef tuple stem_markers
    cdef tuple suffixes      # (endings, shortest, dropped, appended, stem must be not-plural)
    cdef Py_ssize_t never_singular_len, acronym_min_letters

    def __init__(self, reference, *, dict british_words not None, british_stem_markers,
                 dict irregular_plurals not None, frozenset not_plural not None,
                 Py_ssize_t never_singular_len, plural_suffixes,
                 Py_ssize_t acronym_min_letters):
        self.reference = reference
        self.british = british_words
        self.stem_markers = tuple([<str>m for m in british_stem_markers])
        self.irregular = irregular_plurals
        self.not_plural = not_plural
        self.never_singular_len = never_singular_len
        self.suffixes = tuple([
            (tuple(endings), <Py_ssize_t>shortest, <Py_ssize_t>dropped, <str>appended,
             bool(stem_not_plural))
            for endings, shortest, dropped, appended, stem_not_plural in plural_suffixes
        ])
        self.acronym_min_letters = acronym_min_letters

    def __call__(self, str raw):
        return self.normalize(raw)

    cpdef str normalize(self, str raw):
        if raw is None:
            raise TypeError("raw must be a str, not None")
        cdef Py_ssize_t n = len(raw), k, alpha = 0
        cdef Py_UCS4 c
        cdef bint upper = False, lower = False, apostrophe = False
        cdef str text, orig = raw, marker
        cdef object hit
        if n == 0 or not raw.isascii():
            return self.reference(raw)
        for k in range(n):
            c = raw[k]
            if c == u"'":
                apostrophe = True
            elif not (u"0" <= c <= u"9" or u"a" <= c <= u"z" or u"A" <= c <= u"Z"):
                return self.reference(orig)
        # an acronym's plural: "CTs" → "CT" (raw[:-1].isupper(), acronym_min_letters letters)
        if n > self.acronym_min_letters and raw[n - 1] == u"s":
            for k in range(n - 1):
                c = raw[k]
                if u"A" <= c <= u"Z":
                    upper = True
                    alpha += 1
                elif u"a" <= c <= u"z":
                    lower = True
                    alpha += 1
            if upper and not lower and alpha >= self.acronym_min_letters:
                raw = raw[:n - 1]
        text = raw.lower()  # NFKC and casefold are the identity / lower() on ASCII
        if apostrophe:
            if text.endswith(u"'s"):
                text = text[:len(text) - 2]
            text = text.replace(u"'", u"")
        for marker in self.stem_markers:
            if marker in text:
                return self.reference(orig)
        hit = self.british.get(text)
        if hit is not None:
            text = <str>hit
        return self._singular(text)

    cdef str _singular(self, str word):
        """``normalize._singular``, over its suffix table."""
        cdef object hit = self.irregular.get(word)
        cdef Py_ssize_t n = len(word)
        cdef tuple rule
        cdef str stem
        if hit is not None:
            return <str>hit
        if n <= self.never_singular_len or word in self.not_plural or not word.isalpha():
            return word
        for rule in self.suffixes:
            if n >= <Py_ssize_t>rule[1] and word.endswith(<tuple>rule[0]):
                stem = word[:n - <Py_ssize_t>rule[2]]
                if rule[4] and stem not in self.not_plural:
                    continue
                return stem + <str>rule[3]
        return word


# -- the dictionary's key trie -----------------------------------------------------------------

cdef object _crc32 = __import__("zlib").crc32


cdef class _MappedTable:
    """The number of a string in one of the index's mapped, hashed string tables: the probe of
    ``index._StringTable.find`` (the reference) in C, on the layout
    ``_IdMap.hashed_layout`` hands over (slots ``crc32 << 32 | number + 1``, linear probing,
    0 empty; string ``i`` is ``blob[off[i]:off[i + 1] - 1]``)."""

    cdef const uint8_t[::1] blob
    cdef const uint64_t[::1] off
    cdef const uint64_t[::1] tab
    cdef uint64_t mask

    def __init__(self, blob, off, tab):
        self.blob = blob
        self.off = off
        self.tab = tab
        self.mask = <uint64_t>len(tab) - 1

    cdef Py_ssize_t find(self, str s) except -2:
        cdef bytes e = s.encode("utf-8")
        cdef Py_ssize_t n = len(e)
        cdef const char *p = e
        cdef uint64_t h = <uint64_t>_crc32(e)
        cdef uint64_t slot = h & self.mask, entry, i, a, b
        while True:
            entry = self.tab[slot]
            if entry == 0:
                return -1
            if (entry >> 32) == h:
                i = (entry & 0xFFFFFFFF) - 1
                a = self.off[i]
                b = self.off[i + 1] - 1
                if <Py_ssize_t>(b - a) == n and (
                    n == 0 or memcmp(&self.blob[a], p, n) == 0
                ):
                    return <Py_ssize_t>i
            slot = (slot + 1) & self.mask


@cython.auto_pickle(False)
cdef class _Vocab:
    """Token → number for a family of tries: the index's tokens first (``lookup``, a Mapping
    over the index's mapped token table, or ``base``, its materialised dict for small
    indexes), then tokens only other tries know (profile phrases), numbered from ``n_base``
    on. A token no trie knows is -1. Looked up once per new surface form (the token table
    caches the number), so the lookup is first-use work only; a mapped table that offers its
    layout (``_IdMap.hashed_layout``) is probed in C (:class:`_MappedTable`)."""

    cdef dict base
    cdef object lookup
    cdef _MappedTable mapped  # the lookup's table probed in C, when it offers its layout
    cdef dict extra
    cdef Py_ssize_t n_base

    def __init__(self, lookup=None, dict base=None, Py_ssize_t n_base=0):
        self.lookup = lookup
        self.base = base
        self.extra = {}
        self.n_base = n_base
        self.mapped = None
        layout = getattr(lookup, "hashed_layout", None) if base is None else None
        if layout is not None:
            layout = layout()
            if layout is not None:
                self.mapped = _MappedTable(*layout)

    cdef int32_t find(self, object tok) except -2:
        cdef PyObject *hit
        cdef object v
        cdef Py_ssize_t i
        if self.base is not None:
            hit = PyDict_GetItem(self.base, tok)
            if hit is not NULL:
                return <int32_t><object>hit
        elif self.mapped is not None and type(tok) is str:
            i = self.mapped.find(<str>tok)
            if i >= 0:
                return <int32_t>i
        elif self.lookup is not None:
            v = self.lookup.get(tok)
            if v is not None:
                return <int32_t>v
        hit = PyDict_GetItem(self.extra, tok)
        return -1 if hit is NULL else <int32_t><object>hit

    cdef int32_t add(self, str tok) except -2:
        cdef int32_t tid = self.find(tok)
        if tid < 0:
            tid = <int32_t>(self.n_base + len(self.extra))
            self.extra[tok] = tid
        return tid


cdef inline uint64_t _edge_slot(uint64_t key) noexcept:
    # index.trie_slot computes the same mix when the index build places the edges
    key ^= key >> 29
    key *= <uint64_t>0xbf58476d1ce4e5b9ULL
    key ^= key >> 32
    return key


@cython.auto_pickle(False)
cdef class _KeyTrie:
    """A set of phrases (space-joined token strings) as a trie over token numbers: extending a
    window by one token is one probe of a C hash table, with no string built and no dict
    lookup. Edge ``(parent + 1) << 32 | (token + 1)`` → child node, open addressing; node 0 is
    the root.

    Two kinds: the index's own trie, memory-mapped from the index directory (built by
    ``conceptsvc index build``; ``node_keys[node]`` is the key id a node spells, or -1), made
    by :func:`_mapped_trie`; and small tries built here from a dict (profiles' evidence
    phrases, ``values[node]`` their value), made by :func:`_trie_of`. Token numbers come from a
    shared :class:`_Vocab`.
    """

    cdef uint64_t *keys
    cdef uint32_t *children
    cdef const int32_t *node_keys   # mapped tries only
    cdef bint owned                 # keys/children allocated here (freed on dealloc)
    cdef object buffers             # the mapped arrays' views, kept alive
    cdef uint64_t mask
    cdef _Vocab vocab
    cdef list values                # built tries only
    cdef int32_t n_nodes

    def __dealloc__(self):
        if self.owned:
            free(self.keys)
            free(self.children)

    cdef int32_t child(self, int32_t node, int32_t tid) noexcept:
        cdef uint64_t key = ((<uint64_t>node + 1) << 32) | (<uint64_t>tid + 1)
        cdef uint64_t k = _edge_slot(key) & self.mask
        while self.keys[k]:
            if self.keys[k] == key:
                # (a child past the last node is a damaged index loaded unverified: no edge)
                if self.children[k] >= <uint32_t>self.n_nodes:
                    return -1
                return <int32_t>self.children[k]
            k = (k + 1) & self.mask
        return -1

    cdef void _insert(self, int32_t node, int32_t tid, int32_t child) noexcept:
        cdef uint64_t key = ((<uint64_t>node + 1) << 32) | (<uint64_t>tid + 1)
        cdef uint64_t k = _edge_slot(key) & self.mask
        while self.keys[k]:
            k = (k + 1) & self.mask
        self.keys[k] = key
        self.children[k] = <uint32_t>child

    cdef int32_t token_id(self, object norm) except -2:
        return self.vocab.find(norm)


cdef _KeyTrie _trie_of(dict entries, _Vocab vocab):
    """A trie built from ``entries``: every phrase *and every token-prefix of one* → its value,
    or None for a prefix that is not itself a phrase; new tokens join ``vocab``."""
    cdef _KeyTrie t = _KeyTrie.__new__(_KeyTrie)
    cdef Py_ssize_t size = 16, n_edges = len(entries) + 1
    cdef int32_t node, child, tid
    cdef str p, tok
    while size < 2 * n_edges:
        size <<= 1
    t.mask = size - 1
    t.keys = <uint64_t *>calloc(size, sizeof(uint64_t))
    t.children = <uint32_t *>calloc(size, sizeof(uint32_t))
    t.owned = True
    if t.keys is NULL or t.children is NULL:
        raise MemoryError()
    t.vocab = vocab
    t.values = [None]
    t.n_nodes = 1
    for p, value in entries.items():
        node = 0
        for tok in p.split(u" "):
            tid = vocab.add(tok)
            child = t.child(node, tid)
            if child < 0:
                child = t.n_nodes
                t.n_nodes += 1
                t.values.append(None)
                t._insert(node, tid, child)
            node = child
        if value is not None:
            t.values[node] = value
    return t


cdef _KeyTrie _mapped_trie(object key_trie, _Vocab vocab):
    """The index's trie (``index.KeyTrie``), read in place from its memory-mapped arrays."""
    cdef const uint64_t[::1] keys = key_trie.edge_keys
    cdef const uint32_t[::1] children = key_trie.edge_child
    cdef const int32_t[::1] node_keys = key_trie.node_key
    cdef Py_ssize_t size = keys.shape[0]
    if size < 8 or size & (size - 1) or children.shape[0] != size or node_keys.shape[0] < 1:
        raise ValueError("the index's token trie has impossible sizes")
    cdef _KeyTrie t = _KeyTrie.__new__(_KeyTrie)
    t.keys = <uint64_t *>&keys[0]  # never written: only _trie_of's tries insert
    t.children = <uint32_t *>&children[0]
    t.node_keys = &node_keys[0]
    t.owned = False
    t.buffers = (keys, children, node_keys)
    t.mask = size - 1
    t.vocab = vocab
    t.n_nodes = <int32_t>node_keys.shape[0]
    return t


# -- the extractor's token table --------------------------------------------------------------

cdef struct TokEntry:           # 64 bytes: one cache line per probe
    uint64_t hash                # 0: empty slot
    int32_t length               # code points of the surface form
    int32_t tid                  # the key trie's id of norm, or -1 when no key has that token
    int32_t node                 # the trie node of the one-token window norm, or -1
    int32_t short_ascii          # 1 when ``chars`` holds the whole (ASCII) surface form
    PyObject *raw                # the surface form (owned)
    PyObject *norm               # its normalised form, possibly "" (owned)
    char chars[24]               # the surface form itself, when short_ascii


cdef inline uint64_t _mix(uint64_t h, Py_UCS4 c) noexcept:
    return (h ^ <uint64_t>c) * <uint64_t>0x100000001b3ULL  # FNV-1a over code points


@cython.auto_pickle(False)
cdef class _TokenTable:
    """Surface form → (normalised form, key-trie token), probed by the code points of the
    caption itself: a token seen before costs one probe, no string object and no dict lookup.

    Open addressing; cleared when it holds ``max_entries`` forms or its forms (surface and
    normalised) would pass ``max_chars`` characters (a bounded cache: distinct long tokens,
    a base64 blob in a caption, cannot grow it by kilobytes an entry up to the count). Every
    Python call (normalising a new form) happens before the table is touched, so a thread
    switch in the middle of it never sees a half-updated table.
    """

    cdef TokEntry *slots
    cdef Py_ssize_t mask, used, max_entries, chars, max_chars
    cdef object normalize
    cdef _KeyTrie trie
    cdef TokenRules rules    # set by the owner (SpanTokenizer, FastPath) before any scan

    def __cinit__(self, normalize, _KeyTrie trie, Py_ssize_t max_entries=1 << 17,
                  Py_ssize_t max_chars=1 << 22):
        self.normalize = normalize
        self.trie = trie
        self.max_entries = max_entries
        self.max_chars = max_chars
        self.chars = 0
        self.mask = (1 << 12) - 1
        self.used = 0
        self.slots = <TokEntry *>calloc(self.mask + 1, sizeof(TokEntry))
        if self.slots is NULL:
            raise MemoryError()

    def __dealloc__(self):
        self._release(self.slots, self.mask + 1)
        free(self.slots)

    def __len__(self):
        return self.used

    cdef void _release(self, TokEntry *slots, Py_ssize_t size) noexcept:
        cdef Py_ssize_t k
        if slots is NULL:
            return
        for k in range(size):
            if slots[k].hash:
                Py_XDECREF(slots[k].raw)
                Py_XDECREF(slots[k].norm)

    cdef TokEntry *find(self, str text, Py_ssize_t s, Py_ssize_t e, uint64_t h) noexcept:
        cdef Py_ssize_t k = <Py_ssize_t>(h & <uint64_t>self.mask), q
        cdef TokEntry *t
        cdef int kind = _ukind(text), rkind
        cdef char *data = <char *>_udata(text)
        cdef void *rdata
        while True:
            t = &self.slots[k]
            if t.hash == 0:
                return NULL
            if t.hash == h and t.length == e - s:
                if t.short_ascii and kind == 1:
                    if memcmp(t.chars, data + s, e - s) == 0:
                        return t
                    k = (k + 1) & self.mask
                    continue
                rkind = _ukind(<object>t.raw)
                rdata = _udata(<object>t.raw)
                if rkind == kind:
                    if memcmp(rdata, data + s * kind, (e - s) * kind) == 0:
                        return t
                else:  # the surface form may be stored in a narrower kind than the caption
                    for q in range(e - s):
                        if _uread(rkind, rdata, q) != _uread(kind, data, s + q):
                            break
                    else:
                        return t
            k = (k + 1) & self.mask

    cdef TokEntry *add(self, str text, Py_ssize_t s, Py_ssize_t e, uint64_t h) except NULL:
        cdef str raw = text[s:e]
        cdef object norm = self.normalize(raw)  # Python code: may switch threads
        # (so may the token lookup of a large index, a Python Mapping: before the table too)
        cdef int32_t tid = self.trie.token_id(norm) if norm else -1
        cdef TokEntry *t = self.find(text, s, e, h)  # so probe again
        if t is not NULL:
            return t
        cdef Py_ssize_t cost = (e - s) + (len(<str>norm) if norm else 0)
        if self.used >= self.max_entries or (self.used and self.chars + cost > self.max_chars):
            self._release(self.slots, self.mask + 1)
            memset(self.slots, 0, (self.mask + 1) * sizeof(TokEntry))
            self.used = 0
            self.chars = 0
        elif 2 * (self.used + 1) > self.mask + 1:
            self._grow()
        cdef Py_ssize_t k = <Py_ssize_t>(h & <uint64_t>self.mask)
        while self.slots[k].hash:
            k = (k + 1) & self.mask
        t = &self.slots[k]
        t.hash = h
        t.length = e - s
        t.raw = <PyObject *>raw
        t.norm = <PyObject *>norm
        Py_XINCREF(t.raw)
        Py_XINCREF(t.norm)
        t.short_ascii = 0
        if _ukind(raw) == 1 and e - s <= 24 and raw.isascii():
            memcpy(t.chars, _udata(raw), e - s)
            t.short_ascii = 1
        t.tid = tid
        t.node = self.trie.child(0, tid) if tid >= 0 else -1
        self.used += 1
        self.chars += cost
        return t

    cdef int _grow(self) except -1:
        cdef Py_ssize_t size = 2 * (self.mask + 1), k, q
        cdef TokEntry *new = <TokEntry *>calloc(size, sizeof(TokEntry))
        if new is NULL:
            raise MemoryError()
        for k in range(self.mask + 1):
            if self.slots[k].hash:
                q = <Py_ssize_t>(self.slots[k].hash & <uint64_t>(size - 1))
                while new[q].hash:
                    q = (q + 1) & (size - 1)
                new[q] = self.slots[k]
        free(self.slots)
        self.slots = new
        self.mask = size - 1
        return 0


cdef int _scan_tokens(_TokenTable table, str text, list norms, list starts, list ends,
                      int32_t *tids, int32_t *nodes) except -1:
    """``normalize.tokenize_spans`` through a token table: appends each token's normalised
    form and offsets; unless NULL, ``tids[t]`` is token t's key-trie id and ``nodes[t]``
    the trie node of the window [t, t + 1) (or -1). ``text`` is ready (``_uready``)."""
    cdef Py_ssize_t n = len(text), i = 0, s, nt = 0
    cdef Py_UCS4 c, c2
    cdef uint64_t h
    cdef TokEntry *t
    cdef object norm
    cdef int kind = _ukind(text)
    cdef void *data = _udata(text)
    cdef const TokenRules *rules = &table.rules
    while i < n:
        c = _uread(kind, data, i)
        if not _is_word(c):
            i += 1
            continue
        if (nt & 4095) == 4095:
            _yield_gil()
        s = i
        h = _mix(0xcbf29ce484222325ULL, c)
        i += 1
        while True:
            while i < n:
                c = _uread(kind, data, i)
                if not (_is_word(c) or _is_mark(rules, c)):
                    break
                h = _mix(h, c)
                i += 1
            if i + 1 < n:
                c = _uread(kind, data, i)
                c2 = _uread(kind, data, i + 1)
                if _charset_has(&rules.apostrophes, c) and _is_word(c2):
                    h = _mix(_mix(h, c), c2)
                    i += 2
                    continue
            break
        if h == 0:
            h = 1
        t = table.find(text, s, i, h)
        if t is NULL:
            t = table.add(text, s, i, h)
        norm = <object>t.norm
        if norm:
            if tids is not NULL:
                tids[nt] = t.tid
                nodes[nt] = t.node
            nt += 1
            norms.append(norm)
            starts.append(s)
            ends.append(i)
    return 0


@cython.auto_pickle(False)
cdef class SpanTokenizer:
    """``normalize.tokenize_spans`` as one C loop (:func:`_scan_tokens`, the extractor's own
    scan); ``normalize_token`` is called once per new surface form (a bounded token table).
    ``marks`` (inclusive code-point ranges of combining marks) and ``apostrophes`` are
    ``normalize``'s; the extractor's :class:`FastPath` takes its rules from this object."""

    cdef _TokenTable table

    def __init__(self, normalize_token, *, marks, apostrophes, Py_ssize_t max_cache=1 << 18):
        self.table = _TokenTable(normalize_token, _trie_of({}, _Vocab()), max_cache)
        _token_rules_init(&self.table.rules, marks, apostrophes)

    def __call__(self, str text):
        return self.spans(text)

    cpdef tuple spans(self, str text):
        if text is None:
            raise TypeError("text must be a str, not None")
        if self.table is None:  # (SpanTokenizer.__new__ without __init__ crashed here)
            raise TypeError("SpanTokenizer was not initialised")
        _uready(text)
        cdef list norms = [], starts = [], ends = []
        _scan_tokens(self.table, text, norms, starts, ends, NULL, NULL)
        return norms, starts, ends


# -- small helpers -----------------------------------------------------------------------------

cdef inline void _yield_gil() noexcept:
    """Let other threads run. One caption is one C call that never releases the GIL, so on
    long texts (a 100k-character request) the loops call this every few thousand steps:
    a thread that has waited its switch interval then gets the GIL, as between bytecodes."""
    with nogil:
        pass


# -- caption definitions -----------------------------------------------------------------------

@cython.auto_pickle(False)
cdef class DefinitionFinder:
    """``abbreviations.find_definitions`` compiled, step for step, with that module's rules
    (handed over by it: ``abbreviations.fast_find_definitions``); ``definition_type`` is the
    result class ``abbreviations.Definition``."""

    cdef object Definition
    cdef Py_ssize_t max_definitions, min_short, max_short, max_short_words, look_back
    cdef Py_ssize_t lf_extra_words, lf_words_per_char
    cdef str clause_breaks, whitespace
    cdef tuple inner_cuts

    def __init__(self, definition_type, *, Py_ssize_t max_definitions,
                 Py_ssize_t min_short_len, Py_ssize_t max_short_len,
                 Py_ssize_t max_short_words, Py_ssize_t look_back, clause_breaks, inner_cuts,
                 Py_ssize_t long_form_extra_words, Py_ssize_t long_form_words_per_char,
                 whitespace):
        self.Definition = definition_type
        self.max_definitions = max_definitions
        self.min_short = min_short_len
        self.max_short = max_short_len
        self.max_short_words = max_short_words
        self.look_back = look_back
        self.clause_breaks = u"".join([<str>c for c in clause_breaks])
        self.inner_cuts = tuple([<str>c for c in inner_cuts])
        self.lf_extra_words = long_form_extra_words
        self.lf_words_per_char = long_form_words_per_char
        self.whitespace = u"".join([<str>c for c in whitespace])

    def __call__(self, str text not None):
        if self.Definition is None:
            raise TypeError("DefinitionFinder was not initialised")
        return _find_definitions(text, self)


cdef bint _valid_short(str sf, DefinitionFinder r):
    """``abbreviations._valid_short``."""
    cdef Py_ssize_t n = len(sf), k
    if not (r.min_short <= n <= r.max_short) or len(sf.split()) > r.max_short_words:
        return False
    if not Py_UNICODE_ISALNUM(sf[0]):
        return False
    for k in range(n):
        if Py_UNICODE_ISUPPER(sf[k]):
            return True
    return False


cdef inline bint _char_lower_eq(Py_UCS4 a, Py_UCS4 b) noexcept:
    """``a.lower() == b.lower()`` for ASCII code points."""
    cdef uint32_t x = <uint32_t>a, y = <uint32_t>b  # (Py_UCS4 arithmetic would make str)
    if 65 <= x <= 90:
        x += 32
    if 65 <= y <= 90:
        y += 32
    return x == y


cdef object _best_long_form(str sf, str lf, str whitespace):
    """``abbreviations._best_long_form`` (Schwartz–Hearst): start offset in ``lf`` of the
    shortest long form matching ``sf``, or None; its words end at ``whitespace``."""
    cdef Py_ssize_t s = len(sf) - 1, t = len(lf) - 1
    cdef Py_UCS4 sc
    cdef str c
    cdef bint ascii = sf.isascii() and lf.isascii()
    while s >= 0:
        sc = sf[s]
        if ascii:
            if not _is_word(sc):
                s -= 1
                continue
            while (t >= 0 and not _char_lower_eq(lf[t], sc)) or (
                s == 0 and t > 0 and _is_word(lf[t - 1])
            ):
                t -= 1
        else:  # str.lower() of one code point can be several: compare as strings
            c = sf[s:s + 1].lower()
            if not c.isalnum():
                s -= 1
                continue
            while (t >= 0 and lf[t:t + 1].lower() != c) or (
                s == 0 and t > 0 and lf[t - 1:t].isalnum()
            ):
                t -= 1
        if t < 0:
            return None
        t -= 1
        s -= 1
    while t >= 0:  # back to the start of the word
        sc = lf[t]
        if sc in whitespace:
            break
        t -= 1
    return t + 1


cdef list _find_definitions(str text, DefinitionFinder r):
    """``abbreviations.find_definitions``, step for step (``tests/test_speedups.py``)."""
    cdef list out = [], words, head, lf_words
    cdef Py_ssize_t pos = 0, open_, close, inner_start, lead, cut, left, n_words
    cdef Py_ssize_t k, sf_start
    cdef str inner, inner_s, before, cand, lf, sf, sep, tail
    cdef object rel
    cdef bint forward
    while len(out) < r.max_definitions:
        open_ = text.find(u"(", pos)
        if open_ < 0:
            return out
        close = text.find(u")", open_ + 1)
        if close < 0:
            return out
        pos = open_ + 1
        inner_start = open_ + 1
        inner = text[open_ + 1:close]
        if u"(" in inner:
            continue
        for sep in r.inner_cuts:
            cut = inner.find(sep)
            if cut >= 0:
                inner = inner[:cut]
        lead = len(inner) - len(inner.lstrip())
        inner_s = inner.strip()
        inner_start += lead
        forward = _valid_short(inner_s, r)
        if not forward:
            if len(inner_s) <= r.max_short and len(inner_s.split()) <= r.max_short_words:
                continue
            head = text[max(0, open_ - r.look_back):open_].split()
            if not head:
                continue
            sf = <str>head[len(head) - 1]
            if not _valid_short(sf, r) or sf.islower():
                continue
        left = -1
        for c in r.clause_breaks:
            k = text.rfind(c, 0, open_)
            if k > left:
                left = k
        left += 1
        before = text[left:open_].rstrip()
        if forward:
            n_words = min(len(inner_s) + r.lf_extra_words, r.lf_words_per_char * len(inner_s))
            words = before.split()
            if not words:
                continue
            cand = u" ".join(words[max(0, len(words) - n_words):])
            rel = _best_long_form(inner_s, cand, r.whitespace)
            if rel is None:
                continue
            lf = cand[<Py_ssize_t>rel:]
            lf_words = lf.split()
            if len(lf) <= len(inner_s) or len(lf_words) > n_words or inner_s in lf_words:
                continue
            # cand joins the words with single spaces: the long form starts where its first
            # word does in before (the reference's comment)
            tail = <str>before.split(None, len(words) - len(lf_words))[-1]
            out.append(r.Definition(inner_s, inner_start, inner_start + len(inner_s),
                                    left + len(before) - len(tail), left + len(before)))
        elif len(inner_s) > r.max_short or len(inner_s.split()) > r.max_short_words:
            words = before.split()
            if not words:
                continue
            sf = <str>words[len(words) - 1]
            if not _valid_short(sf, r) or sf.islower():
                continue
            rel = _best_long_form(sf, inner_s, r.whitespace)
            # as in the forward pattern, a long form that holds the short form is none
            if rel is None or len(inner_s) - <Py_ssize_t>rel <= len(sf) or (
                sf in inner_s[<Py_ssize_t>rel:].split()
            ):
                continue
            sf_start = left + before.rfind(sf)
            out.append(r.Definition(sf, sf_start, sf_start + len(sf),
                                    inner_start + <Py_ssize_t>rel,
                                    inner_start + len(inner_s)))
    return out


cdef inline bint _is_re_word(Py_UCS4 c) noexcept:
    """``\\w`` of Python's ``re`` for str patterns."""
    return c == u"_" or _is_word(c)


cdef Py_ssize_t _token_at(list offsets, Py_ssize_t value):
    """Index of ``value`` in a strictly increasing list of offsets, or -1."""
    cdef Py_ssize_t lo = 0, hi = PyList_GET_SIZE(offsets), mid, v
    while lo < hi:
        mid = (lo + hi) >> 1
        v = <Py_ssize_t><object>PyList_GET_ITEM(offsets, mid)
        if v < value:
            lo = mid + 1
        elif v > value:
            hi = mid
        else:
            return mid
    return -1


cdef list _apply_definitions(list defs, str text, list starts, list ends, list cands):
    """``Extractor._apply_definitions`` once ``find_definitions`` has found ``defs``: short
    forms defined in the caption take the long form's concept(s)."""
    cdef Py_ssize_t n = len(text), lf_end_tok, first, p, L, i, j
    cdef list inside, lf_cands, spans
    cdef set span_set, first_toks
    cdef tuple c
    cdef str short
    for d in defs:
        _yield_gil()
        lf_end_tok = _token_at(ends, d.long_end)
        if lf_end_tok < 0:
            continue
        inside = [c for c in cands
                  if c[1] == lf_end_tok + 1 and starts[<Py_ssize_t>c[0]] >= d.long_start]
        if not inside:
            continue
        first = min([<Py_ssize_t>c[0] for c in inside])
        lf_cands = [c for c in inside if c[0] == first]
        spans = []
        short = d.short
        L = len(short)
        p = text.find(short)
        while p >= 0:  # re.finditer(r"(?<!\w)" + re.escape(short) + r"(?!\w)", text)
            if (p == 0 or not _is_re_word(text[p - 1])) and (
                p + L >= n or not _is_re_word(text[p + L])
            ):
                i = _token_at(starts, p)
                j = _token_at(ends, p + L)
                if i >= 0 and j >= 0 and j >= i:
                    spans.append((i, j + 1))
                p = text.find(short, p + L)
            else:
                p = text.find(short, p + 1)
        if not spans:
            continue
        span_set = set(spans)
        first_toks = {sp[0] for sp in spans}
        for c in cands:  # rebuild the list only when a candidate sits on a short form
            if c[0] in first_toks and (c[0], c[1]) in span_set:
                cands = [c for c in cands if (c[0], c[1]) not in span_set]
                break
        else:
            cands = list(cands)  # (the reference builds a new list either way)
        for sp in spans:
            for c in lf_cands:
                cands.append((sp[0], sp[1], c[2], c[3], c[4]))
    return cands


# -- a key's postings, filtered over the index's mapped arrays -----------------------------------

cdef extern from "Python.h":
    object _decode_utf8 "PyUnicode_DecodeUTF8"(const char *s, Py_ssize_t size, const char *errors)


cdef Py_ssize_t _KEY_POSTINGS_MAX = 1 << 18  # PostingFilter.keys is emptied at this size
cdef Py_ssize_t _CIDS_MAX = 1 << 20  # and PostingFilter.cids at this one


cdef struct Accepted:    # a concept of a key that passes a plan's filters
    uint32_t cid         # its number (concepts are numbered in CUI order)
    uint32_t pid         # its best posting
    int32_t rank         # type-preference rank (shortlist only)
    double neg_prior     # -prior (shortlist only)


cdef inline bint _worse(const Accepted *a, const Accepted *b) noexcept nogil:
    """``a`` ranks after ``b`` by the shortlist's key (type rank, -prior, CUI)."""
    if a.rank != b.rank:
        return a.rank > b.rank
    if a.neg_prior != b.neg_prior:
        return a.neg_prior > b.neg_prior
    return a.cid > b.cid


cdef void _sift_down(Accepted **heap, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """Max-heap (the worst on top) of pointers, by :func:`_worse`."""
    cdef Py_ssize_t c
    cdef Accepted *x = heap[k]
    while True:
        c = 2 * k + 1
        if c >= n:
            break
        if c + 1 < n and _worse(heap[c + 1], heap[c]):
            c += 1
        if not _worse(heap[c], x):
            break
        heap[k] = heap[c]
        k = c
    heap[k] = x


@cython.auto_pickle(False)
cdef class _KeyPostings:
    """One key's postings sorted by how they are checked (``matcher.posting_checks``): all
    of ``[lo, hi)`` free (``all_free``), or the free ones and the checked ones (with their
    check codes) listed."""
    cdef uint64_t lo, hi
    cdef bint all_free
    cdef uint32_t *free
    cdef Py_ssize_t n_free
    cdef uint32_t *checked
    cdef int8_t *how
    cdef Py_ssize_t n_checked

    def __dealloc__(self):
        free(self.free)
        free(self.checked)
        free(self.how)


@cython.auto_pickle(False)
cdef class _Preference:
    """A profile's type preference and priors over the index's numbers: type number → rank,
    and the priors' concept numbers sorted, with their priors (made on first need)."""
    cdef int32_t *rank
    cdef int32_t worst
    cdef object priors           # CUI → prior (the profile's)
    cdef bint priors_ready
    cdef uint32_t *prior_cids
    cdef double *prior_vals
    cdef Py_ssize_t n_priors

    def __dealloc__(self):
        free(self.rank)
        free(self.prior_cids)
        free(self.prior_vals)

    cdef double prior(self, uint32_t cid) noexcept:
        cdef Py_ssize_t lo = 0, hi = self.n_priors, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.prior_cids[mid] < cid:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.n_priors and self.prior_cids[lo] == cid:
            return self.prior_vals[lo]
        return 0.0


@cython.auto_pickle(False)
cdef class FilterPlan:
    """A plan's filters over the index's numbers (``PostingFilter.plan``): accepted source
    and semantic-type numbers (NULL: no such filter), the excluded CUIs, the profile's
    preference."""
    cdef uint8_t *sab_ok
    cdef uint8_t *tui_ok
    cdef frozenset excluded
    cdef _Preference pref

    def __dealloc__(self):
        free(self.sab_ok)
        free(self.tui_ok)


@cython.auto_pickle(False)
cdef class PostingFilter:
    """The extractor's filtering of a key's postings (``Extractor._filter_postings``: sources,
    semantic types, excluded CUIs, each concept's best posting, the ``MAX_CANDIDATES``
    shortlist by type preference, prior and CUI) run in C over the index's memory-mapped
    arrays (``ConceptIndex.posting_arrays``): no :class:`~conceptsvc.index.Posting` is built
    but for the concepts kept, so the first use of a key with thousands of concepts costs a
    scan of integers. ``tests/test_speedups.py`` holds it to the Python filter."""
    cdef const uint64_t[::1] post_off
    cdef const uint32_t[::1] post_cui
    cdef const uint32_t[::1] post_str
    cdef const uint16_t[::1] post_sab
    cdef const uint8_t[::1] post_flags
    cdef const uint16_t[::1] post_tty
    cdef const uint32_t[::1] concept_pref
    cdef const uint64_t[::1] cpost_off
    cdef const uint32_t[::1] cpost
    cdef const uint32_t[::1] sty_off
    cdef const uint16_t[::1] sty
    cdef const uint8_t[::1] cuis_blob
    cdef const uint64_t[::1] cuis_off
    cdef const uint8_t[::1] str_blob
    cdef const uint64_t[::1] str_off
    cdef object index
    cdef object posting_checks, surface_check
    cdef Py_ssize_t max_candidates
    cdef uint8_t flag_preferred, flag_case_sensitive, flag_abbreviation
    cdef dict keys               # key id → _KeyPostings
    cdef dict preferences        # profile → _Preference
    cdef Py_ssize_t n_sabs, n_tuis
    cdef list sabs, ttys, tuis
    cdef object Posting, tuple_new
    cdef dict info               # the extractor's concept memo (Extractor.concept_info)
    cdef Py_ssize_t info_max     # its bound (extractor.CONCEPT_MEMO_SIZE): emptied when full
    cdef dict cids               # CUI → concept number, of the concepts kept (concept_strings)

    def __init__(self, index, *, posting_checks, surface_check, Py_ssize_t max_candidates,
                 int flag_preferred, int flag_case_sensitive, int flag_abbreviation,
                 posting_type, dict concept_memo not None,
                 Py_ssize_t concept_memo_size):
        a = index.posting_arrays
        self.post_tty = a.post_tty
        self.concept_pref = a.concept_pref
        self.cpost_off = a.concept_post_offsets
        self.cpost = a.concept_post
        self.sabs = list(index.sabs)
        self.ttys = list(index.ttys)
        self.tuis = list(index.tuis)
        self.Posting = posting_type
        self.tuple_new = tuple.__new__
        self.info = concept_memo
        self.info_max = concept_memo_size if concept_memo_size > 0 else 1
        self.cids = {}
        self.post_off = a.post_offsets
        self.post_cui = a.post_cui
        self.post_str = a.post_str
        self.post_sab = a.post_sab
        self.post_flags = a.post_flags
        self.sty_off = a.concept_sty_offsets
        self.sty = a.concept_sty
        self.cuis_blob = a.cuis_blob
        self.cuis_off = a.cuis_offsets
        self.str_blob = a.strings_blob
        self.str_off = a.strings_offsets
        self.index = index
        self.posting_checks = posting_checks
        self.surface_check = surface_check
        self.max_candidates = max_candidates
        self.flag_preferred = flag_preferred
        self.flag_case_sensitive = flag_case_sensitive
        self.flag_abbreviation = flag_abbreviation
        self.keys = {}
        self.preferences = {}
        self.n_sabs = len(index.sabs)
        self.n_tuis = len(index.tuis)

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef str _cui(self, uint32_t cid):
        cdef uint64_t s = self.cuis_off[cid], e = self.cuis_off[cid + 1] - 1
        return _decode_utf8(<const char *>&self.cuis_blob[0] + s, <Py_ssize_t>(e - s), NULL)

    cdef str _string(self, uint32_t sid):
        cdef uint64_t s = self.str_off[sid], e = self.str_off[sid + 1] - 1
        if e == s:
            return u""
        return _decode_utf8(<const char *>&self.str_blob[0] + s, <Py_ssize_t>(e - s), NULL)

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef bint _string_upper(self, uint32_t sid) except -1:
        """``str.isupper()`` of dictionary string ``sid`` (ASCII in C)."""
        cdef uint64_t k, s = self.str_off[sid], e = self.str_off[sid + 1] - 1
        cdef uint8_t c
        cdef bint upper = False
        for k in range(s, e):
            c = self.str_blob[k]
            if c >= 0x80:
                return self._string(sid).isupper()
            if 0x61 <= c <= 0x7a:
                return False
            if 0x41 <= c <= 0x5a:
                upper = True
        return upper

    def plan(self, tuis, sabs, excluded, profile):
        """The filters of a plan (``extractor._Plan``'s resolved sets) over index numbers."""
        cdef FilterPlan fp = FilterPlan.__new__(FilterPlan)
        cdef Py_ssize_t k
        if sabs is not None:
            fp.sab_ok = <uint8_t *>calloc(self.n_sabs + 1, 1)
            if fp.sab_ok is NULL:
                raise MemoryError()
            for k, name in enumerate(self.index.sabs):
                fp.sab_ok[k] = name in sabs
        if tuis is not None:
            fp.tui_ok = <uint8_t *>calloc(self.n_tuis + 1, 1)
            if fp.tui_ok is NULL:
                raise MemoryError()
            for k, name in enumerate(self.index.tuis):
                fp.tui_ok[k] = name in tuis
        fp.excluded = frozenset(excluded)
        pref = self.preferences.get(profile)
        if pref is None:
            pref = self.preferences[profile] = self._preference(profile)
        fp.pref = pref
        return fp

    cdef _Preference _preference(self, profile):
        cdef _Preference p = _Preference.__new__(_Preference)
        cdef Py_ssize_t k
        # abbreviations.AmbiguityResolver.type_rank: a type's rank is its (last) position in
        # the preference; types not in it, and concepts without types, rank last
        ranks = {t: i for i, t in enumerate(profile.type_preference)}
        p.worst = len(ranks)
        p.rank = <int32_t *>malloc((self.n_tuis + 1) * sizeof(int32_t))
        if p.rank is NULL:
            raise MemoryError()
        for k, name in enumerate(self.index.tuis):
            p.rank[k] = ranks.get(name, p.worst)
        p.priors = profile.priors
        return p

    cdef int _ready_priors(self, _Preference p) except -1:
        """The priors' concept numbers, sorted (once per profile, when first needed)."""
        pairs = sorted(
            (cid, float(v)) for cid, v in
            ((self.index.concept_number(c), v) for c, v in p.priors.items()) if cid >= 0
        )
        cdef Py_ssize_t k, n = len(pairs)
        if p.priors_ready:  # (another thread's, while the lookups above ran Python code)
            return 0
        p.prior_cids = <uint32_t *>malloc((n + 1) * sizeof(uint32_t))
        p.prior_vals = <double *>malloc((n + 1) * sizeof(double))
        if p.prior_cids is NULL or p.prior_vals is NULL:
            raise MemoryError()
        for k in range(n):
            p.prior_cids[k] = pairs[k][0]
            p.prior_vals[k] = pairs[k][1]
        p.n_priors = n
        p.priors_ready = True
        return 0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef _KeyPostings key_postings(self, object kid, list norms, Py_ssize_t i, Py_ssize_t j):
        """The memoised postings of key ``kid``, which tokens ``norms[i:j]`` spell."""
        cdef PyObject *hit = PyDict_GetItem(self.keys, kid)
        if hit is not NULL:
            return <_KeyPostings>hit
        cdef _KeyPostings kp = _KeyPostings.__new__(_KeyPostings)
        cdef uint32_t k32 = <uint32_t>kid
        kp.lo = self.post_off[k32]
        kp.hi = self.post_off[k32 + 1]
        cdef tuple checks = self.posting_checks(u" ".join(norms[i:j]))
        cdef int table[8]
        cdef int kind, h
        cdef bint uniform = True
        cdef uint8_t f
        cdef uint64_t pid
        cdef Py_ssize_t n = <Py_ssize_t>(kp.hi - kp.lo)
        for kind in range(8):
            table[kind] = <int>checks[kind]
        for kind in range(8):
            if table[kind] != 0:
                uniform = False
        kp.all_free = True
        if not uniform:
            for pid in range(kp.lo, kp.hi):
                f = self.post_flags[pid]
                kind = (1 if f & self.flag_case_sensitive else 0) | (
                    2 if f & self.flag_abbreviation else 0)
                if table[kind] != 0:
                    kp.all_free = False
                    break
        if not kp.all_free:
            kp.free = <uint32_t *>malloc((n + 1) * sizeof(uint32_t))
            kp.checked = <uint32_t *>malloc((n + 1) * sizeof(uint32_t))
            kp.how = <int8_t *>malloc(n + 1)
            if kp.free is NULL or kp.checked is NULL or kp.how is NULL:
                raise MemoryError()
            for pid in range(kp.lo, kp.hi):
                f = self.post_flags[pid]
                kind = (1 if f & self.flag_case_sensitive else 0) | (
                    2 if f & self.flag_abbreviation else 0)
                if table[kind] != table[kind | 4] and self._string_upper(self.post_str[pid]):
                    kind |= 4
                h = table[kind]
                if h == 0:
                    kp.free[kp.n_free] = <uint32_t>pid
                    kp.n_free += 1
                elif h > 0:
                    kp.checked[kp.n_checked] = <uint32_t>pid
                    kp.how[kp.n_checked] = <int8_t>h
                    kp.n_checked += 1
        else:
            kp.n_free = n
        if len(self.keys) >= _KEY_POSTINGS_MAX:
            self.keys.clear()
        self.keys[kid] = kp
        return kp

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef object surface_pairs(self, FilterPlan fp, _KeyPostings kp, str surface):
        """The accepted (cui, posting) pairs of a key with checked postings, for a caption
        surface; None when no posting passes the case checks (no match at all)."""
        cdef Py_ssize_t n = kp.n_free + kp.n_checked, m = kp.n_free, k
        cdef uint32_t *pids = <uint32_t *>malloc((n + 1) * sizeof(uint32_t))
        cdef uint32_t sid
        cdef dict seen = {}
        if pids is NULL:
            raise MemoryError()
        try:
            if kp.n_free:
                memcpy(pids, kp.free, kp.n_free * sizeof(uint32_t))
            for k in range(kp.n_checked):
                sid = self.post_str[kp.checked[k]]
                key = (kp.how[k], sid)
                ok = seen.get(key)
                if ok is None:
                    ok = seen[key] = bool(self.surface_check(kp.how[k], surface,
                                                             self._string(sid)))
                if ok:
                    pids[m] = kp.checked[k]
                    m += 1
            if m == 0:
                return None
            return self.select(fp, pids, m, 0)
        finally:
            free(pids)

    cdef tuple key_pairs(self, FilterPlan fp, _KeyPostings kp):
        """The accepted (cui, posting) pairs of a key without case checks."""
        if kp.all_free:
            return self.select(fp, NULL, <Py_ssize_t>(kp.hi - kp.lo), kp.lo)
        return self.select(fp, kp.free, kp.n_free, 0)

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef bint _accepts(self, FilterPlan fp, uint32_t cid) except -1:
        cdef uint32_t k
        cdef bint ok
        if fp.tui_ok is not NULL:
            ok = False
            for k in range(self.sty_off[cid], self.sty_off[cid + 1]):
                if fp.tui_ok[self.sty[k]]:
                    ok = True
                    break
            if not ok:
                return False
        if fp.excluded and self._cui(cid) in fp.excluded:
            return False
        return True

    cdef tuple select(self, FilterPlan fp, const uint32_t *pids, Py_ssize_t n, uint64_t lo):
        """``Extractor._filter_postings`` over postings ``pids[:n]`` (or ``lo .. lo + n``
        when ``pids`` is NULL), in their order."""
        cdef Accepted *acc = <Accepted *>malloc((n + 1) * sizeof(Accepted))
        if acc is NULL:
            raise MemoryError()
        try:
            return self._select(fp, pids, n, lo, acc)
        finally:
            free(acc)

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef tuple _select(self, FilterPlan fp, const uint32_t *pids, Py_ssize_t n, uint64_t lo,
                       Accepted *acc):
        cdef Py_ssize_t k, na = 0, at, m
        cdef uint32_t pid, cid, last_cid = 0
        cdef bint have_last = False, last_ok = False, pref
        cdef dict where = None          # cid → position in acc, once postings come unsorted
        cdef PyObject *hit
        cdef uint8_t flag_pref = self.flag_preferred
        for k in range(n):
            pid = pids[k] if pids is not NULL else <uint32_t>(lo + k)
            if fp.sab_ok is not NULL and not fp.sab_ok[self.post_sab[pid]]:
                continue
            cid = self.post_cui[pid]
            if not (have_last and cid == last_cid):
                have_last = True
                last_cid = cid
                last_ok = self._accepts(fp, cid)
            if not last_ok:
                continue
            # the concept's place among those accepted: postings come in concept order (the
            # index sorts a key's postings so), except free ones followed by checked ones
            at = -1
            if where is None:
                if na and acc[na - 1].cid == cid:
                    at = na - 1
                elif na and cid < acc[na - 1].cid:
                    where = {acc[m].cid: m for m in range(na)}
            if where is not None:
                hit = PyDict_GetItem(where, cid)
                if hit is not NULL:
                    at = <Py_ssize_t><object>hit
            if at < 0:
                acc[na].cid = cid
                acc[na].pid = pid
                if where is not None:
                    where[cid] = na
                na += 1
            else:
                pref = self.post_flags[pid] & flag_pref
                if pref and not self.post_flags[acc[at].pid] & flag_pref:
                    acc[at].pid = pid
        cdef Py_ssize_t keep = na
        cdef uint8_t *kept = NULL
        cdef Accepted **heap = NULL
        cdef _Preference pr = fp.pref
        cdef int32_t r
        cdef uint32_t j
        if na > self.max_candidates:
            if not pr.priors_ready:
                self._ready_priors(pr)
            keep = self.max_candidates
            heap = <Accepted **>malloc((keep + 1) * sizeof(Accepted *))
            kept = <uint8_t *>calloc(na + 1, 1)
            if heap is NULL or kept is NULL:
                free(heap)
                free(kept)
                raise MemoryError()
            m = 0
            for k in range(na):
                cid = acc[k].cid
                r = pr.worst
                for j in range(self.sty_off[cid], self.sty_off[cid + 1]):
                    if pr.rank[self.sty[j]] < r:
                        r = pr.rank[self.sty[j]]
                acc[k].rank = r
                acc[k].neg_prior = -pr.prior(cid) if pr.n_priors else 0.0
                if m < keep:
                    heap[m] = &acc[k]
                    m += 1
                    if m == keep:
                        for at in range(keep // 2 - 1, -1, -1):
                            _sift_down(heap, keep, at)
                elif _worse(heap[0], &acc[k]):
                    heap[0] = &acc[k]
                    _sift_down(heap, keep, 0)
            for k in range(keep):
                kept[heap[k] - acc] = 1
            free(heap)
        cdef list out = []
        cdef str cui
        cdef dict info = self.info
        try:
            for k in range(na):
                if kept is not NULL and not kept[k]:
                    continue
                cid = acc[k].cid
                cui = self._cui(cid)
                out.append((cui, self._posting(cui, acc[k].pid)))
                if PyDict_GetItem(self.cids, cui) is NULL:
                    if len(self.cids) >= _CIDS_MAX:
                        self.cids.clear()
                    self.cids[cui] = cid
                if PyDict_GetItem(info, cui) is NULL:
                    # what Extractor.concept_info would read: the ranking and the mentions
                    # ask for the concepts kept here (and fall back to it when emptied)
                    if len(info) >= self.info_max:
                        info.clear()
                    info[cui] = (self._string(self.concept_pref[cid]), self._types(cid))
        finally:
            free(kept)
        return tuple(out)

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef object _posting(self, str cui, uint32_t pid):
        """``ConceptIndex.posting(pid)`` (its concept id already decoded)."""
        return self.tuple_new(self.Posting, (
            cui, self._string(self.post_str[pid]),
            <object>PyList_GET_ITEM(self.sabs, self.post_sab[pid]),
            <object>PyList_GET_ITEM(self.ttys, self.post_tty[pid]),
            <int>self.post_flags[pid],
        ))

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef tuple _types(self, uint32_t cid):
        """``ConceptIndex.semantic_types_of(cid)``."""
        cdef uint32_t k
        return tuple([<object>PyList_GET_ITEM(self.tuis, self.sty[k])
                      for k in range(self.sty_off[cid], self.sty_off[cid + 1])])

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def concept_strings(self, str cui not None):
        """The distinct dictionary strings of a concept (``ConceptIndex.concept_postings``'
        strings, without building the postings), in posting order; empty for a concept the
        index does not have."""
        # (the concepts ranked are ones a key's filtering kept: their numbers are known)
        cdef PyObject *hit = PyDict_GetItem(self.cids, cui)
        cdef Py_ssize_t cid = (<object>hit if hit is not NULL
                               else self.index.concept_number(cui))
        cdef list out = []
        cdef set seen = set()
        cdef uint64_t k
        cdef uint32_t sid
        if cid < 0:
            return out
        for k in range(self.cpost_off[cid], self.cpost_off[cid + 1]):
            sid = self.post_str[self.cpost[k]]
            if sid not in seen:
                seen.add(sid)
                out.append(self._string(sid))
        return out


# -- overlap resolution ------------------------------------------------------------------------

cdef struct SpanRef:
    Py_ssize_t i, j      # token span [i, j)
    double score         # best score of the candidates on it
    Py_ssize_t ref       # a candidate's index, or the span's own index once deduplicated


cdef int _by_span(const void *a, const void *b) noexcept nogil:
    cdef const SpanRef *x = <const SpanRef *>a
    cdef const SpanRef *y = <const SpanRef *>b
    if x.i != y.i:
        return -1 if x.i < y.i else 1
    if x.j != y.j:
        return -1 if x.j < y.j else 1
    return -1 if x.ref < y.ref else (1 if x.ref > y.ref else 0)


cdef inline int _cmp_d(double a, double b) noexcept nogil:
    return -1 if a < b else (1 if a > b else 0)


cdef int _longest_first(const void *a, const void *b) noexcept nogil:
    """The reference's sort key for "longest": (i - j, -score, i, j)."""
    cdef const SpanRef *x = <const SpanRef *>a
    cdef const SpanRef *y = <const SpanRef *>b
    cdef int c = _cmp_d(<double>(x.i - x.j), <double>(y.i - y.j))
    if c == 0:
        c = _cmp_d(-x.score, -y.score)
    if c == 0:
        c = _by_span(a, b)
    return c


cdef int _best_score_first(const void *a, const void *b) noexcept nogil:
    """The reference's sort key for "best_score": (-score, i - j, i, j)."""
    cdef const SpanRef *x = <const SpanRef *>a
    cdef const SpanRef *y = <const SpanRef *>b
    cdef int c = _cmp_d(-x.score, -y.score)
    if c == 0:
        c = _cmp_d(<double>(x.i - x.j), <double>(y.i - y.j))
    if c == 0:
        c = _by_span(a, b)
    return c


cdef list _resolve_overlaps(list cands, bint longest):
    """``extractor._resolve_overlaps`` on plain candidate tuples (same order, same result),
    in O(n log n): distinct spans by sorting, then the reference's greedy choice."""
    cdef Py_ssize_t n = PyList_GET_SIZE(cands), a, k, m = 0, max_end = -1, t
    cdef Py_ssize_t pi = -1, pj = -1, i, j
    cdef tuple c
    cdef bint overlap = False
    for a in range(n):
        c = <tuple>PyList_GET_ITEM(cands, a)
        i = <Py_ssize_t>c[0]
        j = <Py_ssize_t>c[1]
        if i < max_end and not (i == pi and j == pj):
            overlap = True
            break
        pi, pj = i, j
        if j > max_end:
            max_end = j
    if not overlap:
        return cands
    cdef SpanRef *refs = <SpanRef *>malloc(n * sizeof(SpanRef))
    cdef SpanRef *spans = <SpanRef *>malloc(n * sizeof(SpanRef))
    cdef Py_ssize_t *span_of = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))
    cdef char *kept = <char *>calloc(n, 1)
    cdef char *taken = NULL
    cdef list out = []
    try:
        if refs is NULL or spans is NULL or span_of is NULL or kept is NULL:
            raise MemoryError()
        max_end = 0
        for a in range(n):
            c = <tuple>PyList_GET_ITEM(cands, a)
            refs[a].i = <Py_ssize_t>c[0]
            refs[a].j = <Py_ssize_t>c[1]
            refs[a].score = <double>c[4]
            refs[a].ref = a
            if refs[a].j > max_end:
                max_end = refs[a].j
        qsort(refs, n, sizeof(SpanRef), _by_span)
        for a in range(n):  # distinct spans, each with its best score
            if m == 0 or refs[a].i != spans[m - 1].i or refs[a].j != spans[m - 1].j:
                spans[m].i, spans[m].j, spans[m].score, spans[m].ref = (
                    refs[a].i, refs[a].j, refs[a].score, m)
                m += 1
            elif refs[a].score > spans[m - 1].score:
                spans[m - 1].score = refs[a].score
            span_of[refs[a].ref] = m - 1
        qsort(spans, m, sizeof(SpanRef), _longest_first if longest else _best_score_first)
        taken = <char *>calloc(max_end + 1, 1)
        if taken is NULL:
            raise MemoryError()
        for k in range(m):  # greedy: a span is kept when none of its tokens is taken yet
            for t in range(spans[k].i, spans[k].j):
                if taken[t]:
                    break
            else:
                kept[spans[k].ref] = 1
                for t in range(spans[k].i, spans[k].j):
                    taken[t] = 1
        for a in range(n):
            if kept[span_of[a]]:
                out.append(<tuple>PyList_GET_ITEM(cands, a))
        return out
    finally:
        free(refs)
        free(spans)
        free(span_of)
        free(kept)
        free(taken)


# -- the extractor's hot path ------------------------------------------------------------------

cdef class Disambiguator:
    """The compiled twin of :meth:`conceptsvc.extractor.Extractor._disambiguate` (the
    reference): spans that carry several concepts keep the best-ranked of them.

    Same steps, same memo: candidates grouped by span in order, each group's
    :class:`~conceptsvc.abbreviations.Ranking` taken from (or put in) the extractor's
    ``rankings`` memo under (profile, concepts), built by the plan's resolver from
    ``concept_info``'s semantic types; then the best of the group given the caption's words
    (stopwords and the span's own words left out), as ``Ranking.best`` ranks them with no
    caption definition: the candidates sharing the most words, then the best static rank.
    Called by :class:`FastPath` with its plain candidate tuples, which it returns unconverted.
    """

    cdef object rankings
    cdef object concept_info
    cdef frozenset stopwords

    def __init__(self, rankings, concept_info, stopwords):
        self.rankings = rankings
        self.concept_info = concept_info
        self.stopwords = frozenset(stopwords)

    def __call__(self, plan, list norms, list cands):
        cdef Py_ssize_t n = PyList_GET_SIZE(cands), k
        cdef tuple c, prev
        if n < 2:
            return cands
        prev = <tuple>PyList_GET_ITEM(cands, 0)
        for k in range(1, n):
            c = <tuple>PyList_GET_ITEM(cands, k)
            if c[0] == prev[0] and c[1] == prev[1]:
                break  # candidates are in span order: a repeat is adjacent
            prev = c
        else:
            return cands
        cdef dict by_span = {}
        cdef list group, out = [], keep
        cdef object span, ranking, memo_key, profile_name = plan.profile.name
        for k in range(n):
            c = <tuple>PyList_GET_ITEM(cands, k)
            span = (c[0], c[1])
            group = <list>by_span.get(span)
            if group is None:
                by_span[span] = [c]
            else:
                group.append(c)
        cdef frozenset context = frozenset(norms) - self.stopwords
        cdef tuple cuis
        cdef Py_ssize_t i, j
        for span, group in by_span.items():
            if PyList_GET_SIZE(group) == 1:
                out.append(group[0])
                continue
            cuis = tuple([(<tuple>c)[2] for c in group])
            memo_key = (profile_name, cuis)
            ranking = self.rankings.get(memo_key)
            if ranking is None:
                info = self.concept_info
                ranking = plan.resolver.ranking(cuis, {cui: info(cui)[1] for cui in cuis})
                self.rankings.put(memo_key, ranking, ranking.weight())
            i = (<tuple>span)[0]
            j = (<tuple>span)[1]
            keep = _ranking_best(ranking, context.difference(norms[i:j]))
            if PyList_GET_SIZE(keep) == 1:
                only = keep[0]
                out.extend([c for c in group if (<tuple>c)[2] == only])
            else:
                kept = set(keep)
                out.extend([c for c in group if (<tuple>c)[2] in kept])
        return out


cdef list _ranking_best(object ranking, frozenset context):
    """``Ranking.best(context)`` with no caption definition (the reference), over C counts:
    the candidates sharing the most caption words, then the best static rank, in candidate
    order; the ranking's ``without_context`` when no word is shared."""
    cdef tuple cuis = ranking.cuis, static = ranking.static
    cdef dict words = ranking.words
    cdef Py_ssize_t n = PyTuple_GET_SIZE(cuis), i, k, m, most = 0
    cdef int *shared
    cdef PyObject *hit
    cdef tuple ids
    cdef object top = None, s
    cdef list out
    if n == 0:
        return list(ranking.without_context)
    shared = <int *>calloc(n, sizeof(int))
    if shared == NULL:
        raise MemoryError()
    try:
        for w in context:
            hit = PyDict_GetItem(words, w)
            if hit == NULL:
                continue
            ids = <tuple>hit
            m = PyTuple_GET_SIZE(ids)
            for k in range(m):
                i = <Py_ssize_t>(<object>PyTuple_GET_ITEM(ids, k))
                shared[i] += 1
                if shared[i] > most:
                    most = shared[i]
        if most == 0:
            return list(ranking.without_context)
        for i in range(n):  # the best static rank among those sharing the most words
            if shared[i] == most:
                s = <object>PyTuple_GET_ITEM(static, i)
                if top is None or s < top:
                    top = s
        out = []
        for i in range(n):
            if shared[i] == most and <object>PyTuple_GET_ITEM(static, i) == top:
                out.append(<object>PyTuple_GET_ITEM(cuis, i))
        return out
    finally:
        free(shared)


cdef enum:
    _KID_CACHE = 1 << 14   # FastPath's key id objects (a power of two)

FAST_MEMO_MAX = 1 << 16
"""Entries of a plan's memo (key ids, and key ids with a surface) before it is emptied."""
cdef Py_ssize_t _FAST_MEMO_MAX = FAST_MEMO_MAX
# a mention's categories (bit ``1 << negation.Category``), checked against the enum by NegationScanner
cdef enum:
    _CTX_NEGATED = 1
    _CTX_HYPOTHETICAL = 2
    _CTX_HISTORICAL = 4
    _CTX_OTHER = 8

@cython.auto_pickle(False)
cdef class FastPath:
    """One caption through the pipeline of :meth:`conceptsvc.extractor.Extractor.extract`.

    Built by the extractor at any index size: it matches over the index's memory-mapped token
    trie (``ExactMatcher.key_trie``) and builds nothing that grows with the index. Reads the
    matcher through its public accessors (``key_trie``, ``crossed_postings``,
    ``break_chars``), filters a key's postings with ``postings`` (:class:`PostingFilter`,
    over the index's mapped arrays, under the plan's ``fast_filter``), shares the
    extractor's memo tables, takes its tokenisation rules from ``tokenizer`` (``normalize``'s
    :class:`SpanTokenizer`), and calls back the extractor's own steps it is handed.
    """

    cdef CharSet breaks
    cdef dict info
    cdef _TokenTable table
    cdef _KeyTrie trie
    cdef object crossed_postings
    cdef PostingFilter postings
    cdef DefinitionFinder definitions
    cdef object filter_postings, filter_matches, disambiguate, approximate, concept_info
    cdef object context_exempt  # Extractor._context_exempt: anatomy takes no context
    cdef NegationScanner negation
    cdef dict profiles
    cdef object Annotation
    cdef object Mention
    cdef tuple mention_slots
    cdef tuple annotation_slots
    cdef object new
    # key id objects by trie node, direct-mapped (_KID_CACHE slots): the memos are dicts keyed
    # by key id, and probing them with the object they hold is an identity hit, where a fresh
    # int would cost an allocation and an equality test per match
    cdef int32_t *kid_nodes
    cdef PyObject **kid_objs

    def __cinit__(self):
        self.kid_nodes = <int32_t *>malloc(_KID_CACHE * sizeof(int32_t))
        self.kid_objs = <PyObject **>calloc(_KID_CACHE, sizeof(PyObject *))
        if self.kid_nodes is NULL or self.kid_objs is NULL:
            raise MemoryError()
        memset(self.kid_nodes, 0xff, _KID_CACHE * sizeof(int32_t))  # -1: empty

    def __dealloc__(self):
        cdef Py_ssize_t k
        if self.kid_objs is not NULL:
            for k in range(_KID_CACHE):
                Py_XDECREF(self.kid_objs[k])
        free(self.kid_objs)
        free(self.kid_nodes)

    cdef inline object _kid(self, int32_t node, int32_t kid):
        """The key id object of ``node`` (whose key is ``kid``), cached."""
        cdef Py_ssize_t k = node & (_KID_CACHE - 1)
        if self.kid_nodes[k] == node:
            return <object>self.kid_objs[k]
        cdef object obj = kid
        Py_XDECREF(self.kid_objs[k])  # (an int: freeing it runs no Python code)
        Py_XINCREF(<PyObject *>obj)
        self.kid_objs[k] = <PyObject *>obj
        self.kid_nodes[k] = node
        return obj

    def __init__(self, matcher, *, SpanTokenizer tokenizer not None,
                 NegationScanner negation not None, DefinitionFinder definitions not None,
                 profiles, PostingFilter postings not None, filter_postings, filter_matches,
                 disambiguate,
                 approximate, concept_info, dict concept_memo not None, mention_type,
                 annotation_type, context_exempt):
        key_trie = matcher.key_trie
        cdef _Vocab vocab = _Vocab(key_trie.token_ids, key_trie.token_dict,
                                   len(key_trie.token_ids))
        self.crossed_postings = matcher.crossed_postings
        _charset_init(&self.breaks, matcher.break_chars, "break_chars")
        self.info = concept_memo
        self.context_exempt = context_exempt
        self.trie = _mapped_trie(key_trie, vocab)
        self.table = _TokenTable(tokenizer.table.normalize, self.trie)
        self.table.rules = tokenizer.table.rules
        self.postings = postings
        self.definitions = definitions
        self.filter_postings = filter_postings
        self.filter_matches = filter_matches
        self.disambiguate = disambiguate
        self.approximate = approximate
        self.concept_info = concept_info
        self.negation = negation
        # every profile a request may name, now: their phrases' tokens join the vocabulary
        # before the token table caches any token id
        self.profiles = {p: ProfileRunner(p, vocab) for p in profiles}
        self.Mention = mention_type
        self.Annotation = annotation_type
        self.mention_slots = tuple(mention_type.__dict__[f] for f in mention_type.__slots__)
        self.annotation_slots = tuple(
            annotation_type.__dict__[f] for f in annotation_type.__slots__
        )
        if mention_type.__slots__ != ("cui", "preferred_name", "text", "start", "end", "score",
                                      "semantic_types", "source", "negated", "hypothetical",
                                      "historical", "experiencer"):
            raise ValueError("Mention's fields changed; update the fast path")
        if annotation_type.__slots__ != ("id", "mentions", "concepts"):
            raise ValueError("Annotation's fields changed; update the fast path")
        self.new = object.__new__

    cdef object _mention(self, str cui, str name, str surface, Py_ssize_t s, Py_ssize_t e,
                         object score, object types, object sab, int ctx, bint row):
        """A Mention; ``ctx`` holds its categories (``negation.mention_context``'s bits). With
        ``row``, the same values as a tuple in the Mention's field order (``extract_rows``)."""
        cdef bint negated = (ctx & _CTX_NEGATED) != 0
        cdef bint hypothetical = (ctx & _CTX_HYPOTHETICAL) != 0
        cdef bint historical = (ctx & _CTX_HISTORICAL) != 0
        cdef str experiencer = u"other" if ctx & _CTX_OTHER else u"patient"
        if row:
            return (cui, name, surface, s, e, score, types, sab, negated, hypothetical,
                    historical, experiencer)
        cdef object m = self.new(self.Mention)
        cdef tuple d = self.mention_slots
        _set_slot(d[0], m, cui)
        _set_slot(d[1], m, name)
        _set_slot(d[2], m, surface)
        _set_slot(d[3], m, s)
        _set_slot(d[4], m, e)
        _set_slot(d[5], m, score)
        _set_slot(d[6], m, types)
        _set_slot(d[7], m, sab)
        _set_slot(d[8], m, negated)
        _set_slot(d[9], m, hypothetical)
        _set_slot(d[10], m, historical)
        _set_slot(d[11], m, experiencer)
        return m

    cdef object _annotation(self, object id, tuple mentions, tuple concepts, bint row):
        if row:
            return (mentions, concepts)
        cdef object a = self.new(self.Annotation)
        cdef tuple d = self.annotation_slots
        _set_slot(d[0], a, id)
        _set_slot(d[1], a, mentions)
        _set_slot(d[2], a, concepts)
        return a

    cdef list _match(self, object plan, str text, list norms, list starts, list ends,
                     int32_t *tids, int32_t *nodes, list covered):
        """Exact matching and filtering: one (start_tok, end_tok, cui, posting, score) tuple
        per accepted (window, concept), in the order of the reference matcher. ``covered``
        (approximate mode), when given, marks the tokens of every exactly matched window,
        filtered out or not, as the reference's coverage does."""
        cdef Py_ssize_t n = PyList_GET_SIZE(norms), i, j, t
        cdef _KeyTrie trie = self.trie
        cdef const int32_t *node_keys = trie.node_keys
        cdef PostingFilter postings = self.postings
        cdef FilterPlan fp = <FilterPlan?>plan.fast_filter
        cdef _KeyPostings kp
        cdef dict memo = plan.fast_memo
        cdef list out = []
        cdef PyObject *hit
        cdef int32_t node
        cdef str surface
        cdef object kid, pairs, posts, memo_key, score = 1.0
        cdef tuple pair
        cdef bint crossed
        for i in range(n):
            if (i & 4095) == 4095:
                _yield_gil()
            node = nodes[i]
            if node < 0:
                continue
            j = i + 1
            crossed = False
            while True:
                kid = None
                if node_keys[node] >= 0:
                    kid = self._kid(node, node_keys[node])
                if kid is not None and crossed:
                    # the window spans break punctuation: only strings punctuated alike
                    # (matcher.crossed_postings; rare, so no memo here)
                    posts = self.crossed_postings(kid, text, starts, ends, i, j)
                    if posts:
                        if covered is not None:
                            for t in range(i, j):
                                covered[t] = True
                        for pair in self.filter_postings(plan, posts):
                            out.append((i, j, pair[0], pair[1], score))
                elif kid is not None:
                    kp = postings.key_postings(kid, norms, i, j)
                    pairs = None
                    if kp.n_checked:
                        # case checks depend on the surface only: memoised per plan under
                        # (key id, surface) (None: no posting passes, so no match at all)
                        surface = text[<Py_ssize_t>starts[i]:<Py_ssize_t>ends[j - 1]]
                        memo_key = (kid, surface)
                        hit = PyDict_GetItem(memo, memo_key)
                        if hit is NULL:
                            if len(memo) >= _FAST_MEMO_MAX:  # surfaces are caption text:
                                memo.clear()                 # keep the memo bounded
                            pairs = postings.surface_pairs(fp, kp, surface)
                            memo[memo_key] = pairs
                        else:
                            pairs = <object>hit
                    elif kp.n_free:
                        hit = PyDict_GetItem(memo, kid)
                        if hit is NULL:
                            if len(memo) >= _FAST_MEMO_MAX:
                                memo.clear()
                            pairs = postings.key_pairs(fp, kp)
                            memo[kid] = pairs
                        else:
                            pairs = <object>hit
                    if pairs is not None:
                        if covered is not None:
                            for t in range(i, j):
                                covered[t] = True
                        for pair in pairs:
                            out.append((i, j, pair[0], pair[1], score))
                if j >= n or tids[j] < 0:
                    break
                if _gap_has(text, <Py_ssize_t>ends[j - 1], <Py_ssize_t>starts[j], &self.breaks):
                    crossed = True
                node = trie.child(node, tids[j])
                if node < 0:
                    break
                j += 1
        return out

    def extract(self, str text not None, object plan not None, object id=u""):
        """The annotation of one caption under a compiled plan (``extractor._Plan``)."""
        return self._run(text, plan, id, False)

    def extract_rows(self, str text not None, object plan not None):
        """What :meth:`extract` finds, for a writer of wire bytes: ``(mentions, concepts)``,
        each mention a tuple of the Mention's fields in their order. No Mention or Annotation
        object is built (building one and reading it back cost the server ≈ 4k instructions a
        mention)."""
        return self._run(text, plan, u"", True)

    cdef object _run(self, str text, object plan, object id, bint row):
        if self.table is None:
            raise TypeError("FastPath was not initialised")
        _uready(text)  # before len(text) sizes the arrays
        # token ids and one-token trie nodes, for the matcher and the profile
        cdef int32_t *tids = <int32_t *>malloc(2 * (len(text) + 1) * sizeof(int32_t))
        if tids is NULL:
            raise MemoryError()
        try:
            return self._extract(text, plan, id, tids, tids + len(text) + 1, row)
        finally:
            free(tids)

    cdef object _extract(self, str text, object plan, object id, int32_t *tids, int32_t *nodes,
                         bint row):
        cdef object o = plan.options, profile = plan.profile
        cdef list norms = [], starts = [], ends = [], cands, records, covered
        cdef bint approximate
        cdef tuple c, r
        cdef Py_ssize_t k, n_c, t
        _scan_tokens(self.table, text, norms, starts, ends, tids, nodes)
        approximate = o.mode == u"approximate"
        covered = [False] * len(norms) if approximate else None
        cands = self._match(plan, text, norms, starts, ends, tids, nodes, covered)
        if approximate:
            approx = self.approximate().match(
                text, norms, starts, ends, covered, o.similarity, o.threshold
            )
            if approx:
                cands.extend([tuple(x) for x in self.filter_matches(plan, approx)])
        if cands and u"(" in text:
            defs = _find_definitions(text, self.definitions)
            if defs:
                cands = _apply_definitions(defs, text, starts, ends, cands)
        n_c = len(cands)
        if n_c > 1:
            for k in range(1, n_c):
                c = <tuple>PyList_GET_ITEM(cands, k)
                r = <tuple>PyList_GET_ITEM(cands, k - 1)
                if c[0] == r[0] and c[1] == r[1]:
                    cands = self.disambiguate(plan, norms, cands)  # (plain tuples kept)
                    break
            if o.overlap != u"all" and len(cands) > 1:
                cands = _resolve_overlaps(cands, o.overlap == u"longest")
        cdef bint identity = profile.is_identity
        if not cands and identity:
            return self._annotation(id, (), (), row)
        flags = None
        if cands:
            flags = self.negation.negated_tokens(text, norms, starts, ends)
        cdef bint include_negated = o.include_negated
        cdef bint include_hypothetical = plan.include_hypothetical
        cdef int ctx, first, last, cat
        records = []
        for c in cands:
            ctx = 0
            if flags is not None:
                # negation.mention_context: per category, the first token in a forward scope
                # or the last token in a backward one (a trigger inside the mention does not
                # apply to it)
                first = <int>flags[<Py_ssize_t>c[0]]
                last = <int>flags[<Py_ssize_t>c[1] - 1]
                for cat in range(self.negation.categories):
                    if ((first >> (2 * cat)) & self.negation.forward_bit
                            or (last >> (2 * cat)) & self.negation.backward_bit):
                        ctx |= 1 << cat
                if ctx and self.context_exempt(c[2]):  # (Extractor._context_exempt)
                    ctx = 0
                if ctx & _CTX_NEGATED and not include_negated:
                    continue
                if ctx & _CTX_HYPOTHETICAL and not include_hypothetical:
                    continue
            records.append((c[0], c[1], c[2], c, ctx))
        records.sort()
        mentioned = list(dict.fromkeys([r[2] for r in records]))
        inferred = ()
        cdef ProfileRunner runner
        cdef set kept
        if not identity:
            runner = self.profiles.get(profile)
            if runner is None:  # not a profile known at construction: no token ids
                runner = self.profiles[profile] = ProfileRunner(profile)
            kept, inferred = runner.apply_ids(mentioned, text, norms, starts, ends, tids)
            if inferred and plan.infer_ok is not None:  # the request's filters hold for them
                inferred = tuple([x for x in inferred if plan.infer_ok(x)])
            if len(kept) != len(mentioned) or not kept.issuperset(mentioned):
                records = [r for r in records if r[2] in kept]
                mentioned = [x for x in mentioned if x in kept]
        cdef tuple mentions = ()
        cdef Py_ssize_t s, e
        cdef dict info = self.info
        cdef PyObject *hit
        cdef object ci
        if o.include_mentions and records:
            out = []
            for r in records:
                c = <tuple>r[3]
                s = <Py_ssize_t>starts[<Py_ssize_t>r[0]]
                e = <Py_ssize_t>ends[<Py_ssize_t>r[1] - 1]
                hit = PyDict_GetItem(info, r[2])
                ci = <object>hit if hit is not NULL else self.concept_info(r[2])
                out.append(self._mention(r[2], ci[0], text[s:e], s, e, c[4], ci[1],
                                         c[3].sab, r[4], row))
            mentions = tuple(out)
        return self._annotation(id, mentions, (*mentioned, *inferred), row)


# -- negation ----------------------------------------------------------------------------------

@cython.auto_pickle(False)
cdef class NegationScanner:
    """``negation.NegationDetector.negated_tokens`` with the interpreter out of the loop; the
    detector's rules are read through its public accessors (``phrase_table``,
    ``trigger_words``, ``scope_limit``, ``list_words``, ``kinds``, ``category_names``,
    ``sentence_breaks``, ``header_breaks``, ``header_crossing``, ``phrase_breaks``,
    ``list_breaks``, ``forward_scope``, ``backward_scope``). Same loops as the reference: find
    the phrases, mark the breaks, then walk each trigger's scope (every category's)."""

    cdef dict table
    cdef frozenset triggers
    cdef frozenset list_words
    cdef Py_ssize_t limit          # -1: to the end of the sentence
    cdef int k_forward, k_backward, k_bidi, k_clause, k_close, k_location
    cdef int header_crossing       # categories (a bit each) whose scopes cross a header break
    cdef readonly int forward_bit, backward_bit, categories
    cdef CharSet sentence_breaks   # end every scope (sentence punctuation but header breaks)
    cdef CharSet header_breaks     # end the scopes of the categories that do not cross them
    cdef CharSet phrase_breaks     # no trigger phrase spans them
    cdef CharSet list_breaks       # end a location phrase; start a closing word's item

    def __init__(self, detector):
        kinds = detector.kinds
        self.table = detector.phrase_table
        self.triggers = detector.trigger_words
        self.list_words = frozenset(detector.list_words)
        self.limit = detector.scope_limit
        self.k_forward = kinds.FORWARD
        self.k_backward = kinds.BACKWARD
        self.k_bidi = kinds.BIDIRECTIONAL
        self.k_clause = kinds.CLAUSE
        self.k_close = kinds.CLOSE
        self.k_location = kinds.LOCATION
        self.forward_bit = detector.forward_scope
        self.backward_bit = detector.backward_scope
        self.categories = len(detector.category_names)
        cats = detector.category_names
        if (1 << cats.NEGATED, 1 << cats.HYPOTHETICAL, 1 << cats.HISTORICAL,
                1 << cats.OTHER_EXPERIENCER) != (
                _CTX_NEGATED, _CTX_HYPOTHETICAL, _CTX_HISTORICAL, _CTX_OTHER) or (
                self.categories != 4):  # (two bits a category in a char, and FastPath's bits)
            raise ValueError("negation.Category changed; update the compiled scanner")
        self.header_crossing = detector.header_crossing
        _charset_init(&self.sentence_breaks,
                      frozenset(detector.sentence_breaks) - frozenset(detector.header_breaks),
                      "sentence_breaks")
        _charset_init(&self.header_breaks, detector.header_breaks, "header_breaks")
        _charset_init(&self.phrase_breaks, detector.phrase_breaks, "phrase_breaks")
        _charset_init(&self.list_breaks, detector.list_breaks, "list_breaks")

    cdef inline bint _trigger(self, int kind) noexcept:
        return (kind == self.k_forward or kind == self.k_backward or kind == self.k_bidi
                or kind == self.k_clause)

    cpdef object negated_tokens(self, str text, list norms, list starts, list ends):
        if text is None or norms is None or starts is None or ends is None:
            raise TypeError("text, norms, starts and ends must not be None")
        if self.triggers.isdisjoint(norms):
            return None
        cdef Py_ssize_t n = PyList_GET_SIZE(norms), i = 0, L, q, t, s, e, h, nh = 0, item
        cdef PyObject *hit
        cdef tuple ph, entry
        cdef int kind, cat, own, fbit, bbit
        cdef bint ok, any_trigger = False, any_out = False, inside, fwd, bwd, crosses
        cdef Py_ssize_t *hs = <Py_ssize_t *>malloc((n + 1) * sizeof(Py_ssize_t))
        cdef Py_ssize_t *he = <Py_ssize_t *>malloc((n + 1) * sizeof(Py_ssize_t))
        cdef int *hk = <int *>malloc((n + 1) * sizeof(int))
        cdef int *hc = <int *>malloc((n + 1) * sizeof(int))
        cdef int *hm = <int *>malloc((n + 1) * sizeof(int))
        cdef int *head = <int *>malloc((n + 1) * sizeof(int))
        cdef int *head_cat = <int *>malloc((n + 1) * sizeof(int))
        cdef char *stop = <char *>malloc(n + 1)
        cdef char *brk = <char *>malloc(n + 1)
        cdef char *hdr = <char *>malloc(n + 1)
        cdef char *comma = <char *>malloc(n + 1)
        cdef char *loc = <char *>malloc(n + 1)
        cdef unsigned char *out = <unsigned char *>malloc(n + 1)
        try:
            if (hs is NULL or he is NULL or hk is NULL or hc is NULL or hm is NULL
                    or head is NULL or head_cat is NULL or stop is NULL or brk is NULL
                    or hdr is NULL or comma is NULL or loc is NULL or out is NULL):
                raise MemoryError()
            while i < n:
                hit = PyDict_GetItem(self.table, <object>PyList_GET_ITEM(norms, i))
                if hit is NULL:
                    i += 1
                    continue
                for entry in <list>hit:
                    ph = <tuple>entry[0]
                    L = PyTuple_GET_SIZE(ph)
                    if i + L > n:
                        continue
                    ok = True
                    for q in range(L):
                        if <str>PyList_GET_ITEM(norms, i + q) != <str>PyTuple_GET_ITEM(ph, q):
                            ok = False
                            break
                    if not ok:
                        continue
                    for t in range(i + 1, i + L):
                        if _gap_has(text, <Py_ssize_t>ends[t - 1], <Py_ssize_t>starts[t],
                                    &self.phrase_breaks):
                            ok = False
                            break
                    if not ok:
                        continue
                    kind = <int>entry[1]
                    hs[nh], he[nh], hk[nh] = i, i + L, kind
                    hc[nh], hm[nh] = <int>entry[2], <int>entry[3]
                    nh += 1
                    if self._trigger(kind):
                        any_trigger = True
                    i += L
                    break
                else:
                    i += 1
            if not any_trigger:
                return None
            memset(stop, 0, n + 1)
            memset(brk, 0, n + 1)
            memset(hdr, 0, n + 1)
            memset(comma, 0, n + 1)
            memset(out, 0, n + 1)
            for t in range(n + 1):
                head[t] = -1
                head_cat[t] = -1
            for h in range(nh):
                head[hs[h]] = hk[h]
                head_cat[hs[h]] = hc[h]
                for t in range(hs[h], he[h]):
                    stop[t] |= <char>hm[h]
            for t in range(1, n):
                if _gap_has(text, <Py_ssize_t>ends[t - 1], <Py_ssize_t>starts[t],
                            &self.sentence_breaks):
                    brk[t] = 1
                if _gap_has(text, <Py_ssize_t>ends[t - 1], <Py_ssize_t>starts[t],
                            &self.header_breaks):
                    hdr[t] = 1
                if _gap_has(text, <Py_ssize_t>ends[t - 1], <Py_ssize_t>starts[t],
                            &self.list_breaks):
                    comma[t] = 1
            inside = False
            for t in range(n):
                if head[t] == self.k_location:
                    inside = True
                elif (brk[t] or hdr[t] or comma[t] or stop[t]
                      or <object>PyList_GET_ITEM(norms, t) in self.list_words):
                    inside = False
                loc[t] = inside
            for h in range(nh):
                s, e, kind, cat = hs[h], he[h], hk[h], hc[h]
                if not self._trigger(kind):
                    continue
                own = 1 << cat
                fbit = self.forward_bit << (2 * cat)
                bbit = self.backward_bit << (2 * cat)
                crosses = (self.header_crossing & own) != 0
                if kind == self.k_clause:
                    # backward when the trigger ends its clause; forward when the clause goes
                    # on, unless another phrase comes right before it
                    if e >= n or brk[e] or hdr[e] or comma[e]:
                        fwd, bwd = False, True
                    elif s > 0 and not (brk[s] or hdr[s]) and stop[s - 1]:
                        continue
                    else:
                        fwd, bwd = True, False
                else:
                    fwd = kind == self.k_forward or kind == self.k_bidi
                    bwd = kind == self.k_backward or kind == self.k_bidi
                if fwd:
                    t = e
                    item = -1  # first token after the last comma in the scope
                    while (t < n and t - e != self.limit and not brk[t]
                           and (crosses or not hdr[t]) and not (stop[t] & own)):
                        if comma[t] and t > e:
                            item = t
                        if not loc[t]:
                            out[t] |= fbit
                        t += 1
                    if (t < n and head[t] == self.k_close and head_cat[t] == cat
                            and not brk[t] and not hdr[t] and item >= 0):
                        for q in range(item, t):
                            out[q] &= ~fbit
                if bwd:
                    t = s - 1
                    while (t >= 0 and s - 1 - t != self.limit and not brk[t + 1]
                           and (crosses or not hdr[t + 1]) and not (stop[t] & own)):
                        if not loc[t]:
                            out[t] |= bbit
                        t -= 1
            for t in range(n):
                if out[t]:
                    any_out = True
                    break
            if not any_out:
                return None
            return [<int>out[t] for t in range(n)]
        finally:
            free(hs)
            free(he)
            free(hk)
            free(hc)
            free(hm)
            free(head)
            free(head_cat)
            free(stop)
            free(brk)
            free(hdr)
            free(comma)
            free(loc)
            free(out)


# -- profiles ----------------------------------------------------------------------------------

@cython.auto_pickle(False)
cdef class ProfileRunner:
    """``profile.Profile.apply`` for one compiled profile, with the interpreter out of the
    loop; returns ``(kept, inferred)`` like the reference's ``ProfileResult``. The profile is
    read through its public attributes (``phrase_table``, ``slots``, ``vocabulary``, ``drop``).

    Built with ``vocab`` (an extractor's token vocabulary, which this adds the phrases'
    tokens to: only before the extractor tokenises anything), evidence phrases are also kept
    as a trie, and :meth:`apply_ids` finds them from the caption's token ids.
    """

    cdef dict phrases
    cdef tuple slots  # per slot: (member_set, priority, max, mention_weight, when,
    #                              keep_mentioned, defaults, cui_evidence)
    cdef object vocabulary
    cdef frozenset drop
    cdef _KeyTrie trie

    def __init__(self, profile, _Vocab vocab=None):
        self.phrases = profile.phrase_table
        self.slots = tuple(
            (s.member_set, s.priority, s.max, s.mention_weight, s.when, s.keep_mentioned,
             s.defaults, s.cui_evidence)
            for s in profile.slots
        )
        self.vocabulary = profile.vocabulary
        self.drop = profile.drop
        self.trie = None
        if vocab is not None and self.phrases:
            self.trie = _trie_of({k: (v if v else None) for k, v in self.phrases.items()},
                                 vocab)

    cdef int _credit(self, dict scores, tuple targets, str text, Py_ssize_t s,
                     Py_ssize_t e) except -1:
        """Add one distinct evidence phrase's weights (``text[s:e]`` is its surface)."""
        cdef int upper = -1
        cdef tuple tg
        cdef PyObject *prev
        cdef dict slot_scores
        for tg in targets:
            if tg[3]:  # a term written in capitals must be written so in the caption
                if upper < 0:
                    upper = text[s:e].isupper()
                if not upper:
                    continue
            prev = PyDict_GetItem(scores, tg[0])
            if prev is NULL:
                scores[tg[0]] = {tg[1]: tg[2]}
            else:
                slot_scores = <dict>prev
                slot_scores[tg[1]] = slot_scores.get(tg[1], 0.0) + tg[2]
        return 0

    cdef dict _evidence(self, str text, list norms, list starts, list ends):
        """``Profile._evidence_scores``: per slot, member → summed weight of the distinct
        evidence phrases in the caption."""
        cdef dict scores = {}
        cdef set seen = set()
        cdef dict table = self.phrases
        cdef Py_ssize_t n = PyList_GET_SIZE(norms), i, j
        cdef PyObject *hit
        cdef str key
        cdef tuple targets
        for i in range(n):
            key = <str>PyList_GET_ITEM(norms, i)
            hit = PyDict_GetItem(table, key)
            j = i + 1
            while hit is not NULL:
                targets = <tuple>hit
                if PyTuple_GET_SIZE(targets) and key not in seen:
                    seen.add(key)
                    self._credit(scores, targets, text, <Py_ssize_t>starts[i],
                                 <Py_ssize_t>ends[j - 1])
                if j >= n:
                    break
                key = key + u" " + <str>PyList_GET_ITEM(norms, j)
                hit = PyDict_GetItem(table, key)
                j += 1
        return scores

    cdef dict _evidence_ids(self, str text, list starts, list ends, const int32_t *tids,
                            Py_ssize_t n):
        """:meth:`_evidence` over token ids (``tids[t]`` from the shared vocabulary)."""
        cdef dict scores = {}
        cdef _KeyTrie trie = self.trie
        cdef list values = trie.values
        cdef Py_ssize_t i, j, k, n_seen = 0
        cdef int32_t node
        cdef int32_t seen[64]
        cdef object targets
        cdef bint new
        for i in range(n):
            if tids[i] < 0:
                continue
            node = trie.child(0, tids[i])
            j = i + 1
            while node >= 0:
                targets = <object>PyList_GET_ITEM(values, node)
                if targets is not None:
                    new = True
                    for k in range(n_seen if n_seen < 64 else 64):
                        if seen[k] == node:
                            new = False
                            break
                    if new and n_seen >= 64:  # more distinct phrases than the array holds
                        return None  # (the caller then runs _evidence)
                    if new:
                        seen[n_seen] = node
                        n_seen += 1
                        self._credit(scores, <tuple>targets, text, <Py_ssize_t>starts[i],
                                     <Py_ssize_t>ends[j - 1])
                if j >= n or tids[j] < 0:
                    break
                node = trie.child(node, tids[j])
                j += 1
        return scores

    cpdef tuple apply(self, list mentioned, str text, list norms, list starts, list ends):
        if mentioned is None or text is None or norms is None or starts is None or ends is None:
            raise TypeError("mentioned, text, norms, starts and ends must not be None")
        cdef dict evidence = self._evidence(text, norms, starts, ends) if self.phrases else {}
        return self._slots(mentioned, evidence)

    cdef tuple apply_ids(self, list mentioned, str text, list norms, list starts, list ends,
                         const int32_t *tids):
        cdef dict evidence = None
        if not self.phrases:
            evidence = {}
        elif self.trie is not None:
            evidence = self._evidence_ids(text, starts, ends, tids, PyList_GET_SIZE(norms))
        if evidence is None:
            evidence = self._evidence(text, norms, starts, ends)
        return self._slots(mentioned, evidence)

    cdef tuple _slots(self, list mentioned, dict evidence):
        """The slots, vocabulary and drop list of ``Profile.apply``, in its order."""
        cdef set present = set(mentioned)
        cdef list inferred = [], chosen, ranked
        cdef dict score, priority
        cdef tuple slot, ev_t, cui_evidence
        cdef frozenset members, when
        cdef Py_ssize_t si = -1, k
        cdef object sc, c, v
        cdef bint any_member, any_cui_evidence
        for slot in self.slots:
            si += 1
            members = <frozenset>slot[0]
            when = <frozenset>slot[4]
            if when and present.isdisjoint(when):
                if not slot[5] and not present.isdisjoint(members):
                    present -= members
                if inferred:
                    inferred = [x for x in inferred if x not in members]
                continue
            sc = evidence.get(si) if evidence else None
            any_member = not present.isdisjoint(members)
            cui_evidence = <tuple>slot[7]
            any_cui_evidence = False
            for ev_t in cui_evidence:
                if ev_t[0] in present:
                    any_cui_evidence = True
                    break
            if not sc and not any_member and not any_cui_evidence:
                # nothing for this slot in the caption: only a default can apply (the
                # reference computes an empty score and reaches the same point)
                chosen = []
            else:
                score = dict(sc) if sc else {}
                if any_member:
                    for c in present & members:
                        score[c] = score.get(c, 0.0) + slot[3]
                for ev_t in cui_evidence:
                    if ev_t[0] in present:
                        score[ev_t[1]] = score.get(ev_t[1], 0.0) + ev_t[2]
                if len(score) > 1:
                    priority = <dict>slot[1]
                    ranked = []
                    k = 0
                    for c, v in score.items():
                        if v > 0:
                            ranked.append((-v, priority[c], k, c))
                            k += 1
                    ranked.sort()
                    chosen = [ev_t[3] for ev_t in ranked[:<Py_ssize_t>slot[2]]]
                else:
                    chosen = [c for c, v in score.items() if v > 0]
            if not chosen:
                for ev_t in <tuple>slot[6]:
                    if not ev_t[1] or not present.isdisjoint(ev_t[1]):
                        chosen = [ev_t[0]]
                        break
            if any_member:
                present -= members
            if inferred:
                inferred = [x for x in inferred if x not in members]
            for c in chosen:
                if c not in present:
                    present.add(c)
                    if c not in mentioned:
                        inferred.append(c)
        if self.vocabulary is not None and not self.vocabulary.issuperset(present):
            present &= self.vocabulary  # (set &= builds a new table: only when it drops some)
        if self.drop and not present.isdisjoint(self.drop):
            present -= self.drop
        return present, (tuple([x for x in inferred if x in present]) if inferred else ())
