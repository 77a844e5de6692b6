"""``lmd train-connector`` end to end on tiny random models (a Qwen2-style LLM, T5, SD and an
SDXL-shaped UNet) and a coloured-shapes data set made here: the loss falls, resume is exact,
two CPU processes train through ``accelerate launch``, bad setups fail before loading."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmd.cli import main
from tests.support.shapes import make_shapes
from tests.support.tiny_sdxl import POOLED_DIM, build_tiny_sdxl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), count=16)


def write_config(path: Path, *, model: Path, encoder: Path, images: Path, out: Path, **sections) -> Path:
    config = {
        "base_model": str(model),
        "output_dir": str(out),
        "connector": {"kind": "lidit", "encoders": [{"model": str(encoder), "max_tokens": 12}], "refiner": {"cond_dim": 16}},
        "data": {"path": str(images), "resolution": 32, "num_workers": 0, "caption_dropout": 0.2},
        "optimizer": {"lr": 5e-3, "warmup_steps": 0},
        "training": {"steps": 40, "batch_size": 4, "checkpoint_every": 1000, "seed": 3},
        "validation": {"every": 1000, "steps": 2, "prompts": ["a red square on the left"], "seeds": [1]},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(config))
    return path


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def validation_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {row["step"]: row["validation_loss"] for row in rows if "validation_loss" in row}


def test_forty_steps_lower_the_loss_and_export_a_loadable_connector(tmp_path, tiny_sd_path, tiny_llm_path, shapes, capsys):
    from grounded_sd.conditioning.trained import TrainedConnector

    torch.set_num_threads(1)
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", model=tiny_sd_path, encoder=tiny_llm_path, images=shapes, out=out)
    assert main(["train-connector", "--config", str(config), "--checkpoint-every", "40", "--quiet"]) == 0
    curve = losses(out)
    assert len(curve) == 40
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000040"]
    assert (out / "validation" / "step-000040" / "p00_s1.png").is_file()
    exported = (out / "connector" / "connector.json").read_text()
    assert '"/' not in exported and str(tiny_llm_path) not in exported  # no absolute path of this machine
    assert '"refiner"' in exported and '"ella"' not in exported  # only the trained kind's settings
    connector = TrainedConnector.load(out / "connector")  # its relative model paths resolve from the export
    assert connector.spec.steps == 40 and connector.spec.guidance == "tokens"
    gates = connector.module.refiners[0].blocks[0].modulation[1].weight
    assert gates.abs().sum() > 0  # trained away from the zero initialisation
    assert "exported" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())  # the training cost, for benchmarks' reports
    assert (summary["steps"], summary["steps_this_run"], summary["images_per_step"], summary["training_images"]) == (40, 40, 4, 16)
    assert summary["train_wall_s"] > 0 and summary["last_loss"] == curve[-1]


def test_zero_steps_export_the_untrained_connector_as_a_control(tmp_path, tiny_sd_path, tiny_llm_path, shapes):
    from grounded_sd.conditioning.trained import build_module, load_module

    out = tmp_path / "control"
    config = write_config(tmp_path / "z.yaml", model=tiny_sd_path, encoder=tiny_llm_path, images=shapes, out=out,
                          data={"holdout": 0.25}, training={"steps": 0, "tracker": "none"})
    assert main(["train-connector", "--config", str(config), "--quiet"]) == 0
    spec, module = load_module(out / "connector")
    assert spec.steps == 0 and losses(out) == [] and list(validation_losses(out)) == [0]
    torch.manual_seed(3)  # the training seed: the export is the fresh module itself
    fresh = build_module(spec)
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), fresh.state_dict().values()))


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_sd_path, tiny_llm_path, shapes):
    """Gradient accumulation, EMA, the feature cache and a warm-up: the state that a resume
    must restore (optimizer, schedule, EMA, sample order, random draws)."""
    settings = dict(
        training={"steps": 4, "grad_accum": 2, "batch_size": 2, "ema_decay": 0.9, "checkpoint_every": 2},
        optimizer={"warmup_steps": 3, "lr": 1e-2}, data={"cache_features": True, "holdout": 0.25},
        validation={"every": 2, "steps": 1},
    )
    whole = write_config(tmp_path / "a.yaml", model=tiny_sd_path, encoder=tiny_llm_path, images=shapes, out=tmp_path / "a", **settings)
    split = write_config(tmp_path / "b.yaml", model=tiny_sd_path, encoder=tiny_llm_path, images=shapes, out=tmp_path / "b", **settings)
    assert main(["train-connector", "--config", str(whole), "--quiet"]) == 0
    assert main(["train-connector", "--config", str(split), "--steps", "2", "--quiet"]) == 0
    assert main(["train-connector", "--config", str(split), "--resume", "latest", "--quiet"]) == 0
    a, b = load_file(str(tmp_path / "a/connector/connector.safetensors")), load_file(str(tmp_path / "b/connector/connector.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert any((tmp_path / "a" / "feature_cache").rglob("*.safetensors"))
    # the validation loss is computed at fixed draws: the resumed run reports the same values
    assert validation_losses(tmp_path / "a") == validation_losses(tmp_path / "b") and list(validation_losses(tmp_path / "a")) == [0, 2, 4]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_through_accelerate_launch(tmp_path, tiny_sd_path, tiny_llm_path, shapes):
    out = tmp_path / "ddp"
    config = write_config(
        tmp_path / "d.yaml", model=tiny_sd_path, encoder=tiny_llm_path, images=shapes, out=out,
        training={"steps": 2, "batch_size": 2, "checkpoint_every": 2},
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "lmd", "train-connector", "--config", str(config), "--quiet",
    ]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]  # one log, written by the main process only
    assert "2 process(es)" in done.stdout and done.stdout.count("exported") == 1


def test_sdxl_shaped_unet_gets_sequence_and_pooled_embedding(tmp_path, tiny_llm_path, shapes):
    sdxl = build_tiny_sdxl(tmp_path / "sdxl", prediction_type="v_prediction")
    out = tmp_path / "xl"
    config = write_config(
        tmp_path / "x.yaml", model=sdxl, encoder=tiny_llm_path, images=shapes, out=out,
        training={"steps": 1, "batch_size": 2, "checkpoint_every": 1, "gradient_checkpointing": True}, validation={"every": 1, "steps": 2},
    )
    assert main(["train-connector", "--config", str(config), "--quiet"]) == 0
    spec = json.loads((out / "connector" / "connector.json").read_text())
    assert spec["pooled_dim"] == POOLED_DIM and spec["cross_attention_dim"] == 48
    weights = load_file(str(out / "connector" / "connector.safetensors"))
    assert weights["pooled_projection.weight"].shape == (POOLED_DIM, 48)
    assert torch.isfinite(torch.tensor(losses(out))).all()
    assert (out / "validation" / "step-000001" / "p00_s1.png").is_file()


def test_ella_connector_trains_and_exports_in_the_released_layout(tmp_path, tiny_sd_path, tiny_conditioning_files, shapes):
    from grounded_sd.conditioning.ella import ELLA, ELLAConfig

    out = tmp_path / "ella"
    config = write_config(
        tmp_path / "e.yaml", model=tiny_sd_path, encoder=tiny_conditioning_files["t5"], images=shapes, out=out,
        connector={"kind": "ella", "ella": {"layers": 2, "heads": 4, "latents": 8}}, training={"steps": 2, "batch_size": 2},
    )
    assert main(["train-connector", "--config", str(config), "--quiet"]) == 0
    exported = json.loads((out / "connector" / "connector.json").read_text())
    assert "refiner" not in exported and exported["ella"]["latents"] == 8  # only the trained kind's settings
    assert not any(e["model"].startswith("/") for e in exported["encoders"]) and not exported["base_model"].startswith("/")
    config = ELLAConfig(time_embed_dim=32, width=32, text_dim=32, num_latents=8, layers=2, heads=4)
    module = ELLA.from_file(out / "connector" / "connector.safetensors", config=config)  # strict: the released key names
    assert module(torch.randn(1, 5, 32), 500).shape == (1, 8, 32)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown_model", "unknown base model"),
        ("unknown_encoder", "unknown text encoder"),
        ("missing_data", "does not exist"),
        ("empty_caption", "is empty"),
        ("bad_size", "data.resolution 30 does not fit the base model: it must be a multiple of 4"),
        ("ella_on_llm", "an ella connector reads a T5 encoder"),
        ("typo", "config: training.stepz: Extra inputs are not permitted"),
        pytest.param("adamw8bit", "optimizer.name adamw8bit needs bitsandbytes, which is not installed", marks=pytest.mark.skipif(
            importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")),
        pytest.param("wandb", "training.tracker wandb: the wandb package is not installed", marks=pytest.mark.skipif(
            importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")),
        ("holdout_all", "data.holdout 0.99 holds out all"),
    ],
)
def test_bad_setup_fails_with_a_clear_error_before_loading(case, expected, tmp_path, tiny_sd_path, tiny_llm_path, shapes, capsys):
    data = shapes
    if case == "empty_caption":
        data = make_shapes(tmp_path / "data", count=3)
        (data / "shape_001.txt").write_text("  \n")
    model = tmp_path / "nowhere" if case == "unknown_model" else tiny_sd_path
    encoder = tmp_path / "no_llm" if case == "unknown_encoder" else tiny_llm_path
    extra = {
        "missing_data": {"data": {"path": str(tmp_path / "missing")}},
        "bad_size": {"data": {"resolution": 30}},
        "ella_on_llm": {"connector": {"kind": "ella", "encoders": [{"model": str(tiny_llm_path)}]}},
        "typo": {"training": {"stepz": 3}},
        "adamw8bit": {"optimizer": {"name": "adamw8bit"}},
        "wandb": {"training": {"tracker": "wandb"}},
        "holdout_all": {"data": {"holdout": 0.99}},
    }.get(case, {})
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", model=model, encoder=encoder, images=data, out=out, **extra)
    assert main(["train-connector", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmd train-connector: error: ") and expected in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing was loaded or written


def test_holdout_splits_by_caption_whatever_the_file_order():
    from lmd.training.config import Example, split_holdout

    examples = [Example(Path(f"{i}.png"), f"caption {i % 7}") for i in range(21)]
    train, held = split_holdout(examples, 0.3)
    assert {e.caption for e in held} and not {e.caption for e in train} & {e.caption for e in held}
    assert len({e.caption for e in held}) == 3 and len(train) + len(held) == 21  # ceil(0.3 x 7) captions, with all their images
    again = split_holdout(list(reversed(examples)), 0.3)[1]
    assert {e.caption for e in again} == {e.caption for e in held}


def test_tensorboard_tracker_gets_training_and_validation_curves(tmp_path, tiny_sd_path, tiny_llm_path, shapes):
    """accelerate's TensorBoard tracker (tensorboard is installed here): the scalars of log.jsonl,
    the validation loss on held-out captions among them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    config = write_config(
        tmp_path / "t.yaml", model=tiny_sd_path, encoder=tiny_llm_path, images=shapes, out=out,
        training={"steps": 3, "batch_size": 2}, validation={"every": 2, "steps": 1},
    )
    assert main(["train-connector", "--config", str(config), "--holdout", "0.25", "--tracker", "tensorboard", "--quiet"]) == 0
    runs = list((out / "tracker" / "train-connector").glob("events.out.tfevents.*"))
    assert runs
    events = EventAccumulator(str(runs[0].parent)).Reload()
    train = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in train] == [1, 2, 3]
    assert [v for _, v in train] == pytest.approx(losses(out), rel=1e-6)
    assert [e.step for e in events.Scalars("validation/loss")] == [0, 2, 3]  # 0: the untrained connector
    assert [e.value for e in events.Scalars("validation/loss")] == pytest.approx(list(validation_losses(out).values()), rel=1e-6)


