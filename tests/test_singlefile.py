"""Single-file SD 1.x/2.x checkpoints load offline and exactly; pickles are refused or scanned, never run."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sd_original_layout import to_original_checkpoint
from spellbook.errors import Refused, UserError
from spellbook.models.files import bundled_tokenizer_dir, load_clip_tokenizer
from spellbook.models.safety import load_pickled_state_dict, scan_pickle
from spellbook.models.singlefile import bundled_config_dir, detect_family, load_single_file

# ---------------------------------------------------------------- tiny models and their files


def tiny_models(family: str, seed: int = 0, in_channels: int = 4) -> dict:
    """Random tiny components shaped like SD 1.x (conv projections) or SD 2.x (linear projections, gelu)."""
    v2 = family == "sd-v2"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        # SD-like order for v1; the mirror image for v2, so both up-sampler slots of the layout are exercised.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D") if v2 else ("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D") if v2 else ("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if v2 else 8,
        use_linear_projection=v2,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=49408,
            hidden_act="gelu" if v2 else "quick_gelu",
        )
    )
    with torch.no_grad():  # fresh norms are all ones and biases zeros; make every tensor distinct
        for model in (unet, vae, text_encoder):
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.01)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def save_config_folder(models: dict, folder: Path, *, pad_token: str) -> Path:
    models["unet"].save_config(folder / "unet")
    models["vae"].save_config(folder / "vae")
    models["text_encoder"].config.save_pretrained(folder / "text_encoder")
    load_clip_tokenizer(bundled_tokenizer_dir(), pad_token=pad_token).save_pretrained(folder / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False).save_config(
        folder / "scheduler"
    )
    return folder


@pytest.fixture(scope="module", params=["sd-v1", "sd-v2"])
def tiny(request, tmp_path_factory) -> dict:
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    models = tiny_models(family)
    checkpoint = to_original_checkpoint(models["unet"], models["vae"], models["text_encoder"], family=family)
    save_file(checkpoint, folder / "model.safetensors")
    config_dir = save_config_folder(models, folder / "config", pad_token="!" if family == "sd-v2" else "<|endoftext|>")
    return {"family": family, "models": models, "checkpoint": checkpoint, "dir": folder, "config_dir": config_dir}


@pytest.fixture(scope="module")
def tiny_v1(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("v1-pickles")
    models = tiny_models("sd-v1", seed=1)
    checkpoint = to_original_checkpoint(models["unet"], models["vae"], models["text_encoder"])
    config_dir = save_config_folder(models, folder / "config", pad_token="<|endoftext|>")
    return {"models": models, "checkpoint": checkpoint, "dir": folder, "config_dir": config_dir}


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE set, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(self, address):
        raise AssertionError(f"tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module, transform=lambda tensor: tensor) -> None:
    expected, actual = original.state_dict(), loaded.state_dict()
    assert actual.keys() == expected.keys()
    different = [key for key in expected if not torch.equal(actual[key], transform(expected[key]))]
    assert different == []
    assert all(tensor.dtype == torch.float32 for tensor in loaded.parameters())
    assert not loaded.training


# ---------------------------------------------------------------- safetensors: offline and exact


def test_single_file_loads_offline_and_exactly(tiny, offline):
    loaded = load_single_file(tiny["dir"] / "model.safetensors", config_dir=tiny["config_dir"])

    assert loaded["family"] == tiny["family"]
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(loaded[name], tiny["models"][name])
    assert isinstance(loaded["tokenizer"], CLIPTokenizer)
    assert loaded["tokenizer"].pad_token_id == (0 if tiny["family"] == "sd-v2" else 49407)
    assert isinstance(loaded["scheduler"], DDIMScheduler)
    assert loaded["scheduler"].config.prediction_type == "epsilon"


def test_prediction_type_overrides_the_scheduler(tiny, offline):
    loaded = load_single_file(
        tiny["dir"] / "model.safetensors", config_dir=tiny["config_dir"], prediction_type="v_prediction"
    )
    assert loaded["scheduler"].config.prediction_type == "v_prediction"
    with pytest.raises(UserError, match="'v-pred' is not one of epsilon, v_prediction, sample"):
        load_single_file(tiny["dir"] / "model.safetensors", config_dir=tiny["config_dir"], prediction_type="v-pred")


def test_half_precision_file_loads_as_float32(tiny_v1, offline):
    half = {key: value.half() if value.is_floating_point() else value for key, value in tiny_v1["checkpoint"].items()}
    path = tiny_v1["dir"] / "half.safetensors"
    save_file(half, path)

    loaded = load_single_file(path, config_dir=tiny_v1["config_dir"])

    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(loaded[name], tiny_v1["models"][name], transform=lambda tensor: tensor.half().float())


def test_inpainting_unet_gets_its_nine_input_channels(tmp_path, offline):
    models = tiny_models("sd-v1", in_channels=9)
    config_dir = save_config_folder(tiny_models("sd-v1"), tmp_path / "config", pad_token="<|endoftext|>")  # 4 in
    save_file(to_original_checkpoint(**models), tmp_path / "inpainting.safetensors")

    loaded = load_single_file(tmp_path / "inpainting.safetensors", config_dir=config_dir)

    assert loaded["unet"].config.in_channels == 9
    assert_same_weights(loaded["unet"], models["unet"])


def test_text_encoder_keys_without_text_model_prefix_load(tiny_v1, tmp_path, offline):
    """Some older SD 1.x files say `cond_stage_model.transformer.encoder.*` (no `text_model.`)."""
    old_style = {
        key.replace(".transformer.text_model.", ".transformer."): value for key, value in tiny_v1["checkpoint"].items()
    }
    save_file(old_style, tmp_path / "old.safetensors")

    loaded = load_single_file(tmp_path / "old.safetensors", config_dir=tiny_v1["config_dir"])

    assert loaded["family"] == "sd-v1"
    assert_same_weights(loaded["text_encoder"], tiny_v1["models"]["text_encoder"])


def test_weights_that_do_not_fit_the_config_are_a_user_error(tiny_v1, tmp_path):
    path = tmp_path / "v1.safetensors"
    save_file(tiny_v1["checkpoint"], path)
    other = save_config_folder(tiny_models("sd-v2"), tmp_path / "v2-config", pad_token="!")
    with pytest.raises(UserError, match="the unet weights in v1.safetensors do not fit the config"):
        load_single_file(path, config_dir=other)


@pytest.mark.parametrize(
    ("missing", "part"),
    [
        ("model.diffusion_model.input_blocks.1.1.proj_in.weight", "unet"),
        ("first_stage_model.decoder.mid.attn_1.q.weight", "vae"),
        ("cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight", "text_encoder"),
    ],
)
def test_a_missing_tensor_is_named_not_left_random(tiny_v1, tmp_path, missing, part):
    checkpoint = {key: value for key, value in tiny_v1["checkpoint"].items() if key != missing}
    save_file(checkpoint, tmp_path / "partial.safetensors")
    with pytest.raises(UserError, match=f"partial.safetensors lacks .*{part}"):
        load_single_file(tmp_path / "partial.safetensors", config_dir=tiny_v1["config_dir"])


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="unknown checkpoint format .gguf"):
        load_single_file(tmp_path / "model.gguf")
    with pytest.raises(UserError, match="no checkpoint file"):
        load_single_file(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------- family detection


def test_detect_family(tiny):
    assert detect_family(tiny["checkpoint"].keys()) == tiny["family"]


def test_sdxl_is_named_as_unsupported(tmp_path):
    keys = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "first_stage_model.encoder.conv_in.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
    ]
    with pytest.raises(UserError, match="SDXL is not supported yet"):
        detect_family(keys)
    save_file({key: torch.zeros(1) for key in keys}, tmp_path / "sdxl.safetensors")
    with pytest.raises(UserError, match="not a Stable Diffusion 1.x/2.x checkpoint.*SDXL is not supported yet"):
        load_single_file(tmp_path / "sdxl.safetensors")


def test_other_files_are_not_stable_diffusion():
    diffusers_unet_keys = ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"]
    with pytest.raises(UserError, match="not a Stable Diffusion 1.x/2.x checkpoint: no UNet"):
        detect_family(diffusers_unet_keys)
    no_text_encoder = ["model.diffusion_model.out.2.weight", "first_stage_model.quant_conv.weight"]
    with pytest.raises(UserError, match="no text encoder"):
        detect_family(no_text_encoder)


# ---------------------------------------------------------------- the bundled full-size configs


KNOWN_SHAPES = {  # as they appear in the published runwayml SD 1.5 and stabilityai SD 2.1 files
    "sd-v1": {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    },
    "sd-v2": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
    },
}


@pytest.mark.parametrize("family", ["sd-v1", "sd-v2"])
def test_bundled_configs_describe_the_published_checkpoints(family):
    """Full-size models built from the shipped configs (on the meta device: no memory, no weights) have
    the key names and shapes of the real files, and diffusers' converter maps those back one to one."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    folder = bundled_config_dir(family)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    with torch.device("meta"):
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    checkpoint = to_original_checkpoint(unet, vae, text_encoder, family=family, extras=False)

    assert {key: tuple(checkpoint[key].shape) for key in KNOWN_SHAPES[family]} == KNOWN_SHAPES[family]
    assert detect_family(checkpoint.keys()) == family
    for model, convert in ((unet, convert_ldm_unet_checkpoint), (vae, convert_ldm_vae_checkpoint)):
        back = convert(checkpoint, dict(model.config))
        assert {key: value.shape for key, value in back.items()} == {
            key: value.shape for key, value in model.state_dict().items()
        }
    tokenizer = load_clip_tokenizer(folder / "tokenizer")
    assert tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    assert tokenizer.pad_token_id == {"sd-v1": 49407, "sd-v2": 0}[family]
    scheduler_config = DDIMScheduler.load_config(folder / "scheduler")
    assert scheduler_config["prediction_type"] == {"sd-v1": "epsilon", "sd-v2": "v_prediction"}[family]


