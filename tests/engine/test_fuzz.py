"""Differential fuzzing of the engine: any configuration, any consumer, same stream as ``workers=0``.

PRODUCT.md section 3 promises that the batch stream is a function of the seed alone (3.1), that a
saved position resumes exactly (3.2), that a batch the user holds never changes (3.5) and that
nothing is left behind (3.7) -- for *every* combination of options and whatever the training loop
does. Hand-written tests pin a few combinations; this module lets hypothesis draw them:

* **the loader's configuration**: ``workers`` 0-4, ``prefetch``, ``batch_size`` (also larger than
  the data), ``last_batch``, a few epochs (or an endless stream), ``shuffle``, sharding, the
  sample kind (one array source -- C or Fortran order, or strided -- with or without labels, a
  ``range``, tuple / dict / list samples from a class, Python or numpy scalars, strings, an array
  of Python objects, arrays of varying length), the samples' shape (also 0-length dimensions) and
  dtype (also big-endian, strings, datetimes, structured), ``collate`` (``"auto"``, ``"list"``,
  two functions), a ``transform`` that draws from ``random``, ``np.random``,
  ``prefetch.batch_rng()`` or (where torch is installed) torch's global generator and returns views,
  a ``batch_transform`` (random -- ``np.random`` or torch --, or returning reversed,
  transposed or offset views of the batch), a sample whose loading raises, a ``timeout`` that never
  fires, and (long profile) the start method and batches of hundreds of samples;
* **the consumer's behaviour**: a list of steps -- take a batch (keep it or not, write into its
  arrays in place or not), save ``state_dict()``, load a saved state into the running loader, drop
  the generator and iterate again, supersede it with a newer ``iter(loader)``, read ``stats()``,
  ``close()`` mid-stream -- how it ends (take the rest of the stream, ``close()``, or drop the
  loader for the garbage collector), and the loop idiom it iterates with: ``loader.stream()``, or the
  epoch loop (``iter(loader)`` again after each epoch ends), PRODUCT.md 3.1b.

The oracle is the in-process reference: the same loader with ``workers=0``, its ``stream()`` taken once
without interruption, each batch fingerprinted (dtype, shape and bytes of every array, structure, ``repr``
of other leaves) the moment it is yielded, so a later write cannot change the reference. Each
example then checks: every batch taken equals the reference's at that position (an error raised
by user code is the same type and text at the same batch); a finite stream ends exactly after
``epochs * len(loader)`` batches, an epoch iteration exactly at its epoch's end (never before, never
past it), and ``iter``/``stream()`` of a loader whose epochs are consumed raise ``LoaderExhaustedError``;
an engine kept between epochs keeps its processes until something stops it; ``loader.position`` counts
the batches taken; held batches still hold what they held (after the user's own writes) at the end;
every saved state, loaded into a fresh loader with another ``workers`` value, continues with the
reference's next batches in the scenario's idiom (mid-epoch or between epochs); a running loader has no
more ``/dev/shm`` segments than its slot pool allows; a batch made by a worker never shares memory
with the source; after ``close()``, the end of the stream or garbage collection the loader's
processes and segments are gone; a closed loader raises ``LoaderClosedError``.

Every source is built afresh for every loader, so an in-place write that reaches a source can only
change the run that made it. Every bug the fuzzer found has its own
minimal test at the end of the module (all fixed).
The fast profile runs in the default suite; ``-m slow`` runs the long one (more examples, larger
data, spawn and forkserver; ``PREFETCH_FUZZ_EXAMPLES`` sets its number of examples).
"""

from __future__ import annotations

import gc
import os
import pickle
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from helpers import loader_processes, segments_of, wait_until
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import prefetch
from prefetch.core.order import LAST_BATCH_MODES, Order

try:  # torch's global generator is seeded per batch too: drawn from where it is installed
    import torch
except ImportError:  # pragma: no cover - torch is a test dependency of the main environment
    torch = None

# Drawn configurations include batches larger than the data or the shard on purpose: the warning that
# says so is tested in test_bad_input.py.
pytestmark = pytest.mark.filterwarnings("ignore::prefetch.PrefetchWarning")

# --- data: what the sources hold ---------------------------------------------------------------

# How a sample looks; see ``make_sources``.
KINDS = (
    *("array", "pair", "labelled", "range"),  # array sources (with labels: int array, str list); a range
    *("tuple", "dict", "list", "ragged"),  # a source class
    *("pyscalar", "npscalar", "string", "objects"),  # lists of scalars or strings; an array of objects
)
# Kinds whose source is a ``Samples`` object (user class: every sample goes through __getitem__).
CLASS_KINDS = ("tuple", "dict", "list", "ragged")
DTYPES = ("uint8", "int16", "<i8", ">i4", "float16", "float32", "<f8", "bool", "complex64")
DTYPES += ("U3", "S2", "M8[s]", "struct")  # not numbers: the consumer does not write into these
STRUCT = np.dtype([("a", "<i4"), ("b", "<f8")])
# A sample of this shape is 64 KiB of uint8: large enough for the worker to stack it as it goes
# (``collate.StreamingStack``) when there is a transform.
BIG_SHAPE = (64, 1024)


