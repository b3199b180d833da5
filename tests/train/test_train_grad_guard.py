"""NonFiniteGradientGuard: a batch whose gradients are NaN/Inf while its loss is finite skips its optimizer step
(weights and optimizer state unchanged, a warning); N such steps in a row stop training with a message naming
the last good checkpoint; under gradient scaling (16-mixed) the scaler's own skipping is left alone."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from train_configs import tiny_config, write_config
from train_grad_faults import PoisonGradients, StepChanges
from train_torchrun import free_port

import perceivers.train.callbacks as callbacks_module
from perceivers import Perceiver, cli
from perceivers.train import ArrayDataModule, ClassificationTask, NonFiniteGradientGuard
from perceivers.train.callbacks import NonFiniteGradientError

TINY = {"num_freq_bands": 2, "max_freq": 8.0, "depth": 1, "num_latents": 4, "latent_dim": 8, "cross_dim_head": 8,
        "latent_heads": 2, "latent_dim_head": 4}


def _data() -> ArrayDataModule:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 6, 6, 1, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    return ArrayDataModule(train=(x, y), batch_size=4)


def _build(tmp_path: Path, poison: list[int], *, steps: int = 6, max_consecutive: int = 3,
           value: float = float("nan"), model: pl.LightningModule | None = None, callbacks_extra: tuple = (),
           **trainer) -> tuple[pl.LightningModule, StepChanges, NonFiniteGradientGuard, pl.Trainer]:
    torch.manual_seed(0)
    task = model or ClassificationTask(Perceiver(input_channels=1, num_classes=3, **TINY))
    changes, guard = StepChanges(), NonFiniteGradientGuard(max_consecutive=max_consecutive)
    options = {"default_root_dir": str(tmp_path), "max_steps": steps, "limit_val_batches": 0, "logger": False,
               "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
               "callbacks": [PoisonGradients(poison, value), changes, guard, *callbacks_extra], **trainer}
    return task, changes, guard, pl.Trainer(**options)


def _fit(tmp_path: Path, poison: list[int], **kwargs) -> tuple[pl.LightningModule, StepChanges,
                                                               NonFiniteGradientGuard, pl.Trainer]:
    task, changes, guard, trainer = _build(tmp_path, poison, **kwargs)
    trainer.fit(task, datamodule=_data())
    return task, changes, guard, trainer


@pytest.mark.parametrize("clip", [None, "norm", "value"])
def test_a_nonfinite_gradient_skips_the_step(tmp_path, clip, monkeypatch):
    calls = []
    original = callbacks_module.gradient_norm
    monkeypatch.setattr(callbacks_module, "gradient_norm", lambda params: calls.append(1) or original(params))
    clipping = {} if clip is None else {"gradient_clip_val": 0.5, "gradient_clip_algorithm": clip}
    with pytest.warns(UserWarning, match=r"gradient norm is nan at step 2 .*skipped the optimizer step"):
        task, changes, guard, trainer = _fit(tmp_path, poison=[2], **clipping)
    assert guard.skipped == [2] and trainer.global_step == 6
    assert changes.changed[2] == (False, False)  # weights and optimizer state exactly as before
    assert all(changes.changed[s] == (True, True) for s in (0, 1, 3, 4, 5))
    assert all(torch.isfinite(p).all() for p in task.parameters())
    # clipping by norm computes the norm anyway: the guard reads it (no extra pass); otherwise one pass per step
    assert len(calls) == (0 if clip == "norm" else 6)


def test_inf_gradients_and_bf16_mixed(tmp_path):
    """bf16-mixed has no gradient scaler (nothing else would skip the step): the guard acts."""
    _, changes, guard, _ = _fit(tmp_path, poison=[1, 3], value=float("inf"), precision="bf16-mixed",
                                gradient_clip_val=1.0)
    assert guard.skipped == [1, 3] and changes.changed[1] == changes.changed[3] == (False, False)
    assert changes.changed[2] == (True, True)  # a good step in between resets the count


def test_consecutive_nonfinite_steps_stop_naming_the_last_good_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, save_last=True, save_top_k=0)
    task, changes, guard, trainer = _build(tmp_path, poison=[3, 4, 5], steps=10, enable_checkpointing=True,
                                           callbacks_extra=[checkpoint])
    with pytest.raises(NonFiniteGradientError) as info:
        trainer.fit(task, datamodule=_data())
    message = str(info.value)
    last = tmp_path / "ckpt" / "last.ckpt"
    print(message)
    assert "in 3 optimizer steps in a row (steps 3-5, epoch 0; gradient norm nan): stopped" in message
    assert f"the last good checkpoint is {last}" in message
    assert guard.skipped == [3, 4, 5] and trainer.global_step == 5  # step 5 raised before its optimizer step
    # last.ckpt was written after step 4 (skipped, like step 3): it holds the weights from before step 3
    saved = torch.load(last, map_location="cpu", weights_only=False)  # hparams hold the optimizer class
    assert saved["global_step"] == 5
    for name, value in changes.weights_before[3].items():
        assert torch.equal(saved["state_dict"][name], value), name
    # steps that are not consecutive do not stop training
    task, _, guard, trainer = _build(tmp_path, poison=[1, 3, 5], steps=7, max_consecutive=2)
    trainer.fit(task, datamodule=_data())
    assert guard.skipped == [1, 3, 5] and trainer.global_step == 7


def test_gradient_scaling_skips_on_its_own(tmp_path):
    """16-mixed: Lightning's GradScaler skips steps with Inf/NaN gradients (and lowers its scale); the guard stays
    off, so no stop however many steps in a row are skipped."""
    # on CPU Trainer(precision="16-mixed") becomes bf16-mixed (no scaler); give the float16 plugin explicitly
    _, changes, guard, trainer = _fit(tmp_path, poison=[1, 2, 3, 4], value=float("inf"), max_consecutive=2,
                                      plugins=[MixedPrecision("16-mixed", "cpu")])
    assert trainer.precision_plugin.scaler is not None and not guard.active(trainer)
    assert guard.skipped == [] and trainer.global_step == 6
    assert all(changes.changed[s][0] is False for s in (1, 2, 3, 4))  # the scaler skipped the updates
    assert changes.changed[0][0] and changes.changed[5][0]


class Plain(pl.LightningModule):
    """Not a perceivers Task: the guard computes the gradient norm itself."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.model(batch["inputs"]), batch["target"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_any_lightning_module(tmp_path):
    _, changes, guard, _ = _fit(tmp_path, poison=[2], model=Plain())
    assert guard.skipped == [2] and changes.changed[2] == (False, False) and changes.changed[3] == (True, True)


def test_cli_grad_guard_under_fsdp(tmp_path, monkeypatch, capsys):
    """`perceivers fit --grad_guard.max_consecutive 2` with FSDP (one process: sharded DTensor gradients, the norm
    over all shards): two poisoned steps in a row stop the run, naming last.ckpt."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    poison = {"class_path": "train_grad_faults.PoisonGradients", "init_args": {"steps": [2, 3]}}
    root = tmp_path / "run"
    config = tiny_config(root, trainer={"max_epochs": 1, "limit_train_batches": 8, "gradient_clip_val": 1.0,
                                        "callbacks": [poison]},
                         checkpoint={"every_n_train_steps": 1, "save_last": True, "save_top_k": 0, "monitor": None},
                         plots={"attention": False, "learning_curves": False})
    with pytest.raises(NonFiniteGradientError, match=rf"in 2 optimizer steps in a row \(steps 2-3.*the last good "
                                                     rf"checkpoint is {root / 'checkpoints' / 'last.ckpt'}"):
        cli.main(["fit", "--config", write_config(tmp_path / "c.yaml", config), "--trainer.strategy", "fsdp",
                  "--grad_guard.max_consecutive", "2"])
    saved = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())
