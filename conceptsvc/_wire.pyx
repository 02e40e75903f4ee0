# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True
"""Compiled protobuf writer of the annotation path (Cython): engine results to wire bytes.

Why it exists: building an ``AnnotateResponse`` field by field costs a Python call per field
of every mention, and serialising it walks the message again; on the batched path that was
most of the server's per-caption overhead beside the engine itself. This module writes the
bytes directly from the :class:`~conceptsvc.model.Annotation` dataclasses.

One source of the layout: nothing here knows a field number or a field name. The layout —
which attribute goes to which field number as which wire kind — is derived from the .proto's
descriptors by :mod:`conceptsvc.wire` (``wire.annotation_layout``) and handed over at
construction; ``wire`` also holds the pure-Python writer with the same output, which is the
reference (``tests/test_wire.py`` holds the three — this writer, the reference and protobuf's
own serialisation — to the same bytes). It is a separate extension from ``_speedups`` on
purpose: the matcher changes often, this does not.

The bytes are protobuf's canonical encoding (fields in number order, proto3 defaults left
out), so they equal ``annotation_to_pb(a).SerializeToString()``. Doubles are written in the
machine's byte order, which must be little-endian as protobuf's is (checked at import).

The server hands the writer the engine's rows (``encode_rows``: each mention a tuple of the
Mention's fields, ``Extractor.extract_rows``) rather than Annotation objects, so that no
object is built only to be read back; ``encode`` keeps taking Annotations.

One more wire format, Redis's: ``RespPacker`` packs the cache tier's commands (see
:mod:`conceptsvc.cache`).

The other direction, for the clients: ``BatchReader`` reads AnnotateBatch replies into the
journal's JSON form (``conceptsvc annotate``), ``ResultReader`` into the domain objects
``ConceptClient`` returns; parsing them with protobuf and converting each message field by field
cost the client more CPU a caption than the server spent on it. A reply is a server's bytes,
not trusted: the readers accept and refuse what protobuf does, with its error (see "reading").
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

# Wire kinds of a field (the numbers are wire.KIND_*; wire.py hands them over). The integer
# kinds are written alike; a reader keeps of a varint what protobuf keeps for the field's type.
cdef enum:
    K_STRING = 0
    K_VARINT = 1  # int64
    K_DOUBLE = 2
    K_BOOL = 3
    K_STRINGS = 4
    K_INT32 = 5
    K_UINT32 = 6
    K_UINT64 = 7
    N_KINDS = 8


cdef inline bint _is_int(int kind) noexcept:
    return kind == K_VARINT or kind == K_INT32 or kind == K_UINT32 or kind == K_UINT64


cdef inline int _wire_type(int kind) noexcept:
    """The protobuf wire type of a field of this kind."""
    if kind == K_DOUBLE:
        return 1
    if kind == K_STRING or kind == K_STRINGS:
        return 2
    return 0

cdef enum:
    MAX_FIELDS = 64

cdef extern from *:
    """
    /* Read one __slots__ field through its member descriptor (no attribute lookup). */
    static PyObject *__w_get_slot(PyObject *descr, PyObject *obj) {
        return Py_TYPE(descr)->tp_descr_get(descr, obj, (PyObject *)Py_TYPE(obj));
    }
    """
    object _get_slot "__w_get_slot"(object descr, object obj)

cdef double _probe = 1.0
cdef unsigned char* _probe_bytes = <unsigned char*>&_probe
if _probe_bytes[7] != 0x3F:
    raise ImportError("conceptsvc._wire writes doubles little-endian; this machine is not")


cdef class _Buf:
    """A growable byte buffer."""

    cdef char* p
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    def __cinit__(self):
        self.cap = 1024
        self.n = 0
        self.p = <char*>PyMem_Malloc(self.cap)
        if self.p == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.p)

    cdef int reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self.n + extra
        cdef Py_ssize_t cap = self.cap
        cdef char* q
        if need <= cap:
            return 0
        while cap < need:
            cap *= 2
        q = <char*>PyMem_Realloc(self.p, cap)
        if q == NULL:
            raise MemoryError()
        self.p = q
        self.cap = cap
        return 0

    cdef inline void put_varint(self, uint64_t v) noexcept:
        # The caller has reserved 10 bytes.
        while v >= 0x80:
            self.p[self.n] = <char>((v & 0x7F) | 0x80)
            self.n += 1
            v >>= 7
        self.p[self.n] = <char>v
        self.n += 1

    cdef int delimited(self, uint64_t tag, const char* s, Py_ssize_t size) except -1:
        self.reserve(20 + size)
        self.put_varint(tag)
        self.put_varint(<uint64_t>size)
        memcpy(self.p + self.n, s, size)
        self.n += size
        return 0

    cdef int string(self, uint64_t tag, object s) except -1:
        cdef Py_ssize_t size
        cdef const char* c = PyUnicode_AsUTF8AndSize(s, &size)
        return self.delimited(tag, c, size)

    cdef bytes take(self):
        out = PyBytes_FromStringAndSize(self.p, self.n)
        self.n = 0
        return out


cdef class AnnotationWriter:
    """Serialises an Annotation's mentions and concepts as AnnotateResponse bytes (no id)."""

    cdef list attrs
    cdef list getters  # by field: the mention type's slot descriptor
    cdef object mention_type
    cdef uint64_t tags[MAX_FIELDS]
    cdef int kinds[MAX_FIELDS]
    cdef int n_fields
    cdef uint64_t mentions_tag
    cdef uint64_t concepts_tag
    cdef int row_index[MAX_FIELDS]  # by field: its position in a mention row (encode_rows)
    cdef Py_ssize_t row_len  # the mention type's slot count; -1: no rows

    def __init__(self, mention_layout, int mentions_field, int concepts_field,
                 mention_type=None):
        """``mention_layout``: ``(attribute, field number, kind)`` per Mention field, in field
        number order; the two numbers are AnnotateResponse's ``mentions`` and ``concepts``.
        With ``mention_type`` (a class with a slot for every attribute), mentions of exactly
        that type are read through its slot descriptors rather than by attribute lookup."""
        cdef int i
        layout = list(mention_layout)
        if len(layout) > MAX_FIELDS:
            raise ValueError(f"at most {MAX_FIELDS} mention fields")
        self.attrs = []
        self.getters = []
        self.mention_type = mention_type
        slots = tuple(getattr(mention_type, "__slots__", ())) if mention_type is not None else ()
        self.row_len = len(slots) if slots else -1
        for i, (attr, number, kind) in enumerate(layout):
            if not 0 <= kind < N_KINDS:
                raise ValueError(f"unknown wire kind {kind!r} for {attr}")
            if mention_type is not None:
                self.getters.append(mention_type.__dict__[attr])
            if slots:
                self.row_index[i] = slots.index(attr)
            self.attrs.append(attr)
            self.kinds[i] = kind
            self.tags[i] = (<uint64_t>number << 3) | _wire_type(kind)
        self.n_fields = len(layout)
        self.mentions_tag = (<uint64_t>mentions_field << 3) | 2
        self.concepts_tag = (<uint64_t>concepts_field << 3) | 2

    cdef int _field(self, _Buf b, int i, object v) except -1:
        """Field ``i`` of the layout, value ``v`` (left out when it is proto3's default)."""
        cdef int kind = self.kinds[i]
        cdef uint64_t tag = self.tags[i], bits
        cdef int64_t iv
        cdef double dv
        if kind == K_STRING:
            if len(<str?>v):  # checked: a row's values are not typed slots
                b.string(tag, v)
        elif _is_int(kind):
            iv = v
            if iv:
                b.reserve(20)
                b.put_varint(tag)
                b.put_varint(<uint64_t>iv)
        elif kind == K_DOUBLE:
            dv = v
            memcpy(&bits, &dv, 8)
            if bits:
                b.reserve(18)
                b.put_varint(tag)
                memcpy(b.p + b.n, &dv, 8)
                b.n += 8
        elif kind == K_BOOL:
            if v:
                b.reserve(11)
                b.put_varint(tag)
                b.p[b.n] = 1
                b.n += 1
        else:
            for s in v:
                b.string(tag, s)
        return 0

    cdef int _mention(self, _Buf out, _Buf b, object m) except -1:
        cdef int i
        cdef bint slots = type(m) is self.mention_type
        b.n = 0
        for i in range(self.n_fields):
            if slots:
                v = _get_slot(self.getters[i], m)
            else:
                v = getattr(m, <str>self.attrs[i])
            self._field(b, i, v)
        out.delimited(self.mentions_tag, b.p, b.n)
        return 0

    cdef int _row(self, _Buf out, _Buf b, tuple row) except -1:
        cdef int i
        if len(row) != self.row_len:
            raise ValueError(f"a mention row has {len(row)} values, not {self.row_len}")
        b.n = 0
        for i in range(self.n_fields):
            self._field(b, i, <object>PyTuple_GET_ITEM(row, self.row_index[i]))
        out.delimited(self.mentions_tag, b.p, b.n)
        return 0

    def encode(self, annotation):
        """The caption's result as AnnotateResponse fields ``mentions`` and ``concepts``."""
        return self._encode(annotation.mentions, annotation.concepts, False)

    def encode_rows(self, tuple parts not None):
        """:meth:`encode` of ``(mentions, concepts)`` whose mentions are tuples of the mention
        type's fields in its ``__slots__`` order (``Extractor.extract_rows``): the same bytes
        as the Annotation those values make."""
        if self.row_len < 0:
            raise TypeError("this writer was built without a mention type with __slots__")
        mentions, concepts = parts
        return self._encode(mentions, concepts, True)

    cdef bytes _encode(self, object mentions, object concepts, bint rows):
        # Buffers per call, not per writer: one writer serves every RPC thread of a worker.
        cdef _Buf out = _Buf()
        cdef _Buf scratch
        if mentions:
            scratch = _Buf()
            for m in mentions:
                if rows:
                    self._row(out, scratch, m)
                else:
                    self._mention(out, scratch, m)
        for c in concepts:
            out.string(self.concepts_tag, c)
        return out.take()


