"""Ranks in processes of their own: they never draw their own seeds, so shards never overlap (PRODUCT.md 3.3)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# 250 samples on 2 ranks: 125 each per epoch, none left over.
N = 250
RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import prefetch

    rank, seed = int(sys.argv[1]), json.loads(sys.argv[2])
    try:
        loader = prefetch.Loader(np.arange({n}), batch_size=10, epochs=1, seed=seed, rank=rank, world_size=2,
                                 last_batch="short", workers=0)  # one epoch: exactly the rank's shard
    except ValueError as error:
        print(json.dumps({{"error": str(error)}}))
        sys.exit(3)
    with loader:
        print(json.dumps({{"samples": [int(i) for batch in loader.stream() for i in batch]}}))
    """
).format(n=N)


def run_ranks(seed: int | None) -> list[tuple[int, dict]]:
    """Start rank 0 and rank 1 at once, each in a process of its own; their exit codes and outputs."""
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), json.dumps(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = []
    for process in ranks:
        out, err = process.communicate(timeout=60)
        assert out.strip(), err
        results.append((process.returncode, json.loads(out)))
    return results


@pytest.mark.timeout(90)
def test_two_ranks_without_a_seed_fail_at_construction():
    for rank, (code, result) in enumerate(run_ranks(seed=None)):
        assert code == 3, result
        assert result["error"].startswith(f"seed=None with world_size=2 (this is rank {rank})")
        assert "Pass the same seed on every rank" in result["error"]


@pytest.mark.timeout(90)
def test_two_ranks_with_one_seed_see_disjoint_halves():
    (code0, rank0), (code1, rank1) = run_ranks(seed=1234)
    assert code0 == code1 == 0
    first, second = set(rank0["samples"]), set(rank1["samples"])
    assert len(first) == len(second) == N // 2
    assert not first & second and first | second == set(range(N))
