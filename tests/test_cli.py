"""The CLI as a user meets it: real commands, real files; bad input exits 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from spellbook.infotext import parse_infotext, read_png_text


def test_generate_writes_pngs_whose_metadata_reads_as_a1111(cli, tmp_path):
    code, out, err = cli(
        "generate",
        "a red circle on the left",
        "--model",
        "tiny",
        "--seed",
        "7",
        "--batch",
        "2",
        "--negative",
        "blurry",
        "--out",
        tmp_path / "out",
        "--json",
    )
    assert code == 0, err
    records = json.loads(out)
    assert [r["seed"] for r in records] == [7, 8]
    prompt, negative, params = parse_infotext(read_png_text(records[1]["path"])["parameters"])
    assert (prompt, negative) == ("a red circle on the left", "blurry")
    assert params["Seed"] == "8" and params["Size"] == "16x16" and params["Model"] == "tiny"
    assert params["Model hash"] == records[1]["recipe"]["model"]["sha256"][:10]


def test_from_file_uses_seed_plus_line_number(cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    code, out, err = cli(
        "generate", "--from-file", prompts, "--seed", "100", "--model", "tiny", "--out", tmp_path / "o", "--json"
    )
    assert code == 0, err
    assert [(r["recipe"]["prompt"], r["seed"]) for r in json.loads(out)] == [
        ("a red circle", 100),
        ("a blue square", 102),  # line 2: the empty line keeps its seed slot
    ]


def test_info_reproduce_and_verify(cli, tmp_path):
    code, out, _ = cli(
        "generate",
        "a green triangle",
        "--model",
        "tiny",
        "--seed",
        "3",
        "--batch",
        "2",
        "--out",
        tmp_path / "o",
        "--json",
    )
    second = json.loads(out)[1]["path"]
    code, out, _ = cli("info", second)
    assert code == 0 and "Seed: 4" in out and "a green triangle" in out
    code, out, _ = cli("reproduce", second, "--out", tmp_path / "r", "--json")
    assert code == 0
    again = json.loads(out)["path"]
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(second)))
    code, out, _ = cli("verify", second)
    assert (code, out.strip()) == (0, "identical: every pixel matches")


def test_verify_detects_a_changed_pixel(cli, tmp_path):
    code, out, _ = cli("generate", "a green triangle", "--model", "tiny", "--seed", "3", "--out", tmp_path, "--json")
    path = json.loads(out)[0]["path"]
    chunks = read_png_text(path)
    pixels = np.asarray(Image.open(path)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    from spellbook.infotext import write_png_text

    write_png_text(Image.fromarray(pixels), path, chunks)
    code, out, _ = cli("verify", path, "--json")
    report = json.loads(out)
    assert code == 1 and not report["identical"] and report["differing_pixels"] == 1


def test_verify_detects_a_changed_recipe(cli, tmp_path):
    code, out, _ = cli("generate", "a green triangle", "--model", "tiny", "--seed", "3", "--out", tmp_path, "--json")
    path = json.loads(out)[0]["path"]
    chunks = read_png_text(path)
    recipe = json.loads(chunks["spellbook"])
    recipe["seed"] = 4
    chunks["spellbook"] = json.dumps(recipe)
    from spellbook.infotext import write_png_text

    write_png_text(Image.open(path), path, chunks)
    code, out, _ = cli("verify", path)
    assert code == 1
    assert out.startswith("differs: PSNR")


def test_img2img_and_inpaint_from_files(cli, tmp_path):
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "sketch.png")  # not a multiple of 8: rounded down
    mask = Image.new("L", (20, 20), 0)
    mask.paste(255, (4, 4, 12, 12))
    mask.save(tmp_path / "mask.png")
    code, out, err = cli(
        "img2img",
        tmp_path / "sketch.png",
        "a cactus garden",
        "--model",
        "tiny",
        "--strength",
        "0.5",
        "--out",
        tmp_path / "o",
        "--json",
    )
    assert code == 0, err
    record = json.loads(out)[0]
    assert (record["recipe"]["width"], record["recipe"]["kind"], record["recipe"]["strength"]) == (16, "img2img", 0.5)
    code, out, err = cli(
        "inpaint",
        tmp_path / "sketch.png",
        tmp_path / "mask.png",
        "a red circle",
        "--model",
        "tiny",
        "--out",
        tmp_path / "o",
        "--json",
    )
    assert code == 0, err
    path = json.loads(out)[0]["path"]
    code, out, _ = cli("verify", path)  # init image and mask are found again by their hash
    assert code == 0, out


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "x", "--model", "tiny", "--sampler", "Eular a"], "did you mean 'Euler a'"),
        (["generate", "x", "--model", "tiny", "--size", "500x500"], "multiples of 8, e.g. 496x496 or 504x504"),
        (["generate", "x", "--model", "nope"], "unknown model 'nope'"),
        (["generate", "x", "--model", "{folder}"], "is not a model"),
        (["img2img", "missing.png", "x", "--model", "tiny"], "missing.png does not exist"),
        (["img2img", "{not_image}", "x", "--model", "tiny"], "is not an image"),
        (["inpaint", "{image}", "{small_mask}", "x", "--model", "tiny"], "mask is 8x8 but the image is 16x16"),
        (["info", "{image}"], "carries no recipe"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli, tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (16, 16)).save(tmp_path / "image.png")
    Image.new("L", (8, 8)).save(tmp_path / "mask8.png")
    (tmp_path / "folder").mkdir()
    names = {
        "{folder}": tmp_path / "folder",
        "{not_image}": tmp_path / "notes.txt",
        "{image}": tmp_path / "image.png",
        "{small_mask}": tmp_path / "mask8.png",
    }
    code, _, err = cli(*[names.get(a, a) for a in args])
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_pickled_model_is_refused_and_never_unpickled(cli, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import torch

    torch.save({"x": Payload()}, tmp_path / "model.ckpt")
    code, _, err = cli("generate", "x", "--model", tmp_path / "model.ckpt")
    assert code == 2 and "--allow-pickle" in err
    assert not marker.exists()


def test_console_script_runs_as_a_process(tmp_path, home):
    result = subprocess.run(
        [sys.executable, "-m", "spellbook.cli", "generate", "x", "--size", "7x7"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr


def test_reproducing_an_a1111_image_uses_its_recorded_model_or_says_it_is_missing(cli, tmp_path):
    from spellbook.infotext import write_png_text

    path = tmp_path / "a1111.png"
    write_png_text(
        Image.new("RGB", (16, 16)),
        path,
        {
            "parameters": "a red circle\nNegative prompt: blurry\n"
            "Steps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 16x16, Model hash: 6ce0161689, Model: v1-5"
        },
    )
    code, _, err = cli("reproduce", path, "--out", tmp_path / "o")
    assert code == 2 and "unknown model 'v1-5'" in err
    code, out, err = cli("reproduce", path, "--model", "tiny", "--out", tmp_path / "o", "--json")
    assert code == 0, err
    recipe = json.loads(out)["recipe"]
    assert (recipe["prompt"], recipe["seed"], recipe["sampler"], recipe["steps"]) == (
        "a red circle",
        1234,
        "Euler a",
        3,
    )


def test_reproduce_refuses_a1111_settings_it_cannot_honour_unless_lenient(cli, tmp_path):
    from spellbook.infotext import write_png_text

    path = tmp_path / "hires.png"
    params = (
        "Steps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 16x16, Model: tiny, Version: v1.10.1, "
        "ENSD: 0, Denoising strength: 0.5, Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent, "
        "Hires sampler: DPM++ 2M, Variation seed: 12345, "
        'Variation seed strength: 0.3, Lora hashes: "add_detail: 7c6bad76eb54"'
    )
    write_png_text(Image.new("RGB", (16, 16)), path, {"parameters": f"a red circle\n{params}"})
    code, _, err = cli("reproduce", path, "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1
    for key in ("Hires sampler", "Lora hashes"):
        assert key in err, key
    assert "Version" not in err and "ENSD" not in err  # harmless, and at its default
    assert "Variation seed" not in err and "Hires upscale" not in err  # honoured
    code, out, err = cli("reproduce", path, "--lenient", "--out", tmp_path / "o", "--json")
    assert code == 0 and "warning: dropped Hires sampler: DPM++ 2M" in err and "warning: dropped Lora hashes" in err
    recipe = json.loads(out)["recipe"]
    assert (recipe["subseed"], recipe["subseed_strength"]) == (12345, 0.3)
    assert recipe["hires"] == {"width": 32, "height": 32, "scale": 2.0, "steps": 3, "upscaler": "Latent",
                               "denoise": 0.5}  # fmt: skip
    assert Image.open(json.loads(out)["path"]).size == (32, 32)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    code, out, err = cli("info", plain, "--json")
    assert code == 2 and out == "" and "carries no recipe" in err


def test_models_add_checks_the_file_first_and_rm_takes_it_out(cli, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    code, _, err = cli("models", "add", garbage)
    assert code == 2 and "not a readable .safetensors file" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")
    code, _, err = cli("models", "add", tmp_path / "old.ckpt")
    assert code == 2 and "--allow-pickle" in err
    code, out, _ = cli("models", "list")
    assert "garbage" not in out and "old" not in out  # nothing was registered
    code, out, err = cli("models", "info", "tiny", "--json")
    assert code == 0 and json.loads(out)["native_size"] == 16 and json.loads(out)["parameters"] > 0
    code, out, err = cli("models", "rm", "tiny")
    assert code == 0 and "removed tiny" in out
    assert "tiny" not in cli("models", "list")[1]
    code, _, err = cli("models", "rm", "shapes")
    assert code == 2 and "built in" in err


def test_toy_judge_exits_1_when_the_image_differs_from_the_prompt(cli, tmp_path):
    from spellbook.toy import world

    picture = world.render(world.Scene("red", "circle", "left", "black"), np.random.default_rng(0))
    path = tmp_path / "red.png"
    Image.fromarray(picture).save(path)
    assert cli("toy", "judge", path, "--prompt", "a red circle on the left, black background")[0] == 0
    code, out, _ = cli("toy", "judge", path, "--prompt", "a blue circle on the left, black background")
    assert code == 1 and "differs from the prompt in: colour" in out


def test_a_decompression_bomb_is_one_line_and_exit_2_everywhere(cli, tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"  # claims 30000x30000: decoding it would take gigabytes
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    for args in (
        ("info", bomb),
        ("verify", bomb),
        ("toy", "judge", bomb),
        ("img2img", bomb, "x", "--model", "tiny"),
        ("inpaint", bomb, bomb, "x", "--model", "tiny"),
        ("gallery", "similar", bomb),
    ):
        code, _, err = cli(*args)
        assert code == 2 and "too large to open safely" in err and len(err.strip().splitlines()) == 1, (args, err)
    good = tmp_path / "folder"
    good.mkdir()
    bomb.rename(good / "bomb.png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good / "plain.png")
    code, out, _ = cli("gallery", "import", good)
    assert code == 0 and "imported 1" in out and "bomb.png is too large" in out


def test_styles_from_an_a1111_file_expand_into_the_recipe_and_the_infotext(cli, tmp_path):
    csv_file = tmp_path / "styles.csv"
    csv_file.write_text(
        'name,prompt,negative_prompt\n"Oil","oil painting of {prompt}, canvas","photo"\nbright,"bright colours",\n'
        "Oil,dup,\n",
        encoding="utf-8",
    )
    code, _, err = cli("styles", "import", csv_file)
    assert code == 2 and "appears twice" in err
    csv_file.write_text(csv_file.read_text().replace("Oil,dup,\n", ""), encoding="utf-8")
    code, out, _ = cli("styles", "import", csv_file)
    assert code == 0 and "imported 2 styles" in out
    assert cli("styles", "add", "bright", "--prompt", "x")[0] == 2  # exists
    code, out, _ = cli("styles", "list", "--json")
    assert [s["name"] for s in json.loads(out)] == ["Oil", "bright"]
    code, out, err = cli(
        "generate", "a red circle", "--style", "Oil", "--style", "bright", "-n", "blurry",
        "--model", "tiny", "--steps", "2", "--seed", "3", "--out", tmp_path / "o", "--json",
    )  # fmt: skip
    assert code == 0, err
    record = json.loads(out)[0]
    recipe = record["recipe"]
    assert recipe["prompt"] == "oil painting of a red circle, canvas, bright colours"
    assert recipe["negative_prompt"] == "blurry, photo" and recipe["styles"] == ["Oil", "bright"]
    params = parse_infotext(read_png_text(record["path"])["parameters"])[2]
    assert params["Styles array"] == '["Oil", "bright"]'
    assert cli("verify", record["path"])[0] == 0  # the expanded prompt is what runs again
    code, _, err = cli("generate", "x", "--style", "oil", "--model", "tiny", "--out", tmp_path / "o")
    assert code == 2 and "unknown style 'oil'" in err and "'Oil'" in err
    assert cli("styles", "rm", "bright")[0] == 0
    code, out, _ = cli("styles", "list")
    assert out.splitlines() == ["Oil\toil painting of {prompt}, canvas\tphoto"]
