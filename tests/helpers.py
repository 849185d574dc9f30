"""Module-level sources and transforms the tests share (importable by spawned processes)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import numpy as np

import prefetch

# The start methods a test taking the `start_method` fixture (conftest.py) runs under by default: one that copies
# the parent and one that pickles everything (forkserver pickles like spawn; the tests that must also see it ask
# for it). Those the platform lacks are left out.
DEFAULT_START_METHODS = ("fork", "spawn")

ALPHABET_X = [chr(i) for i in range(ord("a"), ord("a") + 26)]
ALPHABET_Y = [chr(i) for i in range(ord("A"), ord("A") + 26)]


def augment(sample):
    """Uses all three sources of randomness a transform may use."""
    x, y = sample
    noise = random.random() + np.random.rand() + prefetch.batch_rng().random()
    return x * np.float32(noise), y


def batch_noise(batch):
    x, y = batch
    return x + np.random.randint(0, 100), y


def as_list(batch) -> list:
    """A comparable form of any batch (arrays become lists)."""
    if isinstance(batch, np.ndarray):
        return batch.tolist()
    if isinstance(batch, dict):
        return {k: as_list(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [as_list(v) for v in batch]
    return batch


class AheadSource:
    """A source of ``n`` samples that records, at every load, how far the loaders run ahead of the consumer.

    The consumer keeps the number of batches it has asked for in the file ``taken`` (``take``); every load
    (in any worker process) appends its batch number and the number it read there to the file ``loads``. With
    ``shuffle=False`` sample ``i`` belongs to batch ``i // batch_size``, so a load of batch ``b`` when ``t``
    batches were taken is ``b + 1 - t`` batches ahead of the consumer: counted, not timed."""

    def __init__(self, n: int, batch_size: int, directory: str):
        self.n = n
        self.batch_size = batch_size
        self.taken = os.path.join(directory, "taken")
        self.loads_path = os.path.join(directory, "loads")
        self.take(0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        with open(self.taken, "rb") as file:
            taken = int.from_bytes(file.read(8), "little")
        fd = os.open(self.loads_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{i // self.batch_size} {taken}\n".encode())  # one write: whole lines from any process
        finally:
            os.close(fd)
        return np.full(4, i, dtype=np.int64)

    def take(self, batches: int) -> None:
        """Say that the consumer has asked for ``batches`` batches (before it asks for the last of them)."""
        with open(self.taken, "r+b" if os.path.exists(self.taken) else "wb") as file:
            file.write(batches.to_bytes(8, "little"))

    def loads(self) -> list[tuple[int, int]]:
        """``(batch, batches taken then)`` of every load so far."""
        if not os.path.exists(self.loads_path):
            return []
        with open(self.loads_path) as file:
            return [(int(batch), int(taken)) for batch, taken in (line.split() for line in file)]

    def loaded(self) -> int:
        return len(self.loads())

    def ahead(self) -> int:
        """The most batches any load so far ran ahead of the consumer."""
        return max((batch + 1 - taken for batch, taken in self.loads()), default=0)


class DictSource:
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict:
        return {"image": np.full((2, 3), i, dtype=np.uint8), "name": f"s{i}", "pair": (i, float(i) / 2)}


class Unpicklable(Exception):
    """An exception that cannot be rebuilt in another process."""

    def __init__(self, message: str, handle: object):
        super().__init__(message)
        self.handle = handle

    def __reduce__(self):
        raise TypeError("not picklable")


class MixedTensorSource:
    """Samples that mix a tensor, an array, a number and text, in a dict and a tuple. Its tensor makes
    a spawned coordinator import torch while it unpickles the source, before it forks the workers."""

    def __init__(self, n: int):
        import torch

        self.images = torch.arange(n * 6, dtype=torch.float32).reshape(n, 2, 3)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = self.images[i]
        return {
            "pair": (image * 0.5, np.full(2, i, np.int16)),
            "weight": i / 4,
            "label": image[0, 0].long(),
            "name": f"s{i}",
        }


class RandomCropSource:
    """A PyTorch-style dataset whose ``__getitem__`` itself draws random numbers."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> np.ndarray:
        return np.full(3, i, dtype=np.float64) + np.random.rand(3) + random.random()


