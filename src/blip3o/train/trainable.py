"""Declarative freezing by exact module path, never by substring.

``set_trainable(model, trainable=["dit", "connectors.gen"], frozen=["dit.pos_embed"])`` resolves each
entry against ``model.named_modules()`` (or ``model.named_parameters()`` for a single tensor) and
fails with the closest valid names when an entry matches nothing. This replaces the official code's
``"sana" in name`` tests, where a module called ``sana_vae`` would silently be caught too.

Freeze before sharding: :func:`blip3o.train.distributed.shard_model` copies ``requires_grad`` into the
sharded parameters it creates.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence

from torch import nn

__all__ = ["resolve_paths", "set_trainable", "trainable_parameters"]


def _valid_names(model: nn.Module) -> list[str]:
    modules = [name for name, _ in model.named_modules() if name]
    params = [name for name, _ in model.named_parameters()]
    return sorted(set(modules) | set(params))


def _unknown_path(path: str, model: nn.Module, what: str) -> ValueError:
    valid = _valid_names(model)
    close = difflib.get_close_matches(path, valid, n=5, cutoff=0.5)
    if not close:
        # A typo deep in a long path scores low against whole names; offer the top-level modules.
        close = [name for name, _ in model.named_children()][:10]
    hint = f"; closest valid paths: {', '.join(close)}" if close else ""
    return ValueError(f"{what}: {path!r} is not a module or parameter path of {type(model).__name__}{hint}")


def resolve_paths(model: nn.Module, paths: Sequence[str], *, what: str = "path") -> dict[str, nn.Parameter]:
    """Parameters under each exact dotted ``path`` (a module's whole subtree, or one parameter).

    The empty path ``""`` is the root. Returns ``{parameter name: parameter}`` for the union. Raises
    ``ValueError`` naming ``what`` and listing the closest valid paths when a path matches nothing.
    """
    if isinstance(paths, str):
        raise TypeError(f"{what} must be a sequence of module paths, not a single str ({paths!r})")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    selected: dict[str, nn.Parameter] = {}
    for path in paths:
        if path in modules:
            prefix = f"{path}." if path else ""
            for name, param in modules[path].named_parameters():
                selected[prefix + name] = param
        elif path in params:
            selected[path] = params[path]
        else:
            raise _unknown_path(path, model, what)
    return selected


def set_trainable(model: nn.Module, trainable: Sequence[str] = (), frozen: Sequence[str] = ()) -> dict[str, int]:
    """Set ``requires_grad`` from exact module paths and return parameter counts.

    If ``trainable`` is empty every parameter starts trainable, otherwise only the listed subtrees do;
    then the ``frozen`` subtrees are frozen (so ``frozen`` wins where the two overlap). Returns
    ``{"trainable": n, "frozen": m}`` in numbers of scalar parameters (shared parameters counted once).
    """
    chosen = resolve_paths(model, trainable, what="trainable") if trainable else None
    to_freeze = resolve_paths(model, frozen, what="frozen")
    train_ids = None if chosen is None else {id(p) for p in chosen.values()}
    freeze_ids = {id(p) for p in to_freeze.values()}
    counts = {"trainable": 0, "frozen": 0}
    for param in model.parameters():  # yields a shared (tied) parameter once
        train = (train_ids is None or id(param) in train_ids) and id(param) not in freeze_ids
        param.requires_grad_(train)
        counts["trainable" if train else "frozen"] += param.numel()
    return counts


def trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of the parameters that require gradients, in registration order."""
    return ((name, param) for name, param in model.named_parameters() if param.requires_grad)
