"""The model-agnostic training engine: freezing by module path, FSDP2 sharding, DCP checkpoints, the loop.

A stage supplies a :class:`TrainTask` (model, random-access batches, loss); :func:`train` does the rest::

    summary = train(task, run_cfg.train, run_dir, resume=True, config_to_save=run_cfg)

Launch the same code with ``torchrun --nproc_per_node N`` to shard over N ranks.
"""

from blip3o.train.checkpoint import (
    export_model,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from blip3o.train.distributed import DistInfo, cleanup, init_distributed, make_mesh, shard_model
from blip3o.train.plots import plot_curves
from blip3o.train.trainable import resolve_paths, set_trainable, trainable_parameters
from blip3o.train.trainer import (
    TrainTask,
    build_optimizer,
    iter_metrics,
    lr_at,
    micro_batch_size,
    micro_batch_slice,
    train,
)

__all__ = [
    "DistInfo",
    "TrainTask",
    "build_optimizer",
    "cleanup",
    "export_model",
    "init_distributed",
    "iter_metrics",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "lr_at",
    "make_mesh",
    "micro_batch_size",
    "micro_batch_slice",
    "plot_curves",
    "resolve_paths",
    "save_checkpoint",
    "set_trainable",
    "shard_model",
    "train",
    "trainable_parameters",
]
