"""The note that names the batch and the sample of a user-code exception is *shown*: in the traceback the
interpreter prints for an uncaught exception, and in ``traceback.format_exception`` (what pytest and logging
print), on every supported Python, once. 3.11 and later print exception notes; 3.10 prints no ``__notes__``
(unless a backport taught ``traceback`` to, as pytest's ``exceptiongroup`` does in this process), so there
prefetch writes the note into the chained cause (``errors.add_note``): the scripts run without the backport."""

from __future__ import annotations

import re
import traceback

import numpy as np
import pytest
from helpers import run_script

import prefetch

BATCH, BAD = 4, 13  # no shuffle: sample 13 is in batch 13 // 4
SUBPROCESS_TIMEOUT_S = 60

RAISING_SCRIPT = """
import sys

import numpy as np

import prefetch


class BadSample(ValueError):
    pass


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("not picklable")


def transform(sample):
    x, i = sample
    if int(i) == 13:
        raise Unpicklable("cannot travel") if sys.argv[2] == "unpicklable" else BadSample("bad sample 13")
    return sample


def items():
    yield np.zeros(2)
    yield np.ones(2)
    raise BadSample("bad item 2")


if __name__ == "__main__":
    if sys.argv[1] == "background":
        for _ in prefetch.background(items()):
            pass
    data = np.arange(24, dtype=np.float32)
    options = dict(batch_size=4, shuffle=False, epochs=1, workers=int(sys.argv[1]), transform=transform)
    with prefetch.Loader(data, np.arange(24), **options) as loader:
        for _ in loader:
            pass
"""

CASES = {
    # case: (script arguments, the line of the exception itself, the note); 3.10 prints "__main__.BadSample"
    "workers=0": (
        ("0", "raise"),
        r"(__main__\.)?BadSample: bad sample 13",
        rf"prefetch: raised in transform of sample {BAD} of batch {BAD // BATCH}, in the calling process \(workers=0\)",
    ),
    "workers=2": (
        ("2", "raise"),
        r"(__main__\.)?BadSample: bad sample 13",
        rf"prefetch: raised in transform of sample {BAD} of batch {BAD // BATCH}, in worker pid \d+",
    ),
    "remote": (
        ("2", "unpicklable"),
        r"prefetch\.errors\.RemoteError: Unpicklable: cannot travel \(the exception could not be rebuilt here",
        rf"prefetch: raised in transform of sample {BAD} of batch {BAD // BATCH}, in worker pid \d+",
    ),
    "background": (
        ("background", "raise"),
        r"(__main__\.)?BadSample: bad item 2",
        r"prefetch: raised in the background iterable of batch 2, in worker pid \d+",
    ),
}


@pytest.mark.timeout(SUBPROCESS_TIMEOUT_S + 10)
@pytest.mark.parametrize("case", list(CASES))
def test_an_uncaught_exception_prints_the_note(tmp_path, case):
    arguments, exception_line, note = CASES[case]
    process = run_script(tmp_path, "raising.py", RAISING_SCRIPT, *arguments)
    _, err = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert process.returncode == 1, err
    assert len(re.findall(note, err)) == 1, err  # shown, and once
    assert [line for line in err.splitlines() if re.match(exception_line, line)], err


def transform_failing_at_bad(sample):
    _, i = sample
    if int(i) == BAD:
        raise KeyError(f"sample {BAD}")
    return sample


@pytest.mark.parametrize("workers", [0, 2])
def test_format_exception_shows_the_note_and_keeps_notes(workers):
    data = np.arange(24, dtype=np.float32)
    options = dict(batch_size=BATCH, shuffle=False, epochs=1, workers=workers, transform=transform_failing_at_bad)
    with prefetch.Loader(data, np.arange(24), **options) as loader, pytest.raises(KeyError) as info:
        for _ in loader:
            pass
    exc = info.value
    note = f"prefetch: raised in transform of sample {BAD} of batch {BAD // BATCH}, in "
    assert len(exc.__notes__) == 1 and exc.__notes__[0].startswith(note)  # the same attribute on every version
    printed = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    assert printed.count(note) == 1, printed
    assert "transform_failing_at_bad" in printed  # the user's frame, from the worker's traceback or this process
