"""``lmd train-connector``: train a text connector (an LI-DiT-style token refiner or ELLA's
connector) between a frozen language model and a frozen Stable Diffusion (SD 1.x or SDXL):
ELLA's regime (frozen UNet, only the connector learns), not LI-DiT's (a DiT trained with it).

A config file (YAML or TOML, see docs/training.md) and/or flags; flags win. The whole setup
is checked before any weights load. Multi-GPU or multi-process: run the same command under
``accelerate launch`` (``accelerate launch -m lmd train-connector ...``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lmd.cli import CLIError

# flag -> dotted config key
_FLAGS = {
    "model": "base_model",
    "connector": "connector.kind",
    "blocks": "connector.refiner.blocks",
    "width": "connector.refiner.width",
    "heads": "connector.refiner.heads",
    "guidance": "connector.guidance",
    "data": "data.path",
    "resolution": "data.resolution",
    "caption_dropout": "data.caption_dropout",
    "cache_features": "data.cache_features",
    "cache_latents": "data.cache_latents",
    "holdout": "data.holdout",
    "optimizer": "optimizer.name",
    "snr_gamma": "training.snr_gamma",
    "noise_offset": "training.noise_offset",
    "latents": "training.latents",
    "tracker": "training.tracker",
    "num_workers": "data.num_workers",
    "lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "warmup_steps": "optimizer.warmup_steps",
    "lr_schedule": "optimizer.schedule",
    "steps": "training.steps",
    "batch_size": "training.batch_size",
    "grad_accum": "training.grad_accum",
    "mixed_precision": "training.mixed_precision",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "ema_decay": "training.ema_decay",
    "seed": "training.seed",
    "checkpoint_every": "training.checkpoint_every",
    "validate_every": "validation.every",
    "output": "output_dir",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-connector",
        help="train an LLM text connector (LI-DiT-style refiner or ELLA) for a frozen SD 1.x / SDXL",
        description=(
            "Train a connector between frozen language model(s) and a frozen Stable Diffusion UNet on image-caption "
            "pairs (ELLA's regime: only the connector learns; an 'LI-DiT-style' connector borrows LI-DiT's refiner "
            "design but not its DiT training, and claims none of its results); write checkpoints, validation images "
            "and an export that 'lmd generate --conditioning connector:DIR' loads. Multi-process: "
            "'accelerate launch -m lmd train-connector ...'."
        ),
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML or TOML config (flags override its values)")
    parser.add_argument("--model", metavar="SD", help="base model: SD 1.x or SDXL hub id or diffusers directory")
    parser.add_argument("--encoder", action="append", metavar="LM", help="language model (hub id or directory); twice to fuse two (lidit)")
    parser.add_argument("--encoder-layer", type=int, metavar="N", help="hidden-state index of every encoder (default -3 causal, -1 T5)")
    parser.add_argument("--instruction", metavar="TEXT", help="instruction before the prompt (default HunyuanVideo's image instruction for causal LLMs, none for T5)")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="prompt tokens per encoder (default 128)")
    parser.add_argument("--connector", choices=("lidit", "ella"), help="connector kind: lidit (LI-DiT-style refiner; default) or ella")
    parser.add_argument("--blocks", type=int, help="refiner blocks (lidit, default 2)")
    parser.add_argument("--width", type=int, help="refiner width (lidit, default the LLM's hidden size)")
    parser.add_argument("--heads", type=int, help="refiner heads (lidit, default width // 64)")
    parser.add_argument("--guidance", choices=("tokens", "clip"), help="where LMD's guidance reads phrases (default tokens for lidit)")
    parser.add_argument("--data", type=Path, metavar="PATH", help="folder of images + .txt captions, or a JSONL of {image, caption}")
    parser.add_argument("--resolution", type=int, help="training size in pixels (default the UNet's native size)")
    parser.add_argument("--caption-dropout", type=float, help="share of empty captions (default 0.1)")
    parser.add_argument("--cache-features", action="store_true", default=None, help="precompute the language models' features to disk")
    parser.add_argument("--cache-latents", action="store_true", default=None, help="encode every image once with the VAE, to disk")
    parser.add_argument("--holdout", type=float, metavar="SHARE", help="share of distinct captions held out for a validation loss (default 0)")
    parser.add_argument("--num-workers", type=int, help="data-loading workers per process (default 2)")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit"), help="adamw (default) or adamw8bit (needs bitsandbytes)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 500)")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine", "linear"), help="after warm-up (default constant)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 10000; 0 exports the untrained connector, a control)")
    parser.add_argument("--batch-size", type=int, help="images per process per micro-step (default 8)")
    parser.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 1)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="default no")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None, help="trade compute for memory")
    parser.add_argument("--ema-decay", type=float, help="keep and export an EMA of the connector (e.g. 0.999)")
    parser.add_argument("--snr-gamma", type=float, metavar="G", help="min-SNR loss weighting (e.g. 5); default off")
    parser.add_argument("--latents", choices=["sample", "mean"],
                        help="VAE posterior per step: sample (default, as diffusers' scripts) or mean (a UNet trained on means)")
    parser.add_argument("--noise-offset", type=float, help="offset noise strength (e.g. 0.05); default 0")
    parser.add_argument("--tracker", choices=("auto", "tensorboard", "wandb", "none"), help="auto: TensorBoard when installed (default); log.jsonl always")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 1000)")
    parser.add_argument("--validate-every", type=int, help="steps between validation images (default 1000)")
    parser.add_argument("--output", type=Path, metavar="DIR", help="run directory (default connector-run)")
    parser.add_argument("--resume", metavar="CKPT", help="'latest' or a checkpoint directory: continue exactly where it stopped")
    parser.add_argument("--check", action="store_true", help="check the config, data and models' configs, then stop")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_train_connector)


def _overrides(args: argparse.Namespace, file_data: dict) -> dict:
    overrides = {key: getattr(args, flag) for flag, key in _FLAGS.items()}
    for name in ("data", "output"):
        if overrides[_FLAGS[name]] is not None:
            overrides[_FLAGS[name]] = str(overrides[_FLAGS[name]])
    encoder_fields = {"layer": args.encoder_layer, "instruction": args.instruction, "max_tokens": args.max_tokens}
    if args.encoder or any(v is not None for v in encoder_fields.values()):
        existing = (file_data.get("connector") or {}).get("encoders") or []
        if args.encoder:
            encoders = [{"model": m} for m in args.encoder]
        else:
            encoders = [dict(e) if isinstance(e, dict) else {"model": e} for e in existing]
        for encoder in encoders:
            encoder.update({k: v for k, v in encoder_fields.items() if v is not None})
        overrides["connector.encoders"] = encoders
    return overrides


def run_train_connector(args: argparse.Namespace) -> int:
    from grounded_sd.errors import ConnectorError
    from lmd import hub
    from lmd.training.config import build_config, check_setup, read_config_file

    try:
        file_data = read_config_file(args.config) if args.config else {}
        config = build_config(args.config, _overrides(args, file_data))
        hub.prepare([hub.model_source("the base model", config.base_model, "base_model"),
                     *(hub.model_source("the language model", e.model, "connector.encoders") for e in config.connector.encoders)])
        setup = check_setup(config)
    except ConnectorError as exc:
        raise CLIError(str(exc)) from None
    main_process = os.environ.get("RANK", "0") == "0"  # under accelerate launch, one process speaks
    if main_process:
        print(
            f"config ok: {setup.base.source} ({'SDXL' if setup.base.sdxl else 'SD'}, {setup.resolution}px), "
            f"{config.connector.kind} connector over {', '.join(e.model for e in config.connector.encoders)}, {len(setup.examples)} images"
        )
    if args.check:
        return 0
    from lmd.training.trainer import train

    try:
        result = train(setup, resume=args.resume, progress=not args.quiet)
    except ConnectorError as exc:
        raise CLIError(str(exc)) from None
    if main_process:
        print(f"done: step {result.step}, connector in {result.export}")
    return 0
