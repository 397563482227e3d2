"""Metadata in PNG files: our infotext must read like A1111's, and foreign images must import."""

from __future__ import annotations

import copy
import json
import random
import struct
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from spellbook.infotext import (
    format_infotext,
    parse_infotext,
    read_foreign_recipe,
    read_png_text,
    write_png_text,
)

A1111_INFOTEXT = (
    "masterpiece, an otter\n"
    "wearing a hat\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Clip skip: 2, "
    'TI hashes: "charlie: 0123456789ab, otter: 89abcdef0123", Lora hashes: "fluffy: a1b2c3d4e5f6", '
    "Version: v1.10.1"
)

# ComfyUI's default graph, as its SaveImage node writes it into the `prompt` chunk (API format).
COMFY_PROMPT = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 156680208700286,
            "steps": 20,
            "cfg": 8,
            "sampler_name": "dpmpp_2m",
            "scheduler": "karras",
            "denoise": 1,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "beautiful scenery nature glass bottle landscape, purple galaxy bottle", "clip": ["4", 1]},
    },
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}

# The same graph in the UI format of the `workflow` chunk.
COMFY_WORKFLOW = {
    "last_node_id": 9,
    "last_link_id": 9,
    "nodes": [
        {
            "id": 3,
            "type": "KSampler",
            "mode": 0,
            "inputs": [
                {"name": "model", "type": "MODEL", "link": 1},
                {"name": "positive", "type": "CONDITIONING", "link": 4},
                {"name": "negative", "type": "CONDITIONING", "link": 6},
                {"name": "latent_image", "type": "LATENT", "link": 2},
            ],
            "widgets_values": [156680208700286, "randomize", 20, 8, "euler_ancestral", "normal", 1],
        },
        {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "widgets_values": ["v1-5-pruned-emaonly.safetensors"]},
        {"id": 5, "type": "EmptyLatentImage", "mode": 0, "widgets_values": [512, 768, 1]},
        {
            "id": 6,
            "type": "CLIPTextEncode",
            "mode": 0,
            "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
            "widgets_values": ["beautiful scenery nature glass bottle landscape, purple galaxy bottle"],
        },
        {
            "id": 7,
            "type": "CLIPTextEncode",
            "mode": 0,
            "inputs": [{"name": "clip", "type": "CLIP", "link": 5}],
            "widgets_values": ["text, watermark"],
        },
        {
            "id": 8,
            "type": "VAEDecode",
            "mode": 0,
            "inputs": [{"name": "samples", "link": 7}, {"name": "vae", "link": 8}],
        },
        {
            "id": 9,
            "type": "SaveImage",
            "mode": 0,
            "inputs": [{"name": "images", "link": 9}],
            "widgets_values": ["ComfyUI"],
        },
    ],
    "links": [
        [1, 4, 0, 3, 0, "MODEL"],
        [2, 5, 0, 3, 3, "LATENT"],
        [3, 4, 1, 6, 0, "CLIP"],
        [4, 6, 0, 3, 1, "CONDITIONING"],
        [5, 4, 1, 7, 0, "CLIP"],
        [6, 7, 0, 3, 2, "CONDITIONING"],
        [7, 3, 0, 8, 0, "LATENT"],
        [8, 4, 2, 8, 1, "VAE"],
        [9, 8, 0, 9, 0, "IMAGE"],
    ],
    "version": 0.4,
}


