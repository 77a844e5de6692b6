"""Shared test setup: one torch thread (2-core machines), no hub access, shared fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Fixture modules under tests/support/, one per concern (fake LLM server, tiny models, Redis...).
pytest_plugins: list[str] = [
    "tests.support.tiny_sam", "tests.support.tiny_owlvit", "tests.support.fake_llm", "tests.support.service", "tests.support.tiny_sd",
    "tests.support.tiny_conditioning", "tests.support.cli_env", "tests.support.tiny_lm", "tests.support.tiny_lora",
]
