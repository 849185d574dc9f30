"""``python -m prefetch demo`` and the README's quick start show the same alphabet batches, and the README's
quick start prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import prefetch
from prefetch import demo

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start() -> str:
    """The first code block of the README's "Quick start" section."""
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "no python block in the README's quick start"
    return match.group(1)


def readme_alphabet() -> tuple[str, list[str]]:
    """The alphabet example's code (the quick start up to the paragraph that shows the batches) and the
    batches its comments show."""
    paragraphs = quick_start().split("\n\n")
    end = next((i for i, text in enumerate(paragraphs) if "\n# (" in text), 0)
    code = "\n\n".join(paragraphs[: end + 1])
    shown = [line[2:].strip() for line in code.splitlines() if line.startswith("# (")]
    return code, shown


def printed(function, *args) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        function(*args)
    return out.getvalue().splitlines()


def test_the_readme_quick_start_prints_what_its_comments_show():
    code, shown = readme_alphabet()
    assert len(shown) >= 2, code
    assert "seed=0" in code and "batch_size=3" in code
    namespace: dict = {"__name__": "readme"}
    try:
        lines = printed(exec, code, namespace)
    finally:
        namespace["gen"].close()
    assert lines == shown


def test_the_demo_prints_the_readme_batches():
    _, shown = readme_alphabet()
    lines = [line.strip() for line in printed(demo.alphabet) if line.strip().startswith("(")]
    assert lines == shown
    assert (demo.ALPHABET_SEED, demo.ALPHABET_BATCH_SIZE) == (0, 3)


def test_the_readme_fit_call_does_not_ask_keras_to_shuffle_a_generator():
    # Keras warns "`shuffle=True` was passed, but will be ignored" for a generator unless shuffle=False
    calls = [line for line in quick_start().splitlines() if "model.fit(" in line]
    assert calls and all("shuffle=False" in call for call in calls)


def test_the_demo_runs_with_any_workers_count_to_the_same_batches():
    # the README says the batches are the same for any number of workers: check it against its comment
    _, shown = readme_alphabet()
    x = [chr(i) for i in range(ord("a"), ord("a") + 26)]
    y = [chr(i) for i in range(ord("A"), ord("A") + 26)]
    for workers in (0, 2):
        gen = prefetch.data_generator(batch_size=3, data_x=x, data_y=y, shuffle=True, seed=0, workers=workers)
        try:
            assert [str(next(gen)) for _ in shown] == shown
        finally:
            gen.close()
