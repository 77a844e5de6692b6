"""LoRA adapters on the pipeline's UNet and text encoder, switched per call without reloading the model.

Loading goes through diffusers' own LoRA support (``StableDiffusionLoraLoaderMixin`` over
PEFT): its ``lora_state_dict`` reads diffusers-, PEFT- and kohya/A1111-keyed files alike and
converts them, so this module never parses a LoRA file itself. :class:`LoraAdapters` keeps
every adapter it loaded (one ``load_lora_weights`` per name, the first time a call asks for
it) and activates, per call, exactly the ones asked for with their weights; the others are
disabled. The adapters sit in the UNet's linear layers, so the guidance backward (§2.2)
differentiates through them like through the denoising forwards.

The caller names each adapter's file (:class:`LoraChoice`); which names exist is the
operator's business (``LMD_LORAS``, lmd/wiring.py), never a request's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from grounded_sd.errors import ModelLoadError


class LoraUse(BaseModel):
    """An adapter a render used, as the report and the PNG parameters record it (no path)."""

    name: str
    weight: float = Field(description="the adapter's scale: 1 as trained, 0 off, negative inverts it")


@dataclass(frozen=True)
class LoraChoice:
    """One adapter for one call: its ``name`` (the cache key), its ``path`` and its ``weight``."""

    name: str
    path: str
    weight: float = 1.0

    def use(self) -> LoraUse:
        return LoraUse(name=self.name, weight=self.weight)


class LoraLoadError(ModelLoadError):
    """An adapter's file is missing, is not a LoRA, or does not fit this model; ``name`` says which."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def _host_class():
    """The diffusers mixin over our two modules: ``load_lora_weights`` and ``set_adapters`` need
    only ``unet``, ``text_encoder`` and the few pipeline attributes read while loading."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class Host(StableDiffusionLoraLoaderMixin):
        hf_device_map = None  # no accelerate device map: the modules stay where they are

        def __init__(self, unet, text_encoder):
            self.unet, self.text_encoder = unet, text_encoder

        @property
        def components(self) -> dict:
            return {"unet": self.unet, "text_encoder": self.text_encoder}

    return Host


class LoraAdapters:
    """The adapters loaded into one UNet and text encoder (one per pipeline, kept across calls)."""

    def __init__(self, unet, text_encoder):
        self._host = _host_class()(unet, text_encoder)
        self.loaded: dict[str, str] = {}  # name -> the file it was loaded from
        self.active: list[LoraUse] = []

    def use(self, choices: Sequence[LoraChoice]) -> list[LoraUse]:
        """Make exactly ``choices`` active (loading each new name once); none: every adapter off."""
        names = [c.name for c in choices]
        if len(set(names)) != len(names):
            raise ModelLoadError(f"LoRA adapters named twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
        for choice in choices:
            self._load(choice)
        if not choices:
            if self.loaded:
                self._host.disable_lora()
            self.active = []
            return []
        self._host.enable_lora()
        self._host.set_adapters(names, [c.weight for c in choices])
        self.active = [c.use() for c in choices]
        return self.active

    def _load(self, choice: LoraChoice) -> None:
        known = self.loaded.get(choice.name)
        if known is not None:
            if known != choice.path:
                raise LoraLoadError(choice.name, f"LoRA {choice.name!r} was loaded from another file; restart to change it")
            return
        path = Path(choice.path).expanduser()
        if not path.is_file():
            raise LoraLoadError(choice.name, f"LoRA {choice.name!r}: no file at {path}")
        if path.suffix != ".safetensors":  # .bin/.pt LoRAs are pickles, which can run code when loaded
            raise LoraLoadError(choice.name, f"LoRA {choice.name!r}: {path.name} is not a .safetensors file")
        try:
            self._host.load_lora_weights(str(path), adapter_name=choice.name)
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            self._forget(choice.name)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise LoraLoadError(choice.name, f"LoRA {choice.name!r} cannot be loaded into this model: {first}") from exc
        for module in (self._host.unet, self._host.text_encoder):
            module.requires_grad_(False)  # guidance differentiates the latents only, never the adapters
        self.loaded[choice.name] = choice.path

    def _forget(self, name: str) -> None:
        """Drop what a failed load left behind, so the model runs as before."""
        try:
            if name in {a for adapters in self._host.get_list_adapters().values() for a in adapters}:
                self._host.delete_adapters(name)
        except (ValueError, KeyError, AttributeError):
            pass
