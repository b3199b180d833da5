"""Faults in training: SIGKILL at random moments (resume every time, no corrupt checkpoint, nothing lost
beyond the last checkpoint), a NaN loss (stop with a message, keep the last good checkpoint), a full
disk while saving (the previous checkpoint survives), for training checkpoints and save_pretrained.
"""

from __future__ import annotations

import errno
import os

import _train_faults as faults
import pytest
import torch

from perceivers import from_pretrained, save_pretrained

MAX_STEPS = 16


def test_killed_twice_resumes_and_finishes(tmp_path):
    run = faults.kill_resume_run(tmp_path / "run", kills=2, max_steps=MAX_STEPS, seed=1)
    faults.check_kill_run(run, MAX_STEPS)
    assert len(run.kills) == 2


@pytest.mark.fuzz
@pytest.mark.parametrize("seed", range(3))
def test_killed_ten_times_resumes_and_finishes(tmp_path, seed):
    run = faults.kill_resume_run(tmp_path / "run", kills=10, max_steps=60, seed=seed)
    faults.check_kill_run(run, 60)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    r = faults.nan_loss_run(tmp_path / "run", at=6, max_steps=MAX_STEPS)
    assert r["exit_code"] != 0
    assert "step 6" in r["message"] and "last good checkpoint" in r["message"], r["log"][-2000:]
    assert r["checkpoint_step"] == 6  # read_checkpoint verified every weight is finite
    assert r["resumed_exit_code"] == 0 and r["final_step"] == MAX_STEPS  # continues once the cause is gone


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    r = faults.disk_full_run(tmp_path / "run", at=5, max_steps=MAX_STEPS)
    assert r["exit_code"] != 0 and "No space left on device" in r["message"], r["log"][-2000:]
    assert r["checkpoint_step"] == 5  # the last write that succeeded, intact
    assert r["temp_files"] == 0  # the half-written file was removed
    assert r["resumed_exit_code"] == 0 and r["final_step"] == MAX_STEPS


def test_full_disk_in_save_pretrained_keeps_the_previous_pair(tmp_path, monkeypatch):
    import safetensors.torch

    from perceivers import Perceiver

    kw = {"num_freq_bands": 2, "depth": 1, "max_freq": 6.0, "num_latents": 4, "latent_dim": 16, "latent_heads": 2,
          "cross_dim_head": 8, "latent_dim_head": 8, "num_classes": 3}
    old, new = Perceiver(**kw), Perceiver(**{**kw, "num_classes": 5})
    directory = save_pretrained(old, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(new, directory)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # nothing replaced, no litter
    loaded = from_pretrained(directory)
    torch.testing.assert_close(loaded.latents, old.latents)
