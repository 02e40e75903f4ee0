"""Caption text → normalised tokens that remember where they came from.

This one module decides what "the same words" means, for both sides of a lookup: the index
builder normalises every dictionary string with :func:`normalize_term`, and the extractor
normalises captions with :func:`tokenize`. Because both call the same :func:`normalize_token`,
any quirk of a rule (``lens`` → ``len``) is applied symmetrically and cannot cause a miss.

Offsets are sacred: normalisation happens *per token*, after the token's span in the original
string has been fixed, so a ligature, a full-width letter or a decomposed accent can change the
normalised form's length without moving any offset. ``Token.start``/``Token.end`` are code-point
offsets into the text that was passed in, always.

What a token is: a maximal run of letters/digits (plus combining marks, and apostrophes between
letters). Hyphens, slashes, dots and other punctuation separate tokens, so "T2-weighted" is
``t2 weighted``, "X-ray" is ``x ray``, "PET/CT" is ``pet ct``.

What normalisation does to a token, in order: Unicode NFKC; case folding; diacritics removed;
possessive ``'s`` dropped and other apostrophes removed ("patient's" → ``patient``, "Crohn's" →
``crohn``); British → American spelling (``oedema`` → ``edema``, ``haemorrhage`` →
``hemorrhage``, ``tumour`` → ``tumor``); plural → singular by rule plus an irregular table of the
Latin and Greek plurals that radiology uses (``metastases``, ``vertebrae``, ``diverticula``,
``bronchi``, ``apices``); vowel + "ys" plurals drop the "s" ("rays", "kidneys", "airways").
Tokens of three characters or fewer, and tokens with digits, are never singularised: they are
mostly abbreviations ("US"). An acronym's plural written with a lower-case "s" ("CTs", "MRIs")
is the acronym (version 2).

Bump :data:`NORMALIZER_VERSION` whenever a rule changes: index manifests record it and an index
built with other rules is refused, because its keys would no longer meet the captions' keys.
"""

from __future__ import annotations

import os
import re
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Any

__all__ = [
    "MEMO_TOKEN_CHARS",
    "NORMALIZER_VERSION",
    "SPEEDUPS",
    "SPEEDUPS_ABSENT",
    "STOPWORDS",
    "Token",
    "clear_token_memo",
    "fast_normalize_token",
    "normalize_term",
    "normalize_token",
    "tokenize",
    "tokenize_spans",
    "tokenize_spans_py",
]

NORMALIZER_VERSION = "3"

# Combining marks are part of a word (NFD "é" is "e" + U+0301). Python's \w does not match
# them, so they are listed explicitly (the blocks that carry Latin/Greek/Cyrillic diacritics),
# as inclusive code-point ranges: the regular expressions below and the compiled tokeniser
# (handed this table at the end of the module) both read them from here.
_MARK_RANGES = (
    (0x0300, 0x036F),
    (0x0483, 0x0489),
    (0x0591, 0x05BD),
    (0x0610, 0x061A),
    (0x064B, 0x065F),
    (0x1AB0, 0x1AFF),
    (0x1DC0, 0x1DFF),
    (0x20D0, 0x20FF),
    (0xFE20, 0xFE2F),
)
_MARKS = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _MARK_RANGES)
# Apostrophes join two words into one token ("patient's", "Crohn’s").
_APOSTROPHES = "'’"
_WORD = rf"[^\W_](?:[^\W_]|[{_MARKS}])*"
_TOKEN_RE = re.compile(rf"{_WORD}(?:[{re.escape(_APOSTROPHES)}]{_WORD})*")
# The same pattern restricted to ASCII text (where [^\W_] is [A-Za-z0-9] and no marks occur).
_ASCII_TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z0-9]+)*")
_ASCII_SPLIT_RE = re.compile(rf"({_ASCII_TOKEN_RE.pattern})")
_SPLIT_RE = re.compile(rf"({_TOKEN_RE.pattern})")

