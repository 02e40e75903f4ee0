"""`conceptsvc lookup / concept / search` against a real service and in-process (--local)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from conceptsvc.cli import main

CAPTION = "Chest X-ray showing pleural effusion. No pneumothorax."


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def both(target: str, index: Path) -> list[list[str]]:
    """The connection arguments of the two backends."""
    return [["--target", target], ["--local", "--index", str(index)]]


def test_lookup_cli_table_against_the_service(
    capsys: pytest.CaptureFixture[str], target: str
) -> None:
    code, out, _ = run(capsys, "lookup", CAPTION, "--target", target)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "matched", "text", "span", "CUI", "preferred", "name", "semantic", "types", "score"
    ]
    effusion = next(line for line in lines if line.startswith("pleural effusion"))
    assert effusion.split()[2:8] == [
        "20-36", "C0032227", "Pleural", "effusion", "disorder", "T047"
    ]
    assert effusion.rstrip().endswith("1.00")
    assert any(line.startswith("pneumothorax (negated)") for line in lines)
    assert "concepts: C0817096, C1306645, C0032227, C0032326" in out


def test_lookup_cli_service_and_local_agree(
    capsys: pytest.CaptureFixture[str], target: str, demo_index_dir: Path
) -> None:
    results = []
    for conn in both(target, demo_index_dir):
        code, out, _ = run(capsys, "lookup", CAPTION, "--json", "--profile", "rocov2", *conn)
        assert code == 0
        results.append(json.loads(out))
    assert results[0] == results[1]
    obj = results[0]
    assert obj["text"] == CAPTION
    for m in obj["mentions"]:
        assert CAPTION[m["start"]:m["end"]] == m["text"]
    # the rocov2 profile infers the X-ray projection without a mention
    assert "C1996865" in obj["concepts"]
    code, out, _ = run(capsys, "lookup", CAPTION, "--profile", "rocov2", "--target", target)
    assert "inferred without a mention (profile): C1996865 Postero-Anterior" in out


def test_lookup_cli_options(
    capsys: pytest.CaptureFixture[str], target: str, demo_index_dir: Path
) -> None:
    for conn in both(target, demo_index_dir):
        def cuis(*opts: str, text: str = CAPTION) -> list[str]:
            code, out, err = run(capsys, "lookup", text, "--json", *opts, *conn)  # noqa: B023
            assert code == 0, err
            return [m["cui"] for m in json.loads(out)["mentions"]]

        assert cuis() == ["C0817096", "C1306645", "C0032227", "C0032326"]
        assert cuis("--semantic-groups", "DISO") == ["C0032227", "C0032326"]
        assert cuis("--semantic-types", "Body Location or Region") == ["C0817096"]
        assert cuis("--semantic-types", "T047,T060") == ["C1306645", "C0032227", "C0032326"]
        # a type name with commas in it is one name, not three
        assert cuis("--semantic-types", "Body Part, Organ, or Organ Component",
                    text="MRI of the brain") == ["C0006104"]
        # ... also inside a list with other names
        assert cuis("--semantic-types", "T060,Body Part, Organ, or Organ Component,T047",
                    text="MRI of the brain") == ["C0024485", "C0006104"]
        assert cuis("--no-include-negated") == ["C0817096", "C1306645", "C0032227"]
        # issue 17: hypothetical mentions are kept by default and dropped on request, over
        # the wire and in process alike
        hypo = "Chest X-ray to rule out pneumothorax"
        assert "C0032326" in cuis(text=hypo)
        assert "C0032326" not in cuis("--no-include-hypothetical", text=hypo)
        assert cuis("--exclude-cuis", "C0817096", "--exclude-cuis", "C1306645") == [
            "C0032227", "C0032326"
        ]
        typo = "small pleural efusion"
        assert cuis(text=typo) == []
        code, out, _ = run(capsys, "lookup", typo, "--json", "--approximate",
                           "--threshold", "0.6", *conn)
        assert code == 0
        (m,) = json.loads(out)["mentions"]
        assert m["cui"] == "C0032227" and m["text"] == "pleural efusion" and 0.6 <= m["score"] < 1


def test_lookup_cli_reads_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("CT of the abdomen"))
    code, out, _ = run(capsys, "lookup", "-", "--json", "--target", target)
    assert code == 0 and json.loads(out)["text"] == "CT of the abdomen"
    assert json.loads(out)["mentions"]


def test_lookup_cli_concept(
    capsys: pytest.CaptureFixture[str], target: str, demo_index_dir: Path
) -> None:
    outs = []
    for conn in both(target, demo_index_dir):
        code, out, _ = run(capsys, "concept", "c0032227", *conn)
        assert code == 0
        outs.append(out)
        code, js, _ = run(capsys, "concept", "C0032227", "--json", *conn)
        obj = json.loads(js)
        assert obj["preferred_name"] == "Pleural effusion disorder"
        assert obj["semantic_types"] == [{
            "tui": "T047", "name": "Disease or Syndrome", "abbreviation": "dsyn",
            "group": "DISO", "group_name": "Disorders",
        }]
        assert "Pleural effusion" in {s["string"] for s in obj["synonyms"]}
        assert sum(s["preferred"] for s in obj["synonyms"]) == 1
        code, js, _ = run(capsys, "concept", "C0032227", "--json", "--no-synonyms", *conn)
        assert json.loads(js)["synonyms"] == []
    assert outs[0] == outs[1]
    text = outs[0]
    assert text.startswith("C0032227  Pleural effusion disorder\n")
    assert "T047  Disease or Syndrome  (group DISO Disorders)" in text
    assert "synonyms (" in text and "preferred" in text


def test_lookup_cli_unknown_concept(
    capsys: pytest.CaptureFixture[str], target: str, demo_index_dir: Path
) -> None:
    for conn in both(target, demo_index_dir):
        code, _, err = run(capsys, "concept", "C9999999", *conn)
        assert code == 2
        assert "E623" in err and "C9999999 is not in the dictionary" in err


def test_lookup_cli_search(
    capsys: pytest.CaptureFixture[str], target: str, demo_index_dir: Path
) -> None:
    results = []
    for conn in both(target, demo_index_dir):
        code, out, _ = run(capsys, "search", "pleural efusion", "--approximate", "--json",
                           "--limit", "3", *conn)
        assert code == 0
        results.append(json.loads(out))
        code, table, _ = run(capsys, "search", "pleural effusion", *conn)
        first = table.splitlines()[2].split()
        assert first[:3] == ["1", "1.000", "C0032227"]
    # a search has no matching mode, overlaps, profile or context options: refused, not ignored
    for opts in (["--mode", "exact"], ["--profile", "rocov2"], ["--overlap", "all"],
                 ["--no-include-negated"]):
        with pytest.raises(SystemExit) as exc:
            main(["search", "pleural efusion", "--local", *opts])
        assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    assert results[0] == results[1]
    cands = results[0]
    assert 1 <= len(cands) <= 3 and cands[0]["cui"] == "C0032227"
    assert [c["score"] for c in cands] == sorted((c["score"] for c in cands), reverse=True)
    code, out, _ = run(capsys, "search", "zzzqqq", "--target", target)
    assert code == 0 and out == "no candidates for 'zzzqqq'\n"


def test_lookup_cli_errors(
    capsys: pytest.CaptureFixture[str], target: str, demo_index_dir: Path
) -> None:
    code, _, err = run(capsys, "lookup", "x", "--local", "--target", target)
    assert code == 2 and "exclude each other" in err
    code, _, err = run(capsys, "lookup", "x", "--index", str(demo_index_dir), "--target", target)
    assert code == 2 and "--index only applies with --local" in err
    code, _, err = run(capsys, "lookup", "x", "--threshold", "1.5", "--target", target)
    assert code == 2 and "--threshold must be in (0, 1]" in err
    code, _, err = run(capsys, "search", "x", "--limit", "0", "--target", target)
    assert code == 2 and "[E001] --limit must be >= 1" in err
    # an unknown semantic type: the service says INVALID_ARGUMENT, the engine says E300
    code, _, err = run(capsys, "lookup", "x", "--semantic-types", "T999", "--target", target)
    assert code == 2 and "INVALID_ARGUMENT" in err and "T999" in err
    code, _, err = run(capsys, "lookup", "x", "--semantic-types", "T999", "--local",
                       "--index", str(demo_index_dir))
    assert code == 2 and "E300" in err and "T999" in err
    # nobody listening
    from conftest import free_port

    code, _, err = run(capsys, "concept", "C0032227", "--target", f"127.0.0.1:{free_port()}")
    assert code == 2 and "UNAVAILABLE" in err


def test_lookup_cli_local_defaults_to_the_demo_dictionary(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CONCEPTSVC_CACHE_DIR", str(tmp_path / "cache"))
    code, out, _ = run(capsys, "concept", "C0032227", "--local", "--json", "--no-synonyms")
    assert code == 0 and json.loads(out)["preferred_name"] == "Pleural effusion disorder"
    assert list((tmp_path / "cache").iterdir())  # the demo index was built there


@pytest.mark.parametrize("threshold", ["1e-310", "5e-324", "2.2250738585072014e-308"])
def test_issue_18_tiny_thresholds_answer_normally(
    capsys: pytest.CaptureFixture[str], target: str, demo_index_dir: Path, threshold: str
) -> None:
    # 1e-310 passes the (0, 1] validation; it crashed approximate.size_bounds (OverflowError:
    # a traceback with --local, INTERNAL from the service) instead of matching every key that
    # shares a trigram with the window, as any threshold below the least similarity would
    for conn in both(target, demo_index_dir):
        for measure in ("jaccard", "cosine", "dice", "overlap"):
            code, out, err = run(capsys, "lookup", "small pleural efusion", "--json",
                                 "--approximate", "--similarity", measure,
                                 "--threshold", threshold, *conn)
            assert code == 0, (conn, measure, err)
            found = json.loads(out)["mentions"]
            assert found and all(0 < m["score"] <= 1 for m in found), (conn, measure, found)
            code, out, err = run(capsys, "search", "pleural efusion", "--json",
                                 "--approximate", "--similarity", measure,
                                 "--threshold", threshold, *conn)
            assert code == 0, (conn, measure, err)
            assert "C0032227" in out


def test_issue_16_lookup_stdin_answers_every_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, target: str,
    demo_index_dir: Path,
) -> None:
    captions = ["Chest X-ray showing pleural effusion.", "CT of the abdomen", "Nothing here."]
    answers = []
    for conn in both(target, demo_index_dir):
        monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(captions[:2]) + "\n\n"
                                                     + captions[2] + "\n"))
        code, out, _ = run(capsys, "lookup", "-", "--json", *conn)
        assert code == 0
        rows = [json.loads(line) for line in out.splitlines()]  # one JSON object per line
        assert [r["text"] for r in rows] == captions  # the blank line is not a caption
        assert [r["id"] for r in rows] == ["1", "2", "4"]  # line numbers, as `annotate`'s
        assert "C0032227" in rows[0]["concepts"] and rows[1]["mentions"]
        answers.append(rows)
    assert answers[0] == answers[1]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(captions) + "\n"))
    code, out, _ = run(capsys, "lookup", "-", "--target", target)
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith("== ")] == [
        f"== {c}" for c in captions
    ]


def test_issue_16_lookup_without_a_server_suggests_local(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    for command in (["lookup", "pleural effusion"], ["search", "effusion"],
                    ["concept", "C0032227"]):
        code, _, err = run(capsys, *command, "--target", address)
        assert code == 2
        assert f"no conceptsvc service answers at {address}" in err, err
        assert "--local" in err and "GetInfo failed" not in err


def test_lookup_cli_tls_mismatch_is_named(
    capsys: pytest.CaptureFixture[str], target: str, demo_index_dir: Path, tmp_path: Path
) -> None:
    """A client and a service that disagree about TLS fail with what to change, not with
    "no service answers": gRPC reports both ways as UNAVAILABLE."""
    from service_helpers import make_pki

    from conceptsvc.config import load_settings
    from conceptsvc.extractor import Extractor
    from conceptsvc.index import ConceptIndex
    from conceptsvc.server.app import create_server

    pki = make_pki(tmp_path / "pki")
    # a TLS client, a plaintext service
    code, _, err = run(capsys, "lookup", "CT", "--target", target, "--ca-cert", str(pki.ca))
    assert code == 2 and "The service does not answer in TLS" in err, err
    assert "no conceptsvc service answers" not in err
    server, port = create_server(
        load_settings(port=0, workers=1, host="127.0.0.1", tls_cert=pki.server_cert,
                      tls_key=pki.server_key),
        extractor=Extractor(ConceptIndex.load(demo_index_dir)),
    )
    server.start()
    try:
        # a plaintext client, a TLS service: lookup and annotate both say to add --tls
        # (127.0.0.1: "localhost" may be tried on ::1 last, where nothing listens, and gRPC
        # reports only the last address's error)
        addr = f"127.0.0.1:{port}"
        code, _, err = run(capsys, "lookup", "CT", "--target", addr)
        assert code == 2 and "if it uses TLS, add --tls" in err, err
        src = tmp_path / "in.csv"
        src.write_text("ID,Caption\n1,Chest CT\n", encoding="utf-8")
        code, _, err = run(capsys, "annotate", str(src), "--out", str(tmp_path / "o.jsonl"),
                           "--target", addr, "--retries", "0", "--quiet")
        assert code == 2 and "no target answered GetInfo" in err, err
        assert "if it uses TLS, add --tls" in err
        # and with TLS on both sides, it answers
        code, out, err = run(capsys, "lookup", "CT", "--target", addr, "--ca-cert", str(pki.ca),
                             "--server-name", "localhost")
        assert code == 0 and "C0040405" in out, err
    finally:
        server.stop(0)


def test_lookup_cli_mutual_tls_health_and_draining_say_what_happened(
    capsys: pytest.CaptureFixture[str], demo_index_dir: Path, tmp_path: Path
) -> None:
    """A client without the certificate mutual TLS asks for, `conceptsvc health` in plaintext
    against a TLS port, and a lookup sent to a draining service each say so, not "no service
    answers" / "is the service running"."""
    from service_helpers import make_pki

    from conceptsvc.config import load_settings
    from conceptsvc.extractor import Extractor
    from conceptsvc.index import ConceptIndex
    from conceptsvc.server.app import create_server

    pki = make_pki(tmp_path / "pki")
    extractor = Extractor(ConceptIndex.load(demo_index_dir))
    server, port = create_server(
        load_settings(port=0, workers=1, host="127.0.0.1", tls_cert=pki.server_cert,
                      tls_key=pki.server_key, tls_client_ca=pki.ca),
        extractor=extractor,
    )
    server.start()
    addr = f"127.0.0.1:{port}"
    try:
        code, _, err = run(capsys, "lookup", "CT", "--target", addr, "--ca-cert", str(pki.ca),
                           "--server-name", "localhost")
        assert code == 2 and "needs a client certificate it trusts" in err, err
        code, _, err = run(capsys, "health", "--target", addr)
        assert code == 2 and "if it uses TLS, add --tls" in err, err
        code, out, err = run(capsys, "lookup", "CT", "--target", addr, "--ca-cert", str(pki.ca),
                             "--server-name", "localhost", "--client-cert",
                             str(pki.client_cert), "--client-key", str(pki.client_key))
        assert code == 0 and "C0040405" in out, err
    finally:
        server.stop(0)
    server, port = create_server(load_settings(port=0, workers=1, host="127.0.0.1"),
                                 extractor=extractor)
    server.start()
    try:
        server.state.start_draining()  # refusing, not stopped yet
        code, _, err = run(capsys, "lookup", "CT", "--target", f"127.0.0.1:{port}")
        assert code == 2 and "is shutting down (draining)" in err, err
        assert "no conceptsvc service answers" not in err
    finally:
        server.stop(0)


def test_lookup_cli_timeout_bounds_a_call_to_a_silent_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--timeout bounds each call (the deadline error's advice names it; the lookup commands
    had no such option); with --local, which calls nothing, it is refused."""
    import socket
    import time

    silent = socket.socket()  # accepts connections and never answers: a frozen service
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        code, _, err = run(capsys, "lookup", "CT", "--target", target, "--timeout", "0.5")
        took = time.monotonic() - t0
        assert code == 2 and "DEADLINE_EXCEEDED" in err and "--timeout" in err, err
        assert took < 5, took  # the default is 10 s a call
    finally:
        silent.close()
    code, _, err = run(capsys, "lookup", "CT", "--local", "--timeout", "3")
    assert code == 2 and "--local makes none" in err
    code, _, err = run(capsys, "concept", "C0024485", "--target", target, "--timeout", "0")
    assert code == 2 and "--timeout must be > 0" in err
