"""Tests for blip3o.config: validation, strict loading, overrides, YAML round trips, diffs and presets."""

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from blip3o.config import (
    PRESETS,
    ConfigError,
    EvalConfig,
    RunConfig,
    WorldConfig,
    apply_overrides,
    diff,
    dump_yaml,
    dumps_yaml,
    from_dict,
    get_preset,
    load_yaml,
    resolve,
    to_dict,
)
from blip3o.config import io as config_io


@dataclass(kw_only=True)
class _Inner:
    """Test-local section exercising the generic machinery."""

    mode: Literal["euler", "heun"] = "euler"
    scale: float = 1.0


@dataclass(kw_only=True)
class _Toy:
    """Test-local root with every supported kind of field."""

    flag: bool = False
    ids: list[int] = field(default_factory=lambda: [1, 2])
    shape: tuple[int, ...] = (3, 4)
    pair: tuple[int, str] = (1, "a")
    weights: dict[str, float] = field(default_factory=lambda: {"a": 0.5})
    limit: int | None = None
    inner: _Inner = field(default_factory=_Inner)
    extra: _Inner | None = None


def test_defaults_validate_and_have_documented_values() -> None:
    cfg = RunConfig()
    assert cfg.name == "run"
    assert (cfg.world.size, cfg.world.text_size, cfg.world.seed) == (64, 64, 0)
    assert (cfg.world.n_train, cfg.world.n_heldout, cfg.world.n_prompts) == (2000, 200, 553)
    assert (cfg.world.heldout_fraction, cfg.world.text_fraction, cfg.world.shard_size) == (0.25, 0.1, 1000)
    assert (cfg.eval.images_per_prompt, cfg.eval.seed, cfg.eval.batch_size) == (4, 42, 16)
    assert cfg.eval.n_prompts is None
    assert from_dict(RunConfig, {}) == cfg
    assert from_dict(RunConfig, {"world": {"size": 128}}) == RunConfig(world=WorldConfig(size=128))


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ("world", "size", 16, "[32, 512]"),
        ("world", "size", 1000, "[32, 512]"),
        ("world", "text_size", 31, "[32, 512]"),
        ("world", "heldout_fraction", 0.0, "(0.0, 1.0)"),
        ("world", "heldout_fraction", 1.0, "(0.0, 1.0)"),
        ("world", "heldout_fraction", float("nan"), "(0.0, 1.0)"),
        ("world", "text_fraction", 1.5, "[0.0, 1.0]"),
        ("world", "n_train", 0, ">= 1"),
        ("world", "n_heldout", -1, ">= 0"),
        ("world", "n_prompts", 5, ">= 6"),
        ("world", "shard_size", 0, ">= 1"),
        ("eval", "images_per_prompt", 0, ">= 1"),
        ("eval", "batch_size", 0, ">= 1"),
        ("eval", "n_prompts", 0, ">= 1"),
    ],
)
def test_out_of_range_values_name_the_field_and_range(section: str, key: str, value: object, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, {section: {key: value}})
    assert info.value.key == f"{section}.{key}"
    assert str(info.value).startswith(f"{section}.{key}: must be ")
    assert allowed in str(info.value)
    # Direct construction validates too, naming the field without its section.
    cls = WorldConfig if section == "world" else EvalConfig
    with pytest.raises(ConfigError, match=rf"^{key}: must be "):
        cls(**{key: value})


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"world": {"size": True}}, "world.size", "expected int, got True"),
        ({"world": {"n_train": 10.0}}, "world.n_train", "expected int, got 10.0"),
        ({"world": {"heldout_fraction": "high"}}, "world.heldout_fraction", "expected float, got 'high'"),
        ({"world": {"heldout_fraction": False}}, "world.heldout_fraction", "expected float, got False"),
        ({"eval": {"n_prompts": "all"}}, "eval.n_prompts", "expected int | None, got 'all'"),
        ({"name": 123}, "name", "expected str, got 123"),
        ({"world": [64]}, "world", "expected a mapping for WorldConfig"),
    ],
)
def test_type_mismatches_name_field_expected_type_and_value(data: dict, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, data)
    assert info.value.key == key
    assert fragment in str(info.value)


def test_unknown_key_names_dotted_key_and_lists_allowed_keys() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, {"world": {"colour": "red"}})
    assert info.value.key == "world.colour"
    assert "allowed keys: size, text_size, seed, n_train" in str(info.value)
    with pytest.raises(
        ConfigError, match=r"^decoder: unknown key; allowed keys: name, world, eval, model, recipe, next, grpo$"
    ):
        from_dict(RunConfig, {"decoder": {}})


