"""Strict reading of conditioning checkpoints: every key the module has, no other, same shapes.

A checkpoint that does not match is a :class:`CheckpointMismatch` naming the first offending
key, never a half-loaded module. Pickles are read with ``torch.load(weights_only=True)``, which
refuses anything but tensors and plain containers (no code runs while loading).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from grounded_sd.errors import CheckpointMismatch, ConditioningUnavailable

M = TypeVar("M", bound=torch.nn.Module)


def resolve_file(source: str | Path, setting: str) -> Path:
    """A local file, or ``owner/repo/path/in/repo`` of a hub repository (downloaded, or taken
    from the local hub cache when offline). ``setting`` names where the value came from."""
    local = Path(str(source)).expanduser()
    if local.is_file():
        return local
    parts = str(source).split("/")
    if local.exists() or len(parts) < 3 or str(source).startswith(("/", ".", "~")):
        raise ConditioningUnavailable(f"{setting}: {source} is not a file")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
    except Exception as exc:  # hub errors have many types (offline, 404, auth); all mean "not available"
        raise ConditioningUnavailable(f"{setting}: cannot get {source} from the hub: {str(exc).splitlines()[0]}") from exc


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointMismatch(f"{path} is not a readable safetensors file: {exc}") from exc


def read_tensor_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict, loaded with ``weights_only=True``; anything but a flat
    mapping of names to tensors is refused."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointMismatch(f"{path} holds more than plain tensors; refused (weights_only load: {first})") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointMismatch(f"{path} is not a readable torch checkpoint: {str(exc).splitlines()[0]}") from exc
    if not isinstance(state, dict):
        raise CheckpointMismatch(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointMismatch(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return state


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy ``state`` into ``module`` if and only if the keys and shapes match exactly."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected key {unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        raise CheckpointMismatch(f"{source} does not match {type(module).__name__}: {'; '.join(parts)}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointMismatch(
                f"{source} does not match {type(module).__name__}: key {key!r} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
    module.load_state_dict(state, strict=True)


def load_module(
    build: Callable[[dict[str, torch.Tensor]], M],
    source: str | Path,
    setting: str,
    read: Callable[[Path], dict[str, torch.Tensor]],
) -> M:
    """Find ``source`` (:func:`resolve_file`), ``read`` its tensors, ``build`` the module for
    them (sizes may come from the shapes) and load them into it with :func:`load_strict`."""
    path = resolve_file(source, setting)
    state = read(path)
    module = build(state)
    load_strict(module, state, path)
    return module
