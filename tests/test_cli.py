"""The command line as a careful user meets it: pipes, help, typos (issue 16)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conceptsvc.cli import EXIT_BROKEN_PIPE, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "conceptsvc.cli"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCEPTSVC_")}
    return {**env, "PYTHONPATH": str(ROOT)}


def _subcommands() -> list[list[str]]:
    """Every leaf command, e.g. ``["lookup"]``, ``["index", "info"]``."""
    import argparse

    found: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found.append(path)
        for action in subs:
            for name, child in action.choices.items():
                walk(child, [*path, name])

    walk(build_parser(), [])
    return found


def _help(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


# -- pipes -------------------------------------------------------------------------------------
def test_issue_16_semtypes_into_head_has_no_traceback() -> None:
    """`conceptsvc semtypes | head -1` through a real pipe."""
    producer = subprocess.Popen(
        [*CLI, "semtypes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    assert producer.stdout is not None
    head = subprocess.run(["head", "-1"], stdin=producer.stdout, capture_output=True,
                          check=True, timeout=60)
    producer.stdout.close()
    _, err = producer.communicate(timeout=60)
    assert head.stdout.decode().startswith("ACTI ")
    assert err == b""
    assert producer.returncode in (0, EXIT_BROKEN_PIPE)  # 0 when head read it all in time


def test_issue_16_reader_gone_before_output_exits_141_quietly() -> None:
    """The deterministic form of the above: the pipe's only reader is gone before anything
    is written, so every write fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*CLI, "semtypes"], stdout=write_end, stderr=subprocess.PIPE,
                              env=_env(), timeout=60, check=False)
    finally:
        os.close(write_end)
    assert proc.stderr == b""
    assert proc.returncode == EXIT_BROKEN_PIPE


# -- help --------------------------------------------------------------------------------------
def test_cli_every_subcommand_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    commands = _subcommands()
    assert ["index", "info"] in commands and ["annotate"] in commands
    for command in commands:
        text = _help(capsys, *command)
        examples = text.split("examples:\n", 1)
        assert len(examples) == 2, command
        lines = [x.strip() for x in examples[1].splitlines() if x.strip()]
        assert lines and all(x.startswith(("conceptsvc ", "CONCEPTSVC_", "zcat "))
                             for x in lines), (command, lines)
        assert " ".join(command) in examples[1], command


def test_issue_16_index_info_and_semtypes_have_descriptions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert "content hash" in _help(capsys, "index", "info")
    assert "semantic groups" in _help(capsys, "semtypes")


def test_issue_16_annotate_help_does_not_mention_local(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert "--local" not in _help(capsys, "annotate")
    assert "--local" in _help(capsys, "lookup")  # which has it


# -- typos -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve", "--wokers", "2"], "conceptsvc serve: error: unrecognized arguments: --wokers 2;"
                                     " did you mean --workers?"),
        (["annotate", "in.csv", "--out", "o.jsonl", "--concurency=3"], "did you mean "
                                                                       "--concurrency?"),
        (["lookup", "x", "--jsn"], "did you mean --json?"),
        (["anotate"], "invalid choice: 'anotate'"),
        (["anotate"], "did you mean annotate?"),
        (["index", "infoo", "x"], "did you mean info?"),
        (["lookup", "x", "--mode", "aproximate"], "did you mean approximate?"),
    ],
)
def test_issue_16_misspelt_flags_and_commands_get_a_suggestion(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert expected in capsys.readouterr().err


def test_cli_no_suggestion_for_a_flag_nothing_resembles(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["semtypes", "--xyzzy"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --xyzzy" in err and "did you mean" not in err


# -- start-up ----------------------------------------------------------------------------------
def _parse_output(parser: argparse.ArgumentParser, argv: list[str],
                  capsys: pytest.CaptureFixture[str]) -> tuple[object, str, str]:
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(argv)
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def test_cli_lazy_parser_says_what_the_whole_parser_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """main builds only the chosen subcommand's options (build_parser(lazy=True)); its help,
    usage errors and suggestions are those of the parser built whole."""
    commands = _subcommands()
    assert len(commands) >= 10
    argvs = [[]] + [[*c, "--help"] for c in commands] + [[*c, "--no-such-flag"] for c in commands]
    argvs += [["anotate"], ["index", "infoo"], ["serve", "--wokers", "2"],
              ["annotate", "in.csv", "--out", "o.jsonl", "--concurency=3"], ["--help"]]
    for argv in argvs:
        whole = _parse_output(build_parser(), argv, capsys)
        lazy = _parse_output(build_parser(lazy=True), argv, capsys)
        assert lazy == whole, argv
        assert whole[1] or whole[2], argv  # it printed something to compare


def test_cli_lazy_parser_parses_as_the_whole_parser() -> None:
    argv = ["annotate", "in.csv", "--out", "o.jsonl", "--format", "csv", "--batch-size", "7",
            "--semantic-groups", "DISO", "--no-include-negated", "--target", "h:1"]
    assert vars(build_parser(lazy=True).parse_args(argv)) == vars(build_parser().parse_args(argv))


def test_cli_client_environment_is_known_to_the_settings() -> None:
    """main skips the settings model's check of CONCEPTSVC_* variables when only those in
    _CLIENT_ENV are set; that is only right while the check knows them all."""
    from conceptsvc.cli import _CLIENT_ENV
    from conceptsvc.config import unknown_environment

    assert _CLIENT_ENV
    assert unknown_environment(dict.fromkeys(_CLIENT_ENV, "x")) == []
