"""Training the shapes model is deterministic per seed and resumes exactly after an interruption."""

from __future__ import annotations

import pytest
import torch

from spellbook.toy.train import TrainConfig, Trainer, unet_lr_at

TINY_RUN = {
    "batch_size": 4,
    "vae_iterations": 2,
    "unet_iterations": 4,
    "unet_restarts": ((2, 5e-4),),  # a warm restart inside the run, so a resume across it is checked too
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


def test_the_unet_learning_rate_restarts_with_a_warm_up_and_every_cycle_decays():
    config = TrainConfig(unet_iterations=5200, unet_restarts=((1600, 5e-4), (3200, 2.5e-4)))
    lrs = [unet_lr_at(step, config) for step in range(config.unet_iterations)]
    assert lrs[config.warmup] == pytest.approx(config.unet_lr)
    for (start, peak), end in (((0, config.unet_lr), 1600), ((1600, 5e-4), 3200), ((3200, 2.5e-4), 5200)):
        assert lrs[end - 1] == pytest.approx(0.05 * peak, rel=0.01)  # each cycle ends decayed
        assert max(lrs[start:end]) == pytest.approx(peak, rel=0.01)
        if start:
            assert lrs[start] == pytest.approx(peak / config.restart_warmup)  # warm-up from ~0


def test_checkpoints_with_a_single_restart_still_load(tmp_path):
    trainer = Trainer(tmp_path, TrainConfig(**TINY_RUN), log=lambda m: None)
    trainer.save_checkpoint()
    payload = torch.load(trainer.checkpoint_path, weights_only=True)
    del payload["config"]["unet_restarts"]
    payload["config"].update(unet_restart_at=3, unet_restart_lr=1e-4)
    torch.save(payload, trainer.checkpoint_path)
    trainer.load_checkpoint()
    assert trainer.config.unet_restarts == ((3, 1e-4),)