@dataclass(frozen=True)
class Data:
    kind: str
    n: int
    shape: tuple[int, ...]
    dtype: str
    raise_at: int | None = None  # a sample whose loading raises BadSample (class kinds only)
    layout: str = "C"  # array sources: "C", "F" (Fortran order) or "strided" (every other row of a larger array)


class BadSample(ValueError):
    """Raised by a source for the sample the draw marked bad."""


def values(data: Data) -> np.ndarray:
    """``n`` samples of ``shape`` and ``dtype``, the same for the same ``data``."""
    raw = np.random.default_rng(data.n).integers(0, 50, size=(data.n, *data.shape))
    if data.dtype == "struct":
        out = np.zeros(raw.shape, STRUCT)
        out["a"] = raw
        out["b"] = raw / 2
        return out
    return raw.astype(data.dtype)


class Samples:
    """A map-style source class whose samples are tuples, dicts, lists or arrays of varying length."""

    def __init__(self, data: Data):
        self.data = data
        self.values = values(data)

    def __len__(self) -> int:
        return self.data.n

    def __getitem__(self, i: int) -> Any:
        if i == self.data.raise_at:
            raise BadSample(f"sample {i} is bad")
        x = self.values[i]
        kind = self.data.kind
        if kind == "tuple":
            return x, i, f"s{i}"
        if kind == "dict":
            return {"x": x, "y": i / 4, "name": "n" * (i % 3), "nested": (x, np.int32(i))}
        if kind == "list":
            return [x, i]
        assert kind == "ragged"
        return np.repeat(x[None], i % 3, axis=0)  # 0, 1 or 2 rows: shapes differ between samples


def make_sources(data: Data) -> tuple[Any, ...]:
    """Fresh sources for one loader (no two loaders share an object a write could reach)."""
    if data.kind in CLASS_KINDS:
        return (Samples(data),)
    x = values(data)
    if data.kind == "objects":  # an array of Python objects (no out-of-band buffers, no np.take)
        out = np.empty(x.shape, object)
        out.reshape(-1)[:] = [f"o{v}" for v in x.reshape(-1).tolist()]
        return (out,)
    if data.layout == "F":
        x = np.asfortranarray(x)
    elif data.layout == "strided":
        x = np.repeat(x, 2, axis=0)[::2]
    if data.kind == "array":
        return (x,)
    if data.kind == "pair":
        return x, np.arange(data.n, dtype=np.int64) % 7
    if data.kind == "labelled":  # labels that are not numbers: the batch is pickled around its array
        return x, [f"label{i % 5}" for i in range(data.n)]
    if data.kind == "range":
        return (range(100, 100 + data.n),)
    if data.kind == "pyscalar":
        return ([x[i].item() for i in range(data.n)],)
    if data.kind == "npscalar":
        return ([x[i] for i in range(data.n)],)
    assert data.kind == "string"
    return ([f"s{i}" * (i * 37 % 200) for i in range(data.n)],)  # up to 600 characters: long payloads


# --- user code the loader runs (module level: spawn and forkserver pickle it by reference) ------


def _draw(rng: str) -> float:
    if rng == "random":
        return random.random()
    if rng == "np.random":
        return float(np.random.rand())
    if rng == "torch.rand":
        return float(torch.rand(1))
    if rng == "torch.randint":
        return int(torch.randint(0, 2**31, (1,))) / 2**31
    assert rng == "batch_rng"
    return float(prefetch.batch_rng().random())


def _flip(value: Any) -> Any:
    """Reverse every array along its first axis -- as a view, as real augmentations return."""
    if isinstance(value, np.ndarray):
        return value[::-1] if value.ndim else value
    if isinstance(value, tuple):
        return tuple(_flip(v) for v in value)
    if isinstance(value, list):
        return [_flip(v) for v in value]
    if isinstance(value, dict):
        return {k: _flip(v) for k, v in value.items()}
    return value


class Augment:
    """A transform that draws one number from ``rng``, flips the sample's arrays when it is below 0.5,
    and returns ``(sample, number)``. With ``rng=None`` it returns the sample itself."""

    def __init__(self, rng: str | None):
        self.rng = rng

    def __call__(self, sample: Any) -> Any:
        if self.rng is None:
            return sample
        u = _draw(self.rng)
        return (_flip(sample) if u < 0.5 else sample), u

    def __repr__(self) -> str:
        return f"Augment({self.rng!r})"


