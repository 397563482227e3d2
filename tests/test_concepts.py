"""Concepts (textual inversion): file formats, the library, prompts, provenance, training; tiny random models.

The semantic test (a concept learned on the shapes model, judged by pixels) is in test_concepts_shapes.py.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import run_cli
from spellbook.concepts.formats import A1111, DIFFUSERS, Concept, read_concept, write_concept
from spellbook.concepts.library import ConceptLibrary
from spellbook.concepts.train import CHECKPOINT, TrainRequest, train_concept, training_dir
from spellbook.engine.prompts import ConceptTokens, concepts_in, encode_prompt_pair, tokenize
from spellbook.errors import Conflict, NotFound, Refused, UserError
from spellbook.infotext import parse_infotext, read_foreign_recipe, read_png_text
from spellbook.provenance import read_metadata

WIDTH = 32  # the tiny text encoder's width


def vectors(n: int = 1, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def one_thread():
    """Training these small models is many small ops, which a second thread barely speeds up; and when another
    process keeps the cores busy, two threads wait on each other: measured 5.8 s per training step of the shapes
    model with two threads against 0.33 s with one, on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def library(studio) -> ConceptLibrary:
    return studio.concepts


@pytest.fixture
def pictures(tmp_path):
    """Three 16x16 pictures (the tiny model's native size) of a bright square on a dark ground."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(3):
        pixels = np.full((16, 16, 3), 20, dtype=np.uint8)
        pixels[3 + i : 11 + i, 4:12] = (220, 40 + 60 * i, 40)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


# --- file formats --------------------------------------------------------------------------------------------


def test_diffusers_and_a1111_layouts_round_trip(tmp_path):
    concept = Concept("charlie", vectors(2), metadata={"model": "tiny"})
    ours = write_concept(concept, tmp_path / "charlie.safetensors")
    from safetensors.torch import load_file

    assert list(load_file(ours)) == ["<charlie>"]  # diffusers: {token: (n, width)}
    back = read_concept(ours)
    assert back.name == "charlie" and back.token == "<charlie>" and back.layout == DIFFUSERS
    assert torch.equal(back.vectors, concept.vectors) and back.trained_for == "tiny"

    a1111 = write_concept(back, tmp_path / "exported.safetensors", A1111)
    assert list(load_file(a1111)) == ["emb_params"]
    again = read_concept(a1111, "charlie")
    assert again.layout == A1111 and torch.equal(again.vectors, concept.vectors)
    # ... and back to diffusers: the token is the name in brackets again.
    assert list(load_file(write_concept(again, tmp_path / "d.safetensors"))) == ["<charlie>"]


def test_a1111_string_to_param_layouts(tmp_path):
    from safetensors.torch import save_file

    v = vectors(3)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": v},
            "name": "charlie",
            "step": 1500,
            "sd_checkpoint": "cc6cb27103",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
        },
        tmp_path / "charlie.pt",
    )
    concept = read_concept(tmp_path / "charlie.pt", allow_pickle=True)
    assert concept.layout == "a1111-pt" and torch.equal(concept.vectors, v)
    assert concept.trained_for == "v1-5-pruned-emaonly" and concept.metadata["step"] == "1500"
    # Flattened into safetensors by converters.
    save_file({"string_to_param.*": v}, tmp_path / "flat.safetensors")
    assert torch.equal(read_concept(tmp_path / "flat.safetensors").vectors, v)
    # A diffusers learned_embeds.bin, and a bare tensor named by its file.
    torch.save({"<charlie>": v[0]}, tmp_path / "learned_embeds.bin")
    assert read_concept(tmp_path / "learned_embeds.bin", allow_pickle=True).vectors.shape == (1, WIDTH)
    torch.save(v, tmp_path / "bare.pt")
    assert read_concept(tmp_path / "bare.pt", allow_pickle=True).name == "bare"


def test_pickled_concepts_are_refused_unless_allowed_and_scanned(tmp_path, library):
    torch.save({"<x>": vectors()}, tmp_path / "x.pt")
    with pytest.raises(Refused, match="--allow-pickle"):
        read_concept(tmp_path / "x.pt")
    with pytest.raises(Refused, match="--allow-pickle"):
        library.import_file(tmp_path / "x.pt")

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"string_to_param": {"*": Payload()}}, tmp_path / "evil.pt")
    with pytest.raises(Refused, match=r"imports \S*open when unpickled"):
        read_concept(tmp_path / "evil.pt", allow_pickle=True)
    assert not marker.exists()


def test_files_that_are_not_concepts_say_what_a_concept_file_holds(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": vectors(), "b": vectors()}, tmp_path / "two.safetensors")
    with pytest.raises(UserError, match="holds 2 tensors"):
        read_concept(tmp_path / "two.safetensors")
    save_file({"clip_l": vectors(1, 768), "clip_g": vectors(1, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(UserError, match="SDXL"):
        read_concept(tmp_path / "xl.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        read_concept(tmp_path / "junk.safetensors")


def test_a_one_vector_sd1_concept_is_at_most_4_kb(library):
    metadata = {
        "model": "v1-5-pruned-emaonly",
        "model_sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
    }
    metadata |= {"steps": "3000", "init_word": "otter", "lr": "0.005", "seed": "0", "images": "12"}
    path = library.add(Concept("charlie", vectors(1, 768), metadata=metadata))
    assert path.stat().st_size <= 4096


def test_files_we_write_load_unchanged_in_diffusers_and_encode_the_same(library, tiny_model_dir, tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    library.add(Concept("cross", vectors(1, seed=1)))
    library.add(Concept("dog", vectors(2, seed=2)))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(library.path_of("cross")))  # our library file, as written
    a1111 = library.export("dog", tmp_path / "dog.safetensors", A1111)
    pipe.load_textual_inversion(str(a1111), token="<dog>")  # A1111 files are named by the caller
    prompt = "a <cross> and a <dog> on the grass"
    theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    concepts = {"cross": library.load("cross")[0].vectors, "dog": library.load("dog")[0].vectors}
    ours, _ = encode_prompt_pair(tiny.tokenizer, tiny.text_encoder, prompt, "", concepts=concepts)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # A folder gets learned_embeds.safetensors, which diffusers finds by itself.
    folder = tmp_path / "hub-style"
    folder.mkdir()
    library.export("cross", folder, DIFFUSERS)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    fresh.load_textual_inversion(str(folder))
    assert "<cross>" in fresh.tokenizer.get_vocab()


# --- prompts ---------------------------------------------------------------------------------------------------


def test_names_trigger_with_or_without_brackets_and_only_as_whole_words():
    names = ["cross", "cat", "cat-toy"]
    assert concepts_in("a <cross> on the left", names) == ["cross"]
    assert concepts_in("a Cross, (cross:1.2)", names) == ["cross"]
    assert concepts_in("crossing the road; a crosses", names) == []
    assert concepts_in("a <cat-toy> next to a cat", names) == ["cat-toy", "cat"]


def test_multi_vector_concepts_expand_to_their_tokens_and_stay_in_one_chunk(tiny):
    tokens = ConceptTokens.build({"one": vectors(1), "three": vectors(3)}, 49408)
    ids = tokenize(tiny.tokenizer, "<three> and one", concepts=tokens).ids[0]
    assert ids[1:6] == [49409, 49410, 49411, *tiny.tokenizer("and", add_special_tokens=False).input_ids, 49408]
    # A concept never straddles the 75-token chunk boundary (as in A1111).
    long = "a " * 73 + "<three>"
    chunks = tokenize(tiny.tokenizer, long, concepts=tokens).ids
    assert len(chunks) == 2 and chunks[1][1:4] == [49409, 49410, 49411]


def test_concepts_use_a_view_and_leave_the_shared_text_encoder_and_tokenizer_alone(tiny):
    before = tiny.text_encoder.get_input_embeddings()
    size = len(tiny.tokenizer)
    with_concept, _ = encode_prompt_pair(tiny.tokenizer, tiny.text_encoder, "a <x>", "", concepts={"x": vectors()})
    plain, _ = encode_prompt_pair(tiny.tokenizer, tiny.text_encoder, "a <x>", "")
    assert not torch.equal(with_concept, plain)
    assert tiny.text_encoder.get_input_embeddings() is before and before.num_embeddings == 49408
    assert len(tiny.tokenizer) == size


# --- the studio: prompts, recipes, infotext, verify -----------------------------------------------------------------


def test_with_and_without_brackets_give_the_same_image_and_recipe(studio, library):
    library.add(Concept("cross", vectors(1, seed=3)))
    images, recipes = [], []
    for prompt in ("a <cross> on the left", "a cross on the left"):
        recipe = studio.plan({"prompt": prompt, "model": "tiny", "seed": 5})
        images.append(np.asarray(studio.run(recipe)[0].image))
        recipes.append(recipe)
    assert recipes[0].concepts == recipes[1].concepts
    assert recipes[0].concepts[0].sha256 == hashlib.sha256(library.path_of("cross").read_bytes()).hexdigest()
    np.testing.assert_array_equal(images[0], images[1])
    recipe = studio.plan({"prompt": "a plain square", "model": "tiny", "seed": 5})
    assert recipe.concepts == () and studio.inputs_for_recipe(recipe).concepts == {}


def test_several_concepts_compose_and_negative_prompts_use_them_too(studio, library):
    for i, name in enumerate(("cross", "heart", "blurry")):
        library.add(Concept(name, vectors(1 + i, seed=i)))
    recipe = studio.plan({"prompt": "a <heart> and a cross", "negative_prompt": "blurry", "model": "tiny"})
    assert [c.name for c in recipe.concepts] == ["heart", "cross", "blurry"]
    assert set(studio.inputs_for_recipe(recipe).concepts) == {"heart", "cross", "blurry"}


def test_a_concept_for_another_text_encoder_width_names_both_sizes(studio, library):
    library.add(Concept("charlie", vectors(1, 768)))
    with pytest.raises(UserError) as error:
        studio.plan({"prompt": "a photo of <charlie>", "model": "tiny"})
    message = str(error.value)
    assert "768" in message and "32" in message and "SD 1.x" in message and "'tiny'" in message


def test_recipe_and_infotext_record_ti_hashes(studio, library, tmp_path):
    library.add(Concept("cross", vectors(1, seed=3)))
    recipe = studio.plan({"prompt": "a <cross>", "model": "tiny", "seed": 1})
    saved = studio.save(studio.run(recipe), tmp_path / "out")[0]
    sha = hashlib.sha256(library.path_of("cross").read_bytes()).hexdigest()
    assert read_metadata(saved.path).recipe.concepts == recipe.concepts
    assert [(c.name, c.sha256) for c in recipe.concepts] == [("cross", sha)]
    parameters = read_png_text(saved.path)["parameters"]
    assert parse_infotext(parameters)[2]["TI hashes"] == f"cross: {sha[:12]}"
    assert read_foreign_recipe({"parameters": parameters})["ti_hashes"] == {"cross": sha[:12]}


def test_verify_passes_and_then_fails_clearly_when_the_concept_file_changed(studio, library, tmp_path):
    library.add(Concept("cross", vectors(1, seed=3)))
    recipe = studio.plan({"prompt": "a <cross>", "model": "tiny", "seed": 1})
    saved = studio.save(studio.run(recipe), tmp_path / "out")[0]
    assert studio.verify(saved.path)[0].identical
    # Renamed, the file is found by its hash.
    library.path_of("cross").rename(library.folder / "plus.safetensors")
    assert studio.verify(saved.path)[0].identical
    library.remove("plus")
    with pytest.raises(NotFound, match="cross"):
        studio.verify(saved.path)
    library.add(Concept("cross", vectors(1, seed=4)))  # same name, other vectors
    with pytest.raises(UserError, match="concept 'cross' has changed") as error:
        studio.verify(saved.path)
    assert recipe.concepts[0].short_hash in str(error.value)


def test_recipes_use_only_the_concepts_they_recorded(studio, library, tmp_path):
    recipe = studio.plan({"prompt": "a cross", "model": "tiny", "seed": 1})
    saved = studio.save(studio.run(recipe), tmp_path / "out")[0]
    library.add(Concept("cross", vectors(1, seed=3)))  # added after the image was made
    assert studio.verify(saved.path)[0].identical


# --- the library ---------------------------------------------------------------------------------------------------


def test_library_lists_info_imports_exports_and_removes(library, tmp_path):
    from safetensors.torch import save_file

    save_file({"<otter>": vectors(2)}, tmp_path / "learned_embeds.safetensors")
    info = library.import_file(tmp_path / "learned_embeds.safetensors")
    assert (info.name, info.vectors, info.dims) == ("otter", 2, WIDTH)
    # Copied byte for byte: the hash A1111 and Civitai show stays the same.
    assert info.sha256 == hashlib.sha256((tmp_path / "learned_embeds.safetensors").read_bytes()).hexdigest()
    with pytest.raises(Conflict):
        library.import_file(tmp_path / "learned_embeds.safetensors", "Otter")
    library.add(Concept("charlie", vectors(), metadata={"model": "tiny"}), sample=Image.new("RGB", (4, 4)))
    charlie = library.info("<charlie>")
    assert charlie.trained_for == "tiny" and charlie.sample.is_file() and charlie.size > 0
    torch.save({"<x>": vectors()}, library.folder / "pickled.pt")
    listed = {i.name: i for i in library.list()}
    assert set(listed) == {"otter", "charlie", "pickled"}
    assert listed["pickled"].vectors is None and "--allow-pickle" in listed["pickled"].note
    library.remove("charlie")
    assert not charlie.path.exists() and not charlie.sample.exists()
    with pytest.raises(NotFound, match="otter"):
        library.info("otters")


def test_importing_a_pickle_with_allow_pickle_converts_it(studio, tmp_path):
    torch.save({"string_to_param": {"*": vectors()}, "name": "x"}, tmp_path / "charlie.pt")
    library = ConceptLibrary(studio.settings.with_(allow_pickle=True))
    info = library.import_file(tmp_path / "charlie.pt")
    assert info.path.suffix == ".safetensors" and info.vectors == 1 and "converted_from" in info.metadata


def test_names_must_be_usable_in_prompts(library):
    for bad in ("two words", "../escape", "-dash", ""):
        with pytest.raises(UserError, match="not allowed"):
            library.add(Concept(bad, vectors()))


# --- training ----------------------------------------------------------------------------------------------------


def request(pictures, **changes) -> TrainRequest:
    values = {"name": "blob", "images": pictures, "model": "tiny", "steps": 6, "batch_size": 2, "sample": False}
    return TrainRequest(**{**values, **changes})


def test_training_changes_only_the_new_rows_and_is_deterministic(studio, library, pictures):
    components = studio.components_for("tiny")
    frozen = {
        name: {k: v.clone() for k, v in getattr(components, name).state_dict().items()}
        for name in ("text_encoder", "unet", "vae")
    }
    vocabulary = len(components.tokenizer)
    seen = []
    result = train_concept(studio, request(pictures), progress=lambda step, total, loss: seen.append((step, total)))
    assert seen[-1] == (6, 6) and result.steps == 6 and result.final_loss > 0
    for name, weights in frozen.items():
        for key, value in getattr(components, name).state_dict().items():
            assert torch.equal(value, weights[key]), f"{name}.{key} changed"
    assert len(components.tokenizer) == vocabulary
    first = library.path_of("blob").read_bytes()
    concept = library.load("blob")[0]
    assert concept.n_vectors == 1 and concept.trained_for == "tiny" and concept.metadata["steps"] == "6"
    assert not training_dir(library, "blob").exists()  # the checkpoint goes once the concept is saved
    train_concept(studio, request(pictures, overwrite=True))
    assert library.path_of("blob").read_bytes() == first
    train_concept(studio, request(pictures, overwrite=True, seed=1))
    assert library.path_of("blob").read_bytes() != first


def test_resume_after_a_stop_or_ctrl_c_equals_an_uninterrupted_run(studio, library, pictures):
    train_concept(studio, request(pictures, vectors=2))
    uninterrupted = library.load("blob")[0].vectors
    library.remove("blob")

    assert train_concept(studio, request(pictures, vectors=2), stop_after=2) is None
    assert (training_dir(library, "blob") / CHECKPOINT).is_file()
    with pytest.raises(UserError, match="--resume"):
        train_concept(studio, request(pictures, vectors=2))

    def ctrl_c_at_step_4(step, total, loss):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_concept(studio, request(pictures, resume=True), progress=ctrl_c_at_step_4)
    from safetensors import safe_open

    with safe_open(str(training_dir(library, "blob") / CHECKPOINT), framework="pt") as handle:
        assert json.loads(handle.metadata()["state"])["step"] == 4
    # --resume goes on with the interrupted run's own settings (vectors=2 here, not the request's 1).
    result = train_concept(studio, request(pictures, resume=True, steps=99))
    assert result.steps == 6
    assert torch.equal(library.load("blob")[0].vectors, uninterrupted)


def test_training_refuses_early_what_would_fail_late(studio, library, pictures, tmp_path):
    library.add(Concept("blob", vectors()))
    with pytest.raises(Conflict, match="blob"):
        train_concept(studio, request(pictures))
    with pytest.raises(UserError, match="nothing|no interrupted"):
        train_concept(studio, request(pictures, name="other", resume=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no pictures"):
        train_concept(studio, request(tmp_path / "empty", name="other"))
    (pictures / "0.txt").write_text("a photo of something\n")
    with pytest.raises(UserError, match="does not name the concept"):
        train_concept(studio, request(pictures, name="other"))


def test_caption_files_name_the_concept(studio, library, pictures):
    from spellbook.concepts.train import load_images

    (pictures / "0.txt").write_text("a red <blob>, dark background\na {} in the middle\n")
    images = load_images(pictures, 16, "blob")
    assert images[0].captions == ("a red {}, dark background", "a {} in the middle") and images[1].captions == ()


# --- CLI ---------------------------------------------------------------------------------------------------------


def test_cli_train_list_info_export_import_rm(studio, pictures, tmp_path, capsys, monkeypatch):
    def cli(*args):
        return run_cli(args, capsys, monkeypatch)

    code, out, err = cli("concept", "train", "blob", "--images", pictures, "--model", "tiny", "--steps", "3",
                         "--batch-size", "2", "--init-word", "square")  # fmt: skip
    assert code == 0, err
    assert "trained <blob>" in out and "sample:" in out
    code, out, err = cli("concept", "list", "--json")
    [entry] = json.loads(out)
    assert (entry["name"], entry["vectors"], entry["dims"], entry["trained_for"]) == ("blob", 1, WIDTH, "tiny")
    assert entry["sample"].endswith("blob.png") and len(entry["hash"]) == 12 and entry["size"] > 0
    code, out, err = cli("concept", "info", "<blob>")
    assert code == 0 and "trained_for: tiny" in out
    code, out, err = cli("concept", "export", "blob", tmp_path / "blob.safetensors", "--format", "a1111")
    assert code == 0, err
    code, out, err = cli("concept", "import", tmp_path / "blob.safetensors", "--name", "blob2")
    assert code == 0 and "imported <blob2>" in out
    code, out, err = cli("concept", "rm", "blob")
    assert code == 0
    code, out, err = cli("concept", "info", "blob")
    assert code == 2 and "unknown concept 'blob'" in err and len(err.strip().splitlines()) == 1
    torch.save({"<x>": vectors()}, tmp_path / "x.pt")
    code, out, err = cli("concept", "import", tmp_path / "x.pt")
    assert code == 2 and "--allow-pickle" in err
    monkeypatch.setenv("SPELLBOOK_ALLOW_PICKLE", "0")  # the flag sets it for the process; restored after the test
    code, out, err = cli("--allow-pickle", "concept", "import", tmp_path / "x.pt")
    assert code == 0, err


# --- semantic: a concept learned on the shapes model, judged by pixels ----------------------------------------------
#
# Measured (docs/concepts.md): with 8 pictures and the default templates ("a {}"), batch 16, lr 5e-3, a concept
# `wedge` learned from triangles is drawn as a triangle in 35/36 judged images after 100 steps (36/36 after 200),
# with colour 36/36 and background 36/36 right: the concept composes with the words around it.
# (Measured on shapes-v1; the test passes unchanged on shapes-v2 and v3, which have the same VAE.)
# `cross` and `heart` (never drawn in the shapes model's training) are not learnable on the shapes model: its VAE,
# trained on circles, squares and triangles only, decodes a cross as a diamond (3/24 crosses survive an
# encode/decode round trip), and its UNet draws circles for every heart embedding tried (<= 2/36 hearts after
# 600 steps with 8 vectors). The cross test below runs once the shipped model's VAE can draw a cross.

SHAPE_STEPS = 100
WEDGE_SHAPE_MIN = 0.8  # measured 0.97 (35/36) at 100 steps
WEDGE_COLOUR_MIN = 0.9  # measured 1.0
WEDGE_BACKGROUND_MIN = 0.9  # measured 1.0


@pytest.fixture(scope="module")
def shapes_studio(tmp_path_factory):
    from spellbook.settings import Settings
    from spellbook.studio import Studio

    return Studio(Settings(home=tmp_path_factory.mktemp("home")))


def render_pictures(folder, shape: str, count: int = 8, seed: int = 0):
    from spellbook.toy import world

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours, positions, backgrounds = list(world.COLOURS), list(world.POSITIONS), list(world.BACKGROUNDS)
    for i in range(count):
        scene = world.Scene(colours[i % 6], shape, positions[i % 5], backgrounds[i % 3])
        Image.fromarray(world.render(scene, rng)).save(folder / f"{i}.png")
    return folder


def judged_shares(studio, name: str, expected_shape: str) -> dict[str, float]:
    """Every colour x background, one image each: does the judge see the concept's shape, colour, background?"""
    from spellbook.toy import world
    from spellbook.toy.judge import judge

    right: dict[str, list[bool]] = {"shape": [], "colour": [], "background": []}
    for i, (colour, background) in enumerate((c, b) for c in world.COLOURS for b in world.BACKGROUNDS):
        prompt = f"{world.article(colour)} {colour} <{name}>, {background} background"
        recipe = studio.plan({"prompt": prompt, "seed": 100 + i})
        verdict = judge(studio.run(recipe)[0].image)
        right["shape"].append(verdict.shape == expected_shape)
        right["colour"].append(verdict.colour == colour)
        right["background"].append(verdict.background == background)
    return {key: sum(values) / len(values) for key, values in right.items()}


