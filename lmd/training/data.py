"""Training data: images resized and centre-cropped, a resumable sample order, and the
optional on-disk caches of the language models' features and of the VAE's latents.

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


class LatentCache:
    """One safetensors file per (base model, resolution, VAE dtype, image): the VAE posterior's
    mean and standard deviation, and the original size and crop. The mean and std, not a sample,
    are stored, so every micro-step still draws its own latent sample (as without the cache)."""

    def __init__(self, directory: Path, base_model: str, resolution: int, dtype: torch.dtype) -> None:
        self.directory = directory
        self.fingerprint = json.dumps([base_model, resolution, str(dtype)])

    def path(self, image: Path) -> Path:
        stat = image.stat()  # a changed image (size or modification time) is encoded again
        key = f"{self.fingerprint}\x00{image.resolve()}\x00{stat.st_size}\x00{stat.st_mtime_ns}"
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.directory / digest[:2] / f"{digest}.safetensors"

    def has(self, image: Path) -> bool:
        return self.path(image).is_file()

    def save(self, image: Path, mean: torch.Tensor, std: torch.Tensor, original: torch.Tensor, crop: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self.path(image)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": mean, "std": std, "original_size": original, "crop": crop}
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)

    def load(self, image: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path(image)))


class CaptionedImages(Dataset):
    """Examples as dicts: pixels (or, with a latent cache, the cached ``latent_mean`` and
    ``latent_std``), caption, original size and crop (SDXL's time ids), and the cached features
    when a feature cache is given."""

    def __init__(
        self, examples: list[Example], resolution: int, cache: FeatureCache | None = None, latents: LatentCache | None = None
    ) -> None:
        self.examples, self.resolution, self.cache, self.latents = examples, resolution, cache, latents

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        if self.latents is not None:
            stored = self.latents.load(example.image)
            item = {"latent_mean": stored["mean"], "latent_std": stored["std"], "caption": example.caption,
                    "original_size": stored["original_size"], "crop": stored["crop"]}
        else:
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