def png_text_chunk_types(path: Path) -> dict[str, str]:
    """{keyword: chunk type} for every text chunk, read from the raw PNG bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    found, offset = {}, 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        chunk_type = data[offset + 4 : offset + 8].decode("ascii")
        body = data[offset + 8 : offset + 8 + length]
        if chunk_type in ("tEXt", "zTXt", "iTXt"):
            found[body.split(b"\0", 1)[0].decode("latin-1")] = chunk_type
        offset += 12 + length
    return found


def small_image() -> Image.Image:
    return Image.new("RGB", (8, 8), (200, 120, 40))


# --- A1111 infotext ---------------------------------------------------------------------------------------


def test_format_writes_the_a1111_layout_that_other_tools_parse():
    text = format_infotext(
        "an otter\nwearing a hat",
        "blurry, lowres",
        {
            "Steps": 20,
            "Sampler": "DPM++ 2M",
            "Schedule type": "Karras",
            "CFG scale": 7.5,
            "Seed": 1234,
            "Size": "512x768",
            "Model hash": "6ce0161689",
            "Denoising strength": None,
            "TI hashes": {"charlie": "0123456789ab"},
            "Version": "v1.10.1",
        },
    )
    assert text == (
        "an otter\nwearing a hat\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 512x768, "
        'Model hash: 6ce0161689, TI hashes: "charlie: 0123456789ab", Version: v1.10.1'
    )


def test_format_omits_the_negative_line_when_there_is_no_negative_prompt():
    text = format_infotext("an otter", "", {"Steps": 20, "Seed": 1, "Size": "64x64"})
    assert text == "an otter\nSteps: 20, Seed: 1, Size: 64x64"


def test_format_refuses_a_key_that_could_not_be_read_back():
    with pytest.raises(ValueError, match="'Bad: key'"):
        format_infotext("an otter", "", {"Bad: key": 1})


def test_a_real_a1111_infotext_is_parsed_into_prompt_negative_and_params():
    prompt, negative, params = parse_infotext(A1111_INFOTEXT)
    assert prompt == "masterpiece, an otter\nwearing a hat"
    assert negative == "blurry, lowres"
    assert params == {
        "Steps": "20",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7",
        "Seed": "1234",
        "Size": "512x768",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "Denoising strength": "0.7",
        "Clip skip": "2",
        "TI hashes": "charlie: 0123456789ab, otter: 89abcdef0123",
        "Lora hashes": "fluffy: a1b2c3d4e5f6",
        "Version": "v1.10.1",
    }


def test_a_multi_line_negative_prompt_keeps_all_its_lines():
    text = "an otter\nNegative prompt: blurry\nlowres, jpeg\nSteps: 20, Seed: 5, Size: 64x64"
    assert parse_infotext(text) == ("an otter", "blurry\nlowres, jpeg", {"Steps": "20", "Seed": "5", "Size": "64x64"})


def test_text_without_a_params_line_is_all_prompt():
    # Two `key: value` pairs are not enough to be a params line (A1111's rule), so a styled prompt survives.
    assert parse_infotext("an otter\nstyle: oil, mood: calm") == ("an otter\nstyle: oil, mood: calm", "", {})
    assert parse_infotext("") == ("", "", {})


def test_windows_line_endings_are_read():
    text = "an otter\r\nNegative prompt: blurry\r\nSteps: 20, Seed: 5, Size: 64x64\r\n"
    assert parse_infotext(text) == ("an otter", "blurry", {"Steps": "20", "Seed": "5", "Size": "64x64"})


ROUND_TRIP_VALUES = {
    "Plain": "DPM++ 2M",
    "Comma": "a, b",
    "Colon": "charlie: 0123456789ab",
    "Newline": "first\nsecond",
    "Leading quote": '"quoted" then more',
    "Quoted whole": '"hello"',
    "Lone quote": '"',
    "Inner quote": 'say "hi"',
    "Backslash": "C:\\models\\v1.safetensors",
    "Spaces": "  padded  ",
    "Empty": "",
    "Unicode": "水獭: 🦦, done",
    "Tab": "a\tb",
}


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("an otter", ""),
        ("an otter\nwearing a hat\n\nin the rain", "blurry\nlowres"),
        ("一只水獭, an otter 🦦", "模糊, blurry"),
        ("", "blurry"),
        ("Steps: 1, Seed: 2, Size: 3x3\nan otter", "Sampler: a, b: c, d: e"),
    ],
)
def test_infotext_round_trips_prompts_and_quoted_values(prompt, negative):
    params = {"Steps": 20, "Seed": 4294967295, "CFG scale": 6.5, **ROUND_TRIP_VALUES}
    text = format_infotext(prompt, negative, params)
    assert text.count("\n") == prompt.count("\n") + negative.count("\n") + (2 if negative else 1)
    assert parse_infotext(text) == (prompt, negative, {key: str(value) for key, value in params.items()})


# --- PNG chunks -------------------------------------------------------------------------------------------


def test_latin1_text_is_written_as_text_and_other_text_as_itxt(tmp_path):
    path = tmp_path / "otter.png"
    chunks = {
        "parameters": "an otter, café\nSteps: 20",
        "spellbook": json.dumps({"prompt": "一只水獭 🦦"}, ensure_ascii=False),
    }
    write_png_text(small_image(), path, chunks)
    assert png_text_chunk_types(path) == {"parameters": "tEXt", "spellbook": "iTXt"}
    assert read_png_text(path) == chunks


def test_read_png_text_reads_ztxt_and_chunks_after_the_image_data(tmp_path):
    path = tmp_path / "compressed.png"
    info = PngInfo()
    info.add_text("parameters", "an otter\nSteps: 20, Seed: 1, Size: 8x8", zip=True)
    info.add_itxt("Comment", "水獭", zip=True)
    small_image().save(path, pnginfo=info)
    assert png_text_chunk_types(path) == {"parameters": "zTXt", "Comment": "iTXt"}
    assert read_png_text(path)["parameters"].startswith("an otter")
    with Image.open(path) as image:
        assert read_png_text(image) == {"parameters": "an otter\nSteps: 20, Seed: 1, Size: 8x8", "Comment": "水獭"}


def test_an_image_that_is_not_a_png_has_no_text(tmp_path):
    path = tmp_path / "otter.jpg"
    small_image().save(path)
    assert read_png_text(path) == {}
    assert read_png_text(small_image()) == {}


def test_write_png_text_refuses_a_key_png_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="1 to 79 latin-1"):
        write_png_text(small_image(), tmp_path / "x.png", {"水獭": "otter"})


def test_a_non_latin1_infotext_survives_a_png_round_trip(tmp_path):
    path = tmp_path / "otter.png"
    text = format_infotext("一只水獭, an otter 🦦", "模糊", {"Steps": 12, "Seed": 7, "Size": "8x8"})
    write_png_text(small_image(), path, {"parameters": text})
    assert png_text_chunk_types(path) == {"parameters": "iTXt"}
    recipe = read_foreign_recipe(read_png_text(path))
    assert recipe is not None
    assert (recipe["prompt"], recipe["negative_prompt"], recipe["seed"]) == ("一只水獭, an otter 🦦", "模糊", 7)


# --- foreign recipes: A1111 -------------------------------------------------------------------------------


def test_an_a1111_images_settings_are_read_with_their_types():
    recipe = read_foreign_recipe({"parameters": A1111_INFOTEXT})
    assert recipe == {
        "source": "a1111",
        "prompt": "masterpiece, an otter\nwearing a hat",
        "negative_prompt": "blurry, lowres",
        "steps": 20,
        "sampler": "DPM++ 2M",
        "schedule": "Karras",
        "cfg_scale": 7.0,
        "seed": 1234,
        "width": 512,
        "height": 768,
        "model_hash": "6ce0161689",
        "model": "v1-5-pruned-emaonly",
        "denoising_strength": 0.7,
        "clip_skip": 2,
        "ti_hashes": {"charlie": "0123456789ab", "otter": "89abcdef0123"},
        "extra": {"Lora hashes": "fluffy: a1b2c3d4e5f6", "Version": "v1.10.1"},
    }


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [
        ("Euler a", ("Euler a", "Automatic")),
        ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Exponential")),
        ("DDIM", ("DDIM", "Automatic")),
    ],
)
def test_old_a1111_sampler_names_carry_the_schedule(sampler, expected):
    recipe = read_foreign_recipe({"parameters": f"an otter\nSteps: 20, Sampler: {sampler}, CFG scale: 7, Seed: 1"})
    assert recipe is not None
    assert (recipe["sampler"], recipe["schedule"]) == expected


def test_an_a1111_value_that_is_not_a_number_is_kept_in_extra():
    recipe = read_foreign_recipe({"parameters": "an otter\nSteps: twenty, Seed: 12, Size: big, CFG scale: 7"})
    assert recipe is not None
    assert recipe["seed"] == 12
    assert "steps" not in recipe and "width" not in recipe
    assert recipe["extra"] == {"Steps": "twenty", "Size": "big"}


def test_a1111_parameters_without_settings_still_give_the_prompt():
    assert read_foreign_recipe({"parameters": "an otter in a hat"}) == {
        "source": "a1111",
        "prompt": "an otter in a hat",
        "negative_prompt": "",
        "extra": {},
    }


def test_our_own_chunk_wins_and_is_left_for_the_caller_to_validate():
    chunks = {"spellbook": json.dumps({"version": 1, "prompt": "an otter"}), "parameters": A1111_INFOTEXT}
    assert read_foreign_recipe(chunks) == {"source": "spellbook", "recipe": {"version": 1, "prompt": "an otter"}}


# --- foreign recipes: ComfyUI -----------------------------------------------------------------------------


COMFY_EXPECTED = {
    "source": "comfyui",
    "prompt": "beautiful scenery nature glass bottle landscape, purple galaxy bottle",
    "negative_prompt": "text, watermark",
    "seed": 156680208700286,
    "steps": 20,
    "cfg_scale": 8.0,
    "width": 512,
    "height": 768,
    "model": "v1-5-pruned-emaonly.safetensors",
}


def test_a_comfyui_image_is_read_from_its_prompt_graph(tmp_path):
    path = tmp_path / "ComfyUI_00001_.png"
    write_png_text(small_image(), path, {"prompt": json.dumps(COMFY_PROMPT), "workflow": json.dumps(COMFY_WORKFLOW)})
    recipe = read_foreign_recipe(read_png_text(path))
    # The exact API graph wins over the workflow (which here says euler_ancestral/normal).
    assert recipe == {**COMFY_EXPECTED, "sampler": "DPM++ 2M", "schedule": "Karras"}


def test_a_comfyui_image_with_only_a_workflow_is_read():
    recipe = read_foreign_recipe({"workflow": json.dumps(COMFY_WORKFLOW)})
    assert recipe == {**COMFY_EXPECTED, "sampler": "Euler a", "schedule": "Automatic"}


def test_comfyui_prompts_are_followed_through_an_intermediate_node():
    graph = copy.deepcopy(COMFY_PROMPT)
    graph["3"]["inputs"]["positive"] = ["10", 0]
    graph["10"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["6", 0], "width": 64}}
    graph["6"]["inputs"]["text"] = ["11", 0]
    graph["11"] = {"class_type": "PrimitiveString", "inputs": {"value": "an otter"}}
    graph["7"]["inputs"]["text"] = ["12", 0]
    graph["12"] = {"class_type": "PrimitiveString", "inputs": {"value": "blurry"}}
    recipe = read_foreign_recipe({"prompt": json.dumps(graph)})
    assert recipe is not None
    assert (recipe["prompt"], recipe["negative_prompt"]) == ("an otter", "blurry")


def test_comfyui_img2img_denoise_becomes_denoising_strength_and_unknown_samplers_are_kept():
    graph = copy.deepcopy(COMFY_PROMPT)
    graph["3"]["inputs"].update(denoise=0.6, sampler_name="res_multistep_ancestral", scheduler="sgm_uniform")
    graph["3"]["inputs"]["latent_image"] = ["10", 0]
    graph["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    graph["11"] = {"class_type": "LoadImage", "inputs": {"image": "otter.png"}}
    del graph["5"]
    recipe = read_foreign_recipe({"prompt": json.dumps(graph)})
    assert recipe is not None
    assert recipe["denoising_strength"] == 0.6
    assert (recipe["sampler"], recipe["schedule"]) == ("res_multistep_ancestral", "SGM Uniform")
    assert "width" not in recipe
    # The *_gpu SDE samplers are the samplers they name (their noise is drawn on the GPU).
    graph["3"]["inputs"]["sampler_name"] = "dpmpp_2m_sde_gpu"
    assert read_foreign_recipe({"prompt": json.dumps(graph)})["sampler"] == "DPM++ 2M SDE"


def test_comfyui_hires_fix_reports_the_first_pass():
    graph = copy.deepcopy(COMFY_PROMPT)
    graph["2"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "noise_seed": 99,
            "steps": 10,
            "cfg": 5,
            "sampler_name": "euler",
            "scheduler": "normal",
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["13", 0],
        },
    }
    graph["13"] = {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0], "width": 1024, "height": 1536}}
    recipe = read_foreign_recipe({"prompt": json.dumps(graph)})
    assert recipe is not None
    assert (recipe["seed"], recipe["steps"], recipe["width"]) == (156680208700286, 20, 512)


def test_a_broken_prompt_chunk_falls_back_to_the_workflow():
    recipe = read_foreign_recipe(
        {"prompt": '{"3": {"class_type": "KSampler", ', "workflow": json.dumps(COMFY_WORKFLOW)}
    )
    assert recipe is not None
    assert recipe["seed"] == 156680208700286 and recipe["prompt"] == COMFY_EXPECTED["prompt"]


# --- malformed and missing metadata ------------------------------------------------------------------------


def test_a_broken_spellbook_chunk_does_not_hide_the_a1111_parameters():
    recipe = read_foreign_recipe({"spellbook": "{not json", "parameters": A1111_INFOTEXT})
    assert recipe is not None
    assert recipe["source"] == "a1111" and recipe["seed"] == 1234


@pytest.mark.parametrize(
    "chunks",
    [
        {},
        {"Software": "GIMP", "Comment": "holiday"},
        {"spellbook": "{not json", "prompt": "[1, 2", "workflow": ""},
        {"spellbook": "[1, 2]", "prompt": '"just a string"', "workflow": '{"nodes": 3}'},
        {"parameters": "   "},
        {"prompt": "9" * 5000},
    ],
)
def test_no_known_metadata_gives_none(chunks):
    assert read_foreign_recipe(chunks) is None


def _mutate(value: object, rng: random.Random) -> object:
    junk = [None, True, -1, 1.5, "x", [], {}, ["999", 0], [[1]], {"a": 1}]
    if isinstance(value, dict):
        return {key: _mutate(item, rng) for key, item in value.items()}
    if isinstance(value, list) and value and rng.random() < 0.7:
        return [_mutate(item, rng) for item in value]
    return rng.choice(junk) if rng.random() < 0.3 else value


def test_garbled_comfyui_graphs_never_raise():
    rng = random.Random(0)
    for _ in range(300):
        chunks = {
            "prompt": json.dumps(_mutate(COMFY_PROMPT, rng)),
            "workflow": json.dumps(_mutate(COMFY_WORKFLOW, rng)),
        }
        recipe = read_foreign_recipe(chunks)
        assert recipe is None or recipe["source"] == "comfyui"


@pytest.mark.parametrize("fmt, encoding", [("JPEG", "utf-16-be"), ("WEBP", "utf-16-be"), ("JPEG", "utf-16-le")])
def test_a1111_jpeg_and_webp_infotext_is_read_from_exif_user_comment(tmp_path, fmt, encoding):
    """A1111 writes its infotext into EXIF UserComment for JPEG and WebP (piexif, 'UNICODE' + UTF-16)."""
    from spellbook.infotext import read_foreign_recipe, read_png_text

    text = "an otter, (hat:1.2)\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 16x16, Model: v1-5"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode(encoding)
    path = tmp_path / f"a1111.{fmt.lower()}"
    Image.new("RGB", (16, 16)).save(path, format=fmt, exif=exif)
    found = read_foreign_recipe(read_png_text(path))
    assert found["source"] == "a1111" and found["prompt"] == "an otter, (hat:1.2)" and found["seed"] == 1234
    assert (found["sampler"], found["schedule"], found["negative_prompt"]) == ("DPM++ 2M", "Karras", "blurry")
    plain = tmp_path / f"plain.{fmt.lower()}"
    Image.new("RGB", (16, 16)).save(plain, format=fmt)
    assert read_png_text(plain) == {}
