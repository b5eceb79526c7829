"""`loader: gpu`: loader workers read file bytes, the training device decodes and augments whole batches.

With `loader: cpu` (the default) each worker decodes a JPEG in PIL and runs the MoCo v2 pipeline
twice: on a fast GPU that is the bottleneck of pretraining (issue 15). Here a worker only reads the
file, parses its header (size, format, colour mode: no decode) and draws both views' parameters
inside the same per-(seed, epoch, index) seeded RNG as `augment.TwoViewDataset`, so the two loaders
draw the same crops, factors and coins for a sample. The main process then decodes the batch's
JPEGs in one call on the training device (`torchvision.io.decode_jpeg(device=...)`: nvjpeg on
CUDA, libjpeg-turbo on CPU) and applies `batch_augment.BatchMoCoV2` to each view.

Files the device decoder is not given: anything but a colour (YCbCr) JPEG, i.e. greyscale and
CMYK JPEGs, PNGs and other formats. The worker decodes those in PIL (converted to RGB, as
`load_rgb` does) and hands over pixels instead of bytes. Files that cannot be read at all, or whose
decode fails on the device and then in PIL too (a truncated JPEG), follow `on_bad_image` as in the
CPU loader: `raise` names the path; `skip` fills the slot with the next readable image of the list
(views drawn with the slot's seed), logs it and counts it in `GPUTwoViewLoader.skipped`.

torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (a DeprecationWarning);
`decode_jpeg` works as before, and `decode` below is the one place to change when the project moves.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, Sampler, default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from densecl_bench.data.augment import sample_seed
from densecl_bench.data.base import BadImageError, ImageList, check_bad_image_policy
from densecl_bench.engine.data import EpochLoader
from densecl_bench.pretrain.batch_augment import BatchMoCoV2, Recipe

log = logging.getLogger(__name__)

# what a worker hands over for one image
ENCODED, DECODED, UNREADABLE = 0, 1, 2
# the modes of a JPEG that nvjpeg decodes to RGB as PIL does; others go through PIL
DEVICE_JPEG_MODES = ("RGB",)


class EncodedTwoViewDataset(Dataset):
    """Worker side of `loader: gpu`: item (index, epoch) -> file bytes (or PIL-decoded pixels) and the
    parameters of both views."""

    def __init__(self, image_list: ImageList, recipe: Recipe, seed: int = 0) -> None:
        self.image_list, self.recipe, self.seed = image_list, recipe, seed

    def __len__(self) -> int:
        return len(self.image_list)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, epoch = item
        return self.sample(index, index, epoch)

    def sample(self, slot: int, source: int, epoch: int) -> dict[str, Any]:
        """Image `source` read for `slot`: its views are drawn with the slot's seed (a skipped image's
        slot keeps its randomness, as in `TwoViewDataset`)."""
        data, status, size = read_payload(self.image_list.paths[source])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, slot))
            views = [self.recipe.draw(*size) for _ in range(2)] if status != UNREADABLE else []
        params = default_collate(views) if views else {}
        return {"slot": slot, "source": source, "epoch": epoch, "status": status, "data": data, "params": params}


def read_payload(path: Path) -> tuple[Tensor, int, tuple[int, int]]:
    """(payload, status, (height, width)): the bytes of a colour JPEG, else the PIL-decoded RGB pixels."""
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            if img.format == "JPEG" and img.mode in DEVICE_JPEG_MODES:
                return torch.frombuffer(bytearray(raw), dtype=torch.uint8), ENCODED, (height, width)
            pixels = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
        return torch.empty(0, dtype=torch.uint8), UNREADABLE, (0, 0)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1), DECODED, (height, width)


def collate_encoded(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Payloads stay a list (their sizes differ); everything else is stacked. Unreadable samples have
    no parameters yet: the main process draws them once it has found the slot's substitute."""
    return {
        "slot": [s["slot"] for s in samples], "source": [s["source"] for s in samples],
        "epoch": [s["epoch"] for s in samples], "status": [s["status"] for s in samples],
        "data": [s["data"] for s in samples], "params": [s["params"] for s in samples],
    }


