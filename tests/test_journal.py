from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conceptsvc.client.journal import JOURNAL, Journal, SeqSet
from conceptsvc.errors import ClientError


def result(i: int) -> dict[str, object]:
    return {"id": f"id{i}", "concepts": [f"C{i:07d}"], "mentions": []}


def test_journal_appends_and_reads_back_in_seq_order(tmp_path: Path) -> None:
    with Journal(tmp_path / "w") as j:
        j.append([(5, result(5)), (1, result(1))])
        j.append([(3, result(3)), (1, {"id": "dup", "concepts": [], "mentions": []})])
        assert j.done == {1, 3, 5}
        assert [(s, r["id"]) for s, r in j.results()] == [(1, "id1"), (3, "id3"), (5, "id5")]
    # reopened: the same set is done
    with Journal(tmp_path / "w") as j:
        assert j.done == {1, 3, 5}
        assert (j.torn_bytes, j.bad_lines) == (0, 0)


def test_journal_cuts_a_torn_last_line(tmp_path: Path) -> None:
    with Journal(tmp_path / "w") as j:
        j.append([(0, result(0)), (1, result(1))])
    path = tmp_path / "w" / JOURNAL
    good = path.read_bytes()
    path.write_bytes(good + b'{"seq": 2, "r": {"id": "id2", "conc')
    with Journal(tmp_path / "w") as j:
        assert j.done == {0, 1} and j.torn_bytes > 0
        assert path.read_bytes() == good
        j.append([(2, result(2))])
        assert [s for s, _ in j.results()] == [0, 1, 2]
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["r"] for x in lines)


def test_journal_skips_a_corrupt_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "w" / JOURNAL
    path.parent.mkdir()
    path.write_bytes(
        json.dumps({"seq": 0, "r": result(0)}).encode() + b"\n"
        + b"\x00\x00garbage\n"
        + json.dumps({"seq": 2, "r": result(2)}).encode() + b"\n"
        + json.dumps({"seq": -1, "r": result(9)}).encode() + b"\n"
    )
    with Journal(tmp_path / "w") as j:
        assert j.done == {0, 2} and j.bad_lines == 2
        assert [s for s, _ in j.results()] == [0, 2]


def test_journal_state_round_trip(tmp_path: Path) -> None:
    with Journal(tmp_path / "w") as j:
        assert j.load_state() is None
        j.save_state({"key": "abc", "runs": [1]})
        assert j.load_state() == {"key": "abc", "runs": [1]}
    (tmp_path / "w" / "run.json").write_text("{broken")
    with Journal(tmp_path / "w") as j, pytest.raises(ClientError, match="unreadable"):
        j.load_state()