# ---------------------------------------------------------------- pickles


class WritesAFile:
    """Unpickling this calls open(marker, "w"): the file appearing means the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class TouchesAFile:
    """Unpickling this calls Path(marker).touch(), via builtins.getattr on a pathlib object."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (self.marker.touch, ())


def save_pickle(payload: dict, path: Path, kind: str) -> None:
    if kind == "zip":  # torch's format since 1.6: GLOBAL opcodes
        torch.save(payload, path)
    elif kind == "zip-protocol-4":  # STACK_GLOBAL with memoized strings
        torch.save(payload, path, pickle_protocol=4)
    elif kind == "legacy":  # torch's pre-1.6 format: five pickles, then raw storage bytes
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    elif kind == "raw":  # a bare pickle named .ckpt
        path.write_bytes(pickle.dumps(payload, protocol=4))


def test_pickles_are_known_by_name(tmp_path):
    from spellbook.models.registry import entry_format

    for name in ("model.ckpt", "model.pt", "model.pth", "model.bin", "model.CKPT", "model.safetensors"):
        (tmp_path / name).write_bytes(b"not loaded: the name decides")
    assert [entry_format(tmp_path / f"model{s}") for s in (".ckpt", ".pt", ".pth", ".bin", ".CKPT")] == ["pickle"] * 5
    assert entry_format(tmp_path / "model.safetensors") == "single-file"