# --- fault injection: one misbehaviour, at one sample, in any stage of the pipeline ---------------

FAULTS = ("raise", "unpicklable", "sys_exit", "os_exit", "sigkill", "sigsegv", "hang")
# Faults that end the worker process, and how the consumer's error names the way it ended.
DEATHS = {"sys_exit": "exited with code 3", "os_exit": "exited with code 1", "sigkill": "SIGKILL", "sigsegv": "SIGSEGV"}


class BadSample(ValueError):
    """A user exception of the test's own type: it must arrive in the consumer as itself."""


class Fault:
    """Misbehaves when a batch touches sample ``index``: every time, or with ``marker`` only the
    first ``times`` times (each strike appends a byte to the marker file first, so the retry in a
    fresh worker after the last one succeeds)."""

    def __init__(self, index: int, kind: str, marker: str | None = None, times: int = 1):
        assert kind in FAULTS, kind
        self.index = index
        self.kind = kind
        self.marker = marker
        self.times = times

    def strikes(self) -> int:
        """How often it struck (counted only with a marker)."""
        return os.path.getsize(self.marker) if self.marker and os.path.exists(self.marker) else 0

    def strike(self, indices) -> None:
        if self.index not in {int(i) for i in indices}:
            return
        if self.marker is not None:
            if self.strikes() >= self.times:
                return
            with open(self.marker, "ab") as file:
                file.write(b"x")
        if self.kind == "raise":
            raise BadSample(f"bad sample {self.index}")
        if self.kind == "unpicklable":
            raise Unpicklable(f"cannot travel {self.index}", lambda: None)
        if self.kind == "sys_exit":
            import sys

            sys.exit(3)
        if self.kind == "os_exit":
            os._exit(1)
        if self.kind == "sigkill":
            os.kill(os.getpid(), 9)
        if self.kind == "sigsegv":
            import faulthandler

            faulthandler.disable()  # no "Fatal Python error" report: the test wants only the signal
            faulthandler._sigsegv()
        if self.kind == "hang":
            import time

            time.sleep(3600)


class FaultySource:
    """A map-style source (not an array: every sample goes through ``__getitem__``) of ``data`` rows."""

    def __init__(self, data: np.ndarray, fault: Fault | None):
        self.data = data
        self.fault = fault

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.fault is not None:
            self.fault.strike([i])
        return self.data[i]


class FaultyTransform:
    """A ``transform`` of ``(x, index)`` samples."""

    def __init__(self, fault: Fault | None):
        self.fault = fault

    def __call__(self, sample):
        x, y = sample
        if self.fault is not None:
            self.fault.strike([y])
        return x * np.float32(2), y


class FaultyCollate:
    """A ``collate`` function of ``(x, index)`` samples (``"auto"`` collation, after the fault)."""

    def __init__(self, fault: Fault | None):
        self.fault = fault

    def __call__(self, samples):
        if self.fault is not None:
            self.fault.strike([y for _, y in samples])
        return prefetch.collate_auto(samples)


class FaultyBatchTransform:
    """A ``batch_transform`` of ``(x, indices)`` batches."""

    def __init__(self, fault: Fault | None):
        self.fault = fault

    def __call__(self, batch):
        x, y = batch
        if self.fault is not None:
            self.fault.strike(y)
        return x + np.float32(1), y


STAGES = ("load", "transform", "collate", "batch_transform")


def faulty_pipeline(stage: str, data: np.ndarray, fault: Fault | None) -> tuple[tuple, dict]:
    """``Loader`` sources and options whose ``stage`` carries ``fault`` (``None``: the same pipeline, no fault).

    Samples are ``(data[i], i)``, so every stage can tell which samples it has."""
    assert stage in STAGES, stage
    index = np.arange(len(data))
    if stage == "load":
        return (FaultySource(data, fault), index), {}
    if stage == "transform":
        return (data, index), {"transform": FaultyTransform(fault)}
    if stage == "collate":
        return (data, index), {"collate": FaultyCollate(fault)}
    return (data, index), {"batch_transform": FaultyBatchTransform(fault)}