def test_a_concept_learned_from_eight_pictures_composes_with_colour_and_background(shapes_studio, tmp_path):
    # `wedge` is a new word for what the pictures show (triangles): the model can draw it, the word is learned.
    pictures = render_pictures(tmp_path / "wedges", "triangle")
    result = train_concept(
        shapes_studio,
        TrainRequest("wedge", pictures, init_word="circle", steps=SHAPE_STEPS, batch_size=16, sample=False),
    )
    assert result.info.dims == 64 and result.info.trained_for == "shapes"
    shares = judged_shares(shapes_studio, "wedge", "triangle")
    assert shares["shape"] >= WEDGE_SHAPE_MIN, shares
    assert shares["colour"] >= WEDGE_COLOUR_MIN, shares
    assert shares["background"] >= WEDGE_BACKGROUND_MIN, shares


def vae_round_trip_share(components, shape: str, count: int = 24) -> float:
    """How many rendered `shape`s the model's VAE gives back as that shape (encode, decode, judge)."""
    from spellbook.toy import world
    from spellbook.toy.judge import judge

    rng = np.random.default_rng(5)
    scenes = [
        world.Scene(list(world.COLOURS)[i % 6], shape, list(world.POSITIONS)[i % 5], list(world.BACKGROUNDS)[i % 3])
        for i in range(count)
    ]
    x = torch.stack([torch.from_numpy(world.render(s, rng).astype(np.float32) / 127.5 - 1) for s in scenes])
    with torch.no_grad():
        decoded = components.vae.decode(components.vae.encode(x.permute(0, 3, 1, 2)).latent_dist.mean).sample
    pixels = ((decoded.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    hits = sum(judge(image).shape == shape for image in pixels)
    return hits / count


CROSS_MIN = 0.5  # provisional: not measurable with the shipped VAE (see above); measure when the test first runs
CROSS_COLOUR_MIN = 0.8
CROSS_BACKGROUND_MIN = 0.9


def test_cross_is_learned_from_eight_pictures(shapes_studio, tmp_path):
    components = shapes_studio.components_for("shapes")
    round_trip = vae_round_trip_share(components, "cross")
    if round_trip < 0.8:
        pytest.skip(
            f"the shipped shapes model's VAE cannot draw a cross ({round_trip:.0%} of crosses survive an "
            "encode/decode round trip): no embedding can teach it one (docs/concepts.md)"
        )
    pictures = render_pictures(tmp_path / "crosses", "cross")
    train_concept(shapes_studio, TrainRequest("cross", pictures, init_word="square", steps=400, sample=False))
    shares = judged_shares(shapes_studio, "cross", "cross")
    assert shares["shape"] >= CROSS_MIN, shares
    assert shares["colour"] >= CROSS_COLOUR_MIN, shares
    assert shares["background"] >= CROSS_BACKGROUND_MIN, shares
