"""ImageCLEFmedical concept-detection scoring, and readers for the files it compares.

The scores are the ones ImageCLEFmedical Caption reports for ROCOv2, computed as its published
evaluator computes them:

* **primary F1** — per image with a non-empty gold set, sklearn's binary F1 over the union of
  gold and predicted concepts, i.e. F1 = 2|P∩G| / (|P| + |G|) (an empty prediction scores 0); the
  score is the mean over those images. The evaluator ignores images whose gold is empty (it takes
  them out of the mean), and so does this. Images missing from the predictions count as empty
  predictions; predictions for images not in the gold are ignored.
* **secondary F1** — the same against the *manual* gold, with both sides first restricted to the
  manually validated concepts of a challenge edition (2023 and 2024: six modality and eight X-ray
  body-region concepts; :data:`SECONDARY_CUIS_BY_EDITION`); images whose restricted gold is empty
  are skipped.

CUIs are compared upper-cased and each counts once per image, as the evaluator does (it
upper-cases both files and asks of every concept whether it is predicted, so a repeat adds
nothing).

Also micro precision/recall/F1 over all (image, concept) pairs and per-concept false negative /
false positive counts — the raw material for error analysis.

Readers accept ImageCLEF CSV (``ID,CUIs`` with ``;``-joined CUIs and an optional header), the
tab-separated submission variant (``ID<TAB>CUI;CUI``, no header), and JSONL as written by
``conceptsvc annotate`` (one object per line with ``id`` and ``concepts``; ``mentions[].cui`` is
used when ``concepts`` is absent).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from conceptsvc.errors import DictionaryError, EvaluationError, MalformedRowError
from conceptsvc.model import ID_HEADERS

__all__ = [
    "DEFAULT_EDITION",
    "MODALITY_CUIS",
    "REGION_CUIS",
    "SECONDARY_CUIS_BY_EDITION",
    "EvaluationResult",
    "f1",
    "read_captions",
    "read_concepts",
    "score",
    "secondary_cuis",
    "write_concepts_csv",
]

MODALITY_CUIS = frozenset(
    {"C0040405", "C1306645", "C0024485", "C0041618", "C0002978", "C0032743"}
)
REGION_CUIS = frozenset(
    {
        "C0817096",
        "C0037303",
        "C0023216",
        "C0000726",
        "C0030797",
        "C1140618",
        "C0037949",
        "C0006141",
    }
)
# The concepts each ImageCLEFmedical Caption edition scores for its secondary F1. 2023 and 2024
# both ran on ROCOv2 and score the same 14; the shipped ROCOv2 manual concepts are these plus
# four X-ray projections, which the secondary score leaves out. Later editions are said (issue
# 19) to score more concepts, e.g. C0920367 optical coherence tomography, but neither their full
# lists nor their data are at hand here, and half a list would give a wrong score, so none is
# included: add an edition only with its complete list from the challenge's evaluator.
SECONDARY_CUIS_BY_EDITION: Mapping[int, frozenset[str]] = MappingProxyType(
    {2023: MODALITY_CUIS | REGION_CUIS, 2024: MODALITY_CUIS | REGION_CUIS}
)
DEFAULT_EDITION = 2024  # ROCOv2's edition, the data set the project targets


def secondary_cuis(edition: int = DEFAULT_EDITION) -> frozenset[str]:
    """The concepts the secondary F1 of an ImageCLEFmedical edition is computed on."""
    try:
        return SECONDARY_CUIS_BY_EDITION[edition]
    except KeyError:
        known = ", ".join(str(e) for e in sorted(SECONDARY_CUIS_BY_EDITION))
        choices = " or ".join(f"--edition {e}" for e in sorted(SECONDARY_CUIS_BY_EDITION))
        raise EvaluationError(
            f"unknown ImageCLEFmedical edition {edition}: conceptsvc knows the secondary-concept "
            f"lists of {known}. Give {choices}, or add the edition's full list to "
            "SECONDARY_CUIS_BY_EDITION in conceptsvc/evaluation.py."
        ) from None


def f1(pred: set[str] | frozenset[str], gold: set[str] | frozenset[str]) -> float:
    """ImageCLEF per-image F1: 1 when both sides are empty, 0 when only one is."""
    if not pred and not gold:
        return 1.0
    return 2 * len(pred & gold) / (len(pred) + len(gold))


@dataclass
class EvaluationResult:
    primary_f1: float
    secondary_f1: float | None  # None without manual gold
    n_images: int  # images with non-empty gold, scored for the primary F1
    n_secondary: int  # images with non-empty restricted manual gold
    micro_precision: float
    micro_recall: float
    micro_f1: float
    false_negatives: Counter[str] = field(default_factory=Counter)
    false_positives: Counter[str] = field(default_factory=Counter)
    true_positives: Counter[str] = field(default_factory=Counter)
    missing_predictions: int = 0  # gold images with no prediction row at all
    edition: int = DEFAULT_EDITION  # whose secondary-concept list was used
    unscored_predictions: int = 0  # predicted images the gold does not have (not scored)

    def as_dict(self, top: int = 10) -> dict[str, object]:
        return {
            "primary_f1": round(self.primary_f1, 6),
            "secondary_f1": None if self.secondary_f1 is None else round(self.secondary_f1, 6),
            "edition": self.edition,
            "n_images": self.n_images,
            "n_secondary": self.n_secondary,
            "micro_precision": round(self.micro_precision, 6),
            "micro_recall": round(self.micro_recall, 6),
            "micro_f1": round(self.micro_f1, 6),
            "missing_predictions": self.missing_predictions,
            "unscored_predictions": self.unscored_predictions,
            "top_false_negatives": self.false_negatives.most_common(top),
            "top_false_positives": self.false_positives.most_common(top),
        }


def _concept_set(concepts: Iterable[str]) -> frozenset[str]:
    """One image's concepts as the evaluator compares them: upper-cased, each once."""
    return frozenset(c.upper() for c in concepts)