def fingerprint(batch):
    """The exact bytes of a batch, with every array's (and tensor's) dtype and shape: equal only if
    byte-identical."""
    if isinstance(batch, np.ndarray):
        return ("ndarray", batch.dtype.str, batch.shape, batch.tobytes())
    torch = sys.modules.get("torch")  # (or a stand-in without tensors: FakeTorch)
    if isinstance(getattr(torch, "Tensor", None), type) and isinstance(batch, torch.Tensor):
        raw = batch.detach().contiguous().reshape(-1).view(torch.uint8) if batch.element_size() else batch
        return (type(batch).__name__, str(batch.dtype), tuple(batch.shape), bytes(raw.numpy()))
    if isinstance(batch, dict):
        return {k: fingerprint(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return (type(batch).__name__, *(fingerprint(v) for v in batch))
    return (type(batch).__name__, repr(batch))


# --- processes and segments -------------------------------------------------------------------------

# multiprocess's own helpers live as long as the test session by design; they are not a loader's.
SESSION_HELPERS = ("resource_tracker", "forkserver")


def loader_processes(root: int | None = None) -> list[int]:
    """Pids of the loader processes (coordinators and workers) below process ``root`` (default: this one)."""
    import psutil

    pids = []
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for child in children:
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if not any(helper in cmdline for helper in SESSION_HELPERS):
            pids.append(child.pid)
    return pids


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent to reap it has ended)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def segments_of(pid: int) -> list[str]:
    """The /dev/shm segments of the loaders whose consumer is process ``pid``."""
    from prefetch.ipc.segments import NAME_ROOT, SHM_DIR

    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(f"{NAME_ROOT}{pid}-"))


def claim_flag(path) -> bool:
    """Create the file ``path`` holding this process's pid, if no process has yet: True for the one process (or
    thread) that created it. Processes that race for one role (the first read of a sample, say) claim a flag."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def hash_into(h, item) -> None:
    """Feed a batch's structure, dtypes, shapes and bytes into the hash ``h`` (``hashlib.sha256()``): NumPy
    arrays, torch tensors (if torch is loaded; never imported here), tuples, lists and dicts (keys sorted), and
    the ``repr`` of anything else."""
    import numpy as np

    torch = sys.modules.get("torch")
    if isinstance(getattr(torch, "Tensor", None), type) and isinstance(item, torch.Tensor):
        h.update(f"{type(item).__name__}{item.dtype}{tuple(item.shape)}".encode())
        h.update(bytes(item.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(item, np.ndarray):
        h.update(f"{item.dtype.str}{item.shape}".encode())
        h.update(np.ascontiguousarray(item).tobytes())
    elif isinstance(item, (tuple, list)):
        h.update(f"{type(item).__name__}{len(item)}".encode())
        for part in item:
            hash_into(h, part)
    elif isinstance(item, dict):
        h.update(f"dict{len(item)}".encode())
        for key in sorted(item):
            h.update(repr(key).encode())
            hash_into(h, item[key])
    else:
        h.update(repr(item).encode())


def segments_mapped_here() -> set[str]:
    """Lines of /proc/self/maps that map a prefetch segment (its file may be unlinked already)."""
    from prefetch.ipc.segments import NAME_ROOT, SHM_DIR

    root = os.path.join(SHM_DIR, NAME_ROOT)
    with open("/proc/self/maps") as maps:
        return {line.split(None, 5)[-1].strip() for line in maps if root in line}


def segment_descriptors_here() -> set[str]:
    """This process's open descriptors to a prefetch segment, as 'fd -> path'."""
    from prefetch.ipc.segments import NAME_ROOT, SHM_DIR

    root = os.path.join(SHM_DIR, NAME_ROOT)
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used, now closed
            continue
        if target.startswith(root):
            found.add(f"{fd} -> {target}")
    return found


