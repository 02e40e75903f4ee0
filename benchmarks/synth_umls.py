"""Synthetic UMLS-scale RRF files, for benchmarks only (never for matching quality).

A licensed UMLS release cannot be shipped or assumed, but the index build has to be measured at
full scale (11–17 M MRCONSO rows). This generator writes a META directory whose *shape* is
that of a real release: multiword strings drawn from a Zipf-distributed medical-looking
vocabulary plus a growing long tail of rare tokens (chemical and gene-like names), ~3.5 atoms
per concept, the same string repeated across sources with case variants, inverted "X, Y"
forms, NOS/semantic-tag suffixes and acronyms; ~100 sources with their languages (about a
third of the rows are not English), term types, SUPPRESS flags (mostly N), TS/STT/ISPREF, and
1–3 of the 127 semantic types per concept (0.1 % of concepts have no MRSTY row, as in 2023AB).
It also writes MRSAB, MRRANK and MRFILES.

    python -m benchmarks.synth_umls --rows 1000000 --out bench-out/synth-1M/META

Deterministic for a given ``--seed`` and ``--rows``.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import logging
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from conceptsvc.semantic_network import load_semantic_network
from conceptsvc.sources.rrf import STANDARD_COLUMNS

__all__ = ["generate", "main"]

log = logging.getLogger(__name__)

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


def _variants(rng: random.Random, base: list[str], words: _Words) -> list[str]:
    """Surface forms a concept's atoms take across sources."""
    text = " ".join(base)
    forms = [text, text.capitalize(), text.title()]
    if len(base) >= 2:
        forms.append(f"{base[-1].capitalize()}, {' '.join(base[:-1])}")  # inverted "X, Y"
    forms.append(f"{text} {rng.choice(_QUALIFIERS)}")
    if len(base) >= 2:
        swap = list(base)
        swap[rng.randrange(len(swap))] = words.word()
        forms.append(" ".join(swap).capitalize())
    if base[-1][-1:] not in "sy":
        forms.append(text + "s")
    return forms


def _acronym(base: list[str]) -> str | None:
    letters = "".join(w[0] for w in base if w[:1].isalpha()).upper()
    return letters if 2 <= len(letters) <= 6 else None


