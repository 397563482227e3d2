"""Model upscalers (ESRGAN's and Real-ESRGAN's RRDBNet layouts) against a reference forward pass written here
from the layouts alone, tiling with feathered seams, and `spellbook upscale`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from clirun import run_cli
from spellbook.errors import UserError
from spellbook.upscale import _tiled, load_model_upscaler, to_new_layout

NF, GC, NB = 8, 4, 2


def random_state(old: bool, upsamples: int, unshuffle: int = 1, seed: int = 0) -> dict:
    """An RRDBNet's weights, small and random, in the original ESRGAN layout or Real-ESRGAN's."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def conv(name, cin, cout):
        state[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.05
        state[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.01

    names = []
    first = "model.0" if old else "conv_first"
    conv(first, 3 * unshuffle * unshuffle, NF)
    for b in range(NB):
        for r in (1, 2, 3):
            for c in range(1, 6):
                cin, cout = NF + (c - 1) * GC, (GC if c < 5 else NF)
                conv(f"model.1.sub.{b}.RDB{r}.conv{c}.0" if old else f"body.{b}.rdb{r}.conv{c}", cin, cout)
    conv(f"model.1.sub.{NB}" if old else "conv_body", NF, NF)
    index = 3
    for i in range(upsamples):
        names.append(f"model.{index}" if old else f"conv_up{i + 1}")
        conv(names[-1], NF, NF)
        index += 3
    conv(f"model.{index - 1}" if old else "conv_hr", NF, NF)
    conv(f"model.{index + 1}" if old else "conv_last", NF, 3)
    return state


def reference(state: dict, x: torch.Tensor, old: bool, upsamples: int, unshuffle: int = 1) -> torch.Tensor:
    """RRDBNet's forward pass, written from the key layout with functional convolutions only."""

    def conv(t, name):
        return F.conv2d(t, state[f"{name}.weight"], state[f"{name}.bias"], padding=1)

    def lrelu(t):
        return F.leaky_relu(t, 0.2)

    if unshuffle > 1:
        x = F.pixel_unshuffle(x, unshuffle)
    fea = conv(x, "model.0" if old else "conv_first")
    trunk = fea
    for b in range(NB):
        block_in = trunk
        for r in (1, 2, 3):
            feats = [trunk]
            for c in range(1, 5):
                feats.append(
                    lrelu(
                        conv(
                            torch.cat(feats, 1),
                            f"model.1.sub.{b}.RDB{r}.conv{c}.0" if old else f"body.{b}.rdb{r}.conv{c}",
                        )
                    )
                )
            last = f"model.1.sub.{b}.RDB{r}.conv5.0" if old else f"body.{b}.rdb{r}.conv5"
            trunk = conv(torch.cat(feats, 1), last) * 0.2 + feats[0]
        trunk = trunk * 0.2 + block_in
    fea = fea + conv(trunk, f"model.1.sub.{NB}" if old else "conv_body")
    index = 3
    for i in range(upsamples):
        fea = lrelu(
            conv(F.interpolate(fea, scale_factor=2, mode="nearest"), f"model.{index}" if old else f"conv_up{i + 1}")
        )
        index += 3
    hr = conv(fea, f"model.{index - 1}" if old else "conv_hr")
    return conv(lrelu(hr), f"model.{index + 1}" if old else "conv_last")


@pytest.mark.parametrize(
    ("old", "upsamples", "unshuffle", "scale"),
    [(True, 2, 1, 4), (True, 1, 1, 2), (False, 2, 1, 4), (False, 2, 2, 2)],
    ids=["esrgan-4x", "esrgan-2x", "real-esrgan-4x", "real-esrgan-2x"],
)
def test_both_key_layouts_load_and_match_the_reference(tmp_path, old, upsamples, unshuffle, scale):
    state = random_state(old, upsamples, unshuffle)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = load_model_upscaler(path)
    assert model.scale == scale and len(model.sha256) == 64
    x = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = model.net(x)
    expected = reference(state, x, old, upsamples, unshuffle)
    assert ours.shape == (1, 3, 12 * scale, 16 * scale)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_a_prefixed_real_esrgan_state_and_an_old_one_convert_to_the_same_names():
    new = random_state(False, 2)
    assert to_new_layout({f"params_ema.{k}": v for k, v in new.items()}).keys() == new.keys()
    assert to_new_layout(random_state(True, 2)).keys() == new.keys()


def test_tiles_blend_without_seams():
    """A pointwise network: tiled must equal whole exactly (the feathering weights sum to one everywhere)."""

    class Pointwise(torch.nn.Module):
        def forward(self, x):
            return F.interpolate(x * 0.5 + 0.25, scale_factor=2, mode="nearest")

    picture = Image.fromarray(np.random.default_rng(2).integers(0, 255, (37, 50, 3), dtype=np.uint8))
    whole = np.asarray(_tiled(Pointwise(), picture, 2, 0, 0), dtype=int)
    tiled = np.asarray(_tiled(Pointwise(), picture, 2, 16, 6), dtype=int)
    assert tiled.shape == (74, 100, 3) and np.abs(whole - tiled).max() <= 1


def test_a_real_network_tiled_stays_close_to_the_whole(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in random_state(False, 2).items()}, str(path))
    model = load_model_upscaler(path)
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    whole = np.asarray(model.upscale(picture, tile=0), dtype=int)
    tiled = np.asarray(model.upscale(picture, tile=24, overlap=8), dtype=int)
    assert whole.shape == tiled.shape == (160, 160, 3)
    assert np.abs(whole - tiled).mean() < 1.0  # the receptive field reaches past the overlap only at the seams


def test_files_that_are_not_rrdbnet_safetensors_are_refused(tmp_path):
    for name, data in (("a.pth", b"\x80\x02}q\x00."), ("b.safetensors", b"\xff" * 32)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError) as refused:
            load_model_upscaler(tmp_path / name)
        assert refused.value.field == "upscaler"
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(UserError, match="not an ESRGAN"):
        load_model_upscaler(tmp_path / "c.safetensors")


def test_the_upscale_command(home, tmp_path, capsys, monkeypatch):
    from spellbook.infotext import write_png_text

    source = tmp_path / "in.png"
    write_png_text(
        Image.new("RGB", (10, 8), (200, 20, 20)), source, {"parameters": "a red square\nSteps: 2, Seed: 1, Size: 10x8"}
    )
    (home / "upscalers").mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in random_state(True, 2).items()}, str(home / "upscalers" / "tiny4x.safetensors")
    )
    code, out, err = run_cli(
        ["upscale", source, "--upscaler", "tiny4x", "--scale", "2", "--out", tmp_path / "o", "--json"],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    record = json.loads(out)
    result = Image.open(record["path"])
    assert result.size == (20, 16) and record["upscaler"] == "tiny4x" and len(record["upscaler_sha256"]) == 64
    assert result.text["parameters"].endswith("Postprocess upscale by: 2, Postprocess upscaler: tiny4x")
    assert json.loads(result.text["spellbook-upscale"])["scale"] == 2
    code, out, err = run_cli(["upscale", source, "--out", tmp_path / "o", "--json"], capsys, monkeypatch)
    assert code == 0 and Image.open(json.loads(out)["path"]).size == (40, 32)  # Lanczos, 4x by default
    code, _, err = run_cli(["upscale", source, "--upscaler", "R-ESRGAN 4x+", "--out", tmp_path], capsys, monkeypatch)
    assert code == 2 and "unknown upscaler" in err and "tiny4x" in err and len(err.strip().splitlines()) == 1


def test_sd_upscale_redraws_the_enlarged_picture_tile_by_tile(studio, tmp_path):
    from spellbook.recipe import ImageRequest
    from spellbook.upscale import sd_upscale

    picture = Image.fromarray(np.random.default_rng(5).integers(0, 255, (12, 20, 3), dtype=np.uint8))
    request = ImageRequest(prompt="a red circle", model="tiny", steps=3, seed=4, strength=0.4)
    seen = []
    first, tiles = sd_upscale(
        studio, picture, 2.0, "Lanczos", request, on_tile=lambda n, total: seen.append((n, total))
    )
    assert first.size == (40, 24)  # 24x40 rounded to multiples of 8, tiles of the model's 16 px
    assert len(tiles) == seen[-1][1] == len(seen) > 1
    assert {t["recipe"]["seed"] for t in tiles} == {4} and all(t["recipe"]["kind"] == "img2img" for t in tiles)
    assert max(t["left"] for t in tiles) + 16 == 40 and max(t["top"] for t in tiles) + 16 == 24
    again, _ = sd_upscale(studio, picture, 2.0, "Lanczos", request)
    assert np.array_equal(np.asarray(first), np.asarray(again))  # the same recipes, the same picture
    lanczos = picture.resize((40, 24), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(first, dtype=int) - np.asarray(lanczos, dtype=int)).mean() > 1  # redrawn


def test_the_api_queues_an_upscale_of_a_gallery_image_or_a_picture(make_client, home):
    import base64
    import io

    from jobwait import wait_done, wait_filed

    client, _ = make_client()
    (home / "upscalers").mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in random_state(False, 2, 2).items()}, str(home / "upscalers" / "x2.safetensors")
    )
    assert {u["name"]: u["kind"] for u in client.get("/api/v1/upscalers").json()} == {
        "Lanczos": "resampler", "Nearest": "resampler", "x2": "model"}  # fmt: skip
    job = client.post("/api/v1/jobs", json={"prompt": "a red circle", "steps": 2, "seed": 3}).json()
    image_id = wait_filed(client, job["id"])["result"]["images"][0]["image_id"]
    response = client.post("/api/v1/upscales", json={"image_id": image_id, "scale": 2, "upscaler": "x2", "tile": 8})
    assert response.status_code == 202, response.text
    done = wait_done(client, response.json()["id"])
    assert done["state"] == "done" and done["kind"] == "upscale", done
    png = Image.open(io.BytesIO(client.get(done["images"][0]).content))
    assert png.size == (32, 32)
    assert png.text["parameters"].startswith("a red circle\n") and "Postprocess upscaler: x2" in png.text["parameters"]
    assert len(json.loads(png.text["spellbook-upscale"])["upscaler_sha256"]) == 64
    filed = wait_filed(client, done["id"])["result"]["images"][0]["image_id"]
    assert filed is not None  # in the gallery, found by its picture's prompt
    buffer = io.BytesIO()
    Image.new("RGB", (10, 6), (0, 200, 0)).save(buffer, format="PNG")
    picture = base64.b64encode(buffer.getvalue()).decode()
    lanczos = client.post("/api/v1/upscales", json={"image": picture, "scale": 3})
    assert Image.open(io.BytesIO(client.get(wait_done(client, lanczos.json()["id"])["images"][0]).content)).size == (
        30,
        18,
    )
    for body, field in (({"image": picture, "upscaler": "R-ESRGAN 4x+"}, "upscaler"), ({"scale": 2}, "image_id"),
                        ({"image_id": 99999}, "image_id")):  # fmt: skip
        refused = client.post("/api/v1/upscales", json=body)
        assert refused.status_code in (400, 404) and refused.json()["error"]["field"] == field, refused.text