def wait_until(condition, timeout_s: float = 10.0, interval_s: float = 0.02, what: str | None = None) -> float:
    """Poll ``condition()`` until it is true and return the seconds it took; at the deadline, fail the test
    with an AssertionError naming ``what`` (default: the condition's docstring, else its source line).

    Use it instead of a fixed sleep before an assertion: a sleep long enough on a busy machine is slow
    everywhere else, and one short enough for an idle machine flakes on a busy one."""
    import time

    started = time.monotonic()
    deadline = started + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            left = f" ({condition.described()})" if hasattr(condition, "described") else ""
            raise AssertionError(f"still not true after {timeout_s} s: {what or _describe(condition)}{left}")
        time.sleep(interval_s)
    return time.monotonic() - started


def _describe(condition) -> str:
    if getattr(condition, "__doc__", None):
        return condition.__doc__
    try:
        import inspect

        return inspect.getsource(condition).strip()
    except (OSError, TypeError):
        return repr(condition)


def all_gone(pids, consumer_pid: int | None = None):
    """A condition: every process in ``pids`` ended and (if given) ``consumer_pid`` has no segment left."""

    def gone() -> bool:
        return not any(alive(pid) for pid in pids) and (consumer_pid is None or not segments_of(consumer_pid))

    def described() -> str:  # what is left, named when the wait fails
        left = [pid for pid in pids if alive(pid)]
        segments = sorted(segments_of(consumer_pid)) if consumer_pid is not None else []
        return f"left: processes {left}, segments {segments}"

    gone.__doc__ = f"processes {list(pids)} gone and no segment of consumer {consumer_pid} left"
    gone.described = described  # type: ignore[attr-defined]
    return gone


class DieWhenTold:
    """A ``transform`` of ``(x, index)`` samples that, the first time it meets sample ``index``, waits
    until the file ``go`` exists, then kills its own process (``marker`` makes it happen once)."""

    def __init__(self, index: int, go: str, marker: str):
        self.index = index
        self.go = go
        self.marker = marker

    def __call__(self, sample):
        x, y = sample
        if int(y) == self.index and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            wait_until(lambda: os.path.exists(self.go), timeout_s=10)
            os.kill(os.getpid(), 9)
        return x, y


class NeedsTwoArguments(Exception):
    """Pickles, but cannot be rebuilt: unpickling calls ``NeedsTwoArguments(message)``, one argument short."""

    def __init__(self, index: int, why: str):
        super().__init__(f"sample {index} is {why}")


