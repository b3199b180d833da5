"""Tasks and data modules through the Python API: official models by name, masked LM, text classification,
in-memory arrays, bf16, activation checkpointing, schedules and attention maps."""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.model_summary import summarize
from torch.utils.flop_counter import FlopCounterMode
from train_configs import tiny_config, write_config

from perceivers import Perceiver, PerceiverLM, cli, create_model
from perceivers.models.patch import PatchPerceiver
from perceivers.train import (
    ArrayDataModule,
    ClassificationTask,
    ConfigError,
    FlatCosine,
    MaskedBytesDataModule,
    MaskedLMTask,
    TextClassificationDataModule,
)
from perceivers.train.attention import cross_attention_maps
from perceivers.train.tasks import enable_activation_checkpointing

TINY = {"num_freq_bands": 2, "max_freq": 8.0, "depth": 1, "num_latents": 4, "latent_dim": 8, "cross_dim_head": 8,
        "latent_heads": 2, "latent_dim_head": 4}


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    options = {"default_root_dir": str(tmp_path), "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
               "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
               "enable_checkpointing": False, "num_sanity_val_steps": 0, **kwargs}
    return pl.Trainer(**options)


def test_arrays_for_library_users(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 6, 6, 1), dtype=np.float32), rng.integers(0, 3, 40)
    data = ArrayDataModule(train=(x, y), test=(x[:8], y[:8]), batch_size=8)
    task = ClassificationTask(Perceiver(input_channels=1, num_classes=3, **TINY))
    trainer = _trainer(tmp_path)
    trainer.fit(task, datamodule=data)
    result = trainer.test(task, datamodule=data, verbose=False)[0]
    assert set(result) >= {"test/acc", "test/loss"} and "test/acc_top5" not in result  # 3 classes < top 5
    with pytest.raises(ValueError, match="out of range"):
        ArrayDataModule(train=(x, y), num_classes=2)


def test_sequences_with_padding_masks(tmp_path):
    x = torch.randn(32, 10, 4)
    mask = torch.ones(32, 10, dtype=torch.bool)
    mask[::2, 7:] = False
    data = ArrayDataModule(train=(x, torch.randint(0, 2, (32,)), mask), batch_size=8)
    task = ClassificationTask(Perceiver(input_channels=4, input_axis=1, num_classes=2, **TINY))
    _trainer(tmp_path).fit(task, datamodule=data)


def test_official_image_model_by_name_gets_channels_first(tmp_path, capsys):
    task = {"model": None, "model_name": "vision-perceiver-fourier",
            "model_kwargs": {"tiny": True, "in_channels": 1, "num_labels": 10}}
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", task=task))
    assert cli.main(["fit", "--config", config]) == 0
    assert (tmp_path / "run" / "plots" / "attention.png").is_file()
    capsys.readouterr()
    assert ClassificationTask(model_name="vision-perceiver-fourier",
                              model_kwargs={"tiny": True}).input_layout == "channels_first"


class _Summaries(pl.Callback):
    """The model summary Lightning prints at the start of fit, kept."""

    def __init__(self) -> None:
        self.summaries = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.summaries.append(summarize(pl_module))


def _counted(model, *args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops()


def test_model_summary_lists_flops_and_sizes(tmp_path, text_dir):
    """The summary runs one sample of the example batch (no dataset transform applied twice) and counts the
    model's forward: the products on oneDNN and SDPA's CPU kernel included."""
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 6, 6, 1), dtype=np.float32), rng.integers(0, 3, 16)
    task = ClassificationTask(Perceiver(input_channels=1, num_classes=3, **TINY))
    kept = _Summaries()
    _trainer(tmp_path, callbacks=[kept]).fit(task, datamodule=ArrayDataModule(train=(x, y), batch_size=8))
    (summary,) = kept.summaries
    assert summary.total_flops == _counted(task.model, torch.from_numpy(x[:1])) > 0
    assert summary.in_sizes[0] == [1, 6, 6, 1] and summary.out_sizes[0] == [1, 3]

    model = PerceiverLM(num_tokens=262, dim=16, max_seq_len=24, depth=1, num_latents=4, latent_dim=16,
                        cross_dim_head=8, latent_heads=2, latent_dim_head=8)
    task, kept = MaskedLMTask(model), _Summaries()
    _trainer(tmp_path, callbacks=[kept]).fit(task, datamodule=MaskedBytesDataModule(str(text_dir), seq_len=24,
                                                                                   batch_size=4))
    inputs, mask = task.example_input_array
    assert inputs.shape == mask.shape == (1, 24)
    assert kept.summaries[0].total_flops == _counted(model, inputs, mask) > 0


