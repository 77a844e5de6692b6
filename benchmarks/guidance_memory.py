"""What guidance keeps per object: the bytes of the activations autograd saves in one guidance
forward (the UNet up to the last guided layer, one row), counted with
``torch.autograd.graph.saved_tensors_hooks`` (deduplicated by storage, weights excluded).
This is the memory each extra object adds while the per-box pass's guidance runs all rows in
one batch (BENCHMARKS.md, "Real size"); ``LMD_MAX_BATCH=k`` caps it at k objects.

    python benchmarks/guidance_memory.py MODEL_DIR --sizes 128 256 [--dtype float32]

MODEL_DIR: a diffusers SD directory (``lmd bench --real-size`` builds one in a scratch
directory; ``grounded_sd.random_model.build_random_sd(path, shape="sd15", clip_vocab=...)``
keeps one). Runs on the CPU, whose SDPA keeps memory linear in the pixels, as CUDA's does.
"""

from __future__ import annotations

import argparse

import torch


def saved_bytes(unet, layers: list[str], size: int, dtype: torch.dtype) -> int:
    from grounded_sd.attention import ForwardStopped, recording_attention

    latent = size // 8
    z = torch.randn(1, 4, latent, latent, dtype=dtype, requires_grad=True)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=dtype)
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage().data_ptr()
        if key not in weights:
            seen.setdefault(key, tensor.untyped_storage().nbytes())
        return tensor

    with recording_attention(unet, layers) as recorder, torch.enable_grad():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), recorder.capture(layers, stop_when_captured=True):
            try:
                unet(z, torch.tensor(500), text)
            except ForwardStopped:
                pass
    return sum(seen.values())


def main() -> None:
    from diffusers import UNet2DConditionModel

    from grounded_sd.attention import default_attention_layers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", torch_dtype=dtype).eval().requires_grad_(False)
    layers = default_attention_layers(unet)
    for size in args.sizes:
        print(f"{size} px, {args.dtype}: guidance keeps {saved_bytes(unet, layers, size, dtype) / 2**20:.1f} MiB per object")


if __name__ == "__main__":
    main()
