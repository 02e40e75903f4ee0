from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import spacy

import conceptsvc.spacy_component  # noqa: F401  (registers the factory in this process)
from conceptsvc.errors import ExtractionError


def test_spacy_component_spans_and_ents(engine_index_path: Path) -> None:
    nlp = spacy.blank("en")
    nlp.add_pipe("conceptsvc", config={"index_path": str(engine_index_path), "overlap": "all"})
    doc = nlp("Known lung cancer; no pleural effusion.")
    spans = {(s.text, s._.cui) for s in doc.spans["conceptsvc"]}
    assert spans == {
        ("lung cancer", "C0242379"),
        ("lung", "C0024109"),
        ("pleural effusion", "C0032227"),
    }
    effusion = next(s for s in doc.spans["conceptsvc"] if s._.cui == "C0032227")
    assert effusion._.negated is True
    assert effusion._.score == 1.0
    assert effusion._.semantic_types == ("T047", "T033")
    assert effusion._.preferred_name == "Pleural effusion disorder"
    assert effusion.label_ == "C0032227" and effusion.kb_id_ == "C0032227"
    # ents cannot overlap: the longer "lung cancer" wins over "lung"
    assert [(e.text, e.label_) for e in doc.ents] == [
        ("lung cancer", "C0242379"),
        ("pleural effusion", "C0032227"),
    ]
    assert set(doc._.conceptsvc_concepts) == {"C0242379", "C0024109", "C0032227"}


def test_spacy_component_offsets_expand_to_tokens(engine_index_path: Path) -> None:
    nlp = spacy.blank("en")
    nlp.add_pipe("conceptsvc", config={"index_path": str(engine_index_path)})
    doc = nlp("CT-scan of the thorax.")
    assert [(s.text, s._.cui) for s in doc.spans["conceptsvc"]] == [
        ("CT-scan", "C0040405"),
        ("thorax", "C0817096"),
    ]


def test_spacy_component_profile_and_filters(engine_index_path: Path) -> None:
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "conceptsvc",
        config={"index_path": str(engine_index_path), "semantic_groups": ["ANAT"]},
    )
    doc = nlp("CT of the chest: lung cancer.")
    assert {s._.cui for s in doc.spans["conceptsvc"]} == {"C0817096", "C0024109"}


def test_spacy_component_rejects_bad_options_at_build(engine_index_path: Path) -> None:
    nlp = spacy.blank("en")
    with pytest.raises(ExtractionError):
        nlp.add_pipe("conceptsvc", config={"index_path": str(engine_index_path), "mode": "fuzzy"})


