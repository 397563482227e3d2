"""The models folder: names confined to it, hashes, caching, VAE override, hub ids offline."""

from __future__ import annotations

import pytest

from spellbook.errors import NotFound, Refused, UserError
from spellbook.models.loading import ModelCache
from spellbook.models.registry import ModelRegistry
from spellbook.settings import Settings


@pytest.fixture
def registry(home, tiny_model_dir):
    reg = ModelRegistry(Settings.from_env())
    reg.add(tiny_model_dir, "tiny")
    return reg


@pytest.mark.parametrize("name", ["../tiny", "tiny/../../etc", "/etc/passwd", "..", "a/b/c"])
def test_request_names_cannot_escape_the_models_folder(registry, name):
    with pytest.raises((Refused, UserError, NotFound)):
        registry.resolve(name, allow_paths=False)


def test_add_rejects_bad_names_and_duplicates(registry, tiny_model_dir):
    with pytest.raises(UserError, match="not allowed"):
        registry.add(tiny_model_dir, "../evil")
    with pytest.raises(UserError, match="already exists"):
        registry.add(tiny_model_dir, "tiny")


def test_hub_ids_are_not_downloaded_offline(registry, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="downloads are off"):
        registry.resolve("runwayml/stable-diffusion-v1-5")


def test_models_load_once_and_are_cached_by_content_hash(registry):
    cache = ModelCache(registry.settings, registry)
    first = cache.load("tiny")
    assert cache.load("tiny") is first
    assert len(first.ref.sha256) == 64 and first.ref.short_hash == first.ref.sha256[:10]
    assert first.recipe_defaults()["width"] == 16  # the folder's spellbook.json


def test_vae_override_is_used_and_recorded(studio, tiny, tmp_path):
    tiny.vae.save_pretrained(tmp_path / "my-vae")
    recipe = studio.plan({"prompt": "x", "model": "tiny", "vae": str(tmp_path / "my-vae")})
    assert recipe.vae is not None and recipe.vae.name == "my-vae" and len(recipe.vae.sha256) == 64
    components = studio.components_for_recipe(recipe)
    assert components.vae is not studio.cache.load("tiny").vae
    again = studio.plan({"prompt": "x", "model": "tiny", "vae": str(tmp_path / "my-vae")})
    assert studio.components_for_recipe(again).vae is components.vae  # loaded once
    from spellbook.provenance import infotext

    assert f"VAE hash: {recipe.vae.sha256[:10]}" in infotext(recipe)