def test_generic_types_on_a_test_local_tree() -> None:
    toy = from_dict(
        _Toy,
        {
            "flag": True,
            "ids": [5],
            "shape": [1, 2, 3],
            "pair": [7, "b"],
            "weights": {"x": 1},
            "limit": 3,
            "inner": {"mode": "heun", "scale": 2},
            "extra": {},
        },
    )
    assert toy == _Toy(
        flag=True, ids=[5], shape=(1, 2, 3), pair=(7, "b"), weights={"x": 1.0}, limit=3,
        inner=_Inner(mode="heun", scale=2.0), extra=_Inner(),
    )  # fmt: skip
    assert isinstance(toy.inner.scale, float) and isinstance(toy.weights["x"], float)
    assert to_dict(toy)["shape"] == [1, 2, 3]


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"inner": {"mode": "rk4"}}, "inner.mode", "must be one of 'euler', 'heun', got 'rk4'"),
        ({"extra": {"mode": "rk4"}}, "extra.mode", "must be one of 'euler', 'heun'"),
        ({"flag": 1}, "flag", "expected bool, got 1"),
        ({"flag": "yes"}, "flag", "expected bool, got 'yes'"),
        ({"ids": [1, "2"]}, "ids[1]", "expected int, got '2'"),
        ({"ids": 3}, "ids", "expected list[int]"),
        ({"pair": [1, 2, 3]}, "pair", "2 items"),
        ({"weights": {"a": "b"}}, "weights.a", "expected float"),
    ],
)
def test_generic_type_errors(data: dict, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(_Toy, data)
    assert info.value.key == key
    assert fragment in str(info.value)


def test_overrides_of_nested_keys_lists_none_and_sections() -> None:
    base = get_preset("tiny-debug")
    cfg = apply_overrides(
        base, ["world.size=48", "world.heldout_fraction=1e-4", "eval.n_prompts=null", "name=ablation-1"]
    )
    assert cfg.world.size == 48
    assert cfg.world.heldout_fraction == pytest.approx(1e-4)
    assert cfg.eval.n_prompts is None
    assert cfg.name == "ablation-1"
    assert cfg.world.n_train == base.world.n_train  # untouched fields keep the preset's values
    # A mapping for a whole section merges into it.
    merged = apply_overrides(base, ["world={size: 40, seed: 7}"])
    assert (merged.world.size, merged.world.seed, merged.world.n_train) == (40, 7, 64)
    # Later overrides win.
    assert apply_overrides(base, ["world.size=40", "world.size=50"]).world.size == 50

    toy = apply_overrides(_Toy(), ["ids=[7, 8, 9]", "shape=[2]", "limit=5", "extra.scale=3", "weights={b: 2}"])
    assert (toy.ids, toy.shape, toy.limit) == ([7, 8, 9], (2,), 5)
    assert toy.extra == _Inner(scale=3.0)  # an unset optional section starts from its defaults
    assert toy.weights == {"b": 2.0}  # a dict field is replaced, not merged
    assert apply_overrides(toy, ["limit=null", "extra=null"]).extra is None


def test_override_does_not_mutate_the_input() -> None:
    base = get_preset("tiny-debug")
    snapshot = to_dict(base)
    world = base.world
    cfg = apply_overrides(base, ["world.size=128", "eval.seed=1"])
    assert to_dict(base) == snapshot
    assert base.world is world and base.world.size == 32
    assert cfg.world is not base.world and cfg.world.size == 128
    toy = _Toy()
    apply_overrides(toy, ["ids=[9]", "weights.c=1.5"])
    assert toy.ids == [1, 2] and toy.weights == {"a": 0.5}


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("world.size", r"override 'world.size' is malformed: expected dotted.key=value"),
        ("=3", r"override '=3' is malformed"),
        (
            "world.colour=red",
            r"override 'world.colour=red': unknown key 'world.colour'; "
            r"valid keys at 'world': size, text_size",
        ),
        ("colour=red", r"unknown key 'colour'; valid keys: name, world, eval"),
        ("world.size=16", r"override 'world.size=16': world.size: must be an int in \[32, 512\], got 16"),
        ("world.size=big", r"override 'world.size=big': world.size: expected int, got 'big'"),
        ("world={size: 8}", r"override 'world=\{size: 8\}': world.size: must be an int in \[32, 512\]"),
        ("world.size.x=1", r"override 'world.size.x=1': 'world.size' is 32, not a section"),
        ("world.size=[1", r"override 'world.size=\[1': value is not valid YAML"),
        ("eval.n_prompts=25", r"override 'eval.n_prompts=25': eval.n_prompts: must be <= world.n_prompts"),
    ],
)
def test_bad_overrides_quote_the_override(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(get_preset("tiny-debug"), [override])


def test_cross_field_error_from_another_override_lists_all_overrides() -> None:
    pattern = (
        r"eval.n_prompts: must be <= world.n_prompts \(10\) or None, got 12 "
        r"\(after overrides 'world.n_prompts=10'\)"
    )
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(get_preset("tiny-debug"), ["world.n_prompts=10"])


def test_yaml_round_trip_through_a_file(tmp_path: Path) -> None:
    cfg = resolve("tiny-debug", ["world.heldout_fraction=0.1234567890123", "eval.n_prompts=7"])
    path = dump_yaml(cfg, tmp_path / "run" / "config.yaml")
    assert path == tmp_path / "run" / "config.yaml"
    loaded = load_yaml(path, RunConfig)
    assert loaded == cfg
    assert loaded.world.heldout_fraction == 0.1234567890123
    assert path.read_text(encoding="utf-8") == dumps_yaml(cfg)
    assert dumps_yaml(cfg).splitlines()[:3] == ["name: tiny-debug", "world:", "  size: 32"]
    toy = _Toy(shape=(9, 8), pair=(2, "z"), extra=_Inner(mode="heun"))
    assert load_yaml(dump_yaml(toy, tmp_path / "toy.yaml"), _Toy) == toy


def test_load_yaml_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("world:\n  size: 64\n  colour: red\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml: world.colour: unknown key"):
        load_yaml(path, RunConfig)
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert load_yaml(empty, RunConfig) == RunConfig()


def test_dump_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    dump_yaml(get_preset("shapes-demo"), path)
    dump_yaml(get_preset("tiny-debug"), path)  # overwriting leaves no temp file either
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]
    before = path.read_text(encoding="utf-8")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(config_io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        dump_yaml(RunConfig(name="other"), path)
    assert path.read_text(encoding="utf-8") == before  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # and the temp file was removed


def test_diff_lists_exactly_the_changed_keys() -> None:
    base = get_preset("tiny-debug")
    cfg = apply_overrides(base, ["world.size=48", "eval.n_prompts=null", "world.seed=0"])
    assert diff(cfg, base) == {"world.size": (32, 48), "eval.n_prompts": (12, None)}
    assert diff(base, base) == {}
    assert diff(get_preset("shapes-demo"), RunConfig()) == {
        "name": ("run", "shapes-demo"),
        "world.n_train": (2000, 1000),
        "world.n_heldout": (200, 100),
        "world.n_prompts": (553, 120),
        "eval.images_per_prompt": (4, 2),
        "recipe.clip.steps": (600, 400),
        "recipe.vae.steps": (1000, 600),
        "recipe.decoder.steps": (1500, 1000),
        "recipe.understanding.steps": (1500, 1000),
        "recipe.generation.steps": (1500, 1000),
    }
    assert diff(_Toy(shape=(1,)), _Toy()) == {"shape": ([3, 4], [1])}
    with pytest.raises(TypeError):
        diff(RunConfig(), WorldConfig())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(name: str, tmp_path: Path) -> None:
    cfg = get_preset(name)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == name
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    assert load_yaml(dump_yaml(cfg, tmp_path / "c.yaml"), RunConfig) == cfg
    assert get_preset(name) is not cfg and get_preset(name).world is not cfg.world  # fresh objects
    assert all("_" not in key for key in PRESETS)


def test_preset_values() -> None:
    tiny = get_preset("tiny-debug")
    assert dataclasses.asdict(tiny.world) == dict(
        dataclasses.asdict(WorldConfig()), size=32, n_train=64, n_heldout=16, n_prompts=24, shard_size=32
    )
    assert tiny.eval == EvalConfig(images_per_prompt=1, n_prompts=12)
    demo = get_preset("shapes-demo")
    assert dataclasses.asdict(demo.world) == dict(
        dataclasses.asdict(WorldConfig()), n_train=1000, n_heldout=100, n_prompts=120
    )
    assert demo.eval == EvalConfig(images_per_prompt=2)


def test_get_preset_unknown_name_lists_the_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset .huge.; valid presets: blip3o-4b, .*tiny-debug"):
        get_preset("huge")
    with pytest.raises(ConfigError, match=r"did you mean 'tiny-debug'\?"):
        get_preset("tiny_debug")
    with pytest.raises(ConfigError, match="valid presets"):
        resolve("nope", ["world.size=32"])


def test_resolve_is_preset_plus_overrides() -> None:
    cfg = resolve("shapes-demo", ["eval.batch_size=4"])
    assert diff(cfg, get_preset("shapes-demo")) == {"eval.batch_size": (16, 4)}
    assert resolve("shapes-demo") == get_preset("shapes-demo")
    with pytest.raises(TypeError):
        apply_overrides(cfg, "world.size=32")  # type: ignore[arg-type]


def test_connector_layers_need_the_connector_among_the_generation_stages_trainable_paths() -> None:
    resolve("shapes-blip3o", ["model.generation.connector_layers=2"])  # the default paths include it
    with pytest.raises(ConfigError, match=r"trainable: model\.generation\.connector_layers=2 needs"):
        resolve("shapes-blip3o", ["model.generation.connector_layers=2", "recipe.generation.trainable=[queries,head]"])
    with pytest.raises(ConfigError, match=r"generation\.connector_layers"):
        resolve("shapes-blip3o", ["model.generation.connector_layers=-1"])
