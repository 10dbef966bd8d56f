"""Named presets: plain functions returning a full :class:`RunConfig`, registered in :data:`PRESETS`.

Presets build on one another with :func:`dataclasses.replace` (as DiT's ``DiT_models`` dict names its
model functions), so each one states only what it changes. A run is ``--preset NAME`` plus dotted
overrides: :func:`resolve`. Preset names use dashes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from blip3o.config.io import apply_overrides
from blip3o.config.schema import ConfigError, RunConfig

__all__ = ["PRESETS", "get_preset", "resolve", "shapes_demo", "tiny_debug"]


def shapes_demo() -> RunConfig:
    """The shapes-world demo: a 1000-sample world, 120 held-out prompts, 2 images per prompt."""
    base = RunConfig(name="shapes-demo")
    return replace(
        base,
        world=replace(base.world, n_train=1000, n_heldout=100, n_prompts=120),
        eval=replace(base.eval, images_per_prompt=2),
    )


def tiny_debug() -> RunConfig:
    """The smallest useful run, for tests and CPU smoke runs: 32 px images, 64 samples, 12 prompts."""
    base = shapes_demo()
    return replace(
        base,
        name="tiny-debug",
        world=replace(base.world, size=32, n_train=64, n_heldout=16, n_prompts=24, shard_size=32),
        eval=replace(base.eval, images_per_prompt=1, n_prompts=12),
    )


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "shapes-demo": shapes_demo,
    "tiny-debug": tiny_debug,
}
"""Preset name -> function building a fresh :class:`RunConfig` (a new object on every call)."""


def get_preset(name: str) -> RunConfig:
    """A fresh config for preset ``name``; an unknown name raises ConfigError listing the valid ones."""
    try:
        build = PRESETS[name]
    except KeyError:
        valid = ", ".join(sorted(PRESETS))
        hint = ""
        if isinstance(name, str) and name.replace("_", "-") in PRESETS:
            hint = f" (did you mean {name.replace('_', '-')!r}?)"
        raise ConfigError(f"unknown preset {name!r}{hint}; valid presets: {valid}") from None
    return build()


def resolve(name: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Preset ``name`` with ``dotted.key=value`` overrides applied and the result validated."""
    return apply_overrides(get_preset(name), overrides)
