"""`last.ckpt` follows the run at every epoch end (LatestCheckpoint): Lightning 2.6's ModelCheckpoint refreshes it
only when a top-k checkpoint is written at the same step, so an epoch whose val/loss does not improve left it
behind, and `--resume` restarted from an older epoch."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from perceivers.train.callbacks import LatestCheckpoint


class Worsening(pl.LightningModule):
    """val/loss = the epoch number: only epoch 0 is ever the best."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)

    val_dataloader = train_dataloader


@pytest.mark.parametrize("options", [{"monitor": "val/loss", "save_top_k": 1},  # the CLI's default
                                     {"save_top_k": 0, "every_n_epochs": 1}])  # its epoch-end companion
def test_last_checkpoint_after_every_epoch(tmp_path, options):
    checkpoint = LatestCheckpoint(dirpath=str(tmp_path), save_last=True, enable_version_counter=False, **options)
    steps = []

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch:  # what last.ckpt held when the next epoch began
                steps.append(torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"])

    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[checkpoint, Watch()], num_sanity_val_steps=0)
    trainer.fit(Worsening())
    final = torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"]
    # (a plain ModelCheckpoint here, Lightning 2.6.6: [2, 2] and 2 with top 1; no last.ckpt before the end with top 0)
    assert steps == [2, 4] and final == 6
