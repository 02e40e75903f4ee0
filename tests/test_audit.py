"""``make audit`` must never report an audit that did not happen as a clean one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port

from tools.audit import (
    EXIT_CLEAN,
    EXIT_NOT_AUDITED,
    EXIT_VULNERABLE,
    check_lock,
    interpret,
)

ROOT = Path(__file__).resolve().parents[1]


def test_audit_check_lock(tmp_path: Path) -> None:
    assert check_lock(ROOT / "requirements.lock") is None
    assert "does not exist" in (check_lock(tmp_path / "nope.lock") or "")
    unhashed = tmp_path / "a.lock"
    unhashed.write_text("grpcio==1.85.1\n")
    assert "no --hash" in (check_lock(unhashed) or "")
    unpinned = tmp_path / "b.lock"
    unpinned.write_text("grpcio>=1.8 \\\n    --hash=sha256:00\n")
    assert "not pinned" in (check_lock(unpinned) or "")
    empty = tmp_path / "c.lock"
    empty.write_text("# nothing\n")
    assert "pins nothing" in (check_lock(empty) or "")


def _report(*deps: dict[str, object]) -> str:
    return json.dumps({"dependencies": list(deps), "fixes": []})


def test_audit_interpret_verdicts() -> None:
    clean = interpret(0, _report({"name": "a", "version": "1", "vulns": []}), "")
    assert clean.code == EXIT_CLEAN and "clean" in clean.message
    vuln = interpret(1, _report(
        {"name": "a", "version": "1", "vulns": [{"id": "GHSA-x", "fix_versions": ["2"]}]},
        {"name": "b", "version": "3", "vulns": []},
    ), "")
    assert vuln.code == EXIT_VULNERABLE
    assert "a 1: GHSA-x (fixed in 2)" in vuln.message
    skipped = interpret(0, _report(
        {"name": "a", "version": "1", "vulns": []},
        {"name": "b", "version": "3", "skip_reason": "could not be audited"},
    ), "")
    assert skipped.code == EXIT_NOT_AUDITED and "b (could not be audited)" in skipped.message
    for out, err in (("", "ConnectionError: cannot reach"), ("not json", ""), ("[]", "")):
        broken = interpret(1, out, err)
        assert broken.code == EXIT_NOT_AUDITED and "NOT AUDITED" in broken.message
    assert interpret(1, _report({"name": "a", "version": "1", "vulns": []}), "").code == (
        EXIT_NOT_AUDITED
    )


def _offline_env() -> dict[str, str]:
    dead = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HTTPS_PROXY=dead, https_proxy=dead, HTTP_PROXY=dead, http_proxy=dead)
    return env


def test_audit_says_so_plainly_when_the_service_is_unreachable() -> None:
    """Offline (forced here with a dead proxy, so it holds on any machine): exit 2, and the
    output says the audit did not happen."""
    done = subprocess.run(
        [sys.executable, "-m", "tools.audit", "--timeout", "2"],
        cwd=ROOT, env=_offline_env(), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == EXIT_NOT_AUDITED, done.stdout + done.stderr
    assert "NOT AUDITED" in done.stdout and "unreachable" in done.stdout
    assert "clean:" not in done.stdout
    # (pip-audit's own failure when the probe is skipped — `--skip-probe` — takes ~20 s of its
    # retries; its output is covered by test_audit_interpret_verdicts and RELIABILITY.md.)
