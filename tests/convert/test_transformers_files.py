"""Reading transformers checkpoint directories (``perceivers.convert.transformers.read_transformers_checkpoint``):
sharded checkpoints whose index does not match its shards, and directories of another format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from perceivers import from_pretrained
from perceivers.convert.state_dict import CheckpointError
from perceivers.convert.transformers import read_transformers_checkpoint, save_transformers
from perceivers.tasks import create_model


@pytest.fixture
def sharded(tmp_path):
    """A tiny flow model saved by save_transformers, then split into two safetensors shards with an index."""
    single = save_transformers(create_model("optical-flow-perceiver", tiny=True, num_bands=64,
                                            preprocessor_channels=64), tmp_path / "single")
    state = load_file(single / "model.safetensors")
    directory = tmp_path / "sharded"
    directory.mkdir()
    (directory / "config.json").write_text((single / "config.json").read_text())
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, directory / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, names in shards.items() for k in names}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory, index, state


def _index(directory, index):
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_consistent_sharded_checkpoint_loads(sharded):
    directory, _, state = sharded
    _, got = read_transformers_checkpoint(directory)
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
    from_pretrained(directory)


def test_an_index_that_does_not_match_its_shards_is_named(sharded):
    directory, index, _ = sharded
    name = directory / "model.safetensors.index.json"
    first = "model-00001-of-00002.safetensors"
    (directory / first).rename(directory / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match=f"{name}.*names the shard {first}, which is missing"):
        read_transformers_checkpoint(directory)
    (directory / "elsewhere.safetensors").rename(directory / first)

    _index(directory, {**index, "weight_map": {**index["weight_map"], "perceiver.extra": first}})
    with pytest.raises(CheckpointError, match=f"{name} lists 1 tensors? that its shards lack.*perceiver.extra"):
        read_transformers_checkpoint(directory)
    some = next(iter(index["weight_map"]))
    _index(directory, {**index, "weight_map": {k: v for k, v in index["weight_map"].items() if k != some}})
    with pytest.raises(CheckpointError, match=f"not listed in {name}.*{some}"):
        read_transformers_checkpoint(directory)

    for bad in ("{truncated", json.dumps({"metadata": {}}), json.dumps({"weight_map": ["a"]})):
        name.write_text(bad)
        with pytest.raises(ValueError, match=str(name)):
            read_transformers_checkpoint(directory)
    _index(directory, {"weight_map": {some: "../single/model.safetensors"}})
    with pytest.raises(CheckpointError, match="not a file name in the checkpoint directory"):
        read_transformers_checkpoint(directory)


def test_a_directory_of_another_format_is_refused_before_building(tmp_path):
    """A perceivers-format directory (or another model's) given to a transformers reader is named as such; it used
    to build transformers' default-size PerceiverModel (1280-wide, 26 layers) and then fail on tensor names."""
    from perceivers import save_pretrained
    from perceivers.hf import PerceiverModel

    own = save_pretrained(create_model("optical-flow-perceiver", tiny=True), tmp_path / "own")
    for read in (read_transformers_checkpoint, PerceiverModel.from_pretrained):
        with pytest.raises(ValueError, match="perceivers-format checkpoint.*perceivers.from_pretrained"):
            read(own)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a transformers Perceiver checkpoint.*model_type='bert'"):
        PerceiverModel.from_pretrained(tmp_path / "bert")
