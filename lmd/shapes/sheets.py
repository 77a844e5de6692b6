"""Pictures of the shapes model for docs/shapes.md: the loss curve, a contact sheet of samples
with the detector's findings, and plain SD beside LMD on the same prompts and seeds.

    python -m lmd.shapes.sheets --log runs/shapes-train/log.jsonl --out docs/shapes

Every PNG carries what made it (a ``parameters`` text chunk), as the project's images do.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, PngImagePlugin

from lmd.shapes import SHAPES_MODEL, SHAPES_PROMPTS, detector, world

TILE = 4  # enlargement of the 64 px images


def _save(image: Image.Image, path: Path, parameters: dict) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(parameters))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


def loss_curve(log: Path, out: Path) -> None:
    """UNet loss (mean of each 50 steps) and autoencoder MSE, on log axes, from the training log."""
    rows: dict[tuple[str, int], float] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows[(row["phase"], row["step"])] = row.get("mse", row["loss"])  # a resumed run rewrites steps: keep the last
    width, height, pad = 720, 300, 40
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    import math

    for panel, (phase, label) in enumerate((("vae", "autoencoder MSE"), ("unet", "UNet loss (eps MSE)"))):
        points = sorted((s, v) for (p, s), v in rows.items() if p == phase)
        if not points:
            continue
        bucket = 50 if phase == "unet" else 20
        means = [(points[i][0], sum(v for _, v in points[i : i + bucket]) / len(points[i : i + bucket])) for i in range(0, len(points), bucket)]
        left = pad + panel * (width // 2)
        right, top, bottom = left + width // 2 - 2 * pad, pad, height - pad
        lows, highs = math.log10(min(v for _, v in means)), math.log10(max(v for _, v in means))
        last = points[-1][0]
        xy = [(left + (right - left) * s / last, bottom - (bottom - top) * (math.log10(v) - lows) / max(1e-9, highs - lows)) for s, v in means]
        draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
        draw.line(xy, fill=(200, 40, 40), width=2)
        draw.text((left, 8), f"{label}, {bucket}-step means", fill=(0, 0, 0))
        draw.text((left, bottom + 6), f"0 .. {last} steps; {means[0][1]:.4f} -> {means[-1][1]:.4f}", fill=(0, 0, 0))
    _save(image, out, {"what": "loss curve", "log": log.name})


def attention_curve(log: Path, out: Path, bucket: int = 50) -> None:
    """The fine-tuning's attention diagnostics (lmd.shapes.grounding.attention_inside): the mean
    attention a caption group's tokens get on its objects' pixels and elsewhere, 50-step means."""
    rows = {r["step"]: r for r in map(json.loads, log.read_text(encoding="utf-8").splitlines()) if "inside" in r}
    points = [rows[s] for s in sorted(rows)]
    width, height, pad = 720, 300, 40
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = pad, width - pad, pad, height - pad
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    last = points[-1]["step"]
    for key, colour in (("inside", (40, 110, 200)), ("outside", (200, 40, 40))):
        means = [(points[i]["step"], sum(r[key] for r in points[i : i + bucket]) / len(points[i : i + bucket]))
                 for i in range(0, len(points), bucket)]  # fmt: skip
        draw.line([(left + (right - left) * s / last, bottom - (bottom - top) * v) for s, v in means], fill=colour, width=2)
        draw.text((right - 230, top + (6 if key == "inside" else 20)), f"{key}: {means[0][1]:.3f} -> {means[-1][1]:.3f}", fill=colour)
    draw.text((left, 8), f"attention of a group's tokens on its objects (blue) and elsewhere (red), {bucket}-step means, 0..1", fill=(0, 0, 0))
    draw.text((left, bottom + 6), f"0 .. {last} fine-tuning steps", fill=(0, 0, 0))
    _save(image, out, {"what": "attention localisation during fine-tuning", "log": log.name})


def _pipeline(model: Path):
    """The model with the world's segmenter in SAM's place, as ``lmd eval --world shapes`` runs it."""
    from grounded_sd import LMDPipeline
    from lmd.shapes.segmenter import ShapesSegmenter

    pipe = LMDPipeline.from_pretrained(model, device="cpu", dtype="float32")
    pipe.sam_predictor = ShapesSegmenter()
    return pipe


def samples_sheet(model: Path, out: Path, *, count: int = 24, seed: int = 0, steps: int = 25) -> list[dict]:
    """Plain SD (no layout) on captions of random scenes, the detector's boxes drawn on each."""
    from layout_planner.layout import Layout

    pipe = _pipeline(model)
    rng = random.Random(seed)
    tiles, rows = [], []
    for index in range(count):
        text = world.full_caption(world.random_scene(rng), rng)
        result = pipe(Layout(objects=[], background=text), seed=seed + index, variant="sd", options=_options(steps))
        found = detector.detect(result.image)
        tiles.append(detector.draw_detections(result.image, found, TILE))
        rows.append({"caption": text, "seed": seed + index, "detected": [d.name for d in found]})
    _save(_grid(tiles, [r["caption"] for r in rows], columns=6), out, {"what": "samples", "model": str(model), "steps": steps, "rows": rows})
    return rows