def _pil_decode(data: Tensor) -> Tensor | None:
    """The CPU fallback of a payload the device decoder refused (PIL, as `load_rgb`), or None."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
        return None


def decode(payloads: Sequence[Tensor], status: Sequence[int], device: torch.device) -> list[Tensor | None]:
    """Decode a batch on `device`: all colour JPEGs in one `decode_jpeg` call, pixels moved as they are.

    If the batched call fails (one bad file fails it), each JPEG is decoded alone, and one that
    still fails is tried in PIL on the CPU; None marks what nothing could decode.
    """
    out: list[Tensor | None] = [None] * len(payloads)
    jpegs = [i for i, s in enumerate(status) if s == ENCODED]
    for i, s in enumerate(status):
        if s == DECODED:
            out[i] = payloads[i].to(device, non_blocking=True)
    if not jpegs:
        return out
    try:
        decoded = decode_jpeg([payloads[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = [_decode_one(payloads[i], device) for i in jpegs]
    for i, img in zip(jpegs, decoded, strict=True):
        out[i] = img
    return out


def _decode_one(payload: Tensor, device: torch.device) -> Tensor | None:
    try:
        return decode_jpeg(payload, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        fallback = _pil_decode(payload)
        return None if fallback is None else fallback.to(device)


class GPUTwoViewLoader:
    """Training data of `loader: gpu`: (view_q, view_k) batches, decoded and augmented on `device`.

    Serves the trainer like `engine.EpochLoader` (any epoch from any batch); the sampler is the CPU
    loader's `EpochSampler`, so both loaders see the same images in the same order.
    """

    def __init__(self, image_list: ImageList, recipe: Recipe, sampler: Sampler, batch_size: int,
                 device: torch.device, seed: int = 0, on_bad_image: str = "raise", **loader_kwargs: Any) -> None:
        self.dataset = EncodedTwoViewDataset(image_list, recipe, seed)
        self.on_bad_image = check_bad_image_policy(on_bad_image)
        self.device = torch.device(device)
        self.augment = BatchMoCoV2(recipe)
        self.loader = EpochLoader(self.dataset, sampler, batch_size, drop_last=True, collate_fn=collate_encoded,
                                  **loader_kwargs)
        self.skipped: list[int] = []  # indices of unreadable images whose slot another image took

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        for raw in self.loader.epoch(epoch, start):
            yield self.views(raw)

    def views(self, raw: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """A collated batch of `EncodedTwoViewDataset` items -> both views, N x 3 x size x size each."""
        images = decode(raw["data"], raw["status"], self.device)
        params = list(raw["params"])
        for i, img in enumerate(images):
            if img is None:
                images[i], params[i] = self._substitute(raw["slot"][i], raw["source"][i], raw["epoch"][i])
        stacked = default_collate(params)  # N x 2 x ...
        return tuple(self.augment(images, {k: v[:, view] for k, v in stacked.items()}) for view in (0, 1))

    def _substitute(self, slot: int, source: int, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The next readable image after `source` with the slot's views, or BadImageError under `raise`."""
        paths = self.dataset.image_list.paths
        if self.on_bad_image == "raise":
            raise BadImageError(f"cannot read image {paths[source]}")
        log.warning("skipping unreadable image %s: the next readable image takes its place", paths[source])
        self.skipped.append(source)
        for step in range(1, len(paths)):
            sample = self.dataset.sample(slot, (source + step) % len(paths), epoch)
            img = decode([sample["data"]], [sample["status"]], self.device)[0]
            if img is not None:
                return img, sample["params"]
        raise BadImageError(f"{self.dataset.image_list.name}: none of its {len(paths)} images can be read")
