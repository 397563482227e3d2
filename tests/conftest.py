"""Shared fixtures: tiny random-weight components, a tiny model folder, an isolated SPELLBOOK_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from tiny import tiny_components  # tests/ is on sys.path: pyproject's [tool.pytest.ini_options] pythonpath


@pytest.fixture(scope="session")
def tiny():
    return tiny_components()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny) -> Path:
    """The tiny components saved as a diffusers folder, as a user's model would be."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("models") / "tiny"
    pipe = StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        unet=tiny.unet,
        scheduler=DDIMScheduler.from_config(tiny.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "spellbook.json").write_text(
        '{"family": "sd-v1", "defaults": {"width": 16, "height": 16, "steps": 4, "sampler": "DDIM", '
        '"schedule": "Automatic", "guidance": 6.0}}'
    )
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty SPELLBOOK_HOME for one test."""
    path = tmp_path / "home"
    monkeypatch.setenv("SPELLBOOK_HOME", str(path))
    return path


@pytest.fixture
def studio(home, tiny_model_dir):
    """A studio whose models folder holds the tiny model, registered as `tiny`."""
    from spellbook.settings import Settings
    from spellbook.studio import Studio

    s = Studio(Settings.from_env())
    s.cache.registry.add(tiny_model_dir, "tiny")
    return s


@pytest.fixture
def make_client(home, studio):
    """A TestClient over a fresh app on the test home (the tiny model registered as `tiny`, and the default)."""
    from fastapi.testclient import TestClient

    from spellbook.server.app import build_services, create_app
    from spellbook.settings import Settings

    clients = []

    def make(start_worker=True, **settings):
        s = Settings.from_env(**settings)
        services = build_services(s, start_worker=start_worker)
        services.default_model = "tiny"
        client = TestClient(create_app(s, services=services), base_url="http://127.0.0.1")
        client.__enter__()
        clients.append(client)
        return client, services

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def cli(capsys, monkeypatch, home, tiny_model_dir):
    """`spellbook …` in this process (exit code, stdout, stderr), with the tiny model added as `tiny`."""
    from clirun import run_cli

    def call(*args):
        return run_cli(args, capsys, monkeypatch)

    code, _, err = call("models", "add", tiny_model_dir, "--name", "tiny")
    assert code == 0, err
    return call
