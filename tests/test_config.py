import pytest

import fmecompile as fme
from fmecompile.config import parse_bytes


def test_defaults_are_the_exact_passes():
    assert fme.Config().passes == ("slice", "group")


def test_passes_run_in_canonical_order_whatever_the_listing():
    assert fme.Config(passes=["group", "slice"]).passes == ("slice", "group")
    assert fme.Config(passes="group,slice").passes == ("slice", "group")
    assert fme.Config(passes=()).passes == ()


@pytest.mark.parametrize("bad", [("slice", "fuse"), ("slice", "slice"), 3])
def test_bad_passes(bad):
    with pytest.raises(fme.ConfigError):
        fme.Config(passes=bad)


@pytest.mark.parametrize("field", ["spatial_chunks", "temporal_chunks", "memory_budget"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True, "4"])
def test_counts_must_be_positive_ints(field, value):
    if field == "memory_budget" and value == "4":  # a size string, as on the CLI: 4 bytes
        assert fme.Config(memory_budget=value).memory_budget == 4
        return
    with pytest.raises(fme.ConfigError, match=field):
        fme.Config(**{field: value})


def test_rehash_fields_need_the_rehash_pass():
    with pytest.raises(fme.ConfigError, match="rehash"):
        fme.Config(full_steps=3, num_steps=5)
    config = fme.Config(passes=("rehash",), full_steps=3, num_steps=5)
    assert config.full_steps == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(full_steps=3), "needs num_steps"),
    (dict(full_steps=6, num_steps=5), "exceeds"),
    (dict(schedule=(True, False), num_steps=3), "schedule has 2 steps"),
    (dict(schedule=(False, True)), "first step"),
    (dict(schedule=(True, 1)), "booleans"),
    (dict(rehash_threshold=0.0), r"\(0, 1\]"),
    (dict(rehash_threshold=1.5), r"\(0, 1\]"),
])
def test_rehash_field_validation(kwargs, message):
    with pytest.raises(fme.ConfigError, match=message):
        fme.Config(passes=("rehash",), **kwargs)


def test_schedule_is_normalized_to_a_tuple():
    assert fme.Config(passes=("rehash",), schedule=[True, False, True]).schedule == (True, False, True)


def test_from_options_lists_valid_options_on_unknown_key():
    with pytest.raises(fme.ConfigError) as info:
        fme.Config.from_options({"pases": ()})
    assert "pases" in str(info.value) and "spatial_chunks" in str(info.value)
    assert fme.Config.from_options({"passes": ["slice"], "spatial_chunks": 4}).spatial_chunks == 4
    assert fme.Config.from_options(None) == fme.Config()


def test_config_is_frozen_and_replaceable():
    config = fme.Config()
    with pytest.raises(AttributeError):
        config.passes = ()
    assert config.replace(passes=()).passes == ()


@pytest.mark.parametrize("text, expected", [
    ("1GiB", 2**30), ("512MB", 512 * 10**6), ("1.5e9", 1_500_000_000), (1234, 1234), ("2 kib", 2048),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "1 parsec", ""])
def test_parse_bytes_rejects_nonsense(text):
    with pytest.raises(fme.ConfigError):
        parse_bytes(text)
