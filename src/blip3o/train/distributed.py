"""Process-group set-up and FSDP2 sharding: the only place that wraps or shards modules.

One code path for every scale. Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment)
:func:`init_distributed` joins the job's process group; in a plain process it creates a 1-rank group
on an in-process :class:`torch.distributed.HashStore`, so a laptop run is simply the world-size-1 case
of the same code (no port to find, nothing reachable from outside). Backends: NCCL for CUDA tensors
with gloo beside it for CPU tensors (``"cuda:nccl,cpu:gloo"``), gloo alone on CPU.

:func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` (FSDP2, per-parameter DTensor
sharding over dim 0) to the chosen submodules, innermost first, then to the root, as torchtitan's
``parallelize`` does. FSDP2 moves the parameters to the mesh's device, so models are built on CPU.
Because each parameter is its own DTensor, one FSDP unit may mix trainable and frozen parameters;
``requires_grad`` must be set before sharding (see :mod:`blip3o.train.trainable`).

Reference: https://docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

__all__ = ["DistInfo", "cleanup", "init_distributed", "make_mesh", "resolve_device", "shard_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0, the process that writes run files and logs."""
        return self.rank == 0


def resolve_device(device: Literal["auto", "cpu", "cuda"], local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when available, else CPU; CUDA is the ``local_rank``-th GPU of the node."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; use device='cpu' or 'auto'")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: Literal["auto", "cpu", "cuda"] = "auto") -> DistInfo:
    """Join (or create) the default process group and return this process's :class:`DistInfo`.

    Under torchrun the group is initialised from the environment (``env://``); in a plain process a
    1-rank group is created in-process. If a default group already exists (the caller made it), it is
    reused and left alone. On CUDA the process's GPU is set to ``cuda:LOCAL_RANK``.
    """
    env_world = os.environ.get("WORLD_SIZE")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "cuda:nccl,cpu:gloo" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if env_world is not None and "RANK" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    elif dev.type == "cpu" and not _supports_cpu(dist.get_backend()):
        raise ValueError(f"the existing process group uses {dist.get_backend()!r}, which cannot run on CPU")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if env_world is None:
        local_rank = rank % torch.cuda.device_count() if dev.type == "cuda" else 0
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def _supports_cpu(backend: str) -> bool:
    return "gloo" in backend


def cleanup() -> None:
    """Destroy the default process group if one exists (safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def make_mesh(info: DistInfo) -> DeviceMesh:
    """A 1-D device mesh over all ranks (data-parallel sharding, FSDP's ``dp_shard``)."""
    return init_device_mesh(info.device.type, (info.world_size,))


def _match_units(model: nn.Module, fsdp_modules: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Submodules named by an exact path or a class name, deepest first; errors list close names."""
    if isinstance(fsdp_modules, str):
        raise TypeError(f"fsdp_modules must be a sequence of names, not a single str ({fsdp_modules!r})")
    named = [(name, module) for name, module in model.named_modules() if name]
    paths = {name for name, _ in named}
    classes = {type(module).__name__ for _, module in named}
    for entry in fsdp_modules:
        if entry not in paths and entry not in classes:
            close = difflib.get_close_matches(entry, sorted(paths | classes), n=5, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else f"; classes: {', '.join(sorted(classes)[:20])}"
            raise ValueError(f"fsdp_modules: {entry!r} is neither a module path nor a module class name{hint}")
    wanted = set(fsdp_modules)
    units = [(name, module) for name, module in named if name in wanted or type(module).__name__ in wanted]
    # Children must be sharded before their parents: deepest paths first (stable within a depth).
    return sorted(units, key=lambda item: -item[0].count("."))


def shard_model(
    model: nn.Module,
    fsdp_modules: Sequence[str],
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool | None = None,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2 and return it (its class becomes ``FSDP<Class>``).

    Each submodule named in ``fsdp_modules`` (exact dotted path from ``named_modules()``, or class
    name such as ``"Qwen3DecoderLayer"`` matching every instance) becomes its own unit, so its
    parameters are all-gathered only around its own forward and backward; the root unit holds the
    rest. Parameters shared between modules (tied embeddings) must stay in one unit: leave the
    modules that share them to the root. Gradients are averaged over the mesh (reduce-scatter).
    ``reshard_after_forward=None`` is FSDP2's default: free a unit's gathered parameters after its
    forward, except the root's, which backward needs first.
    """
    units = _match_units(model, fsdp_modules)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for _, module in units:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    logger.debug("sharded %s: %d FSDP units + root over %s", type(model).__name__, len(units), mesh)
    return model
