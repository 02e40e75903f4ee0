"""conceptsvc against scispacy, the reference it is checked against, on the same inputs.

1. **Abbreviation definitions.** scispacy's ``AbbreviationDetector`` (Schwartz & Hearst, on a
   blank spaCy English pipeline; no trained model needed) and
   :func:`conceptsvc.abbreviations.find_definitions` read every caption of a CSV (default: the
   ROCOv2 validation split). A definition is (short form, long form's character span); the tool
   counts the definitions both find, and classifies every one that only one of them finds, or
   that they bound differently, with the reason (rules below, checked in order; a difference
   no rule explains is ``unexplained`` and makes the exit status 1).
2. **Knowledge base.** scispacy's ``KnowledgeBase`` and
   :func:`conceptsvc.sources.jsonl.iter_concepts` (what ``conceptsvc index build --jsonl``
   reads) read the same file, as given and as JSON Lines (scispacy tells the two apart by the
   ``.jsonl`` suffix); the concepts, canonical names, types and aliases must be the same
   (scispacy adds the canonical name to the aliases and keeps the last record of a repeated
   concept id; the comparison does the same).

scispacy's UMLS linker downloads its index at run time, which this project never does, so only
these two parts are compared. Run it with ``make scispacy-reference`` (its own venv,
``.venv-scispacy``: scispacy pins numpy<2) or, from the checkout, in that venv::

    PYTHONPATH=. python scripts/scispacy_reference/compare.py [--captions CSV] [--kb FILE] [--list]

conceptsvc is not installed in that venv: installed, its ``spacy_factories`` entry point would
make spaCy import the whole engine, whose dependencies the venv does not have.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import scispacy.abbreviation  # noqa: F401  (registers the "abbreviation_detector" factory)
import spacy
from scispacy.linking_utils import KnowledgeBase

from conceptsvc.abbreviations import Definition, find_definitions
from conceptsvc.sources.jsonl import iter_concepts

CHECKOUT = Path(__file__).resolve().parents[2]
DEFAULT_CAPTIONS = CHECKOUT.parent / "shared" / "data" / "rocov2" / "valid_captions.csv"
DEFAULT_KB = CHECKOUT / "tests" / "fixtures" / "scispacy_kb_fixture.json"

_CLAUSE_BREAKS = ".;:!?()[]"

# Reasons, in the order they are tested. The keys are what the report counts.
REASONS = {
    "no_capital": "short form without a capital letter: conceptsvc requires one "
    "(abbreviations._valid_short: '(arrow)', '(red arrows)' are not abbreviations); "
    "scispacy takes any word",
    "clause_break": "scispacy's long form crosses a clause break or another parenthesis "
    "('.', ';', ':', ')' ...); conceptsvc's stops at it",
    "word_start": "conceptsvc extends the long form back to the start of its whitespace-"
    "delimited word, as the published algorithm does (lastIndexOf(' ')); scispacy to the "
    "spaCy token ('18F-[fluorodeoxyglucose]')",
    "whitespace_bug": "conceptsvc bug: the long form starts before its first word when a "
    "character other than a plain space (thin or no-break space) precedes that word: "
    "_best_long_form looks back for ' ' only",
    "reverse_contains_short": "conceptsvc bug: in the reverse pattern 'SF (long form)' the "
    "long form may contain the short form itself ('RA (... RA = 25 cm2)'); the published "
    "algorithm rejects that, as conceptsvc does in the forward pattern",
    "reverse_short": "reverse pattern 'SF (long form)' whose long form has at most 3 spaCy "
    "tokens ('MRI (Magnetic Resonance Imaging)'): scispacy reads such a parenthesis as a short "
    "form only",
    "whitespace_token": "scispacy's long form ends with a whitespace token ('venography\\xa0 ')",
    "paren_not_token": "spaCy does not make the parenthesis a token of its own (no space "
    "after ')', e.g. '(US).Longitudinal'), so scispacy's '( ... )' pattern never matches",
    "split_short": "the short form has '-', '*', '/' or '.' inside: spaCy splits it into "
    "tokens and scispacy requires every token to be 2-9 characters",
    "comma_in_paren": "the parenthesis goes on after ',' or ';' ('(MB, yellow)'): conceptsvc "
    "reads the short form before it, scispacy needs the whole parenthesis to be one",
    "first_only": "the same short or long form is defined earlier in the caption: scispacy "
    "keeps only the first definition of each per document",
    "token_window": "the long form is longer than scispacy's window, which counts spaCy "
    "tokens (punctuation too) where conceptsvc counts words",
    "short_form_rules": "scispacy's short-form filter differs: it wants at least half of "
    "the characters to be letters, a letter first, and each token under 10 characters",
    "unexplained": "no rule explains it",
}


@dataclass(frozen=True)
class Found:
    """One definition: the short form, and the long form as a span of the caption."""

    short: str
    long_start: int
    long_end: int


@dataclass
class Difference:
    caption_id: str
    reason: str
    short: str
    scispacy: str | None  # long form text, None if scispacy has no definition of it
    ours: str | None


def scispacy_definitions(doc: Any) -> dict[Found, Any]:
    """scispacy's definitions; it lists every occurrence of a short form, one key each."""
    out: dict[Found, Any] = {}
    for short in doc._.abbreviations:
        lf = short._.long_form
        out.setdefault(Found(short.text, lf.start_char, lf.end_char), short)
    return out