cdef class ItemJoiner:
    """Frames per-caption bytes as the items of an AnnotateBatchResponse; see
    ``wire.ItemJoinerPy``, the reference, for what an item holds."""

    cdef uint64_t item_tag
    cdef uint64_t id_tag
    cdef bytes cached_field

    def __init__(self, int items_field, int id_field, bytes cached_field):
        self.item_tag = (<uint64_t>items_field << 3) | 2
        self.id_tag = (<uint64_t>id_field << 3) | 2
        self.cached_field = cached_field

    def join(self, list blobs, list ids, cached, bytes tail):
        cdef _Buf b = _Buf()
        cdef Py_ssize_t i, n = len(blobs), size, id_size, blob_size
        cdef Py_ssize_t tail_size = PyBytes_GET_SIZE(tail)
        cdef Py_ssize_t cached_size = PyBytes_GET_SIZE(self.cached_field)
        cdef const char* id_c
        cdef const unsigned char[:] flags = cached
        cdef bytes blob
        if len(ids) != n or flags.shape[0] != n:
            raise ValueError("join: blobs, ids and cached differ in length")
        for i in range(n):
            blob = <bytes>blobs[i]
            blob_size = PyBytes_GET_SIZE(blob)
            id_c = PyUnicode_AsUTF8AndSize(<str>ids[i], &id_size)
            size = blob_size + tail_size
            if id_size:
                size += _varint_len(self.id_tag) + _varint_len(<uint64_t>id_size) + id_size
            if flags[i]:
                size += cached_size
            b.reserve(size + 20)
            b.put_varint(self.item_tag)
            b.put_varint(<uint64_t>size)
            memcpy(b.p + b.n, PyBytes_AS_STRING(blob), blob_size)
            b.n += blob_size
            if id_size:
                b.put_varint(self.id_tag)
                b.put_varint(<uint64_t>id_size)
                memcpy(b.p + b.n, id_c, id_size)
                b.n += id_size
            if flags[i]:
                memcpy(b.p + b.n, PyBytes_AS_STRING(self.cached_field), cached_size)
                b.n += cached_size
            memcpy(b.p + b.n, PyBytes_AS_STRING(tail), tail_size)
            b.n += tail_size
        return b.take()