def generate(
    out: Path, rows: int, *, seed: int = 7, n_sabs: int = 100, progress_every: int = 1_000_000
) -> dict[str, int]:
    """Write MRCONSO/MRSTY/MRSAB/MRRANK/MRFILES with about ``rows`` MRCONSO rows into ``out``.

    Returns the row count of each file written.
    """
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    sabs = _sabs(n_sabs)
    eng_sabs = [s for s in sabs if s[1] == "ENG"]
    foreign_sabs = [s for s in sabs if s[1] != "ENG"]
    # Source popularity: a few big sources carry most atoms, as in the real release.
    eng_w = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(eng_sabs))))
    words = _Words(rng, n_common=max(20_000, min(400_000, rows // 40)))
    sn = load_semantic_network()
    tuis = sorted(sn.types)
    tui_cum = list(itertools.accumulate(1.0 / (i + 2) for i in range(len(tuis))))
    rng.shuffle(tuis)
    suppress_cum = [(0.88, "N"), (0.93, "O"), (0.94, "E"), (1.0, "Y")]
    ranks: dict[tuple[str, str, str], int] = {}
    n_conso = n_sty = 0
    cui_no = 0
    t0 = time.monotonic()
    conso_path, sty_path = out / "MRCONSO.RRF", out / "MRSTY.RRF"
    with conso_path.open("w", encoding="utf-8", newline="\n", buffering=1 << 22) as conso, \
            sty_path.open("w", encoding="utf-8", newline="\n", buffering=1 << 22) as sty:
        next_report = progress_every
        while n_conso < rows:
            cui_no += 1
            cui = f"C{cui_no:07d}"
            base = words.phrase()
            forms = _variants(rng, base, words)
            n_atoms = min(1 + int(rng.expovariate(1 / 2.5)), 40, rows - n_conso)
            lines = []
            pref_done = False
            for a in range(n_atoms):
                foreign = rng.random() < 0.32
                if foreign:
                    sab, lat, ttys = rng.choice(foreign_sabs)
                    fw = _FOREIGN[lat]
                    s = " ".join(rng.choice(fw) if rng.random() < 0.3 else w for w in base)
                else:
                    sab, lat, ttys = eng_sabs[bisect.bisect_left(eng_w, rng.random() * eng_w[-1])]
                    s = forms[0] if a == 0 else rng.choice(forms)
                tty = ttys[0] if a == 0 else rng.choice(ttys)
                if not foreign and tty in ("AB", "ACR"):
                    s = _acronym(base) or s
                sup = "N"
                if a:
                    x = rng.random()
                    sup = next(v for p, v in suppress_cum if x < p)
                ranks.setdefault((sab, tty, sup), 0)
                is_pref = not foreign and not pref_done
                pref_done = pref_done or is_pref
                ts = "P" if is_pref else "S"
                stt = "PF" if is_pref or rng.random() < 0.7 else "VO"
                n = n_conso + a
                lines.append(
                    f"{cui}|{lat}|{ts}|L{n // 2:08d}|{stt}|S{n:08d}|{'Y' if is_pref else 'N'}|"
                    f"A{n:09d}||{sab[:3]}{n}||{sab}|{tty}|{sab[:3]}{n}|{s}|0|{sup}|256|\n"
                )
            conso.writelines(lines)
            n_conso += n_atoms
            if rng.random() >= 0.001:  # 0.1 % of concepts have no semantic type
                k = 1 + (rng.random() < 0.25) + (rng.random() < 0.05)
                chosen = {tuis[bisect.bisect_left(tui_cum, rng.random() * tui_cum[-1])]
                          for _ in range(k)}
                for i, t in enumerate(sorted(chosen)):
                    st = sn.types[t]
                    sty.write(f"{cui}|{t}|{st.tree_number}|{st.name}|AT{cui_no:08d}{i}|256|\n")
                    n_sty += 1
            if n_conso >= next_report:
                next_report += progress_every
                log.info("%s rows (%.0f rows/s)", f"{n_conso:,}",
                         n_conso / (time.monotonic() - t0))
    # MRRANK: a plausible ranking — MTH first, then sources by popularity, preferred TTYs up,
    # suppressed atoms at the bottom.
    sab_order = {s[0]: i for i, s in enumerate(sabs)}
    ordered = sorted(ranks, key=lambda k: (k[2] != "N", sab_order[k[0]], k[1] not in (
        "PN", "MH", "PT"), k[1]))
    rank_rows = [f"{len(ordered) - i:04d}|{sab}|{tty}|{sup}|\n"
                 for i, (sab, tty, sup) in enumerate(ordered)]
    (out / "MRRANK.RRF").write_text("".join(rank_rows), encoding="utf-8")
    sab_rows = []
    for i, (sab, lat, ttys) in enumerate(sabs):
        vsab = f"{sab}2024"
        fields = [f"C{9000000 + i}", f"C{9100000 + i}", vsab, sab, f"Synthetic source {sab}",
                  sab, "2024", "", "", "", "", "", "", "0", "", "", "", ",".join(ttys), "",
                  lat, "UTF-8", "Y", "Y", f"Synthetic source {sab}", ""]
        sab_rows.append("|".join(fields) + "|\n")
    sab_rows.append("|".join([
        "C9999000", "C9999001", "MTH2024AA", "MTH", "UMLS Metathesaurus (synthetic)", "MTH",
        "2024AA", "", "", "", "", "", "", "0", "", "", "", "PN", "", "ENG", "UTF-8", "Y", "Y",
        "UMLS Metathesaurus", ""]) + "|\n")
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rows", type=int, required=True, help="MRCONSO rows to write")
    p.add_argument("--out", type=Path, required=True, help="META directory to write")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--sabs", type=int, default=100, help="number of sources")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    counts = generate(args.out, args.rows, seed=args.seed, n_sabs=args.sabs)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