def test_payloads_really_run_when_unpickled(tmp_path):
    """Guard for the tests below: these payloads do act when unpickled, so their marker staying absent means
    the file was never unpickled."""
    for payload in (WritesAFile(tmp_path / "a"), TouchesAFile(tmp_path / "b")):
        pickle.loads(pickle.dumps(payload))
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists()


def test_pickle_is_refused_by_default_and_never_opened(tiny_v1, tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tiny_v1["checkpoint"], "global_step": 1}, path)
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load was called"))

    with pytest.raises(Refused) as refused:
        load_single_file(path, config_dir=tiny_v1["config_dir"])

    assert "model.ckpt is a pickle file (.ckpt)" in str(refused.value)
    assert "--allow-pickle" in str(refused.value)


@pytest.mark.parametrize("kind", ["zip", "zip-protocol-4", "legacy", "raw"])
@pytest.mark.parametrize(
    ("payload_class", "named"),
    [(WritesAFile, "io.open"), (TouchesAFile, "builtins.getattr")],
)
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, kind, payload_class, named):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    save_pickle({"state_dict": {"weight": torch.ones(2)}, "extra": payload_class(marker)}, path, kind)
    # Only the scan may stand between the payload and the user: torch's own weights_only gate is removed.
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load was called"))

    with pytest.raises(Refused, match="--allow-pickle"):
        load_single_file(path)
    with pytest.raises(Refused, match=f"model.ckpt imports .*{named}"):
        load_single_file(path, allow_pickle=True)
    with pytest.raises(Refused, match=named):
        load_pickled_state_dict(path, allow_pickle=True)

    assert named in scan_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["zip", "zip-protocol-4", "legacy"])
