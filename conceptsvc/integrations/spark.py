"""Annotate a Spark DataFrame column of captions with conceptsvc, at cluster scale.

When a corpus outgrows one machine it usually already lives in Spark, so the scale-out path is
a DataFrame transformation rather than a new scheduler: :func:`annotate_dataframe` adds a
``concepts`` column (``array<string>``, the caption's deduplicated CUIs) and, unless asked not
to, a ``mentions`` column (``array<struct<cui, preferred_name, text, start, end, score,
semantic_types, source, negated, hypothetical, historical, experiencer>>``, :data:`MENTION_FIELDS`;
offsets are code-point offsets into the caption) to any
DataFrame with a caption column. The work runs in ``mapInPandas``: Arrow batches of rows, one
Python call per batch.

Executors get the engine one of two ways:

* **In-process** (the default): every executor's Python worker loads the compiled index once
  and runs :class:`~conceptsvc.extractor.Extractor` itself. The index is either *shipped* by
  Spark (``SparkContext.addFile(dir, recursive=True)``, resolved on the executor with
  ``SparkFiles.get``; fine for indexes up to a few hundred MB; it goes out as a directory
  named by its content hash, hard-linked into a driver temp directory, so several indexes, or
  one rebuilt in place, can be used in one session) or read from a path every
  executor can see (``ship_index=False``: NFS, a cloud volume, a Databricks volume — the right
  choice for a full UMLS index). No service to run; throughput scales with executor cores.
* **Service** (``target="dns:///conceptsvc-headless.ns.svc.cluster.local:50051"``): executors
  send their batches, one ``AnnotateBatch`` message each (more where one would pass the
  client's message limit: :meth:`~conceptsvc.client.ConceptClient.annotate_batch` splits it),
  to conceptsvc replicas with
  client-side round-robin, sharing the service's Redis cache. Use it when a service already
  runs next to the cluster, or to keep index memory off the executors.

Both give the results the CLI gives for the same index and options (``tests/test_spark.py``
checks that on the demo captions).

Trade-offs, candidly: the in-process mode loads the index once per executor *Python worker*
(Spark reuses workers across tasks by default, ``spark.python.worker.reuse``), so each worker
pays the load time and its memory; the service mode pays a network round trip per batch and
needs the service sized for the cluster's request rate. Spark serialises the task closure with
cloudpickle — that is PySpark's own mechanism between the driver and its executors; only the
plain, frozen :class:`_Plan` below travels in it, never client input.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conceptsvc.errors import ClientError, ConceptIndexError, ConfigError
from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex
from conceptsvc.model import Annotation, ExtractOptions

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame
    from pyspark.sql.types import StructType

    from conceptsvc.client import ConceptClient

__all__ = ["MENTION_FIELDS", "annotate_dataframe", "output_schema"]

log = logging.getLogger(__name__)

# The mention struct's fields, in order, with their Spark SQL types.
MENTION_FIELDS: tuple[tuple[str, str], ...] = (
    ("cui", "string"),
    ("preferred_name", "string"),
    ("text", "string"),
    ("start", "int"),
    ("end", "int"),
    ("score", "double"),
    ("semantic_types", "array<string>"),
    ("source", "string"),
    ("negated", "boolean"),
    ("hypothetical", "boolean"),
    ("historical", "boolean"),
    ("experiencer", "string"),
)


def _require_pyspark() -> None:
    missing = [name for name in ("pyspark", "pyarrow", "pandas") if find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"the Spark integration needs PySpark, pyarrow and pandas ({', '.join(missing)} "
            "missing); install them with `pip install 'conceptsvc[spark]'`"
        )


@dataclass(frozen=True)
class _Plan:
    """Everything an executor needs, as plain data (it travels in Spark's task closure)."""

    text_col: str
    concepts_col: str
    mentions_col: str | None
    options: ExtractOptions | None  # None: the service's defaults (service mode only)
    # In-process engine: a SparkFiles name (shipped) or a path every executor can read, and
    # the content hash of the index the driver checked.
    shipped_name: str | None = None
    index_path: str | None = None
    index_hash: str | None = None
    # Service: a gRPC target (``host:port`` or ``dns:///name:port``) and how to call it.
    target: str | None = None
    token: str | None = None
    timeout_seconds: float = 60.0
    batch_size: int = 256


# One Extractor per executor Python worker and index (path and content hash: an index rebuilt
# in place is another index): Spark reuses workers across tasks, and loading (and
# hash-verifying) an index per batch would dominate the run time.
_EXTRACTORS: dict[tuple[str, str | None], Extractor] = {}
_EXTRACTORS_LOCK = threading.Lock()

# Driver side: the directories shipped with addFile, by index content hash. SparkFiles names a
# shipped directory by its base name, and a session refuses a second, different directory of
# the same name ("exists and does not match contents"): each index goes out as a directory
# named by its content hash, linked (or copied) into a staging directory once per driver
# process, so two indexes — or one rebuilt in place — can be used in one session.
_STAGED: dict[str, Path] = {}
_STAGE_PREFIX = "conceptsvc-index-"


def _staged_index(path: Path, content_hash: str) -> Path:
    """A directory named for ``content_hash`` holding the index at ``path``'s files."""
    with _EXTRACTORS_LOCK:
        staged = _STAGED.get(content_hash)
        if staged is not None and staged.is_dir():
            return staged
        root = Path(tempfile.mkdtemp(prefix="conceptsvc-spark-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)  # our own directory
        staged = root / f"{_STAGE_PREFIX}{content_hash[:32]}"
        staged.mkdir()
        for item in path.iterdir():
            if not item.is_file():
                continue
            try:
                os.link(item, staged / item.name)  # no copy on the same file system
            except OSError:
                shutil.copy2(item, staged / item.name)
        _STAGED[content_hash] = staged
        return staged


def _local_extractor(plan: _Plan) -> Extractor:
    if plan.shipped_name is not None:
        from pyspark import SparkFiles

        path = SparkFiles.get(plan.shipped_name)
    elif plan.index_path is not None:
        path = plan.index_path
    else:
        raise ConfigError("internal: an in-process plan names no index")
    with _EXTRACTORS_LOCK:
        extractor = _EXTRACTORS.get((path, plan.index_hash))
        if extractor is None:
            index = ConceptIndex.load(path, verify=True)
            if plan.index_hash is not None and index.content_hash != plan.index_hash:
                raise ConceptIndexError(
                    f"{path}: the executor found index {index.content_hash[:12]}, not the "
                    f"{plan.index_hash[:12]} the driver planned the job with (rebuilt while the "
                    "job ran?); run the job again"
                )
            extractor = Extractor(index)
            _EXTRACTORS[(path, plan.index_hash)] = extractor
            log.info("executor loaded index %s (%s)", path, index.content_hash[:12])
    return extractor


def _shipped_names(context: Any) -> set[str]:
    """The base names of what ``context`` has shipped with addFile (its ``listFiles``)."""
    return {uri.rstrip("/").rsplit("/", 1)[-1] for uri in getattr(context, "listFiles", ())}


def _annotator(plan: _Plan) -> Callable[[Sequence[str]], list[Annotation]]:
    """A function that annotates a list of captions, in order, the way ``plan`` says."""
    if plan.target is None:
        extractor = _local_extractor(plan)
        options = plan.options or ExtractOptions()
        return lambda texts: [extractor.extract(t, options) for t in texts]
    return _service_annotator(plan)


# One client (one channel, connections to every replica) per executor Python worker and target.
_CLIENTS: dict[tuple[str, str | None], ConceptClient] = {}


def _service_annotator(plan: _Plan) -> Callable[[Sequence[str]], list[Annotation]]:
    from conceptsvc.client import ConceptClient

    if plan.target is None:
        raise ConfigError("internal: a service plan names no target")
    target = plan.target
    with _EXTRACTORS_LOCK:
        client = _CLIENTS.get((target, plan.token))
        if client is None:
            # round_robin: a dns:/// name resolves to every replica and batches spread over
            # them; the client's own retries move a batch off a replica that goes away.
            client = ConceptClient(target, token=plan.token, round_robin=True)
            _CLIENTS[(target, plan.token)] = client

    def annotate(texts: Sequence[str]) -> list[Annotation]:
        # Positional ids: the DataFrame's own id column need not be unique or a string.
        results: list[Annotation | None] = [None] * len(texts)
        items = [(str(i), t) for i, t in enumerate(texts)]
        # One AnnotateBatch message per chunk (batch_size captions), not one per caption; the
        # client splits a chunk whose request would pass its message limit.
        for result in client.annotate_batch(
            items, options=plan.options, timeout=plan.timeout_seconds
        ):
            if result.error is not None or result.annotation is None:
                error = result.error
                raise ClientError(
                    f"the service at {target} could not annotate a caption "
                    f"({error.status if error else 'no result'}: "
                    f"{error.message if error else ''}); Spark retries the task, then fails "
                    "the job"
                )
            results[int(result.id)] = result.annotation
        done = [r for r in results if r is not None]
        if len(done) != len(texts):
            raise ClientError(
                f"the service at {target} answered {len(done)} of the {len(texts)} captions "
                "of a batch; Spark retries the task"
            )
        return done

    return annotate


def _mention_rows(annotation: Annotation) -> list[dict[str, Any]]:
    return [
        {
            "cui": m.cui,
            "preferred_name": m.preferred_name,
            "text": m.text,
            "start": m.start,
            "end": m.end,
            "score": float(m.score),
            "semantic_types": list(m.semantic_types),
            "source": m.source,
            "negated": bool(m.negated),
            "hypothetical": bool(m.hypothetical),
            "historical": bool(m.historical),
            "experiencer": m.experiencer,
        }
        for m in annotation.mentions
    ]


def _annotate_batches(plan: _Plan, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """The ``mapInPandas`` function: runs on executors, one pandas DataFrame per Arrow batch."""
    annotate = _annotator(plan)
    for frame in batches:
        texts = frame[plan.text_col].tolist()
        present = [i for i, t in enumerate(texts) if isinstance(t, str)]
        concepts: list[list[str] | None] = [None] * len(texts)
        mentions: list[list[dict[str, Any]] | None] = [None] * len(texts)
        for start in range(0, len(present), plan.batch_size):
            chunk = present[start : start + plan.batch_size]
            for row, annotation in zip(
                chunk, annotate([texts[i] for i in chunk]), strict=True
            ):
                concepts[row] = list(annotation.concepts)
                mentions[row] = _mention_rows(annotation)
        out = frame.copy()
        out[plan.concepts_col] = concepts  # null caption → null, as Spark functions do
        if plan.mentions_col is not None:
            out[plan.mentions_col] = mentions
        yield out


def output_schema(
    schema: StructType, *, concepts_col: str = "concepts", mentions_col: str | None = "mentions"
) -> StructType:
    """The input schema plus the columns :func:`annotate_dataframe` adds."""
    from pyspark.sql.types import (
        ArrayType,
        BooleanType,
        DataType,
        DoubleType,
        IntegerType,
        StringType,
        StructField,
        StructType,
    )

    kinds: dict[str, DataType] = {
        "string": StringType(),
        "int": IntegerType(),
        "double": DoubleType(),
        "boolean": BooleanType(),
        "array<string>": ArrayType(StringType(), containsNull=False),
    }
    mention = StructType([StructField(name, kinds[kind], True) for name, kind in MENTION_FIELDS])
    fields = [*schema.fields, StructField(concepts_col, ArrayType(StringType()), True)]
    if mentions_col is not None:
        fields.append(StructField(mentions_col, ArrayType(mention), True))
    return StructType(fields)


def annotate_dataframe(
    df: DataFrame,
    text_col: str = "Caption",
    *,
    index: str | Path | None = None,
    ship_index: bool = True,
    target: str | None = None,
    token: str | None = None,
    timeout_seconds: float = 60.0,
    options: ExtractOptions | None = None,
    concepts_col: str = "concepts",
    mentions_col: str | None = "mentions",
    batch_size: int = 256,
) -> DataFrame:
    """``df`` with the concepts (and mentions) of its ``text_col`` captions as new columns.

    Engine, in-process: ``index`` is a compiled index directory (default: the embedded demo
    dictionary); with ``ship_index`` Spark copies it to every executor, without it the path
    must be readable at the same place on every executor. Engine, service: ``target`` is a
    conceptsvc address (a ``dns:///`` name spreads batches over every replica); ``token`` its
    bearer token; ``timeout_seconds`` bounds one batch's call; ``index`` must then be unset.
    ``options`` are the extraction options; unset, the in-process engine uses
    :class:`~conceptsvc.model.ExtractOptions`'s defaults and the service its configured
    defaults (exactly what ``conceptsvc annotate`` does). ``mentions_col=None``
    adds only the concept sets. ``text_col`` must be a string column (another type is a
    :class:`~conceptsvc.errors.ConfigError`, as a missing one is); null captions get null
    columns. Lazy, like any transformation:
    nothing runs until an action.
    """
    _require_pyspark()
    if index is not None and target is not None:
        raise ConfigError(
            "give either `index` (run the engine in the executors) or `target` (call the "
            "service), not both"
        )
    if text_col not in df.columns:
        raise ConfigError(f"no column {text_col!r} in the DataFrame (it has {df.columns})")
    kind = df.schema[text_col].dataType
    if kind.typeName() != "string":
        raise ConfigError(
            f"column {text_col!r} is {kind.simpleString()}, not string: captions must be "
            f"text (its values would all get null concepts); cast it first, e.g. "
            f"df.withColumn({text_col!r}, df[{text_col!r}].cast('string'))"
        )
    new_cols = [c for c in (concepts_col, mentions_col) if c is not None]
    if clash := [c for c in new_cols if c in df.columns]:
        raise ConfigError(
            f"the DataFrame already has column(s) {clash}; choose other names with "
            "`concepts_col=` / `mentions_col=`"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    plan = _Plan(text_col, concepts_col, mentions_col, options, batch_size=batch_size)
    if target is not None:
        plan = replace(plan, target=target, token=token, timeout_seconds=timeout_seconds)
    else:
        if index is None:
            from conceptsvc.embedded import demo_index_path

            index = demo_index_path()
        path = Path(index).resolve()
        # Fail on the driver, before a job starts, for a bad index or options.
        loaded = ConceptIndex.load(path, verify=False)
        Extractor(loaded).check_options(options or ExtractOptions())
        plan = replace(plan, index_hash=loaded.content_hash)
        if ship_index:
            staged = _staged_index(path, loaded.content_hash)
            context = df.sparkSession.sparkContext
            if staged.name not in _shipped_names(context):
                context.addFile(str(staged), recursive=True)
            plan = replace(plan, shipped_name=staged.name)
        else:
            plan = replace(plan, index_path=str(path))

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        return _annotate_batches(plan, batches)

    schema = output_schema(df.schema, concepts_col=concepts_col, mentions_col=mentions_col)
    return df.mapInPandas(run, schema)