# English function words. A candidate window made only of these is never a concept.
_STOPWORDS_RAW = (
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with within without would you your yours
    yourself yourselves also may might must shall via vs versus per""".split()
)

# British → American: whole-word replacements (checked first) and stem rewrites for the
# ae/oe families, which are productive in medical words (haemangioma, oesophagitis, ...).
_BRITISH_WORDS = {
    "tumour": "tumor",
    "tumours": "tumors",
    "colour": "color",
    "behaviour": "behavior",
    "odour": "odor",
    "humour": "humor",
    "labour": "labor",
    "centre": "center",
    "centres": "centers",
    "fibre": "fiber",
    "fibres": "fibers",
    "litre": "liter",
    "metre": "meter",
    "millimetre": "millimeter",
    "centimetre": "centimeter",
    "grey": "gray",
    "sulphur": "sulfur",
    "aluminium": "aluminum",
    "programme": "program",
    "calibre": "caliber",
    "sabre": "saber",
    "manoeuvre": "maneuver",
    "localised": "localized",
    "generalised": "generalized",
    "visualised": "visualized",
    "characterised": "characterized",
    "catheterisation": "catheterization",
    "vascularisation": "vascularization",
    "opacification": "opacification",
}
_BRITISH_STEMS = (
    ("haem", "hem"),
    ("oedem", "edem"),
    ("oesoph", "esoph"),
    ("anaem", "anem"),
    ("ischaem", "ischem"),
    ("leukaem", "leukem"),
    ("septicaem", "septicem"),
    ("paed", "ped"),
    ("orthopaed", "orthoped"),
    ("gynaec", "gynec"),
    ("foet", "fet"),
    ("oestr", "estr"),
    ("coeliac", "celiac"),
    ("caecum", "cecum"),
    ("caecal", "cecal"),
    ("anaesth", "anesth"),
    ("diarrhoe", "diarrhe"),
    ("dyspnoe", "dyspne"),
    ("apnoe", "apne"),
    ("amoeb", "ameb"),
    ("aetiol", "etiol"),
    ("haemat", "hemat"),
    ("hypoxaem", "hypoxem"),
    ("glycaem", "glycem"),
    ("lipaem", "lipem"),
    ("uraem", "urem"),
    ("bacteraem", "bacterem"),
    ("viraem", "virem"),
    ("toxaem", "toxem"),
)
_BRITISH_STEM_RE = re.compile(
    "|".join(sorted((s for s, _ in _BRITISH_STEMS), key=len, reverse=True))
)
_BRITISH_STEM_MAP = dict(_BRITISH_STEMS)

# Plurals no suffix rule gets right (Latin, Greek, and a few English ones).
_IRREGULAR_PLURALS = {
    "metastases": "metastasis",
    "bronchiectases": "bronchiectasis",
    "telangiectases": "telangiectasis",
    "ectases": "ectasis",
    "vertebrae": "vertebra",
    "diverticula": "diverticulum",
    "septa": "septum",
    "ostia": "ostium",
    "atria": "atrium",
    "bacteria": "bacterium",
    "ilia": "ilium",
    "ischia": "ischium",
    "ganglia": "ganglion",
    "criteria": "criterion",
    "phenomena": "phenomenon",
    "bronchi": "bronchus",
    "thrombi": "thrombus",
    "emboli": "embolus",
    "calculi": "calculus",
    "nuclei": "nucleus",
    "foci": "focus",
    "fungi": "fungus",
    "villi": "villus",
    "glomeruli": "glomerulus",
    "alveoli": "alveolus",
    "sulci": "sulcus",
    "gyri": "gyrus",
    "bronchioli": "bronchiolus",
    "fundi": "fundus",
    "humeri": "humerus",
    "radii": "radius",
    "tali": "talus",
    "uteri": "uterus",
    "meniscii": "meniscus",
    "menisci": "meniscus",
    "stimuli": "stimulus",
    "apices": "apex",
    "appendices": "appendix",
    "cervices": "cervix",
    "vertices": "vertex",
    "cortices": "cortex",
    "indices": "index",
    "matrices": "matrix",
    "varices": "varix",
    "calyces": "calyx",
    "calices": "calix",
    "helices": "helix",
    "phalanges": "phalanx",
    "larynges": "larynx",
    "pharynges": "pharynx",
    "foramina": "foramen",
    "lumina": "lumen",
    "stomata": "stoma",
    "carcinomata": "carcinoma",
    "adenomata": "adenoma",
    "sarcomata": "sarcoma",
    "testes": "testis",
    "feet": "foot",
    "teeth": "tooth",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "lymphomata": "lymphoma",
    "fibromata": "fibroma",
    "myomata": "myoma",
}
# Words that end like a plural but are singular (or whose plural form is the same).
_NOT_PLURAL = frozenset(
    """series species caries rabies scabies facies herpes diabetes mumps measles pancreas atlas
    gas bias alias canvas lens iris axis pelvis testis biceps triceps quadriceps forceps
    thorax news physics genus corpus lotus virus sinus anus sepsis stasis ascites pubes
    mellitus hiatus fetus plexus meatus ramus conus thalamus hypothalamus hippocampus
    hamulus callus bolus stratus status nexus ileus uterus humerus radius talus calculus fundus
    focus villus bronchus thrombus embolus nucleus sulcus gyrus stimulus meniscus fungus
    alveolus glomerulus bronchiolus always perhaps has was does is this thus yes its plus
    minus versus bus us""".split()
)


# Words of this many characters or fewer are never singularised (mostly abbreviations, "US").
_NEVER_SINGULAR_LEN = 3
# Plural endings, tried in order on a word that is not irregular, not in _NOT_PLURAL and all
# letters: (endings, shortest word the rule applies to, characters dropped, text appended, the
# stem must be in _NOT_PLURAL); the first rule that applies decides, no rule keeps the word.
_PLURAL_SUFFIXES: tuple[tuple[tuple[str, ...], int, int, str, bool], ...] = (
    (("ae",), 5, 1, "", False),  # fistulae → fistula, bullae → bulla
    (("ies",), 5, 3, "y", False),  # arteries → artery
    (("oses", "yses", "eses"), 6, 2, "is", False),  # stenoses → stenosis, analyses → analysis
    (("sses", "xes", "ches", "shes", "zes"), 0, 2, "", False),  # masses → mass, reaches → reach
    (("uses",), 6, 2, "", True),  # sinuses → sinus, viruses → virus (but causes → cause)
    (("ays", "eys", "oys", "uys"), 0, 1, "", False),  # rays → ray, kidneys → kidney
    (("ss", "us", "is", "ys"), 0, 0, "", False),  # singular already: mass, sinus, axis
    (("s",), 0, 1, "", False),  # lesions → lesion, cysts → cyst
)
# An acronym's plural: this many letters or more in capitals, then a lower-case "s" ("CTs").
_ACRONYM_MIN_LETTERS = 2
# A word with one of these goes through the British stem rewrites (_BRITISH_STEMS).
_BRITISH_STEM_MARKERS = ("ae", "oe")


@dataclass(frozen=True, slots=True)
class Token:
    """A normalised word and its code-point span ``[start, end)`` in the original text."""

    norm: str
    start: int
    end: int


def _singular(word: str) -> str:
    irregular = _IRREGULAR_PLURALS.get(word)
    if irregular is not None:
        return irregular
    if len(word) <= _NEVER_SINGULAR_LEN or word in _NOT_PLURAL or not word.isalpha():
        return word
    n = len(word)
    for endings, shortest, drop, append, stem_not_plural in _PLURAL_SUFFIXES:
        if n >= shortest and word.endswith(endings):
            stem = word[: n - drop]
            if stem_not_plural and stem not in _NOT_PLURAL:
                continue
            return stem + append
    return word


def _american(word: str) -> str:
    replaced = _BRITISH_WORDS.get(word)
    if replaced is not None:
        return replaced
    if any(m in word for m in _BRITISH_STEM_MARKERS):
        return _BRITISH_STEM_RE.sub(lambda m: _BRITISH_STEM_MAP[m.group(0)], word)
    return word


MEMO_TOKEN_CHARS = 64
"""Longest token whose normal form is memoised (by :func:`normalize_token` and by the compiled
token tables, which also bound their characters). The memos are bounded by entry count, so
without this a stream of distinct long tokens (a base64 blob, a sequence, a long URL in a
caption) would grow a worker by kilobytes a caption up to that count; tokens this long are
rare in real text and are normalised again each time they are seen, in linear time."""


def normalize_token(raw: str) -> str:
    """Normalise one token's surface form (see the module docstring for the steps).

    Returns ``""`` when nothing alphanumeric survives; callers drop such tokens. Memoised for
    tokens of up to :data:`MEMO_TOKEN_CHARS` characters (:func:`clear_token_memo` empties it).
    """
    if len(raw) > MEMO_TOKEN_CHARS:
        return _normalize_token(raw)
    return _normalize_token_memo(raw)


def clear_token_memo() -> None:
    """Empty :func:`normalize_token`'s memo (benchmarks of a cold process call this)."""
    _normalize_token_memo.cache_clear()


def _normalize_token(raw: str) -> str:
    if raw[-1:] == "s" and len(raw) > _ACRONYM_MIN_LETTERS and raw[:-1].isupper() and sum(
        c.isalpha() for c in raw[:-1]
    ) >= _ACRONYM_MIN_LETTERS:
        raw = raw[:-1]  # an acronym's plural: "CTs" → "CT", "MRIs" → "MRI"
    text = unicodedata.normalize("NFKC", raw).casefold()
    if not text.isascii():
        text = "".join(
            c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c)
        )
        text = unicodedata.normalize("NFC", text)
    if "'" in text or "’" in text:
        if text.endswith(("'s", "’s")):
            text = text[:-2]
        text = "".join(c for c in text if c not in _APOSTROPHES)
    if not text.isalnum():
        # NFKC can turn one symbol into several ("½" → "1⁄2"); keep the alphanumerics.
        text = "".join(c for c in text if c.isalnum())
    return _singular(_american(text))