def test_clean_torch_checkpoints_scan_clean(tmp_path, kind):
    path = tmp_path / "clean.ckpt"
    tensors = {"a": torch.ones(2), "b": torch.nn.Parameter(torch.zeros(3)), "c": torch.arange(4).half()}
    save_pickle({"state_dict": tensors, "global_step": 7, "note": b"bytes"}, path, kind)
    assert scan_pickle(path) == []


def test_clean_pickle_loads_when_allowed(tiny_v1, offline):
    path = tiny_v1["dir"] / "model.ckpt"
    torch.save({"state_dict": tiny_v1["checkpoint"], "global_step": 1}, path)

    loaded = load_single_file(path, allow_pickle=True, config_dir=tiny_v1["config_dir"])

    assert loaded["family"] == "sd-v1"
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(loaded[name], tiny_v1["models"][name])


def test_legacy_format_pickle_loads_when_allowed(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "step": 3}, path, _use_new_zipfile_serialization=False)
    loaded = load_pickled_state_dict(path, allow_pickle=True)
    assert list(loaded) == ["w"] and torch.equal(loaded["w"], torch.arange(6.0).reshape(2, 3))


def test_zip_with_two_data_pickles_is_refused(tmp_path):
    """Zip readers disagree on which of two same-named entries wins; a scan of one proves nothing."""
    import zipfile

    clean, evil = tmp_path / "clean.ckpt", tmp_path / "evil.ckpt"
    torch.save({"w": torch.ones(1)}, clean)
    torch.save({"w": WritesAFile(tmp_path / "pwned")}, evil)
    path = tmp_path / "both.ckpt"
    with zipfile.ZipFile(clean) as first, zipfile.ZipFile(evil) as second, zipfile.ZipFile(path, "w") as out:
        data_name = next(name for name in first.namelist() if name.endswith("data.pkl"))
        out.writestr(data_name, second.read(next(n for n in second.namelist() if n.endswith("data.pkl"))))
        for name in first.namelist():
            out.writestr(name, first.read(name))
    with pytest.raises(Refused, match="duplicate entries"):
        scan_pickle(path)
    assert not (tmp_path / "pwned").exists()


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(Refused, match="TorchScript"):
        load_pickled_state_dict(path, allow_pickle=True)


def test_unreadable_pickle_is_a_user_error(tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"\xff\xfenot a pickle")
    with pytest.raises(UserError, match="not a readable pickle"):
        load_pickled_state_dict(path, allow_pickle=True)
