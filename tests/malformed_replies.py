"""Replies a server could send that are not what conceptsvc's servers write, read by the
compiled readers (``conceptsvc._wire``) and by the reference ones (protobuf) side by side.

A reply comes from the network, so the compiled readers must refuse what protobuf refuses,
with protobuf's error, and read what it reads as it reads it — and never read outside the
bytes. A crash takes the process with it, so ``tests/test_wire.py`` runs this file as a
child process (``python malformed_replies.py crafted|fuzz SEED COUNT``) and reads its JSON
from standard output: a regression is a failed test, not a dead test run.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any

from conceptsvc import wire
from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb
from conceptsvc.client.outputs import SCORE_DECIMALS, annotation_to_json, dumps
from conceptsvc.model import Annotation, Mention

# The one way the two may word a refusal differently: a string that runs past the end of its
# own message (but not past the reply's) is checked for UTF-8 by protobuf before it notices
# the overrun; the compiled readers refuse the overrun first. Both raise DecodeError.
CORRUPT = "Wire format was corrupt"
BAD_UTF8 = "String field had bad UTF-8"


def varint(v: int) -> bytes:
    """``v`` as a protobuf varint (the writer's own encoder; only the readers are tested)."""
    return wire._varint(v)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def delimited(number: int, data: bytes) -> bytes:
    return key(number, 2) + varint(len(data)) + data


def wrapped(number: int, size: int, tail: bytes = b"x" * 8) -> bytes:
    """Field ``number`` as length-delimited, its length ``size`` (whatever is left)."""
    return key(number, 2) + varint(size) + tail


def groups(depth: int, number: int = 20) -> bytes:
    """``depth`` unknown groups, one inside the other."""
    return key(number, 3) * depth + key(number, 4) * depth


_MENTION = pb.Mention(
    cui="C0032227", preferred_name="Pleural effusion", text="épanchement", start=3, end=14,
    score=0.875, semantic_types=["T047"], source="MSH", negated=True,
).SerializeToString()

# AnnotateResponse bytes (read_one, and read as the one item of a batch). The reviewer's two
# first: an id, then an unknown field, each with a length past 2**63 (before the fix: a
# SystemError, then SIGSEGV).
CRAFTED: dict[str, bytes] = {
    "id length 2**64-64": wrapped(1, 2**64 - 64),
    "unknown field length 2**64-2**40": wrapped(15, 2**64 - (1 << 40)),
    "id length 2**63": wrapped(1, 2**63),
    "id length 2**63-1": wrapped(1, 2**63 - 1),
    "id length 2**64-1": wrapped(1, 2**64 - 1),
    "id length one past the end": wrapped(1, 9),
    "concepts length 2**64-8": wrapped(3, 2**64 - 8),
    "index hash length 2**64-8": wrapped(6, 2**64 - 8),
    "mentions length 2**64-8": wrapped(2, 2**64 - 8),
    "status length 2**64-8": wrapped(4, 2**64 - 8),
    "status message length 2**64-2": delimited(4, key(1, 0) + b"\x03" + wrapped(2, 2**64 - 2, b"")),
    "status unknown field length 2**63": delimited(4, key(1, 0) + b"\x03" + wrapped(9, 2**63, b"")),
    "mention cui length 2**64-8": delimited(2, wrapped(1, 2**64 - 8)),
    "mention types length 2**63+5": delimited(2, wrapped(7, 2**63 + 5)),
    "mention unknown field length 2**64-1": delimited(2, wrapped(40, 2**64 - 1)),
    "mention unknown field number 99 length 2**63": delimited(2, wrapped(99, 2**63)),
    "mention past the reply": wrapped(2, 40, _MENTION[:20]),
    "mention string past its mention": delimited(2, _MENTION[:12]) + _MENTION[12:],
    "score cut short": delimited(2, key(6, 1) + b"\x00" * 7),
    "unknown fixed64 cut short": key(20, 1) + b"\x00" * 7,
    "unknown fixed32 cut short": key(20, 5) + b"\x00" * 3,
    "varint of 11 bytes": key(5, 0) + b"\xff" * 10 + b"\x01",
    "varint cut short": key(5, 0) + b"\xff\xff",
    "key of 6 bytes": b"\x8a\x80\x80\x80\x80\x00" + b"\x01x",
    "key past 32 bits (field 1 mod 2**29)": varint((2**32 + 1) << 3 | 2) + b"\x01x",
    "field number 0": key(0, 0) + b"\x01",
    "field number 0 in a mention": delimited(2, key(0, 2) + b"\x00"),
    "wire type 6": key(20, 6),
    "wire type 7": key(20, 7),
    "end of group, none open": key(20, 4),
    "end of another group": key(20, 3) + key(21, 4),
    "group not closed": key(20, 3) + key(21, 0) + b"\x01",
    "group past its mention": delimited(2, key(20, 3)) + key(20, 4),
    "bad UTF-8 in the id": delimited(1, b"\xff\xfe"),
    "a surrogate in a concept": delimited(3, b"\xed\xa0\x80"),
    "bad UTF-8 in a mention's text": delimited(2, delimited(3, b"caf\xc3")),
    "bad UTF-8 in the status message": delimited(
        4, key(1, 0) + b"\x03" + delimited(2, b"\xc0\xaf")
    ),
    "bad UTF-8 in the status error code": delimited(4, delimited(3, b"E\x80")),
    # what protobuf accepts, read as it reads it
    "bad UTF-8 in an unknown field": delimited(20, b"\xff") + delimited(1, b"x"),
    "known fields of other wire types": key(1, 0) + b"\x05" + key(2, 0) + b"\x01" + key(5, 2)
    + b"\x00" + delimited(2, key(1, 0) + b"\x05" + key(4, 2) + b"\x01\x05" + key(6, 5)
    + b"\x00\x00\x80\x3f" + key(9, 2) + b"\x00"),
    "start of 2**40+7 (uint32)": delimited(2, key(4, 0) + varint(2**40 + 7)),
    "start of 10 bytes": delimited(2, key(4, 0) + b"\xff" * 9 + b"\x7f"),
    "bool of 5": delimited(2, key(9, 0) + b"\x05"),
    "status code 2**40+3 (int32)": delimited(4, key(1, 0) + varint(2**40 + 3)),
    "status code -1": delimited(4, key(1, 0) + varint(2**64 - 1)),
    "status code 2**32 (0 as int32)": delimited(4, key(1, 0) + varint(2**32)) + delimited(1, b"x"),
    "two statuses, merged": delimited(4, key(1, 0) + b"\x03") + delimited(4, delimited(3, b"E1")),
    "key of 5 bytes (field 1)": b"\x8a\x80\x80\x80\x00" + b"\x01x",
    "largest field number": key(2**29 - 1, 0) + b"\x01",
    "unknown group": key(20, 3) + key(21, 0) + b"\x01" + delimited(22, b"\xff") + key(20, 4),
    "group in the id's number": key(1, 3) + key(1, 4) + delimited(1, b"x"),
    "group in a mention": delimited(2, key(20, 3) + key(20, 4) + delimited(1, b"C1")),
    "group in a status": delimited(4, key(9, 3) + key(9, 4) + key(1, 0) + b"\x05"),
    "a mention's score NaN": delimited(2, key(6, 1) + b"\x00\x00\x00\x00\x00\x00\xf8\x7f"),
    "100 groups deep": groups(100),
    "101 groups deep": groups(101),
    "98 groups deep in a mention": delimited(2, groups(98)),
    "99 groups deep in a mention": delimited(2, groups(99)),
    "98 groups deep in a status": delimited(4, groups(98)),
    "99 groups deep in a status": delimited(4, groups(99)),
    "empty": b"",
    "a whole answer": delimited(1, b"r1") + delimited(2, _MENTION) + delimited(3, b"C0032227")
    + key(5, 0) + b"\x01" + delimited(6, b"abc"),
}

# AnnotateBatchResponse bytes: what only the batch walk sees (every case above is read as the
# one item of a batch too, one level deeper).
CRAFTED_BATCHES: dict[str, bytes] = {
    "batch: item length 2**64-64": wrapped(1, 2**64 - 64),
    "batch: item length 2**63": wrapped(1, 2**63),
    "batch: unknown field length 2**64-2**40": wrapped(15, 2**64 - (1 << 40)),
    "batch: item past the reply": wrapped(1, 30, CRAFTED["a whole answer"][:10]),
    "batch: 100 groups deep": groups(100),
    "batch: 101 groups deep": groups(101),
    "batch: an item, then a field cut short": delimited(1, CRAFTED["a whole answer"]) + key(2, 1),
}


def readers() -> list[tuple[str, bool, Callable[[bytes], Any], Callable[[bytes], Any]]]:
    """``(name, batch, compiled read, reference read)`` of every way a client reads a reply
    (``batch``: an AnnotateBatchResponse, else one AnnotateResponse)."""
    fast, ref = wire.result_reader(), wire.result_reader(compiled=False)
    fast_b = wire.batch_reader(annotation_to_json, dumps, SCORE_DECIMALS)
    ref_b = wire.batch_reader(annotation_to_json, dumps, SCORE_DECIMALS, compiled=False)
    if isinstance(fast, wire.ResultReaderPy) or isinstance(fast_b, wire.BatchReaderPy):
        raise SystemExit("the compiled readers are not built")
    return [
        ("ResultReader.read_one", False, fast.read_one, ref.read_one),
        ("ResultReader.read", True, fast.read, ref.read),
        ("BatchReader.read", True, fast_b.read, ref_b.read),
        ("BatchReader.read_json", True, fast_b.read_json, ref_b.read_json),
    ]


def _plain(result: Any) -> Any:
    """A reader's result as comparable text: a failed item's bytes (the compiled batch reader
    hands over the bytes it read, the reference protobuf's serialisation) as the message they
    are; NaN scores equal (repr)."""
    if isinstance(result, list) and result and isinstance(result[0], tuple):
        result = [
            (*item[:4], str(pb.AnnotateResponse.FromString(item[4])) if item[2] else item[4])
            for item in result
        ]
    return repr(result)


def outcome(read: Callable[[bytes], Any], data: bytes) -> list[str]:
    """``["ok", result]`` or ``[exception type, message]``."""
    try:
        return ["ok", _plain(read(data))]
    except Exception as exc:  # what is raised is the point
        return [type(exc).__name__, str(exc)]


def agree(fast: list[str], ref: list[str]) -> bool:
    """The compiled reader did what protobuf does (see CORRUPT above for the one difference
    of wording allowed)."""
    if fast == ref:
        return True
    return (
        fast[0] == ref[0] == "DecodeError" and fast[1].endswith(CORRUPT)
        and ref[1].endswith(BAD_UTF8)
        and fast[1].removesuffix(CORRUPT) == ref[1].removesuffix(BAD_UTF8)
    )


def crafted() -> dict[str, dict[str, list[list[str]]]]:
    """Every crafted reply through every reader: ``{case: {reader: [compiled, reference]}}``;
    an AnnotateResponse case is read alone and as the one item of a batch."""
    out: dict[str, dict[str, list[list[str]]]] = {}
    for name, batch, fast, ref in readers():
        cases = (
            {**{f"item: {k}": delimited(1, v) for k, v in CRAFTED.items()}, **CRAFTED_BATCHES}
            if batch else CRAFTED
        )
        for case, data in cases.items():
            out.setdefault(case, {})[name] = [outcome(fast, data), outcome(ref, data)]
    return out


# -- mutated replies ----------------------------------------------------------------------------
_TEXTS = ["pleural effusion", "épanchement pleural", "胸水", "effusion", "", "x" * 70, "MSH"]


def _answer(rng: random.Random) -> Annotation:
    mentions = tuple(
        Mention(
            f"C{rng.randrange(10**7):07d}", rng.choice(_TEXTS), rng.choice(_TEXTS),
            rng.randrange(200), rng.randrange(1 << 20), rng.random(),
            tuple(rng.choice(["T047", "T033", "T184"]) for _ in range(rng.randrange(3))),
            rng.choice(_TEXTS), rng.random() < 0.3, rng.random() < 0.3, rng.random() < 0.3,
            rng.choice(["patient", "other", ""]),
        )
        for _ in range(rng.randrange(4))
    )
    return Annotation("", mentions, tuple(m.cui for m in mentions))


def valid_reply(rng: random.Random) -> bytes:
    """An AnnotateBatchResponse as the server writes it: answers, now and then a failed item,
    ids, cached flags, the index hash."""
    writer = wire.annotation_writer()
    blobs = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.2:
            status = pb.ItemStatus(code=rng.choice([3, 8, 14]), message="trop long: 胸水",
                                   error_code="E501")
            blobs.append(pb.AnnotateResponse(status=status).SerializeToString())
        else:
            blobs.append(writer.encode(_answer(rng)))
    tail = pb.AnnotateResponse(index_hash=f"{rng.getrandbits(64):016x}").SerializeToString()
    ids = [rng.choice(["", f"id-{i}", f"légende {i}"]) for i in range(len(blobs))]
    return wire.item_joiner().join(blobs, ids, bytearray(rng.randint(0, 1) for _ in blobs), tail)


def length_prefixes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[
    tuple[int, int]
]:
    """``(start, end)`` of every length prefix in well-formed ``data``, nested messages' too
    (a string whose bytes happen to parse is walked as well: it only adds places to mutate)."""
    end = len(data) if end is None else end
    pos = start
    try:
        while pos < end:
            k, pos = _varint_at(data, pos)
            wire_type = k & 7
            if wire_type == 0:
                pos = _varint_at(data, pos)[1]
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                at = pos
                size, pos = _varint_at(data, pos)
                if pos + size > end:
                    return
                yield at, pos
                yield from length_prefixes(data, pos, pos + size)
                pos += size
            else:
                return
    except IndexError:
        return


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = data[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return v, pos


_BIG = [2**63, 2**63 + 1, 2**64 - 1, 2**64 - 8, 2**64 - (1 << 40), 2**63 - 1, 2**32, 2**31,
        1 << 40]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One of: bits flipped, the bytes cut, a length prefix set to a large value (2**63 and
    past included, or just past what is left), a few bytes put in (a group's start or end, a
    run of continuation bytes, any byte)."""
    b = bytearray(data)
    r = rng.random()
    if r < 0.35:
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif r < 0.5:
        del b[rng.randrange(len(b)):]
    elif r < 0.85:
        at, end = rng.choice(list(length_prefixes(data)))
        b[at:end] = varint(rng.choice([*_BIG, len(b) - end + rng.randint(1, 3)]))
    else:
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.choice([
                key(rng.randint(1, 40), 3), key(rng.randint(1, 40), 4),
                b"\x80" * rng.randint(1, 11), bytes([rng.randrange(256)]),
            ])
    return bytes(b)


def fuzz(seed: int, count: int) -> dict[str, Any]:
    """``count`` mutated replies through every reader: how the outcomes fell, and every case
    where the compiled reader and protobuf disagreed (none, if all is well)."""
    rng = random.Random(seed)
    all_readers = readers()
    tally: dict[str, int] = {}
    disagreements = []
    for _ in range(count):
        batch = mutate(rng, valid_reply(rng))
        one = pb.AnnotateBatchResponse.FromString(valid_reply(rng)).items[0].SerializeToString()
        one = mutate(rng, one) if one else one
        for name, is_batch, fast, ref in all_readers:
            data = batch if is_batch else one
            got, want = outcome(fast, data), outcome(ref, data)
            if not agree(got, want):
                disagreements.append({"reader": name, "data": data.hex(), "compiled": got,
                                      "reference": want})
            kind = "read" if want[0] == "ok" else want[1].rsplit(": ", 1)[-1]
            tally[kind] = tally.get(kind, 0) + 1
    return {"tally": tally, "disagreements": disagreements[:20]}


if __name__ == "__main__":
    if sys.argv[1] == "crafted":
        json.dump(crafted(), sys.stdout)
    else:
        json.dump(fuzz(int(sys.argv[2]), int(sys.argv[3])), sys.stdout)