def test_model_summary_skips_compiled_and_foreign_models(tmp_path):
    x, y = np.zeros((16, 6, 6, 1), dtype=np.float32), np.arange(16) % 3
    data = ArrayDataModule(train=(x, y), batch_size=8)
    compiled = ClassificationTask(Perceiver(input_channels=1, num_classes=3, **TINY), compile=True)
    compiled.trainer = _trainer(tmp_path)  # (set-up only: a compiled model under the summary's FLOP counter)
    data.setup("fit")
    compiled.trainer.datamodule = data
    compiled.setup("fit")
    assert compiled.example_input_array is None
    foreign = ClassificationTask(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3)))
    _trainer(tmp_path).fit(foreign, datamodule=data)
    assert foreign.example_input_array is None


def test_model_and_model_name_are_exclusive():
    with pytest.raises(ConfigError, match="exactly one"):
        ClassificationTask(Perceiver(**TINY), model_name="vision-perceiver-fourier")
    with pytest.raises(ConfigError, match="exactly one"):
        ClassificationTask()


def test_masked_lm_with_perceiver_lm_from_files(tmp_path, text_dir):
    model = PerceiverLM(num_tokens=262, dim=16, max_seq_len=32, depth=1, num_latents=4, latent_dim=16,
                        cross_dim_head=8, latent_heads=2, latent_dim_head=8)
    data = MaskedBytesDataModule(str(text_dir), seq_len=32, batch_size=4)
    trainer = _trainer(tmp_path, limit_val_batches=2)
    trainer.fit(MaskedLMTask(model), datamodule=data)
    metrics = trainer.callback_metrics
    assert {"val/loss", "val/acc", "val/perplexity"} <= set(metrics)
    torch.testing.assert_close(metrics["val/perplexity"], metrics["val/loss"].exp(), rtol=0.05, atol=0)
    # validation masks are fixed: the same batch twice gives the same labels
    batch_a = next(iter(data.val_dataloader()))
    batch_b = next(iter(data.val_dataloader()))
    assert torch.equal(batch_a["labels"], batch_b["labels"]) and (batch_a["labels"] != -100).any()


def test_masked_lm_predictions(tmp_path, text_dir):
    """``predict`` on a masked-LM run: the masked bytes predicted, written one row per window (it called the model
    with the whole batch before)."""
    import csv

    from perceivers.data.tokenizer import ByteTokenizer
    from perceivers.train.cli import prediction_samples, write_predictions

    model = PerceiverLM(num_tokens=262, dim=16, max_seq_len=32, depth=1, num_latents=4, latent_dim=16,
                        cross_dim_head=8, latent_heads=2, latent_dim_head=8)
    data = MaskedBytesDataModule(str(text_dir), seq_len=32, batch_size=4)
    task = MaskedLMTask(model)
    outputs = _trainer(tmp_path).predict(task, datamodule=data)
    batch = next(iter(data.predict_dataloader()))
    first = outputs[0]
    targets = batch["labels"] != -100
    assert torch.equal(first["targets"], targets) and targets.any()
    with torch.no_grad():
        expected = model(batch["inputs"], mask=batch["mask"]).argmax(-1)
    assert torch.equal(first["filled"][targets], expected[targets])
    assert torch.equal(first["filled"][~targets], batch["inputs"][~targets])
    assert torch.equal(first["original"][targets], batch["labels"][targets])
    path = write_predictions(prediction_samples(outputs), tmp_path / "predictions.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(data.predict_dataloader().dataset)
    tokenizer = ByteTokenizer()
    assert rows[0]["text"] == tokenizer.decode(first["original"][0][first["mask"][0]])
    assert int(rows[0]["masked"]) == int(targets[0].sum())
    assert int(rows[0]["correct"]) == int((expected[0][targets[0]] == batch["labels"][0][targets[0]]).sum())


def test_masked_lm_official_language_perceiver_by_name(tmp_path, text_dir):
    task = MaskedLMTask(model_name="language-perceiver", model_kwargs={"tiny": True, "max_position_embeddings": 24})
    trainer = _trainer(tmp_path)
    trainer.fit(task, datamodule=MaskedBytesDataModule(str(text_dir), seq_len=24, batch_size=4))
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])