cdef inline int _varint_len(uint64_t v) noexcept:
    cdef int n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


# -- reading ---------------------------------------------------------------------------------
# The readers take their bytes from a server, so a reply is not trusted: every length and
# fixed-width field is checked against the bytes left before a position moves, in unsigned
# arithmetic (a length of 2**63 or more cast to Py_ssize_t would be negative, pass a "past the
# end" test and move the position before the buffer). What protobuf accepts, they accept, and
# read as protobuf reads it (a field of an unexpected wire type is an unknown field; unknown
# groups are skipped, nested at most as deep as protobuf allows); what protobuf refuses, they
# refuse with protobuf's error (``decode_error``, handed over by ``wire``).
cdef extern from "Python.h":
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)

cdef enum:
    MAX_NUMBER = 64  # field numbers a reader maps (Mention's are small)
    INTERN_SLOTS = 4096  # strings a ResultReader shares between answers (a power of two)
    INTERN_MAX = 64  # bytes of the longest string it shares


class _Corrupt(Exception):
    """The bytes are not a well-formed message (raised inside; a reader's ``read`` turns it
    into protobuf's error)."""


cdef inline uint64_t _read_varint(const unsigned char* p, Py_ssize_t n, Py_ssize_t* pos) except? 0:
    """A varint of at most 10 bytes, as protobuf reads one (bits past the 64th are dropped)."""
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef unsigned char b
    while True:
        if pos[0] >= n:
            raise _Corrupt("truncated varint")
        b = p[pos[0]]
        pos[0] += 1
        v |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            return v
        shift += 7
        if shift >= 64:
            raise _Corrupt("varint too long")


cdef inline uint64_t _read_key(const unsigned char* p, Py_ssize_t n, Py_ssize_t* pos) except 0:
    """A field's key, as protobuf takes one: at most 5 bytes and 32 bits, field number not 0."""
    cdef Py_ssize_t at = pos[0]
    cdef uint64_t key
    if at < n and 8 <= p[at] < 0x80:  # one byte (field numbers 1 to 15): nearly every key
        pos[0] = at + 1
        return p[at]
    key = _read_varint(p, n, pos)
    if pos[0] - at > 5 or key > 0xFFFFFFFFULL or key < 8:
        raise _Corrupt("bad key")
    return key


cdef inline Py_ssize_t _read_size(const unsigned char* p, Py_ssize_t n, Py_ssize_t* pos) except -1:
    """A length prefix, refused unless that many bytes are left: compared as unsigned numbers
    before anything is added to a position."""
    cdef uint64_t size = _read_varint(p, n, pos)
    if size > <uint64_t>(n - pos[0]):
        raise _Corrupt("truncated field")
    return <Py_ssize_t>size


cdef inline int _need(Py_ssize_t n, Py_ssize_t pos, Py_ssize_t width) except -1:
    """A fixed-width field of ``width`` bytes at ``pos`` must end by ``n``."""
    if width > n - pos:
        raise _Corrupt("truncated field")
    return 0


cdef Py_ssize_t _skip(const unsigned char* p, Py_ssize_t n, Py_ssize_t pos, uint64_t key,
                      int depth) except -1:
    """The position after the value of the field whose ``key`` was read last (at ``pos``):
    an unknown field, or a known one of another wire type. ``depth``: how many more levels
    of groups may open here."""
    cdef int wt = <int>(key & 7)
    cdef uint64_t inner
    cdef Py_ssize_t size
    if wt == 0:
        _read_varint(p, n, &pos)
    elif wt == 1:
        _need(n, pos, 8)
        pos += 8
    elif wt == 2:
        size = _read_size(p, n, &pos)
        pos += size
    elif wt == 5:
        _need(n, pos, 4)
        pos += 4
    elif wt == 3:  # a group: fields up to the end-group key of the same number
        if depth < 1:
            raise _Corrupt("nested too deep")
        while True:
            inner = _read_key(p, n, &pos)  # (the end of the bytes first: not terminated)
            if (inner & 7) == 4:
                if (inner >> 3) != (key >> 3):
                    raise _Corrupt("mismatched end of group")
                return pos
            pos = _skip(p, n, pos, inner, depth - 1)
    else:  # 4, an end of group with none open; 6 and 7 are no wire type
        raise _Corrupt("bad wire type")
    return pos


