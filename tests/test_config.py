"""Settings: sources and their precedence, validation, and errors a user can act on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conceptsvc.config import (
    DefaultOptions,
    Settings,
    load_settings,
    read_config_file,
    unknown_environment,
    worker_settings,
)
from conceptsvc.errors import ConfigError
from conceptsvc.index import build_index

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CONCEPTSVC_"):
            monkeypatch.delenv(name)


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    return build_index(
        tmp_path / "idx",
        [("C0000001", "pneumothorax", ["T047"])],
        [("C0000001", "pneumothorax", "MSH", "PT", 0)],
    )


def test_config_defaults_are_valid_and_secure() -> None:
    s = load_settings()
    assert s.host == "127.0.0.1"  # not exposed to the network unless asked
    assert s.workers >= 1
    assert s.auth_token is None and s.admin_token is None
    assert s.log_payloads is False
    assert s.index is None  # the embedded demo dictionary
    assert s.redis_url is None
    assert s.defaults == DefaultOptions()


def test_config_precedence_override_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "svc.toml"
    f.write_text('port = 6000\nthreads = 3\n[defaults]\nmode = "approximate"\nthreshold = 0.8\n')
    monkeypatch.setenv("CONCEPTSVC_PORT", "7000")
    monkeypatch.setenv("CONCEPTSVC_DEFAULTS__THRESHOLD", "0.9")
    s = load_settings(f)
    assert (s.port, s.threads) == (7000, 3)
    assert s.defaults.mode == "approximate" and s.defaults.threshold == 0.9
    s = load_settings(f, port=8000, defaults={"overlap": "all"})
    assert s.port == 8000
    # Nested values merge across sources rather than replacing the whole table.
    assert (s.defaults.mode, s.defaults.threshold, s.defaults.overlap) == (
        "approximate", 0.9, "all"
    )


def test_config_empty_environment_value_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker run -e CONCEPTSVC_HEALTH_PORT=` switches off what the image sets: an empty value
    is not given (it was "Input should be a valid integer", and an empty index path '.')."""
    for name in ("HEALTH_PORT", "METRICS_PORT", "INDEX", "REDIS_URL", "AUTH_TOKEN"):
        monkeypatch.setenv(f"CONCEPTSVC_{name}", "")
    s = load_settings()
    assert (s.health_port, s.metrics_port, s.index, s.redis_url, s.auth_token) == (
        None, None, None, None, None
    )
    monkeypatch.setenv("CONCEPTSVC_METRICS_PORT", "9100")
    assert load_settings().metrics_port == 9100


def test_config_file_named_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "svc.yaml"
    f.write_text(
        "workers: 3\nredis_url: redis://127.0.0.1:1/0\ncache_secret: " + "k" * 32 + "\n"
    )
    monkeypatch.setenv("CONCEPTSVC_CONFIG_FILE", str(f))
    s = load_settings()
    assert s.workers == 3 and s.redis_url == "redis://127.0.0.1:1/0"


def test_config_yaml_and_relative_paths(tmp_path: Path, index_dir: Path) -> None:
    f = tmp_path / "svc.yml"
    f.write_text("index: idx\ndefaults:\n  semantic_groups: [DISO, ANAT]\n")
    s = load_settings(f)
    assert s.index == index_dir
    assert s.defaults.semantic_groups == ("DISO", "ANAT")


def test_config_comma_separated_lists_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCEPTSVC_DEFAULTS__SEMANTIC_TYPES", "T047, dsyn,,Neoplastic Process")
    monkeypatch.setenv("CONCEPTSVC_DEFAULTS__SOURCES", "MSH,SNOMEDCT_US")
    s = load_settings()
    assert s.defaults.semantic_types == ("T047", "dsyn", "Neoplastic Process")
    assert s.defaults.sources == ("MSH", "SNOMEDCT_US")


def test_config_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "svc.toml"
    f.write_text("prot = 1\n[defaults]\nmod = 'exact'\n")
    with pytest.raises(ConfigError) as err:
        load_settings(f)
    text = str(err.value)
    assert "2 problems" in text
    # The file and line where each key is written, and what was probably meant; not an
    # environment variable nobody set (issue 16).
    assert f"{f}:1: prot: unknown setting; did you mean port?" in text
    assert f"{f}:3: defaults.mod: unknown setting; did you mean mode?" in text
    assert "CONCEPTSVC_PROT" not in text


def test_issue_16_unknown_key_in_yaml_names_file_line_and_suggestion(tmp_path: Path) -> None:
    f = tmp_path / "svc.yaml"
    f.write_text("port: 50052\ndefaults:\n  mode: exact\n  treshold: 0.5\nwrkers: 2\n")
    with pytest.raises(ConfigError) as err:
        load_settings(f)
    text = str(err.value)
    assert f"{f}:5: wrkers: unknown setting; did you mean workers?" in text
    assert f"{f}:4: defaults.treshold: unknown setting; did you mean threshold?" in text