def _options(steps: int, preset: str = "reference"):
    from grounded_sd import LMDOptions

    return LMDOptions.preset(preset).model_copy(update={"steps": steps})


def _grid(tiles: list[Image.Image], captions: list[str], columns: int) -> Image.Image:
    size = tiles[0].width
    text_h = 30
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * size, rows * (size + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        x, y = (i % columns) * size, (i // columns) * (size + text_h)
        sheet.paste(tile, (x, y))
        words, lines = caption.split(), [""]
        for word in words:
            if len(lines[-1]) + len(word) > 40:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        draw.multiline_text((x + 3, y + size + 1), "\n".join(lines[:2]), fill=(0, 0, 0), spacing=1)
    return sheet


def comparison_sheet(model: Path, out: Path, indices: list[int], *, steps: int = 25, preset: str = "fast") -> list[dict]:
    """For benchmark prompts: plain SD on the prompt | LMD on the perfect layout (boxes drawn), same seed."""
    from layout_planner.benchmark import evaluate, parse_benchmark_prompt
    from layout_planner.layout import Layout

    rows_in = [json.loads(line) for line in SHAPES_PROMPTS.read_text(encoding="utf-8").splitlines()]
    pipe = _pipeline(model)
    tiles, captions, rows = [], [], []
    for index in indices:
        row = rows_in[index]
        layout = Layout.model_validate(row["layout"])
        spec = parse_benchmark_prompt(row["prompt"], row["task"])
        plain = pipe(Layout(objects=[], background=row["prompt"]), seed=index, variant="sd", options=_options(steps, preset)).image
        grounded = pipe(layout, seed=index, variant="lmd", options=_options(steps, preset)).image
        verdicts = []
        for name, image in (("SD", plain), ("LMD", grounded)):
            found = detector.detect(image)
            ok = evaluate(spec, [d.as_rule_input() for d in found]).passed
            verdicts.append(ok)
            tile = detector.draw_detections(image, found, TILE)
            if name == "LMD":
                draw = ImageDraw.Draw(tile)
                for obj in layout.objects:
                    draw.rectangle([v * tile.width for v in obj.box], outline=(255, 0, 255))
            tiles.append(tile)
            captions.append(f"{name} {'pass' if ok else 'FAIL'}: {row['prompt']}")
        rows.append({"index": index, "prompt": row["prompt"], "sd_passed": verdicts[0], "lmd_passed": verdicts[1]})
    _save(_grid(tiles, captions, columns=4), out, {"what": "SD vs LMD", "model": str(model), "steps": steps, "preset": preset,
                                                   "masks": "shapes segmenter", "rows": rows})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmd.shapes.sheets", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/shapes"))
    parser.add_argument("--model", type=Path, default=SHAPES_MODEL)
    parser.add_argument("--log", type=Path, help="the training log (runs/shapes-train/log.jsonl) for the loss curve")
    parser.add_argument("--grounding-log", type=Path, help="the fine-tuning log (--grounding-weight) for its loss and attention curves")
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.log:
        loss_curve(args.log, args.out / "loss.png")
    if args.grounding_log:
        loss_curve(args.grounding_log, args.out / "grounding_loss.png")
        attention_curve(args.grounding_log, args.out / "grounding_attention.png")
    samples = samples_sheet(args.model, args.out / "samples.png", steps=args.steps)
    print(json.dumps(samples, indent=1))
    indices = [0, 40, 105, 130, 160, 190, 210, 250, 280, 310, 345, 380]
    print(json.dumps(comparison_sheet(args.model, args.out / "sd_vs_lmd.png", indices, steps=args.steps), indent=1))


if __name__ == "__main__":
    main()
