"""The ComfyUI-compatible API (server/comfy.py): ComfyUI clients' calls, replayed against the tiny model."""

from __future__ import annotations

import copy
import io
import json
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from spellbook.provenance import read_metadata
from spellbook.settings import Settings

# Open WebUI's default ComfyUI workflow (backend/open_webui/config.py, COMFYUI_DEFAULT_WORKFLOW), as it ships.
OPEN_WEBUI_DEFAULT_WORKFLOW = """
{
  "3": {
    "inputs": {
      "seed": 0,
      "steps": 20,
      "cfg": 8,
      "sampler_name": "euler",
      "scheduler": "normal",
      "denoise": 1,
      "model": ["4", 0],
      "positive": ["6", 0],
      "negative": ["7", 0],
      "latent_image": ["5", 0]
    },
    "class_type": "KSampler",
    "_meta": {"title": "KSampler"}
  },
  "4": {
    "inputs": {"ckpt_name": "model.safetensors"},
    "class_type": "CheckpointLoaderSimple",
    "_meta": {"title": "Load Checkpoint"}
  },
  "5": {
    "inputs": {"width": 512, "height": 512, "batch_size": 1},
    "class_type": "EmptyLatentImage",
    "_meta": {"title": "Empty Latent Image"}
  },
  "6": {
    "inputs": {"text": "Prompt", "clip": ["4", 1]},
    "class_type": "CLIPTextEncode",
    "_meta": {"title": "CLIP Text Encode (Prompt)"}
  },
  "7": {
    "inputs": {"text": "", "clip": ["4", 1]},
    "class_type": "CLIPTextEncode",
    "_meta": {"title": "CLIP Text Encode (Prompt)"}
  },
  "8": {
    "inputs": {"samples": ["3", 0], "vae": ["4", 2]},
    "class_type": "VAEDecode",
    "_meta": {"title": "VAE Decode"}
  },
  "9": {
    "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
    "class_type": "SaveImage",
    "_meta": {"title": "Save Image"}
  }
}
"""
# SillyTavern's default ComfyUI workflow (default/content/Default_Comfy_Workflow.json), placeholders and all.
SILLYTAVERN_DEFAULT_WORKFLOW = """{
    "3": {"class_type": "KSampler", "inputs": {"cfg": "%scale%", "denoise": 1, "latent_image": ["5", 0],
          "model": ["4", 0], "negative": ["7", 0], "positive": ["6", 0], "sampler_name": "%sampler%",
          "scheduler": "%scheduler%", "seed": "%seed%", "steps": "%steps%"}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "%model%"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": "%height%", "width": "%width%"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "%prompt%"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "%negative_prompt%"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "Dechat", "images": ["8", 0]}}
}"""
# Open WebUI's required workflow nodes (its admin settings), with the node ids an admin enters for that workflow.
OPEN_WEBUI_NODES = [
    {"type": "prompt", "key": "text", "node_ids": ["6"]},
    {"type": "model", "key": "ckpt_name", "node_ids": ["4"]},
    {"type": "width", "key": "width", "node_ids": ["5"]},
    {"type": "height", "key": "height", "node_ids": ["5"]},
    {"type": "steps", "key": "steps", "node_ids": ["3"]},
    {"type": "seed", "key": "seed", "node_ids": ["3"]},
]


