"""Bad arguments fail at construction, with a message naming the option, the value and what is accepted."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import prefetch

# Most cases use batch_size=32 on 10 samples: the warning that says so is tested in test_bad_input.py.
pytestmark = pytest.mark.filterwarnings("ignore:batch_size=.* is larger than:prefetch.PrefetchWarning")

X = np.arange(20, dtype=np.float32).reshape(10, 2)
Y = np.arange(10)


def make(*sources, **options):
    return prefetch.Loader(*(sources or (X, Y)), **{"workers": 0, **options})


# (option, value, error type, what the message must also say about what is accepted)
BAD_OPTIONS = [
    ("batch_size", 0, ValueError, ">= 1"),
    ("batch_size", -1, ValueError, ">= 1"),
    ("batch_size", 2.5, TypeError, "int"),
    ("batch_size", "32", TypeError, "int"),
    ("batch_size", True, TypeError, "int"),
    ("batch_size", None, TypeError, "int"),
    ("workers", -1, ValueError, ">= 0"),
    ("workers", 1.5, TypeError, "int"),
    ("workers", "2", TypeError, "int"),
    ("prefetch", 0, ValueError, ">= 1"),
    ("prefetch", -3, ValueError, ">= 1"),
    ("timeout", 0, ValueError, "> 0"),
    ("timeout", -1.0, ValueError, "> 0"),
    ("timeout", math.nan, ValueError, "> 0"),
    ("timeout", math.inf, ValueError, "finite"),
    ("timeout", "10", TypeError, "seconds"),
    ("timeout", True, TypeError, "seconds"),
    ("epochs", 0, ValueError, ">= 1"),
    ("epochs", -2, ValueError, ">= 1"),
    ("epochs", 1.0, TypeError, "int"),
    ("last_batch", "keep", ValueError, "'wrap', 'short', 'drop'"),
    ("last_batch", None, ValueError, "'wrap', 'short', 'drop'"),
    ("collate", "stack", ValueError, "'auto', 'list' or a callable"),
    ("collate", 3, ValueError, "'auto', 'list' or a callable"),
    ("start_method", "thread", ValueError, "'fork'"),
    ("start_method", 1, ValueError, "'spawn'"),
    ("transform", 3, TypeError, "callable or None"),
    ("transform", "flip", TypeError, "callable or None"),
    ("batch_transform", [], TypeError, "callable or None"),
    ("shuffle", "yes", ValueError, "True, False or 'block'"),
    ("shuffle", "blocks", ValueError, "True, False or 'block'"),
    ("shuffle", 1, TypeError, "True, False or 'block'"),
    ("shuffle", None, TypeError, "True, False or 'block'"),
    ("shuffle", np.array([1, 2]), TypeError, "True, False or 'block'"),
    ("seed", -1, ValueError, ">= 0"),
    ("seed", 1.5, TypeError, "int"),
    ("retries", -1, ValueError, ">= 0"),
    ("world_size", 0, ValueError, ">= 1"),
]


@pytest.mark.parametrize(("option", "value", "error", "accepted"), BAD_OPTIONS, ids=lambda v: repr(v))
def test_a_bad_option_names_itself_its_value_and_what_is_accepted(option, value, error, accepted):
    with pytest.raises(error) as info:
        make(**{option: value})
    message = str(info.value)
    assert option in message, message
    assert repr(value) in message, message
    assert accepted in message, message


@pytest.mark.parametrize(("option", "value", "error", "accepted"), BAD_OPTIONS[:6], ids=lambda v: repr(v))
def test_data_generator_validates_when_called_not_when_first_iterated(option, value, error, accepted):
    options = {option: value}
    batch_size = options.pop("batch_size", 2)
    with pytest.raises(error, match=re.escape(repr(value))):
        prefetch.data_generator(batch_size, X, Y, workers=0, **options)


@pytest.mark.parametrize(("rank", "world_size"), [(2, 2), (5, 2), (-1, 2), (1, 1)])
def test_rank_outside_zero_to_world_size(rank, world_size):
    with pytest.raises(ValueError, match=r"rank must be .*in \[0, world_size=\d+\); got -?\d+") as info:
        make(rank=rank, world_size=world_size)
    assert f"got {rank}" in str(info.value) and f"world_size={world_size}" in str(info.value)


def test_world_size_larger_than_the_data():
    with pytest.raises(ValueError, match=r"world_size=11 is larger than the data \(10 samples\)") as info:
        make(world_size=11)
    assert "between 1 and 10" in str(info.value)


def test_drop_with_a_batch_larger_than_the_shard():
    with pytest.raises(ValueError, match=r"last_batch='drop' with batch_size=6 larger than the 5 samples"):
        make(batch_size=6, last_batch="drop", world_size=2, seed=0)
    make(batch_size=5, last_batch="drop", world_size=2, seed=0).close()  # exactly one batch per epoch is fine


def test_no_sources():
    with pytest.raises(TypeError, match="at least one source"):
        prefetch.Loader(batch_size=2, workers=0)


def test_an_empty_source():
    with pytest.raises(ValueError, match=r"empty \(length 0\)"):
        make(np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"empty \(length 0\)"):
        make([], [])


def test_sources_of_different_lengths_say_both_lengths():
    with pytest.raises(ValueError, match="same length") as info:
        make(X, Y[:7])
    assert "source 0 has 10" in str(info.value) and "source 1 has 7" in str(info.value)
    with pytest.raises(ValueError, match="source 1 has 0"):
        make(X, [])


@pytest.mark.parametrize(
    "source",
    [iter(range(10)), (i for i in range(10)), map(float, range(10)), {1, 2, 3}, 42, None],
    ids=["iterator", "generator", "map", "set", "int", "None"],
)
def test_a_source_that_is_not_a_map_style_sequence(source):
    with pytest.raises(TypeError, match="map-style sequence") as info:
        make(source)
    assert type(source).__name__ in str(info.value)
    for hint in re.findall(r"prefetch\.(\w+)\(", str(info.value)):
        assert callable(getattr(prefetch, hint, None)), f"the hint names prefetch.{hint}(), which does not exist"


def test_the_second_source_is_checked_too():
    with pytest.raises(TypeError, match=r"source 1 .* got generator"):
        make(X, (i for i in range(10)))


def test_load_state_dict_from_another_configuration_names_the_field():
    with make(batch_size=2, shuffle=True, epochs=3) as loader:
        state = loader.state_dict()
    for field, options in [
        ("batch_size", dict(batch_size=3, epochs=3)),
        ("shuffle", dict(batch_size=2, shuffle=False, epochs=3)),
        ("epochs", dict(batch_size=2, epochs=2)),
        ("last_batch", dict(batch_size=2, epochs=3, last_batch="short")),
        ("world_size", dict(batch_size=2, epochs=3, world_size=2, seed=0)),
    ]:
        with make(**options) as other, pytest.raises(ValueError, match=rf"saved by a loader with {field}=") as info:
            other.load_state_dict(state)
        assert f"this one has {field}=" in str(info.value)
    with make(np.arange(11), batch_size=2, epochs=3) as other, pytest.raises(ValueError, match="n=10"):
        other.load_state_dict(state)


@pytest.mark.parametrize("state", [None, {}, {"format": 99}, "state"])
def test_load_state_dict_of_something_else(state):
    with make() as loader, pytest.raises(ValueError, match="not a prefetch Loader state"):
        loader.load_state_dict(state)


def test_no_process_is_started_by_a_failed_construction():
    """Validation happens before any engine exists (the no_leaks fixture checks processes too)."""
    with pytest.raises(ValueError):
        prefetch.Loader(X, Y, batch_size=0, workers=2)


@pytest.mark.parametrize("rank", [0, 1])
def test_sharding_without_a_seed_is_refused_saying_to_pass_one_seed_on_every_rank(rank):
    for start in (make, lambda **options: prefetch.data_generator(2, X, Y, workers=0, **options)):
        with pytest.raises(ValueError, match=r"seed=None with world_size=2") as info:
            start(rank=rank, world_size=2)
        text = str(info.value)
        assert f"rank {rank}" in text and "overlap" in text
        assert "Pass the same seed on every rank, e.g. seed=1234 on every rank" in text
    make(rank=rank, world_size=2, seed=7).close()  # one seed, given on every rank: fine
    make(seed=None).close()  # unsharded: a drawn seed is fine


def test_a_shuffled_state_of_the_old_order_is_refused_saying_what_to_do():
    """States of format 1 were saved with 0.2's permutations: resuming one mid-epoch with this version's order
    would repeat and skip samples, so it is refused, with the way out; unshuffled ones kept their order."""
    with make(batch_size=2, epochs=3) as loader:
        state = {**loader.state_dict(), "format": 1, "position": 7}
        with pytest.raises(ValueError, match=r"saved by prefetch 0\.2 \(state format 1\)") as info:
            loader.load_state_dict(state)
        assert "repeat some samples" in str(info.value)
        state["format"] = 2
        state["position"] -= state["position"] % len(loader)  # the way out the message gives
        loader.load_state_dict(state)
        assert loader.position == 5
    with make(batch_size=2, epochs=3, shuffle=False) as loader:
        state = {**loader.state_dict(), "format": 1, "position": 7}
        state["config"] = {key: value for key, value in state["config"].items() if key != "block_size"}
        loader.load_state_dict(state)
        assert loader.position == 7


@pytest.mark.parametrize(
    ("value", "error", "accepted"),
    [(0, ValueError, ">= 1"), (-3, ValueError, ">= 1"), (2.5, TypeError, "int"), ("256", TypeError, "int")],
)
def test_a_bad_block_size_says_what_is_accepted(value, error, accepted):
    with pytest.raises(error) as info:
        make(shuffle="block", block_size=value)
    assert "block_size" in str(info.value) and repr(value) in str(info.value) and accepted in str(info.value)


@pytest.mark.parametrize("shuffle", [True, False])
def test_block_size_without_the_block_order_is_refused(shuffle):
    """It would do nothing: say so, and what to pass instead (as DataLoader refuses a sampler with shuffle)."""
    with pytest.raises(ValueError, match=rf"block_size=100 applies to shuffle='block' only, and shuffle={shuffle}"):
        make(shuffle=shuffle, block_size=100)
    with pytest.raises(ValueError, match="block_size=100 applies to shuffle='block' only"):
        prefetch.data_generator(2, X, Y, shuffle=shuffle, block_size=100, workers=0)


def test_the_block_order_is_an_option_its_size_defaults_and_resume_compares_it():
    from prefetch.core.order import DEFAULT_BLOCK_SIZE

    with make(shuffle="block") as loader:
        assert loader.config.block_size == DEFAULT_BLOCK_SIZE == loader.config.order.block_size
        assert loader.config.order.shuffle == "block"
    with make(shuffle=True) as loader:
        assert loader.config.block_size is None
    with make(shuffle="block", block_size=3, epochs=2, batch_size=2) as loader:
        assert loader.config.order.block_size == 3
        state = loader.state_dict()
        assert state["config"]["shuffle"] == "block" and state["config"]["block_size"] == 3
    for other, field in [
        (make(shuffle="block", block_size=4, epochs=2, batch_size=2), "block_size=3, this one has block_size=4"),
        (make(shuffle=True, epochs=2, batch_size=2), "shuffle='block', this one has shuffle=True"),
    ]:
        with other, pytest.raises(ValueError, match=f"saved by a loader with {field}"):
            other.load_state_dict(state)
