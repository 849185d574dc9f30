"""``prefetch.doctor()``: will this machine (and this loader) run well, before a batch is made?

``prefetch.doctor()`` (or ``python -m prefetch doctor``) reports on the environment;
``prefetch.doctor(loader)`` also on that loader's configuration (``loader.config``). Each
finding is ``ok``, ``warn`` or ``error`` with what was found and how to fix it. The checks of
``/dev/shm`` space, the open-files limit, threads before fork and large Python-object sources
are the pre-flight checks (``prefetch.preflight``, which a loader also runs when it starts its
processes); this module adds the python version and two more:

* **Where the sizes came from.** ``workers`` and ``prefetch`` with their provenance
  (``LoaderConfig.provenance``, see ``_budget``): the CPUs this rank may use, the per-worker depth and
  the byte budget; a depth deeper than the byte budget allows now is a warning.
* **Sharing the cores with the training step.** The training step runs in your process on the
  same cores as the workers: PyTorch's intra-op threads (``torch.get_num_threads()``, read only
  when PyTorch is already imported; the doctor never imports it) plus the workers, against the
  cores this rank may use (affinity mask and cgroup quota, shared among the ranks on the node).
  More of them than cores is not an error -- workers step back (``worker_nice``) and
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


def _check_budget(config: LoaderConfig | None) -> Finding:
    """Where the loader's workers and prefetch came from (a default loader's, without one); a depth deeper than
    the byte budget allows now is a warning."""
    from . import _budget
    from .sizing import byte_ceiling

    if config is None:
        budget = _budget.cpu_budget()
        level = "warn" if budget.ranks.ignored is not None else "ok"
        return Finding(
            level,
            f"defaults: workers={budget.cpus}: {budget.describe()}; prefetch: per worker, never deeper than the slots "
            "that fit in free /dev/shm and half the available memory (when numpy sources tell a batch's size)",
            f"pass local_ranks=<ranks on this node>, or fix {_budget.LOCAL_RANKS_VAR}" if level == "warn" else "",
        )
    what = "sized: " + "; ".join(config.provenance)
    ceiling = byte_ceiling(config, _budget.shm_dir())
    if isinstance(ceiling, str) or config.prefetch <= ceiling.depth:
        return Finding("ok", what)
    return Finding(
        "warn",
        f"{what}. That is deeper than the byte budget allows now, prefetch={ceiling.depth}: {ceiling.why}",
        f"leave prefetch= unset (it is then sized by the budget), or pass prefetch={ceiling.depth}; or give "
        "/dev/shm and memory more room",
    )


def _rank_cores(config: LoaderConfig | None) -> tuple[int, str, int]:
    """``(cores, in words, a default loader's workers)``: the cores this rank shares with its training step --
    those this process may use, divided among the ranks on the node."""
    from ._budget import Ranks, cpu_budget, local_ranks

    ranks = local_ranks(None)  # the environment's; the loader's own if it was given another
    if config is not None and config.local_ranks != ranks.count:
        ranks = Ranks(config.local_ranks, f"local_ranks={config.local_ranks}")
    budget = cpu_budget(ranks)
    usable = budget.process_cpus
    if budget.ranks.count == 1:
        return usable, f"cores: {usable} usable", budget.cpus
    shown = f"cores: {budget.cpus} for this rank ({usable} usable / {budget.ranks.count} ranks, {budget.ranks.source})"
    return budget.cpus, shown, budget.cpus


def _check_cores(config: LoaderConfig | None) -> Finding:
    from .core.config import DEFAULT_WORKER_NICE

    cores, usable, default_workers = _rank_cores(config)
    workers = config.workers if config is not None else default_workers
    nice = config.worker_nice if config is not None else "auto"
    tuning = config.train_threads if config is not None else "auto"
    loader = (
        f"{'the loader' if config is not None else 'a default loader'}: {_count(workers, 'worker')}, "
        f"worker_nice={nice!r}, train_threads={tuning!r}"
    )
    env = ", ".join(f"{name}={os.environ[name]}" for name in THREAD_ENV_VARS if name in os.environ)
    env = env or f"{'/'.join(THREAD_ENV_VARS)} unset"
    threads = framework_threads()
    if threads is None:
        return Finding(
            "ok",
            f"{usable}; {loader}; PyTorch is not imported in this process, so the training step's "
            f"threads are unknown ({env}): call prefetch.doctor(loader) in your training script, after importing "
            "it, to check them",
        )
    # While the loader runs, an int train_threads is the step's thread count.
    training = tuning if isinstance(tuning, int) else threads
    what = f"{usable}; PyTorch imported with {_count(threads, 'intra-op thread')} ({env}); {loader}"
    if training + workers <= cores or workers == 0:
        return Finding(
            "ok", f"{what}: {_count(training, 'training thread')} + {_count(workers, 'worker')} fit the cores"
        )
    handled, change = [], []
    if nice == "auto":
        handled.append(
            f"worker_nice='auto' steps the workers back to nice +{DEFAULT_WORKER_NICE} once the loop is measured "
            "compute-bound, so the training step goes first"
        )
    elif isinstance(nice, int) and nice > 0:
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
        _check_budget(config),
        _check_cores(config),
    ]
    if config is not None:
        findings.append(check_sources(config))
    return Report(findings)