def open_webui_workflow(model: str, prompt: str, width: int, height: int, steps: int, seed: int) -> dict:
    """What Open WebUI's `_apply_workflow_nodes` makes of its workflow for one request."""
    workflow = json.loads(OPEN_WEBUI_DEFAULT_WORKFLOW)
    given = {"prompt": prompt, "model": model, "width": width, "height": height, "steps": steps, "seed": seed}
    for node in OPEN_WEBUI_NODES:
        for node_id in node["node_ids"]:
            workflow[node_id]["inputs"][node["key"]] = given[node["type"]]
    return workflow


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def receive_until_done(receive, prompt_id: str, timeout: float = 120) -> list[dict]:
    """Websocket messages until ComfyUI's end of a prompt (`executing` with node null), as Open WebUI waits; an
    AssertionError if it does not come within `timeout` seconds."""
    messages: list[dict] = []
    finished = threading.Event()

    def read() -> None:
        while True:
            message = receive()
            messages.append(message)
            data = message.get("data", {})
            if message["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                finished.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert finished.wait(timeout), f"no end of prompt {prompt_id}: {messages}"
    return messages


def wait_history(client, prompt_id: str, headers=None, timeout: float = 120) -> dict:
    """Poll /history/{id} until the prompt ended, as SillyTavern and ComfyUI's example scripts do."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = client.get(f"/history/{prompt_id}", headers=headers).json()
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.05)
    raise AssertionError(f"prompt {prompt_id} did not end")


def graph_img2img(picture: str, denoise: float = 0.6, seed: int = 3) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": picture, "upload": "image"}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square", "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": 4,
                "cfg": 6,
                "sampler_name": "ddim",
                "scheduler": "normal",
                "denoise": denoise,
                "model": ["1", 0],
                "positive": ["4", 0],
                "negative": ["5", 0],
                "latent_image": ["3", 0],
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "ComfyUI"}},
    }


def tiny_workflow(**changes) -> dict:
    workflow = open_webui_workflow("tiny", "a red circle", 16, 16, 2, 7)
    for node_id, inputs in changes.items():
        workflow[node_id]["inputs"].update(inputs)
    return workflow


# ----------------------------------------------------------------------------------------------- clients


def test_open_webui_default_workflow_end_to_end_on_a_real_server(studio, home):
    """Open WebUI's sequence against uvicorn (websockets included): models from /object_info, websocket first,
    POST /prompt, wait for `executing` null, GET /history/{id}, GET /view for each SaveImage/PreviewImage image."""
    import httpx
    from websockets.sync.client import connect

    from webtools import serve

    with serve("tiny") as base:
        http = httpx.Client(base_url=base, timeout=60)
        info = http.get("/object_info").json()
        models = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
        assert "tiny" in models
        seed = 2**40 + 5  # Open WebUI draws seeds up to 2^50: taken modulo 2^32 (documented)
        workflow = open_webui_workflow("tiny", "a red circle on the left", 16, 16, 3, seed)
        client_id = "d1c3f0e2-0000-4000-8000-000000000001"
        with connect(f"{base.replace('http', 'ws')}/ws?clientId={client_id}", open_timeout=30) as ws:
            first = json.loads(ws.recv(timeout=30))
            assert first == {
                "type": "status",
                "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id},
            }
            queued = http.post("/prompt", json={"prompt": workflow, "client_id": client_id})
            assert queued.status_code == 200, queued.text
            assert set(queued.json()) == {"prompt_id", "number", "node_errors"} and queued.json()["node_errors"] == {}
            prompt_id = queued.json()["prompt_id"]
            messages = receive_until_done(lambda: json.loads(ws.recv(timeout=120)), prompt_id)
        kinds = [m["type"] for m in messages]
        assert {"execution_start", "executing", "progress", "executed", "execution_success"} <= set(kinds)
        assert kinds.index("execution_success") < len(kinds) - 1  # executing null comes last, as ComfyUI sends it
        history = http.get(f"/history/{prompt_id}").json()[prompt_id]
        assert history["status"]["status_str"] == "success" and history["status"]["completed"] is True
        assert history["prompt"][1] == prompt_id and history["prompt"][2] == workflow
        pictures = []
        for node_id, output in history["outputs"].items():
            if workflow[node_id]["class_type"] in ("SaveImage", "PreviewImage"):
                for image in output["images"]:
                    response = http.get("/view", params=image)
                    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
                    pictures.append(response.content)
        assert len(pictures) == 1
        path = home / "spellbook_view.png"
        path.write_bytes(pictures[0])
        recipe = read_metadata(path).recipe
        assert (recipe.prompt, recipe.seed, recipe.steps, recipe.sampler, recipe.model.name) == (
            "a red circle on the left",
            seed % 2**32,
            3,
            "Euler",
            "tiny",
        )
        assert (recipe.width, recipe.height, recipe.guidance, recipe.schedule) == (16, 16, 8.0, "Automatic")


def test_sillytavern_default_workflow(make_client):
    """SillyTavern's server side: /system_stats to ping; models, samplers, schedulers and VAEs read from /object_info
    (UNETLoader and VAELoader included); the workflow's placeholders replaced as its page does; the body POSTed as a
    string (text/plain, no auth header); GET /history polled until the prompt appears; GET /view of the first image."""
    client, _ = make_client()
    assert client.get("/system_stats").status_code == 200
    info = client.get("/object_info").json()
    models = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "tiny" in models and info["UNETLoader"]["input"]["required"]["unet_name"][0] == []
    assert info["VAELoader"]["input"]["required"]["vae_name"][0] == []
    assert "dpmpp_2m" in info["KSampler"]["input"]["required"]["sampler_name"][0]
    assert "karras" in info["KSampler"]["input"]["required"]["scheduler"][0]
    seed = 2**53 - 1  # SillyTavern draws random seeds up to Number.MAX_SAFE_INTEGER
    values = {
        "prompt": "a green triangle",
        "negative_prompt": "blurry",
        "seed": seed,
        "model": "tiny",
        "sampler": "dpmpp_2m",
        "scheduler": "karras",
        "steps": 3,
        "scale": 5.5,
        "width": 16,
        "height": 16,
    }
    workflow = SILLYTAVERN_DEFAULT_WORKFLOW
    for key, value in values.items():
        workflow = workflow.replace(f'"%{key}%"', json.dumps(value))
    queued = client.post(
        "/prompt", content=f'{{ "prompt": {workflow} }}', headers={"content-type": "text/plain;charset=UTF-8"}
    )
    assert queued.status_code == 200, queued.text
    prompt_id = queued.json()["prompt_id"]
    deadline = time.monotonic() + 120
    while (item := client.get("/history").json().get(prompt_id)) is None:
        assert time.monotonic() < deadline, "the prompt never appeared in /history"
        time.sleep(0.1)
    assert item["status"]["status_str"] == "success"
    image = next(image for output in item["outputs"].values() for image in output["images"])
    view = client.get(f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}")
    assert view.status_code == 200 and view.content.startswith(b"\x89PNG")
    recipe = client.get(f"/api/v1/jobs/{prompt_id}").json()["recipe"]
    assert (recipe["sampler"], recipe["schedule"], recipe["guidance"], recipe["seed"]) == (
        "DPM++ 2M",
        "Karras",
        5.5,
        seed % 2**32,
    )
    assert (recipe["prompt"], recipe["negative_prompt"]) == ("a green triangle", "blurry")


def test_vae_loader_is_the_jobs_vae(make_client, home, tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir / "vae", home / "vae" / "tinyvae")
    client, _ = make_client()
    assert client.get("/object_info/VAELoader").json()["VAELoader"]["input"]["required"]["vae_name"][0] == ["tinyvae"]
    graph = tiny_workflow()
    graph["10"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tinyvae"}}
    graph["8"]["inputs"]["vae"] = ["10", 0]
    prompt_id = client.post("/prompt", json={"prompt": graph}).json()["prompt_id"]
    assert wait_history(client, prompt_id)["status"]["status_str"] == "success"
    assert client.get(f"/api/v1/jobs/{prompt_id}").json()["recipe"]["vae"]["name"] == "tinyvae"
    # Decoding with one VAE and encoding with another is refused: a job has one VAE.
    client.post("/upload/image", files={"image": ("p.png", png_bytes(Image.new("RGB", (16, 16))), "image/png")})
    mixed = graph_img2img("p.png")
    mixed["10"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tinyvae"}}
    mixed["7"]["inputs"]["vae"] = ["10", 0]
    refused = client.post("/prompt", json={"prompt": mixed})
    assert refused.status_code == 400 and set(refused.json()["node_errors"]) == {"3", "7"}


def test_websocket_sends_progress_and_executed_for_its_client(make_client):
    client, _ = make_client()
    workflow = tiny_workflow(**{"3": {"steps": 4}, "4": {"ckpt_name": "tiny.safetensors"}})
    workflow["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    with (
        client.websocket_connect("ws://127.0.0.1/ws?clientId=one") as ws,
        client.websocket_connect("ws://127.0.0.1/ws?clientId=other") as other,
    ):
        assert ws.receive_json()["data"]["sid"] == "one"
        assert other.receive_json()["data"]["sid"] == "other"
        prompt_id = client.post("/prompt", json={"prompt": workflow, "client_id": "one"}).json()["prompt_id"]
        messages = receive_until_done(ws.receive_json, prompt_id)
        # The other client hears the queue's status only, nothing of this prompt.
        other.send_text("{}")  # ComfyUI clients may send; nothing is answered
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert progress and all(p["prompt_id"] == prompt_id and p["node"] == "3" for p in progress)
    assert progress[-1]["value"] == progress[-1]["max"] > 0
    executed = {m["data"]["node"]: m["data"]["output"]["images"] for m in messages if m["type"] == "executed"}
    assert set(executed) == {"9", "10"}
    assert executed["9"][0]["type"] == "output" and executed["10"][0]["type"] == "temp"
    executing = [m["data"]["node"] for m in messages if m["type"] == "executing"]
    assert executing.index("4") < executing.index("3") < executing.index("8") < executing.index("9")
    assert executing[-1] is None
    history = client.get(f"/history/{prompt_id}").json()[prompt_id]
    assert history["outputs"]["9"]["images"] == executed["9"]
    assert [m[0] for m in history["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    image = client.get("/view", params=executed["10"][0])
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (16, 16)
    preview = client.get("/view", params={**executed["10"][0], "preview": "webp;80"})
    assert preview.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(preview.content)).format == "WEBP"
    assert prompt_id in client.get("/history").json()


def test_img2img_from_an_upload_with_denoise(make_client, home):
    client, _ = make_client()
    picture = png_bytes(Image.new("RGB", (16, 16), (20, 40, 200)))
    files = {"image": ("photo.png", picture, "image/png")}
    uploaded = client.post("/upload/image", files=files, data={"type": "input", "overwrite": "false"})
    assert uploaded.json() == {"name": "photo.png", "subfolder": "", "type": "input"}
    # The same picture again keeps its name; another one under that name is renamed, as ComfyUI does.
    assert client.post("/upload/image", files=files).json()["name"] == "photo.png"
    other = png_bytes(Image.new("RGB", (16, 16), (200, 40, 20)))
    assert client.post("/api/upload/image", files={"image": ("photo.png", other, "image/png")}).json()["name"] == (
        "photo (1).png"
    )
    assert client.get("/view", params={"filename": "photo.png", "type": "input"}).content == picture
    listed = client.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"][0]
    assert listed == ["photo (1).png", "photo.png"]

    queued = client.post("/prompt", json={"prompt": graph_img2img("photo.png"), "client_id": "x"})
    assert queued.status_code == 200, queued.text
    history = wait_history(client, queued.json()["prompt_id"])
    assert history["status"]["status_str"] == "success"
    job = client.get(f"/api/v1/jobs/{queued.json()['prompt_id']}").json()
    recipe = job["recipe"]
    assert (recipe["kind"], recipe["strength"], recipe["steps"], recipe["width"]) == ("img2img", 0.6, 4, 16)
    stored = Image.open(Settings.from_env().inputs_dir / f"{recipe['init_image']['sha256']}.png")
    assert stored.convert("RGB").getpixel((0, 0)) == (20, 40, 200)


def test_inpaint_from_an_upload_with_transparency(make_client):
    client, _ = make_client()
    picture = Image.new("RGBA", (16, 16), (20, 200, 40, 255))
    picture.paste((0, 0, 0, 0), (0, 0, 8, 16))  # the left half is transparent: repaint it
    client.post("/upload/image", files={"image": ("hole.png", png_bytes(picture), "image/png")})
    graph = graph_img2img("hole.png", denoise=1.0)
    graph["3"] = {
        "class_type": "VAEEncodeForInpaint",
        "inputs": {"pixels": ["2", 0], "vae": ["1", 2], "mask": ["2", 1], "grow_mask_by": 0},
    }
    prompt_id = client.post("/prompt", json={"prompt": graph}).json()["prompt_id"]
    assert wait_history(client, prompt_id)["status"]["status_str"] == "success"
    recipe = client.get(f"/api/v1/jobs/{prompt_id}").json()["recipe"]
    assert recipe["kind"] == "inpaint" and recipe["mask"] is not None


# ----------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "change, node, error_type, words",
    [
        ("lora", "10", "node_not_supported_yet", "LoRA"),
        ("upscale", "10", "not_supported", "first pass of a hires fix"),
        ("unknown", "11", "missing_node_type", "FooNode"),
        ("advanced_no_noise", "3", "not_supported", "add_noise"),
        ("sampler", "3", "value_not_in_list", "dpmpp_3m_sde"),
        ("model", "4", "value_not_in_list", "nope.safetensors"),
        ("steps", "3", "invalid_value", "steps"),
        ("denoise_on_empty_latent", "3", "not_supported", "denoise"),
        ("two_chains", "19", "not_supported", "sampling chains"),
        ("unet", "10", "node_not_supported_yet", "whole checkpoints"),
    ],
)
def test_a_graph_spellbook_cannot_run_is_a_comfyui_400_naming_the_node(make_client, change, node, error_type, words):
    client, _ = make_client(start_worker=False)
    graph = tiny_workflow()
    if change == "lora":
        graph["10"] = {
            "class_type": "LoraLoader",
            "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "x", "strength_model": 1, "strength_clip": 1},
        }
        graph["3"]["inputs"]["model"] = ["10", 0]
    elif change == "upscale":
        graph["10"] = {
            "class_type": "LatentUpscale",
            "inputs": {
                "samples": ["5", 0],
                "upscale_method": "nearest-exact",
                "width": 32,
                "height": 32,
                "crop": "disabled",
            },
        }
        graph["3"]["inputs"]["latent_image"] = ["10", 0]
    elif change == "unknown":
        graph["11"] = {"class_type": "FooNode", "inputs": {}}
    elif change == "advanced_no_noise":
        inputs = graph["3"]["inputs"]
        inputs["noise_seed"] = inputs.pop("seed")
        inputs.pop("denoise")
        inputs.update(add_noise="disable", start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable")
        graph["3"]["class_type"] = "KSamplerAdvanced"
    elif change == "sampler":
        graph["3"]["inputs"]["sampler_name"] = "dpmpp_3m_sde"
    elif change == "model":
        graph["4"]["inputs"]["ckpt_name"] = "nope.safetensors"
    elif change == "steps":
        graph["3"]["inputs"]["steps"] = 500  # ComfyUI takes 10000; Spellbook's limit (SPELLBOOK_MAX_STEPS) is lower
    elif change == "denoise_on_empty_latent":
        graph["3"]["inputs"]["denoise"] = 0.5
    elif change == "unet":
        graph["10"] = {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "flux.safetensors", "weight_dtype": "default"},
        }
        graph["3"]["inputs"]["model"] = ["10", 0]
    elif change == "two_chains":
        graph["13"] = copy.deepcopy(graph["3"])
        graph["18"] = {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["4", 2]}}
        graph["19"] = {"class_type": "SaveImage", "inputs": {"images": ["18", 0], "filename_prefix": "b"}}
    response = client.post("/prompt", json={"prompt": graph, "client_id": "c"})
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    errors = body["node_errors"][node]["errors"]
    assert errors[0]["type"] == error_type and words in json.dumps(errors) + body["error"]["message"]
    assert body["node_errors"][node]["class_type"] == graph[node]["class_type"]
    if change == "unknown":
        assert body["error"]["type"] == "missing_node_type" and body["error"]["extra_info"]["class_type"] == "FooNode"
    else:
        assert body["error"]["type"] == "prompt_outputs_failed_validation"
        assert body["node_errors"][node]["dependent_outputs"] == ["9"] or change == "two_chains"


def test_malformed_prompts_are_400(make_client):
    client, _ = make_client(start_worker=False)
    assert client.post("/prompt", json={"client_id": "x"}).json()["error"]["type"] == "no_prompt"
    assert client.post("/prompt", json={"prompt": {}}).json()["error"]["type"] == "prompt_no_outputs"
    no_class = client.post("/prompt", json={"prompt": {"1": {"inputs": {}}}})
    assert no_class.status_code == 400 and no_class.json()["error"]["type"] == "missing_node_type"
    graph = tiny_workflow()
    graph["3"]["inputs"]["positive"] = ["99", 0]
    missing = client.post("/prompt", json={"prompt": graph}).json()
    assert missing["node_errors"]["3"]["errors"][0]["type"] == "bad_linked_input"
    graph = tiny_workflow()
    graph["3"]["inputs"]["positive"] = ["5", 0]  # a LATENT where CONDITIONING goes
    assert client.post("/prompt", json={"prompt": graph}).json()["node_errors"]["3"]["errors"][0]["type"] == (
        "return_type_mismatch"
    )
    front = client.post("/prompt", json={"prompt": tiny_workflow(), "front": True})
    assert front.status_code == 400 and front.json()["error"]["field"] == "front"


# ----------------------------------------------------------------------------------------------- owners and files


def test_another_users_prompt_is_404_and_uploads_are_per_user(make_client, home):
    from starlette.testclient import WebSocketDenialResponse

    from spellbook.store.accounts import Accounts
    from spellbook.store.db import Database

    accounts = Accounts(Database(Settings.from_env().db_path))
    for name in ("alice", "bob"):
        accounts.add_user(name)
        accounts.grant(name, 50)
    alice = {"authorization": f"Bearer {accounts.create_token('alice')}"}
    bob = {"authorization": f"Bearer {accounts.create_token('bob')}"}
    client, _ = make_client(auth="on")
    assert client.get("/object_info").status_code == 401
    with pytest.raises(WebSocketDenialResponse) as denied:
        client.websocket_connect("ws://127.0.0.1/ws?clientId=a").__enter__()
    assert denied.value.status_code == 401
    queued = client.post("/prompt", json={"prompt": tiny_workflow(), "client_id": "a"}, headers=alice)
    prompt_id = queued.json()["prompt_id"]
    history = wait_history(client, prompt_id, headers=alice)
    image = history["outputs"]["9"]["images"][0]
    assert client.get("/view", params=image, headers=alice).status_code == 200
    # Bob: as if it did not exist.
    assert client.get(f"/history/{prompt_id}", headers=bob).status_code == 404
    assert client.get("/view", params=image, headers=bob).status_code == 404
    assert client.get("/history", headers=bob).json() == {}
    assert client.post("/interrupt", json={"prompt_id": prompt_id}, headers=bob).status_code == 404
    with client.websocket_connect("ws://127.0.0.1/ws?clientId=a", headers=bob) as ws:
        assert ws.receive_json()["data"]["status"]["exec_info"]["queue_remaining"] == 0
    # Uploads: each user's own.
    picture = png_bytes(Image.new("RGB", (16, 16), "white"))
    client.post("/upload/image", files={"image": ("mine.png", picture, "image/png")}, headers=alice)
    assert client.get("/view", params={"filename": "mine.png", "type": "input"}, headers=bob).status_code == 404
    refused = client.post("/prompt", json={"prompt": graph_img2img("mine.png")}, headers=bob)
    assert refused.status_code == 400
    assert refused.json()["node_errors"]["2"]["errors"][0]["type"] == "custom_validation_failed"


@pytest.mark.parametrize(
    "params, status",
    [
        ({"filename": "../../spellbook.db", "type": "output", "subfolder": "PROMPT"}, 404),
        ({"filename": "../../spellbook.db", "type": "input"}, 404),  # looked up in the listing, never opened
        ({"filename": "x.png", "type": "input", "subfolder": "../.."}, 404),
        ({"filename": "/etc/passwd", "type": "input"}, 404),
        ({"filename": "spellbook.db", "type": "input", "subfolder": ".."}, 404),
        ({"filename": "PROMPT-0.png", "type": "output", "subfolder": "../images"}, 404),
        ({"filename": "x.png", "type": "models"}, 400),
    ],
)
def test_view_serves_only_what_it_made_or_was_given(make_client, params, status):
    client, _ = make_client()
    prompt_id = client.post("/prompt", json={"prompt": tiny_workflow()}).json()["prompt_id"]
    wait_history(client, prompt_id)
    params = {key: value.replace("PROMPT", prompt_id) for key, value in params.items()}
    response = client.get("/view", params=params)
    assert response.status_code == status, response.text
    assert "error" in response.json()


def test_uploads_are_decoded_under_the_pixel_cap(make_client):
    client, _ = make_client(start_worker=False, max_pixels=32 * 32)
    big = png_bytes(Image.new("RGB", (64, 64)))
    assert client.post("/upload/image", files={"image": ("big.png", big, "image/png")}).status_code == 413
    not_image = client.post("/upload/image", files={"image": ("x.png", b"not an image", "image/png")})
    assert not_image.status_code == 400 and not_image.json()["error"]["field"] == "image"
    bad_name = client.post(
        "/upload/image", files={"image": ("..png", png_bytes(Image.new("RGB", (8, 8))), "image/png")}
    )
    assert bad_name.status_code == 400
    assert client.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"][0] == []


# ----------------------------------------------------------------------------------------------- the rest


def test_object_info_and_the_small_endpoints(make_client):
    client, _ = make_client(start_worker=False)
    info = client.get("/object_info").json()
    from spellbook.server.comfy import LISTED_ONLY, NODES, NOT_YET

    assert set(info) == set(NODES) | set(LISTED_ONLY) and set(info) & set(NOT_YET) == {"UNETLoader"}
    ksampler = info["KSampler"]
    assert ksampler["input"]["required"]["seed"][0] == "INT" and ksampler["output"] == ["LATENT"]
    assert "euler" in ksampler["input"]["required"]["sampler_name"][0]
    assert "dpmpp_3m_sde" not in ksampler["input"]["required"]["sampler_name"][0]
    assert {"normal", "karras"} <= set(ksampler["input"]["required"]["scheduler"][0])
    assert info["SaveImage"]["output_node"] is True and info["SaveImage"]["input_order"]["required"] == [
        "images",
        "filename_prefix",
    ]
    assert client.get("/api/object_info/KSampler").json() == {"KSampler": ksampler}
    assert client.get("/object_info/LoraLoader").json() == {}
    assert "tiny" in client.get("/models/checkpoints").json()
    assert client.get("/models").json() == ["checkpoints", "embeddings"]
    assert client.get("/models/loras").status_code == 404
    assert client.get("/embeddings").json() == []
    assert client.get("/queue").json() == {"queue_running": [], "queue_pending": []}
    assert client.get("/system_stats").json()["devices"][0]["type"] == "cpu"
    # Without a worker the prompt stays queued: /queue shows it, POST /queue deletes it (refunded), /history waits.
    prompt_id = client.post("/prompt", json={"prompt": tiny_workflow()}).json()["prompt_id"]
    pending = client.get("/queue").json()["queue_pending"]
    assert [item[1] for item in pending] == [prompt_id] and client.get(f"/history/{prompt_id}").json() == {}
    assert client.get("/prompt").json() == {"exec_info": {"queue_remaining": 1}}
    assert client.post("/queue", json={"delete": [prompt_id]}).status_code == 200
    history = client.get(f"/history/{prompt_id}").json()[prompt_id]
    assert history["status"]["status_str"] == "error" and history["status"]["messages"][-1][0] == (
        "execution_interrupted"
    )
    assert client.get("/history/nope").status_code == 404


def hires_graph(**second) -> dict:
    """A hires-fix workflow as ComfyUI's examples build it: KSampler, LatentUpscaleBy, a second KSampler."""
    graph = tiny_workflow()
    graph["10"] = {"class_type": "LatentUpscaleBy",
                   "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact", "scale_by": 2.0}}  # fmt: skip
    graph["11"] = copy.deepcopy(graph["3"])
    graph["11"]["inputs"].update(latent_image=["10", 0], steps=2, denoise=0.5, **second)
    graph["8"]["inputs"]["samples"] = ["11", 0]
    return graph


def test_a_hires_fix_graph_is_one_job_with_a_second_pass(make_client):
    client, _ = make_client()
    graph = hires_graph()
    graph["12"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle, detailed", "clip": ["4", 1]}}
    graph["11"]["inputs"]["positive"] = ["12", 0]
    response = client.post("/prompt", json={"prompt": graph, "client_id": "c"})
    assert response.status_code == 200, response.text
    prompt_id = response.json()["prompt_id"]
    entry = wait_history(client, prompt_id)
    [image] = entry["outputs"]["9"]["images"]
    picture = Image.open(io.BytesIO(client.get("/view", params=image).content))
    assert picture.size == (32, 32)
    recipe = client.get(f"/api/v1/jobs/{prompt_id}").json()["recipe"]
    assert recipe["width"] == 16 and recipe["hires"] == {
        "width": 32, "height": 32, "upscaler": "Latent (nearest-exact)", "steps": 2, "denoise": 0.5,
        "prompt": "a red circle, detailed",
    }  # fmt: skip
    sized = hires_graph()
    sized["10"] = {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0], "upscale_method": "bilinear",
                   "width": 0, "height": 80, "crop": "disabled"}}  # fmt: skip
    response = client.post("/prompt", json={"prompt": sized})
    assert response.status_code == 200, response.text
    recipe = client.get(f"/api/v1/jobs/{response.json()['prompt_id']}").json()["recipe"]
    assert (recipe["hires"]["width"], recipe["hires"]["height"], recipe["hires"]["upscaler"]) == (80, 80, "Latent")


def test_a_hires_fix_on_pixels_is_read_as_a_lanczos_hires_job(make_client):
    client, _ = make_client()
    graph = hires_graph()
    graph["20"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    graph["10"] = {"class_type": "ImageScaleBy",
                   "inputs": {"image": ["20", 0], "upscale_method": "lanczos", "scale_by": 1.5}}  # fmt: skip
    graph["22"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["11"]["inputs"]["latent_image"] = ["22", 0]
    response = client.post("/prompt", json={"prompt": graph})
    assert response.status_code == 200, response.text
    entry = wait_history(client, response.json()["prompt_id"])
    [image] = entry["outputs"]["9"]["images"]
    assert Image.open(io.BytesIO(client.get("/view", params=image).content)).size == (24, 24)
    recipe = client.get(f"/api/v1/jobs/{response.json()['prompt_id']}").json()["recipe"]
    assert (recipe["hires"]["upscaler"], recipe["hires"]["width"]) == ("Lanczos", 24)
    graph["10"]["inputs"]["upscale_method"] = "area"
    refused = client.post("/prompt", json={"prompt": graph})
    assert refused.status_code == 400 and "pixel upscalers" in json.dumps(refused.json()["node_errors"]["10"])
    plain = tiny_workflow()  # scaling the output picture itself is not a hires fix: refused at the output
    plain["10"] = {"class_type": "ImageScaleBy",
                   "inputs": {"image": ["8", 0], "upscale_method": "lanczos", "scale_by": 2.0}}  # fmt: skip
    plain["9"]["inputs"]["images"] = ["10", 0]
    refused = client.post("/prompt", json={"prompt": plain})
    assert refused.status_code == 400 and "9" in refused.json()["node_errors"]


@pytest.mark.parametrize(
    "change, node, name",
    [
        ({"11": {"seed": 8}}, "11", "seed"),
        ({"11": {"sampler_name": "euler_ancestral"}}, "11", "sampler_name"),
        ({"10": {"upscale_method": "bislerp"}}, "10", "upscale_method"),
        ({"10": {"scale_by": 0.5}}, "10", "scale_by"),
    ],
)
def test_a_hires_graph_refuses_what_the_hires_fix_cannot_vary(make_client, change, node, name):
    client, _ = make_client(start_worker=False)
    graph = hires_graph()
    for node_id, inputs in change.items():
        graph[node_id]["inputs"].update(inputs)
    response = client.post("/prompt", json={"prompt": graph})
    assert response.status_code == 400, response.text
    assert node in response.json()["node_errors"], response.text
    errors = response.json()["node_errors"][node]["errors"]
    assert errors[0]["extra_info"]["input_name"] == name, errors


def test_embedding_syntax_names_a_concept(make_client):
    client, _ = make_client(start_worker=False)
    graph = tiny_workflow(**{"6": {"text": "a photo of embedding:nothere.pt"}})
    refused = client.post("/prompt", json={"prompt": graph})
    assert refused.status_code == 400
    assert "nothere" in refused.json()["node_errors"]["6"]["errors"][0]["details"]


def test_docs_list_every_node_and_route():
    from spellbook.server.comfy import LISTED_ONLY, NODES, NOT_YET, _routes

    text = (Path(__file__).parent.parent / "docs" / "server.md").read_text()
    for name in [*NODES, *NOT_YET, *LISTED_ONLY]:
        assert f"`{name}`" in text, name
    for route in _routes.routes:
        assert f"{route.path}`" in text, route.path