def test_min_snr_weighting_and_noise_offset_change_the_objective(tmp_path, tiny_sd_path, tiny_llm_path, shapes):
    def first_losses(name: str, *flags: str) -> list[float]:
        config = write_config(
            tmp_path / f"{name}.yaml", model=tiny_sd_path, encoder=tiny_llm_path, images=shapes, out=tmp_path / name,
            training={"steps": 2, "batch_size": 2, "tracker": "none"},
        )
        assert main(["train-connector", "--config", str(config), *flags, "--quiet"]) == 0
        return losses(tmp_path / name)

    plain = first_losses("plain")
    for name, flags in {"snr": ("--snr-gamma", "1.0"), "offset": ("--noise-offset", "0.5")}.items():
        changed = first_losses(name, *flags)
        assert all(torch.isfinite(torch.tensor(changed))) and changed[0] != pytest.approx(plain[0], rel=1e-3), name


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_min_snr_gamma_over_snr(prediction):
    from diffusers import DDPMScheduler

    from lmd.training.trainer import min_snr_weights

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([1, 100, 500, 999])
    alpha = scheduler.alphas_cumprod[t]
    snr = alpha / (1 - alpha)
    assert bool((snr > 5).any() and (snr < 5).any())  # both sides of the clamp are exercised
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr if prediction == "epsilon" else snr + 1)
    assert torch.allclose(min_snr_weights(scheduler, t, 5.0, prediction), expected, rtol=1e-5)