class RaiseUnrebuildable:
    """A ``transform`` of ``(x, index)`` samples that raises ``NeedsTwoArguments`` at sample ``index``."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, sample):
        if int(sample[1]) == self.index:
            raise NeedsTwoArguments(self.index, "bad")
        return sample


def blas_threads(sample):
    """The BLAS/OpenMP thread counts the transform runs with (as an array the loader can stack)."""
    from threadpoolctl import threadpool_info

    counts = [info["num_threads"] for info in threadpool_info()] or [1]
    return np.array([max(counts), int(os.environ.get("OMP_NUM_THREADS", "0"))])


class SlowToStart:
    """A source of ``n`` numbers whose unpickling takes ``delay_s``: under spawn or forkserver, the
    coordinator (which unpickles the sources before anything else) starts that much later."""

    def __init__(self, n: int, delay_s: float):
        self.n = n
        self.delay_s = delay_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def __setstate__(self, state: dict) -> None:
        import time

        self.__dict__.update(state)
        time.sleep(self.delay_s)


class RaiseLong:
    """A ``transform`` of ``(x, index)`` samples that raises ``BadSample`` with a ``length``-character message."""

    def __init__(self, index: int, length: int):
        self.index = index
        self.length = length

    def __call__(self, sample):
        if int(sample[1]) == self.index:
            raise BadSample("x" * self.length)
        return sample


class FakeTorch(types.ModuleType):
    """Stands in for ``torch`` in ``sys.modules``: intra-op threads, and every change made to them."""

    def __init__(self, threads: int):
        super().__init__("torch")
        self.threads = threads
        self.calls: list[int] = []

    def get_num_threads(self) -> int:
        return self.threads

    def set_num_threads(self, threads: int) -> None:
        self.calls.append(threads)
        self.threads = threads


class PerThreadFakeTorch(FakeTorch):
    """``FakeTorch`` with torch's per-thread setting: each thread has its own intra-op threads, and a thread
    that has not used torch yet starts from the last value set in any thread (torch's global default)."""

    def __init__(self, threads: int):
        self.local = threading.local()
        self.default = threads
        super().__init__(threads)

    @property  # type: ignore[override]
    def threads(self) -> int:
        return getattr(self.local, "threads", self.default)

    @threads.setter
    def threads(self, threads: int) -> None:
        self.local.threads = self.default = threads


def burn_cpu(seconds: float) -> None:
    """Spend ``seconds`` of this thread's CPU time in numpy: a fixed amount of work however busy the
    machine is (a sleep would leave the core to others; a fixed loop count would vary with the CPU)."""
    import time

    work = np.linspace(0.0, 1.0, 4096)
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        work = np.sqrt(work * work + 1e-3)


def cpu_heavy(sample):
    """A transform that costs 2 ms of CPU per sample (sample unchanged)."""
    burn_cpu(0.002)
    return sample


@contextlib.contextmanager
def one_core():
    """Pin this process -- and the loader processes it starts, which inherit the mask -- to one core, so
    that a loop and two workers are sure to fill it, whatever the machine's core count."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# What a shell does for a foreground program (see ``run_script``), put before each script (which therefore
# cannot begin with a ``from __future__`` import).
FOREGROUND_PROLOGUE = "import signal as _s; _s.signal(_s.SIGINT, _s.default_int_handler)\n"


def run_script(tmp_path, name: str, source: str, *args: str) -> subprocess.Popen:
    """Write ``source`` (dedented) to ``tmp_path/name`` and run it with this interpreter, in a session of
    its own (like a program started from a shell), its output piped as text: for faults that need a
    consumer process of their own to kill or interrupt.

    Like a shell starting a foreground program, it gives the script Python's Ctrl-C handler back first: a
    test run launched in the background (``cmd &`` from a script) inherits SIGINT ignored, and a program
    that ignores it cannot be tested for what Ctrl-C does."""
    script = tmp_path / name
    script.write_text(FOREGROUND_PROLOGUE + textwrap.dedent(source))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def reap(process: subprocess.Popen, pids, timeout_s: float) -> None:
    """After a fault test that killed a consumer process: kill whatever of its loader outlived it, unlink
    the segments its pid named, and collect the process's output, so that nothing leaks into later tests."""
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    for name in segments_of(process.pid):
        os.unlink(os.path.join("/dev/shm", name))
    process.communicate(timeout=timeout_s)


def consume_within_the_bound(loader, source: AheadSource, depth: int, batches: int = 15) -> None:
    """Take ``batches`` batches of ``loader`` (``shuffle=False``, over ``source``, ``prefetch=depth``, credits
    going back one batch at a time), one at a time, and after each wait until the workers have loaded all
    that the bound lets them: while the user works on batch ``k``, batches ``k+1 .. k+depth-1`` and no more
    (docs/design.md, "Backpressure"). No load may run further ahead, and the window must fill up to there.

    Exact, whatever the machine's load: the consumer raises its count *before* it asks for the next batch, so
    a load never sees a count behind what the engine knows, and between two batches -- where an engine that
    ignores the bound would run past it -- the test waits for the window to fill, never for a time."""
    stream = loader.stream() if hasattr(loader, "stream") else iter(loader)
    try:
        for taken in range(1, batches + 1):
            source.take(taken)
            next(stream)  # not kept: working on it, the user holds nothing
            window = min(source.n, (taken + depth - 1) * source.batch_size)
            wait_until(lambda: source.loaded() >= window, what=f"the workers fill the window: {window} samples loaded")  # noqa: B023
            ahead = source.ahead()
            assert ahead <= depth - 1, f"a load ran {ahead} batches ahead of the batch in hand, not {depth - 1}"
    finally:
        stream.close()
    assert source.ahead() == depth - 1  # the window was used to the full


@contextlib.contextmanager
def native_threads(count: int):
    """``count`` OS threads that Python does not know about, as a C library's thread pool would be: each
    waits in ``pause()`` (every signal blocked) until it is cancelled, when the block ends."""
    libc = ctypes.CDLL(None)
    handles = []
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # the threads inherit it
    try:
        for _ in range(count):
            handle = ctypes.c_ulong()
            assert libc.pthread_create(ctypes.byref(handle), None, libc.pause, None) == 0
            handles.append(handle)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        yield
    finally:
        for handle in handles:
            libc.pthread_cancel(handle)
            libc.pthread_join(handle, None)


class FailsToUnpickle:
    """A source of 64 numbers that pickles, and raises when unpickled: a spawned coordinator fails at once."""

    def __init__(self) -> None:
        self.n = 64  # some state: without any, unpickling would not call __setstate__

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def __setstate__(self, state: dict) -> None:
        raise RuntimeError("this source cannot be unpickled here")


# --- held up at fork: what a lock held by another thread does to a forked child --------------------------

_fork_hold = None  # what the next child forked from this process runs first (see held_at_fork)
_fork_hook_registered = False


def _first_thing_in_a_forked_child() -> None:
    global _fork_hold
    hold, _fork_hold = _fork_hold, None  # the child's own forks (workers) are not held up
    if hold is not None:
        hold()


@contextlib.contextmanager
def held_at_fork(hold):
    """While inside, a child forked from this process runs ``hold()`` before anything else (an
    ``os.register_at_fork`` hook, as libraries register to reset their state in a child)."""
    global _fork_hold, _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_first_thing_in_a_forked_child)
        _fork_hook_registered = True
    _fork_hold = hold
    try:
        yield
    finally:
        _fork_hold = None