def collate_counted(samples: list[Any]) -> Any:
    """A collate function: the usual stacking, with the sample count beside it (a pickled batch)."""
    return {"count": len(samples), "batch": prefetch.collate_auto(samples)}


def collate_as_is(samples: list[Any]) -> Any:
    """A collate function that keeps the samples as they are."""
    return list(samples)


def tag_batch(batch: Any) -> Any:
    """A batch_transform that uses the global ``np.random``."""
    return batch, int(np.random.randint(1000))


def _map_arrays(value: Any, f) -> Any:
    if isinstance(value, np.ndarray):
        return f(value)
    if isinstance(value, tuple):
        return tuple(_map_arrays(v, f) for v in value)
    if isinstance(value, list):
        return [_map_arrays(v, f) for v in value]
    if isinstance(value, dict):
        return {k: _map_arrays(v, f) for k, v in value.items()}
    return value


def reversed_views(batch: Any) -> Any:
    """A batch_transform that returns views with negative strides (of the slot, in a worker)."""
    return _flip(batch)


def transposed_views(batch: Any) -> Any:
    """A batch_transform that returns Fortran-ordered views (``a.T``) of every array."""
    return _map_arrays(batch, lambda a: a.T)


def tail_views(batch: Any) -> Any:
    """A batch_transform that returns each array without its first row (a view at an offset), and the
    array itself beside it (two views of the same memory in one batch)."""
    return _map_arrays(batch, lambda a: (a[1:], a) if a.ndim else a)


def tag_batch_torch(batch: Any) -> Any:
    """A batch_transform that uses torch's global generator."""
    return batch, torch.randint(0, 1000, (2,)).numpy()


BATCH_TRANSFORMS = (None, None, tag_batch, reversed_views, transposed_views, tail_views)
BATCH_TRANSFORMS += (tag_batch_torch,) if torch is not None else ()


COLLATES = {"auto": "auto", "list": "list", "counted": collate_counted, "as_is": collate_as_is}
TRANSFORMS = (None, "identity", "random", "np.random", "batch_rng")
TRANSFORMS += ("torch.rand", "torch.randint") if torch is not None else ()


# --- a drawn scenario ------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    kind: str  # "next", "state", "rewind", "reiterate", "supersede", "stats" or "close" (see _steps)
    hold: bool = False
    write: bool = False

    def __repr__(self) -> str:
        if self.kind != "next":
            return self.kind
        return "next" + ("+hold" if self.hold else "") + ("+write" if self.write else "")


@dataclass(frozen=True)
class Scenario:
    data: Data
    options: dict[str, Any]  # Loader keyword arguments, without workers and prefetch
    workers: int
    prefetch: int | None
    steps: tuple[Step, ...]
    ending: str  # after the steps: "drain" the rest of the stream, "close" the loader or "drop" it
    idiom: str  # how the loop iterates: "stream" (loader.stream()) or "epochs" (for epoch: for batch in loader)
    resume_workers: int
    resume_unseeded: bool  # the resumed loader is made with seed=None (load_state_dict adopts the seed;
    # only with world_size=1: sharded loaders refuse seed=None)
    limit: int = field(default=0)  # batches the reference makes: all of a finite stream

    def loader(self, workers: int, seed: Any = "same", sources: tuple[Any, ...] | None = None) -> prefetch.Loader:
        """A loader of the scenario, on fresh sources unless given."""
        options = dict(self.options)
        if seed != "same":
            options["seed"] = seed
        sources = make_sources(self.data) if sources is None else sources
        return prefetch.Loader(*sources, workers=workers, prefetch=self.prefetch, **options)


def _order(options: dict[str, Any], n: int) -> Order:
    keys = ("batch_size", "seed", "shuffle", "epochs", "last_batch", "rank", "world_size")
    return Order(n=n, **{k: options[k] for k in keys})