def score(
    pred: Mapping[str, Iterable[str]],
    gold: Mapping[str, Iterable[str]],
    manual: Mapping[str, Iterable[str]] | None = None,
    *,
    edition: int = DEFAULT_EDITION,
) -> EvaluationResult:
    """Score predictions against gold (and manual gold for the secondary F1).

    ``edition`` selects the ImageCLEFmedical edition whose secondary-concept list is used; it is
    checked even without ``manual``, so that a wrong one is never silently ignored.
    """
    listed = secondary_cuis(edition)
    total = 0.0
    n = 0
    tp = fp = fn = 0
    fns: Counter[str] = Counter()
    fps: Counter[str] = Counter()
    tps: Counter[str] = Counter()
    missing = 0
    for image, g_iter in gold.items():
        g = _concept_set(g_iter)
        if not g:
            continue  # the evaluator ignores images without gold concepts
        p_iter = pred.get(image)
        if p_iter is None:
            missing += 1
        p = _concept_set(p_iter or ())
        total += f1(p, g)
        n += 1
        inter = p & g
        tp += len(inter)
        fp += len(p - g)
        fn += len(g - p)
        tps.update(inter)
        fps.update(p - g)
        fns.update(g - p)
    secondary: float | None = None
    n_sec = 0
    if manual is not None:
        s_total = 0.0
        for image, m_iter in manual.items():
            g = _concept_set(m_iter) & listed
            if not g:
                continue
            p = _concept_set(pred.get(image, ())) & listed
            s_total += f1(p, g)
            n_sec += 1
        secondary = s_total / n_sec if n_sec else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    micro = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return EvaluationResult(
        primary_f1=total / n if n else 0.0,
        secondary_f1=secondary,
        n_images=n,
        n_secondary=n_sec,
        micro_precision=precision,
        micro_recall=recall,
        micro_f1=micro,
        false_negatives=fns,
        false_positives=fps,
        true_positives=tps,
        missing_predictions=missing,
        edition=edition,
        unscored_predictions=sum(1 for image in pred if image not in gold),
    )


_CONCEPTS_ADVICE = (
    "A concepts file (predictions or gold) is an ImageCLEF CSV (ID,CUI;CUI), tab-separated "
    "(ID<TAB>CUI;CUI), or JSONL with 'concepts' or 'mentions' (conceptsvc annotate writes all "
    "three), optionally gzipped."
)


def _split_cuis(value: str, p: Path | None = None, lineno: int = 0) -> list[str]:
    out = [c.strip() for c in value.replace(",", ";").split(";") if c.strip()]
    if p is not None:
        for c in out:
            if any(ch.isspace() for ch in c):
                raise MalformedRowError(
                    p, lineno, f"{c[:40]!r} is not a concept id (ids have no spaces; is this a "
                    "captions file?)", _CONCEPTS_ADVICE,
                )
    return out


