"""Open-vocabulary detection for the image-level LMD benchmark: OWL-ViT through transformers.

The published image-level protocol (shared data README): OWL-ViT B/32, one text query
``"a photo of a {object}"`` per object of the prompt (with the colour for attribution:
``"a photo of a red backpack"``), score threshold 0.15, class-aware non-maximum suppression
at IoU 0.15. Each surviving box becomes a ``(name, box)`` detection that the benchmark's
rules (``layout_planner.benchmark``) score exactly like a layout's boxes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_DETECTOR = "google/owlvit-base-patch32"
QUERY_TEMPLATE = "a photo of a {name}"


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
        from torchvision.ops import batched_nms

        if not names:
            return []
        queries = [QUERY_TEMPLATE.format(name=name) for name in names]
        inputs = self.processor(text=[queries], images=image.convert("RGB"), return_tensors="pt", truncation=True)
        inputs = {k: v.to(self.config.device) for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self.model(**inputs)
        found = self.processor.image_processor.post_process_object_detection(
            outputs=outputs, threshold=self.config.score_threshold, target_sizes=[(1, 1)]
        )[0]
        boxes = found["boxes"].float().clamp(0.0, 1.0)
        # a box under one pixel wide or high inside the image detects nothing (and makes NMS's IoU undefined)
        width, height = image.size
        visible = (((boxes[:, 2] - boxes[:, 0]) * width >= 1) & ((boxes[:, 3] - boxes[:, 1]) * height >= 1)).nonzero().flatten()
        keep = visible[batched_nms(boxes[visible], found["scores"][visible].float(), found["labels"][visible], self.config.nms_iou)]
        return [
            Detection(
                name=names[int(found["labels"][i])],
                box=tuple(round(float(v), 4) for v in boxes[i].tolist()),
                score=round(float(found["scores"][i]), 4),
            )
            for i in keep.tolist()
        ]