def our_definitions(text: str) -> dict[Found, Definition]:
    return {Found(d.short, d.long_start, d.long_end): d for d in find_definitions(text)}


def _crosses_break(s: str) -> bool:
    return any(c in s for c in _CLAUSE_BREAKS)


def _paren_around(text: str, d: Definition) -> tuple[int, int]:
    """Offsets of the '(' and ')' of a definition of ours."""
    if d.short_start > d.long_start:  # "long form (SF)"
        return text.rfind("(", 0, d.short_start), text.find(")", d.short_end)
    return text.rfind("(", 0, d.long_start), text.find(")", d.long_end)


def classify_ours_only(text: str, d: Definition, doc: Any, earlier: Iterable[Found]) -> str:
    open_, close = _paren_around(text, d)
    starts = {t.idx: t.text for t in doc}
    if starts.get(open_) != "(" or starts.get(close) != ")":
        return "paren_not_token"
    inner = text[open_ + 1 : close]
    long_text = text[d.long_start : d.long_end]
    reverse = d.short_start < d.long_start
    if reverse and d.short in long_text.split():
        return "reverse_contains_short"
    if "," in inner or ";" in inner:
        return "comma_in_paren"
    if any(c in d.short for c in "-*/."):
        return "split_short"
    if any(not 2 <= len(w) < 10 for w in d.short.split()):
        return "short_form_rules"
    if reverse and len(doc.char_span(open_ + 1, close, alignment_mode="expand") or ()) <= 3:
        return "reverse_short"
    for f in earlier:
        if f.short == d.short or text[f.long_start : f.long_end] == long_text:
            return "first_only"
    if any(c.isspace() and c != " " for c in text[d.long_start : d.long_end]) or (
        "  " in text[d.long_start : d.long_end]
    ):
        return "whitespace_bug"
    if not d.short[0].isalpha() or sum(c.isalpha() for c in d.short) * 2 < len(d.short):
        return "short_form_rules"
    n_tokens = len(doc.char_span(d.long_start, d.long_end, alignment_mode="expand") or ())
    size = sum(len(t) for t in doc.char_span(d.short_start, d.short_end, "expand") or ())
    if n_tokens > min(size + 5, size * 2):
        return "token_window"
    return "unexplained"


def _paren_holding(text: str, start: int, end: int) -> str | None:
    """The text of the parenthesis that holds ``text[start:end]``, if one does."""
    open_ = text.rfind("(", 0, start)
    close = text.find(")", end)
    if open_ < 0 or close < 0 or ")" in text[open_:start] or "(" in text[end:close]:
        return None
    return text[open_ + 1 : close]


def classify_scispacy_only(text: str, f: Found) -> str:
    if not any(c.isupper() for c in f.short):
        return "no_capital"
    inner = _paren_holding(text, f.long_start, f.long_end)
    if inner is not None and ("," in inner or ";" in inner):
        return "comma_in_paren"
    if _crosses_break(text[f.long_start : f.long_end]):
        return "clause_break"
    if len(f.short) > 10 or not f.short[0].isalpha():
        return "short_form_rules"
    return "unexplained"


def classify_bounds(text: str, sci: Found, ours: Found) -> str:
    s_text, o_text = text[sci.long_start : sci.long_end], text[ours.long_start : ours.long_end]
    if any(c.isspace() and c != " " for c in o_text) or "  " in o_text:
        return "whitespace_bug"
    if s_text.rstrip() == o_text:
        return "whitespace_token"
    inner = _paren_holding(text, sci.long_start, sci.long_end)
    if inner is not None and ("," in inner or ";" in inner):
        return "comma_in_paren"
    if ours.long_end == sci.long_end and ours.long_start < sci.long_start:
        prefix = text[ours.long_start : sci.long_start]
        if not any(c.isspace() for c in prefix):
            return "word_start"
    if sci.long_start < ours.long_start and _crosses_break(text[sci.long_start : ours.long_start]):
        return "clause_break"
    if s_text != o_text and not any(c.isupper() for c in sci.short):
        return "no_capital"
    return "unexplained"