cdef class _MentionFields:
    """What both readers share: the reply layout (the field numbers of an item, and the slot
    each Mention field number fills, its wire kind, its default), the walk of a reply's items
    and of one item's fields, and the parse of one Mention message into values by slot. Each
    reader says what a mention, an item and the index hash become (``_item_mention``,
    ``_item``, ``_index_hash``) and how a string is made (``_string``).

    A ``depth`` argument is how many more levels of messages and groups protobuf would let
    open below the message being read (``max_depth`` for the reply itself)."""

    cdef int f_items, f_id, f_mentions, f_concepts, f_status, f_code, f_cached, f_hash
    cdef int n_slots
    cdef int slot_of[MAX_NUMBER]
    cdef int kinds[MAX_NUMBER]  # by slot
    cdef list defaults  # by slot, for a field absent (or an empty string); BatchReader copies
    # a list default per mention
    cdef bint status_string[MAX_NUMBER]  # by ItemStatus field number: a string (UTF-8 checked)
    cdef int max_depth
    cdef object decode_error  # (batch, bad UTF-8) -> the exception protobuf would raise

    cdef int _rules(self, tuple status_strings, int max_depth, object decode_error) except -1:
        """What protobuf checks that the layout does not say: ItemStatus's string fields,
        how deep it lets messages nest, the error it raises."""
        cdef int i
        for i in range(MAX_NUMBER):
            self.status_string[i] = False
        for number in status_strings:
            if not 0 < number < MAX_NUMBER:
                raise ValueError(f"ItemStatus field number {number} is out of range")
            self.status_string[number] = True
        if max_depth < 2:
            raise ValueError("max_depth: a reply's mentions are two levels deep")
        self.max_depth = max_depth
        self.decode_error = decode_error
        return 0

    cdef str _string(self, const unsigned char* p, Py_ssize_t size):
        return PyUnicode_DecodeUTF8(<const char*>p, size, NULL)

    cdef str _index_hash(self, const unsigned char* p, Py_ssize_t size):
        return PyUnicode_DecodeUTF8(<const char*>p, size, NULL)

    cdef object _item_mention(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                              bint as_json, int depth):
        raise NotImplementedError

    cdef object _item(self, bytes data, const unsigned char* p, Py_ssize_t start,
                      Py_ssize_t end, bint as_json, int depth):
        raise NotImplementedError

    cdef object _reply(self, bytes data, bint batch, bint as_json):
        """The items of an AnnotateBatchResponse (``batch``) or the one item of an
        AnnotateResponse. Bytes protobuf would refuse raise the error it raises."""
        try:
            if batch:
                return self._items(data, as_json)
            return self._item(data, <const unsigned char*>PyBytes_AS_STRING(data), 0,
                              PyBytes_GET_SIZE(data), as_json, self.max_depth)
        except _Corrupt:
            raise self.decode_error(batch, False) from None
        except UnicodeDecodeError:
            raise self.decode_error(batch, True) from None

    cdef list _items(self, bytes data, bint as_json):
        """``_item`` of each item of an AnnotateBatchResponse, in order."""
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), pos = 0, size
        cdef uint64_t key
        out = []
        while pos < n:
            key = _read_key(p, n, &pos)
            if <int>(key >> 3) == self.f_items and (key & 7) == 2:
                size = _read_size(p, n, &pos)
                out.append(self._item(data, p, pos, pos + size, as_json, self.max_depth - 1))
                pos += size
            else:
                pos = _skip(p, n, pos, key, self.max_depth)
        return out

    cdef tuple _item_fields(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                            bint as_json, int depth):
        """One AnnotateResponse's ``(id, index hash, status code, cached, concepts,
        mentions)``, the mentions as ``_item_mention`` makes them."""
        cdef Py_ssize_t pos = start, size, sub_end, spos, ssize
        cdef uint64_t key
        cdef int32_t code = 0  # (ItemStatus.code is an int32)
        cdef int number, wt, snumber, swt
        cdef bint cached = False
        rid = ""
        ix = ""
        mentions = []
        concepts = []
        while pos < end:
            key = _read_key(p, end, &pos)
            number = <int>(key >> 3)
            wt = <int>(key & 7)
            if wt == 2 and (number == self.f_id or number == self.f_mentions
                            or number == self.f_concepts or number == self.f_status
                            or number == self.f_hash):
                size = _read_size(p, end, &pos)
                sub_end = pos + size
                if number == self.f_mentions:
                    mentions.append(self._item_mention(p, pos, sub_end, as_json, depth - 1))
                elif number == self.f_status:
                    spos = pos
                    while spos < sub_end:
                        key = _read_key(p, sub_end, &spos)
                        snumber = <int>(key >> 3)
                        swt = <int>(key & 7)
                        if snumber == self.f_code and swt == 0:
                            code = <int32_t>_read_varint(p, sub_end, &spos)
                        elif swt == 2 and snumber < MAX_NUMBER and self.status_string[snumber]:
                            ssize = _read_size(p, sub_end, &spos)
                            # (not kept: the failed item's bytes are; but protobuf refuses
                            # a reply with a string of bad UTF-8)
                            PyUnicode_DecodeUTF8(<const char*>p + spos, ssize, NULL)
                            spos += ssize
                        else:
                            spos = _skip(p, sub_end, spos, key, depth - 1)
                elif number == self.f_hash:
                    ix = self._index_hash(p + pos, size)
                elif number == self.f_id:
                    rid = PyUnicode_DecodeUTF8(<const char*>p + pos, size, NULL)
                else:
                    concepts.append(self._string(p + pos, size))
                pos = sub_end
            elif wt == 0 and number == self.f_cached:
                cached = _read_varint(p, end, &pos) != 0
            else:
                pos = _skip(p, end, pos, key, depth)
        return rid, ix, code, cached, concepts, mentions

    cdef list _fields(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                      int depth):
        """A Mention message's values by slot, as read: None for a field absent, a list for a
        repeated string."""
        cdef Py_ssize_t pos = start, size
        cdef uint64_t key, bits
        cdef int number, slot, kind
        cdef double dv
        values = [None] * self.n_slots
        while pos < end:
            key = _read_key(p, end, &pos)
            number = <int>(key >> 3)
            slot = self.slot_of[number] if number < MAX_NUMBER else -1
            # (a field of another wire type than its own is an unknown field to protobuf)
            if slot < 0 or <int>(key & 7) != _wire_type(self.kinds[slot]):
                pos = _skip(p, end, pos, key, depth)
                continue
            kind = self.kinds[slot]
            if kind == K_STRING or kind == K_STRINGS:
                size = _read_size(p, end, &pos)
                s = self._string(p + pos, size)
                pos += size
                if kind == K_STRING:
                    values[slot] = s
                elif values[slot] is None:
                    values[slot] = [s]
                else:
                    values[slot].append(s)
            elif kind == K_DOUBLE:
                _need(end, pos, 8)
                memcpy(&dv, p + pos, 8)
                pos += 8
                values[slot] = dv
            else:
                bits = _read_varint(p, end, &pos)
                if kind == K_BOOL:
                    values[slot] = bits != 0
                elif kind == K_INT32:
                    values[slot] = <int32_t>bits
                elif kind == K_UINT32:
                    values[slot] = <uint32_t>bits
                elif kind == K_UINT64:
                    values[slot] = bits
                else:
                    values[slot] = <int64_t>bits
        return values


