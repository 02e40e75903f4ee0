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
    "NORMALIZER_VERSION",
    "SPEEDUPS",
    "STOPWORDS",
    "Token",
    "fast_normalize_token",
    "is_stopword_only",
    "normalize_term",
    "normalize_token",
    "tokenize",
    "tokenize_spans",
    "tokenize_spans_py",
]

NORMALIZER_VERSION = "3"

# Combining marks are part of a word (NFD "é" is "e" + U+0301). Python's \w does not match
# them, so they are listed explicitly (the blocks that carry Latin/Greek/Cyrillic diacritics).
_MARKS = (
    "\u0300-\u036f\u0483-\u0489\u0591-\u05bd\u0610-\u061a\u064b-\u065f"
    "\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
)
_WORD = rf"[^\W_](?:[^\W_]|[{_MARKS}])*"
_TOKEN_RE = re.compile(rf"{_WORD}(?:['’]{_WORD})*")
_APOSTROPHES = "'’"
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
    if len(word) <= 3 or word in _NOT_PLURAL or not word.isalpha():
        return word
    if word.endswith("ae") and len(word) >= 5:
        return word[:-1]  # fistulae → fistula, bullae → bulla
    if word.endswith("ies") and len(word) >= 5:
        return word[:-3] + "y"  # arteries → artery
    if word.endswith(("oses", "yses", "eses")) and len(word) >= 6:
        return word[:-2] + "is"  # stenoses → stenosis, analyses → analysis
    if word.endswith(("sses", "xes", "ches", "shes", "zes")):
        return word[:-2]  # masses → mass, reaches → reach
    if word.endswith("uses") and len(word) >= 6 and word[:-2] in _NOT_PLURAL:
        return word[:-2]  # sinuses → sinus, viruses → virus (but causes → cause)
    if word.endswith(("ays", "eys", "oys", "uys")):
        return word[:-1]  # rays → ray, kidneys → kidney, airways → airway
    if word.endswith("s") and not word.endswith(("ss", "us", "is", "ys")):
        return word[:-1]  # lesions → lesion, cysts → cyst
    return word


def _american(word: str) -> str:
    replaced = _BRITISH_WORDS.get(word)
    if replaced is not None:
        return replaced
    if "ae" in word or "oe" in word:
        return _BRITISH_STEM_RE.sub(lambda m: _BRITISH_STEM_MAP[m.group(0)], word)
    return word


@lru_cache(maxsize=1 << 18)
def normalize_token(raw: str) -> str:
    """Normalise one token's surface form (see the module docstring for the steps).

    Returns ``""`` when nothing alphanumeric survives; callers drop such tokens.
    """
    if raw[-1:] == "s" and len(raw) >= 3 and raw[:-1].isupper() and sum(
        c.isalpha() for c in raw[:-1]
    ) >= 2:
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


def is_stopword_only(norms: list[str] | tuple[str, ...]) -> bool:
    return all(n in STOPWORDS for n in norms)


# Stopwords in normalised form, so they compare with ``Token.norm``.
STOPWORDS = frozenset(normalize_token(w) for w in _STOPWORDS_RAW)

tokenize_spans_py = tokenize_spans


def _load_speedups() -> Any:
    """The compiled hot path (``conceptsvc._speedups``), or None when it is switched off with
    ``CONCEPTSVC_PURE_PYTHON=1`` (a reference run) or was not built (a source tree used without
    ``pip install``; the engine is then several times slower)."""
    if os.environ.get("CONCEPTSVC_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from conceptsvc import _speedups
    except ImportError:  # pragma: no cover - the project's install always builds it
        warnings.warn(
            "conceptsvc._speedups is not built: the extraction engine runs in pure Python "
            "(run `make install` or `pip install .` to build it)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _speedups


SPEEDUPS: Any = _load_speedups()
"""The compiled extension module, or None (pure Python)."""

fast_normalize_token: Callable[[str], str] = normalize_token
""":func:`normalize_token`, compiled for ASCII tokens when the extension is built (the
reference decides everything else); not cached, callers keep their own table."""

if SPEEDUPS is not None:
    fast_normalize_token = SPEEDUPS.AsciiNormalizer(
        normalize_token,
        british_words=_BRITISH_WORDS,
        irregular_plurals=_IRREGULAR_PLURALS,
        not_plural=_NOT_PLURAL,
    )
    tokenize_spans = SPEEDUPS.SpanTokenizer(fast_normalize_token)