@contextlib.contextmanager
def lock_held_by_a_thread():
    """A lock that another thread (named ``holds-a-lock``) holds while inside: a process forked meanwhile
    gets a copy of it, locked, and no thread of its own to unlock it -- the fork deadlock of a
    multi-threaded program (logging's or torch's locks, a thread pool's queue)."""
    import threading

    lock, taken, done = threading.Lock(), threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            done.wait(60)

    thread = threading.Thread(target=hold, name="holds-a-lock")
    thread.start()
    taken.wait(10)
    try:
        yield lock
    finally:
        done.set()
        thread.join(10)


class ForksAHelperThenHangs:
    """A ``transform`` of ``(x, index)`` samples that, at sample ``index``, forks a helper process and then
    hangs. The helper (as a library's server or a subprocess started without ``close_fds`` would) keeps a
    copy of every descriptor of the worker -- its process sentinel too, so the coordinator sees the
    worker's death only when the helper has gone as well: a worker slow to die, as one stuck in an NFS
    read or tearing down a large memory is. The helper writes its pid to ``helper_pid`` and exits when
    the file ``release`` exists (or after a minute)."""

    def __init__(self, index: int, helper_pid: str, release: str):
        self.index = index
        self.helper_pid = helper_pid
        self.release = release

    def __call__(self, sample):
        x, y = sample
        if int(y) == self.index:
            if os.fork() == 0:  # pragma: no cover - the helper
                with open(self.helper_pid + ".tmp", "w") as file:
                    file.write(str(os.getpid()))
                os.rename(self.helper_pid + ".tmp", self.helper_pid)
                deadline = time.monotonic() + 60
                while not os.path.exists(self.release) and time.monotonic() < deadline:
                    time.sleep(0.01)
                os._exit(0)
            time.sleep(3600)
        return x, y


class SleepsAt:
    """A ``transform`` of ``(x, index)`` samples that sleeps ``seconds`` at sample ``index``."""

    def __init__(self, index: int, seconds: float):
        self.index = index
        self.seconds = seconds

    def __call__(self, sample):
        if int(sample[1]) == self.index:
            time.sleep(self.seconds)
        return sample
