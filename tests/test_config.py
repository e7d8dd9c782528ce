from dataclasses import dataclass, field

import pytest

from finegrain.config import ConfigError, apply_overrides, from_dict, load_yaml, save_yaml, to_dict
from finegrain.registry import Registry


@dataclass
class Inner:
    depth: int = 2
    lr: float = 1e-3
    sizes: tuple[int, int] = (1, 2)
    flag: bool = False


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_from_dict_coerces_and_nests():
    cfg = from_dict(
        Outer, {"name": "y", "inner": {"depth": "3", "lr": "0.1", "sizes": [4, 5], "flag": "true"}}
    )
    assert cfg.inner == Inner(depth=3, lr=0.1, sizes=(4, 5), flag=True)
    assert cfg.name == "y"


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.dept'.*did you mean 'depth'"):
        from_dict(Outer, {"inner": {"dept": 3}})


def test_wrong_type_is_clear():
    with pytest.raises(ConfigError, match=r"inner.depth: expected an integer"):
        from_dict(Outer, {"inner": {"depth": "three"}})


def test_overrides_roundtrip(tmp_path):
    cfg = apply_overrides(Outer(), ["inner.depth=7", "tags=[a,b]", "inner.flag=yes"])
    assert cfg.inner.depth == 7 and cfg.tags == ["a", "b"] and cfg.inner.flag is True
    with pytest.raises(ConfigError, match="did you mean 'inner'"):
        apply_overrides(Outer(), ["iner.depth=1"])
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(Outer, tmp_path / "c.yaml") == cfg
    assert to_dict(cfg)["inner"]["sizes"] == [1, 2]


def test_polymorphic_configs_follow_registry():
    reg: Registry = Registry("thing")

    @dataclass
    class Base:
        __registry__ = reg
        name: str = "a"
        x: int = 1

    @dataclass
    class BCfg(Base):
        name: str = "b"
        y: int = 2

    class A:
        Config = Base

    class B:
        Config = BCfg

    reg.add("a", A)
    reg.add("b", B)

    @dataclass
    class Holder:
        thing: Base = field(default_factory=Base)

    h = from_dict(Holder, {"thing": {"name": "b", "y": 5}})
    assert isinstance(h.thing, BCfg) and h.thing.y == 5
    h2 = apply_overrides(Holder(), ["thing.name=b"])
    assert isinstance(h2.thing, BCfg) and h2.thing.x == 1
    with pytest.raises(ConfigError, match="unknown thing 'c'"):
        from_dict(Holder, {"thing": {"name": "c"}})


def test_registry_errors_list_choices():
    reg: Registry = Registry("method")
    reg.add("clip", object())
    reg.add("siglip", object())
    with pytest.raises(
        ValueError,
        match=r"unknown method 'clp' \(did you mean 'clip'\?\); valid choices: clip, siglip",
    ):
        reg.get("clp")
