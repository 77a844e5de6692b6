"""Draw a layout's boxes and phrases, on a blank canvas or over a generated image.

Used by ``lmd plan --draw`` (so a person can look at a plan) and by stage 2's overlay.
Pillow only: no torch.
"""

from __future__ import annotations

import colorsys

from PIL import Image, ImageDraw, ImageFont

from layout_planner.layout import Layout


def _colour(index: int) -> tuple[int, int, int]:
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return (int(r * 255), int(g * 255), int(b * 255))


def draw_layout(layout: Layout, image: Image.Image | None = None, size: tuple[int, int] = (512, 512)) -> Image.Image:
    """Return a copy of ``image`` (or a light grey canvas of ``size``) with every box and phrase drawn."""
    canvas = image.convert("RGB").copy() if image is not None else Image.new("RGB", size, (235, 235, 235))
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    line = max(1, round(min(width, height) / 170))
    for index, obj in enumerate(layout.objects):
        colour = _colour(index)
        x0, y0, x1, y1 = obj.box_pixels(width, height)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=line)
        label = f"{obj.id}: {obj.phrase}"
        tx0, ty0, tx1, ty1 = draw.textbbox((x0 + line + 1, y0 + line + 1), label, font=font)
        draw.rectangle([tx0 - 1, ty0 - 1, tx1 + 1, ty1 + 1], fill=colour)
        draw.text((x0 + line + 1, y0 + line + 1), label, fill=(0, 0, 0), font=font)
    if image is None:
        caption = f"background: {layout.background}" + (f" | negative: {layout.negative}" if layout.negative else "")
        draw.text((4, height - 14), caption, fill=(60, 60, 60), font=font)
    return canvas