@st.composite
def scenarios(draw, *, large: bool) -> Scenario:
    workers = draw(st.integers(0, 4))
    depth = draw(st.one_of(st.none(), st.integers(1, 8)))
    kind = draw(st.sampled_from(KINDS))
    # Now and then (long profile) many small samples in large batches: a pickled batch with hundreds
    # of buffers, whose message is too long for one atomic pipe write (it is spilled to a file).
    many = large and draw(st.integers(0, 14)) == 0
    n = draw(st.integers(200, 600)) if many else draw(st.integers(1, 64 if large else 24))
    if draw(st.integers(0, 19)) == 0 and kind in ("array", "pair", "tuple"):
        shape, dtype = BIG_SHAPE, "uint8"
    else:
        # 0-length dimensions: 1 in 8 (each makes a zero-byte sample).
        lengths = (1, 2, 3, 4, 5, 0, 1, 2) if large else (1, 2, 3, 1, 2, 3, 1, 0)
        dims = draw(st.lists(st.sampled_from(lengths), max_size=3 if large else 2))
        shape, dtype = tuple(dims), draw(st.sampled_from(DTYPES))
    if kind in ("pyscalar", "npscalar"):
        shape = ()
        dtype = draw(st.sampled_from(("uint8", "<i8", "float32", "<f8", "bool", "complex64")))
    raise_at = None
    if kind in CLASS_KINDS and draw(st.integers(0, 7)) == 0:
        raise_at = draw(st.integers(0, n - 1))
    layout = draw(st.sampled_from(("C", "C", "F", "strided"))) if kind in ("array", "pair", "labelled") else "C"
    data = Data(kind, n, shape, dtype, raise_at, layout)

    world_size = draw(st.integers(1, min(n, 3)))
    shard = n // world_size
    last_batch = draw(st.sampled_from(LAST_BATCH_MODES))
    max_batch = shard if last_batch == "drop" else shard + 3
    epochs = draw(st.one_of(st.integers(1, 3), st.none()))
    transform = draw(st.sampled_from(TRANSFORMS))
    options = {
        "batch_size": draw(st.integers(1, max(1, min(max_batch, 400 if many else 20 if large else 8)))),
        "seed": draw(st.integers(0, 2**32)),
        "shuffle": draw(st.booleans()),
        "epochs": epochs,
        "last_batch": last_batch,
        "rank": draw(st.integers(0, world_size - 1)),
        "world_size": world_size,
        "collate": COLLATES[draw(st.sampled_from(sorted(COLLATES)))],
        "transform": None if transform is None else Augment(None if transform == "identity" else transform),
        "batch_transform": draw(st.sampled_from(BATCH_TRANSFORMS)),
        "timeout": draw(st.sampled_from((None, None, 60.0))),  # never fires; its clock runs
    }
    if large:
        options["start_method"] = draw(st.sampled_from((None,) * 8 + ("spawn", "forkserver")))
    steps, limit = _draw_steps(draw, _order(options, n).num_batches)
    return Scenario(
        data=data,
        options=options,
        workers=workers,
        prefetch=depth,
        steps=tuple(steps),
        ending=draw(st.sampled_from(("drain", "close", "drop"))),
        idiom=draw(st.sampled_from(("epochs", "stream"))),
        resume_workers=draw(st.integers(0, 3)),
        resume_unseeded=draw(st.booleans()) and world_size == 1,
        limit=limit,
    )


def _draw_steps(draw, total: int | None) -> tuple[list[Step], int]:
    """The consumer's steps, and how many batches the reference makes: all of a finite stream."""
    count = draw(st.integers(0, min(total if total is not None else 12, 60) + 3))
    steps = draw(st.lists(_steps, min_size=count, max_size=count))
    return steps, total if total is not None else sum(s.kind == "next" for s in steps) + 2


# Three in four steps take a batch. The others: save ``state_dict()``; ``rewind`` -- load the last
# saved state into this loader while its generator runs (the generator goes on from there); drop the
# generator and ``reiterate``; ``supersede`` it with a newer ``iter(loader)`` (the old one must refuse
# to go on); look at ``stats()``; ``close()`` the loader (the last step).
_steps = st.one_of(
    st.builds(Step, st.just("next"), st.booleans(), st.booleans()),
    st.builds(Step, st.just("next"), st.booleans(), st.booleans()),
    st.builds(Step, st.just("next"), st.booleans(), st.booleans()),
    st.builds(Step, st.sampled_from(("state", "rewind", "reiterate", "supersede", "stats", "close"))),
)


# --- comparing batches -------------------------------------------------------------------------