def test_masked_lm_rejects_a_classifier(tmp_path, text_dir):
    task = MaskedLMTask(Perceiver(input_channels=1, input_axis=1, num_classes=5, **TINY))
    with pytest.raises(ConfigError, match="cannot take byte ids|masked LM needs logits"):
        _trainer(tmp_path).fit(task, datamodule=MaskedBytesDataModule(str(text_dir), seq_len=16, batch_size=2))


def test_text_classification_folders(tmp_path):
    for label, text in (("neg", "awful bad terrible "), ("pos", "great good lovely ")):
        (tmp_path / "texts" / label).mkdir(parents=True)
        for i in range(6):
            (tmp_path / "texts" / label / f"{i}.txt").write_text(text * (i + 1))
    data = TextClassificationDataModule(str(tmp_path / "texts"), max_length=16, batch_size=4, val_fraction=0.25)
    task = ClassificationTask(model_name="language-perceiver-classifier",
                              model_kwargs={"tiny": True, "num_labels": 2})
    trainer = _trainer(tmp_path)
    trainer.fit(task, datamodule=data)
    assert data.class_names == ["neg", "pos"] and "val/acc" in trainer.callback_metrics


def test_bf16_autocast_on_cpu(tmp_path):
    x, y = torch.rand(16, 6, 6, 1), torch.randint(0, 2, (16,))
    task = ClassificationTask(Perceiver(input_channels=1, num_classes=2, **TINY))
    trainer = _trainer(tmp_path, precision="bf16-mixed")
    trainer.fit(task, datamodule=ArrayDataModule(train=(x, y), batch_size=4))
    assert task.model.latents.dtype == torch.float32  # weights stay fp32; compute is autocast


