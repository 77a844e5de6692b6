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
from grounded_sd.preflight import check_file

M = TypeVar("M", bound=torch.nn.Module)


def resolve_file(source: str | Path, setting: str) -> Path:
    """A local file, or ``owner/repo/path/in/repo`` of a hub repository (downloaded, or taken
    from the local hub cache when offline). ``setting`` names where the value came from."""
    check_file(source, setting)
    local = Path(str(source)).expanduser()
    if local.is_file():
        return local
    parts = str(source).split("/")
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


# Prefixes a whole state dict gets when it is saved from a module that wraps the one we load.
KNOWN_PREFIXES = {
    "module.": "saved from torch's DataParallel / DistributedDataParallel wrapper",
    "_orig_mod.": "saved from a torch.compile'd module",
    "ella.": "saved from a module that holds the connector as its attribute 'ella'",
    "model.": "saved from a module that holds it as its attribute 'model'",
}


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path, setting: str | None = None) -> None:
    """Copy ``state`` into ``module`` if and only if the keys and shapes match exactly; otherwise
    :class:`CheckpointMismatch` naming the file, the ``setting`` it came from, the first key
    expected and not found (or found and not expected), and a prefix that explains it."""
    expected = module.state_dict()
    where = f"{source} (from {setting})" if setting else str(source)
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected key {unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        first = next(iter(expected))
        raise CheckpointMismatch(
            f"{where} does not match {type(module).__name__}, which expects {len(expected)} keys such as {first!r}: "
            f"{'; '.join(parts)}{prefix_hint(set(expected), set(state))}"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointMismatch(
                f"{where} does not match {type(module).__name__}: key {key!r} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
    module.load_state_dict(state, strict=True)


def common_prefix(keys: set[str]) -> str | None:
    """The first dotted part every key shares (``'ella.'``), or None."""
    firsts = {key.split(".", 1)[0] for key in keys if "." in key}
    if len(firsts) != 1 or any("." not in key for key in keys):
        return None
    return firsts.pop() + "."


def prefix_hint(expected: set[str], found: set[str]) -> str:
    """``'; every key carries the prefix ...'`` when stripping a shared prefix from ``found`` gives
    ``expected`` (or adding one gives it), naming the usual cause; else ``''``."""
    prefix = common_prefix(found)
    if prefix and {key.removeprefix(prefix) for key in found} == expected:
        cause = KNOWN_PREFIXES.get(prefix, "saved from a module that wraps this one")
        return (f"; every key carries the prefix {prefix!r} ({cause}): without it the keys match, so save the "
                f"state dict with the prefix stripped")
    prefix = common_prefix(expected)
    if prefix and {prefix + key for key in found} == expected:
        return f"; the keys lack the prefix {prefix!r} the module's keys have: the file holds only a part of it"
    return ""


def load_module(
    build: Callable[[dict[str, torch.Tensor]], M],
    source: str | Path,
    setting: str,
    read: Callable[[Path], dict[str, torch.Tensor]],
) -> M:
    """Find ``source`` (:func:`resolve_file`), ``read`` its tensors, ``build`` the module for
    them (sizes may come from the shapes) and load them into it with :func:`load_strict`.
    A file ``build`` cannot read sizes from is named with ``setting``, and with the prefix
    that explains it when stripping one makes it readable."""
    path = resolve_file(source, setting)
    state = read(path)
    try:
        module = build(state)
    except CheckpointMismatch as exc:
        raise CheckpointMismatch(f"{path} (from {setting}): {exc}{_build_hint(build, state)}") from exc
    load_strict(module, state, path, setting)
    return module


def _build_hint(build: Callable[[dict[str, torch.Tensor]], torch.nn.Module], state: dict[str, torch.Tensor]) -> str:
    """The prefix hint of a file whose sizes could not be read: the module is built (on the meta
    device, no memory) from the state with its shared prefix stripped, and the keys compared."""
    prefix = common_prefix(set(state))
    if prefix is None:
        return ""
    stripped = {key.removeprefix(prefix): value for key, value in state.items()}
    try:
        with torch.device("meta"):
            expected = set(build(stripped).state_dict())
    except (CheckpointMismatch, ValueError, RuntimeError):
        return ""
    return prefix_hint(expected, set(state))
