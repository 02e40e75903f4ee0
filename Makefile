# conceptsvc — every step a fresh machine needs lives here (CI runs `make test` via .ci/run).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The compiled hot path, built in place by the editable install (its file name carries the
# interpreter's ABI tag, e.g. conceptsvc/_speedups.cpython-311-x86_64-linux-gnu.so).
EXT_SUFFIX := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)
SPEEDUPS := conceptsvc/_speedups$(EXT_SUFFIX)
# The annotation wire writer (conceptsvc/_wire.pyx), a second, small extension.
WIRE_EXT := conceptsvc/_wire$(EXT_SUFFIX)
# Approximate matching's compiled search (conceptsvc/_approx.pyx, C++), a third extension.
APPROX := conceptsvc/_approx$(EXT_SUFFIX)

.PHONY: install test lint demo bench bench-index bench-umls bench-peers bench-context peers context-peer scispacy-reference soak proto audit lock clean system-deps

# Debian packages the build and the tests need (gcc and Python's headers for the compiled
# extension, conceptsvc/_speedups.pyx, and QuickUMLS; redis-server for the real Redis tier;
# chromium, in which tests/test_html_page.py opens the HTML pages). Installed only if missing.
system-deps:
	@command -v gcc >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 || { \
	  echo "gcc/g++ not found: installing Debian's gcc and g++ (conceptsvc/_speedups.pyx and _approx.pyx are compiled)"; \
	  (apt-get update -qq && apt-get install -y -qq gcc g++ libc6-dev >/dev/null) || \
	  { echo "ERROR: could not install gcc; building conceptsvc needs a C compiler" >&2; exit 1; }; }
	@! command -v $(PYTHON) >/dev/null 2>&1 || \
	  $(PYTHON) -c 'import pathlib, sys, sysconfig; sys.exit(not (pathlib.Path(sysconfig.get_path("include")) / "Python.h").is_file())' || { \
	  echo "Python.h not found: installing Debian's $(notdir $(PYTHON))-dev (headers for the compiled extension)"; \
	  (apt-get update -qq && apt-get install -y -qq $(notdir $(PYTHON))-dev >/dev/null) || \
	  { echo "ERROR: could not install $(notdir $(PYTHON))-dev; building conceptsvc needs Python's headers" >&2; exit 1; }; }
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server not found: installing Debian's redis-server package"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || \
	  { echo "ERROR: could not install redis-server; the Redis tests need it" >&2; exit 1; }; }
	@command -v java >/dev/null 2>&1 || { \
	  echo "java not found: installing Debian's openjdk-17-jre-headless (PySpark tests)"; \
	  (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null) || \
	  { echo "ERROR: could not install openjdk-17-jre-headless; the Spark tests need Java 17" >&2; exit 1; }; }
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "chromium not found: installing Debian's chromium (the HTML page tests render in it)"; \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  { echo "ERROR: could not install chromium; tests/test_html_page.py needs a real browser" >&2; exit 1; }; }

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "ERROR: $(PYTHON) not found" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	@# Exactly the tested dependency set (extras dev, report, spark, spacy, quickumls), every file
	@# checked against the lock's hashes; then conceptsvc itself, which adds nothing (--no-deps).
	@# The quickumls extra compiles leveldb and simstring with gcc: about 100 s more on a fresh
	@# 2-core machine.
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	@# The editable install compiles conceptsvc/_speedups.pyx (Cython from the lock, gcc).
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Editing the .pyx or setup.py rebuilds the extension on the next install (test, demo, ...), so
# that a stale .so never runs; the generated C file goes too, so Cython regenerates it. The venv
# is order-only: its install has just built the extension.
$(SPEEDUPS): conceptsvc/_speedups.pyx setup.py | $(STAMP)
	rm -f $@ conceptsvc/_speedups.c
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .

$(WIRE_EXT): conceptsvc/_wire.pyx setup.py | $(STAMP)
	rm -f $@ conceptsvc/_wire.c
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .

$(APPROX): conceptsvc/_approx.pyx setup.py | $(STAMP)
	rm -f $@ conceptsvc/_approx.cpp
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .

install: system-deps $(STAMP) $(SPEEDUPS) $(WIRE_EXT) $(APPROX)

proto: $(STAMP)
	$(PY) -m tools.gen_proto

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check conceptsvc tests scripts benchmarks tools
	$(VENV)/bin/mypy conceptsvc benchmarks tools

demo: install
	$(PY) -m conceptsvc.demo

bench: install peers context-peer
	$(PY) -m benchmarks.bench all

bench-index: install peers
	$(PY) -m benchmarks.bench index

# A full UMLS release beside the demo dictionary (issue 13): a realistic and a stress synthetic
# release of UMLS_ROWS MRCONSO rows, kept in UMLS_BENCH_DATA between runs (regenerated only when
# the generator or its parameters change), each built merged with the demo dictionary and
# measured (build, exact, service, guarded approximate, quality) beside the demo index; replaces
# its section of BENCHMARKS.md. For a quick check of the harness: make bench-umls UMLS_ROWS=200000
UMLS_BENCH_DATA ?= bench-out/umls
UMLS_ROWS       ?= 16000000
UMLS_VARIANTS   ?= realistic,stress
bench-umls: install
	$(PY) -m benchmarks.bench umls --rows $(UMLS_ROWS) --variants $(UMLS_VARIANTS) \
	  --data $(UMLS_BENCH_DATA) --write BENCHMARKS.md

