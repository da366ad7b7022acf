"""Training and evaluation data from files: a registry of source formats and a mixing stream.

A *source spec* names one data source; ``--train-data`` / ``--eval-data`` take one per flag::

    SPEC   = generator[:WEIGHT]            relook's offline generator (the default)
           | [FORMAT:]PATH[:WEIGHT]        a file or folder
    FORMAT = a key of SOURCES (jsonl, parquet, disk, deepeyes, vstar, hrbench_4k, ...)
           | module:function               a user loader, ``function(path) -> rows``

Without ``FORMAT`` the format follows ``PATH``: ``.jsonl``/``.json`` is ``jsonl``, ``.parquet``
is ``parquet`` (or ``deepeyes`` when it has verl's ``prompt`` and ``reward_model`` columns), a
folder with ``samples.parquet`` (``python -m agent.data --out``) is ``parquet`` of that table and
a ``save_to_disk`` folder is ``disk``. ``WEIGHT`` is a trailing positive number (mixing
weight, default 1; weights are normalised), so a path must not itself end in ``:NUMBER``
(write ``./2024`` for a folder named ``2024``), and a path containing ``:`` needs an explicit
``FORMAT``.

Files in relook's schema (``jsonl``, ``parquet``, ``disk``; one row per question):

| column | type | required | meaning |
|---|---|---|---|
| ``images`` | list of path / bytes / ``{"bytes", "path"}`` | yes | paths relative to the file |
| ``question`` | str | yes | question text, without "Image k:" labels |
| ``answer`` | str | yes | gold answer (an option letter when ``options`` is given) |
| ``answer_type`` | str | no (``word``) | ``index``, ``int``, ``digit`` or ``word`` |
| ``options`` | list of str | no | shown as ``(A) ...`` lines under the question |
| ``target_image`` | int | no | 1-based image holding the target |
| ``target_bbox`` | ``[x1, y1, x2, y2]`` | no | target box in that image, pixels |
| ``family`` | str | no (source name) | reporting category |
| ``id`` | str | no (``<file stem>-<row>``) | question id |
| ``split`` | str | no (source name) | split label |
| ``meta`` | dict or JSON str | no | anything else |

Rows are read through the ``datasets`` library (memory-mapped Arrow); images are decoded only
when a row is drawn (:meth:`TableSource.sample`). Every error names the file, the row and the
field at fault. :func:`open_source` plus :meth:`Source.check` (columns and the first rows'
images) is what the CLIs run before they create anything.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.benchmarks import BENCHMARKS, load_benchmark
from agent.benchmarks.base import BenchmarkItem
from agent.data.rows import DEEPEYES_COLUMNS, REQUIRED, deepeyes_row, relook_row
from agent.data.tasks import Sample

GENERATOR = "generator"
"""Spec of relook's offline generator (:func:`agent.data.tasks.generate_one`)."""

CHECK_ROWS = 2
"""Rows whose fields and images :meth:`Source.check` decodes."""