cdef class BatchReader(_MentionFields):
    """Reads AnnotateBatchResponse bytes straight into the canonical JSON form of each answer
    (``outputs.annotation_to_json``'s dicts, keys in its order), for the batch client; see
    ``wire.batch_reader``, which derives the keys and the layout, and ``wire.BatchReaderPy``,
    the reference."""

    cdef list keys  # the JSON key of each mention slot, in output order
    cdef int round_slot
    cdef object decimals
    cdef tuple top_keys  # JSON text before the id, the concepts and the mentions
    cdef list json_keys  # JSON text before each mention value ('{"cui":', ',"text":', ...)

    def __init__(self, mention_slots, tuple numbers, int round_slot, int decimals,
                 tuple top_keys, list json_keys, tuple status_strings, int max_depth,
                 decode_error):
        """``mention_slots``: ``(json key, field number, kind, default)`` in output order;
        ``numbers``: the field numbers of AnnotateBatchResponse.items, AnnotateResponse id,
        mentions, concepts, status, cached, index_hash and ItemStatus.code; ``top_keys`` and
        ``json_keys``: the JSON text that goes before each value (``wire.batch_reader``
        makes them with ``json.dumps``); ``status_strings``: the numbers of ItemStatus's
        string fields; ``max_depth``: how deep protobuf lets messages and groups nest;
        ``decode_error(batch, bad_utf8)``: the exception protobuf raises for bytes it
        refuses."""
        cdef int i
        slots = list(mention_slots)
        if len(slots) >= MAX_NUMBER:
            raise ValueError(f"at most {MAX_NUMBER - 1} mention fields")
        for i in range(MAX_NUMBER):
            self.slot_of[i] = -1
        self.keys = []
        self.defaults = []
        for i, (key, number, kind, default) in enumerate(slots):
            if not 0 < number < MAX_NUMBER:
                raise ValueError(f"field number {number} of {key} is out of range")
            if not 0 <= kind < N_KINDS:
                raise ValueError(f"unknown wire kind {kind!r} for {key}")
            self.slot_of[number] = i
            self.kinds[i] = kind
            self.keys.append(key)
            self.defaults.append(default)
        self.n_slots = len(slots)
        self.round_slot = round_slot
        self.decimals = decimals
        (self.f_items, self.f_id, self.f_mentions, self.f_concepts, self.f_status,
         self.f_code, self.f_cached, self.f_hash) = numbers
        if len(top_keys) != 3 or len(json_keys) != self.n_slots:
            raise ValueError("top_keys: 3 pieces of JSON; json_keys: one per mention slot")
        self.top_keys = top_keys
        self.json_keys = json_keys
        self._rules(status_strings, max_depth, decode_error)

    cdef object _mention(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                         int depth):
        cdef int i
        values = self._values(p, start, end, depth)
        d = {}
        for i in range(self.n_slots):
            d[self.keys[i]] = values[i]
        return d

    cdef list _values(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                      int depth):
        """A mention's value per slot, defaults filled in, the double rounded."""
        cdef int i
        values = self._fields(p, start, end, depth)
        for i in range(self.n_slots):
            v = values[i]
            if v is None or (self.kinds[i] == K_STRING and not v):
                v = self.defaults[i]
                values[i] = [] if type(v) is list else v
            elif i == self.round_slot:
                values[i] = round(v, self.decimals)
        return values

    cdef object _item_mention(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                              bint as_json, int depth):
        if as_json:
            return self._values(p, start, end, depth)
        return self._mention(p, start, end, depth)

    cdef object _item(self, bytes data, const unsigned char* p, Py_ssize_t start,
                      Py_ssize_t end, bint as_json, int depth):
        rid, ix, code, cached, concepts, mentions = self._item_fields(
            p, start, end, as_json, depth
        )
        if code:
            return (rid, ix, code, cached, data[start:end])
        if as_json:
            return (rid, ix, 0, cached, self._json(rid, concepts, mentions))
        return (rid, ix, 0, cached, {"id": rid, "concepts": concepts, "mentions": mentions})

    cdef bytes _json(self, str rid, list concepts, list mentions):
        """``json.dumps(answer, ensure_ascii=False, separators=(",", ":"))`` of the dict
        ``read`` would make, written directly."""
        cdef _Buf b = _Buf()
        cdef int i, k
        cdef list values
        _raw(b, self.top_keys[0])
        _json_str(b, rid)
        _raw(b, self.top_keys[1])
        _json_value(b, concepts, K_STRINGS)
        _raw(b, self.top_keys[2])
        _raw(b, b"[")
        for k in range(len(mentions)):
            values = <list>mentions[k]
            _raw(b, b"," if k else b"")
            for i in range(self.n_slots):
                _raw(b, <bytes>self.json_keys[i])
                _json_value(b, values[i], self.kinds[i])
            _raw(b, b"}")
        _raw(b, b"]}")
        return b.take()

    def read(self, bytes data):
        """One ``(id, index_hash, status code, cached, answer)`` per item, in order: the answer
        is the JSON form when the code is 0, else the item's bytes (its status, for protobuf)."""
        return self._reply(data, True, False)

    def read_json(self, bytes data):
        """:meth:`read`, with each answer as its JSON text (UTF-8 bytes) rather than the dict:
        what the journal writes, without the dict or ``json.dumps`` in between."""
        return self._reply(data, True, True)


