"""Open-vocabulary detection for the image-level LMD benchmark: OWL-ViT through transformers.

The published image-level protocol (shared data README, and the LMD repository's
``scripts/owl_vit_eval.py``): OWL-ViT B/32, one text query ``"a photo of a {object}"`` per
object of the prompt, with the indefinite article English wants (``"a photo of an orange
cup"``) and the colour for attribution; each predicted box takes the query of its highest
logit; boxes scoring at least 0.15 are kept (``>=``, as published), then class-aware
non-maximum suppression at IoU 0.15. Boxes are normalised xyxy as OWL-ViT predicts them:
not clipped to the image (the published centres were not), so a box may reach slightly
outside 0..1. Each surviving box becomes a ``(name, box)`` detection that the benchmark's
rules (``layout_planner.benchmark``) score exactly like a layout's boxes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_DETECTOR = "google/owlvit-base-patch32"


def query_text(name: str) -> str:
    """The detector's text for a plain name: ``"red backpack"`` -> ``"a photo of a red backpack"``,
    ``"orange cup"`` -> ``"a photo of an orange cup"`` (the published queries used inflect's article)."""
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"a photo of {article} {name}"


class DetectorLoadError(RuntimeError):
    """The detector's weights or processor cannot be loaded (wrong id or path, offline, not OWL-ViT)."""


class DetectorConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(DEFAULT_DETECTOR, description="hub id or local directory of an OWL-ViT checkpoint")
    score_threshold: float = Field(0.15, ge=0.0, le=1.0, description="published: 0.15")
    nms_iou: float = Field(0.15, ge=0.0, le=1.0, description="class-aware NMS IoU threshold, published: 0.15")
    device: str = "cpu"


class Detection(BaseModel):
    """One detected box: the query's plain name (``"red backpack"``), normalised xyxy, score."""

    model_config = ConfigDict(frozen=True)

    name: str
    box: tuple[float, float, float, float]
    score: float

    def as_rule_input(self) -> tuple[str, tuple[float, float, float, float]]:
        return (self.name, self.box)


class OwlViTDetector:
    """OWL-ViT with the benchmark's queries, threshold and class-aware NMS."""

    def __init__(self, processor, model, config: DetectorConfig):
        self.processor = processor
        self.model = model
        self.config = config

    @classmethod
    def from_pretrained(cls, config: DetectorConfig) -> "OwlViTDetector":
        from transformers import OwlViTForObjectDetection, OwlViTProcessor

        try:
            processor = OwlViTProcessor.from_pretrained(config.model)
            model = OwlViTForObjectDetection.from_pretrained(config.model)
        except (OSError, ValueError, KeyError) as exc:
            raise DetectorLoadError(
                f"cannot load the OWL-ViT detector {config.model!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "give a local directory with --detector or allow hub access"
            ) from exc
        return cls(processor, model.to(config.device).eval(), config)

    def detect(self, image: "Image.Image", names: list[str]) -> list[Detection]:
        """Boxes of ``names`` in ``image``, highest score first (the rules read a name's first box)."""
        import torch

        if not names:
            return []
        queries = [query_text(name) for name in names]
        inputs = self.processor(text=[queries], images=image.convert("RGB"), return_tensors="pt", truncation=True)
        inputs = {k: v.to(self.config.device) for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self.model(**inputs)
        # threshold=-1 keeps every box: the published filter is score >= threshold, transformers' is >
        found = self.processor.image_processor.post_process_object_detection(outputs=outputs, threshold=-1.0, target_sizes=None)[0]
        return select_detections(found["scores"], found["labels"], found["boxes"], names, self.config, image.size)


def select_detections(scores, labels, boxes, names: list[str], config: DetectorConfig, image_size: tuple[int, int]) -> list[Detection]:
    """The published selection: ``score >= threshold`` first, then NMS per query label.

    ``scores`` (N,), ``labels`` (N,) indices into ``names``, ``boxes`` (N, 4) normalised xyxy,
    ``image_size`` (width, height). Boxes under one pixel wide or high are dropped too: they
    detect nothing and make NMS's IoU undefined (0/0); real OWL-ViT weights do not predict
    them, random test weights do. Result ordered by score, highest first.
    """
    from torchvision.ops import batched_nms

    scores, boxes = scores.detach().float().cpu(), boxes.detach().float().cpu()
    labels = labels.detach().cpu()
    width, height = image_size
    visible = ((boxes[:, 2] - boxes[:, 0]) * width >= 1) & ((boxes[:, 3] - boxes[:, 1]) * height >= 1)
    kept = ((scores >= config.score_threshold) & visible).nonzero().flatten()
    kept = kept[batched_nms(boxes[kept], scores[kept], labels[kept], config.nms_iou)]
    return [
        Detection(name=names[int(labels[i])], box=tuple(round(float(v), 6) for v in boxes[i].tolist()), score=round(float(scores[i]), 6))
        for i in kept.tolist()
    ]
