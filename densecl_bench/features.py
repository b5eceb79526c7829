"""Batched feature extraction with per-layer pooling and an on-disk cache.

One backbone pass fills every requested layer. Each (checkpoint, dataset, split, layer, pooling,
transform, size, bad-image policy, precision) combination is one float32 `.npy` file, read back memory-mapped;
it is written to a temporary name and renamed only when complete, so an interrupted extraction never
leaves a file that looks finished. A JSON sidecar beside it lists the rows of unreadable images left
out under `on_bad_image: skip`. Under torchrun each rank extracts a contiguous shard and rank 0 merges.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densecl_bench import dist
from densecl_bench.backbone import Backbone, pool_feature
from densecl_bench.data import transforms
from densecl_bench.data.base import ImageList, ImageListDataset, check_bad_image_policy, collate_readable
from densecl_bench.engine import precision as precision_mod
from densecl_bench.paths import atomic_path, atomic_write_json
from densecl_bench.progress import bar as progress_bar

log = logging.getLogger(__name__)


def cache_file(
    cache_dir: Path, ckpt_key: str, image_list: ImageList, layer: str, pooling: str, transform: str, size: int,
    *, on_bad_image: str, precision: str,
) -> Path:
    """The cache path of one layer's features; the name hashes everything that changes the numbers.

    The bad-image policy is in the key: a file written under `skip` may lack rows, and a run under
    `raise` must fail on those images rather than read it. (A file written under `raise` has every
    row, but keeping the policies apart means each file's sidecar records what its own policy did.)
    The precision is in the key: bf16 features are other numbers than the fp32 ones.
    """
    listing = hashlib.sha256("\n".join(str(p) for p in image_list.paths).encode()).hexdigest()
    key = json.dumps([ckpt_key, image_list.name, listing, layer, pooling, transform, size, on_bad_image, precision])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe_name = image_list.name.replace("/", "_")
    return cache_dir / ckpt_key[:24] / safe_name / f"{layer}_{pooling}_{transform}{size}_{digest}.npy"


def _loader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int, device: torch.device):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_readable,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


@torch.inference_mode()
def _extract_into(
    backbone: Backbone,
    dataset: torch.utils.data.Dataset,
    name: str,
    outputs: dict[str, np.ndarray],
    pooling: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
    offset: int = 0,
) -> list[int]:
    """Run the backbone over `dataset` under `precision`, write pooled rows into `outputs[layer][index - offset]`.

    Returns the indices of the images that could not be read (`on_bad_image: skip`): they never
    reach the backbone, and their rows keep the zeros of the freshly created output file.
    """
    layers = list(outputs)
    cuda = device.type == "cuda"
    if cuda:
        backbone = backbone.to(memory_format=torch.channels_last)
    bad: list[int] = []
    bar = progress_bar(total=len(dataset), desc=f"extract {name}", unit="img")
    for images, index, skipped in _loader(dataset, batch_size, num_workers, device):
        bad.extend(skipped.tolist())
        bar.update(len(index) + len(skipped))
        if not len(images):
            continue
        images = images.to(device, non_blocking=True)
        if cuda:
            images = images.to(memory_format=torch.channels_last)
        with precision_mod.autocast(precision, device):
            feats = backbone(images, layers)
        rows = (index - offset).numpy()
        for layer in layers:
            outputs[layer][rows] = pool_feature(feats[layer].float(), layer, pooling).cpu().numpy()
    bar.close()
    return bad


@dataclass(frozen=True)
class Features:
    """One image list's pooled features per layer: (N, D) float32, memory-mapped, row i for image i.

    `skipped` are the rows of unreadable images (`on_bad_image: skip`, read from the sidecar): never
    computed, zero, and not features of anything. Benchmarks read `readable()`, which leaves them out.
    """

    arrays: dict[str, np.ndarray]
    files: dict[str, Path]
    skipped: list[int]

    def readable(self, image_list: ImageList) -> tuple[dict[str, np.ndarray], ImageList]:
        """The arrays and `image_list` without the skipped rows, still row-aligned with each other.

        Without skipped rows these are the memory-mapped arrays themselves; with some, an in-memory copy.
        """
        if not self.skipped:
            return self.arrays, image_list
        arrays = {layer: np.delete(a, self.skipped, axis=0) for layer, a in self.arrays.items()}
        return arrays, image_list.without(self.skipped)


def extract(
    backbone: Backbone,
    image_list: ImageList,
    *,
    transform: str,
    layers: Sequence[str],
    pooling: str,
    size: int = 224,
    batch_size: int = 32,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    cache_dir: Path,
    ckpt_key: str,
    on_bad_image: str = "raise",
    precision: str = precision_mod.DEFAULT,
) -> Features:
    """Pooled features of `image_list` per layer, extracted into the cache or read from it.

    A second call with the same arguments reads the cache and runs no forward pass. on_bad_image:
    `raise` stops at the first unreadable image with its path; `skip` leaves it out (`Features.skipped`).
    precision: `fp32` (plain forward, no TF32) or `bf16` (autocast); the pooling is always float32.
    """
    device = torch.device(device)
    check_bad_image_policy(on_bad_image)
    if precision_mod.check(precision) == "fp32":
        precision_mod.ieee_fp32()
    files = {layer: cache_file(cache_dir, ckpt_key, image_list, layer, pooling, transform, size,
                               on_bad_image=on_bad_image, precision=precision) for layer in layers}
    # a file without its sidecar (a crash between the two renames) is redone: its skipped rows are unknown
    todo = {layer: f for layer, f in files.items() if not (f.exists() and f.with_suffix(".json").exists())}
    if todo:
        dataset = ImageListDataset(image_list, transforms.build(transform, size), on_bad_image)
        backbone.eval()
        dims = _pooled_dims(backbone, dataset, list(todo), pooling, device)
        if dist.world_size() > 1:
            _extract_sharded(backbone, dataset, todo, dims, pooling, batch_size, num_workers, device, precision)
        else:
            with _outputs(todo, len(dataset), dims) as outputs:
                bad = _extract_into(backbone, dataset, image_list.name, outputs, pooling, batch_size,
                                    num_workers, device, precision)
            _write_meta(todo, image_list, bad)
    skipped = json.loads(files[layers[0]].with_suffix(".json").read_text())["bad_indices"]
    if skipped and dist.is_main():
        log.warning("%s: %d unreadable images left out (on_bad_image: skip), e.g. %s; their rows are listed in %s",
                    image_list.name, len(skipped), [str(image_list.paths[i]) for i in skipped[:5]],
                    files[layers[0]].with_suffix(".json"))
    return Features({layer: np.load(files[layer], mmap_mode="r") for layer in layers}, files, skipped)


def _pooled_dims(backbone: Backbone, dataset: ImageListDataset, layers: Sequence[str], pooling: str,
                 device: torch.device) -> dict[str, int]:
    """Pooled dims per layer, from one blank image through the real transform and backbone."""
    image = dataset.transform(Image.new("RGB", (256, 256))).unsqueeze(0).to(device)
    with torch.inference_mode():
        feats = backbone(image, layers)
    return {layer: pool_feature(feats[layer].float(), layer, pooling).shape[1] for layer in layers}


@contextlib.contextmanager
def _outputs(files: dict[str, Path], n: int, dims: dict[str, int]) -> Iterator[dict[str, np.ndarray]]:
    """Memory-mapped float32 outputs at temporary paths, renamed into place only on success."""
    with contextlib.ExitStack() as stack:
        outputs = {
            layer: np.lib.format.open_memmap(stack.enter_context(atomic_path(f)), mode="w+", dtype=np.float32,
                                             shape=(n, dims[layer]))
            for layer, f in files.items()
        }
        yield outputs
        for out in outputs.values():
            out.flush()
        outputs.clear()


def _extract_sharded(backbone, dataset, files: dict[str, Path], dims: dict[str, int], pooling, batch_size,
                     num_workers, device, precision) -> None:
    """Each rank extracts rows [start, stop) into its own part file; rank 0 concatenates them."""
    n, world, rank = len(dataset), dist.world_size(), dist.rank()
    bounds = [n * r // world for r in range(world + 1)]
    shard = torch.utils.data.Subset(dataset, range(bounds[rank], bounds[rank + 1]))
    parts = {layer: f.with_suffix(f".part{rank}.npy") for layer, f in files.items()}
    with _outputs(parts, len(shard), dims) as outputs:
        bad = _extract_into(backbone, shard, dataset.image_list.name, outputs, pooling, batch_size, num_workers,
                            device, precision, offset=bounds[rank])
    atomic_write_json(next(iter(parts.values())).with_suffix(".bad.json"), bad)
    dist.barrier()
    if dist.is_main():
        bad_all: list[int] = []
        with _outputs(files, n, dims) as outputs:
            for r in range(world):
                for layer, final in files.items():
                    part = final.with_suffix(f".part{r}.npy")
                    outputs[layer][bounds[r] : bounds[r + 1]] = np.load(part, mmap_mode="r")
                    part.unlink()
                bad_file = next(iter(files.values())).with_suffix(f".part{r}.bad.json")
                bad_all += json.loads(bad_file.read_text())
                bad_file.unlink()
        _write_meta(files, dataset.image_list, bad_all)
    dist.barrier()


def _write_meta(files: dict[str, Path], image_list: ImageList, bad: list[int]) -> None:
    """A JSON sidecar per cache file: row count and the rows of the skipped (unreadable) images."""
    for f in files.values():
        atomic_write_json(f.with_suffix(".json"), {"n": len(image_list), "bad_indices": sorted(bad)})