def test_latent_cache_encodes_each_image_once_and_trains_as_without(tmp_path, tiny_sd_path, tiny_llm_path, shapes):
    def run(name: str, *flags: str) -> list[float]:
        config = write_config(
            tmp_path / f"{name}.yaml", model=tiny_sd_path, encoder=tiny_llm_path, images=shapes, out=tmp_path / name,
            training={"steps": 3, "batch_size": 2, "tracker": "none"},
        )
        assert main(["train-connector", "--config", str(config), *flags, "--quiet"]) == 0
        return losses(tmp_path / name)

    cached = run("cached", "--cache-latents")
    assert len(list((tmp_path / "cached" / "latent_cache").rglob("*.safetensors"))) == 16  # one per image
    # the posterior's mean and std are cached, not a sample: each micro-step still draws its own
    assert cached == pytest.approx(run("encoded"), rel=1e-4)


def test_latents_mean_trains_on_the_posterior_mean_whatever_its_spread(tmp_path, tiny_sd_path, tiny_llm_path, shapes):
    """``--latents mean`` (for a UNet trained on the VAE's means, like the shapes world's) ignores
    the posterior's std; ``sample`` (the default) draws from it. Checked by inflating the cached std."""
    from safetensors.torch import save_file

    cache = tmp_path / "shared" / "feature_cache"

    def run(name: str, *flags: str) -> list[float]:
        config = write_config(
            tmp_path / f"{name}.yaml", model=tiny_sd_path, encoder=tiny_llm_path, images=shapes, out=tmp_path / name,
            data={"cache_latents": True, "cache_dir": str(cache)}, training={"steps": 2, "batch_size": 2, "tracker": "none"},
        )
        assert main(["train-connector", "--config", str(config), *flags, "--quiet"]) == 0
        return losses(tmp_path / name)

    mean, sample = run("mean", "--latents", "mean"), run("sample")
    for path in (tmp_path / "shared" / "latent_cache").rglob("*.safetensors"):
        stored = load_file(path)
        save_file({**stored, "std": stored["std"] * 50}, str(path))
    assert run("mean-wide", "--latents", "mean") == pytest.approx(mean, rel=1e-6)
    assert run("sample-wide")[0] != pytest.approx(sample[0], rel=1e-2)