_MIX_CHUNK = 1024  # source choices drawn per block of global indices
_USER_FORMAT = re.compile(r"^[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class SourceSpec:
    """One parsed ``--train-data`` / ``--eval-data`` value.

    Attributes:
        text: the spec as given (messages, result keys).
        format: a key of :data:`SOURCES`, ``generator``, or ``module:function``.
        path: file or folder (None for the generator).
        weight: mixing weight, > 0 (relative to the other training sources).
        weighted: whether the spec gave the weight (evaluation sources take none).
    """

    text: str
    format: str
    path: str | None
    weight: float = 1.0
    weighted: bool = False


class Source:
    """A finite or endless list of questions; :meth:`sample` decodes one row.

    Attributes:
        name: the spec text (for messages).
        size: number of rows, or None for an endless source (the generator).
    """

    name: str = ""
    size: int | None = None

    def sample(self, row: int) -> Sample:
        """Row ``row`` as a :class:`Sample`, images decoded now."""
        raise NotImplementedError

    def check(self, rows: int = CHECK_ROWS) -> None:
        """Decode the first ``rows`` rows (fields and images); raises as :meth:`sample`.

        Raises:
            ValueError: the source has no rows, or as :meth:`sample`.
        """
        if self.size == 0:
            raise ValueError(f"{self.name}: no rows")
        for row in range(rows if self.size is None else min(rows, self.size)):
            self.sample(row)


class GeneratorSource(Source):
    """relook's generator: row ``i`` is ``draw(i)`` (endless, or ``size`` rows)."""

    def __init__(self, draw: Callable[[int], Sample], size: int | None = None):
        self.name, self.draw, self.size = GENERATOR, draw, size

    def sample(self, row: int) -> Sample:
        return self.draw(row)


class ItemSource(Source):
    """Benchmark items (:class:`BenchmarkItem`, decoded by ``to_sample``) or ready samples."""

    def __init__(self, name: str, items: Sequence, benchmark: str | None = None):
        self.name, self.items, self.size, self.benchmark = name, items, len(items), benchmark

    def sample(self, row: int) -> Sample:
        item = self.items[row]
        if isinstance(item, BenchmarkItem):
            return item.to_sample(self.benchmark or self.name)
        if isinstance(item, Sample):
            return item
        raise ValueError(f"{self.name} row {row}: expected a Sample or BenchmarkItem, got "
                         f"{type(item).__name__}")  # fmt: skip


class TableSource(Source):
    """Rows of a ``datasets.Dataset``, turned into samples by ``to_sample(source, row, index)``
    (the relook-schema or the DeepEyes row reader).

    Attributes:
        path: the file (or folder) read, for messages.
        dataset: the rows, image columns undecoded.
        base: the folder relative image paths are resolved against (the file's folder).
    """

    def __init__(self, name: str, path: Path, dataset, base: Path, to_sample: Callable):
        self.name, self.path, self.dataset, self.base = name, path, dataset, base
        self.size, self.to_sample = len(dataset), to_sample

    def sample(self, row: int) -> Sample:
        return self.to_sample(self, self.dataset[row], row)

    def where(self, row: int, field: str) -> str:
        """``"<file> row <n> field '<field>'"`` for messages."""
        return f"{self.path} row {row} field {field!r}"


# Parsing specs -----------------------------------------------------------------------------


def parse_spec(text: str) -> SourceSpec:
    """Parse ``[FORMAT:]PATH[:WEIGHT]`` or ``generator[:WEIGHT]`` (module docstring).

    Raises:
        ValueError: an empty spec or path, a weight that is not a positive finite number, or a
            path of no recognisable format.
        FileNotFoundError: a path without ``FORMAT`` that does not exist.
    """
    parts = text.split(":")
    weight, weighted = 1.0, len(parts) > 1 and _is_number(parts[-1])
    if weighted:
        weight = float(parts.pop())
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"data source {text!r}: weight must be a positive number")
    if parts == [GENERATOR]:
        return SourceSpec(text, GENERATOR, None, weight, weighted)
    if parts[0] in SOURCES and len(parts) > 1:
        fmt, path = parts[0], ":".join(parts[1:])
    elif len(parts) > 2 and _USER_FORMAT.match(parts[0]) and parts[1].isidentifier():
        fmt, path = f"{parts[0]}:{parts[1]}", ":".join(parts[2:])
    else:
        fmt, path = "", ":".join(parts)
    if not path:
        raise ValueError(f"data source {text!r}: no path")
    path = os.path.expanduser(path)
    return SourceSpec(text, fmt or _detect(Path(path)), path, weight, weighted)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _detect(path: Path) -> str:
    """The format of a spec without one, from the path (module docstring)."""
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    if path.is_dir():
        if (path / "samples.parquet").is_file():
            return "parquet"
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "disk"
        raise ValueError(f"data folder {path}: neither samples.parquet nor a save_to_disk "
                         "folder; name its format, e.g. vstar:PATH")  # fmt: skip
    if not path.exists():
        raise FileNotFoundError(f"data source {path} not found")
    raise ValueError(f"data source {path}: unknown format; name it, e.g. jsonl:{path}")


# Opening sources ---------------------------------------------------------------------------


