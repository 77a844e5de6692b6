"""What a render worker can run with its settings, told from files alone (no weights loaded, no network).

A render worker publishes this with its heartbeat (``jobs.store.Store.register_worker``) and
``GET /limits`` reports what every live render worker can run, so that a client (the studio)
offers only those variants, conditionings and the refiner, and names the model that renders.
Each check reads a config file of a local directory or of the local hub cache: a file that is
not there means "cannot run", which is what the worker would find when a job asks for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from grounded_sd.names import CONDITIONINGS
from lmd.settings import Settings


class RenderCapabilities(BaseModel):
    """What a render worker (or every render worker, in ``GET /limits``) can run."""

    model: str = Field(description="the Stable Diffusion model that renders: a hub id, or a local directory's name")
    scheduler: str = Field(description="the diffusers scheduler class (LMD_SCHEDULER); a request cannot choose another")
    variants: list[str] = Field(description="lmd and sd always; lmd_plus when the UNet has GLIGEN (attention_type 'gated')")
    conditionings: list[str] = Field(description="clip always; ella and gluenet when their files are here")
    gluenet_languages: list[str] = Field(description="the languages with a GlueNet checkpoint here")
    refiner: bool = Field(description="an SDXL refiner is configured (LMD_REFINER) and its files are here")
    model_name: str | None = Field(None, description="the LMD_MODELS name it serves (its queue render.<name>); null without LMD_MODELS")
    loras: list[str] = Field(default_factory=list, description="the LMD_LORAS names whose files are here")


def _local_or_cached(source: str, filename: str) -> Path | None:
    """``filename`` inside a local directory ``source``, or of hub repository ``source`` in the local cache."""
    local = Path(source).expanduser()
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    if local.is_file() or source.startswith(("/", ".", "~")) or source.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, filename)
    return Path(found) if isinstance(found, str) else None


def _file_here(source: str) -> bool:
    """A local file, or ``owner/repo/path/in/repo`` already in the local hub cache."""
    local = Path(source).expanduser()
    if local.is_file():
        return True
    parts = source.split("/")
    if len(parts) < 3 or source.startswith(("/", ".", "~")):
        return False
    return _local_or_cached("/".join(parts[:2]), "/".join(parts[2:])) is not None


def _has_gligen(model: str) -> bool:
    config = _local_or_cached(model, "unet/config.json")
    if config is None:
        return False
    try:
        return json.loads(config.read_text()).get("attention_type") == "gated"
    except (OSError, ValueError):
        return False


def model_name(model: str) -> str:
    """How a client may see the model: a hub id as is, a local directory by its name only (no paths)."""
    local = Path(model).expanduser()
    return local.name if local.exists() or model.startswith(("/", ".", "~")) else model


def render_capabilities(settings: Settings) -> RenderCapabilities:
    """What a render worker with ``settings`` can run."""
    from lmd.wiring import default_model

    model = default_model(settings)
    variants = ["lmd", "sd"] + (["lmd_plus"] if _has_gligen(model) else [])
    languages = sorted(lang for lang, path in settings.gluenet_checkpoints.items() if _file_here(path))
    xlmr = languages and _local_or_cached(settings.gluenet_xlmr, "config.json") is not None
    ella = _file_here(settings.ella_checkpoint) and _local_or_cached(settings.ella_t5, "config.json") is not None
    conditionings = [c for c in CONDITIONINGS if c == "clip" or (c == "ella" and ella) or (c == "gluenet" and xlmr)]
    refiner = settings.refiner is not None and _local_or_cached(settings.refiner, "model_index.json") is not None
    served = (settings.worker_model or next(iter(settings.models))) if settings.models else None
    loras = [name for name, path in settings.loras.items() if _file_here(path)]
    return RenderCapabilities(model=model_name(model), scheduler=settings.scheduler, variants=variants,
                              conditionings=conditionings, gluenet_languages=languages if xlmr else [],
                              refiner=refiner, model_name=served, loras=loras)


def common(capabilities: list[RenderCapabilities]) -> RenderCapabilities | None:
    """What every one of several render workers can run (a job may go to any); None for none."""
    if not capabilities:
        return None
    first = capabilities[0]

    def shared(name: str) -> list[str]:
        return [v for v in getattr(first, name) if all(v in getattr(c, name) for c in capabilities)]

    models = {c.model for c in capabilities}
    schedulers = {c.scheduler for c in capabilities}
    names = {c.model_name for c in capabilities}
    return RenderCapabilities(
        model=first.model if len(models) == 1 else " / ".join(sorted(models)),
        scheduler=first.scheduler if len(schedulers) == 1 else " / ".join(sorted(schedulers)),
        variants=shared("variants"), conditionings=shared("conditionings"),
        gluenet_languages=shared("gluenet_languages"), refiner=all(c.refiner for c in capabilities),
        model_name=first.model_name if len(names) == 1 else None, loras=shared("loras"),
    )


def by_model(capabilities: list[RenderCapabilities]) -> dict[str, RenderCapabilities]:
    """What the live workers of each LMD_MODELS name can run (a job of that model may go to any of them)."""
    names = sorted({c.model_name for c in capabilities if c.model_name is not None})
    return {name: common([c for c in capabilities if c.model_name == name]) for name in names}
