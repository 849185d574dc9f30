"""prefetch: a drop-in, deterministic, multiprocess replacement for a plain training-data generator.

Public API::

    prefetch.data_generator(batch_size, data_x, data_y, shuffle=True, **options)
    prefetch.Loader(*sources, batch_size=32, ...)
    prefetch.Files(paths, load=None)  # a source over files, loaded in the workers
    prefetch.TarShards(paths)   # WebDataset tar shards, read by index
    prefetch.ParquetRows(paths, columns=None)  # Parquet rows, read by row group (pip install "prefetch[parquet]")
    prefetch.NpyShards(paths)   # .npy files as one array along the first axis
    prefetch.background(iterable, depth=2)  # a plain generator, run in one background process
    prefetch.batch_rng()        # per-batch numpy Generator for transforms
    prefetch.Stats              # what loader.stats() returns
    prefetch.RayExecutor(address=None, actor_options=None)  # executor=: workers as Ray actors

See ``docs/design.md`` for how it works.
"""

from . import files  # noqa: F401 (the old home of Files, kept: prefetch.files.load_default)
from .background import background
from .core.collate import collate_auto, collate_list
from .core.rng import batch_rng
from .doctor import doctor
from .errors import (
    ConcurrentIterationError,
    CoordinatorDiedError,
    CoordinatorTimeoutError,
    ForkUnavailableError,
    IteratorSupersededError,
    LoaderClosedError,
    LoaderExhaustedError,
    MainGuardError,
    OutsideBatchError,
    PrefetchError,
    PrefetchWarning,
    RemoteError,
    ShardError,
    ShmSpaceError,
    StartTimeoutError,
    WorkerDiedError,
    WorkerError,
    WorkerTimeoutError,
)
from .loader import Loader, data_generator
from .profile import ProfileReport, profile
from .ray_executor import RayExecutor  # imports no Ray: that happens when a loader starts on it
from .readers import Files, NpyShards, ParquetRows, TarShards
from .stats import Stats

__version__ = "0.2.0"

__all__ = [
    "ConcurrentIterationError",
    "CoordinatorDiedError",
    "CoordinatorTimeoutError",
    "Files",
    "ForkUnavailableError",
    "IteratorSupersededError",
    "Loader",
    "LoaderClosedError",
    "LoaderExhaustedError",
    "MainGuardError",
    "NpyShards",
    "OutsideBatchError",
    "ParquetRows",
    "PrefetchError",
    "PrefetchWarning",
    "ProfileReport",
    "RayExecutor",
    "RemoteError",
    "ShardError",
    "ShmSpaceError",
    "StartTimeoutError",
    "Stats",
    "TarShards",
    "WorkerDiedError",
    "WorkerError",
    "WorkerTimeoutError",
    "background",
    "batch_rng",
    "collate_auto",
    "collate_list",
    "data_generator",
    "doctor",
    "profile",
]