cdef extern from *:
    """
    /* Set one __slots__ field through its member descriptor: what object.__setattr__ does for
       a frozen dataclass, without the attribute lookup (as _speedups does for the engine's). */
    static int __w_set_slot(PyObject *descr, PyObject *obj, PyObject *value) {
        return Py_TYPE(descr)->tp_descr_set(descr, obj, value);
    }
    """
    int _set_slot "__w_set_slot"(object descr, object obj, object value) except -1


cdef class ResultReader(_MentionFields):
    """Reads AnnotateBatchResponse bytes (or one AnnotateResponse's) straight into the
    client's domain objects — :class:`~conceptsvc.model.StreamResult` holding an
    :class:`~conceptsvc.model.Annotation` of :class:`~conceptsvc.model.Mention` s — for
    ``ConceptClient``; see ``wire.result_reader``, which hands over the layout, and
    ``wire.ResultReaderPy``, the reference (protobuf, then ``wire.stream_result_from_pb``).

    The frozen dataclasses are filled through their slot descriptors, as the compiled engine
    fills them. A failed item (a status with a non-zero code) is rare and goes to
    ``on_error`` with its bytes. The index hash, the same in every item of a reply, is decoded
    once and shared."""

    cdef object new
    cdef object Mention, Annotation, StreamResult
    cdef tuple m_slots  # by slot: Mention's member descriptor
    cdef tuple a_slots  # Annotation's id, mentions, concepts
    cdef tuple r_slots  # StreamResult's id, annotation, error, cached, index_hash
    cdef object on_error
    cdef str last_hash
    cdef list interned  # INTERN_SLOTS strings (or None), direct-mapped by a hash of the bytes

    def __init__(self, mention_type, annotation_type, result_type, mention_slots,
                 tuple annotation_slots, tuple result_slots, tuple numbers, on_error,
                 tuple status_strings, int max_depth, decode_error):
        """``mention_slots``: ``(slot name, field number, kind, default)`` for every slot of
        ``mention_type``; ``annotation_slots``: the names of Annotation's id, mentions and
        concepts slots; ``result_slots``: StreamResult's id, annotation, error, cached and
        index_hash; ``numbers``, ``status_strings``, ``max_depth`` and ``decode_error``: as
        ``BatchReader``'s."""
        cdef int i
        slots = list(mention_slots)
        if sorted(name for name, _, _, _ in slots) != sorted(mention_type.__slots__):
            raise ValueError("mention_slots must name every slot of the mention type once")
        if len(slots) >= MAX_NUMBER:
            raise ValueError(f"at most {MAX_NUMBER - 1} mention fields")
        if len(annotation_slots) != 3 or len(result_slots) != 5:
            raise ValueError("annotation_slots: 3 names; result_slots: 5 names")
        for i in range(MAX_NUMBER):
            self.slot_of[i] = -1
        self.defaults = []
        descriptors = []
        for i, (name, number, kind, default) in enumerate(slots):
            if not 0 < number < MAX_NUMBER:
                raise ValueError(f"field number {number} of {name} is out of range")
            if not 0 <= kind < N_KINDS:
                raise ValueError(f"unknown wire kind {kind!r} for {name}")
            self.slot_of[number] = i
            self.kinds[i] = kind
            self.defaults.append(tuple(default) if kind == K_STRINGS else default)
            descriptors.append(mention_type.__dict__[name])
        self.n_slots = len(slots)
        self.m_slots = tuple(descriptors)
        self.a_slots = tuple(annotation_type.__dict__[name] for name in annotation_slots)
        self.r_slots = tuple(result_type.__dict__[name] for name in result_slots)
        self.Mention = mention_type
        self.Annotation = annotation_type
        self.StreamResult = result_type
        self.new = object.__new__
        self.on_error = on_error
        (self.f_items, self.f_id, self.f_mentions, self.f_concepts, self.f_status,
         self.f_code, self.f_cached, self.f_hash) = numbers
        self.last_hash = None
        self.interned = [None] * INTERN_SLOTS
        self._rules(status_strings, max_depth, decode_error)

    cdef str _string(self, const unsigned char* p, Py_ssize_t size):
        """The string at ``p``; a short one is the object read last time for the same bytes
        when the cache still holds it. CUIs, names, types and sources repeat from caption to
        caption: sharing them saves the caller memory and this reader an allocation."""
        cdef uint64_t h = 14695981039346656037ULL
        cdef Py_ssize_t i, n
        cdef const char* c
        if size > INTERN_MAX:
            return PyUnicode_DecodeUTF8(<const char*>p, size, NULL)
        for i in range(size):
            h = (h ^ p[i]) * 1099511628211ULL
        slot = <Py_ssize_t>((h ^ (h >> 32)) & (INTERN_SLOTS - 1))
        old = self.interned[slot]
        if old is not None:
            c = PyUnicode_AsUTF8AndSize(old, &n)
            if n == size and memcmp(c, p, size) == 0:
                return <str>old
        s = PyUnicode_DecodeUTF8(<const char*>p, size, NULL)
        self.interned[slot] = s
        return s

    cdef object _mention(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                         int depth):
        cdef int i
        cdef tuple d = self.m_slots
        values = self._fields(p, start, end, depth)
        m = self.new(self.Mention)
        for i in range(self.n_slots):
            v = values[i]
            if v is None or (self.kinds[i] == K_STRING and not v):
                v = self.defaults[i]
            elif self.kinds[i] == K_STRINGS:
                v = tuple(v)
            _set_slot(d[i], m, v)
        return m

    cdef str _index_hash(self, const unsigned char* p, Py_ssize_t size):
        """The index hash at ``p``: the last one read when the bytes are the same."""
        cdef Py_ssize_t n
        cdef const char* c
        last = self.last_hash
        if last is not None:
            c = PyUnicode_AsUTF8AndSize(last, &n)
            if n == size and memcmp(c, p, size) == 0:
                return last
        s = PyUnicode_DecodeUTF8(<const char*>p, size, NULL)
        self.last_hash = s
        return s

    cdef object _item_mention(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                              bint as_json, int depth):
        return self._mention(p, start, end, depth)

    cdef object _item(self, bytes data, const unsigned char* p, Py_ssize_t start,
                      Py_ssize_t end, bint as_json, int depth):
        cdef tuple d
        rid, ix, code, cached, concepts, mentions = self._item_fields(
            p, start, end, False, depth
        )
        if code:
            return self.on_error(data[start:end])
        d = self.a_slots
        a = self.new(self.Annotation)
        _set_slot(d[0], a, rid)
        _set_slot(d[1], a, tuple(mentions))
        _set_slot(d[2], a, tuple(concepts))
        d = self.r_slots
        r = self.new(self.StreamResult)
        _set_slot(d[0], r, rid)
        _set_slot(d[1], r, a)
        _set_slot(d[2], r, None)
        _set_slot(d[3], r, cached)
        _set_slot(d[4], r, ix)
        return r

    def read(self, bytes data):
        """One StreamResult per item of an AnnotateBatchResponse, in order."""
        return self._reply(data, True, False)

    def read_one(self, bytes data):
        """The StreamResult of one AnnotateResponse (what Annotate and AnnotateStream send)."""
        return self._reply(data, False, False)


