"""Training the shapes model is deterministic per seed and resumes exactly after an interruption."""

from __future__ import annotations

import pytest
import torch

from spellbook.toy.train import TrainConfig, Trainer, unet_lr_at

TINY_RUN = {
    "batch_size": 4,
    "vae_iterations": 2,
    "unet_iterations": 4,
    "unet_restart_at": 2,  # a warm restart inside the run, so a resume across it is checked too
    "restart_warmup": 1,
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


def test_the_unet_learning_rate_restarts_with_a_warm_up_and_both_cycles_decay():
    config = TrainConfig()  # the shipped schedule: 1e-3 to 1600, restart at 5e-4 to 3200
    lrs = [unet_lr_at(step, config) for step in range(config.unet_iterations)]
    restart = config.unet_restart_at
    assert lrs[config.warmup] == pytest.approx(config.unet_lr)
    assert lrs[restart - 1] == pytest.approx(0.05 * config.unet_lr, rel=0.01)  # first cycle ends decayed
    assert lrs[restart] == pytest.approx(config.unet_restart_lr / config.restart_warmup)  # warm-up from ~0
    assert max(lrs[restart:]) == pytest.approx(config.unet_restart_lr, rel=0.01)
    assert lrs[-1] == pytest.approx(0.05 * config.unet_restart_lr, rel=0.01)