_normalize_token_memo = lru_cache(maxsize=1 << 18)(_normalize_token)


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into normalised tokens with code-point offsets into ``text``."""
    out: list[Token] = []
    append = out.append
    for m in _TOKEN_RE.finditer(text):
        norm = normalize_token(m.group())
        if norm:
            append(Token(norm, m.start(), m.end()))
    return out


def tokenize_spans(text: str) -> tuple[list[str], list[int], list[int]]:
    """:func:`tokenize` as three parallel lists (norms, starts, ends).

    With the compiled extension (:data:`SPEEDUPS`), this name is bound to its C tokeniser,
    which gives the same lists (``tests/test_speedups.py``); :func:`tokenize_spans_py` is
    always this reference implementation.

    The extractor's hot path uses this form: it allocates no per-token objects. Most captions
    are ASCII, and for ASCII text the token pattern reduces to ``[A-Za-z0-9]+('[A-Za-z0-9]+)*``,
    which the regex engine runs about twice as fast as the Unicode pattern, and offsets come
    from splitting on it (no per-token Python code at all). Same tokens, same offsets as
    :func:`tokenize`, about 3× faster (BENCHMARKS.md).
    """
    # split() with a capturing group alternates gap, token, gap, ..., gap; the running sum of
    # their lengths is every token boundary. All of it runs in C.
    parts = (_ASCII_SPLIT_RE if text.isascii() else _SPLIT_RE).split(text)
    bounds = list(accumulate(map(len, parts)))
    norms = list(map(normalize_token, parts[1::2]))
    if "" not in norms:  # always so for ASCII: a token is alphanumeric at both ends
        return norms, bounds[0:-1:2], bounds[1::2]
    keep = [i for i, n in enumerate(norms) if n]
    return (
        [norms[i] for i in keep],
        [bounds[2 * i] for i in keep],
        [bounds[2 * i + 1] for i in keep],
    )


def normalize_term(term: str) -> str:
    """The index key of a dictionary string: its normalised tokens joined by single spaces."""
    return " ".join(t.norm for t in tokenize(term))


# Stopwords in normalised form, so they compare with ``Token.norm``.
STOPWORDS = frozenset(normalize_token(w) for w in _STOPWORDS_RAW)

tokenize_spans_py = tokenize_spans


def _load_speedups() -> tuple[Any, str]:
    """The compiled hot path (``conceptsvc._speedups``), or None when it is switched off with
    ``CONCEPTSVC_PURE_PYTHON=1`` (a reference run) or was not built (a source tree used without
    ``pip install``; the engine is then several times slower); and why it is absent."""
    if os.environ.get("CONCEPTSVC_PURE_PYTHON", "") not in ("", "0"):
        return None, "it is switched off by CONCEPTSVC_PURE_PYTHON=1"
    try:
        from conceptsvc import _speedups
    except ImportError:  # pragma: no cover - the project's install always builds it
        warnings.warn(
            "conceptsvc._speedups is not built: the extraction engine runs in pure Python "
            "(run `make install` or `pip install .` to build it)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None, "conceptsvc._speedups is not built (run `make install` or `pip install .`)"
    return _speedups, ""


SPEEDUPS: Any
"""The compiled extension module, or None (pure Python)."""
SPEEDUPS_ABSENT: str
"""Why :data:`SPEEDUPS` is None (for error messages); empty when it is not."""
SPEEDUPS, SPEEDUPS_ABSENT = _load_speedups()

fast_normalize_token: Callable[[str], str] = normalize_token
""":func:`normalize_token`, compiled for ASCII tokens when the extension is built (the
reference decides everything else); not cached, callers keep their own table."""

# The compiled tokeniser and normaliser get this module's rules here, once: its character
# classes and tables live in C arrays and dicts filled from these constants, never re-typed.
if SPEEDUPS is not None:
    fast_normalize_token = SPEEDUPS.AsciiNormalizer(
        normalize_token,
        british_words=_BRITISH_WORDS,
        british_stem_markers=_BRITISH_STEM_MARKERS,
        irregular_plurals=_IRREGULAR_PLURALS,
        not_plural=_NOT_PLURAL,
        never_singular_len=_NEVER_SINGULAR_LEN,
        plural_suffixes=_PLURAL_SUFFIXES,
        acronym_min_letters=_ACRONYM_MIN_LETTERS,
    )
    tokenize_spans = SPEEDUPS.SpanTokenizer(
        fast_normalize_token, marks=_MARK_RANGES, apostrophes=_APOSTROPHES
    )
