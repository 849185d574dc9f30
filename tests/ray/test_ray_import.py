"""``import prefetch`` never imports Ray (no ``ray`` marker: this runs in the default test env too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

SCRIPT = """
import sys
import numpy as np
import prefetch
assert "ray" not in sys.modules, "import prefetch imported ray"
executor = prefetch.RayExecutor(actor_options={"num_cpus": 0.5})
assert "ray" not in sys.modules, "constructing a RayExecutor imported ray"
if __name__ == "__main__":
    with prefetch.Loader(np.arange(64), batch_size=8, epochs=1, workers=2) as loader:
        assert len(list(loader)) == 8
    assert "ray" not in sys.modules, "a processes loader imported ray"
    print("no ray")
"""


def test_import_prefetch_and_a_processes_loader_never_import_ray(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=str(ROOT),
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "no ray" in result.stdout
