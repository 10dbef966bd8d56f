"""Typed configuration tree: plain ``@dataclass(kw_only=True)`` sections with field docstrings.

Each section validates itself in ``__post_init__`` and raises :class:`ConfigError` naming the field and
what is allowed (the pattern of torchtitan ``config/configs.py``). Loading, dotted overrides, YAML and
diffs are generic over any dataclass tree and live in :mod:`blip3o.config.io`; named presets live in
:mod:`blip3o.config.presets`.

New sections (model, train, ...) follow the same recipe: a dataclass with an attribute docstring per
field, ``__post_init__`` calling the ``check_*`` helpers below, and a field on :class:`RunConfig` with a
``default_factory``. Nothing else needs to change: io and presets discover fields from the type hints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "ConfigError",
    "EvalConfig",
    "RunConfig",
    "WorldConfig",
    "check_float",
    "check_instance",
    "check_int",
]


class ConfigError(ValueError):
    """A configuration value, key or override is invalid.

    ``key`` is the dotted path of the offending field (``""`` when unknown) and ``detail`` the message
    without it; ``str(err)`` reads ``"world.size: must be an int in [32, 512], got 16"``.
    """

    def __init__(self, detail: str, *, key: str = "") -> None:
        self.key = key
        self.detail = detail
        super().__init__(f"{key}: {detail}" if key else detail)

    def with_prefix(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` (a dotted section path) prepended to its key."""
        if not prefix:
            return self
        return ConfigError(self.detail, key=f"{prefix}.{self.key}" if self.key else prefix)


def _interval(gt: float | None, ge: float | None, lt: float | None, le: float | None) -> str:
    """Human text for a range: ``[32, 512]``, ``(0, 1)``, ``>= 1``."""
    lo, lo_bracket = (gt, "(") if gt is not None else (ge, "[")
    hi, hi_bracket = (lt, ")") if lt is not None else (le, "]")
    if lo is not None and hi is not None:
        return f"in {lo_bracket}{lo}, {hi}{hi_bracket}"
    if lo is not None:
        return f"{'>' if gt is not None else '>='} {lo}"
    if hi is not None:
        return f"{'<' if lt is not None else '<='} {hi}"
    return ""


def _in_range(value: float, gt: float | None, ge: float | None, lt: float | None, le: float | None) -> bool:
    # Written so that NaN fails every bound.
    return (
        (gt is None or value > gt)
        and (ge is None or value >= ge)
        and (lt is None or value < lt)
        and (le is None or value <= le)
    )


def check_int(key: str, value: object, *, ge: int | None = None, le: int | None = None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int (not a bool) within ``[ge, le]``."""
    allowed = " ".join(part for part in ("an int", _interval(None, ge, None, le)) if part)
    if isinstance(value, bool) or not isinstance(value, int) or not _in_range(value, None, ge, None, le):
        raise ConfigError(f"must be {allowed}, got {value!r}", key=key)


def check_float(
    key: str,
    value: object,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a real number (int accepted, bool not) in range."""
    allowed = " ".join(part for part in ("a float", _interval(gt, ge, lt, le)) if part)
    if isinstance(value, bool) or not isinstance(value, int | float) or not _in_range(value, gt, ge, lt, le):
        raise ConfigError(f"must be {allowed}, got {value!r}", key=key)


def check_instance(key: str, value: object, cls: type) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an instance of ``cls`` (for nested sections)."""
    if not isinstance(value, cls):
        raise ConfigError(f"must be a {cls.__name__}, got {value!r} ({type(value).__name__})", key=key)


@dataclass(kw_only=True)
class WorldConfig:
    """The synthetic shapes world: image sizes, sample counts and the held-out prompt split."""

    size: int = 64
    """Side of rendered shape-scene images, in pixels (32..512)."""
    text_size: int = 64
    """Side of rendered text-scene images, in pixels (32..512)."""
    seed: int = 0
    """Seed of the world generator; the same seed gives the same samples and prompt split (>= 0)."""
    n_train: int = 2000
    """Number of training samples (>= 1)."""
    n_heldout: int = 200
    """Number of held-out samples, drawn from the held-out prompt pool (>= 0)."""
    n_prompts: int = 553
    """Size of the held-out GenEval-style prompt set (>= 6, so every tag gets at least one prompt)."""
    heldout_fraction: float = 0.25
    """Share of each tag's prompt pool held out from training, in (0, 1)."""
    text_fraction: float = 0.1
    """Share of samples that are text scenes rather than shape scenes, in [0, 1]."""
    shard_size: int = 1000
    """Samples per webdataset tar shard (>= 1)."""

    def __post_init__(self) -> None:
        check_int("size", self.size, ge=32, le=512)
        check_int("text_size", self.text_size, ge=32, le=512)
        check_int("seed", self.seed, ge=0)
        check_int("n_train", self.n_train, ge=1)
        check_int("n_heldout", self.n_heldout, ge=0)
        check_int("n_prompts", self.n_prompts, ge=6)
        check_float("heldout_fraction", self.heldout_fraction, gt=0.0, lt=1.0)
        check_float("text_fraction", self.text_fraction, ge=0.0, le=1.0)
        check_int("shard_size", self.shard_size, ge=1)


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation of generation on the held-out prompt set."""

    images_per_prompt: int = 4
    """Images generated per prompt (>= 1); GenEval uses 4."""
    seed: int = 42
    """Seed of the evaluation generators, independent of the training seed (>= 0)."""
    batch_size: int = 16
    """Prompts per generation batch (>= 1)."""
    n_prompts: int | None = None
    """Evaluate only the first this many prompts (>= 1); ``None`` evaluates the whole set."""

    def __post_init__(self) -> None:
        check_int("images_per_prompt", self.images_per_prompt, ge=1)
        check_int("seed", self.seed, ge=0)
        check_int("batch_size", self.batch_size, ge=1)
        if self.n_prompts is not None:
            check_int("n_prompts", self.n_prompts, ge=1)


@dataclass(kw_only=True)
class RunConfig:
    """The root of the tree: everything one run needs, dumped to ``run_dir/config.yaml``."""

    name: str = "run"
    """Run name, used for the run directory and logs (non-empty)."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """The synthetic shapes world the run trains and evaluates on."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Generation evaluation settings."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"must be a non-empty str, got {self.name!r}", key="name")
        check_instance("world", self.world, WorldConfig)
        check_instance("eval", self.eval, EvalConfig)
        if self.eval.n_prompts is not None and self.eval.n_prompts > self.world.n_prompts:
            raise ConfigError(
                f"must be <= world.n_prompts ({self.world.n_prompts}) or None, got {self.eval.n_prompts}",
                key="eval.n_prompts",
            )