def read_concepts(path: str | Path) -> dict[str, list[str]]:
    """Read a concepts file (ImageCLEF CSV, tab-separated, or JSONL; gzipped or not; ``-`` for
    standard input) into id → CUIs. A file of another kind (Parquet, a captions file, an
    annotate input) is refused with :class:`DictionaryError` rather than scored as if it held no
    concepts."""
    p = Path(path)
    try:
        # "-": standard input (`conceptsvc annotate ... --out - | conceptsvc evaluate --pred -`)
        raw = sys.stdin.buffer.read() if str(path) == "-" else p.read_bytes()
    except OSError as exc:
        raise DictionaryError(f"cannot read concepts file {p}: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DictionaryError(f"concepts file {p}: a broken gzip stream ({exc})") from exc
    if raw[:4] == b"PAR1":
        raise DictionaryError(
            f"concepts file {p} is Parquet, which evaluate does not read. {_CONCEPTS_ADVICE}"
        )
    try:
        data = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DictionaryError(
            f"concepts file {p} is not UTF-8 text ({exc.reason} at byte {exc.start}). "
            f"{_CONCEPTS_ADVICE}"
        ) from None
    first = next((ln for ln in data.splitlines() if ln.strip()), "")
    out: dict[str, list[str]] = {}
    seen: dict[str, int] = {}  # id → the line it was first given on

    def put(image: str, concepts: list[str], lineno: int) -> None:
        at = seen.setdefault(image, lineno)
        if at != lineno:
            raise MalformedRowError(
                p, lineno, f"image id {image!r} again (first on line {at}); an image's "
                "concepts are one row", _CONCEPTS_ADVICE,
            )
        out[image] = concepts

    if first.lstrip().startswith("{"):
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise MalformedRowError(p, lineno, f"not JSON ({exc})", _CONCEPTS_ADVICE) from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                raise MalformedRowError(
                    p, lineno, "a JSON object with a string 'id' is expected", _CONCEPTS_ADVICE
                )
            if "concepts" not in obj and "mentions" not in obj:
                raise MalformedRowError(
                    p, lineno, "neither 'concepts' nor 'mentions' (is this an annotate input, "
                    "not its output?)", _CONCEPTS_ADVICE,
                )
            concepts = obj.get("concepts")
            if concepts is None:
                concepts = [m.get("cui") for m in obj.get("mentions", []) if isinstance(m, dict)]
            if isinstance(concepts, str):
                concepts = _split_cuis(concepts, p, lineno)
            if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
                raise MalformedRowError(
                    p, lineno, "'concepts' must be a list of CUI strings", _CONCEPTS_ADVICE
                )
            put(obj["id"], list(dict.fromkeys(concepts)), lineno)
        return out
    if "\t" in first and "," not in first.split("\t")[0]:
        header_done = False
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if not header_done:
                header_done = True
                if _is_concepts_header(parts):
                    continue
            # submission form ID<TAB>CUI;CUI, or ROCO's ID<TAB><TAB>CUI<TAB>CUI...
            put(parts[0].strip(), [c for f in parts[1:] for c in _split_cuis(f, p, lineno)],
                lineno)
        return out
    reader = csv.reader(io.StringIO(data))
    header_done = False
    for lineno, row in enumerate(reader, 1):
        if not row or not any(f.strip() for f in row):
            continue
        if not header_done:
            header_done = True
            if _is_concepts_header(row):
                continue
        if len(row) > 2:
            raise MalformedRowError(
                p, lineno, f"expected 'ID,CUIs', got {len(row)} fields", _CONCEPTS_ADVICE
            )
        put(row[0].strip(), _split_cuis(row[1] if len(row) > 1 else "", p, lineno), lineno)
    return out


# A concepts file's first row is a header when it names the id column or the concepts column
# (ROCOv2 writes "ID,CUIs"; others "image_id,cuis", "id,concepts", ...), in any case.
_CONCEPTS_HEADERS = frozenset({"cui", "cuis", "concept", "concepts", "concept_ids", "label",
                               "labels"})


def _is_concepts_header(fields: list[str]) -> bool:
    return (fields[0].strip().lstrip("\ufeff").casefold() in ID_HEADERS
            or (len(fields) > 1 and fields[1].strip().casefold() in _CONCEPTS_HEADERS))


def read_captions(path: str | Path) -> list[tuple[str, str]]:
    """Read an ``ID,Caption`` CSV (CSV quoting, optional header) into (id, caption) pairs."""
    p = Path(path)
    try:
        data = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DictionaryError(f"cannot read captions file {p}: {exc}") from exc
    out: list[tuple[str, str]] = []
    for lineno, row in enumerate(csv.reader(io.StringIO(data)), 1):
        if not row:
            continue
        if lineno == 1 and [f.strip().lower() for f in row[:2]] == ["id", "caption"]:
            continue
        if len(row) != 2:
            raise MalformedRowError(p, lineno, f"expected 'ID,Caption', got {len(row)} fields")
        out.append((row[0], row[1]))
    return out


def write_concepts_csv(path: str | Path, rows: Iterable[tuple[str, Iterable[str]]]) -> None:
    """Write predictions in ImageCLEF CSV form (``ID,CUIs`` header, CUIs joined by ``;``)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".part")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ID", "CUIs"])
        for image, cuis in rows:
            w.writerow([image, ";".join(cuis)])
    tmp.replace(p)