def compare_abbreviations(captions: Path) -> tuple[dict[str, int], list[Difference]]:
    nlp = spacy.blank("en")
    nlp.add_pipe("abbreviation_detector")
    with captions.open(encoding="utf-8", newline="") as fh:
        rows = [(r["ID"], r["Caption"]) for r in csv.DictReader(fh)]
    counts = Counter(captions=len(rows))
    diffs: list[Difference] = []
    for cid, text in rows:
        doc = nlp(text)
        sci, ours = scispacy_definitions(doc), our_definitions(text)
        counts["scispacy"] += len(sci)
        counts["conceptsvc"] += len(ours)
        both = sci.keys() & ours.keys()
        counts["both"] += len(both)
        counts["captions_agreeing"] += sci.keys() == ours.keys()
        only_sci = {f.short: f for f in sci.keys() - both}
        only_ours = {f.short: f for f in ours.keys() - both}
        for short in sorted(only_sci.keys() | only_ours.keys()):
            s, o = only_sci.get(short), only_ours.get(short)
            if s is not None and o is not None:
                reason = classify_bounds(text, s, o)
            elif o is not None:
                earlier = [f for f in sci if f.long_start < o.long_start]
                reason = classify_ours_only(text, ours[o], doc, earlier)
            else:
                assert s is not None
                reason = classify_scispacy_only(text, s)
            diffs.append(Difference(
                cid, reason, short,
                text[s.long_start : s.long_end] if s else None,
                text[o.long_start : o.long_end] if o else None,
            ))
    return dict(counts), diffs


def compare_kb(path: Path) -> dict[str, Any]:
    """Both readers on one file: every concept's name, types and aliases, and alias → concepts.

    scispacy keeps the last record of a repeated concept id and counts the canonical name among
    the aliases (``linking_utils._index_entities``); the same is done with ours here.
    """
    kb = KnowledgeBase(str(path))
    ours: dict[str, tuple[str, list[str], list[str]]] = {}
    alias_to_cuis: dict[str, set[str]] = {}
    for c in iter_concepts(path):
        ours[c.cui] = (c.canonical_name, c.types, c.aliases)
        for alias in {*c.aliases, c.canonical_name}:
            alias_to_cuis.setdefault(alias, set()).add(c.cui)
    sci = {cui: (e.canonical_name, e.types, e.aliases) for cui, e in kb.cui_to_entity.items()}
    return {
        "file": path.name,
        "concepts": len(sci),
        "concepts_ours": len(ours),
        "aliases": len(kb.alias_to_cuis),
        "aliases_ours": len(alias_to_cuis),
        "concepts_differing": sorted(c for c in sci.keys() | ours.keys()
                                     if sci.get(c) != ours.get(c)),
        "aliases_differing": sorted(a for a in kb.alias_to_cuis.keys() | alias_to_cuis.keys()
                                    if kb.alias_to_cuis.get(a) != alias_to_cuis.get(a)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS,
                   help="CSV with ID,Caption columns (default: ROCOv2 validation captions)")
    p.add_argument("--kb", type=Path, default=DEFAULT_KB,
                   help="scispacy KB file, JSON Lines or one JSON array (default: the test "
                   "fixture)")
    p.add_argument("--list", action="store_true", help="print every difference")
    p.add_argument("--json", type=Path, help="write counts and every difference here")
    args = p.parse_args(argv)
    # scispacy calls its second matcher before adding a pattern on every caption without a
    # definition; spaCy's W036 says so each time. Only that message, only in this tool.
    warnings.filterwarnings("ignore", message=r"\[W036\]", category=UserWarning)
    t0 = time.process_time()
    counts, diffs = compare_abbreviations(args.captions)
    kbs = [compare_kb(args.kb)]
    if args.kb.suffix != ".jsonl":
        with tempfile.TemporaryDirectory() as tmp:
            lines = Path(tmp) / f"{args.kb.stem}.jsonl"
            records = json.loads(args.kb.read_text(encoding="utf-8"))
            lines.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            kbs.append(compare_kb(lines))
    by_reason = Counter(d.reason for d in diffs)
    print(f"captions: {counts['captions']:,} ({args.captions.name}); "
          f"identical definitions in {counts['captions_agreeing']:,}")
    print(f"definitions: scispacy {counts['scispacy']:,}, conceptsvc {counts['conceptsvc']:,}, "
          f"both {counts['both']:,}; differences {len(diffs):,}")
    for reason, n in by_reason.most_common():
        print(f"  {n:5,}  {reason}: {REASONS[reason]}")
    if args.list:
        for d in diffs:
            print(f"{d.caption_id}\t{d.reason}\t{d.short!r}\tscispacy={d.scispacy!r}\t"
                  f"conceptsvc={d.ours!r}")
    for kb in kbs:
        print(f"knowledge base {kb['file']}: scispacy {kb['concepts']} concepts / "
              f"{kb['aliases']} aliases, conceptsvc {kb['concepts_ours']} / "
              f"{kb['aliases_ours']}; differing concepts {len(kb['concepts_differing'])}, "
              f"aliases {len(kb['aliases_differing'])}")
    print(f"CPU {time.process_time() - t0:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(
            {"counts": counts, "by_reason": dict(by_reason), "kb": kbs,
             "differences": [d.__dict__ for d in diffs]}, indent=1, ensure_ascii=False
        ), encoding="utf-8")
    unexplained = by_reason.get("unexplained", 0)
    kb_ok = all(not kb["concepts_differing"] and not kb["aliases_differing"] for kb in kbs)
    return 0 if not unexplained and kb_ok else 1


if __name__ == "__main__":
    sys.exit(main())
