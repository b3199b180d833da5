"""Tiny YAML recipes for tests: the digits pipeline with a model small enough to train in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TINY_PERCEIVER = {
    "class_path": "perceivers.Perceiver",
    "init_args": {"input_channels": 1, "num_freq_bands": 2, "max_freq": 8.0, "depth": 1, "num_latents": 4,
                  "latent_dim": 8, "cross_dim_head": 8, "latent_heads": 2, "latent_dim_head": 4, "num_classes": 10},
}


def tiny_config(root: Path, *, model: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
                trainer: dict[str, Any] | None = None, task: dict[str, Any] | None = None, **top: Any) -> dict:
    return {
        "seed_everything": 0,
        "num_threads": 1,
        "trainer": {"default_root_dir": str(root), "max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 1,
                    "limit_test_batches": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1, **(trainer or {})},
        "model": {"class_path": "perceivers.train.ClassificationTask",
                  "init_args": {"model": model or TINY_PERCEIVER,
                                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
                                **(task or {})}},
        "data": data or {"class_path": "perceivers.train.DigitsDataModule",
                         "init_args": {"batch_size": 16, "eval_batch_size": 64}},
        "plots": {"attention": True, "learning_curves": True},
        **top,
    }


def replica_config(root: Path, steps: int) -> dict:
    """For runs compared across process counts: shuffled data, no augmentation or dropout (their random
    draws depend on the process), ``steps`` optimizer steps, no plots."""
    data = {"class_path": "perceivers.train.DigitsDataModule",
            "init_args": {"batch_size": 16, "eval_batch_size": 32, "shuffle": True}}
    return tiny_config(root, data=data, trainer={"max_epochs": 1, "limit_train_batches": steps},
                       plots={"attention": False, "learning_curves": False})


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)
