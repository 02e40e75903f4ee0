"""Synthetic UMLS-scale RRF files, for benchmarks only (never for matching quality).

A licensed UMLS release cannot be shipped or assumed, but the index build and the extractor
have to be measured at full scale. This generator writes a META directory (MRCONSO, MRSTY,
MRSAB, MRRANK, MRFILES) whose *shape* is that of a real release:

* **Size.** The 2023–2024 releases have about 3.3 million concepts and 16–17 million MRCONSO
  rows from about 190 sources (NLM's release notes). Atoms per concept are
  ``1 + ⌊Exp(mean 4.3)⌋`` (capped at 60): 4.8 on average, heavy-tailed, so 16M rows give
  ≈ 3.3M concepts.
* **Strings.** Multiword names drawn from a Zipf-distributed medical-looking vocabulary plus a
  growing long tail of rare tokens (chemical and gene-like names), about 3 tokens per name on
  average (1–14; one word in 10 %); across sources the same name repeats with case variants,
  inverted "X, Y" forms, NOS/semantic-tag suffixes, plurals, a variant with one word replaced,
  and abbreviations (TTY AB/ACR; in the realistic release for 18 % of the concepts whose
  sources have those types).
  About a third of the rows are not English; ~100 sources with their languages and term
  types; SUPPRESS mostly N; TS/STT/ISPREF; 1–3 of the 127 semantic types per concept (0.1 % of
  concepts have no MRSTY row, as in 2023AB).
* **Ambiguity** (``ambiguity="realistic"``, the default) follows the published figures:

  - Aronson, *Ambiguity in the UMLS Metathesaurus*, NLM technical report, 2001 and 2005
    editions: ambiguity is rare and its tail is in the tens — in 2005AA only 36,113 concepts,
    of over a million, had a string shared with another concept; the most ambiguous strings
    name tens of concepts ("Other": 55), an ordinary ambiguous word a handful ("cold": 6).
  - Liu, Lussier & Friedman, *A study of abbreviations in the UMLS*, Proc AMIA Symp
    2001:393–7: 33.1 % of the UMLS abbreviations of six characters or fewer are ambiguous, and
    short abbreviations are the most ambiguous.

  Every concept's own names are made unique (a name whose key another concept holds grows by
  a word; an abbreviation that is taken grows by a letter or a digit) and contain at least one
  made-up word (merged with a real dictionary, a synthetic "Mass" or "Right lung" would
  compete with the real concept of that name, where a real release has one concept; only
  abbreviations, as in a real release, are shared with real ones), and ambiguity is then
  added on purpose, by two processes of the same law: a concept's abbreviation is, with
  probability 0.55, a *shared* one, and a concept with two or more atoms has, with
  probability 0.015, one atom with a shared word or phrase. A shared string is created with a
  quota of k concepts, P(k) ∝ k^-3.5 on 2..100 (70 % of ambiguous keys name 2 concepts, 2.7 on
  average; at 16M rows a few name 50–100, like Aronson's "Other"), and later concepts fill its
  quota. The more concepts a shared string has, the shorter it is: 8 or more are two-letter
  abbreviations or single common (made-up) words, 2 are 3–5-letter abbreviations or phrases.

  Targets, checked by tests/test_synth_umls.py on an index built from 200k rows (and
  reported for every variant by ``make bench-umls``): 3–6 % of the concepts with an English
  key have an ambiguous key (Aronson's 3.3 %, a little more because keys also fold case,
  plurals and spelling); about 1 % of the keys are ambiguous (what the concept share and the
  quota law imply; not a published figure); 60–80 % of ambiguous keys name exactly 2 concepts,
  2.3–3.5 on average; 25–41 % of the abbreviation keys of six characters or fewer are
  ambiguous (Liu's 33.1 %); ambiguous keys of up to 3 characters name more concepts on average
  than multiword ones.

  ``ambiguity="stress"`` is the generator as it was before these figures were applied (with
  today's atoms per concept and identifiers): names are drawn with repeats, real words alone
  included, and every AB/ACR atom is its name's initials, so at 16M rows common words and
  two-letter abbreviations name thousands of concepts ("left", "of", "ct"). A site dictionary
  can be that noisy, and the engine must survive it; it is not what a UMLS release looks like.

* **Identifiers.** No identifier may be a real one: merged with a real vocabulary (the demo
  dictionary, a licensed release), a synthetic concept must never take a real concept's name.
  They keep the shape UMLS parsers expect. CUIs are 'C' + 7 digits, allocated *downwards*
  from C9999999 and never below C6500000 (``CUI_FLOOR``; ``generate`` refuses more concepts):
  real CUIs are assigned upwards — the newest in the ROCOv2 vocabulary (UMLS 2022AB) are
  C54xxxxx, and releases add a few hundred thousand a year — so the top of the 7-digit range
  is the only block no release has reached, and a small release stays at its very top. AUIs,
  SUIs and LUIs are the letter + 8 digits from 80000000 (real ones are below 40000000), ATUIs
  'AT' + 9 digits from 800000000; the sources' VCUI/RCUI are the top CUIs of the block.

    python -m benchmarks.synth_umls --rows 1000000 --out bench-out/synth-1M/META
    python -m benchmarks.synth_umls --rows 1000000 --ambiguity stress --out ...

Deterministic for a given ``--seed``, ``--rows`` and ``--ambiguity``; ``GENERATOR_VERSION``
changes whenever the output for the same arguments does (``make bench-umls`` regenerates its
releases then).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import logging
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from conceptsvc.semantic_network import load_semantic_network
from conceptsvc.sources.rrf import STANDARD_COLUMNS

if TYPE_CHECKING:
    from conceptsvc.index import ConceptIndex

__all__ = [
    "AMBIGUITY",
    "CUI_FLOOR",
    "CUI_TOP",
    "GENERATOR_VERSION",
    "AmbiguityStats",
    "ambiguity_stats",
    "generate",
    "main",
]

log = logging.getLogger(__name__)

#: Bumped whenever the files written for the same arguments change.
GENERATOR_VERSION = 2
AMBIGUITY = ("realistic", "stress")
Ambiguity = Literal["realistic", "stress"]

#: The synthetic CUI block: C9999999 downwards, never below C6500000 (module docstring).
CUI_TOP = 9_999_999
CUI_FLOOR = 6_500_000
# AUI, SUI, LUI: letter + 8 digits from here (real ones are below 40,000,000).
_ID_BASE = 80_000_000
_ID_MAX = 99_999_999
_ATUI_BASE = 800_000_000  # 'AT' + 9 digits

_MEAN_EXTRA_ATOMS = 4.3  # atoms per concept: 1 + floor(Exp(4.3)), mean 4.8
_MAX_ATOMS = 60
# The two ambiguity processes of the realistic release (module docstring).
_P_ABBREVIATION = 0.18  # of the concepts whose sources give an AB/ACR atom
_P_SHARED_ABBREVIATION = 0.55
_P_SHARED_WORD = 0.015
_QUOTA_EXPONENT = 3.5
_QUOTA_MAX = 100
# Keys longer than this many tokens are not checked for uniqueness: two random names of 4+
# Zipf-drawn words coincide about once in the 16M-row release (the tests measure the result).
_UNIQUE_CHECK_TOKENS = 3
# Pool of open quota slots that a new shared string competes with: small, so that a quota
# fills within a few thousand concepts and few are left half-filled when the release ends.
_POOL_RESERVE = 20

_PREFIXES = (
    "cardi hepat neur oste gastr nephr pulmon derm angi my arthr chondr col cyst encephal "
    "enter fibr gloss hem hemat hyster lapar laryng lip lymph mamm mast mening metr myel "
    "onc ophthalm orch ot pancreat path pharyng phleb pneum proct psych pyel rhin salping "
    "splen spondyl stomat tend thorac thromb thyr trache ur uter vas ven vertebr "
    "aden adren bronch bucc carcin cephal cerebr cervic cholecyst cost crani dacry dent "
    "duoden episi esophag fasci galact gingiv hidr hydr ile ili irid kerat lacrim lob "
    "lumb lys mandibul maxill melan nas necr odont omphal oophor orth palat pelv perine "
    "phren pil pleur poster prostat radi rect ren retin sacr scler sigmoid sinus somat "
    "spermat spin stern synov tars test thym ton tox trich tympan uretr vagin valv vesic"
).split()
_LINKS = ("o", "i", "a", "", "o", "e")
_SUFFIXES = (
    "itis oma osis ectomy otomy ostomy plasty pathy algia emia uria genesis graphy gram "
    "scopy logy megaly penia rrhea rrhage sclerosis stenosis trophy cele lysis cyte blast "
    "phage philia plegia spasm tomy al ic ous ar ary ine ase ide"
).split()
_ENGLISH = (
    "acute chronic left right upper lower anterior posterior lateral medial distal proximal "
    "bilateral unilateral primary secondary malignant benign neoplasm disease syndrome "
    "disorder injury fracture of the with without and in due to cell type stage grade "
    "structure region procedure imaging scan view finding abnormal normal congenital "
    "acquired infection carcinoma lesion tumor cyst mass nodule wall artery vein nerve "
    "muscle bone joint tissue membrane duct gland lobe segment body head neck base apex "
    "complete partial open closed total severe mild moderate recurrent familial juvenile "
    "adult child neonatal fetal maternal drug induced associated related history of "
    "screening measurement level serum urine blood plasma test result positive negative "
    "deficiency excess therapy treatment surgery repair removal biopsy resection transplant "
    "contrast enhanced weighted sequence dose radiation agent receptor protein gene "
    "antibody antigen enzyme inhibitor kinase factor pathway family member class like "
    "unspecified other specified site multiple single small large giant diffuse focal "
    "degenerative inflammatory vascular traumatic metabolic hereditary idiopathic"
).split()
_QUALIFIERS = ("NOS", "(disorder)", "(procedure)", "(body structure)", "(finding)",
               "(substance)", "[Ambiguous]", "unspecified", "NEC")
_FOREIGN = {
    "FRE": "de la du des et avec sans gauche droite aigu chronique maladie syndrome".split(),
    "GER": "der die das und mit ohne links rechts akut chronisch Krankheit Syndrom".split(),
    "SPA": "de la del y con sin izquierdo derecho agudo cronico enfermedad sindrome".split(),
    "DUT": "van de het en met zonder links rechts acuut chronisch ziekte syndroom".split(),
    "POR": "de da do e com sem esquerdo direito agudo cronico doenca sindrome".split(),
    "ITA": "di della del e con senza sinistro destro acuto cronico malattia sindrome".split(),
    "JPN": "の 症 病 性 急性 慢性 左 右".split(),
}

# name, language, term types it uses (first one is its preferred type)
_CORE_SABS: list[tuple[str, str, tuple[str, ...]]] = [
    ("MTH", "ENG", ("PN", "SY")),
    ("MSH", "ENG", ("MH", "ET", "PEP", "ENTRY")),
    ("SNOMEDCT_US", "ENG", ("PT", "FN", "SY", "OAP", "OF")),
    ("NCI", "ENG", ("PT", "SY", "AB", "ACR")),
    ("MDR", "ENG", ("PT", "LLT", "OL", "AB")),
    ("LNC", "ENG", ("LN", "LC", "DN", "OSN")),
    ("RXNORM", "ENG", ("SCD", "IN", "SY", "BN")),
    ("ICD10CM", "ENG", ("PT", "AB", "HT")),
    ("MEDLINEPLUS", "ENG", ("PT", "SY")),
    ("CHV", "ENG", ("PT", "SY")),
    ("HPO", "ENG", ("PT", "SY", "ET")),
    ("GO", "ENG", ("PT", "SY", "ET")),
    ("OMIM", "ENG", ("PT", "ETAL", "ACR")),
    ("RADLEX", "ENG", ("PT", "SY")),
    ("MSHFRE", "FRE", ("MH", "ET")),
    ("MSHGER", "GER", ("MH", "ET")),
    ("MSHSPA", "SPA", ("MH", "ET")),
    ("MSHDUT", "DUT", ("MH", "ET")),
    ("MSHPOR", "POR", ("MH", "ET")),
    ("MSHITA", "ITA", ("MH", "ET")),
    ("MSHJPN", "JPN", ("PEP", "ET")),
    ("MDRFRE", "FRE", ("PT", "LLT")),
    ("MDRGER", "GER", ("PT", "LLT")),
    ("MDRSPA", "SPA", ("PT", "LLT")),
    ("MDRJPN", "JPN", ("PT", "LLT")),
    ("SCTSPA", "SPA", ("PT", "SY", "FN")),
    ("LNC-FR-FR", "FRE", ("LN", "LC")),
    ("LNC-DE-DE", "GER", ("LN", "LC")),
]
_EXTRA_TTYS = ("PT", "SY", "ET", "AB", "ACR", "FN", "OP", "IS", "LLT")


def _sabs(n: int) -> list[tuple[str, str, tuple[str, ...]]]:
    out = list(_CORE_SABS)
    i = 0
    while len(out) < n:
        i += 1
        lang = "ENG" if i % 4 else ("FRE", "GER", "SPA", "ITA")[i % 16 // 4]
        out.append((f"SRC{i:03d}", lang, ("PT", *_EXTRA_TTYS[1 + i % 4 : 4 + i % 5])))
    return out


class _Words:
    """A Zipf-like vocabulary of medical-looking words with an open-ended rare tail."""

    def __init__(self, rng: random.Random, n_common: int) -> None:
        self.rng = rng
        words: set[str] = set()
        while len(words) < n_common:
            p = rng.choice(_PREFIXES)
            if rng.random() < 0.35:
                p += rng.choice(_LINKS) + rng.choice(_PREFIXES)
            words.add(p + rng.choice(_LINKS) + rng.choice(_SUFFIXES))
        common = sorted(words)
        rng.shuffle(common)
        self.vocab = _ENGLISH + common
        # Zipf(s≈1) cumulative weights, sampled with bisect.
        weights = [1.0 / (r + 40) for r in range(len(self.vocab))]
        self.cum = list(itertools.accumulate(weights))
        self.rare_counter = 0

    def word(self) -> str:
        r = self.rng.random()
        if r < 0.04:  # rare tail: chemicals, genes, codes — the vocabulary keeps growing
            self.rare_counter += 1
            kind = self.rng.random()
            if kind < 0.4:
                return f"{self.rng.choice(_PREFIXES).upper()[:3]}{self.rare_counter % 997 + 1}"
            if kind < 0.7:
                return (f"{self.rng.randint(1, 9)},{self.rng.randint(2, 9)}-di"
                        f"{self.rng.choice(_PREFIXES)}yl{self.rare_counter % 5003}ate")
            return f"{self.rng.choice(self.vocab[40:2000])}{self.rare_counter % 10007}in"
        x = self.rng.random() * self.cum[-1]
        return self.vocab[bisect.bisect_left(self.cum, x)]

    def phrase(self) -> list[str]:
        n = min(1 + int(self.rng.expovariate(1 / 2.2)), 12)
        return [self.word() for _ in range(n)]


def _variants(
    rng: random.Random, base: list[str], words: _Words, *, made_up: bool = False
) -> list[str]:
    """Surface forms a concept's atoms take across sources; with ``made_up``, only those with a
    made-up word (the one with a word replaced may have lost it; the others keep the base's)."""
    text = " ".join(base)
    forms = [text, text.capitalize(), text.title()]
    if len(base) >= 2:
        forms.append(f"{base[-1].capitalize()}, {' '.join(base[:-1])}")  # inverted "X, Y"
    forms.append(f"{text} {rng.choice(_QUALIFIERS)}")
    if len(base) >= 2:
        swap = list(base)
        swap[rng.randrange(len(swap))] = words.word()
        if not made_up or _has_made_up_word(swap):
            forms.append(" ".join(swap).capitalize())
    if base[-1][-1:] not in "sy":
        forms.append(text + "s")
    return forms


def _acronym(base: list[str]) -> str | None:
    letters = "".join(w[0] for w in base if w[:1].isalpha()).upper()
    return letters if 2 <= len(letters) <= 6 else None


# Real English words. In the realistic release every name and every shared word or phrase has
# at least one made-up word: a synthetic concept named only with real words ("the tumor",
# "mass", "right lung") would compete with the real concept of that name in a merged
# dictionary (the demo's, a licensed release's) — in a real release they are one concept.
_REAL_WORDS = frozenset(_ENGLISH) | frozenset(_QUALIFIERS) | {
    w.strip("()[]").lower() for q in _QUALIFIERS for w in q.split()}


def _has_made_up_word(words: Iterable[str]) -> bool:
    return any(w.lower().strip("()[],") not in _REAL_WORDS for w in words)
_LETTERS = "ABCDEFGHIJKLMNOPRSTUVW"


def _key(text: str) -> str:
    """A cheap stand-in for the index key of ``text`` (case and punctuation folded), to keep
    concepts' names apart while generating; the tests measure the real keys."""
    t = text.lower().replace(",", " ").replace("-", " ").replace("(", "").replace(")", "")
    return " ".join(t.replace("[", "").replace("]", "").split())


class _SharedStrings:
    """Strings that several concepts share, each created with a quota of concepts.

    ``take`` hands out a slot of an open string (a random one of the open slots, so big quotas
    fill alongside small ones) or opens a new string; a new string gets its quota from
    P(k) ∝ k^-``_QUOTA_EXPONENT`` on 2..``_QUOTA_MAX`` and its text from ``make(k)``, which
    must return a string whose key is not yet shared.
    """

    def __init__(self, rng: random.Random, make: Callable[[int], str]) -> None:
        self.rng = rng
        self.make = make
        self.slots: list[str] = []
        ks = range(2, _QUOTA_MAX + 1)
        self.quota_k = list(ks)
        self.quota_cum = list(itertools.accumulate(k ** -_QUOTA_EXPONENT for k in ks))

    def take(self) -> str:
        rng, slots = self.rng, self.slots
        if slots and rng.random() * (len(slots) + _POOL_RESERVE) < len(slots):
            i = rng.randrange(len(slots))
            s = slots[i]
            slots[i] = slots[-1]
            slots.pop()
            return s
        k = self.quota_k[bisect.bisect_left(self.quota_cum, rng.random() * self.quota_cum[-1])]
        s = self.make(k)
        slots.extend([s] * (k - 1))
        return s


class _Names:
    """Names, variants and abbreviations of the realistic release, kept apart between concepts
    except where a shared string is handed out on purpose."""

    def __init__(self, rng: random.Random, words: _Words) -> None:
        self.rng = rng
        self.words = words
        self.taken: set[str] = set()  # keys (up to _UNIQUE_CHECK_TOKENS tokens) a concept holds
        self.shared: set[str] = set()  # keys of shared strings
        self.abbreviations = _SharedStrings(rng, self._shared_abbreviation)
        self.phrases = _SharedStrings(rng, self._shared_phrase)

    def _free(self, key: str) -> bool:
        return key.count(" ") >= _UNIQUE_CHECK_TOKENS or key not in self.taken

    def _hold(self, keys: Iterable[str]) -> None:
        self.taken.update(k for k in keys if k.count(" ") < _UNIQUE_CHECK_TOKENS)

    def base(self) -> list[str]:
        """A base name no other concept holds (a taken one grows by a word)."""
        words = self.words
        base = words.phrase()
        while not _has_made_up_word(base) or not self._free(_key(" ".join(base))):
            base.append(words.word())
        return base

    def forms(self, base: list[str]) -> list[str]:
        """The concept's surface forms, without those whose key another concept holds; the
        first is the base name itself. Holds the keys of those kept."""
        own = {_key(" ".join(base))}
        forms = []
        for f in _variants(self.rng, base, self.words, made_up=True):
            # A form of 4+ words has a key of 4+ tokens: never checked (see _free).
            if f.count(" ") >= _UNIQUE_CHECK_TOKENS:
                forms.append(f)
                continue
            k = _key(f)
            if k in own or self._free(k):
                own.add(k)
                forms.append(f)
        self._hold(own)
        return forms

    def abbreviation(self, base: list[str]) -> str | None:
        """The concept's abbreviation: a shared one (probability _P_SHARED_ABBREVIATION), else
        its initials, grown by letters of its last word or a digit until no one holds it;
        None for a name without 2–6 initials that is not given a shared one."""
        if self.rng.random() < _P_SHARED_ABBREVIATION:
            return self.abbreviations.take()
        letters = _acronym(base)
        if letters is None:
            return None
        tail = "".join(c for c in base[-1][1:].upper() if c.isalpha())
        candidates = itertools.chain(
            (letters + tail[:i] for i in range(len(tail) + 1) if len(letters) + i <= 6),
            (f"{letters}{d}" for d in itertools.count(2)),
        )
        for c in candidates:
            key = c.lower()
            if key not in self.taken and key not in self.shared:
                self.taken.add(key)
                return c
        raise AssertionError("unreachable: the digits never run out")

    def _new_shared(self, draw: Callable[[int, int], str], k: int) -> str:
        """``draw(k, extra)`` until its key is not shared yet; every 30 attempts, one more
        letter or word (``extra``), for when a length is crowded (two-letter abbreviations)."""
        for attempt in itertools.count():
            s = draw(k, attempt // 30)
            key = _key(s)
            if key not in self.shared:
                self.shared.add(key)
                return s
        raise AssertionError("unreachable: longer strings never run out")

    def _shared_abbreviation(self, k: int) -> str:
        rng = self.rng

        def draw(k: int, extra: int) -> str:
            n = 2 if k >= 8 else rng.choice((2, 3, 3)) if k >= 3 else rng.choice((3, 3, 4, 4, 5))
            return "".join(rng.choice(_LETTERS) for _ in range(n + extra))

        return self._new_shared(draw, k)

    def _shared_phrase(self, k: int) -> str:
        words, rng = self.words, self.rng

        def draw(k: int, extra: int) -> str:
            if k >= 8 and not extra:  # like "Other", "Cold": one common (made-up) word
                return words.vocab[rng.randrange(len(_ENGLISH), len(_ENGLISH) + 2000)].capitalize()
            n = 1 if 3 <= k < 8 and rng.random() < 0.6 else 2 + (k == 2 and rng.random() < 0.4)
            phrase = [words.word() for _ in range(n + extra)]
            while not _has_made_up_word(phrase):
                phrase[rng.randrange(len(phrase))] = words.word()
            return " ".join(phrase).capitalize()

        return self._new_shared(draw, k)


_ABBREVIATION_TTYS = ("AB", "ACR")


@dataclass(frozen=True)
class _Source:
    sab: str
    lat: str
    ttys: tuple[str, ...]

    @property
    def plain_ttys(self) -> tuple[str, ...]:
        return tuple(t for t in self.ttys if t not in _ABBREVIATION_TTYS)


def generate(
    out: Path,
    rows: int,
    *,
    seed: int = 7,
    n_sabs: int = 100,
    ambiguity: Ambiguity = "realistic",
    progress_every: int = 1_000_000,
) -> dict[str, int]:
    """Write MRCONSO/MRSTY/MRSAB/MRRANK/MRFILES with about ``rows`` MRCONSO rows into ``out``.

    Returns the row count of each file written. Raises ValueError for more rows than the
    synthetic identifier blocks hold (about 17M rows: see the module docstring).
    """
    if ambiguity not in AMBIGUITY:
        raise ValueError(f"ambiguity must be one of {', '.join(AMBIGUITY)}, not {ambiguity!r}")
    if rows > _ID_MAX - _ID_BASE:
        raise ValueError(f"{rows:,} rows: the synthetic AUI block holds {_ID_MAX - _ID_BASE:,}")
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    sabs = [_Source(*s) for s in _sabs(n_sabs)]
    eng_sabs = [s for s in sabs if s.lat == "ENG"]
    foreign_sabs = [s for s in sabs if s.lat != "ENG"]
    # Source popularity: a few big sources carry most atoms, as in the real release.
    eng_w = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(eng_sabs))))
    words = _Words(rng, n_common=max(20_000, min(400_000, rows // 40)))
    names = _Names(rng, words) if ambiguity == "realistic" else None
    sn = load_semantic_network()
    tuis = sorted(sn.types)
    tui_cum = list(itertools.accumulate(1.0 / (i + 2) for i in range(len(tuis))))
    rng.shuffle(tuis)
    suppress_cum = [(0.88, "N"), (0.93, "O"), (0.94, "E"), (1.0, "Y")]
    ranks: dict[tuple[str, str, str], int] = {}
    n_conso = n_sty = n_concepts = 0
    # The top CUIs of the block are the sources' VCUI/RCUI (MRSAB); concepts come below them.
    first_cui = CUI_TOP - 2 * (len(sabs) + 1)
    t0 = time.monotonic()
    conso_path, sty_path = out / "MRCONSO.RRF", out / "MRSTY.RRF"
    with conso_path.open("w", encoding="utf-8", newline="\n", buffering=1 << 22) as conso, \
            sty_path.open("w", encoding="utf-8", newline="\n", buffering=1 << 22) as sty:
        next_report = progress_every
        while n_conso < rows:
            cui_no = first_cui - n_concepts
            if cui_no < CUI_FLOOR:
                raise ValueError(
                    f"{rows:,} rows need more concepts than the synthetic CUI block "
                    f"C{CUI_FLOOR}–C{first_cui} holds ({first_cui - CUI_FLOOR + 1:,}); "
                    f"stopped at {n_conso:,} rows"
                )
            n_concepts += 1
            cui = f"C{cui_no:07d}"
            n_atoms = min(1 + int(rng.expovariate(1 / _MEAN_EXTRA_ATOMS)), _MAX_ATOMS,
                          rows - n_conso)
            if names is not None:
                base = names.base()
                forms = names.forms(base)
                shared_word = (names.phrases.take()
                               if n_atoms >= 2 and rng.random() < _P_SHARED_WORD else None)
            else:
                base = words.phrase()
                forms = _variants(rng, base, words)
                shared_word = None
            abbreviation: str | None = None
            abbreviation_drawn = False
            # In the realistic release most concepts have no abbreviation: their sources' AB/ACR
            # atoms take another of the source's term types.
            abbreviated = names is None or rng.random() < _P_ABBREVIATION
            lines = []
            pref_done = False
            for a in range(n_atoms):
                foreign = rng.random() < 0.32
                shared = False
                if shared_word is not None and a == n_atoms - 1:
                    src = eng_sabs[bisect.bisect_left(eng_w, rng.random() * eng_w[-1])]
                    s, tty, foreign = shared_word, rng.choice(src.ttys[1:] or src.ttys), False
                    shared = True
                elif foreign:
                    src = rng.choice(foreign_sabs)
                    fw = _FOREIGN[src.lat]
                    s = " ".join(rng.choice(fw) if rng.random() < 0.3 else w for w in base)
                    tty = rng.choice(src.ttys)
                else:
                    src = eng_sabs[bisect.bisect_left(eng_w, rng.random() * eng_w[-1])]
                    s = forms[0] if a == 0 else rng.choice(forms)
                    tty = src.ttys[0] if a == 0 else rng.choice(src.ttys)
                    if tty in _ABBREVIATION_TTYS and not abbreviated:
                        tty = rng.choice(src.plain_ttys)
                    elif tty in _ABBREVIATION_TTYS:
                        if names is None:
                            s = _acronym(base) or s
                        else:
                            if not abbreviation_drawn:
                                abbreviation = names.abbreviation(base)
                                abbreviation_drawn = True
                            s = abbreviation or s
                sab = src.sab
                sup = "N"
                if a and not shared:  # a shared string is never suppressed
                    x = rng.random()
                    sup = next(v for p, v in suppress_cum if x < p)
                ranks.setdefault((sab, tty, sup), 0)
                is_pref = not foreign and not pref_done
                pref_done = pref_done or is_pref
                ts = "P" if is_pref else "S"
                stt = "PF" if is_pref or rng.random() < 0.7 else "VO"
                row = n_conso + a
                n = _ID_BASE + row
                lines.append(
                    f"{cui}|{src.lat}|{ts}|L{_ID_BASE + row // 2:08d}|{stt}|S{n:08d}|"
                    f"{'Y' if is_pref else 'N'}|A{n:08d}||{sab[:3]}{n}||{sab}|{tty}|{sab[:3]}{n}|"
                    f"{s}|0|{sup}|256|\n"
                )
            conso.writelines(lines)
            n_conso += n_atoms
            if rng.random() >= 0.001:  # 0.1 % of concepts have no semantic type
                k = 1 + (rng.random() < 0.25) + (rng.random() < 0.05)
                chosen = {tuis[bisect.bisect_left(tui_cum, rng.random() * tui_cum[-1])]
                          for _ in range(k)}
                for t in sorted(chosen):
                    st = sn.types[t]
                    sty.write(f"{cui}|{t}|{st.tree_number}|{st.name}|"
                              f"AT{_ATUI_BASE + n_sty:09d}|256|\n")
                    n_sty += 1
            if n_conso >= next_report:
                next_report += progress_every
                log.info("%s rows (%.0f rows/s)", f"{n_conso:,}",
                         n_conso / (time.monotonic() - t0))
    # MRRANK: a plausible ranking — MTH first, then sources by popularity, preferred TTYs up,
    # suppressed atoms at the bottom.
    sab_order = {s.sab: i for i, s in enumerate(sabs)}
    ordered = sorted(ranks, key=lambda k: (k[2] != "N", sab_order[k[0]], k[1] not in (
        "PN", "MH", "PT"), k[1]))
    rank_rows = [f"{len(ordered) - i:04d}|{sab}|{tty}|{sup}|\n"
                 for i, (sab, tty, sup) in enumerate(ordered)]
    (out / "MRRANK.RRF").write_text("".join(rank_rows), encoding="utf-8")
    sab_rows = []
    for i, src in enumerate(sabs):
        fields = [f"C{CUI_TOP - 2 * i:07d}", f"C{CUI_TOP - 2 * i - 1:07d}", f"{src.sab}2024",
                  src.sab, f"Synthetic source {src.sab}", src.sab, "2024", "", "", "", "", "",
                  "", "0", "", "", "", ",".join(src.ttys), "", src.lat, "UTF-8", "Y", "Y",
                  f"Synthetic source {src.sab}", ""]
        sab_rows.append("|".join(fields) + "|\n")
    mth = len(sabs)
    sab_rows.append("|".join([
        f"C{CUI_TOP - 2 * mth:07d}", f"C{CUI_TOP - 2 * mth - 1:07d}", "MTH2024AA", "MTH",
        "UMLS Metathesaurus (synthetic)", "MTH", "2024AA", "", "", "", "", "", "", "0", "", "",
        "", "PN", "", "ENG", "UTF-8", "Y", "Y", "UMLS Metathesaurus", ""]) + "|\n")
    (out / "MRSAB.RRF").write_text("".join(sab_rows), encoding="utf-8")
    counts = {
        "MRCONSO.RRF": n_conso, "MRSTY.RRF": n_sty, "MRRANK.RRF": len(rank_rows),
        "MRSAB.RRF": len(sab_rows),
    }
    files = []
    for name, n in counts.items():
        cols = STANDARD_COLUMNS[name]
        if name == "MRRANK.RRF":
            cols = ("MRRANK_RANK", *cols[1:])
        files.append(f"{name}|synthetic|{','.join(cols)}|{len(cols)}|{n}|"
                     f"{(out / name).stat().st_size}|\n")
    files.append(f"MRFILES.RRF|Relation Relation|{','.join(STANDARD_COLUMNS['MRFILES.RRF'])}"
                 f"|6|{len(files) + 1}|0|\n")
    (out / "MRFILES.RRF").write_text("".join(files), encoding="utf-8")
    counts["MRFILES.RRF"] = len(files)
    log.info("wrote %s in %.0f s: %s", out, time.monotonic() - t0, counts)
    return counts


@dataclass(frozen=True)
class AmbiguityStats:
    """How ambiguous an index's keys are: the figures the module docstring sets targets for."""

    keys: int
    concepts: int
    ambiguous_keys: int
    concepts_with_ambiguous_key: int
    share_of_ambiguous_keys_with_2: float
    concepts_per_ambiguous_key: float  # mean
    max_concepts_per_key: int
    abbreviation_keys: int  # keys of at most 6 characters with an abbreviation posting
    ambiguous_abbreviation_keys: int
    concepts_per_short_ambiguous_key: float  # mean over ambiguous keys of ≤ 3 characters
    concepts_per_multiword_ambiguous_key: float  # mean over ambiguous keys of 2+ tokens
    most_ambiguous: tuple[tuple[str, int], ...]  # the ten keys with the most concepts

    @property
    def ambiguous_key_share(self) -> float:
        return self.ambiguous_keys / self.keys if self.keys else 0.0

    @property
    def ambiguous_concept_share(self) -> float:
        return self.concepts_with_ambiguous_key / self.concepts if self.concepts else 0.0

    @property
    def ambiguous_abbreviation_share(self) -> float:
        return (self.ambiguous_abbreviation_keys / self.abbreviation_keys
                if self.abbreviation_keys else 0.0)


def ambiguity_stats(index: ConceptIndex) -> AmbiguityStats:
    """Measure ``index``'s ambiguity (a key is ambiguous if its postings name 2+ concepts)."""
    from conceptsvc.index import FLAG_ABBREVIATION

    counts: dict[str, int] = {}
    concepts: set[str] = set()
    for key, cuis in index.ambiguous_keys():
        counts[key] = len(cuis)
        concepts.update(cuis)
    n_abbr = n_abbr_ambiguous = 0
    for kid in range(index.n_keys):
        key = index.key(kid)
        if len(key) <= 6 and " " not in key and any(
            p.flags & FLAG_ABBREVIATION for p in index.postings_of(kid)
        ):
            n_abbr += 1
            n_abbr_ambiguous += key in counts

    def mean(values: list[int]) -> float:
        return sum(values) / len(values) if values else 0.0

    ks = list(counts.values())
    return AmbiguityStats(
        keys=index.n_keys,
        concepts=len(index),
        ambiguous_keys=len(counts),
        concepts_with_ambiguous_key=len(concepts),
        share_of_ambiguous_keys_with_2=ks.count(2) / len(ks) if ks else 0.0,
        concepts_per_ambiguous_key=mean(ks),
        max_concepts_per_key=max(ks, default=1),
        abbreviation_keys=n_abbr,
        ambiguous_abbreviation_keys=n_abbr_ambiguous,
        concepts_per_short_ambiguous_key=mean([n for k, n in counts.items() if len(k) <= 3]),
        concepts_per_multiword_ambiguous_key=mean([n for k, n in counts.items() if " " in k]),
        most_ambiguous=tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]),
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rows", type=int, required=True, help="MRCONSO rows to write")
    p.add_argument("--out", type=Path, required=True, help="META directory to write")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--sabs", type=int, default=100, help="number of sources")
    p.add_argument("--ambiguity", choices=AMBIGUITY, default="realistic",
                   help="realistic: published UMLS ambiguity (default); stress: common words "
                   "and two-letter abbreviations naming thousands of concepts")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        counts = generate(args.out, args.rows, seed=args.seed, n_sabs=args.sabs,
                          ambiguity=args.ambiguity)
    except ValueError as exc:
        p.error(str(exc))
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