def test_config_bad_value_in_a_file_names_the_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad value written in the config file is reported at its FILE:LINE, not as the env
    variable and flag that could also set it (nobody set those); a value the environment or a
    flag gives instead is reported with them."""
    f = tmp_path / "svc.yaml"
    f.write_text("port: 50052\nmetrics_port: abc\ndefaults:\n  mode: fuzzy\n")
    with pytest.raises(ConfigError) as err:
        load_settings(f)
    text = str(err.value)
    assert f"{f}:2: metrics_port: Input should be a valid integer" in text, text
    assert f"{f}:4: defaults.mode: Input should be" in text, text
    assert "CONCEPTSVC_METRICS_PORT" not in text and "--metrics-port" not in text
    monkeypatch.setenv("CONCEPTSVC_METRICS_PORT", "xyz")  # the environment's value wins
    with pytest.raises(ConfigError) as err:
        load_settings(f, defaults={"mode": "fuzzier"})
    text = str(err.value)
    assert "metrics_port (env CONCEPTSVC_METRICS_PORT, flag --metrics-port)" in text, text
    assert "defaults.mode (env CONCEPTSVC_DEFAULTS__MODE, flag --default-mode)" in text, text


def test_issue_16_unknown_nested_env_key_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONCEPTSVC_DEFAULTS__MOD", "exact")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "defaults.mod (env CONCEPTSVC_DEFAULTS__MOD): unknown setting; did you mean mode?" in (
        str(err.value)
    )


def test_config_unknown_environment_warns_with_a_suggestion() -> None:
    warnings = unknown_environment({
        "CONCEPTSVC_WOKRERS": "2",  # a typo
        "CONCEPTSVC_PORT": "1",  # a setting
        "CONCEPTSVC_DEFAULTS__MODE": "exact",  # a nested setting
        "CONCEPTSVC_TOKEN": "x" * 20,  # the client's token
        "CONCEPTSVC_ZZZ": "1",  # nothing near
        "PATH": "/bin",
    })
    assert len(warnings) == 2
    assert "CONCEPTSVC_WOKRERS" in warnings[0] and "did you mean CONCEPTSVC_WORKERS?" in warnings[0]
    assert "CONCEPTSVC_ZZZ" in warnings[1] and "did you mean" not in warnings[1]


def test_issue_16_unknown_environment_variable_warned_at_start_up(tmp_path: Path) -> None:
    env = {**os.environ, "CONCEPTSVC_WOKRERS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "conceptsvc.cli", "semtypes"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert proc.returncode == 0
    assert "CONCEPTSVC_WOKRERS" in proc.stderr
    assert "did you mean CONCEPTSVC_WORKERS?" in proc.stderr


def test_config_reports_every_problem_with_its_env_and_flag() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(workers=0, port=70000, auth_token="short", defaults={"threshold": 1.5})
    text = str(err.value)
    assert err.value.code == "E100"
    assert "4 problems" in text
    assert "workers (env CONCEPTSVC_WORKERS, flag --workers)" in text
    assert "port (env CONCEPTSVC_PORT, flag --port)" in text
    assert "at least 16 characters" in text
    assert (
        "defaults.threshold (env CONCEPTSVC_DEFAULTS__THRESHOLD, flag --default-threshold)"
        in text
    )


def test_config_unknown_semantic_type_suggests_names() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(defaults={"semantic_types": "dsny"})
    assert "Did you mean" in str(err.value) and "dsyn" in str(err.value)


def test_config_bad_values(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    for kwargs, expected in [
        ({"index": tmp_path / "nowhere"}, "not an index directory"),
        ({"tls_cert": cert}, "must be given together"),
        ({"tls_client_ca": cert}, "needs tls_cert"),
        ({"tls_cert": cert, "tls_key": tmp_path / "missing.pem"}, "does not exist"),
        ({"redis_url": "http://x"}, "redis://"),
        ({"redis_url": "redis://127.0.0.1:notaport/0"}, "not a valid Redis URL: Port could"),
        ({"defaults": {"mode": "fuzzy"}}, "defaults.mode"),
        ({"defaults": {"profile": "rocov3"}}, "unknown profile 'rocov3'.*did you mean rocov2"),
        ({"redis_backoff_seconds": 5, "redis_backoff_max_seconds": 1}, "backoff_max"),
        ({"redis_url": "redis://127.0.0.1:1/0"},
         "redis_url needs cache_secret \\(env CONCEPTSVC_CACHE_SECRET\\)"),
        ({"cache_secret": "k" * 31}, "cache_secret .*at least 32 characters"),
        # the shipped deployment files' placeholders, as any secret or the Redis password
        ({"cache_secret": "REPLACE-ME-" + "k" * 40}, "cache_secret .*is the REPLACE-ME placeh"),
        ({"auth_token": "REPLACE-ME-" + "t" * 20}, "auth_token .*is the REPLACE-ME placeholder"),
        ({"admin_token": "REPLACE-ME-x\n"}, "admin_token .*is the REPLACE-ME placeholder"),
        ({"redis_url": "redis://:REPLACE-ME-pw@r:6379/0", "cache_secret": "k" * 40},
         "redis_url .*has as its password the REPLACE-ME placeholder"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            load_settings(**kwargs)
    # a bad Redis URL is refused without echoing it: it may hold a password
    with pytest.raises(ConfigError) as info:
        load_settings(redis_url="redis://:s3cret-pw@127.0.0.1:bad/0")
    assert "s3cret-pw" not in str(info.value) and "not a valid Redis URL" in str(info.value)


def test_config_log_level_and_format_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--log-level INFO` (as logging spells levels, and the README wrote it) was refused."""
    assert load_settings(log_level="INFO", log_format="JSON").log_level == "info"
    monkeypatch.setenv("CONCEPTSVC_LOG_LEVEL", " Warning ")
    assert load_settings().log_level == "warning"
    with pytest.raises(ConfigError, match="log_level"):
        load_settings(log_level="verbose")


