"""Write and read the shapes world as webdataset tar shards.

Layout of a world directory::

    world.json                 the config it was made with, split sizes, word lists
    prompts.jsonl              held-out GenEval-schema prompt set (tag, include, exclude, prompt, index)
    train_prompts.jsonl        every training prompt record (disjoint in meaning from the held-out ones)
    train/shard-00000.tar ...  samples: <key>.png, <key>.json, <key>.txt and, for edits, <key>.edit.png
    heldout/shard-00000.tar ...

Tar members carry fixed metadata (mtime 0, uid 0, mode 0644) and JSON is written with sorted keys,
so the same config gives the same bytes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from blip3o.config import WorldConfig
from blip3o.config.io import to_dict
from blip3o.world.prompts import eval_prompts, split
from blip3o.world.samples import Sample, make_sample
from blip3o.world.text import split_words

log = logging.getLogger(__name__)
SPLITS = ("train", "heldout")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
        len(data),
        0,
        0o644,
        0,
        0,
        "",
        "",
    )
    tar.addfile(info, io.BytesIO(data))


def sample_members(sample: Sample) -> dict[str, bytes]:
    """The tar members of one sample, by extension."""
    members = {
        "png": _png(sample.image),
        "json": json.dumps(sample.meta, sort_keys=True).encode(),
        "txt": sample.meta["prompt"].encode(),
    }
    if sample.edit_image is not None:
        members["edit.png"] = _png(sample.edit_image)
    return members


def write_shards(samples: Iterable[Sample], directory: Path, shard_size: int) -> list[Path]:
    """Write samples into ``directory/shard-%05d.tar`` files of ``shard_size`` samples each (atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    samples = iter(samples)
    while chunk := list(islice(samples, shard_size)):
        path = directory / f"shard-{len(paths):05d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in chunk:
                for ext, data in sample_members(sample).items():
                    _add(tar, f"{sample.key}.{ext}", data)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def make_world(cfg: WorldConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Generate a world directory (see the module docstring) and return its summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_pools, held_pools = split(cfg.seed, cfg.heldout_fraction)
    train_words, held_words = split_words(cfg.seed, cfg.heldout_fraction)
    sizes = {"train": cfg.n_train, "heldout": cfg.n_heldout}
    pools = {"train": train_pools, "heldout": held_pools}
    words = {"train": train_words, "heldout": held_words}
    for name in SPLITS:
        samples = (
            make_sample(
                name,
                i,
                seed=cfg.seed,
                pools=pools[name],
                words=words[name],
                size=cfg.size,
                text_size=cfg.text_size,
                text_fraction=cfg.text_fraction,
            )
            for i in range(sizes[name])
        )
        samples = tqdm(samples, total=sizes[name], desc=f"world {name}", disable=not progress, unit="sample")
        write_shards(samples, out / name, cfg.shard_size)
    prompts = eval_prompts(held_pools, cfg.n_prompts, cfg.seed)
    _write_jsonl(out / "prompts.jsonl", prompts)
    _write_jsonl(out / "train_prompts.jsonl", [r for tag in train_pools for r in train_pools[tag]])
    summary = {
        "config": to_dict(cfg),
        "samples": sizes,
        "prompts": len(prompts),
        "train_prompts": sum(len(v) for v in train_pools.values()),
        "heldout_prompt_pool": sum(len(v) for v in held_pools.values()),
        "words": {"train": list(train_words), "heldout": list(held_words)},
    }
    tmp = out / "world.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True))
    os.replace(tmp, out / "world.json")
    return summary


def ensure_world(cfg: WorldConfig, directory: str | Path, progress: bool = True) -> Path:
    """Make the world unless ``directory`` already holds one made with the same config."""
    directory = Path(directory)
    meta = directory / "world.json"
    if meta.is_file() and json.loads(meta.read_text())["config"] == to_dict(cfg):
        log.info("reusing the world in %s", directory)
        return directory
    make_world(cfg, directory, progress=progress)
    return directory


@dataclass
class ReadStats:
    """Counts of what a shard reader saw; bad samples are skipped and counted, never replaced."""

    samples: int = 0
    bad: int = 0
    errors: list[str] = field(default_factory=list)


def read_shards(
    paths: Iterable[str | Path], stats: ReadStats | None = None, max_errors_logged: int = 20
) -> Iterator[dict[str, Any]]:
    """Iterate samples of tar shards as dicts: ``key``, ``image`` (PIL), ``meta`` and optional ``edit_image``.

    A sample whose image or JSON cannot be decoded is skipped and counted in ``stats``.
    """
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        with tarfile.open(path) as tar:
            group: dict[str, bytes] = {}
            key = None
            for member in tar:
                if not member.isfile():
                    continue
                k, _, ext = member.name.partition(".")
                if key is not None and k != key:
                    yield from _decode(key, group, stats, max_errors_logged)
                    group = {}
                key = k
                group[ext] = tar.extractfile(member).read()
            if key is not None:
                yield from _decode(key, group, stats, max_errors_logged)


def _decode(key: str, group: dict[str, bytes], stats: ReadStats, max_errors_logged: int) -> Iterator[dict]:
    try:
        sample = {"key": key, "image": _open(group["png"]), "meta": json.loads(group["json"])}
        if "edit.png" in group:
            sample["edit_image"] = _open(group["edit.png"])
    except (KeyError, OSError, ValueError) as err:
        stats.bad += 1
        message = f"skipped bad sample {key!r}: {type(err).__name__}: {err}"
        stats.errors.append(message)
        if stats.bad <= max_errors_logged:
            log.warning(message)
        return
    stats.samples += 1
    yield sample


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def shard_paths(world: str | Path, split_name: str) -> list[Path]:
    """The shards of one split of a world directory, in order."""
    if split_name not in SPLITS:
        raise ValueError(f"unknown split {split_name!r}; allowed: {', '.join(SPLITS)}")
    paths = sorted((Path(world) / split_name).glob("shard-*.tar"))
    if not paths:
        raise FileNotFoundError(f"no shards under {Path(world) / split_name}; make one with `blip3o world make`")
    return paths
