"""``make audit``: check the locked dependency set for known vulnerabilities with pip-audit.

Why a wrapper around ``pip-audit -r requirements.lock``: an audit that could not ask anybody must
never look like a clean one. pip-audit needs a vulnerability service (OSV by default here, or
PyPI's JSON API); on a machine that cannot reach it (offline CI, an air-gapped build host) this
command says so in plain words and exits with status 2 — distinct from 1 ("vulnerabilities
found") and 0 ("audited, nothing known").

What it does:

1. checks that the lock file exists and pins every requirement with a hash;
2. probes the service with one small request (proxies from the environment apply, as they do
   for pip-audit); unreachable → exit 2 with the reason;
3. runs pip-audit on the lock (``--require-hashes --disable-pip``: the pinned versions are
   audited as written, nothing is installed or resolved) with ``--strict`` so that a dependency
   it could not look up fails the run instead of being skipped silently, and reads its JSON;
4. prints every vulnerability (package, version, id, fixed versions) and a one-line verdict.

Exit status: 0 audited and clean; 1 vulnerabilities found; 2 not audited (service unreachable,
pip-audit failed, bad lock file).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tools import CHECKOUT

log = logging.getLogger(__name__)

EXIT_CLEAN = 0
EXIT_VULNERABLE = 1
EXIT_NOT_AUDITED = 2

# One cheap request per service that answers only if the service is really there.
_PROBES = {
    "osv": ("https://api.osv.dev/v1/query", b'{"package": {"name": "pip", "ecosystem": "PyPI"},'
                                            b' "version": "0.0.0"}'),
    "pypi": ("https://pypi.org/pypi/pip/json", None),
}


@dataclass(frozen=True)
class Verdict:
    code: int
    message: str


def check_lock(lock: Path) -> str | None:
    """A problem with the lock file, or None. Every requirement line must carry a hash."""
    if not lock.is_file():
        return f"{lock} does not exist; generate it with pip-compile (see RELIABILITY.md)"
    text = lock.read_text(encoding="utf-8")
    pins = 0
    for block in text.replace("\\\n", " ").splitlines():
        line = block.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        if "==" not in line:
            return f"{lock}: {line.split()[0]} is not pinned with =="
        if "--hash=" not in line:
            return f"{lock}: {line.split()[0]} has no --hash"
        pins += 1
    if pins == 0:
        return f"{lock} pins nothing"
    return None


def probe(service: str, timeout: float) -> str | None:
    """None when the vulnerability service answers; otherwise why it could not be reached."""
    url, body = _PROBES[service]
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"} if body else {},
        method="POST" if body else "GET",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(1)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code in (407, 429):
            return f"{url} answered HTTP {exc.code}"
        return None  # the service is there; a 4xx to our dummy query is fine
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"cannot reach {url}: {reason}"
    return None


def run_pip_audit(lock: Path, service: str, timeout: float) -> tuple[int, str, str]:
    cmd = [
        sys.executable, "-m", "pip_audit", "--requirement", str(lock), "--require-hashes",
        "--disable-pip", "--strict", "--vulnerability-service", service, "--format", "json",
        "--progress-spinner", "off", "--timeout", str(int(timeout)),
    ]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def interpret(returncode: int, stdout: str, stderr: str) -> Verdict:
    """Turn pip-audit's output into a verdict; anything unexpected is 'not audited'."""
    try:
        data = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("dependencies"), list):
        tail = "\n".join(stderr.strip().splitlines()[-5:]) or f"exit status {returncode}"
        return Verdict(
            EXIT_NOT_AUDITED,
            f"NOT AUDITED: pip-audit did not produce a report ({tail}). This is not a clean "
            "result.",
        )
    deps = data["dependencies"]
    skipped = [d for d in deps if d.get("skip_reason")]
    vulns = [(d, v) for d in deps for v in d.get("vulns", [])]
    if skipped:
        names = ", ".join(f"{d.get('name')} ({d.get('skip_reason')})" for d in skipped[:10])
        return Verdict(
            EXIT_NOT_AUDITED,
            f"NOT AUDITED: {len(skipped)} of {len(deps)} dependencies could not be checked: "
            f"{names}",
        )
    if vulns:
        lines = [
            f"  {d['name']} {d['version']}: {v.get('id')} "
            f"(fixed in {', '.join(v.get('fix_versions') or ['no release yet'])})"
            for d, v in vulns
        ]
        return Verdict(
            EXIT_VULNERABLE,
            f"VULNERABLE: {len(vulns)} known vulnerabilit{'y' if len(vulns) == 1 else 'ies'} in "
            f"{len({d['name'] for d, _ in vulns})} of {len(deps)} locked packages:\n"
            + "\n".join(lines),
        )
    if returncode != 0:
        return Verdict(
            EXIT_NOT_AUDITED,
            f"NOT AUDITED: pip-audit exited with {returncode} without listing a vulnerability",
        )
    return Verdict(EXIT_CLEAN, f"clean: no known vulnerabilities in {len(deps)} locked packages")


def audit(lock: Path, service: str, timeout: float, *, skip_probe: bool = False) -> Verdict:
    problem = check_lock(lock)
    if problem is not None:
        return Verdict(EXIT_NOT_AUDITED, f"NOT AUDITED: {problem}")
    if not skip_probe:
        unreachable = probe(service, timeout)
        if unreachable is not None:
            return Verdict(
                EXIT_NOT_AUDITED,
                f"NOT AUDITED: the {service} vulnerability service is unreachable "
                f"({unreachable}). No vulnerability data was consulted, so this is NOT a clean "
                "result. Run `make audit` on a machine with internet access, or choose another "
                "service with --service.",
            )
    return interpret(*run_pip_audit(lock, service, timeout))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lock", type=Path, default=CHECKOUT / "requirements.lock",
                        help="hashed lock file to audit (default: this checkout's "
                        "requirements.lock)")
    parser.add_argument("--service", choices=sorted(_PROBES), default="osv",
                        help="vulnerability service pip-audit asks (default: osv)")
    parser.add_argument("--timeout", type=float, default=15.0, help="network timeout, seconds")
    parser.add_argument("--skip-probe", action="store_true",
                        help="do not probe the service first (pip-audit's own errors still "
                        "make the run 'not audited')")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    verdict = audit(args.lock, args.service, args.timeout, skip_probe=args.skip_probe)
    print(f"audit of {args.lock} via {args.service}: {verdict.message}")
    return verdict.code


if __name__ == "__main__":
    sys.exit(main())
