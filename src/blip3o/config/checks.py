"""Validation helpers shared by every config section: :class:`ConfigError` and range checks."""

from __future__ import annotations

__all__ = ["ConfigError", "check_float", "check_instance", "check_int"]


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
        """The same error with ``prefix`` (a dotted section path) prepended to its key, unless the key already
        starts with it (sections whose checks name their fields in full, such as ``next.ce_weight``)."""
        if not prefix or self.key == prefix or self.key.startswith(prefix + "."):
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
