"""`precision: bf16-true` (bfloat16 weights) for images, feature sequences, byte-id text classification and masked
LM: float inputs reach the model in bfloat16, ids stay integers, the loss and every metric stay float32, and a
tiny problem trains; the same under FSDP (one process here, two under torchrun). 16-true refuses to train."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from train_configs import tiny_config, write_config
from train_torchrun import failure, free_port, fresh, load, run_standalone

from perceivers import Perceiver, PerceiverLM, cli, kernels
from perceivers.train import (
    ArrayDataModule,
    ClassificationTask,
    ConfigError,
    MaskedBytesDataModule,
    MaskedLMTask,
    TextClassificationDataModule,
)

TINY = {"num_freq_bands": 2, "max_freq": 8.0, "depth": 1, "num_latents": 4, "latent_dim": 16, "cross_dim_head": 8,
        "latent_heads": 2, "latent_dim_head": 8}


class Record(Callback):
    """The training losses (value and dtype) and the dtypes of what the model was called with."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.loss_dtypes: set[torch.dtype] = set()
        self.input_dtypes: set[torch.dtype] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        def hook(module, args, kwargs):
            self.input_dtypes.add(args[0].dtype)

        pl_module.model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.loss_dtypes.add(outputs["loss"].dtype)


def _task_and_data(kind: str, tmp_path: Path):
    """A tiny model and a dataset of one batch (every step sees the same samples, so the loss must fall)."""
    torch.manual_seed(0)
    if kind == "images":
        y = torch.arange(8) % 3
        x = 0.2 * torch.rand(8, 6, 6, 1) + 0.4 * y.reshape(-1, 1, 1, 1)  # brightness tells the class
        task = ClassificationTask(Perceiver(input_channels=1, num_classes=3, **TINY), **_adam(1e-2))
        return task, ArrayDataModule(train=(x, y), val=(x, y), batch_size=8), torch.bfloat16
    if kind == "features":  # float sequences [B, L, C] with padding
        y = torch.arange(8) % 3
        x = torch.randn(8, 10, 4) + y.reshape(-1, 1, 1)  # the mean tells the class
        mask = torch.ones(8, 10, dtype=torch.bool)
        mask[::2, 6:] = False
        task = ClassificationTask(Perceiver(input_channels=4, input_axis=1, num_classes=3, **TINY), **_adam(1e-2))
        return task, ArrayDataModule(train=(x, y, mask), val=(x, y, mask), batch_size=8), torch.bfloat16
    if kind == "text":  # byte ids [B, L] with padding, the official classifier
        for split in ("train", "val"):
            for label, text in (("neg", "awful bad terrible "), ("pos", "great good lovely ")):
                (tmp_path / "texts" / split / label).mkdir(parents=True)
                for i in range(4):
                    (tmp_path / "texts" / split / label / f"{i}.txt").write_text(text * (i + 1))
        data = TextClassificationDataModule(str(tmp_path / "texts"), max_length=16, batch_size=8)
        task = ClassificationTask(model_name="language-perceiver-classifier",
                                  model_kwargs={"tiny": True, "num_labels": 2}, **_adam(3e-3))
        return task, data, torch.int64
    text = tmp_path / "text.txt"
    text.write_text("Perceivers attend to bytes. " * 12)
    model = PerceiverLM(num_tokens=262, dim=16, max_seq_len=16, depth=1, num_latents=4, latent_dim=16,
                        cross_dim_head=8, latent_heads=2, latent_dim_head=8)
    data = MaskedBytesDataModule([str(text)], seq_len=16, batch_size=16, mask_prob=0.3, val_fraction=0.1)
    return MaskedLMTask(model, **_adam(1e-2)), data, torch.int64


def _adam(lr: float) -> dict:
    return {"optimizer": functools.partial(torch.optim.AdamW, lr=lr)}


@pytest.mark.parametrize("kind", ["images", "features", "text", "mlm"])
def test_bf16_true_trains(kind, tmp_path):
    task, data, input_dtype = _task_and_data(kind, tmp_path)
    record = Record()
    trainer = pl.Trainer(default_root_dir=str(tmp_path), precision="bf16-true", max_steps=12, limit_train_batches=1,
                         limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(task, datamodule=data)
    assert {p.dtype for p in task.model.parameters()} == {torch.bfloat16}
    assert record.input_dtypes == {input_dtype}  # images/features cast to bf16; token ids never
    assert record.loss_dtypes == {torch.float32}
    states = {name: getattr(m, name) for m in task.modules() if isinstance(m, torchmetrics.Metric)
              for name in m._defaults}
    assert all(v.dtype == torch.float32 for v in states.values() if v.is_floating_point())
    assert {m.dtype for m in task.modules() if isinstance(m, torchmetrics.Metric)} == {torch.float32}
    first, last = sum(record.losses[:3]) / 3, sum(record.losses[-3:]) / 3
    print(f"bf16-true {kind}: loss {first:.4f} -> {last:.4f} over {len(record.losses)} steps")
    assert all(map(torch.isfinite, map(torch.tensor, record.losses))) and last < 0.9 * first, record.losses
    result = trainer.validate(task, datamodule=data, verbose=False)[0]
    assert torch.isfinite(torch.tensor(result["val/loss"]))


@pytest.mark.parametrize("flags, emulated", [
    ({"fpu", "avx512f"}, True),              # Ice Lake
    ({"fpu", "avx2", "fma"}, True),
    ({"avx512f", "avx512_bf16"}, False),     # Cooper Lake, Zen 4 and later
    ({"avx512f", "amx_bf16"}, False),        # Sapphire Rapids
    (set(), False),                          # flags unknown (another architecture)
])
def test_emulates_bf16_reads_the_processor_flags(monkeypatch, flags, emulated):
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: set(flags))
    assert kernels.emulates_bf16() is emulated


