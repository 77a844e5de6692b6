"""Training data: images resized and centre-cropped, a resumable sample order, and the
optional on-disk cache of the language models' features.

The order of samples is a pure function of (seed, position): an endless sequence of seeded
permutations of the data set, each process taking its own slice of every micro-step. Resuming
at micro-step ``m`` therefore starts exactly where the interrupted run would have continued,
without replaying the data loader.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from grounded_sd.conditioning.llm import EncodedText, EncoderSpec
from lmd.training.config import Example


def load_image(path: Path, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(pixels in [-1, 1] of shape (3, R, R), original (h, w), crop top-left (y, x) in the resized image)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        original = (image.height, image.width)
        scale = resolution / min(image.width, image.height)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), original, (top, left)


class FeatureCache:
    """One safetensors file per (encoders, caption): the features and mask of each encoder."""

    def __init__(self, directory: Path, encoders: list[EncoderSpec]) -> None:
        self.directory = directory
        self.fingerprint = json.dumps([e.model_dump(mode="json") for e in encoders], sort_keys=True)

    def path(self, caption: str) -> Path:
        digest = hashlib.sha256((self.fingerprint + "\x00" + caption).encode()).hexdigest()
        return self.directory / digest[:2] / f"{digest}.safetensors"

    def has(self, caption: str) -> bool:
        return self.path(caption).is_file()

    def save(self, caption: str, encoded: list[EncodedText], row: int) -> None:
        from safetensors.torch import save_file

        path = self.path(caption)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, part in enumerate(encoded):
            tensors[f"features_{i}"] = part.features[row].detach().cpu().contiguous()
            tensors[f"mask_{i}"] = part.mask[row].cpu().contiguous()
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"n_instruction": json.dumps([p.n_instruction for p in encoded])})
        tmp.replace(path)  # atomic: a reader never sees half a file

    def load(self, caption: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from safetensors.torch import load_file

        tensors = load_file(str(self.path(caption)))
        count = len([k for k in tensors if k.startswith("features_")])
        return [tensors[f"features_{i}"] for i in range(count)], [tensors[f"mask_{i}"] for i in range(count)]


class CaptionedImages(Dataset):
    """Examples as dicts: pixels, caption, original size and crop (SDXL's time ids), and the
    cached features when a cache is given."""

    def __init__(self, examples: list[Example], resolution: int, cache: FeatureCache | None = None) -> None:
        self.examples, self.resolution, self.cache = examples, resolution, cache

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        pixels, original, crop = load_image(example.image, self.resolution)
        item = {"pixels": pixels, "caption": example.caption, "original_size": torch.tensor(original), "crop": torch.tensor(crop)}
        if self.cache is not None:
            features, masks = self.cache.load(example.caption)
            for i, (f, m) in enumerate(zip(features, masks)):
                item[f"features_{i}"], item[f"mask_{i}"] = f, m
        return item


def sample_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class StreamSampler(Sampler[int]):
    """Indices for micro-steps ``start, start+1, ...`` of process ``rank`` of ``world``: sample
    position ``(micro_step * world + rank) * batch + j`` of the endless seeded permutation."""

    def __init__(self, n: int, *, batch_size: int, rank: int, world: int, seed: int, start_micro_step: int, micro_steps: int) -> None:
        self.n, self.batch, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.start, self.stop = start_micro_step, start_micro_step + micro_steps
        self._orders: dict[int, list[int]] = {}

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._orders:
            self._orders = {epoch: sample_order(self.n, self.seed, epoch)}
        return self._orders[epoch][offset]

    def __iter__(self) -> Iterator[int]:
        for micro in range(self.start, self.stop):
            first = (micro * self.world + self.rank) * self.batch
            for j in range(self.batch):
                yield self._at(first + j)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch
