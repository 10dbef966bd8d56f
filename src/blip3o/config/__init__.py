"""Typed configuration: the dataclass tree, its I/O (overrides, YAML, diff) and named presets.

A run is a preset plus dotted overrides::

    cfg = resolve("tiny-debug", ["world.size=48", "eval.images_per_prompt=2"])
    dump_yaml(cfg, run_dir / "config.yaml")
"""

from blip3o.config.io import apply_overrides, diff, dump_yaml, dumps_yaml, from_dict, load_yaml, to_dict
from blip3o.config.presets import PRESETS, get_preset, resolve
from blip3o.config.schema import ConfigError, EvalConfig, RunConfig, WorldConfig

__all__ = [
    "PRESETS",
    "ConfigError",
    "EvalConfig",
    "RunConfig",
    "WorldConfig",
    "apply_overrides",
    "diff",
    "dump_yaml",
    "dumps_yaml",
    "from_dict",
    "get_preset",
    "load_yaml",
    "resolve",
    "to_dict",
]
