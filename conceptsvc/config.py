"""Service settings: one validated object, built once at start-up and passed down explicitly.

Where values come from, strongest first: keyword overrides (the CLI flags), ``CONCEPTSVC_*``
environment variables (nested with ``__``: ``CONCEPTSVC_DEFAULTS__MODE=approximate``), an
optional TOML or YAML file (``--config FILE`` / ``CONCEPTSVC_CONFIG_FILE``), then the defaults
below. Unknown keys are errors (``extra="forbid"``) so that a typo in a file is not silently
ignored; every problem is reported at once, as a :class:`~conceptsvc.errors.ConfigError` naming
the setting, the environment variable and the flag that set it.

List settings (``defaults.semantic_types`` and friends) accept a comma-separated string from
the environment or the command line, or a list in a file.

Nothing else in conceptsvc reads ``os.environ`` for these settings; code receives a
:class:`Settings` from its caller.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from conceptsvc.errors import ConfigError, SemanticNetworkError
from conceptsvc.model import MAX_BATCH_ITEMS, ExtractOptions, Mode, Overlap, Similarity

__all__ = [
    "ENV_PREFIX",
    "PLACEHOLDER",
    "DefaultOptions",
    "Settings",
    "add_settings_arguments",
    "load_settings",
    "settings_from_args",
    "unknown_environment",
    "worker_settings",
]

ENV_PREFIX = "CONCEPTSVC_"
_PATH_FIELDS = ("index", "tls_cert", "tls_key", "tls_client_ca")
_MIN_TOKEN_CHARS = 16
#: What every secret in the shipped deployment files (deploy/k8s/secret.yaml,
#: deploy/env.example) starts with: a deployment that kept one is refused at start-up, since
#: a secret anyone can read in this repository protects nothing.
PLACEHOLDER = "REPLACE-ME"
# Longer than a token: whoever can read the Redis can test guesses of the cache secret
# offline (an entry's name is a keyed digest of values a client knows), not one call at a time.
_MIN_SECRET_CHARS = 32


def _default_workers() -> int:
    """Cores this process may run on (respects CPU affinity / cgroup cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _refuse_placeholder(value: str, what: str = "is") -> None:
    """Refuse a secret (a token, the cache secret, a Redis URL's password) that is still the
    shipped deployment files' placeholder; the message never echoes the value."""
    if value.startswith(PLACEHOLDER):
        raise ValueError(
            f"{what} the {PLACEHOLDER} placeholder of the shipped deployment files; put a value "
            "of your own in the Secret (deploy/k8s/secret.yaml) or in deploy/.env, made with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )


def _split_names(value: Any) -> Any:
    """``"T047, dsyn"`` → ``("T047", "dsyn")``; lists pass through; blanks are dropped."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value


NameTuple = Annotated[tuple[str, ...], NoDecode]
PathTuple = Annotated[tuple[Path, ...], NoDecode]


class DefaultOptions(BaseModel):
    """Extraction options applied to every request field the client leaves unset.

    Mirrors :class:`conceptsvc.model.ExtractOptions`, see there for the meaning of each; the
    enumerated fields take their choices from the same ``Literal`` types.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    semantic_types: NameTuple = Field(
        default=(), description="semantic types to accept (empty = all)"
    )
    semantic_groups: NameTuple = Field(
        default=(), description="semantic groups to accept (empty = all)"
    )
    sources: NameTuple = Field(
        default=(), description="source vocabularies (SABs) to accept (empty = all)"
    )
    exclude_cuis: NameTuple = Field(default=(), description="CUIs never reported")
    mode: Mode = Field(default="exact", description="matching mode")
    similarity: Similarity = Field(
        default="jaccard", description="similarity measure for approximate matching"
    )
    threshold: float = Field(default=0.7, gt=0, le=1, description="approximate matching threshold")
    overlap: Overlap = Field(
        default="longest", description="which of overlapping mentions to keep"
    )
    profile: str = Field(default="none", min_length=1, description="concept profile")
    include_negated: bool = Field(default=True, description="report negated mentions (flagged)")
    include_hypothetical: bool | None = Field(
        default=None,
        description="report hypothetical mentions (flagged); unset: as the profile says",
    )
    include_mentions: bool = Field(
        default=True, description="return mentions, not only concept sets"
    )

    _split = field_validator(
        "semantic_types", "semantic_groups", "sources", "exclude_cuis", mode="before"
    )(_split_names)

    @field_validator("semantic_types", "semantic_groups")
    @classmethod
    def _known_semantic_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        from conceptsvc.semantic_network import load_semantic_network

        try:
            load_semantic_network().resolve_all(names)
        except SemanticNetworkError as exc:
            raise ValueError(exc.message) from None
        return names

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, name: str) -> str:
        from conceptsvc.profile import available_profiles

        known = available_profiles()
        if name not in known:  # (refused here, not by each worker when it loads the index)
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            raise ValueError(
                f"unknown profile {name!r}; the profiles are {', '.join(known)} (a file of "
                "your own: profile_files)"
                + (f" (did you mean {close[0]}?)" if close else "")
            )
        return name

    def to_extract_options(self) -> ExtractOptions:
        return ExtractOptions(**self.model_dump())


class Settings(BaseSettings):
    """Everything ``conceptsvc serve`` can be told. Field descriptions are the ``--help`` text."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        # CONCEPTSVC_X= (empty) means unset: the only way to switch off, with `docker run -e`
        # or a pod's env, a setting the image sets (its health, metrics ports and index)
        env_ignore_empty=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    config_file: Path | None = Field(default=None, description="TOML or YAML settings file")
    index: Path | None = Field(
        default=None, description="index directory to serve (default: the embedded demo dictionary)"
    )
    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="address to listen on ('0.0.0.0' or '[::]' = all)",
    )
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    workers: int = Field(
        default_factory=_default_workers,
        ge=1,
        le=64,
        description="server processes sharing the port (default: number of cores)",
    )
    threads: int = Field(
        default=64,
        ge=1,
        le=1024,
        description="RPC threads per worker; an open stream holds one for its whole life",
    )
    reserved_threads: int = Field(
        default=2,
        ge=1,
        description="RPC threads other calls never take, so that health checks and refusals "
        "always find one (must be below threads)",
    )
    max_concurrent_rpcs: int | None = Field(
        default=None,
        ge=1,
        description="RPCs in progress per worker, health checks aside and an open stream "
        "counting until it ends, beyond which a call is refused at once with "
        "RESOURCE_EXHAUSTED (unset: threads - reserved_threads, also its maximum)",
    )
    stream_idle_seconds: float = Field(
        default=60.0,
        ge=0,
        description="end a stream with UNAVAILABLE once it has sent nothing for this long with "
        "every item answered, freeing its thread (0 = never)",
    )
    max_text_chars: int = Field(
        default=100_000, ge=1, description="longest caption accepted (code points)"
    )
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        le=2**31 - 1,
        description="largest gRPC message, either way",
    )
    max_search_limit: int = Field(
        default=100, ge=1, description="most candidates SearchConcepts returns"
    )
    max_option_items: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="most names in one request option list (exclude_cuis, semantic_types, "
        "semantic_groups, sources); more is refused with RESOURCE_EXHAUSTED",
    )
    max_batch_items: int = Field(
        default=MAX_BATCH_ITEMS,
        ge=1,
        le=1_000_000,
        description="most captions in one AnnotateBatch request; more is refused whole with "
        "RESOURCE_EXHAUSTED before any caption is read (clients split their batches to it). "
        "10,000 because that is about what one 4 MiB reply of realistic captions holds "
        "(≈ 350 bytes an answer with its id and index hash), while the request could carry "
        "≈ 35,000 of them (≈ 120 bytes each) and 340,000 one-letter ones: without it the item "
        "count was bounded by the message size alone, and a worker held ≈ 1.1 KiB an item; "
        "annotate sends 512",
    )
    stream_batch_size: int = Field(
        default=64, ge=1, le=10_000, description="stream items looked up in the cache together"
    )
    grace_seconds: float = Field(
        default=10.0, ge=0, description="on SIGTERM, how long in-flight RPCs may take to finish"
    )
    drain_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        description="on SIGTERM, report NOT_SERVING this long before refusing RPCs",
    )
    max_connection_age_seconds: float = Field(
        default=0.0,
        ge=0,
        le=7 * 86400,
        description="close each client connection after about this long (gRPC's maximum "
        "connection age, give or take a tenth), so that running clients resolve the service name "
        "again and reach replicas added since they connected (0 = never)",
    )
    max_connection_age_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        le=7 * 86400,
        description="once a connection is past its maximum age, how long its calls in "
        "progress may take to finish before it is closed",
    )
    reflection: bool = Field(default=True, description="serve gRPC server reflection")
    health_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="a second port, on the same address, that answers only the standard gRPC "
        "health check (grpc.health.v1.Health/Check), in plaintext and without a token: for "
        "probes that cannot speak TLS (Kubernetes' gRPC probes) when the service port uses "
        "it (unset = off, 0 = pick a free one)",
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Prometheus /metrics HTTP port (unset = off)"
    )
    metrics_host: str = Field(default="127.0.0.1", min_length=1, description="metrics HTTP address")
    cache_size: int = Field(
        default=50_000, ge=0, description="in-process cache entries per worker (0 = off)"
    )
    cache_max_bytes: int = Field(
        default=128 * 1024 * 1024, ge=0, description="in-process cache size bound per worker, bytes"
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis cache tier URL (unset = off; needs cache_secret); a password goes "
        "in it: redis://:PASSWORD@host:6379/0",
    )
    cache_secret: SecretStr | None = Field(
        default=None,
        description="secret (at least 32 characters) that keys the Redis tier's entry names "
        "and signs their values; an entry without a valid signature is a miss, never an "
        "answer. Required with redis_url, the same on every replica sharing the Redis "
        "(another secret: separate entries)",
    )
    redis_prefix: str = Field(default="conceptsvc:", description="Redis key prefix")
    redis_ttl_seconds: int = Field(default=7 * 86400, ge=1, description="Redis entry lifetime")
    redis_timeout_seconds: float = Field(
        default=0.25, gt=0, description="Redis socket timeout; slower counts as an outage"
    )
    redis_backoff_seconds: float = Field(
        default=0.5, gt=0, description="first wait before reconnecting to Redis after an error"
    )
    redis_backoff_max_seconds: float = Field(
        default=30.0, gt=0, description="longest wait between Redis reconnect attempts"
    )
    tls_cert: Path | None = Field(
        default=None, description="server certificate chain (PEM) for TLS"
    )
    tls_key: Path | None = Field(default=None, description="server private key (PEM) for TLS")
    tls_client_ca: Path | None = Field(
        default=None, description="CA (PEM) that client certificates must chain to: mutual TLS"
    )
    auth_token: SecretStr | None = Field(
        default=None, description="bearer token every RPC must carry (unset = no authentication)"
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="bearer token for AdminService.ReloadIndex (unset = admin RPC off)",
    )
    log_payloads: bool = Field(
        default=False,
        description="log caption text at DEBUG level (off: captions never reach logs)",
    )
    log_level: Literal["debug", "info", "warning", "error"] | None = Field(
        default=None,
        description="serve's log level: debug, info, warning or error, in any case (unset: "
        "info, or debug with -vv)",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="serve's log lines: text, or one JSON object a line (time, level, logger, "
        "message; worker with several workers) for a log collector",
    )
    # (before `defaults`: fields are validated in order, and a default profile may be one
    # of these files')
    profile_files: PathTuple = Field(
        default=(),
        description="profile files of your own (YAML, as conceptsvc/profiles/*.yaml; a file's "
        "name is its profile's name), served beside the shipped profiles",
    )
    defaults: DefaultOptions = Field(
        default=DefaultOptions(),
        description="default extraction options",  # frozen: safe to share
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env or secrets-dir sources: configuration has exactly three places to come from.
        return (init_settings, env_settings, _ConfigFileSource(settings_cls))

    _split_paths = field_validator("profile_files", mode="before")(_split_names)

    @field_validator("profile_files")
    @classmethod
    def _register_profiles(cls, paths: tuple[Path, ...]) -> tuple[Path, ...]:
        # Registered now, in every process that reads the settings (the workers too), so that
        # `defaults.profile` and requests may name them; a bad file is refused at start-up.
        from conceptsvc.errors import ExtractionError
        from conceptsvc.profile import register_profile_file

        for path in paths:
            try:
                register_profile_file(path)
            except ExtractionError as exc:
                raise ValueError(exc.message) from None
        return paths

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        # INFO, as logging spells levels and the README writes them, is info
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("auth_token", "admin_token")
    @classmethod
    def _strong_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None:
            # A token read from a file (a Kubernetes secret made with --from-file) ends in a
            # newline that no client can send (metadata values cannot hold one): it is cut off
            # here, as the client cuts it off its own. Whitespace inside is refused.
            value = token.get_secret_value()
            _refuse_placeholder(value.strip())
            if value != value.strip():
                token = SecretStr(value.strip())
            if any(c.isspace() for c in token.get_secret_value()):
                raise ValueError("tokens cannot contain whitespace")
        if token is not None and len(token.get_secret_value()) < _MIN_TOKEN_CHARS:
            raise ValueError(
                f"tokens must be at least {_MIN_TOKEN_CHARS} characters; generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return token

    @field_validator("cache_secret")
    @classmethod
    def _strong_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is None:
            return None
        # Cut like the tokens (a secret file's newline), so that replicas reading it from a
        # file and from the environment sign alike.
        value = secret.get_secret_value().strip()
        _refuse_placeholder(value)
        if len(value) < _MIN_SECRET_CHARS:
            raise ValueError(
                f"must be at least {_MIN_SECRET_CHARS} characters; generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return SecretStr(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if url is not None:
            from redis.connection import parse_url

            try:  # what the cache will parse at first use, in every worker: refused now
                parts = parse_url(url)  # type: ignore[no-untyped-call]
            except ValueError as exc:  # (the URL is not echoed: it may hold a password, and
                # what the parser quotes of it may be the password: redis://:PASSWORD/0 has
                # PASSWORD as its port)
                raise ValueError(f"is not a valid Redis URL: {_unquoted(str(exc))}") from None
            _refuse_placeholder(str(parts.get("password") or ""), "has as its password")
        return url

    @model_validator(mode="after")
    def _paths_and_pairs(self) -> Settings:
        try:
            index_ok = self.index is None or (self.index / "manifest.json").is_file()
        except OSError as exc:  # a directory this user may not read (0700, another owner)
            raise ValueError(f"index: cannot read {self.index} ({exc.strerror})") from None
        if not index_ok:
            raise ValueError(
                f"index: {self.index} is not an index directory (no manifest.json); build one "
                "with `conceptsvc index build` or leave it unset to serve the demo dictionary"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key as well")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} does not exist or is not a file")
        if self.health_port and self.health_port in (self.port, self.metrics_port):
            raise ValueError(
                f"health_port ({self.health_port}) must differ from port and metrics_port: it "
                "is a listener of its own, serving only the health service in plaintext"
            )
        if self.redis_url is not None and self.cache_secret is None:
            # Entry names and values derived from public values alone let anyone who can
            # write to the Redis choose the answers (the index hash is in every reply).
            raise ValueError(
                "redis_url needs cache_secret (env CONCEPTSVC_CACHE_SECRET): the Redis tier "
                "signs its entries with it, so that whoever can write to the Redis cannot "
                "change the answers; give every replica sharing the Redis the same secret, "
                "made with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        if self.redis_backoff_max_seconds < self.redis_backoff_seconds:
            raise ValueError("redis_backoff_max_seconds must be >= redis_backoff_seconds")
        if self.reserved_threads >= self.threads:
            raise ValueError(
                f"reserved_threads ({self.reserved_threads}) must be below threads "
                f"({self.threads}): the reserve keeps health checks answerable, the rest serve "
                "RPCs"
            )
        room = self.threads - self.reserved_threads
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs > room:
            raise ValueError(
                f"max_concurrent_rpcs ({self.max_concurrent_rpcs}) is more than the RPC threads "
                f"can run: threads - reserved_threads = {room} (each call in progress, an open "
                "stream included, holds a thread); raise threads or leave max_concurrent_rpcs "
                "unset"
            )
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def rpc_limit(self) -> int:
        """Calls in progress per worker (health aside) before RESOURCE_EXHAUSTED."""
        if self.max_concurrent_rpcs is not None:
            return self.max_concurrent_rpcs
        return self.threads - self.reserved_threads


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the file named by ``config_file`` as given by the stronger sources (flag or env)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # everything happens in __call__

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config_file")
        if path is None:
            return {}
        return read_config_file(Path(path))


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML (``.toml``) or YAML (``.yaml``/``.yml``) settings file into a mapping.

    Relative paths inside the file are taken relative to the file's directory, so a config file
    and the index it names can move together.
    """
    suffix = path.suffix.lower()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(
            f"config file {path}: unknown format {suffix!r}; use .toml, .yaml or .yml"
        )
    # A parse error says where and what, never the file's text: the parsers quote the line
    # (PyYAML) or a piece of it, and the file holds the tokens and the Redis URL's password.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start].decode("utf-8")
        raise ConfigError(
            f"config file {path} is not valid UTF-8 (at {_line_column(before, len(before))})"
        ) from None
    try:
        data: Any = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except tomllib.TOMLDecodeError as exc:  # "problem (at line L, column C)"
        problem = _unquoted(str(exc))
        raise ConfigError(f"config file {path} is not valid TOML: {problem}") from None
    except yaml.YAMLError as exc:
        problem = _yaml_problem(exc, text)
        raise ConfigError(f"config file {path} is not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a table/mapping of settings")
    if "config_file" in data:
        raise ConfigError(f"config file {path}: `config_file` cannot be set from a config file")
    for key in _PATH_FIELDS:
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            data[key] = str(path.parent / value)
    files = _split_names(data.get("profile_files"))  # "A,B" as the field reads it
    if isinstance(files, tuple | list) and files:
        data["profile_files"] = [
            str(path.parent / f) if isinstance(f, str) and not Path(f).is_absolute() else f
            for f in files
        ]
    return data


def _line_column(text: str, pos: int) -> str:
    """``line L, column C`` (from 1) of character ``pos`` of ``text``."""
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)  # (rfind: -1 on the first line)
    return f"line {line}, column {column}"


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """PyYAML's description of what is wrong and where (``problem (at line L, column C)``),
    without the snippet of the file its message shows or what the description quotes of it."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        return f"{exc.reason} (at {_line_column(text, exc.position)})"
    problem = getattr(exc, "problem", None) or "cannot be parsed"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" (at line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return _unquoted(problem) + where


# What a parser's message quotes: a Python repr of a string.
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" r'|"(?:[^"\\]|\\.)*"')
_GRAMMAR = re.compile(r"<[a-z ]+>|[^\w\s]|\\[a-z]|\\x[0-9a-f]{2}")


def _unquoted(message: str) -> str:
    """A parser's message with what it quotes of the file left out ('…'): a YAML tag or
    alias (``!s3cr3t``, ``*s3cr3t``: a token written where YAML does not expect it), a key, a
    letter. Its own words stay: token names (``'<scalar>'``) and single punctuation or control
    characters (``'@'``, ``'\\t'``), which say what it stumbled on."""
    return _QUOTED.sub(
        lambda m: m[0] if _GRAMMAR.fullmatch(m[0][1:-1]) else "'…'", message
    )


# CONCEPTSVC_* variables read outside the settings object (the client's token, the engine's
# reference switch, the demo dictionary's cache): known, so not warned about.
_OTHER_ENV = ("TOKEN", "PURE_PYTHON", "CACHE_DIR")


def _known_env() -> dict[str, str]:
    """Every CONCEPTSVC_* variable conceptsvc reads → the setting it sets."""
    known = {ENV_PREFIX + name.upper(): name for name in Settings.model_fields}
    known.update({
        f"{ENV_PREFIX}DEFAULTS__{name.upper()}": f"defaults.{name}"
        for name in DefaultOptions.model_fields
    })
    known.update({ENV_PREFIX + name: name.lower() for name in _OTHER_ENV})
    return known


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """A warning for every ``CONCEPTSVC_*`` variable conceptsvc does not read — pydantic
    ignores them, so ``CONCEPTSVC_WOKRERS=2`` would otherwise change nothing, silently."""
    known = _known_env()
    warnings = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in known:
            continue
        # Compared without the prefix every candidate shares, which would make anything close.
        tails = {k.removeprefix(ENV_PREFIX): k for k in known}
        close = difflib.get_close_matches(
            name.upper().removeprefix(ENV_PREFIX), list(tails), n=1, cutoff=0.7
        )
        hint = f"; did you mean {tails[close[0]]}?" if close else ""
        warnings.append(
            f"environment variable {name} is not a conceptsvc setting and is ignored{hint} "
            "(`conceptsvc serve --help` lists each setting's variable)"
        )
    return warnings


def _key_line(path: Path, loc: tuple[int | str, ...]) -> int | None:
    """The line of a TOML/YAML file where the key ``loc`` is written, found by scanning the
    text (neither parser keeps positions): the last part of ``loc`` as a key, after the line
    that opens its parent table/mapping when it is nested."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    start = 0
    if len(loc) > 1:
        parent = re.compile(
            rf"^\s*(\[\s*{re.escape(str(loc[-2]))}\s*\]|{re.escape(str(loc[-2]))}\s*:)"
        )
        start = next((i + 1 for i, line in enumerate(lines) if parent.match(line)), 0)
        dotted = re.compile(rf"^\s*{re.escape(str(loc[-2]))}\.{re.escape(str(loc[-1]))}\s*=")
        for i, line in enumerate(lines):
            if dotted.match(line):  # TOML's defaults.mode = ...
                return i + 1
    key = re.compile(rf"^\s*[\"']?{re.escape(str(loc[-1]))}[\"']?\s*[=:]")
    for i in range(start, len(lines)):
        if key.match(lines[i]):
            return i + 1
    return None


