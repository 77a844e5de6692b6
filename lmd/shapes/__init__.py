"""The shapes world: coloured shapes on simple backgrounds, small enough to train a text-to-image
model on two CPU cores, with an exact detector, so that the LMD method's effect on images is
measured (docs/shapes.md). Torch is imported only by the training and evaluation modules."""

from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
SHAPES_MODEL = _REPO / "models" / "shapes"  # the trained model shipped in the repository
SHAPES_PROMPTS = _REPO / "benchmarks" / "data" / "shapes_prompts.jsonl"
SHAPES_DETECTOR = "shapes-exact"  # lmd eval's name for lmd.shapes.detector
SHAPES_SIZE = 64
