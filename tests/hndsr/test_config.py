from dataclasses import dataclass, field

import pytest

from hndsr.config import ConfigError, from_mapping


@dataclass
class Inner:
    rate: float = 0.5


@dataclass
class Outer:
    name: str
    steps: int = 3
    scales: list[float] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    note: str | None = None
    flag: bool = False


def test_builds_nested_dataclasses_and_converts_ints_to_floats():
    cfg = from_mapping(Outer, {"name": "a", "scales": [2, 2.5], "inner": {"rate": 1}}, where="stage")
    assert cfg == Outer(name="a", scales=[2.0, 2.5], inner=Inner(rate=1.0))
    assert isinstance(cfg.inner.rate, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "a", "stpes": 3}, r"stage\.stpes: unknown key"),
        ({"name": "a", "inner": {"rat": 1}}, r"stage\.inner\.rat: unknown key"),
        ({}, r"stage\.name: missing required key"),
        ({"name": 3}, r"stage\.name: expected a string"),
        ({"name": "a", "steps": 2.5}, r"stage\.steps: expected an integer"),
        ({"name": "a", "steps": True}, r"stage\.steps: expected an integer"),
        ({"name": "a", "scales": [2, "x"]}, r"stage\.scales\[1\]: expected a number"),
        ({"name": "a", "scales": 2}, r"stage\.scales: expected a list"),
        ({"name": "a", "flag": "yes"}, r"stage\.flag: expected true or false"),
        ("not a mapping", r"stage: expected a mapping"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(Outer, data, where="stage")


def test_optional_accepts_none():
    assert from_mapping(Outer, {"name": "a", "note": None}, where="s").note is None