@pytest.mark.parametrize("precision, emulated, warns", [
    ("bf16-mixed", True, True), ("bf16-true", True, True), ("bf16-mixed", False, False), ("32-true", True, False),
])
def test_bf16_on_a_cpu_without_bf16_arithmetic_warns(monkeypatch, tmp_path, precision, emulated, warns):
    """bfloat16 training on an x86 CPU without AVX512-BF16 or AMX warns that it is no faster than 32-true (the
    layers compute in float32 there: training steps measured 1.0-1.4x as long on an Ice Lake), and trains anyway."""
    monkeypatch.setattr(kernels, "emulates_bf16", lambda: emulated)
    task, data, _ = _task_and_data("images", tmp_path)
    trainer = pl.Trainer(default_root_dir=str(tmp_path), precision=precision, max_steps=1, limit_train_batches=1,
                         limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, datamodule=data)
    hits = [str(w.message) for w in caught if "without bfloat16 arithmetic" in str(w.message)]
    assert len(hits) == int(warns), hits
    if warns:
        assert hits[0].startswith(f"precision {precision} on a CPU") and "32-true" in hits[0]
    assert trainer.global_step == 1


def test_16_true_refuses_to_train_but_evaluates(tmp_path):
    task, data, _ = _task_and_data("images", tmp_path)
    trainer = pl.Trainer(default_root_dir=str(tmp_path), precision="16-true", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="16-true .*train with 32-true, bf16-true, bf16-mixed or 16-mixed"):
        trainer.fit(task, datamodule=data)
    result = trainer.validate(task, datamodule=data, verbose=False)[0]  # inference in float16 is fine
    assert task.model.latents.dtype == torch.float16 and torch.isfinite(torch.tensor(result["val/loss"]))


def _digits(root: Path, **trainer) -> dict:
    data = {"class_path": "perceivers.train.DigitsDataModule",
            "init_args": {"batch_size": 16, "eval_batch_size": 32, "shuffle": True}}
    return tiny_config(root, data=data, task={"optimizer": {"class_path": "torch.optim.AdamW",
                                                            "init_args": {"lr": 1e-2}}},
                       trainer={"max_epochs": 3, "limit_train_batches": 4, "gradient_clip_val": 1.0, **trainer},
                       plots={"attention": True, "learning_curves": False})


def _epoch_losses(root: Path) -> list[float]:
    import csv

    return [float(r["train/loss_epoch"]) for r in csv.DictReader((root / "metrics.csv").open()) if r["train/loss_epoch"]]


def test_bf16_true_under_fsdp_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    config = write_config(tmp_path / "fsdp.yaml", _digits(tmp_path / "fsdp"))
    assert cli.main(["fit", "--config", config, "--trainer.strategy", "fsdp", "--trainer.precision", "bf16-true"]) == 0
    saved = load(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")
    assert {v.dtype for v in saved["state_dict"].values()} == {torch.bfloat16}
    assert all(torch.isfinite(v.float()).all() for v in saved["state_dict"].values())
    losses = _epoch_losses(tmp_path / "fsdp")
    print(f"FSDP (1 process) bf16-true, digits: train loss by epoch {losses}")
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "fsdp" / "plots" / "attention.png").is_file()  # the picture takes bf16 models too


def test_bf16_true_fsdp_two_processes(tmp_path):
    """torchrun, 2 processes, FSDP with bfloat16 shards: trains, replicas identical, a bf16 full checkpoint."""
    out = run_standalone(["fit", "--config", write_config(tmp_path / "c.yaml", _digits(tmp_path / "run")),
                          "--trainer.strategy", "fsdp", "--trainer.precision", "bf16-true"],
                         prepare=fresh(tmp_path / "run"))
    assert out.returncode == 0, failure(out)
    report = json.loads((tmp_path / "run" / "replica_check.json").read_text())
    assert report["sharded"] and report["max_abs_diff"] == 0.0
    saved = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 12 and {v.dtype for v in saved["state_dict"].values()} == {torch.bfloat16}
    losses = _epoch_losses(tmp_path / "run")
    print(f"FSDP (2 processes) bf16-true, digits: train loss by epoch {losses}")
    assert losses[-1] < losses[0]
