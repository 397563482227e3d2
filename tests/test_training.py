"""Training the shapes model is deterministic per seed and resumes exactly after an interruption."""

from __future__ import annotations

import pytest
import torch

from spellbook.toy.train import TrainConfig, Trainer

TINY_RUN = {
    "batch_size": 4,
    "vae_iterations": 2,
    "unet_iterations": 3,
    "decoder_iterations": 1,
    "warmup": 1,
    "checkpoint_every": 1,
    "eval_every": 10_000,
}


class Interrupt(Exception):
    pass


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("vae", "unet", "text_encoder"):
        out.update({f"{name}.{k}": v for k, v in getattr(trainer, name).state_dict().items()})
    return out


def test_resumed_run_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "record_eval", lambda self, label="unet": None)  # judged elsewhere; keep it fast
    straight = Trainer(tmp_path / "a", TrainConfig(**TINY_RUN), log=lambda m: None)
    assert straight.run()

    interrupted = Trainer(tmp_path / "b", TrainConfig(**TINY_RUN), log=lambda m: None)

    def stop_in_the_unet_phase(phase, step, total, loss):
        if phase == "unet" and step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        interrupted.run(progress=stop_in_the_unet_phase)
    resumed = Trainer(tmp_path / "b", TrainConfig(seed=99), log=lambda m: None)  # settings come from the checkpoint
    resumed.load_checkpoint()
    assert (resumed.state.phase, resumed.state.step) in {("unet", 1), ("unet", 2)}
    assert resumed.run()

    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
