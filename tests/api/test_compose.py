"""The deployment files' structure. The stack itself runs in scripts/compose-check (docker, gigabytes
of wheels: not part of the suite); these checks keep the files consistent between its runs.

What is checked: the compose services and commands on one image; the GPU reservation only in the
override file compose reads by default, the CPU file with a mounted model instead (the check's
layer alike), the published port in those two only; health checks
that match what the processes expose; stop grace and an init process; the check's layer on
loopback; the image built in two stages (an extra CA only in the first, a non-root user, no test
tools), with build arguments whose defaults agree with the compose file; .env.example only names
real settings and loads into them.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lmd.settings import Settings

REPO = Path(__file__).resolve().parents[2]
LMD_SERVICES = ("api", "worker-plan", "worker-render")


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def _compose() -> dict:
    return _load("docker-compose.yml")


def _dockerfile_stages() -> list[str]:
    return re.split(r"^FROM ", (REPO / "Dockerfile.gpu").read_text(), flags=re.M)[1:]


def test_compose_has_redis_api_and_both_workers_on_one_image():
    services = _compose()["services"]
    assert set(services) == {"redis", *LMD_SERVICES}
    commands = {name: services[name]["command"] for name in LMD_SERVICES}
    assert commands["api"][:2] == ["lmd", "serve"]
    assert commands["worker-plan"][:4] == ["lmd", "worker", "--queues", "plan"]
    assert commands["worker-render"][:4] == ["lmd", "worker", "--queues", "render"]
    for name in LMD_SERVICES:
        service = services[name]
        assert service["build"]["dockerfile"] == "Dockerfile.gpu"
        assert service["image"] == "${SERVICE_IMAGE:-lmd-service:latest}"
        assert service["env_file"] == "${ENV_FILE:-.env}"
        assert service["environment"]["LMD_REDIS_URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["init"] is True  # docker-init forwards SIGTERM and reaps


def test_the_gpu_lives_in_the_default_override_and_the_cpu_file_mounts_a_model():
    assert "deploy" not in str(_compose())  # an override cannot take a reservation away again
    render = _load("docker-compose.override.yml")["services"]["worker-render"]
    devices = render["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert render["environment"]["LMD_DEVICE"] == "cuda"
    assert "deploy" not in str(_load("docker-compose.override.yml")["services"]["api"])
    cpu = _load("docker-compose.cpu.yml")["services"]["worker-render"]
    assert cpu["environment"]["LMD_DEVICE"] == "cpu" and cpu["environment"]["LMD_DTYPE"] == "float32"
    mount = cpu["volumes"][0]
    assert mount.startswith("${CPU_MODEL_DIR:?") and mount.endswith(f":{cpu['environment']['LMD_SD_MODEL']}:ro")
    # The check's layer runs the render worker as the CPU file does (it cannot stack that file:
    # its published port is refused on the host's network).
    check = _load("docker-compose.check.yml")["services"]["worker-render"]
    assert cpu["environment"].items() <= check["environment"].items() and cpu["volumes"] == check["volumes"]


def test_the_api_port_is_published_by_the_gpu_and_cpu_files_only():
    assert "ports" not in _compose()["services"]["api"]  # docker refuses a port binding on the host's network
    for name in ("docker-compose.override.yml", "docker-compose.cpu.yml"):
        assert _load(name)["services"]["api"]["ports"] == ["${LMD_API_PORT:-8000}:8000"]
    assert all("ports" not in service for service in _load("docker-compose.check.yml")["services"].values())


def test_every_service_has_a_health_check_on_what_it_exposes():
    services = _compose()["services"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    api = services["api"]
    assert "http://127.0.0.1:8000/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["command"][-1] == "8000"
    for name in ("worker-plan", "worker-render"):
        alive = services[name]["environment"]["LMD_WORKER_ALIVE_FILE"]
        assert f"'{alive}'" in " ".join(services[name]["healthcheck"]["test"])
    assert "worker_alive_file" in Settings.model_fields


def test_stop_grace_lets_running_work_finish():
    services = _compose()["services"]
    soft_limit_s = Settings.model_fields["task_soft_time_limit_s"].default
    assert services["worker-render"]["stop_grace_period"] == "10m" and 600 >= soft_limit_s
    assert services["worker-plan"]["stop_grace_period"] == "90s"


def test_images_live_on_a_volume_shared_by_api_and_workers():
    compose = _compose()
    for name in LMD_SERVICES:
        assert "lmd-data:/data" in compose["services"][name]["volumes"]
        assert compose["services"][name]["environment"]["LMD_DATA_DIR"] == "/data"
    assert {"lmd-data", "redis-data"} <= set(compose["volumes"])


def test_redis_persists_with_aof_and_never_evicts():
    for services in (_compose()["services"], _load("docker-compose.check.yml")["services"]):
        command = services["redis"]["command"]
        assert command[command.index("--appendonly") + 1] == "yes"
        assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "redis-data:/data" in _compose()["services"]["redis"]["volumes"]


def test_the_checks_layer_keeps_every_container_on_loopback():
    services = _load("docker-compose.check.yml")["services"]
    assert set(services) == set(_compose()["services"])
    assert all(service["network_mode"] == "host" for service in services.values())
    redis = services["redis"]["command"]
    assert redis[redis.index("--bind") + 1] == "127.0.0.1"
    api = services["api"]["command"]
    assert api[api.index("--host") + 1] == "127.0.0.1"
    for name in LMD_SERVICES:
        assert services[name]["environment"]["LMD_REDIS_URL"].startswith("redis://127.0.0.1:")
        assert services[name]["build"]["network"] == "host"  # the build's downloads too


def test_build_arguments_default_to_the_cuda_base_and_the_official_redis():
    compose_base = _compose()["services"]["api"]["build"]["args"]["BASE_IMAGE"]
    default = re.fullmatch(r"\$\{BASE_IMAGE:-(.+)\}", compose_base).group(1)
    assert re.search(rf"^ARG BASE_IMAGE={re.escape(default)}$", (REPO / "Dockerfile.gpu").read_text(), re.M)
    assert re.fullmatch(r"nvidia/cuda:[\w.]+-runtime-[\w.]+", default)
    assert re.fullmatch(r"\$\{REDIS_IMAGE:-redis:[\w.]+-alpine\}", _compose()["services"]["redis"]["image"])


def test_dockerfile_builds_in_two_stages_and_keeps_build_inputs_out_of_the_image():
    deps, final = _dockerfile_stages()
    assert deps.startswith("${BASE_IMAGE} AS deps") and final.startswith("${BASE_IMAGE}\n")
    assert "COPY docker/ca/" in deps and "PIP_CERT" in deps
    assert "docker/ca" not in final and "PIP_CERT" not in final
    assert "pip install -c lock.txt -r runtime.txt" in deps  # the runtime extras at the lock's versions
    assert "COPY --from=deps /opt/venv /opt/venv" in final
    # The project goes in on top of the dependencies' layer, without downloading anything.
    assert "pip install --no-deps --no-build-isolation --no-index ." in final
    for package in ("lmd", "layout_planner", "grounded_sd", "jobs", "api", "worker"):
        assert f"COPY {package} {package}" in final
    assert final.index("COPY --from=deps") < final.index("COPY lmd lmd")
    user = re.search(r"^USER (\S+)$", final, re.M).group(1)
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user)  # numeric and not root
    assert "chown -R 1000:1000 /data /models" in final  # named volumes start owned by that user
    lock = (REPO / "requirements" / "lock.txt").read_text()
    assert re.search(r"^torch==", lock, re.M) and re.search(r"^nvidia-cuda-runtime", lock, re.M)  # the CUDA build


def test_dockerignore_sends_only_what_the_image_copies():
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", (REPO / "Dockerfile.gpu").read_text(), re.M))
    sources = {part.rstrip("/") for line in copied for part in line.split()}
    assert sources <= allowed, sources - allowed


def test_env_example_names_only_real_settings_and_loads():
    names = {f"LMD_{n.upper()}" for n in Settings.model_fields}
    text = (REPO / ".env.example").read_text()
    mentioned = set(re.findall(r"^#?\s*(LMD_[A-Z0-9_]+)=", text, re.M))
    assert mentioned and mentioned <= names, mentioned - names
    settings = Settings(_env_file=REPO / ".env.example")
    assert settings.api_keys == [] and settings.retention_s == 604800 and settings.max_redeliveries == 2


def _merged(*names: str) -> dict:
    """The services of these compose files stacked as compose stacks them for the keys used here:
    mappings merge key by key, a later file's command, list or scalar replaces the earlier one."""

    def merge(base, over):
        if isinstance(base, dict) and isinstance(over, dict):
            return {**base, **{key: merge(base.get(key), value) for key, value in over.items()}}
        return over

    services: dict = {}
    for name in names:
        services = merge(services, _load(name)["services"])
    return services