def test_config_rpc_limits_fit_the_thread_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unset, the RPC limit is what the pool can run beside its reserve for health checks.
    s = load_settings(threads=10)
    assert (s.reserved_threads, s.max_concurrent_rpcs, s.rpc_limit) == (2, None, 8)
    assert load_settings(threads=10, max_concurrent_rpcs=3).rpc_limit == 3
    # A limit the threads cannot serve (the old default 256 over 64 threads) is refused.
    with pytest.raises(ConfigError, match="threads - reserved_threads = 62"):
        load_settings(max_concurrent_rpcs=256)
    with pytest.raises(ConfigError, match=r"reserved_threads \(4\) must be below threads \(4\)"):
        load_settings(threads=4, reserved_threads=4)
    with pytest.raises(ConfigError, match="stream_idle_seconds"):
        load_settings(stream_idle_seconds=-1)
    # Each is a setting like any other: environment and file too.
    monkeypatch.setenv("CONCEPTSVC_STREAM_IDLE_SECONDS", "2.5")
    monkeypatch.setenv("CONCEPTSVC_RESERVED_THREADS", "3")
    f = tmp_path / "svc.toml"
    f.write_text("threads = 12\nmax_concurrent_rpcs = 9\n")
    s = load_settings(f)
    assert (s.stream_idle_seconds, s.reserved_threads, s.rpc_limit) == (2.5, 3, 9)
    assert load_settings().stream_idle_seconds == 2.5


def test_config_file_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.toml")
    ini = tmp_path / "svc.ini"
    ini.write_text("[x]")
    with pytest.raises(ConfigError, match="unknown format"):
        load_settings(ini)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be"):
        read_config_file(lst)
    loop = tmp_path / "loop.yaml"
    loop.write_text("config_file: other.yaml\n")
    with pytest.raises(ConfigError, match="cannot be set from a config file"):
        load_settings(loop)


SECRET = "s3cr3t-admin-token-value-XYZ"