# -- JSON text as json.dumps(..., ensure_ascii=False, separators=(",", ":")) writes it ------------
cdef inline int _raw(_Buf b, bytes piece) except -1:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(piece)
    b.reserve(n)
    memcpy(b.p + b.n, PyBytes_AS_STRING(piece), n)
    b.n += n
    return 0


cdef const char* _HEX = "0123456789abcdef"
cdef double _INF = float("inf")
# The letter of json's two-character escape of each control character (0: it gets \u00XX).
cdef unsigned char _SHORT_ESCAPE[32]
_SHORT_ESCAPE[:] = [0] * 32
_SHORT_ESCAPE[8] = 98  # b
_SHORT_ESCAPE[9] = 116  # t
_SHORT_ESCAPE[10] = 110  # n
_SHORT_ESCAPE[12] = 102  # f
_SHORT_ESCAPE[13] = 114  # r


cdef int _json_str(_Buf b, str s) except -1:
    """A JSON string: '"' and backslash escaped, control characters as json writes them,
    everything else as its UTF-8 (ensure_ascii=False)."""
    cdef Py_ssize_t size, i
    cdef const unsigned char* c = <const unsigned char*>PyUnicode_AsUTF8AndSize(s, &size)
    cdef unsigned char ch
    b.reserve(6 * size + 2)
    b.p[b.n] = 34  # "
    b.n += 1
    for i in range(size):
        ch = c[i]
        if ch >= 0x20 and ch != 34 and ch != 92:
            b.p[b.n] = ch
            b.n += 1
        elif ch >= 0x20 or _SHORT_ESCAPE[ch]:  # '"', backslash, \n \r \t \b \f
            b.p[b.n] = 92
            b.p[b.n + 1] = ch if ch >= 0x20 else _SHORT_ESCAPE[ch]
            b.n += 2
        else:
            b.p[b.n] = 92
            b.p[b.n + 1] = 117  # u
            b.p[b.n + 2] = 48
            b.p[b.n + 3] = 48
            b.p[b.n + 4] = _HEX[ch >> 4]
            b.p[b.n + 5] = _HEX[ch & 15]
            b.n += 6
    b.p[b.n] = 34
    b.n += 1
    return 0