def _render_workers(services: dict) -> dict[str, dict]:
    return {name: s for name, s in services.items() if s.get("command", [])[2:4] == ["--queues", "render"]}


def test_the_models_file_runs_one_render_worker_per_model_on_its_own_queue(monkeypatch):
    """docker-compose.models.yml (issue 22): each LMD_MODELS name has exactly one render worker,
    whose command the real worker code turns into that model's queue; everyone knows the list."""
    from lmd.commands.service import worker_queues
    from lmd.settings import get_settings

    services = _merged("docker-compose.yml", "docker-compose.models.yml")
    workers = _render_workers(services)
    models_json = workers["worker-render"]["environment"]["LMD_MODELS"]
    monkeypatch.setenv("LMD_MODELS", models_json)  # as the containers get it: the environment
    settings = Settings(_env_file=None)
    models = settings.models
    assert len(models) >= 2
    for name in ("api", "worker-plan", *workers):
        assert services[name]["environment"]["LMD_MODELS"] == models_json, name
    monkeypatch.setenv("LMD_WORKER_MODEL", "")  # recorded as absent: what worker_queues sets is undone after
    monkeypatch.delenv("LMD_WORKER_MODEL")
    served = {}
    for name, worker in workers.items():
        command = worker["command"]
        model = command[command.index("--model") + 1]
        assert worker_queues(settings, "render", model) == [f"render.{model}"]
        served[model] = name
    get_settings.cache_clear()
    assert sorted(served) == sorted(models) and len(served) == len(workers)  # one worker per model, no model without
    assert served[next(iter(models))] == "worker-render"  # the base file's worker serves the default model


def test_the_models_files_extra_workers_are_the_base_render_worker_with_their_model_and_gpu():
    services = _merged("docker-compose.yml", "docker-compose.models.yml")
    workers = _render_workers(services)
    base = {key: value for key, value in workers["worker-render"].items() if key not in ("command", "deploy")}
    gpus = []
    for name, worker in workers.items():
        assert {key: value for key, value in worker.items() if key not in ("command", "deploy")} == base, name
        assert worker["environment"]["LMD_DEVICE"] == "cuda"
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "count" not in device  # GPUs by id: a count could pick a taken one
        gpus += device["device_ids"]
    assert len(gpus) == len(set(gpus))  # the example gives each model its own GPU
    # Used instead of the default override (whose count: 1 it cannot remove), so it publishes the port.
    assert services["api"]["ports"] == _load("docker-compose.override.yml")["services"]["api"]["ports"]