def test_journal_one_process_at_a_time(tmp_path: Path) -> None:
    with Journal(tmp_path / "w"):
        code = (
            "import sys\n"
            "from conceptsvc.client.journal import Journal\n"
            "from conceptsvc.errors import ClientError\n"
            "try:\n"
            f"    Journal(__import__('pathlib').Path({str(tmp_path / 'w')!r}))\n"
            "except ClientError as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 3 and "another conceptsvc annotate run" in out.stdout
    # released on close
    Journal(tmp_path / "w").close()


def test_journal_survives_sigkill_of_a_writer(tmp_path: Path) -> None:
    """A child appends as fast as it can and is SIGKILLed; the journal it leaves is usable and
    its lock is released."""
    work = tmp_path / "w"
    code = (
        "import pathlib\n"
        "from conceptsvc.client.journal import Journal\n"
        f"j = Journal(pathlib.Path({str(work)!r}), sync_interval=0.0)\n"
        "i = 0\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    j.append([(i + k, {'id': str(i + k), 'concepts': ['C0000001'] * 50, 'mentions': []})"
        " for k in range(100)])\n"
        "    i += 100\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 20
    while (not (work / JOURNAL).exists() or (work / JOURNAL).stat().st_size < 200_000) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    with Journal(work) as j:
        seqs = [s for s, _ in j.results()]
        assert seqs == list(range(len(seqs))) and len(seqs) > 0
        n = len(seqs)
        j.append([(n, {"id": str(n), "concepts": [], "mentions": []})])
        assert max(j.done) == n


def test_issue_16_journal_done_is_a_byte_per_caption(tmp_path: Path) -> None:
    n = 50_000
    with Journal(tmp_path / "w") as j:
        for start in range(0, n, 1000):
            j.append([(s, result(s)) for s in range(start, start + 1000) if s % 7])
        assert len(j.done) == n - len(range(0, n, 7)) and 7 not in j.done and 8 in j.done
        assert j.done.nbytes <= 2 * n  # one byte a seq, at most doubled by growth
    with Journal(tmp_path / "w") as j:  # recovered from the journal file alike
        assert j.done.nbytes <= 2 * n and len(j.done) == n - len(range(0, n, 7))
        assert list(j.done)[:7] == [1, 2, 3, 4, 5, 6, 8] and max(j.done) == n - 1


def test_journal_seqset_is_a_set_of_seqs() -> None:
    s = SeqSet([5, 0, 5, 3000])
    assert s == {0, 5, 3000} and len(s) == 3 and list(s) == [0, 5, 3000]
    assert -1 not in s and 3001 not in s and "5" not in s
    with pytest.raises(ValueError):
        s.add(-1)
def test_journal_lines_name_their_index_and_retire_redoes_the_others(tmp_path: Path) -> None:
    """Each line names the index that made it (``ix``); retiring an index makes its captions
    undone, a new line for one of them supersedes the old, and after a reopen the old lines
    are retired again. Lines from before ``ix`` count as the index the caller says."""
    a, b = "a" * 64, "b" * 64
    path = tmp_path / "w" / JOURNAL
    path.parent.mkdir()
    path.write_text(json.dumps({"seq": 0, "r": result(0)}) + "\n")  # an unlabelled, older line
    with Journal(tmp_path / "w") as j:
        assert j.index_counts(unlabelled=a) == {a: 1}
        j.append([(1, result(1)), (2, result(2))], a)
        assert j.index_counts(unlabelled=a) == {a: 3}
        assert j.retire(b, unlabelled=a) == 3 and j.done == set()
        assert list(j.results()) == []  # nothing of a retired index is rendered
        j.append([(2, {"id": "id2-b", "concepts": [], "mentions": []})], b)
        assert [(s, r["id"]) for s, r in j.results()] == [(2, "id2-b")]
    assert {json.loads(x).get("ix") for x in path.read_text().splitlines()} == {None, a, b}
    with Journal(tmp_path / "w") as j:
        # reopened: the last line of each caption counts; 0 and 1 are still of a
        assert j.done == {0, 1, 2}
        assert j.index_counts(unlabelled=a) == {a: 2, b: 1}
        assert j.retire(b, unlabelled=a) == 2
        j.append([(0, result(0)), (1, result(1))], b)
        assert j.index_counts(unlabelled=a) == {b: 3}
        assert [(s, r["id"]) for s, r in j.results()] == [(0, "id0"), (1, "id1"), (2, "id2-b")]


def test_journal_lines_of_json_text_are_the_lines_of_dicts(tmp_path: Path) -> None:
    """append_json (results as their JSON text, what the batch client has) writes the very
    lines append writes for the dicts, and texts cuts the text back out of them; a line
    spaced otherwise (another writer) still yields dumps of its result."""
    from conceptsvc.client.outputs import dumps

    results = [
        (0, {"id": "a", "concepts": ["C1"], "mentions": [{"cui": "C1", "score": 0.5}]}),
        (3, {"id": 'q"\\\n é😀', "concepts": [], "mentions": []}),
        (7, {"id": "z", "concepts": ["C2", "C3"], "mentions": []}),
    ]
    for k, ix in enumerate(("", "ab" * 32)):
        one, two = tmp_path / f"dicts{k}", tmp_path / f"texts{k}"
        with Journal(one) as j:
            j.append(results, ix)
        with Journal(two) as j:
            j.append_json([(s, dumps(r).encode("utf-8")) for s, r in results], ix)
            j.append_json([(3, b'{"id":"again"}')], ix)  # already done: ignored
        assert (one / JOURNAL).read_bytes() == (two / JOURNAL).read_bytes()
        with Journal(two) as j:
            assert list(j.results()) == results
            assert list(j.texts()) == [(s, dumps(r).encode("utf-8")) for s, r in results]
    spaced = tmp_path / "spaced"
    spaced.mkdir()
    (spaced / JOURNAL).write_text(json.dumps({"seq": 2, "r": results[0][1]}) + "\n")
    with Journal(spaced) as j:
        assert list(j.texts()) == [(2, dumps(results[0][1]).encode("utf-8"))]