cdef int _json_value(_Buf b, object v, int kind) except -1:
    cdef Py_ssize_t k
    if kind == K_STRING:
        _json_str(b, <str>v)
    elif kind == K_STRINGS:
        _raw(b, b"[")
        for k in range(len(v)):
            if k:
                _raw(b, b",")
            _json_str(b, <str>v[k])
        _raw(b, b"]")
    elif kind == K_BOOL:
        _raw(b, b"true" if v else b"false")
    elif kind == K_DOUBLE:
        if v != v:  # as json writes the non-finite (which scores never are)
            _raw(b, b"NaN")
        elif v == _INF:
            _raw(b, b"Infinity")
        elif v == -_INF:
            _raw(b, b"-Infinity")
        else:
            _raw(b, float.__repr__(v).encode("ascii"))
    else:
        _raw(b, int.__repr__(v).encode("ascii"))
    return 0


# -- Redis commands (the cache's Redis tier) ------------------------------------------------------
cdef inline Py_ssize_t _dec_len(Py_ssize_t v) noexcept:
    cdef Py_ssize_t n = 1
    while v >= 10:
        v //= 10
        n += 1
    return n


cdef inline Py_ssize_t _put_dec(char* p, Py_ssize_t v) noexcept:
    """Write v ≥ 0 in decimal at p; return how many bytes were written."""
    cdef Py_ssize_t n = _dec_len(v), i = n
    while i > 0:
        i -= 1
        p[i] = <char>(48 + v % 10)
        v //= 10
    return n


cdef class RespPacker:
    """redis-py's ``command_packer``: a command as one RESP array in one ``bytes``.

    redis-py packs through hiredis, which grows its buffer argument by argument (``sprintf``
    for every length and a ``realloc`` as it fills). The cache's Redis tier sends commands of
    a thousand arguments and more (MGET of a batch's keys, the write script's keys and values):
    here the sizes are read first and the command is written once into a ``bytes`` of exactly
    its size. Arguments of exact type ``bytes`` and ``str`` (UTF-8, strict, as redis-py's
    default encoder) and ``int`` (not ``bool``) are packed here; a command with any other
    argument goes whole to ``fallback`` (redis-py's own rules, and its errors). The split of a
    first argument that holds spaces ("CONFIG GET") is redis-py's too. Tests hold the output
    to redis-py's pure-Python packer's, joined.
    """

    cdef object fallback

    def __init__(self, fallback):
        self.fallback = fallback

    def pack(self, *args):
        cdef list items
        cdef Py_ssize_t n, i, total, size, k
        cdef Py_ssize_t* sizes = NULL
        cdef const char** ptrs = NULL
        cdef list keep = []
        cdef object a
        cdef char* out
        cdef bytes result
        if not args:
            return self.fallback.pack(*args)
        first = args[0]
        if type(first) is str:
            items = (<str>first).encode().split()
        elif type(first) is bytes:
            items = (<bytes>first).split() if b" " in <bytes>first else [first]
        else:
            return self.fallback.pack(*args)
        items.extend(args[1:])
        n = len(items)
        sizes = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t))
        ptrs = <const char**>PyMem_Malloc(n * sizeof(const char*))
        if sizes == NULL or ptrs == NULL:
            PyMem_Free(sizes)
            PyMem_Free(ptrs)
            raise MemoryError()
        try:
            total = 1 + _dec_len(n) + 2
            for i in range(n):
                a = items[i]
                if type(a) is bytes:
                    ptrs[i] = PyBytes_AS_STRING(a)
                    sizes[i] = PyBytes_GET_SIZE(a)
                elif type(a) is str:
                    ptrs[i] = PyUnicode_AsUTF8AndSize(a, &size)
                    sizes[i] = size
                elif type(a) is int:
                    a = repr(a).encode()
                    keep.append(a)
                    ptrs[i] = PyBytes_AS_STRING(a)
                    sizes[i] = PyBytes_GET_SIZE(a)
                else:
                    return self.fallback.pack(*args)
                total += 1 + _dec_len(sizes[i]) + 2 + sizes[i] + 2
            result = PyBytes_FromStringAndSize(NULL, total)
            out = PyBytes_AS_STRING(result)
            out[0] = 42  # *
            k = 1 + _put_dec(out + 1, n)
            out[k] = 13
            out[k + 1] = 10
            k += 2
            for i in range(n):
                out[k] = 36  # $
                k += 1 + _put_dec(out + k + 1, sizes[i])
                out[k] = 13
                out[k + 1] = 10
                k += 2
                memcpy(out + k, ptrs[i], sizes[i])
                k += sizes[i]
                out[k] = 13
                out[k + 1] = 10
                k += 2
            return [result]
        finally:
            PyMem_Free(sizes)
            PyMem_Free(ptrs)