# Peer tools for the benchmarks (QuickUMLS, MedCAT, mmlite) in their own venv, so that their
# pins never meet ours; conceptsvc goes in with --no-deps, for benchmarks/peers/ to import. The
# peer scripts themselves are not installed: they run from this checkout (python -m from its root).
PEERS_VENV  ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_REQS  := benchmarks/peers/requirements.txt

$(PEERS_STAMP): $(PEERS_REQS)
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "ERROR: $(PYTHON) not found" >&2; exit 1; }
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip wheel setuptools
	$(PEERS_VENV)/bin/python -m pip install -q -r $(PEERS_REQS)
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

bench-peers: install peers
	$(PY) -m benchmarks.bench peers

# medspaCy's ConText, the peer of the negation and temporality benchmark (issue 17), in a venv
# of its own that never contains QuickUMLS: medspacy declares medspacy_quickumls, whose module is
# also named quickumls, so medspacy goes in with --no-deps after the rest of its requirements
# (benchmarks/context_peer/requirements.txt without its medspacy line). conceptsvc is not
# installed there: the driver needs only the standard library from this checkout.
CONTEXT_VENV  ?= .venv-context
CONTEXT_STAMP := $(CONTEXT_VENV)/.installed
CONTEXT_REQS  := benchmarks/context_peer/requirements.txt

$(CONTEXT_STAMP): $(CONTEXT_REQS)
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "ERROR: $(PYTHON) not found" >&2; exit 1; }
	$(PYTHON) -m venv $(CONTEXT_VENV)
	$(CONTEXT_VENV)/bin/python -m pip install -q --upgrade pip wheel setuptools
	sed '/^medspacy==/d' $(CONTEXT_REQS) > $(CONTEXT_VENV)/requirements-deps.txt
	$(CONTEXT_VENV)/bin/python -m pip install -q -r $(CONTEXT_VENV)/requirements-deps.txt
	$(CONTEXT_VENV)/bin/python -m pip install -q --no-deps $$(grep '^medspacy==' $(CONTEXT_REQS))
	@$(CONTEXT_VENV)/bin/python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("quickumls") is not None)' || \
	  { echo "ERROR: $(CONTEXT_VENV) contains a quickumls module; it must not" >&2; exit 1; }
	touch $(CONTEXT_STAMP)

context-peer: $(CONTEXT_STAMP)

# Negation and temporality on ../shared/data/negation/negex_annotations_dev.tsv, conceptsvc and
# medspaCy's ConText in the same run; replaces the section of BENCHMARKS.md.
bench-context: install context-peer
	$(PY) -m benchmarks.bench context --write BENCHMARKS.md

# scispacy as the reference for abbreviation definitions and the scispacy KB reader
# (scripts/scispacy_reference/compare.py; results in BENCHMARKS.md), in a venv of its own:
# scispacy 0.6.2 requires numpy<2, our lock pins numpy 2. conceptsvc is imported from the
# checkout, not installed there: installed, its spacy_factories entry point would make spaCy
# import the whole engine, whose dependencies that venv does not have.
SCISPACY_VENV  ?= .venv-scispacy
SCISPACY_STAMP := $(SCISPACY_VENV)/.installed
SCISPACY_REQS  := scripts/scispacy_reference/requirements.txt

$(SCISPACY_STAMP): $(SCISPACY_REQS)
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "ERROR: $(PYTHON) not found" >&2; exit 1; }
	$(PYTHON) -m venv $(SCISPACY_VENV)
	$(SCISPACY_VENV)/bin/python -m pip install -q --upgrade pip wheel setuptools
	$(SCISPACY_VENV)/bin/python -m pip install -q -r $(SCISPACY_REQS)
	touch $(SCISPACY_STAMP)

scispacy-reference: $(SCISPACY_STAMP)
	PYTHONPATH=$(CURDIR) $(SCISPACY_VENV)/bin/python scripts/scispacy_reference/compare.py

# 32 streaming clients for 5 minutes against 2 workers, then one client cycling through distinct
# 9,999-CUI option sets for 2 minutes against 1 worker; the figures go into RELIABILITY.md.
soak: install
	$(PY) -m benchmarks.soak --write RELIABILITY.md
	$(PY) -m benchmarks.soak --scenario option-sets --write RELIABILITY.md

audit: install
	$(PY) -m tools.audit

# Regenerate requirements.lock after changing dependencies in pyproject.toml (needs PyPI).
lock: install
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	  --extra dev --extra report --extra spark --extra spacy --extra quickumls --extra parquet \
	  --no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) $(PEERS_VENV) $(CONTEXT_VENV) $(SCISPACY_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	rm -f conceptsvc/_speedups.c conceptsvc/_wire.c conceptsvc/_approx.cpp conceptsvc/_speedups.html conceptsvc/_wire.html conceptsvc/_approx.html conceptsvc/*.so