def test_activation_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    model = Perceiver(input_channels=1, num_classes=3, **TINY)
    x = torch.randn(2, 5, 5, 1)
    model(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert enable_activation_checkpointing(model) == 1  # one PerceiverBlock, the outermost match
    keys = set(model.state_dict())
    model(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)
    assert set(model.state_dict()) == keys


def _optimizer(task: ClassificationTask) -> torch.optim.Optimizer:
    config = task.configure_optimizers()
    return config["optimizer"] if isinstance(config, dict) else config


def test_optimizers_with_a_fused_kernel_use_it_unless_configured():
    model = Perceiver(input_channels=1, num_classes=3, **TINY)
    assert _optimizer(ClassificationTask(model)).defaults["fused"] is True  # AdamW, the default
    assert _optimizer(ClassificationTask(model, optimizer=functools.partial(torch.optim.SGD, lr=0.1))).defaults["fused"]
    chosen = ClassificationTask(model, optimizer=functools.partial(torch.optim.AdamW, foreach=True))
    assert not _optimizer(chosen).defaults["fused"] and _optimizer(chosen).defaults["foreach"]
    assert not _optimizer(ClassificationTask(model, optimizer=functools.partial(torch.optim.Adam, fused=False))).defaults[
        "fused"]
    assert "fused" not in _optimizer(ClassificationTask(model, optimizer=torch.optim.RMSprop)).defaults  # no such kernel


def test_flat_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = FlatCosine(opt, total_steps=10, flat_fraction=0.5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == [1.0] * 5 and lrs[5] == pytest.approx(1.0) and lrs[-1] < 0.1
    assert all(a >= b for a, b in itertools.pairwise(lrs))


@pytest.mark.parametrize("n, world, batch", [(5, 2, 2), (359, 2, 32), (7, 3, 1), (2, 4, 3)])
def test_eval_shards_count_every_sample_once(n, world, batch):
    """Evaluation on ``world`` processes: the same number of batches everywhere, and the rows the tasks count
    (``real_rows``) hold every sample exactly once."""
    from types import SimpleNamespace

    from perceivers.train.data import EvalShardSampler

    counted, lengths = [], set()
    for rank in range(world):
        sampler = EvalShardSampler(range(n), num_replicas=world, rank=rank)
        order = list(sampler)
        lengths.add(len(order))
        for k in range(0, len(order), batch):
            counted += order[k:k + batch][:sampler.real_rows(k // batch, batch)]
    assert len(lengths) == 1 and sorted(counted) == list(range(n))

    # a batch of repeats only: the forward pass (sharded models run it together), no metric
    task = ClassificationTask(Perceiver(input_channels=1, num_classes=3, **TINY))
    sampler = EvalShardSampler(range(5), num_replicas=2, rank=1)  # samples 1, 3, then a repeat of 1
    task._trainer = SimpleNamespace(test_dataloaders=SimpleNamespace(sampler=sampler, batch_size=2))
    calls = []
    task.model.register_forward_hook(lambda *args: calls.append(1))
    task._shared_step = lambda *args: pytest.fail("a repeated sample was counted")
    task.test_step({"inputs": torch.randn(1, 6, 6, 1), "target": torch.tensor([0])}, 1)
    assert calls


@pytest.mark.parametrize("total, warmup", [(22, 15), (100, 29), (10, 3), (5, 9)])
def test_warmup_cosine_follows_its_formula(total, warmup):
    """Linear warm-up for ``warmup`` steps, then the cosine over the rest from its first step (the warm-up as a
    fraction of the total rounded down a step early: 15/22 · 22 = 14.99…)."""
    from perceivers.train import WarmupCosine

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, total_steps=total, warmup_steps=warmup)
    for step in range(total):
        if step < warmup:
            expected = (step + 1) / warmup
        else:
            expected = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), step
        opt.step()
        sched.step()


@pytest.mark.parametrize("kind", ["perceiver", "patch", "official"])
def test_attention_maps_are_distributions_over_the_grid(kind):
    torch.manual_seed(0)
    if kind == "perceiver":
        model, x = Perceiver(input_channels=3, num_classes=3, cross_heads=2, **TINY), torch.randn(2, 6, 5, 3)
        grid = (6, 5)
    elif kind == "patch":
        model = PatchPerceiver(image_size=8, patch_size=2, num_classes=3, num_latents=4, latent_dim=16,
                               latent_heads=2, num_blocks=1)
        x, grid = torch.randn(2, 8, 8, 3), (4, 4)
    else:
        model = create_model("vision-perceiver-fourier", tiny=True)
        x, grid = torch.randn(2, 3, 12, 10), (12, 10)
    weights, found = cross_attention_maps(model, x)
    assert found == grid and weights.shape[-2:] == grid and weights.shape[0] == 2
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(weights.shape[:3]))


@pytest.mark.slow
def test_compile_trains(tmp_path):
    x, y = torch.rand(16, 6, 6, 1), torch.randint(0, 2, (16,))
    task = ClassificationTask(Perceiver(input_channels=1, num_classes=2, **TINY), compile=True)
    _trainer(tmp_path).fit(task, datamodule=ArrayDataModule(train=(x, y), batch_size=4))
