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
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

# Wire kinds of a field (the numbers are wire.KIND_*; wire.py hands them over).
cdef enum:
    K_STRING = 0
    K_VARINT = 1
    K_DOUBLE = 2
    K_BOOL = 3
    K_STRINGS = 4

cdef enum:
    MAX_FIELDS = 64

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
    cdef uint64_t tags[MAX_FIELDS]
    cdef int kinds[MAX_FIELDS]
    cdef int n_fields
    cdef uint64_t mentions_tag
    cdef uint64_t concepts_tag

    def __init__(self, mention_layout, int mentions_field, int concepts_field):
        """``mention_layout``: ``(attribute, field number, kind)`` per Mention field, in field
        number order; the two numbers are AnnotateResponse's ``mentions`` and ``concepts``."""
        cdef int i
        layout = list(mention_layout)
        if len(layout) > MAX_FIELDS:
            raise ValueError(f"at most {MAX_FIELDS} mention fields")
        self.attrs = []
        for i, (attr, number, kind) in enumerate(layout):
            if kind not in (K_STRING, K_VARINT, K_DOUBLE, K_BOOL, K_STRINGS):
                raise ValueError(f"unknown wire kind {kind!r} for {attr}")
            self.attrs.append(attr)
            self.kinds[i] = kind
            self.tags[i] = (<uint64_t>number << 3) | (
                1 if kind == K_DOUBLE else (0 if kind in (K_VARINT, K_BOOL) else 2)
            )
        self.n_fields = len(layout)
        self.mentions_tag = (<uint64_t>mentions_field << 3) | 2
        self.concepts_tag = (<uint64_t>concepts_field << 3) | 2

    cdef int _mention(self, _Buf out, _Buf b, object m) except -1:
        cdef int i, kind
        cdef uint64_t tag, bits
        cdef int64_t iv
        cdef double dv
        b.n = 0
        for i in range(self.n_fields):
            v = getattr(m, <str>self.attrs[i])
            kind = self.kinds[i]
            tag = self.tags[i]
            if kind == K_STRING:
                if len(<str>v):
                    b.string(tag, v)
            elif kind == K_VARINT:
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
        out.delimited(self.mentions_tag, b.p, b.n)
        return 0

    def encode(self, annotation):
        """The caption's result as AnnotateResponse fields ``mentions`` and ``concepts``."""
        # Buffers per call, not per writer: one writer serves every RPC thread of a worker.
        cdef _Buf out = _Buf()
        cdef _Buf scratch
        mentions = annotation.mentions
        if mentions:
            scratch = _Buf()
            for m in mentions:
                self._mention(out, scratch, m)
        for c in annotation.concepts:
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