def _unknown_key(loc: tuple[int | str, ...], file: Path | None, in_file: bool) -> str:
    """Where an unknown setting was written and what was probably meant."""
    parts = [str(p) for p in loc]
    fields = DefaultOptions.model_fields if parts[:1] == ["defaults"] else Settings.model_fields
    close = difflib.get_close_matches(parts[-1], list(fields), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    name = ".".join(parts)
    if in_file and file is not None:
        line = _key_line(file, loc)
        return f"{file}{f':{line}' if line else ''}: {name}: unknown setting{hint}"
    env = _env_name(loc)
    return f"{name} (env {env}): unknown setting{hint}"


def _file_has(data: Mapping[str, Any], loc: tuple[int | str, ...]) -> bool:
    node: Any = data
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _env_name(loc: tuple[int | str, ...]) -> str:
    """The environment variable of the setting at ``loc`` (nested: ``__`` between parts)."""
    return ENV_PREFIX + "__".join(str(p) for p in loc).upper()


def _from_file(
    loc: tuple[int | str, ...], overrides: Mapping[str, Any], file_data: Mapping[str, Any]
) -> bool:
    """Whether the value at ``loc`` came from the config file: the file has it and neither
    a flag (``overrides``) nor the environment, which come first, gave it."""
    if not _file_has(file_data, loc) or _file_has(overrides, loc):
        return False
    env = os.environ.get(_env_name(loc))
    return not env  # (an empty variable is no value: env_ignore_empty)


def _describe(loc: tuple[int | str, ...]) -> str:
    """Where a setting can be set: its dotted name, env variable and CLI flag."""
    parts = [str(p) for p in loc]
    name = ".".join(parts)
    env = _env_name(loc)
    flag = "--" + "-".join(parts).replace("_", "-").replace("defaults-", "default-")
    return f"{name} (env {env}, flag {flag})"


def worker_settings(values: Mapping[str, Any]) -> Settings:
    """The settings a supervisor hands its workers (validated by it already), validated again
    in the worker's own process, which registers the profile files for itself. What fails now
    (a file gone since) raises ConfigError naming each setting, as :func:`load_settings` does,
    never pydantic's own error, whose text quotes the values it was given: the tokens too."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = [
            f"  {'.'.join(map(str, err['loc'])) or 'settings'}: "
            + err["msg"].removeprefix("Value error, ")
            for err in exc.errors()
        ]
        raise ConfigError("invalid settings in a worker:\n" + "\n".join(problems)) from None


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build and validate the settings, or raise one :class:`ConfigError` listing every problem.

    ``overrides`` are the strongest source (the CLI passes the flags it was given); ``None``
    values are dropped so that an absent flag does not mask the environment or the file.
    Nested default options may be given as ``defaults={...}``.
    """
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    if config_file is not None:
        kwargs["config_file"] = Path(config_file)
    try:
        return Settings(**kwargs)
    except ValidationError as exc:
        lines = []
        file = kwargs.get("config_file") or os.environ.get(ENV_PREFIX + "CONFIG_FILE")
        file_path = Path(file) if file else None
        file_data: Mapping[str, Any] = {}
        if file_path is not None:
            try:
                file_data = read_config_file(file_path)
            except ConfigError:
                pass  # it was read once already; this is only for locating keys
        for err in exc.errors():
            loc = err["loc"]
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                lines.append("  " + _unknown_key(loc, file_path, _file_has(file_data, loc)))
                continue
            if loc and file_path is not None and _from_file(loc, kwargs, file_data):
                line = _key_line(file_path, loc)
                name = ".".join(str(p) for p in loc)
                lines.append(f"  {file_path}{f':{line}' if line else ''}: {name}: {msg}")
                continue
            where = _describe(loc) if loc else "settings"
            lines.append(f"  {where}: {msg}")
        if any(e["type"] == "extra_forbidden" for e in exc.errors()):
            lines.append("  (`conceptsvc serve --help` lists every setting)")
        n = len(exc.errors())
        raise ConfigError(
            f"invalid settings ({n} problem{'s' if n > 1 else ''}):\n"
            + "\n".join(lines)
        ) from None


# -- command-line flags ---------------------------------------------------------------------------
# ``conceptsvc serve`` gets one flag per setting, generated from the model so that ``--help``
# always lists every option with its environment variable.

_METAVARS = {
    "index": "DIR",
    "tls_cert": "PEM",
    "tls_key": "PEM",
    "tls_client_ca": "PEM",
    "redis_url": "URL",
    "auth_token": "TOKEN",
    "admin_token": "TOKEN",
    "cache_secret": "SECRET",
    "semantic_types": "A,B,...",
    "semantic_groups": "A,B,...",
    "sources": "A,B,...",
    "exclude_cuis": "A,B,...",
    "profile_files": "FILE,...",
}


def _flag_specs() -> list[tuple[str, str, str, FieldInfo]]:
    """(group, field name, flag, field) for every setting except ``config_file``."""
    specs = []
    for name, info in Settings.model_fields.items():
        if name in ("config_file", "defaults"):
            continue
        specs.append(("settings", name, "--" + name.replace("_", "-"), info))
    for name, info in DefaultOptions.model_fields.items():
        specs.append(("defaults", name, "--default-" + name.replace("_", "-"), info))
    return specs


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per setting; absent flags leave other sources alone."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"TOML or YAML settings file (env {ENV_PREFIX}CONFIG_FILE)",
    )
    groups = {
        "settings": parser.add_argument_group("service settings"),
        "defaults": parser.add_argument_group(
            "default extraction options (for request fields a client leaves unset)"
        ),
    }
    for group, name, flag, info in _flag_specs():
        env = ENV_PREFIX + (name if group == "settings" else f"DEFAULTS__{name}").upper()
        default = info.get_default(call_default_factory=False)
        if info.default_factory is not None:
            shown = "computed"
        elif isinstance(default, tuple):
            shown = ",".join(map(str, default)) or "none"
        else:
            shown = "unset" if default is None else str(default)
        helptext = f"{info.description} (env {env}; default: {shown})"
        dest = f"_{group}__{name}"
        annotation = info.annotation
        if annotation is bool:
            groups[group].add_argument(
                flag,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=helptext,
            )
        else:
            metavar = _METAVARS.get(name, name.upper())
            if name in ("auth_token", "admin_token", "cache_secret", "redis_url"):
                helptext += "; prefer the environment: flags show up in `ps`"
            groups[group].add_argument(
                flag, dest=dest, metavar=metavar, default=None, help=helptext
            )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from parsed ``serve`` flags, the environment and the config file."""
    overrides: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for group, name, _flag, _info in _flag_specs():
        value = getattr(args, f"_{group}__{name}", None)
        if value is None:
            continue
        (overrides if group == "settings" else defaults)[name] = value
    if defaults:
        overrides["defaults"] = defaults
    return load_settings(getattr(args, "config", None), **overrides)
