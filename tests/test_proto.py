"""The committed generated code matches the .proto files, and imports as a package."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from tools.gen_proto import PROTO_PACKAGE_DIR, generate


def _files(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_proto_generated_code_is_current(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    generate(out)
    committed, fresh = _files(PROTO_PACKAGE_DIR), _files(out)
    assert committed == fresh, "run `make proto`: generated file set differs"
    stale = [
        f for f in sorted(fresh) if not filecmp.cmp(out / f, PROTO_PACKAGE_DIR / f, shallow=False)
    ]
    assert not stale, f"run `make proto`: stale generated files {stale}"


def test_proto_generated_package_imports_in_a_fresh_interpreter() -> None:
    code = (
        "from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb\n"
        "from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2_grpc as g\n"
        "names = sorted(pb.DESCRIPTOR.services_by_name)\n"
        "assert names == ['AdminService', 'ConceptService'], names\n"
        "assert g.ConceptServiceStub and g.AdminServiceStub\n"
        "print(pb.DESCRIPTOR.package)\n"
    )
    res = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "conceptsvc.v1"


def test_proto_generated_files_carry_the_do_not_edit_header() -> None:
    for f in _files(PROTO_PACKAGE_DIR):
        head = (PROTO_PACKAGE_DIR / f).read_text(encoding="utf-8").splitlines()[0]
        assert "Do not edit" in head, f


def test_proto_options_presence_distinguishes_unset_from_empty() -> None:
    from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb

    unset = pb.AnnotateOptions()
    empty = pb.AnnotateOptions(semantic_types=pb.NameList(values=[]))
    assert not unset.HasField("semantic_types")
    assert empty.HasField("semantic_types")
    assert not unset.HasField("threshold")
    assert pb.AnnotateOptions(threshold=0.0).HasField("threshold")
    # Round trip through bytes keeps the presence bits.
    again = pb.AnnotateOptions.FromString(empty.SerializeToString())
    assert again.HasField("semantic_types")


def test_proto_no_request_carries_a_server_path() -> None:
    """No RPC may read a client-chosen server path: no request field can even name one."""
    from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb

    seen: set[str] = set()

    def fields(desc: object) -> list[str]:
        out = []
        for f in desc.fields:  # type: ignore[attr-defined]
            out.append(f.name)
            if f.message_type is not None and f.message_type.full_name not in seen:
                seen.add(f.message_type.full_name)
                out += fields(f.message_type)
        return out

    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            names = fields(method.input_type)
            words = {"path", "file", "filename", "dir", "directory", "url", "uri"}
            suspicious = [n for n in names if words & set(n.split("_"))]
            assert not suspicious, f"{method.full_name} takes {suspicious}"