def test_spacy_component_entry_point(engine_index_path: Path) -> None:
    """A fresh interpreter that never imports conceptsvc finds the factory through the
    spacy_factories entry point (spaCy imports the module for us)."""
    code = (
        "import spacy\n"
        "nlp = spacy.blank('en')\n"
        f"nlp.add_pipe('conceptsvc', config={{'index_path': {str(engine_index_path)!r}}})\n"
        "doc = nlp('MRI of the abdomen')\n"
        "print([s._.cui for s in doc.spans['conceptsvc']])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "['C0024485', 'C0000726']"


def test_spacy_component_without_spacy_is_a_coded_error() -> None:
    """spaCy is an extra: without it the service still imports, and this module says what to
    install instead of a bare ModuleNotFoundError (a None entry in sys.modules blocks spacy)."""
    code = (
        "import sys; sys.modules['spacy'] = None\n"
        "import conceptsvc.extractor, conceptsvc.server.app, conceptsvc.dictionary\n"
        "from conceptsvc.errors import ConfigError\n"
        "try:\n"
        "    import conceptsvc.spacy_component\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("[E100] the spaCy component needs spaCy")
    assert "pip install 'conceptsvc[spacy]'" in out.stdout


def test_issue_17_spacy_component_context_extensions(engine_index_path: Path) -> None:
    nlp = spacy.blank("en")
    nlp.add_pipe("conceptsvc", config={"index_path": str(engine_index_path)})
    doc = nlp("Family history of lung cancer. Rule out pleural effusion. History of lung cancer.")
    got = [(s.text, s._.negated, s._.hypothetical, s._.historical, s._.experiencer)
           for s in doc.spans["conceptsvc"]]
    assert got == [
        ("lung cancer", False, False, False, "other"),
        ("pleural effusion", False, True, False, "patient"),
        ("lung cancer", False, False, True, "patient"),
    ]
    strict = spacy.blank("en")
    strict.add_pipe("conceptsvc", config={"index_path": str(engine_index_path),
                                          "include_hypothetical": False})
    assert [s.text for s in strict("Rule out pleural effusion.").spans["conceptsvc"]] == []


def test_spacy_component_spans_on_the_same_characters_keep_their_own_values() -> None:
    """spaCy keys span extensions by characters alone: two concepts on one phrase
    (``overlap="all"``), or two mentions widened onto one token ("uterus)MRI"), must still
    read each its own values."""
    nlp = spacy.blank("en")
    nlp.add_pipe("conceptsvc", config={"overlap": "all"})
    doc = nlp("Left eye.")
    eye = [s for s in doc.spans["conceptsvc"] if s.text == "eye"]
    assert {s.label_ for s in eye} == {"C0015392", "C1280202"}
    for span in doc.spans["conceptsvc"]:
        assert span._.cui == span.label_
    assert {s.label_: s._.preferred_name for s in eye} == {
        "C0015392": "Eye", "C1280202": "Entire eye",
    }
    widened = spacy.blank("en")
    widened.add_pipe("conceptsvc")
    doc = widened("T2 of the uterus)MRI.")
    spans = [s for s in doc.spans["conceptsvc"] if s.text == "uterus)MRI"]
    assert len(spans) == 2
    assert [s._.cui for s in spans] == [s.label_ for s in spans]
    # a span made elsewhere on the same characters reads the defaults, not our values
    other = doc.char_span(spans[0].start_char, spans[0].end_char, label="OTHER")
    assert other is not None and other._.cui is None and other._.semantic_types == ()
    # the same concept twice in one token ("CT.CT") is one span
    doc = widened("CT.CT")
    assert [(s.text, s._.cui) for s in doc.spans["conceptsvc"]] == [("CT.CT", "C0040405")]


def test_spacy_component_values_survive_serialisation(tmp_path: Path) -> None:
    from spacy.tokens import Doc, DocBin

    nlp = spacy.blank("en")
    nlp.add_pipe("conceptsvc", config={"overlap": "all"})
    doc = nlp("Left eye: no pleural effusion.")
    expected = [(s.label_, s._.cui, s._.preferred_name, s._.semantic_types, s._.negated)
                for s in doc.spans["conceptsvc"]]
    assert isinstance(doc._.conceptsvc_concepts, tuple)
    copies = [
        Doc(nlp.vocab).from_bytes(doc.to_bytes()),
        next(iter(DocBin(store_user_data=True, docs=[doc]).get_docs(nlp.vocab))),
    ]
    for copy in copies:
        got = [(s.label_, s._.cui, s._.preferred_name, s._.semantic_types, s._.negated)
               for s in copy.spans["conceptsvc"]]
        assert got == expected
        assert copy._.conceptsvc_concepts == doc._.conceptsvc_concepts
    # the pipeline itself: saved and loaded again, the same spans and values
    nlp.to_disk(tmp_path / "pipeline")
    loaded = spacy.load(tmp_path / "pipeline")
    again = loaded("Left eye: no pleural effusion.")
    assert [(s.label_, s._.cui, s._.preferred_name, s._.semantic_types, s._.negated)
            for s in again.spans["conceptsvc"]] == expected


def test_spacy_component_pickles_as_its_configuration(engine_index_path: Path) -> None:
    import pickle

    nlp = spacy.blank("en")
    nlp.add_pipe("conceptsvc", config={"index_path": str(engine_index_path), "overlap": "all"})
    copy = pickle.loads(pickle.dumps(nlp))  # noqa: S301  (our own bytes, this process)
    text = "Known lung cancer; no pleural effusion."
    got, want = copy(text), nlp(text)
    assert [(s.label_, s._.cui, s._.negated) for s in got.spans["conceptsvc"]] == [
        (s.label_, s._.cui, s._.negated) for s in want.spans["conceptsvc"]
    ]
    component = copy.get_pipe("conceptsvc")
    assert component.options == nlp.get_pipe("conceptsvc").options
    assert component.extractor.index.path == engine_index_path


def test_spacy_component_pipe_in_worker_processes(engine_index_path: Path) -> None:
    """nlp.pipe(n_process=2) under spawn (the pipeline is pickled) and fork gives the docs
    in-process annotation gives, with the same types (tuples, not msgpack's lists)."""
    code = (
        "import multiprocessing as mp, spacy\n"
        "nlp = spacy.blank('en')\n"
        f"nlp.add_pipe('conceptsvc', config={{'index_path': {str(engine_index_path)!r}}})\n"
        "texts = ['Known lung cancer; no pleural effusion.', 'CT of the thorax.'] * 2\n"
        "def seen(docs):\n"
        "    return [(type(d._.conceptsvc_concepts).__name__, d._.conceptsvc_concepts,\n"
        "             [(s.label_, s._.cui, s._.semantic_types, s._.negated)\n"
        "              for s in d.spans['conceptsvc']]) for d in docs]\n"
        "want = seen(nlp.pipe(texts))\n"
        "for method in ('spawn', 'fork'):\n"
        "    mp.set_start_method(method, force=True)\n"
        "    assert seen(nlp.pipe(texts, n_process=2, batch_size=1)) == want, method\n"
        "print(want[0][0], len(want))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["tuple", "4"]
