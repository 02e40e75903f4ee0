"""Concept profiles: a dataset's conventions for a caption's concept set, as data files.

A profile post-processes what the matcher found in one caption. It never matches text itself
beyond spotting its own evidence phrases; everything it knows is in a YAML file under
``conceptsvc/profiles/`` (package data), validated here with ``extra="forbid"`` so that a typo
in a key is an error, not a silently ignored rule. No profile behaviour is written in Python:
this module only interprets the four constructs a file can use.

``disambiguation``
    ``type_preference`` (TUIs, best first) and ``priors`` (CUI → weight) for
    :class:`~conceptsvc.abbreviations.AmbiguityResolver`.
``slots``
    Processed in file order. A slot is a set of member concepts of which at most ``max`` are
    kept, chosen by evidence: a direct mention of the member (``mention_weight``), evidence
    phrases (``terms``, normalised like the index; a term written in capitals must be written in
    capitals in the caption) and evidence concepts (``cuis``), each with a weight. Ties go to
    the lower ``priority``. With no evidence at all, the first ``defaults`` entry whose ``when``
    holds is inferred — a concept without a mention. A slot with ``when`` applies only if one
    of those concepts was kept by an earlier slot (or mentioned); otherwise its members are
    dropped (``without_when: drop``) or only their direct mentions survive (``keep_mentioned``).
``vocabulary``
    If given, every concept outside it is dropped (after the slots).
``drop``
    Concepts always dropped.
``include_hypothetical``
    Whether hypothetical mentions ("rule out pneumonia") count, for requests that leave
    ``ExtractOptions.include_hypothetical`` unset (default true).

ROCOv2's conventions (one modality per image, X-ray region and projection only with Plain x-ray,
the 1,948-concept vocabulary) are ``rocov2.yaml``; ``none.yaml`` keeps everything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from conceptsvc.errors import ExtractionError
from conceptsvc.normalize import normalize_term
from conceptsvc.semantic_network import load_semantic_network

__all__ = [
    "PROFILES_DIR",
    "Profile",
    "ProfileModel",
    "ProfileResult",
    "Slot",
    "available_profiles",
    "load_profile",
    "load_profile_file",
    "register_profile_file",
    "shipped_profiles",
]

PROFILES_DIR = Path(__file__).parent / "profiles"
_CUI_RE = re.compile(r"^C\d{7}$")


def _check_cuis(values: Iterable[str]) -> None:
    bad = [v for v in values if not _CUI_RE.match(v)]
    if bad:
        raise ValueError(f"not CUIs (C + 7 digits): {', '.join(bad[:5])}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvidenceModel(_Strict):
    terms: list[str] = Field(default_factory=list)
    cuis: list[str] = Field(default_factory=list)
    weight: float = Field(default=1.0, gt=0)

    @field_validator("cuis")
    @classmethod
    def _cuis(cls, v: list[str]) -> list[str]:
        _check_cuis(v)
        return v


class MemberModel(_Strict):
    cui: str
    priority: int = 100
    evidence: list[EvidenceModel] = Field(default_factory=list)

    @field_validator("cui")
    @classmethod
    def _cui(cls, v: str) -> str:
        _check_cuis([v])
        return v


class DefaultModel(_Strict):
    cui: str
    when: list[str] = Field(default_factory=list)

    @field_validator("cui")
    @classmethod
    def _cui(cls, v: str) -> str:
        _check_cuis([v])
        return v

    @field_validator("when")
    @classmethod
    def _when(cls, v: list[str]) -> list[str]:
        _check_cuis(v)
        return v


class SlotModel(_Strict):
    name: str
    description: str = ""
    members: list[MemberModel] = Field(min_length=1)
    max: int = Field(default=1, ge=1)
    mention_weight: float = Field(default=2.0, ge=0)
    when: list[str] = Field(default_factory=list)
    without_when: Literal["drop", "keep_mentioned"] = "drop"
    defaults: list[DefaultModel] = Field(default_factory=list)

    @field_validator("when")
    @classmethod
    def _when(cls, v: list[str]) -> list[str]:
        _check_cuis(v)
        return v


class DisambiguationModel(_Strict):
    type_preference: list[str] = Field(default_factory=list)
    priors: dict[str, float] = Field(default_factory=dict)

    @field_validator("type_preference")
    @classmethod
    def _tuis(cls, v: list[str]) -> list[str]:
        sn = load_semantic_network()
        for t in v:
            sn.type(t)  # raises SemanticNetworkError with suggestions
        return v

    @field_validator("priors")
    @classmethod
    def _priors(cls, v: dict[str, float]) -> dict[str, float]:
        _check_cuis(v)
        return v


class ProfileModel(_Strict):
    """The schema of a profile file (see the module docstring)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str
    attribution: str = ""
    disambiguation: DisambiguationModel = Field(default_factory=DisambiguationModel)
    slots: list[SlotModel] = Field(default_factory=list)
    vocabulary: list[str] | None = None
    drop: list[str] = Field(default_factory=list)
    include_hypothetical: bool = True

    @field_validator("vocabulary")
    @classmethod
    def _vocab(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            _check_cuis(v)
        return v

    @field_validator("drop")
    @classmethod
    def _drop(cls, v: list[str]) -> list[str]:
        _check_cuis(v)
        return v


class ProfileResult(NamedTuple):
    """What a profile kept: the CUIs whose mentions survive, and inferred CUIs (no mention)."""

    kept: set[str]
    inferred: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Slot:
    """One compiled slot of a profile (:attr:`Profile.slots`), in the terms of the file format
    (module docstring): ``cui_evidence`` is (evidence CUI, member, weight)."""

    name: str
    members: tuple[str, ...]
    member_set: frozenset[str]
    priority: Mapping[str, int]
    max: int
    mention_weight: float
    when: frozenset[str]
    keep_mentioned: bool
    defaults: tuple[tuple[str, frozenset[str]], ...]
    cui_evidence: tuple[tuple[str, str, float], ...]  # (evidence cui, member, weight)

    @property
    def labels(self) -> tuple[str, ...]:
        """Every concept the slot can report: its members, then its defaults not among them,
        in the file's order."""
        return tuple(dict.fromkeys((*self.members, *(d for d, _ in self.defaults))))


class Profile:
    """A validated, compiled profile; immutable and safe to share between threads.

    The compiled engine's ``ProfileRunner`` runs :meth:`apply` itself and reads the profile
    through its public attributes: :attr:`slots`, :attr:`phrase_table`, :attr:`vocabulary`,
    :attr:`drop`.
    """

    def __init__(self, model: ProfileModel) -> None:
        self.model = model
        self.name = model.name
        self.type_preference: tuple[str, ...] = tuple(model.disambiguation.type_preference)
        self.priors: Mapping[str, float] = dict(model.disambiguation.priors)
        self.vocabulary: frozenset[str] | None = (
            frozenset(model.vocabulary) if model.vocabulary is not None else None
        )
        self.drop: frozenset[str] = frozenset(model.drop)
        self.include_hypothetical: bool = model.include_hypothetical
        slots: list[Slot] = []
        # evidence phrase → [(slot index, member, weight, needs capitals)]
        phrases: dict[tuple[str, ...], list[tuple[int, str, float, bool]]] = {}
        names: set[str] = set()
        for si, s in enumerate(model.slots):
            if s.name in names:
                raise ExtractionError(f"profile {model.name}: slot {s.name!r} is defined twice")
            names.add(s.name)
            members = tuple(m.cui for m in s.members)
            if len(set(members)) != len(members):
                raise ExtractionError(f"profile {model.name}: slot {s.name!r} repeats a member")
            cui_ev: list[tuple[str, str, float]] = []
            for m in s.members:
                for ev in m.evidence:
                    for term in ev.terms:
                        key = normalize_term(term)
                        if not key:
                            raise ExtractionError(
                                f"profile {model.name}: evidence term {term!r} of {m.cui} "
                                "normalises to nothing"
                            )
                        phrases.setdefault(tuple(key.split(" ")), []).append(
                            (si, m.cui, ev.weight, term.isupper())
                        )
                    cui_ev.extend((c, m.cui, ev.weight) for c in ev.cuis)
            slots.append(
                Slot(
                    name=s.name,
                    members=members,
                    member_set=frozenset(members),
                    priority={m.cui: m.priority for m in s.members},
                    max=s.max,
                    mention_weight=s.mention_weight,
                    when=frozenset(s.when),
                    keep_mentioned=s.without_when == "keep_mentioned",
                    defaults=tuple((d.cui, frozenset(d.when)) for d in s.defaults),
                    cui_evidence=tuple(cui_ev),
                )
            )
        self._slots = tuple(slots)
        # Phrase-prefix table: every token-prefix of an evidence phrase → its targets, or ()
        # when the prefix is not a phrase itself; one dict probe per token, as in the matcher.
        table: dict[str, tuple[tuple[int, str, float, bool], ...]] = {}
        for ph, targets in phrases.items():
            table[" ".join(ph)] = tuple(targets)
        for ph in phrases:
            for k in range(1, len(ph)):
                table.setdefault(" ".join(ph[:k]), ())
        self._phrases = table
        # True when applying the profile can change nothing (the ``none`` profile).
        self.is_identity: bool = not self._slots and self.vocabulary is None and not self.drop

    @property
    def inferable(self) -> frozenset[str]:
        """Every concept :meth:`apply` can infer: the slots' members and defaults."""
        return frozenset(c for s in self._slots for c in s.labels)

    @property
    def slots(self) -> tuple[Slot, ...]:
        """The slots, in the file's order (the order :meth:`apply` decides them in)."""
        return self._slots

    @property
    def phrase_table(self) -> Mapping[str, tuple[tuple[int, str, float, bool], ...]]:
        """Every evidence phrase (normalised tokens joined by spaces) and every token-prefix of
        one → its targets (slot index, member, weight, written in capitals only), or ``()``
        for a prefix that is not a phrase itself."""
        return self._phrases

    def _evidence_scores(
        self, text: str, norms: Sequence[str], starts: Sequence[int], ends: Sequence[int]
    ) -> dict[int, dict[str, float]]:
        """Per slot, member → summed weight of the distinct evidence phrases in the caption."""
        scores: dict[int, dict[str, float]] = {}
        seen: set[str] = set()
        get = self._phrases.get
        n = len(norms)
        for i in range(n):
            key = norms[i]
            targets = get(key)
            j = i + 1
            while targets is not None:
                if targets and key not in seen:
                    seen.add(key)
                    upper: bool | None = None
                    for si, cui, w, needs_upper in targets:
                        if needs_upper:
                            if upper is None:
                                upper = text[starts[i] : ends[j - 1]].isupper()
                            if not upper:
                                continue
                        slot_scores = scores.get(si)
                        if slot_scores is None:
                            scores[si] = {cui: w}
                        else:
                            slot_scores[cui] = slot_scores.get(cui, 0.0) + w
                if j >= n:
                    break
                key = key + " " + norms[j]
                targets = get(key)
                j += 1
        return scores

    def apply(
        self,
        mentioned: Sequence[str],
        text: str,
        norms: Sequence[str],
        starts: Sequence[int],
        ends: Sequence[int],
    ) -> ProfileResult:
        """Apply the profile to one caption's mentioned CUIs (in order of first mention)."""
        present = set(mentioned)
        inferred: list[str] = []
        evidence = self._evidence_scores(text, norms, starts, ends) if self._phrases else {}
        for si, slot in enumerate(self._slots):
            members = slot.member_set
            if slot.when and present.isdisjoint(slot.when):
                if not slot.keep_mentioned and not present.isdisjoint(members):
                    present -= members
                if inferred:
                    inferred = [c for c in inferred if c not in members]
                continue
            score = evidence.get(si)
            score = dict(score) if score else {}
            for c in present & members:
                score[c] = score.get(c, 0.0) + slot.mention_weight
            for ev, c, w in slot.cui_evidence:
                if ev in present:
                    score[c] = score.get(c, 0.0) + w
            if len(score) > 1:
                chosen = sorted(
                    (c for c, v in score.items() if v > 0),
                    key=lambda c: (-score[c], slot.priority[c]),
                )[: slot.max]
            else:
                chosen = [c for c, v in score.items() if v > 0]
            if not chosen:
                for cui, when in slot.defaults:
                    if not when or not present.isdisjoint(when):
                        chosen = [cui]
                        break
            present -= members
            if inferred:
                inferred = [c for c in inferred if c not in members]
            for c in chosen:
                if c not in present:
                    present.add(c)
                    if c not in mentioned:
                        inferred.append(c)
        if self.vocabulary is not None:
            present &= self.vocabulary
        if self.drop:
            present -= self.drop
        inferred_kept = tuple(c for c in inferred if c in present) if inferred else ()
        return ProfileResult(present, inferred_kept)


def load_profile_file(path: str | Path) -> Profile:
    """Read and validate one profile file."""
    p = Path(path)
    try:
        # yaml.safe_load with libyaml's C safe loader when present (8× faster on the
        # 4,500-line rocov2 profile); only the Safe loaders are ever used.
        loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        loader = loader_cls(p.read_text(encoding="utf-8"))
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except (OSError, yaml.YAMLError) as exc:
        raise ExtractionError(f"profile {p}: cannot read it ({exc})") from exc
    try:
        model = ProfileModel.model_validate(raw)
    except ValidationError as exc:
        raise ExtractionError(
            f"profile {p} is invalid: {exc.error_count()} problem(s):\n{exc}"
        ) from exc
    if model.name != p.stem:
        raise ExtractionError(
            f"profile {p}: its name {model.name!r} must equal the file name {p.stem!r}"
        )
    return Profile(model)


# Profiles of the user's own files, by name, with the file each came from. A process registers
# them before it makes its extractors (`serve --profile-files`, a CLI `--profile FILE.yaml`),
# as shipped profiles are parsed once per process; an Extractor knows the profiles there were
# when it was made.
_REGISTERED: dict[str, tuple[Path, Profile]] = {}


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped with the package."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def available_profiles() -> list[str]:
    """Names of the profiles this process can use: the shipped ones and those registered from
    the user's files (:func:`register_profile_file`)."""
    return sorted({*shipped_profiles(), *_REGISTERED})


def register_profile_file(path: str | Path) -> Profile:
    """Read, validate and register a profile file of one's own (its ``name`` is its file name
    without ``.yaml``), so that requests can name it as they name a shipped profile. The same
    file again is a no-op; another file of the same name, or a shipped profile's name, is an
    :class:`ExtractionError`."""
    p = Path(path).resolve()
    profile = load_profile_file(p)
    if profile.name in shipped_profiles():
        raise ExtractionError(
            f"profile file {p} is named {profile.name!r}, as a shipped profile is; give it "
            "another name (its file name and its name: field)"
        )
    held = _REGISTERED.get(profile.name)
    if held is not None and held[0] != p:
        raise ExtractionError(
            f"two profile files are named {profile.name!r}: {held[0]} and {p}; rename one"
        )
    _REGISTERED[profile.name] = (p, profile)
    return profile


def load_profile(name: str) -> Profile:
    """A profile by name: a registered one, else a shipped one (parsed once per process)."""
    held = _REGISTERED.get(name)
    return held[1] if held is not None else _shipped_profile(name)


@cache
def _shipped_profile(name: str) -> Profile:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name) or name not in shipped_profiles():
        raise ExtractionError(
            f"unknown profile {name!r}; profiles: {', '.join(available_profiles())} (a profile "
            "file of your own: --profile FILE.yaml with --local, `serve --profile-files`)"
        )
    return load_profile_file(PROFILES_DIR / f"{name}.yaml")
