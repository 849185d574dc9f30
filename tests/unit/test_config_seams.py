"""The configuration and the public seams around it: one option list, one validated ``LoaderConfig``
holding its ``order`` and its memory bound, ``Loader.config``, and the modules that must not import
each other."""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import dill
import numpy as np
import pytest

import prefetch
from prefetch.core.config import DEFAULTS, GeneratorOptions, LoaderConfig, LoaderOptions
from prefetch.validation import make_config

X = np.arange(40, dtype=np.float32).reshape(20, 2)
Y = np.arange(20)
PACKAGE = Path(prefetch.__file__).parent


def test_the_option_list_is_written_once_and_everything_agrees_with_it():
    # sources are positional; provenance and auto_workers are what validation found, store what the cache made
    derived = ("sources", "provenance", "auto_workers", "store")
    fields = [f.name for f in dataclasses.fields(LoaderConfig) if f.init and f.name not in derived]
    assert set(LoaderOptions.__optional_keys__) == set(DEFAULTS) == set(fields)
    assert set(GeneratorOptions.__optional_keys__) == set(DEFAULTS) - {"batch_size", "shuffle"}
    assert not LoaderOptions.__required_keys__


@pytest.mark.parametrize(
    "make", [lambda **o: prefetch.Loader(X, **o), lambda **o: prefetch.data_generator(2, X, Y, **o)]
)
def test_an_unknown_option_is_a_type_error_that_names_it(make):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'wokers'.*did you mean 'workers'"):
        make(wokers=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        make(colour="red")


def test_data_generator_cannot_get_batch_size_twice():
    with pytest.raises(TypeError, match="batch_size"):
        prefetch.data_generator(2, X, Y, batch_size=4)  # type: ignore[misc]


def test_executor_is_kept_as_given_and_a_bad_name_says_what_is_accepted():
    assert make_config((X,), batch_size=4, workers=0).executor == "processes"
    assert make_config((X,), batch_size=4, workers=0, executor="ray").executor == "ray"
    custom = object()
    assert make_config((X,), batch_size=4, workers=0, executor=custom).executor is custom
    with pytest.raises(ValueError, match=r"executor must be one of 'processes', 'ray'.*'threads'"):
        make_config((X,), batch_size=4, executor="threads")
    with pytest.raises(TypeError, match=r"executor .* got None"):
        make_config((X,), batch_size=4, executor=None)


def test_the_order_is_made_once_and_held_by_the_config():
    loader = prefetch.Loader(X, Y, batch_size=4, epochs=2, seed=5, workers=0)
    config = loader.config
    assert config.order is config.order
    assert loader.steps_per_epoch == config.order.steps_per_epoch == 5
    assert len(loader) == 5 and config.order.num_batches == 10  # len: batches per epoch
    first = [x.tolist() for x, _ in loader][:1]
    assert first == [X[config.order.batch_indices(0)].tolist()]


def test_a_new_seed_from_a_saved_state_gives_a_new_order():
    loader = prefetch.Loader(X, batch_size=4, seed=1, workers=0)
    state = loader.state_dict()
    state["seed"] = 2
    loader.load_state_dict(state)
    assert loader.config.seed == loader.config.order.seed == 2


@pytest.mark.parametrize("dumps, loads", [(pickle.dumps, pickle.loads), (dill.dumps, dill.loads)])
def test_the_config_pickles_without_its_order_and_makes_it_again(dumps, loads):
    config = make_config((X, Y), batch_size=3, seed=9, workers=0, transform=None)
    config.order.batch_indices(6)  # fills the order's epoch cache
    assert "order" in vars(config)
    copy = loads(dumps(config))
    assert copy.fingerprint() == config.fingerprint() and copy.seed == 9 and "order" not in vars(copy)
    assert [copy.order.batch_indices(b).tolist() for b in range(8)] == [
        config.order.batch_indices(b).tolist() for b in range(8)
    ]


def test_the_memory_bound_is_computed_in_the_config():
    config = make_config((X,), batch_size=2, workers=2, prefetch=20)
    assert config.credit_step == 2
    assert config.max_slots == 2 * 20 + 2 + 1
    need = config.shm_bytes_needed(1000)
    assert need == (20 * 1000, config.max_slots * 1000)
    assert need.window < need.most


def test_the_loader_shows_its_config_read_only():
    loader = prefetch.Loader(X, batch_size=4, workers=0, seed=3)
    assert isinstance(loader.config, LoaderConfig) and loader.config.seed == 3
    with pytest.raises(AttributeError):
        loader.config = loader.config  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        loader.config.seed = 4  # type: ignore[misc]
    assert prefetch.doctor(loader).findings  # doctor reads the loader through loader.config


def test_a_superseded_iterator_raises_a_prefetch_error():
    loader = prefetch.Loader(X, batch_size=2, workers=0, seed=0)
    old = iter(loader)
    next(old)
    next(iter(loader))
    with pytest.raises(prefetch.IteratorSupersededError, match="superseded") as info:
        next(old)
    assert isinstance(info.value, prefetch.PrefetchError) and isinstance(info.value, RuntimeError)


def _imports(module: str) -> set[str]:
    """The package modules ``prefetch/<module>.py`` imports, anywhere in the file (``TYPE_CHECKING`` too)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(node.module or "")
    return found


def test_loader_and_doctor_do_not_import_each_other():
    assert "loader" not in _imports("doctor")
    assert "doctor" not in _imports("loader")
    assert "preflight" in _imports("doctor")  # the loader's executor runs it (processes/__init__.py)
    assert not {"loader", "doctor"} & _imports("preflight")
