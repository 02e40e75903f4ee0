"""Error analysis of the demo dictionary against the ROCOv2 validation captions (curation aid).

Why: the curator needs to see which gold concepts the dictionary cannot reach at all (no name of
the concept occurs in the caption), which keys fire without the concept being gold, and how the
ambiguous keys behave — independently of the extraction engine's profile and resolution logic.
The findings point to *where* a real name is missing; the names themselves are curated by hand
(see curated_synonyms.yaml). Nothing here writes dictionary content.

The matcher here is deliberately simple: normalised-token n-gram lookup (the same
``conceptsvc.normalize`` as the index), greedy longest match left to right, abbreviations
(TTY AB/ACR, or short all-caps strings) only when the caption has the same letter case.

Usage::

    .venv/bin/python scripts/demo_dictionary/analyze.py --shared-data ../shared/data [--top 40]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conceptsvc.normalize import STOPWORDS, Token, normalize_term, tokenize  # noqa: E402

META = REPO / "conceptsvc" / "data" / "demo" / "META"
# The manually curated ROCOv2 concepts (modality, X-ray region, X-ray projection): mostly
# implied rather than named in captions, so their coverage is a matter for the profile.
MANUAL_CUIS = frozenset(
    "C0040405 C1306645 C0024485 C0041618 C0002978 C0032743 C0817096 C0037303 C0023216 C0000726 "
    "C0030797 C1140618 C0037949 C0006141 C1999039 C1996865 C0205129 C0205106".split()
)


def case_sensitive(string: str, tty: str) -> bool:
    letters = [c for c in string if c.isalpha()]
    return tty in ("AB", "ACR") or (
        bool(letters) and len(string) <= 5 and all(c.isupper() for c in letters)
    )


def load_dictionary(
    meta: Path = META,
    sabs: frozenset[str] | None = None,
) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, str]]], dict[str, str]]:
    """key → CUIs (case-insensitive strings), key → [(surface, CUI)] (case-sensitive), names."""
    loose: dict[str, set[str]] = defaultdict(set)
    strict: dict[str, list[tuple[str, str]]] = defaultdict(list)
    names: dict[str, str] = {}
    with (meta / "MRCONSO.RRF").open(encoding="utf-8") as fh:
        for line in fh:
            f = line.rstrip("\n").split("|")
            cui, ts, stt, ispref, tty, string, suppress = (
                f[0],
                f[2],
                f[4],
                f[6],
                f[12],
                f[14],
                f[16],
            )
            if ts == "P" and stt == "PF" and ispref == "Y":
                names[cui] = string
            if suppress != "N" or (sabs is not None and f[11] not in sabs):
                continue
            key = normalize_term(string)
            if not key:
                continue
            if case_sensitive(string, tty):
                strict[key].append(
                    (" ".join(t for t in string.replace("-", " ").replace("/", " ").split()), cui)
                )
            else:
                loose[key].add(cui)
    return loose, strict, names


def match(
    tokens: Sequence[Token],
    text: str,
    loose: dict[str, set[str]],
    strict: dict[str, list[tuple[str, str]]],
    max_n: int,
    longest: bool = True,
) -> list[tuple[int, int, str, set[str]]]:
    """(start token, end token, key, CUIs) of matches; greedy longest-first when ``longest``."""
    out = []
    i = 0
    while i < len(tokens):
        found = None
        for n in range(min(max_n, len(tokens) - i), 0, -1):
            norms = [t.norm for t in tokens[i : i + n]]
            if all(x in STOPWORDS for x in norms):
                continue
            key = " ".join(norms)
            cuis = set(loose.get(key, ()))
            surface = " ".join(text[t.start : t.end] for t in tokens[i : i + n])
            for s, cui in strict.get(key, ()):
                if s.replace(" ", "") == surface.replace(" ", ""):
                    cuis.add(cui)
            if cuis:
                found = (i, i + n, key, cuis)
                break
        if found and longest:
            out.append(found)
            i = found[1]
        else:
            if found:
                out.append(found)
            i += 1
    return out


def read_ids(path: Path, col: str) -> dict[str, str]:
    with path.open(encoding="utf-8", newline="") as fh:
        return {r["ID"]: r[col] for r in csv.DictReader(fh)}


def ngrams(norms: Sequence[str], n_max: int = 4) -> Iterable[str]:
    for n in range(1, n_max + 1):
        for i in range(len(norms) - n + 1):
            g = norms[i : i + n]
            if g[0] in STOPWORDS or g[-1] in STOPWORDS:
                continue
            yield " ".join(g)


def engine_report(ids: Sequence[str], caps: dict[str, str], gold: dict[str, set[str]],
                  names: dict[str, str], args: argparse.Namespace) -> None:
    """Mention texts behind the engine's false and true positives, per concept."""
    from conceptsvc.embedded import demo_index
    from conceptsvc.extractor import Extractor
    from conceptsvc.model import ExtractOptions

    ex = Extractor(demo_index())
    opts = ExtractOptions(profile="rocov2")
    fp_text: dict[str, Counter[str]] = defaultdict(Counter)
    tp_text: dict[str, Counter[str]] = defaultdict(Counter)
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    tp: Counter[str] = Counter()
    for i in ids:
        ann = ex.extract(caps[i], opts, id=i)
        g = gold.get(i, set())
        pred = set(ann.concepts)
        texts: dict[str, set[str]] = defaultdict(set)
        for m in ann.mentions:
            texts[m.cui].add(normalize_term(m.text))
        for c in pred:
            bucket = tp_text if c in g else fp_text
            bucket[c].update(texts.get(c) or {"<inferred>"})
            (tp if c in g else fp)[c] += 1
        for c in g - pred:
            fn[c] += 1
    print("\n## engine false positives by concept (mention texts: FP count | TP count)")
    for c, n in fp.most_common(args.top):
        parts = [f"{t} {k}|{tp_text[c][t]}" for t, k in fp_text[c].most_common(6)]
        print(f"{c} {names.get(c, '?')!r}: FP {n} TP {tp[c]} FN {fn[c]}  " + "; ".join(parts))
    print("\n## engine false negatives by concept")
    for c, n in fn.most_common(args.top):
        print(f"{c} {names.get(c, '?')!r}: FN {n} TP {tp[c]} FP {fp[c]}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared-data", type=Path, required=True)
    ap.add_argument("--split", default="valid")
    ap.add_argument("--top", type=int, default=40, help="concepts to list in each section")
    ap.add_argument("--cui", action="append", default=[], help="show details for this CUI")
    ap.add_argument(
        "--sources",
        default="",
        help="only these SABs (comma-separated), e.g. ROCOV2,ROCOV2INF,HPO,MONDO,DOID,DICOM "
        "for the uncurated baseline",
    )
    ap.add_argument("--engine", action="store_true",
                    help="also run conceptsvc's Extractor (rocov2 profile) on the demo index and "
                    "report which matched texts give false positives / true positives per concept")
    args = ap.parse_args(argv)
    r2 = args.shared_data / "rocov2"
    caps = read_ids(r2 / f"{args.split}_captions.csv", "Caption")
    gold = {
        k: {c for c in v.split(";") if c}
        for k, v in read_ids(r2 / f"{args.split}_concepts.csv", "CUIs").items()
    }
    sabs = frozenset(args.sources.split(",")) if args.sources else None
    loose, strict, names = load_dictionary(sabs=sabs)
    max_n = max(len(k.split()) for k in list(loose) + list(strict))

    occ = Counter()
    covered = Counter()
    predicted = Counter()
    tp = Counter()
    key_stats: dict[str, Counter[str]] = defaultdict(Counter)
    key_n: Counter[str] = Counter()
    missed_ngrams: dict[str, Counter[str]] = defaultdict(Counter)
    df: Counter[str] = Counter()
    ids = sorted(caps)
    toks = {i: tokenize(caps[i]) for i in ids}
    for i in ids:
        df.update(set(ngrams([t.norm for t in toks[i]])))
    for i in ids:
        g = gold.get(i, set())
        any_hits = match(toks[i], caps[i], loose, strict, max_n, longest=False)
        reach = set().union(*(h[3] for h in any_hits)) if any_hits else set()
        hits = match(toks[i], caps[i], loose, strict, max_n, longest=True)
        pred = set().union(*(h[3] for h in hits)) if hits else set()
        for h in hits:
            if len(h[3]) > 1:
                key_n[h[2]] += 1
                for c in h[3]:
                    key_stats[h[2]][c] += c in g
        for c in g:
            occ[c] += 1
            covered[c] += c in reach
            if c not in reach:
                missed_ngrams[c].update(set(ngrams([t.norm for t in toks[i]])))
        for c in pred:
            predicted[c] += 1
            tp[c] += c in g
    n_occ = sum(occ.values())
    print(f"captions {len(ids)}, gold occurrences {n_occ}")
    coverage = sum(covered.values()) / n_occ
    print(f"coverage (gold CUI has a dictionary string in the caption): {coverage:.4f}")
    auto = [c for c in occ if c not in MANUAL_CUIS]
    n_auto = sum(occ[c] for c in auto)
    print(
        "coverage without the 18 manual modality/region/projection concepts: "
        f"{sum(covered[c] for c in auto) / n_auto:.4f} of {n_auto} occurrences"
    )
    n_pred = sum(predicted.values())
    n_tp = sum(tp.values())
    p = n_tp / n_pred if n_pred else 0.0
    r = n_tp / n_occ
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    print(f"naive longest-match micro P {p:.4f} R {r:.4f} F1 {f1:.4f}")
    print("\n## gold concepts most often unreachable (occurrences missed / total)")
    for c, n in sorted(occ.items(), key=lambda x: -(x[1] - covered[x[0]]))[: args.top]:
        miss = n - covered[c]
        if not miss:
            break
        cand = sorted(
            missed_ngrams[c].items(), key=lambda x: -(x[1] / miss) * math.log(len(ids) / df[x[0]])
        )[:8]
        print(
            f"{c} {names.get(c, '?')!r}: {miss}/{n}  ngrams: "
            + "; ".join(f"{g} {k}/{df[g]}" for g, k in cand)
        )
    print("\n## concepts most often predicted but not gold (FP / predicted)")
    for c, n in sorted(predicted.items(), key=lambda x: -(x[1] - tp[x[0]]))[: args.top]:
        print(f"{c} {names.get(c, '?')!r}: {n - tp[c]}/{n} (gold {occ[c]})")
    print("\n## ambiguous keys that fired (key: CUI gold-share)")
    for k, n in key_n.most_common(args.top):
        print(
            f"{k!r} x{n}: "
            + ", ".join(
                f"{c} {names.get(c, '?')} {key_stats[k][c]}/{n}" for c in sorted(key_stats[k])
            )
        )
    if args.engine:
        engine_report(ids, caps, gold, names, args)
    for c in args.cui:
        print(f"\n## {c} {names.get(c)}")
        for i in ids:
            if c in gold.get(i, ()):
                hits = match(toks[i], caps[i], loose, strict, max_n, longest=False)
                ok = any(c in h[3] for h in hits)
                print(("  + " if ok else "  - ") + caps[i][:220])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