def open_source(spec: SourceSpec | str, generator: Source | None = None) -> Source:
    """The :class:`Source` of a spec (tables and benchmark indexes read, no image decoded).

    Args:
        spec: a :class:`SourceSpec` or its text.
        generator: what ``generator`` stands for (the caller knows the task settings).

    Raises:
        FileNotFoundError: the file or folder is missing (message names it).
        ValueError: unknown format, missing columns, unreadable file, a user loader that cannot
            be imported or returns something else than rows (messages name the source).
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.format == GENERATOR:
        if generator is None:
            raise ValueError(f"data source {spec.text!r}: no generator here")
        return generator
    if spec.format in SOURCES:
        return SOURCES[spec.format](spec.path)
    return _user_source(spec)


def _user_source(spec: SourceSpec) -> Source:
    """A ``module:function`` loader: it returns a :class:`Source`, a ``datasets.Dataset`` in
    relook's schema, or a sequence of ``Sample`` / ``BenchmarkItem``."""
    module, _, attr = spec.format.partition(":")
    try:
        load = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"data source {spec.text!r}: cannot import {spec.format}: {err}") from err
    rows = load(spec.path)
    if isinstance(rows, Source):
        return rows
    if hasattr(rows, "column_names"):
        path = Path(spec.path)
        return _relook_table(spec.text, path, rows, path.parent if path.is_file() else path)
    if isinstance(rows, Sequence):
        return ItemSource(spec.text, rows)
    raise ValueError(f"data source {spec.text!r}: {spec.format} returned {type(rows).__name__}, "
                     "not a Source, Dataset or sequence of samples")  # fmt: skip


def _read(path: Path, reader: Callable, what: str):
    """``reader(path)``, a missing file or unreadable content raised naming ``path``."""
    import datasets

    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found")
    quiet = datasets.is_progress_bar_enabled()
    if quiet:  # no "Generating train split" bars inside the CLIs' own output
        datasets.disable_progress_bars()
    try:
        return reader(str(path))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from err
    except Exception as err:  # datasets/pyarrow parse errors have their own classes
        raise ValueError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from err
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _undecoded(dataset):
    """``dataset`` with ``datasets.Image`` columns cast to undecoded ``{"bytes", "path"}``
    cells, so that pixels are decoded by :class:`ImageRef` only when a row is drawn."""
    from datasets import Image, List, Sequence

    for name, feature in dataset.features.items():
        if isinstance(feature, Image) and feature.decode:
            dataset = dataset.cast_column(name, Image(decode=False))
        inner = getattr(feature, "feature", None)
        if isinstance(feature, (List, Sequence)) and isinstance(inner, Image) and inner.decode:
            dataset = dataset.cast_column(name, List(Image(decode=False)))
    return dataset


def load_jsonl(path: str) -> Source:
    """A JSON-lines (or JSON list) file in relook's schema; image paths relative to it."""
    from datasets import Dataset

    file = Path(path)
    return _relook_table(path, file, _read(file, Dataset.from_json, "JSON file"), file.parent)


def load_parquet(path: str) -> Source:
    """A Parquet file in relook's schema, an exported folder (``samples.parquet``), or a
    DeepEyes / verl parquet (detected by its ``prompt`` and ``reward_model`` columns)."""
    from datasets import Dataset

    file = Path(path)
    if file.is_dir():
        file = file / "samples.parquet"
    dataset = _undecoded(_read(file, Dataset.from_parquet, "Parquet file"))
    if {"prompt", "reward_model"} <= set(dataset.column_names):
        return _deepeyes_table(path, file, dataset)
    return _relook_table(path, file, dataset, file.parent)


def load_disk(path: str) -> Source:
    """A ``Dataset.save_to_disk`` folder in relook's schema (a ``DatasetDict`` folder must
    hold one split, or the path must name the split's subfolder)."""
    from datasets import DatasetDict, load_from_disk

    folder = Path(path)
    dataset = _read(folder, load_from_disk, "save_to_disk folder")
    if isinstance(dataset, DatasetDict):
        if len(dataset) != 1:
            raise ValueError(f"save_to_disk folder {folder} holds splits {sorted(dataset)}; "
                             f"name one, e.g. {folder / sorted(dataset)[0]}")  # fmt: skip
        dataset = next(iter(dataset.values()))
    dataset = _undecoded(dataset)
    if {"prompt", "reward_model"} <= set(dataset.column_names):
        return _deepeyes_table(path, folder, dataset)
    return _relook_table(path, folder, dataset, folder)