def test_config_parse_errors_name_the_file_line_and_column_never_its_text(
    tmp_path: Path,
) -> None:
    """The review's file: a YAML line `admin_token: SECRET: oops` made `serve --config` print
    the line, token and all, to stderr (the container's logs). The error names the file, the
    line and column and the parser's problem, and nothing of the file's text: not the line,
    nor what a parser quotes of it (a tag or an alias is the value itself)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"port: 50699\nadmin_token: {SECRET}: oops\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCEPTSVC_")}
    proc = subprocess.run(
        [sys.executable, "-m", "conceptsvc.cli", "serve", "--config", str(bad)],
        capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"conceptsvc: [E100] config file {bad} is not valid YAML: mapping values are not "
        "allowed here (at line 2, column 42)\n"
    )
    cases = {
        "tag.yaml": (f"port: 1\nadmin_token: !{SECRET}\n", "YAML: could not determine a "
                     "constructor for the tag '…' (at line 2, column 14)"),
        "alias.yaml": (f"port: 1\nadmin_token: *{SECRET}\n",
                       "YAML: found undefined alias '…' (at line 2, column 14)"),
        "escape.yaml": (f'admin_token: "{SECRET}\\q"\n',
                        "YAML: found unknown escape character '…' (at line 1, column 44)"),
        "flow.yaml": (f"admin_token: [{SECRET}\n",
                      "YAML: expected ',' or ']', but got '<stream end>' (at line 2, column 1)"),
        "control.yaml": (f"admin_token: {SECRET}\x01\n",
                         "YAML: special characters are not allowed (at line 1, column 42)"),
        "colon.toml": (f"port = 1\nadmin_token: {SECRET}\n", "TOML: Expected '=' after a key "
                       "in a key/value pair (at line 2, column 12)"),
        "open.toml": (f'admin_token = "{SECRET}\n', "TOML: Illegal character '\\n' (at line 1, "
                      "column 44)"),
    }
    for name, (text, problem) in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            load_settings(path)
        assert str(err.value) == f"[E100] config file {path} is not valid {problem}"
    latin = tmp_path / "latin.toml"
    latin.write_bytes(f'port = 1\nadmin_token = "{SECRET}\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_settings(latin)
    assert str(err.value) == (
        f"[E100] config file {latin} is not valid UTF-8 (at line 2, column 44)"
    )


def test_config_no_error_shows_a_secret_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens and the Redis URL's password appear in no error: a token of the wrong type or
    too short in a file, a Redis URL whose password the URL parser took for a port, and
    settings a worker finds invalid once started (pydantic's own message quotes them all)."""
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(f"admin_token: [{SECRET}]\nauth_token: {SECRET[:10]}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(wrong)
    assert str(err.value).splitlines()[1:] == [
        f"  {wrong}:2: auth_token: tokens must be at least 16 characters; generate one with "
        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`",
        f"  {wrong}:1: admin_token: Input should be a valid string",
    ]
    monkeypatch.setenv("CONCEPTSVC_REDIS_URL", f"redis://:{SECRET}/0")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value).splitlines()[1] == (
        "  redis_url (env CONCEPTSVC_REDIS_URL, flag --redis-url): is not a valid Redis URL: "
        "Port could not be cast to integer value as '…'"
    )
    monkeypatch.delenv("CONCEPTSVC_REDIS_URL")
    values = {
        "index": str(tmp_path / "gone"), "admin_token": SECRET, "auth_token": SECRET[::-1],
        "redis_url": f"redis://:{SECRET}@127.0.0.1:6379/0",
    }
    with pytest.raises(ConfigError) as err:
        worker_settings(values)
    assert str(err.value) == (
        f"[E100] invalid settings in a worker:\n  settings: index: {tmp_path / 'gone'} is not an "
        "index directory (no manifest.json); build one with `conceptsvc index build` or leave it "
        "unset to serve the demo dictionary"
    )


def test_config_none_overrides_do_not_mask_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCEPTSVC_THREADS", "5")
    assert load_settings(threads=None).threads == 5


def test_config_is_frozen_and_secrets_hidden() -> None:
    s = load_settings(auth_token="a" * 32, cache_secret="c" * 40)
    assert "a" * 32 not in repr(s) and "c" * 40 not in repr(s)
    # as the tokens: a secret file's newline is cut (replicas reading it from a file and from
    # the environment sign alike), and a short one is refused without being echoed
    assert load_settings(cache_secret="c" * 40 + "\n").cache_secret == s.cache_secret
    with pytest.raises(ConfigError) as info:
        load_settings(cache_secret="short-secret-x")
    assert "short-secret-x" not in str(info.value)
    with pytest.raises(Exception, match="frozen"):
        s.port = 1  # type: ignore[misc]
    assert isinstance(s, Settings)


def test_config_max_option_items_from_every_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The option-list cap of issue 18 (item 5): a setting like the others, validated."""
    import argparse

    from conceptsvc.config import add_settings_arguments, settings_from_args

    assert load_settings().max_option_items == 10_000
    f = tmp_path / "svc.toml"
    f.write_text("max_option_items = 500\n")
    assert load_settings(f).max_option_items == 500
    monkeypatch.setenv("CONCEPTSVC_MAX_OPTION_ITEMS", "700")
    assert load_settings(f).max_option_items == 700
    parser = argparse.ArgumentParser(prog="conceptsvc serve")
    add_settings_arguments(parser)
    assert settings_from_args(parser.parse_args(["--max-option-items", "900"])).max_option_items \
        == 900
    for bad in (0, -1, 1_000_001):
        with pytest.raises(ConfigError, match="max_option_items"):
            load_settings(max_option_items=bad)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--max-option-items MAX_OPTION_ITEMS most names in one request option list" in shown
    assert "env CONCEPTSVC_MAX_OPTION_ITEMS; default: 10000" in shown