def canonical(value: Any) -> Any:
    """A comparable fingerprint of a batch: equal only if structure, dtypes, shapes and bytes are."""
    if isinstance(value, np.ndarray):
        dtype = value.dtype.descr if value.dtype.names else value.dtype.str
        if value.dtype.hasobject:
            return ("ndarray", dtype, value.shape, repr(value.tolist()))
        return ("ndarray", dtype, value.shape, value.tobytes())
    if isinstance(value, np.generic):
        return (type(value).__name__, value.dtype.str, repr(value))
    if isinstance(value, dict):
        return (type(value).__name__, tuple((repr(k), canonical(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(canonical(v) for v in value))
    return (type(value).__name__, repr(value))


def raised(exc: BaseException) -> tuple[str, str, str]:
    """What the reference records for a batch whose making raised."""
    return ("raised", type(exc).__name__, str(exc))


END = ("end",)


def reference_stream(scenario: Scenario) -> list[Any]:
    """The in-process stream, uninterrupted: ``limit`` fingerprints, an error's ``raised(...)`` last if
    one was raised, ``END`` last if the stream ended."""
    out: list[Any] = []
    with scenario.loader(workers=0) as loader:
        iterator = loader.stream()
        try:
            while len(out) < scenario.limit:
                out.append(canonical(next(iterator)))
        except StopIteration:
            out.append(END)
        except Exception as exc:
            out.append(raised(exc))
        if scenario.options["epochs"] is not None and out[-1] != END and out[-1][0] != "raised":
            out.append(END if next(iterator, END) is END else "more batches than len(loader)")
    return out


def source_arrays(sources: tuple[Any, ...]) -> list[np.ndarray]:
    """The arrays that hold a loader's data (what a yielded batch must never share memory with)."""
    arrays = [s.values if isinstance(s, Samples) else s for s in sources]
    return [a for a in arrays if isinstance(a, np.ndarray)]


def array_leaves(value: Any) -> list[np.ndarray]:
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in array_leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in array_leaves(v)]
    return []


def shares_memory(batch: Any, arrays: list[np.ndarray]) -> bool:
    return any(np.may_share_memory(leaf, a) for leaf in array_leaves(batch) for a in arrays)


def writable_or_known_bug(array: np.ndarray, start_method: str | None) -> None:
    assert array.flags.writeable, f"a yielded array is read-only (start method {start_method})"


def write_into(value: Any, start_method: str | None = None) -> None:
    """What a training loop may do to its batch: write into every numeric array in place."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "iufc" and value.size:
            writable_or_known_bug(value, start_method)
            value *= 2
        elif value.dtype.kind == "b" and value.size:
            writable_or_known_bug(value, start_method)
            np.logical_not(value, out=value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            write_into(v, start_method)
    elif isinstance(value, dict):
        for v in value.values():
            write_into(v, start_method)


# --- running a scenario ---------------------------------------------------------------------------


def take(iterator, expected: Any, superseded_ok: bool = False) -> tuple[Any, bool]:
    """``next(iterator)`` checked against the reference; returns (batch or None, whether it went on).
    With ``superseded_ok`` the generator may refuse because a newer ``iter(loader)`` superseded it."""
    try:
        batch = next(iterator)
    except StopIteration:
        assert expected == END, f"the stream ended early; expected {str(expected)[:200]}"
        return None, False
    except Exception as exc:
        if superseded_ok and isinstance(exc, RuntimeError) and "superseded" in str(exc):
            return None, False
        assert raised(exc) == expected, f"raised {exc!r}; expected {str(expected)[:200]}"
        return None, False
    assert expected != END, "a batch past the end of the stream"
    assert canonical(batch) == expected, "the batch differs from the reference's"
    return batch, True


def segment_bound(loader: prefetch.Loader, sources: int) -> int:
    """The most ``/dev/shm`` names a running loader may have (design.md, "Backpressure"): its slot pool
    (``config.max_slots``), a spilled message per batch in flight, a copy of each source
    (spawn, forkserver)."""
    return loader.config.max_slots + loader.prefetch + sources


def assert_released() -> None:
    """Every process and segment of this process's loaders is gone (a few seconds' grace)."""
    pid = os.getpid()

    def released() -> bool:
        return not loader_processes() and not segments_of(pid)

    released.__doc__ = f"loader processes {loader_processes()} and segments {segments_of(pid)} gone"
    wait_until(released, timeout_s=10)


def run(scenario: Scenario) -> None:
    """Run the scenario's consumer against the engine and check it against the reference."""
    reference = reference_stream(scenario)
    sources = make_sources(scenario.data)
    loaders = [scenario.loader(scenario.workers, sources=sources)]  # a list, so that "drop" can let go of it
    try:
        held, states = consume(scenario, loaders, reference, source_arrays(sources))
    finally:
        for loader in loaders:
            loader.close()
        del loaders
    assert_released()
    for batch, expected in held:
        assert canonical(batch) == expected, "a held batch changed"
    del held
    for position, state in states[:1] + states[-1:] if len(states) > 1 else states:
        check_resume(scenario, position, state, reference)


class Consumer:
    """A training loop that takes a scenario's steps with one of two idioms (``Scenario.idiom``):

    * ``"stream"``: ``loader.stream()``, every epoch in one generator;
    * ``"epochs"``: the DataLoader loop, ``for epoch in ...: for batch in loader`` -- when an iteration
      ends, the next ``next`` step starts the next one with ``iter(loader)``.

    Besides each batch, it checks what the idiom promises (PRODUCT.md 3.1b): an epoch iteration ends
    exactly at an epoch boundary (``len(loader)`` batches from a boundary) and never goes past one; a
    finite loader's ``iter`` raises ``LoaderExhaustedError`` once its epochs are consumed. ``owner`` models
    who holds the engine -- a generator, ``PARKED`` (an epoch ended with more to come) or ``None``
    (stopped) -- so that every step can check the processes are there or gone as they should be.
    """

    def __init__(self, scenario: Scenario, loader: prefetch.Loader, reference: list[Any], sources: list[np.ndarray]):
        self.scenario, self.loader, self.reference, self.sources = scenario, loader, reference, sources
        self.epochs = scenario.idiom == "epochs"
        self.steps = len(loader)  # batches per epoch
        self.position = 0  # the stream position: batches taken, less any rewound
        self.taken = 0  # batches taken in all
        self.held: list[tuple[Any, Any]] = []  # (batch, what it must still hold at the end)
        self.states: list[tuple[int, dict]] = []
        self.owner: Any = None
        self.iterator = self.fresh()
        self.alive = True  # whether the generator can still yield
        self.since = 0  # batches the iterator took since it started (or since a rewind moved the loader)
        self.failed = False  # the iterator died of a user error
        self.epoch_ends = 0  # epoch iterations that ended and were followed by the loop's next ``for``

    def fresh(self) -> Any:
        """A new iteration: ``iter(loader)`` or ``loader.stream()`` (an empty one once a finite stream is done)."""
        if self.position < len(self.reference) and self.reference[self.position] == END:
            with pytest.raises(prefetch.LoaderExhaustedError, match="all its epochs"):
                self.loader.stream() if not self.epochs else iter(self.loader)
            return (batch for batch in ())  # a generator with nothing left, as the loop would hold
        return iter(self.loader) if self.epochs else self.loader.stream()

    def at_epoch_end(self) -> bool:
        """Whether the current epoch iteration has taken its last batch (its next ``next`` ends it)."""
        return self.epochs and self.position % self.steps == 0 and self.since > 0

    def check_engine(self) -> None:
        """The processes run if someone holds the engine (parked too), and are gone otherwise."""
        if self.owner is None:
            assert_released()
        else:
            assert self.loader.engine is not None, "the engine stopped although an iteration holds it"

    def take(self, iterator: Any, superseded_ok: bool = False) -> tuple[Any, bool]:
        """``next(iterator)`` checked against the reference and the idiom; (batch or None, whether it went on)."""
        expected = self.reference[self.position]
        if self.at_epoch_end() or expected == END:
            with pytest.raises(StopIteration):  # an epoch iteration ends at the boundary, not past it
                next(iterator)
            if self.owner is iterator:  # it parks the engine for the next epoch, or stops it at the end
                self.owner = None if expected == END else PARKED
            return None, False
        batch, went_on = take(iterator, expected, superseded_ok)
        if went_on:
            self.position, self.taken, self.since = self.position + 1, self.taken + 1, self.since + 1
            self.owner = iterator
        else:  # user code raised: the generator stopped the engine
            self.failed = iterator is self.iterator
            if self.owner is iterator:
                self.owner = None
        return batch, went_on

    def next_epoch(self) -> bool:
        """The loop's next ``for``: a new epoch iteration, or ``LoaderExhaustedError`` when none is left."""
        self.epoch_ends += 1
        self.iterator, self.alive, self.since, self.failed = self.fresh(), True, 0, False
        return self.reference[self.position] != END

    def next_step(self, step: Step) -> None:
        if not self.alive:
            if not self.epochs or self.failed:
                with pytest.raises(StopIteration):
                    next(self.iterator)
                return
            if not self.next_epoch():
                return
        batch, self.alive = self.take(self.iterator)
        if not self.alive:
            return
        assert self.loader.position == self.position
        assert len(segments_of(os.getpid())) <= segment_bound(self.loader, len(self.sources)), segments_of(os.getpid())
        if step.write:
            assert not shares_memory(batch, self.sources), "a batch shares memory with the source"
            write_into(batch, self.scenario.options.get("start_method"))
        if step.hold:
            self.held.append((batch, canonical(batch)))

    def rewind(self) -> None:
        if not self.states:
            return
        position, state = self.states[-1]
        self.loader.load_state_dict(state)
        self.owner = None  # the running engine stopped; the generator restarts one if resumed
        self.check_engine()
        if position != self.position:  # the generator goes on from there, to the end of that epoch
            self.position, self.since = position, 0
        assert self.loader.position == position

    def supersede(self) -> None:
        # The older generator, resumed, either refuses (design.md) or -- as long as the newer one
        # has not started -- yields the next batch (see test_a_superseded_generator_refuses_to_go_on).
        # Either way no batch may be lost or repeated.
        old, self.iterator = self.iterator, self.fresh()
        if self.alive and self.position < len(self.reference):
            self.take(old, superseded_ok=True)
        old.close()
        if self.owner is old:
            self.owner = None
        self.check_engine()
        self.alive, self.since, self.failed = True, 0, False

    def close(self) -> None:
        self.loader.close()
        self.owner = None
        self.check_engine()
        if self.alive and (self.position >= len(self.reference) or self.reference[self.position] != END):
            # an epoch iteration that has taken its epoch's last batch just ends; any other says closed
            with pytest.raises(StopIteration if self.at_epoch_end() else prefetch.LoaderClosedError):
                next(self.iterator)
        with pytest.raises(prefetch.LoaderClosedError):
            iter(self.loader)

    def drain(self) -> None:
        """Take the rest of the stream the idiom's way (a new ``for`` at each epoch's end), and its end."""
        while self.position < len(self.reference) and self.reference[self.position] != END:
            if not self.alive:
                if not self.epochs or self.failed:
                    return  # the stream died of a user error
                self.next_epoch()
            _, self.alive = self.take(self.iterator)
        if self.position < len(self.reference):  # the end of a finite stream
            if self.alive:
                self.take(self.iterator)
            if self.epochs:
                self.next_epoch()  # LoaderExhaustedError
            assert self.owner is None
            self.check_engine()  # the end of a finite stream stops the engine


PARKED = "parked"  # Consumer.owner: nobody iterates, the engine is kept for the next epoch


def consume(
    scenario: Scenario, loaders: list[prefetch.Loader], reference: list[Any], sources: list[np.ndarray]
) -> tuple[list, list]:
    """Take the scenario's steps on ``loaders[0]``; return the batches held and the states saved."""
    loader = loaders[0]
    assert len(loader) == loader.steps_per_epoch
    if scenario.options["epochs"] is not None and reference[-1] == END:
        assert len(reference) - 1 == scenario.options["epochs"] * len(loader)
    consumer = Consumer(scenario, loader, reference, sources)
    for step in scenario.steps:
        if step.kind == "next":
            if consumer.position >= len(reference):  # an endless stream: the reference stops here
                break
            consumer.next_step(step)
        elif step.kind == "state":
            state = loader.state_dict()
            assert state["position"] == consumer.position
            consumer.states.append((consumer.position, pickle.loads(pickle.dumps(state))))
        elif step.kind == "rewind":
            consumer.rewind()
        elif step.kind == "reiterate":
            consumer.iterator.close()
            if consumer.owner is consumer.iterator:
                consumer.owner = None
            consumer.check_engine()
            consumer.iterator, consumer.alive, consumer.since, consumer.failed = consumer.fresh(), True, 0, False
        elif step.kind == "supersede":
            consumer.supersede()
        elif step.kind == "stats":
            stats = loader.stats()  # of the current or last engine
            assert 0 <= stats.batches <= consumer.taken, stats
            assert str(stats)
        else:
            consumer.close()
            return consumer.held, consumer.states
    if scenario.ending == "drain":
        consumer.drain()
    event(f"batches taken: {consumer.position // 5 * 5}+")
    if consumer.epochs:
        event(f"epoch iterations ended: {min(consumer.epoch_ends, 3)}{'+' if consumer.epoch_ends >= 3 else ''}")
    held, states = consumer.held, consumer.states
    if scenario.ending == "drop":  # the loader and its generator are garbage: their finalizers clean up
        del consumer, loader
        loaders.clear()
        gc.collect()
        assert_released()
    return held, states


def idiom_batches(loader: prefetch.Loader, idiom: str) -> Iterator[Any]:
    """Every remaining batch, the idiom's way: one stream, or an epoch loop until the epochs run out."""
    while True:
        try:
            iterator = loader.stream() if idiom == "stream" else iter(loader)
        except prefetch.LoaderExhaustedError:  # every epoch is consumed (or the state was saved at the end)
            return
        started = loader.position
        yield from iterator
        if idiom == "epochs":
            assert loader.position == loader.config.order.epoch_end(started), "an epoch iteration ended mid-epoch"


def check_resume(scenario: Scenario, position: int, state: dict, reference: list[Any]) -> None:
    """A fresh loader (another ``workers``) resumed at ``position`` yields the reference from there,
    in the scenario's idiom (an epoch loop resumes mid-epoch, or between epochs, as the state says)."""
    seed = None if scenario.resume_unseeded else "same"
    with scenario.loader(workers=scenario.resume_workers, seed=seed) as resumed:
        resumed.load_state_dict(state)
        batches = idiom_batches(resumed, scenario.idiom)
        for expected in reference[position:]:
            _, went_on = take(batches, expected)
            if not went_on:
                break
        batches.close()
    assert_released()


# --- the properties -------------------------------------------------------------------------------

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=_HEALTH)
LONG = settings(
    max_examples=int(os.environ.get("PREFETCH_FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=_HEALTH,
)


def check(scenario: Scenario) -> None:
    event(f"workers={scenario.workers}")
    event(f"kind={scenario.data.kind}")
    event(f"ending={scenario.ending}")
    event(f"idiom={scenario.idiom}")
    run(scenario)


@pytest.mark.timeout(180)
@FAST
@given(scenarios(large=False))
def test_engine_matches_the_in_process_reference(scenario):
    check(scenario)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@LONG
@given(scenarios(large=True))
def test_engine_matches_the_in_process_reference_long(scenario):
    check(scenario)


def test_canonical_tells_dtype_shape_and_bytes_apart():
    """The oracle itself: fingerprints differ whenever a batch does."""
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert canonical(a) == canonical(a.copy())
    assert canonical(a) != canonical(a.astype(np.int64))
    assert canonical(a) != canonical(a.reshape(3, 2))
    assert canonical(a) != canonical(a.astype(">i4"))
    assert canonical((a, 1)) != canonical([a, 1])
    assert canonical({"x": a, "y": 1}) != canonical({"y": 1, "x": a})
    assert canonical(np.int32(1)) != canonical(1)


# --- minimal reproductions of what the fuzzer found -----------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("collate", ["auto", "list"])
def test_zero_byte_samples_with_workers(collate):
    data = np.zeros((2, 0), np.uint8)
    with prefetch.Loader(data, batch_size=1, epochs=1, shuffle=False, collate=collate, workers=1) as loader:
        batches = [canonical(batch) for batch in loader]
    with prefetch.Loader(data, batch_size=1, epochs=1, shuffle=False, collate=collate, workers=0) as loader:
        assert batches == [canonical(batch) for batch in loader]


def _array_source() -> tuple[Any, dict]:
    return np.arange(4, dtype=np.int64).reshape(2, 2), {"collate": "list"}


def _list_samples_source() -> tuple[Any, dict]:
    return [[np.array([1, 2]), 0], [np.array([3, 4]), 1]], {"collate": "auto"}


def _collate_function_source() -> tuple[Any, dict]:
    return [(np.array([1, 2]), "a"), (np.array([3, 4]), "b")], {"collate": collate_as_is}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make", [_array_source, _list_samples_source, _collate_function_source])
def test_in_place_writes_with_workers_0_do_not_reach_the_source(make):
    def stream(workers: int) -> list[Any]:
        source, options = make()  # fresh data for each run
        seen = []
        with prefetch.Loader(source, batch_size=1, epochs=2, shuffle=False, workers=workers, **options) as loader:
            for batch in loader:
                seen.append(canonical(batch))
                write_into(batch)  # the training loop doubles its batch in place
        return seen

    assert stream(workers=0) == stream(workers=1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_superseded_generator_refuses_to_go_on(workers):
    """design.md: a newer iter(loader) takes over when it takes its first batch; the older then refuses."""
    with prefetch.Loader(np.arange(8), batch_size=2, epochs=1, shuffle=False, workers=workers) as loader:
        older = iter(loader)
        assert next(older).tolist() == [0, 1]
        newer = iter(loader)
        assert next(older).tolist() == [2, 3]  # the newer has taken nothing over yet
        assert next(newer).tolist() == [4, 5]
        with pytest.raises(RuntimeError, match="superseded"):
            next(older)
        assert next(newer).tolist() == [6, 7]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("as_memmap", [False, True], ids=["ndarray", "memmap"])
def test_structured_dtype_sources_under_spawn(tmp_path, as_memmap):
    data = np.zeros(4, dtype=STRUCT)
    data["a"] = np.arange(4)
    data["b"] = np.arange(4) / 2
    if as_memmap:
        mapped = np.memmap(tmp_path / "data.bin", dtype=STRUCT, mode="w+", shape=data.shape)
        mapped[:] = data
        mapped.flush()
        data = mapped
    options = {"batch_size": 2, "epochs": 1, "shuffle": False}
    with prefetch.Loader(data, workers=1, start_method="spawn", **options) as loader:
        batches = [canonical(batch) for batch in loader]
    with prefetch.Loader(data, workers=0, **options) as loader:
        assert batches == [canonical(batch) for batch in loader]  # it was of dtype |V12 when spawned


@pytest.mark.timeout(120)
@pytest.mark.start_methods("spawn", "forkserver")
def test_yielded_arrays_are_writable_under_spawn(start_method):
    data = np.arange(4).reshape(2, 2)
    options = {"batch_size": 1, "epochs": 1, "shuffle": False, "collate": "list"}
    with prefetch.Loader(data, workers=1, start_method=start_method, **options) as loader:
        (row,) = next(iter(loader))
        assert row.flags.writeable


@pytest.mark.timeout(120)
@pytest.mark.start_methods("spawn", "forkserver")
def test_big_endian_arrays_in_a_pickled_source_keep_their_dtype(start_method):
    rows = [np.array([i], dtype=">i4") for i in range(4)]  # a list of arrays: pickled as it is
    options = {"batch_size": 2, "epochs": 1, "shuffle": False}
    with prefetch.Loader(rows, workers=1, start_method=start_method, **options) as loader:
        batches = [canonical(batch) for batch in loader]
    with prefetch.Loader(rows, workers=0, **options) as loader:
        assert batches == [canonical(batch) for batch in loader]  # it was <i4 when spawned