def load_deepeyes(path: str) -> Source:
    """A DeepEyes / verl RL parquet file (or ``save_to_disk`` folder) of such rows.

    Row layout (verl ``recipe/deepeyes/deepeyes47k_preprocess.py``; DeepEyes-Datasets-47k):
    ``prompt`` a list of chat messages ``{"role", "content"}`` whose user content holds one
    ``<image>`` placeholder per image; ``images`` a list of ``{"bytes", "path"}`` cells or
    paths; ``reward_model`` ``{"ground_truth", "style"}``; optional ``data_source`` (becomes
    the family) and ``extra_info`` (``index`` becomes the id). The question is the last user
    message; leading placeholders are dropped (relook shows every image first, labelled) and
    inline ones become ``Image k``. The answer type is ``word``.
    """
    source = load_disk(path) if Path(path).is_dir() else load_parquet(path)
    if not isinstance(source, TableSource) or source.to_sample is not deepeyes_row:
        raise ValueError(f"{path} is not a DeepEyes / verl parquet: it lacks column(s) "
                         f"{[c for c in DEEPEYES_COLUMNS if c not in _columns(source)]}")  # fmt: skip
    return source


def _columns(source: Source) -> list[str]:
    return list(getattr(getattr(source, "dataset", None), "column_names", []))


def _benchmark_loader(name: str) -> Callable[[str], Source]:
    def load(path: str) -> Source:
        return ItemSource(f"{name}:{path}", load_benchmark(name, path), benchmark=name)

    load.__doc__ = f"The {name} benchmark folder (agent.benchmarks.BENCHMARKS[{name!r}])."
    return load


# Rows -> samples -----------------------------------------------------------------------------


def _relook_table(name: str, path: Path, dataset, base: Path) -> TableSource:
    _require_columns(path, dataset.column_names, REQUIRED)
    return TableSource(name, path, _undecoded(dataset), base, relook_row)


def _deepeyes_table(name: str, path: Path, dataset) -> TableSource:
    _require_columns(path, dataset.column_names, DEEPEYES_COLUMNS)
    return TableSource(name, path, dataset, path.parent if path.is_file() else path, deepeyes_row)


def _require_columns(path: Path, present: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in present]
    if missing:
        raise ValueError(f"{path} is missing column(s) {missing} (has {list(present)})")


SOURCES: dict[str, Callable[[str], Source]] = {
    "jsonl": load_jsonl,
    "parquet": load_parquet,
    "disk": load_disk,
    "deepeyes": load_deepeyes,
    **{name: _benchmark_loader(name) for name in BENCHMARKS},
}
"""Registry of source formats: name -> ``loader(path) -> Source``. ``relook`` is the benchmark
loader of an exported folder; users add ``module:function`` in a spec instead of editing this."""


# Mixing ------------------------------------------------------------------------------------


