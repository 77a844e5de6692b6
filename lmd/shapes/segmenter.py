"""A segmenter for the shapes world with SAM's predictor interface (``set_image``, ``predict``).

LMD cuts each object out of its per-box generation with SAM (paper §2.4; grounded_sd.masks).
SAM's weights cannot be had offline, and on flat coloured shapes a segmenter's answer is not in
doubt: the object is the region of one colour under the click. This gives LMD on the shapes
model the masks SAM would give it, from the detector's colour rule (lmd.shapes.detector), so
that the world measures the method with its masks rather than the attention fallback (ours; the
choice and its effect are in docs/shapes.md).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from lmd.shapes.detector import colour_labels, regions

# How far (pixels at 64 px) from a click on the background the nearest object may lie: the
# click is the attention's peak, which can sit just outside a small object's edge.
_REACH = 3


class ShapesSegmenter:
    """Masks of the object under a point, or of the largest object in a box.

    ``predict`` answers as ``segment_anything.SamPredictor.predict`` does with
    ``multimask_output=True``: three boolean masks, their scores and (unused) logits. The
    candidates are the region grown by one pixel (the soft edge a decoder draws) and the region
    itself (twice: SAM always answers three); when nothing is found all three are empty with score
    0, so grounded_sd.masks falls back to the attention mask, as it does when SAM is unsure."""

    def __init__(self, colour_distance: float = 70.0):
        self.colour_distance = colour_distance
        self._labels: np.ndarray | None = None

    def set_image(self, image: np.ndarray | Image.Image) -> None:
        pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        self._labels = colour_labels(pixels[:, :, :3], self.colour_distance)

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output: bool = True, **_):
        if self._labels is None:
            raise RuntimeError("set_image first")
        labels = self._labels
        if box is not None:
            region = self._largest_in_box(labels, np.asarray(box, dtype=np.float64).reshape(-1)[:4])
        elif point_coords is not None:
            x, y = np.asarray(point_coords, dtype=np.float64).reshape(-1, 2)[0]
            region = self._under_point(labels, int(round(x)), int(round(y)))
        else:
            raise ValueError("give point_coords or box")
        if region is None or not region.any():
            empty = np.zeros((3, *labels.shape), dtype=bool)
            return empty, np.zeros(3, dtype=np.float32), np.zeros((3, *labels.shape), dtype=np.float32)
        masks = np.stack([_grow(region), region, region])
        scores = np.array([0.95, 0.9, 0.9], dtype=np.float32)
        return masks, scores, masks.astype(np.float32)

    @staticmethod
    def _component(labels: np.ndarray, colour: int, y: int, x: int) -> np.ndarray:
        for pixels in regions(labels == colour):
            if ((pixels[:, 0] == y) & (pixels[:, 1] == x)).any():
                return _as_mask(pixels, labels.shape)
        raise AssertionError("the pixel's own colour region exists")

    def _under_point(self, labels: np.ndarray, x: int, y: int) -> np.ndarray | None:
        height, width = labels.shape
        x, y = min(max(x, 0), width - 1), min(max(y, 0), height - 1)
        if labels[y, x] >= 0:
            return self._component(labels, labels[y, x], y, x)
        ys, xs = np.nonzero(labels >= 0)
        if not len(ys):
            return None
        distance = np.hypot(ys - y, xs - x)
        nearest = int(distance.argmin())
        if distance[nearest] > _REACH * max(height, width) / 64:
            return None
        return self._component(labels, labels[ys[nearest], xs[nearest]], ys[nearest], xs[nearest])

    def _largest_in_box(self, labels: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        height, width = labels.shape
        x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
        x1, y1 = min(width, int(np.ceil(box[2]))), min(height, int(np.ceil(box[3])))
        inside = np.zeros_like(labels, dtype=bool)
        inside[y0:y1, x0:x1] = True
        best, best_count = None, 0
        for colour in np.unique(labels[inside]):
            if colour < 0:
                continue
            for pixels in regions(labels == colour):
                count = int(inside[pixels[:, 0], pixels[:, 1]].sum())
                if count > best_count:
                    best, best_count = _as_mask(pixels, labels.shape), count
        return best


def _as_mask(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[pixels[:, 0], pixels[:, 1]] = True
    return mask


def _grow(mask: np.ndarray) -> np.ndarray:
    """``mask`` and its 4-neighbours."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown
