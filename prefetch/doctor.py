"""``prefetch.doctor()``: will this machine (and this loader) run well, before a batch is made?

``prefetch.doctor()`` (or ``python -m prefetch doctor``) reports on the environment;
``prefetch.doctor(loader)`` also on that loader's configuration (``loader.config``). Each
finding is ``ok``, ``warn`` or ``error`` with what was found and how to fix it. The checks of
``/dev/shm`` space, the open-files limit, threads before fork and large Python-object sources
are the pre-flight checks (``prefetch.preflight``, which a loader also runs when it starts its
processes); this module adds the python version and one more:

* **Sharing the cores with the training step.** The training step runs in your process on the
  same cores as the workers: PyTorch's intra-op threads (``torch.get_num_threads()``, read only
  when PyTorch is already imported; the doctor never imports it) plus the workers, against the
  usable cores. More of them than cores is not an error -- workers step back (``worker_nice``) and
  ``train_threads="auto"`` measures fewer training threads -- but it is where a loader can make
  training slower, so the finding says what is in use and what to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .ipc.lifetime import THREAD_ENV_VARS
from .preflight import Finding, check_fds, check_shm, check_sources, check_threads

if TYPE_CHECKING:
    from .core.config import LoaderConfig


@dataclass
class Report:
    """What ``prefetch.doctor()`` found; ``str(report)`` is the printable report."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is an error (warnings allowed)."""
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warn"]

    def __str__(self) -> str:
        lines = ["prefetch doctor"]
        for finding in self.findings:
            lines.append(f"  [{finding.level:<5}] {finding.what}")
            if finding.fix:
                lines.append(f"          fix: {finding.fix}")
        verdict = (
            "errors: the loader will fail"
            if self.errors
            else ("warnings: it will run, read them" if self.warnings else "all good")
        )
        lines.append(f"  {verdict}")
        return "\n".join(lines)


def framework_threads() -> int | None:
    """PyTorch's intra-op threads in this process, or None when PyTorch is not imported (never imports it)."""
    from ._tuning import torch_threads

    return torch_threads()


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _check_cores(config: LoaderConfig | None) -> Finding:
    from .core.config import DEFAULT_WORKER_NICE, usable_cores

    cores = usable_cores()
    workers = config.workers if config is not None else cores
    nice = config.worker_nice if config is not None else DEFAULT_WORKER_NICE
    tuning = config.train_threads if config is not None else "auto"
    loader = (
        f"{'the loader' if config is not None else 'a default loader'}: {_count(workers, 'worker')}, "
        f"worker_nice={nice}, train_threads={tuning!r}"
    )
    env = ", ".join(f"{name}={os.environ[name]}" for name in THREAD_ENV_VARS if name in os.environ)
    env = env or f"{'/'.join(THREAD_ENV_VARS)} unset"
    threads = framework_threads()
    if threads is None:
        return Finding(
            "ok",
            f"cores: {cores} usable; {loader}; PyTorch is not imported in this process, so the training step's "
            f"threads are unknown ({env}): call prefetch.doctor(loader) in your training script, after importing "
            "it, to check them",
        )
    # While the loader runs, an int train_threads is the step's thread count.
    training = tuning if isinstance(tuning, int) else threads
    what = f"cores: {cores} usable; PyTorch imported with {_count(threads, 'intra-op thread')} ({env}); {loader}"
    if training + workers <= cores or workers == 0:
        return Finding(
            "ok", f"{what}: {_count(training, 'training thread')} + {_count(workers, 'worker')} fit the cores"
        )
    handled, change = [], []
    if nice > 0:
        handled.append(f"the workers run at nice +{nice}, so the training step goes first")
    else:
        change.append(f"keep the default worker_nice={DEFAULT_WORKER_NICE}, so the training step goes first")
    if tuning == "auto" and threads > 1:
        handled.append(
            f"train_threads='auto' also times the step at {_count(threads // 2, 'thread')} and keeps the faster"
        )
    elif tuning is None and threads > 1:
        change.append("train_threads='auto' (the default) times the step at fewer threads and keeps the faster")
    fit = max(1, cores - workers)
    yourself = (
        f"torch.set_num_threads({fit}) (or train_threads={fit}), or workers={max(1, cores - training)}; "
        "loader.stats() and StallMonitor show whether the loop then waits for data"
    )
    if change:
        fix = "; ".join(change) + "; or decide yourself: " + yourself
    else:
        fix = "the defaults account for it (" + "; ".join(handled) + "); to decide yourself: " + yourself
    return Finding(
        "warn",
        f"{what}: {_count(training, 'training thread')} + {_count(workers, 'worker')} > {cores} cores, the training "
        "step and the workers compete for them",
        fix,
    )


def doctor(loader: Any = None) -> Report:
    """Check the environment (and ``loader``'s configuration, if given); ``print()`` the report.

    ``loader`` is a ``prefetch.Loader`` (anything with its ``config``).

    Example::

        print(prefetch.doctor())          # or: python -m prefetch doctor
        print(prefetch.doctor(loader))    # with a loader's sizes
    """
    import platform
    import sys

    config: LoaderConfig | None = loader.config if loader is not None else None
    findings = [
        Finding("ok", f"python {sys.version.split()[0]} on {platform.system()} {platform.machine()}"),
        check_shm(config),
        check_fds(config),
        check_threads(config),
        _check_cores(config),
    ]
    if config is not None:
        findings.append(check_sources(config))
    return Report(findings)
