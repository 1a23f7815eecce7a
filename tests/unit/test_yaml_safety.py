"""YAML inputs that used to hang or mislead: alias bombs, duplicate keys, YAML 1.1 numbers."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from mlcil.config.loading import MAX_DEPTH, parse_override, parse_yaml, read_yaml
from mlcil.errors import ConfigError
from mlcil.experiment import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def billion_laughs() -> str:
    """Nine levels of nine aliases each: about 560 bytes that stand for 9**9 strings."""
    lines = ["a: &a [" + ", ".join(['"lolololololololol"'] * 9) + "]"]
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    lines.append("data: {class_order: *i}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# alias bombs


def test_an_alias_bomb_is_refused_at_once_naming_the_file(tmp_path: Path) -> None:
    text = billion_laughs()
    assert 500 < len(text) < 700
    path = tmp_path / "laughs.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(
        ConfigError, match=r"laughs\.yaml, line \d+: aliases expand to more"
    ) as info:
        load_config(path)
    assert time.perf_counter() - started < 1.0
    # The message states the size, never the expanded value.
    assert "lol" not in str(info.value) and len(str(info.value)) < 300


def test_an_alias_bomb_in_an_override_is_refused() -> None:
    levels = ["&a [x, x, x, x, x, x, x, x, x]"]
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"&{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"override 'data\.class_order=.*aliases expand"):
        parse_override("data.class_order=[" + ", ".join(levels) + "]")
    assert time.perf_counter() - started < 1.0


def test_an_alias_that_contains_itself_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("train:\n  epochs: 2\nseed: &s [1, *s]\n")
    with pytest.raises(ConfigError, match=r"loop\.yaml, line 3: alias \*s refers to a collection"):
        read_yaml(path)


def test_modest_aliases_and_merge_keys_still_work() -> None:
    text = (
        "base: &base {epochs: 2, lr: 0.1}\n"
        "classes: &classes [cat, dog]\n"
        "train:\n  <<: *base\n  lr: 0.5\n"  # a merged key may be overridden
        "again: *classes\n"
    )
    assert parse_yaml(text) == {
        "base": {"epochs": 2, "lr": 0.1},
        "classes": ["cat", "dog"],
        "train": {"epochs": 2, "lr": 0.5},
        "again": ["cat", "dog"],
    }


def test_deep_nesting_is_a_clear_error() -> None:
    depth = MAX_DEPTH + 5
    with pytest.raises(ConfigError, match=f"deep.yaml, line 1: nested more than {MAX_DEPTH}"):
        parse_yaml("[" * depth + "]" * depth, "deep.yaml")
    shallow = MAX_DEPTH - 2
    assert parse_yaml("[" * shallow + "]" * shallow) is not None


def test_every_shipped_config_still_loads() -> None:
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert len(files) >= 14
    for path in files:
        assert load_config(path).method.name


# ---------------------------------------------------------------------------------------------
# duplicate keys


def test_a_key_written_twice_names_the_key_and_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("seed: 1\ntrain:\n  epochs: 2\n  lr: 0.1\n  epochs: 30\n")
    message = (
        r"twice\.yaml, line 5: key 'train\.epochs' is written twice in one mapping, on lines 3 "
        r"and 5"
    )
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_section_written_twice_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "sections.yaml"
    path.write_text("train:\n  epochs: 2\nseed: 4\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"key 'train' is written twice .* lines 1 and 4"):
        read_yaml(path)


def test_the_same_key_in_different_mappings_is_fine() -> None:
    assert parse_yaml("a: {x: 1}\nb: {x: 2}\n") == {"a": {"x": 1}, "b": {"x": 2}}


def test_a_duplicate_key_in_an_override_is_an_error() -> None:
    with pytest.raises(
        ConfigError, match=r"override 'train=\{epochs: 1, epochs: 2\}': key 'epochs'"
    ):
        parse_override("train={epochs: 1, epochs: 2}")


# ---------------------------------------------------------------------------------------------
# YAML 1.1 numbers


@pytest.mark.parametrize(
    ("written", "value"),
    [("10", 10), ("0x10", 16), ("0b101", 5), ("0o17", 15), ("1_000", 1000), ("-7", -7), ("0", 0)],
)
def test_integers_read_as_python_writes_them(written: str, value: int) -> None:
    assert parse_yaml(f"v: {written}\n") == {"v": value}
    assert parse_override(f"seed={written}") == ("seed", value)


def test_a_hexadecimal_seed_reaches_the_config(tmp_path: Path) -> None:
    path = tmp_path / "seed.yaml"
    path.write_text("seed: 0x10\ntrain:\n  epochs: 1_000\n")
    config = load_config(path, overrides=["train.batch_size=0b101"])
    assert (config.seed, config.train.epochs, config.train.batch_size) == (16, 1000, 5)


@pytest.mark.parametrize("written", ["010", "-010", "09", "0_7"])
def test_a_leading_zero_is_an_error_naming_key_and_value(tmp_path: Path, written: str) -> None:
    path = tmp_path / "octal.yaml"
    path.write_text(f"train:\n  batch_size: 4\n  epochs: {written}\n")
    value = re.escape(written)
    with pytest.raises(
        ConfigError, match=rf"octal\.yaml, line 3: key 'train\.epochs': {value} is ambiguous"
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"override 'train\.epochs={value}': {value} is ambig"):
        load_config(overrides=[f"train.epochs={written}"])


def test_the_leading_zero_message_says_what_to_write() -> None:
    with pytest.raises(ConfigError) as info:
        parse_yaml("seed: 010\n")
    assert "write 10 for the decimal number, 0o10 for octal, or quote it ('010')" in str(info.value)


def test_a_leading_zero_inside_a_list_names_the_position() -> None:
    with pytest.raises(ConfigError, match=r"key 'data\.class_order\[1\]': 007 is ambiguous"):
        parse_yaml("data:\n  class_order: [5, 007]\n", "order.yaml")
    # Quoted, it is the text the user meant.
    assert parse_yaml("data:\n  class_order: ['5', '007']\n") == {
        "data": {"class_order": ["5", "007"]}
    }


@pytest.mark.parametrize("written", ["1__0", "1_", "0x_", "-0b_"])
def test_misplaced_underscores_are_errors(written: str) -> None:
    with pytest.raises(ConfigError, match=rf"key 'v': {written} is not a valid integer"):
        parse_yaml(f"v: {written}")


def test_sexagesimal_stays_text_and_the_schema_names_the_key(tmp_path: Path) -> None:
    assert parse_yaml("a: 1:00\nb: 1:30.5\n") == {"a": "1:00", "b": "1:30.5"}
    path = tmp_path / "clock.yaml"
    path.write_text("train:\n  epochs: 1:00\n")
    with pytest.raises(
        ConfigError, match=r"train\.epochs: Input should be a valid integer.*'1:00'"
    ):
        load_config(path)
    with pytest.raises(
        ConfigError, match=r"train\.epochs: Input should be a valid integer.*'1:00'"
    ):
        load_config(overrides=["train.epochs=1:00"])


def test_floats_keep_working() -> None:
    assert parse_yaml("[1e-4, 1.5, .5, -2.5e3, 1_000.5, .inf]") == [
        1e-4,
        1.5,
        0.5,
        -2500.0,
        1000.5,
        float("inf"),
    ]
    # Text that only looks a little like a float stays text instead of crashing the loader.
    assert parse_yaml("[+e5, .e5]") == ["+e5", ".e5"]
