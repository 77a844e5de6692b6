"""The deployment files: docker does not run on the test machines, so their structure is checked.

What is checked: the compose services and commands, the render worker's GPU reservation, the
shared data volume, Redis persistence flags, the image built from the lock file, and that
.env.example only names real settings and loads into them.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lmd.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_has_redis_api_and_both_workers_on_one_image():
    services = _compose()["services"]
    assert set(services) == {"redis", "api", "worker-plan", "worker-render"}
    commands = {name: services[name]["command"] for name in ("api", "worker-plan", "worker-render")}
    assert commands["api"][:2] == ["lmd", "serve"]
    assert commands["worker-plan"][:4] == ["lmd", "worker", "--queues", "plan"]
    assert commands["worker-render"][:4] == ["lmd", "worker", "--queues", "render"]
    for name in commands:
        service = services[name]
        assert service["build"]["dockerfile"] == "Dockerfile.gpu"
        assert service["env_file"] == ".env"
        assert service["environment"]["LMD_REDIS_URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_render_worker_reserves_an_nvidia_gpu():
    render = _compose()["services"]["worker-render"]
    devices = render["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert render["environment"]["LMD_DEVICE"] == "cuda"
    assert "deploy" not in _compose()["services"]["worker-plan"]  # stage 1 needs no GPU


def test_images_live_on_a_volume_shared_by_api_and_workers():
    compose = _compose()
    for name in ("api", "worker-plan", "worker-render"):
        assert "lmd-data:/data" in compose["services"][name]["volumes"]
        assert compose["services"][name]["environment"]["LMD_DATA_DIR"] == "/data"
    assert {"lmd-data", "redis-data"} <= set(compose["volumes"])


def test_redis_persists_with_aof_and_never_evicts():
    redis = _compose()["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "redis-data:/data" in redis["volumes"]


def test_dockerfile_is_cuda_and_installs_the_lock_file():
    text = (REPO / "Dockerfile.gpu").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\w.]+-runtime-", text, re.M)
    assert "pip install -r requirements/lock.txt" in text
    for package in ("lmd", "layout_planner", "grounded_sd", "jobs", "api", "worker"):
        assert f"COPY {package} {package}" in text
    lock = (REPO / "requirements" / "lock.txt").read_text()
    assert re.search(r"^torch==", lock, re.M) and re.search(r"^nvidia-cuda-runtime", lock, re.M)  # the CUDA build


def test_env_example_names_only_real_settings_and_loads():
    names = {f"LMD_{n.upper()}" for n in Settings.model_fields}
    text = (REPO / ".env.example").read_text()
    mentioned = set(re.findall(r"^#?\s*(LMD_[A-Z0-9_]+)=", text, re.M))
    assert mentioned and mentioned <= names, mentioned - names
    settings = Settings(_env_file=REPO / ".env.example")
    assert settings.api_keys == [] and settings.retention_s == 604800 and settings.max_redeliveries == 2