class DataStream:
    """An endless, deterministic stream of samples mixed from weighted sources.

    Global index ``k`` (sample ``i`` of step ``s`` is ``k = s * prompts_per_step + i``, so the
    step count is the resumable cursor) maps to a source and a position in it: with one source,
    position ``k``; with several, source choices are drawn with probabilities ``weights /
    sum(weights)`` from ``numpy.random.default_rng([seed, 1, k // 1024])`` per block of 1024
    indices, and the position is how many earlier indices chose that source. A finite source
    of ``n`` rows reads position ``p`` at row ``perm_e[p % n]``, ``perm_e`` =
    ``default_rng([seed, 2, source, e]).permutation(n)`` for epoch ``e = p // n``; the
    generator reads row ``p``. Everything is a pure function of ``(sources, weights, seed, k)``.
    """

    def __init__(self, sources: Sequence[Source], weights: Sequence[float], seed: int):
        if not sources or len(sources) != len(weights):
            raise ValueError("DataStream needs one weight per source and at least one source")
        self.sources, self.seed = list(sources), seed
        w = np.asarray(weights, dtype=float)
        self.p = w / w.sum()
        self._blocks: dict[int, np.ndarray] = {}
        self._before = [np.zeros(len(sources), dtype=np.int64)]  # counts before block b
        self._perm: dict[tuple[int, int], np.ndarray] = {}

    def locate(self, index: int) -> tuple[int, int]:
        """``(source index, row)`` of global index ``index`` (class docstring)."""
        if len(self.sources) == 1:
            s, pos = 0, index
        else:
            block, off = divmod(index, _MIX_CHUNK)
            while len(self._before) <= block:
                b = len(self._before) - 1
                counts = np.bincount(self._choices(b), minlength=len(self.sources))
                self._before.append(self._before[b] + counts)
            choices = self._choices(block)
            s = int(choices[off])
            pos = int(self._before[block][s] + np.count_nonzero(choices[:off] == s))
        size = self.sources[s].size
        return s, pos if size is None else int(self._order(s, pos // size)[pos % size])

    def sample(self, index: int) -> Sample:
        """The sample at global index ``index``, images decoded now."""
        s, row = self.locate(index)
        return self.sources[s].sample(row)

    def _choices(self, block: int) -> np.ndarray:
        if block not in self._blocks:
            rng = np.random.default_rng([self.seed, 1, block])
            self._blocks[block] = rng.choice(len(self.sources), size=_MIX_CHUNK, p=self.p)
        return self._blocks[block]

    def _order(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._perm:
            self._perm = {k: v for k, v in self._perm.items() if k[0] != s}  # one epoch each
            rng = np.random.default_rng([self.seed, 2, s, epoch])
            self._perm[key] = rng.permutation(self.sources[s].size)
        return self._perm[key]


def open_stream(specs: Sequence[str], seed: int, generator: Source) -> DataStream:
    """The training stream of ``specs`` (empty: the generator alone).

    Raises:
        FileNotFoundError / ValueError: as :func:`open_source`.
    """
    parsed = [parse_spec(s) for s in specs] or [SourceSpec(GENERATOR, GENERATOR, None)]
    sources = [open_source(p, generator) for p in parsed]
    return DataStream(sources, [p.weight for p in parsed], seed)


class SourceRows(Sequence):
    """A finite source as a lazy sequence of samples: an index or slice decodes only those
    rows (evaluation takes batches of it)."""

    def __init__(self, source: Source):
        if source.size is None:
            raise ValueError(f"{source.name}: an endless source has no rows to list")
        self.source = source

    def __len__(self) -> int:
        return self.source.size

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.source.sample(j) for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.source.sample(i % len(self))


class ChainRows(Sequence):
    """Lazy concatenation of sequences of samples (an index decodes one row)."""

    def __init__(self, parts: Sequence[Sequence[Sample]]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]


def eval_rows(specs: Sequence[str], generator: Source) -> Sequence[Sample]:
    """Every row of each source of ``specs``, in order, as one lazy sequence (``generator``:
    what the ``generator`` spec stands for, a finite :class:`GeneratorSource`).

    Raises:
        FileNotFoundError / ValueError: as :func:`open_source`; an endless source.
    """
    parts = [SourceRows(open_source(spec, generator)) for spec in specs]
    return parts[0] if len(parts) == 1 else ChainRows(parts)


def check_sources(specs: Sequence[str], weights_allowed: bool = True) -> list[SourceSpec]:
    """Open every spec and decode its first rows: the CLIs' check before any run directory.

    The generator is not opened (its settings are checked by the task config).

    Raises:
        FileNotFoundError / ValueError: naming the source, file, row and field at fault; or a
            weight given where ``weights_allowed`` is False (evaluation).
    """
    parsed = [parse_spec(s) for s in specs]
    for spec in parsed:
        if spec.weighted and not weights_allowed:
            raise ValueError(f"--eval-data {spec.text!r}: evaluation sources take no weight")
        if spec.format != GENERATOR:
            open_source(spec).check()
    return parsed
