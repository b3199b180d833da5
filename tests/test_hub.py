"""Own format (save_pretrained / from_pretrained), Hub ids through an offline cache, load_checkpoint dispatch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from perceivers import (
    Perceiver,
    PerceiverBlock,
    PerceiverIO,
    PerceiverLM,
    from_pretrained,
    load_checkpoint,
    save_pretrained,
)
from perceivers.configurable import configurable, init_config
from perceivers.convert.state_dict import CheckpointError
from perceivers.hub import detect_format
from perceivers.tasks import create_model, list_models

SMALL = {"num_latents": 4, "latent_dim": 8, "latent_heads": 2, "latent_dim_head": 4, "cross_dim_head": 4}


def _family():
    return {
        "perceiver": (Perceiver(num_freq_bands=2, depth=3, max_freq=4.0, num_classes=5, weight_tie_layers=True, **SMALL),
                      (torch.randn(2, 5, 6, 3),), {}),
        "perceiver_io": (PerceiverIO(depth=2, dim=5, queries_dim=6, logits_dim=7, **SMALL),
                         (torch.randn(2, 9, 5),), {"queries": torch.randn(3, 6)}),
        "perceiver_lm": (PerceiverLM(dim=8, num_tokens=20, max_seq_len=16, depth=2, weight_tie_layers=True, **SMALL),
                         (torch.randint(0, 20, (2, 11)),), {}),
        "block": (PerceiverBlock(dim=8, context_dim=5, self_per_cross_attn=2), (torch.randn(2, 4, 8), torch.randn(2, 6, 5)),
                  {}),
    }


def _outputs(model, args, kwargs):
    with torch.no_grad():
        out = model.eval()(*args, **kwargs)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("name", list(_family()))
def test_family_round_trip(tmp_path, name):
    model, args, kwargs = _family()[name]
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["format"] == "perceivers" and cfg["model"]["class"].startswith("perceivers.models.")
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert torch.equal(_outputs(loaded, args, kwargs), _outputs(model, args, kwargs))


def _migration_models():
    """The other peers' API classes (FlashPerceiver, lucidrains' Perceiver AR, krasserm's task models, the
    Keras tutorial's PatchPerceiver) with an input each."""
    from perceivers import krasserm as k
    from perceivers.flash_perceiver import Perceiver as FlashPerceiver
    from perceivers.flash_perceiver import PerceiverIO as FlashPerceiverIO
    from perceivers.models.patch import PatchPerceiver
    from perceivers.perceiver_ar_pytorch import PerceiverAR

    text = k.TextEncoderConfig(vocab_size=30, max_seq_len=10, num_input_channels=12, num_cross_attention_heads=2,
                               num_self_attention_heads=2, num_self_attention_layers_per_block=1)
    head = k.ClassificationDecoderConfig(num_classes=5, num_output_query_channels=8, num_cross_attention_heads=2)
    image = k.ImageEncoderConfig(image_shape=(4, 5, 3), num_frequency_bands=2, num_cross_attention_heads=1,
                                 num_self_attention_heads=2)
    ids = torch.randint(0, 30, (2, 10))
    return {
        "flash_perceiver": (FlashPerceiver(input_dim=6, depth=1, output_dim=3, num_latents=4, latent_dim=16,
                                           latent_heads=2, latent_head_dim=8), (torch.randn(2, 7, 6),), {}),
        "flash_perceiver_io": (FlashPerceiverIO(input_dim=6, query_dim=4, depth=1, num_latents=4, latent_dim=16,
                                                latent_heads=2, latent_head_dim=8),
                               (torch.randn(2, 7, 6),), {"queries": torch.randn(2, 3, 4)}),
        "perceiver_ar_pytorch": (PerceiverAR(num_tokens=30, dim=32, depth=1, max_seq_len=16, cross_attn_seq_len=8,
                                             dim_head=32, heads=2), (torch.randint(0, 30, (2, 16)),), {}),
        "krasserm_text_classifier": (k.TextClassifier(k.TextClassifierConfig(text, head, num_latents=4,
                                                                             num_latent_channels=16)), (ids,), {}),
        "krasserm_mlm": (k.MaskedLanguageModel(k.MaskedLanguageModelConfig(
            text, k.TextDecoderConfig(vocab_size=30, max_seq_len=10, num_output_query_channels=12, num_cross_attention_heads=2),
            num_latents=4, num_latent_channels=16)), (ids,), {}),
        "krasserm_image_classifier": (k.ImageClassifier(k.ImageClassifierConfig(image, head, num_latents=4,
                                                                                num_latent_channels=16)),
                                      (torch.randn(2, 4, 5, 3),), {}),
        "patch_perceiver": (PatchPerceiver(image_size=8, patch_size=2, num_classes=5, num_latents=4, latent_dim=16,
                                           latent_heads=2, num_blocks=1), (torch.randn(2, 8, 8, 3),), {}),
    }


@pytest.mark.parametrize("name", list(_migration_models()))
def test_migration_classes_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model, args, kwargs = _migration_models()[name]
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert torch.equal(_outputs(loaded, args, kwargs), _outputs(model, args, kwargs))


def _registry_inputs(name, model):
    c = model.config
    if name.startswith("language-perceiver"):
        return (torch.randint(0, 262, (2, c.max_position_embeddings)),), {}
    if name.startswith("vision"):
        return (torch.randn(2, 3, *c.image_size),), {}
    if name == "optical-flow-perceiver":
        return (torch.randn(1, 2, 27, *c.train_size),), {}
    return ({"image": torch.rand(1, c.num_frames, 3, *c.image_size),
             "audio": torch.rand(1, c.num_audio_samples, 1)},), {"subsampled_output_points": {
                 "image": torch.arange(8), "audio": torch.arange(2)}}


def _leaves(out):
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _leaves(out[k])]
    return [out]


@pytest.mark.parametrize("name", list_models())
def test_registry_round_trip(tmp_path, name):
    model = create_model(name, tiny=True, num_latents=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"]["registry"] == name and cfg["model"]["config"]["num_latents"] == 5
    loaded = from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.model_name == name
    args, kwargs = _registry_inputs(name, model)
    for a, b in zip(_leaves(_outputs(loaded, args, kwargs)), _leaves(_outputs(model, args, kwargs))):
        assert torch.equal(a, b)


@configurable
class _Tied(nn.Module):
    """Two linears sharing one weight, plus an embedding tied to a head (shared tensors in the state dict)."""

    def __init__(self, dim: int = 4, vocab: int = 7) -> None:
        super().__init__()
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim)
        self.b.weight = self.a.weight
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.b(self.a(self.emb(ids))))


def test_tied_tensors_are_saved_once_and_stay_tied(tmp_path):
    from safetensors import safe_open

    model = _Tied()
    save_pretrained(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "b.weight" not in stored and "head.weight" not in stored
    loaded = from_pretrained(tmp_path, allow_external_classes=True)
    assert loaded.b.weight is loaded.a.weight and loaded.head.weight is loaded.emb.weight
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids), model(ids))


def test_external_classes_need_opt_in(tmp_path):
    save_pretrained(_Tied(), tmp_path)
    with pytest.raises(ValueError, match="allow_external_classes"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize(("entry", "message"), [
    ({"class": "perceivers.train.cli.PerceiversCLI", "kwargs": {"args": ["fit", "--trainer.default_root_dir", "{out}"]}},
     "PerceiversCLI from a config: it is not a torch.nn.Module"),
    ({"class": "perceivers.Perceiver", "kwargs": {"x": {"__dataclass__": "perceivers.safe_files.Path",
                                                        "fields": {}}}}, "Path from a config: it is not a dataclass"),
])
def test_a_config_builds_modules_and_dataclasses_only(tmp_path, entry, message):
    """A downloaded config.json named the training CLI, a perceivers class that is not a model: loading the
    directory ran `perceivers fit` with the file's arguments (writing a run wherever they said)."""
    out = tmp_path / "written"
    (tmp_path / "config.json").write_text(json.dumps({"format": "perceivers", "format_version": 1, "model": entry})
                                          .replace("{out}", str(out)))
    with pytest.raises(TypeError, match=message):
        from_pretrained(tmp_path)
    assert not out.exists()


def test_unrecorded_class_is_refused(tmp_path):
    with pytest.raises(TypeError, match="configurable"):
        save_pretrained(nn.Linear(2, 2), tmp_path)


def test_init_config_records_defaults_and_nested_values():
    cfg = init_config(PerceiverIO(depth=1, dim=3, queries_dim=4))
    assert cfg["class"] == "perceivers.models.perceiver_io.PerceiverIO"
    assert cfg["kwargs"]["num_latents"] == 512 and cfg["kwargs"]["logits_dim"] is None


def _fake_hub_cache(cache: Path, repo_id: str, files: Path) -> Path:
    """The layout huggingface_hub's cache uses: models--owner--name/{refs/main, snapshots/<commit>/…}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in files.iterdir():
        shutil.copy(f, snapshot / f.name)
    return snapshot


def test_hub_id_resolves_offline_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = create_model("vision-perceiver-fourier", tiny=True).eval()
    save_pretrained(model, tmp_path / "src")
    cache = tmp_path / "cache"
    _fake_hub_cache(cache, "someone/tiny-fourier", tmp_path / "src")
    loaded = from_pretrained("someone/tiny-fourier", cache_dir=cache, local_files_only=True)
    x = torch.randn(1, 3, *model.config.image_size)
    assert torch.equal(_outputs(loaded, (x,), {}), _outputs(model, (x,), {}))
    # load_checkpoint takes the same ids
    fresh = create_model("vision-perceiver-fourier", tiny=True).eval()
    load_checkpoint(fresh, "someone/tiny-fourier", cache_dir=cache, local_files_only=True)
    assert torch.equal(_outputs(fresh, (x,), {}), _outputs(model, (x,), {}))
    with pytest.raises(Exception, match="(?i)cache|offline|local|not found|cannot find"):
        from_pretrained("someone/not-cached", cache_dir=cache, local_files_only=True)


def test_hub_cache_via_environment(tmp_path, monkeypatch):
    """HF_HUB_CACHE pointing at a populated cache is honoured (checked in a fresh interpreter,
    since huggingface_hub reads the variable at import)."""
    import subprocess
    import sys

    model = Perceiver(num_freq_bands=2, depth=1, max_freq=4.0, num_classes=3, **SMALL)
    save_pretrained(model, tmp_path / "src")
    _fake_hub_cache(tmp_path / "cache", "someone/perceiver", tmp_path / "src")
    code = ("import perceivers; m = perceivers.from_pretrained('someone/perceiver'); "
            "print(type(m).__name__, sum(p.numel() for p in m.parameters()))")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Perceiver", str(sum(p.numel() for p in model.parameters()))]


FLOW = {"tiny": True, "num_bands": 64, "preprocessor_channels": 64}  # sizes transformers can express


def test_load_checkpoint_dispatch_on_content(tmp_path):
    model = create_model("optical-flow-perceiver", **FLOW).eval()
    x = torch.randn(1, 2, 27, *model.config.train_size)
    want = _outputs(model, (x,), {})
    save_pretrained(model, tmp_path / "ours")
    from perceivers.convert.state_dict import save_state_dict
    from perceivers.convert.transformers import save_transformers

    save_state_dict(model.state_dict(), tmp_path / "weights.safetensors")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "train.ckpt")
    save_transformers(model, tmp_path / "hf")
    from perceivers.convert.transformers import to_transformers_state_dict

    torch.save(to_transformers_state_dict(model.state_dict(), "PerceiverForOpticalFlow"), tmp_path / "hf_bare.bin")
    expected = {"ours": "perceivers", "weights.safetensors": "safetensors", "weights.pt": "torch",
                "train.ckpt": "torch", "hf": "transformers", "hf_bare.bin": "torch"}
    for name, fmt in expected.items():
        assert detect_format(tmp_path / name) == fmt
        fresh = create_model("optical-flow-perceiver", **FLOW).eval()
        load_checkpoint(fresh, tmp_path / name)
        assert torch.equal(_outputs(fresh, (x,), {}), want), name


def test_load_checkpoint_is_strict_and_names_tensors(tmp_path):
    model = create_model("vision-perceiver-learned", tiny=True)
    state = model.state_dict()
    state.pop("perceiver.decoder.decoder.output.bias")
    state["perceiver.extra.weight"] = torch.zeros(1)
    state["perceiver.encoder.latents.embeddings"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, tmp_path / "bad.pt")
    message = str(info.value)
    assert "missing 1: perceiver.decoder.decoder.output.bias" in message
    assert "unexpected 1: perceiver.extra.weight" in message
    assert "perceiver.encoder.latents.embeddings (checkpoint (3, 3), model (8, 32))" in message


def test_load_checkpoint_lucidrains_state_dict(tmp_path):
    pytest.importorskip("perceiver_pytorch")
    import perceiver_pytorch

    ref = perceiver_pytorch.Perceiver(num_freq_bands=2, depth=2, max_freq=4.0, num_classes=3, **SMALL)
    torch.save(ref.state_dict(), tmp_path / "lucid.pt")
    ours = Perceiver(num_freq_bands=2, depth=2, max_freq=4.0, num_classes=3, **SMALL)
    load_checkpoint(ours, tmp_path / "lucid.pt")
    x = torch.randn(2, 4, 4, 3)
    torch.testing.assert_close(_outputs(ours, (x,), {}), ref.eval()(x), atol=1e-5, rtol=0)


def test_missing_path_and_bad_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a Hub repo id"):
        from_pretrained(tmp_path / "nope" / "deeper")


def test_missing_relative_path_shaped_like_a_repo_id(tmp_path, monkeypatch):
    """'runs/nosuch' could be a local folder or a Hub repo: the error names the string, says it is not a
    local path and that the Hub fetch failed, with the reason on one line (here: not in the empty cache)."""
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError) as info:
        from_pretrained("runs/nosuch", cache_dir=cache, local_files_only=True)
    message = str(info.value)
    assert "'runs/nosuch' is not an existing local path" in message
    assert "fetching Hub repo 'runs/nosuch' failed" in message
    assert "\n" not in message
    fresh = create_model("vision-perceiver-fourier", tiny=True)
    with pytest.raises(FileNotFoundError, match="'runs/nosuch' is not an existing local path"):
        load_checkpoint(fresh, "runs/nosuch", cache_dir=cache, local_files_only=True)


def test_failed_hub_fetch_reason_is_one_line(tmp_path, monkeypatch):
    """A download that fails for lack of a network (simulated: no test touches the network) is reported with
    huggingface_hub's first line and the root cause, not as a bare multi-line LocalEntryNotFoundError."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as e:
            raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub.\n"
                                          "Please check your internet connection and try again.") from e

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        from_pretrained("runs/nosuch")
    message = str(info.value)
    assert "\n" not in message
    assert "'runs/nosuch' is not an existing local path" in message
    assert "LocalEntryNotFoundError: An error happened while trying to locate the files on the Hub." in message
    assert "ConnectionError: [Errno -2] Name or service not known" in message
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)


def test_save_into_a_file_is_refused(tmp_path):
    from perceivers.convert.transformers import save_transformers

    target = tmp_path / "picture.png"
    target.write_bytes(b"not a directory")
    model = create_model("optical-flow-perceiver", **FLOW)
    with pytest.raises(ValueError, match=r"picture\.png is a file, not a directory"):
        save_pretrained(model, target)
    with pytest.raises(ValueError, match=r"picture\.png \(a parent of .*sub\) is a file, not a directory"):
        save_pretrained(model, target / "sub")
    with pytest.raises(ValueError, match=r"picture\.png is a file, not a directory"):
        save_transformers(model, target)
    assert target.read_bytes() == b"not a directory"


def test_foreign_config_names_what_it_found(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(ValueError, match=r"\"model_type\": \"perceiver\".*model_type='bert'"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize(("field", "value", "expected"), [("num_latents", "8", "an int"), ("dropout", "0.1", "a number"),
                                                          ("use_query_residual", "false", "a bool")])
def test_config_values_of_the_wrong_type_are_named(tmp_path, field, value, expected):
    """An edited config.json with a size as a string (or a bool as one) is refused at load, naming the file,
    the field and the value, not deep inside torch (or, for "false", silently taken as true)."""
    save_pretrained(create_model("vision-perceiver-fourier", tiny=True), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["config"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError, match=rf"config\.json: config field '{field}' must be {expected}, got '{value}'"):
        from_pretrained(tmp_path)
    with pytest.raises(TypeError, match=rf"config field '{field}' must be {expected}"):
        create_model("vision-perceiver-fourier", tiny=True, **{field: value})


@pytest.mark.parametrize(("saved_by", "hint"), [("99.0.0", True), ("0.0.1", False), ("not-a-version", False)])
def test_config_from_a_newer_version_says_so(tmp_path, saved_by, hint):
    """A field this version does not know is refused, naming it; when the config was saved by a newer perceivers,
    the error says so and what to do."""
    save_pretrained(create_model("vision-perceiver-fourier", tiny=True), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["config"]["field_from_the_future"] = 1
    config["perceivers_version"] = saved_by
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError, match="no field.s. field_from_the_future") as err:
        from_pretrained(tmp_path)
    assert ("saved by perceivers 99.0.0, newer than this" in str(err.value)) == hint
    assert ("upgrade perceivers" in str(err.value)) == hint


@pytest.mark.parametrize(("overrides", "error", "message"), [
    ({"image_size": "12"}, TypeError, r"image_size must be a list of ints, got '12'"),  # was read as (1, 2)
    ({"image_size": True}, TypeError, r"image_size must be an int or \[height, width\], got True"),
    ({"image_size": [12, "x"]}, TypeError, r"image_size must be a list of ints"),
    ({"max_resolution": "ab"}, TypeError, r"max_resolution must be a list of ints"),
    ({"tiny": "false"}, TypeError, r"tiny must be a bool, got 'false'"),  # a truthy string built the tiny model
    ({"num_latents": -1}, ValueError, r"num_latents must be an int >= 1, got -1"),  # failed inside torch
    ({"qk_channels": 0}, ValueError, r"qk_channels must be an int >= 1, got 0"),
    ({"num_self_attends_per_block": -1}, ValueError, r"num_self_attends_per_block must be an int >= 0"),
])
def test_config_sizes_of_the_wrong_kind_are_refused(overrides, error, message):
    kwargs = {"tiny": True, **overrides}
    with pytest.raises(error, match=message):
        create_model("vision-perceiver-fourier", **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_from_pretrained_keeps_the_checkpoint_dtype(tmp_path, dtype):
    """A model saved in float64 / bfloat16 / float16 comes back in that dtype (it used to be rebuilt in float32 and
    the float64 weights rounded), ties and outputs intact; transformers-format directories likewise (as transformers'
    ``dtype="auto"``). ``load_checkpoint`` fills an existing model in the model's own dtype."""
    from perceivers.convert.transformers import save_transformers

    model, args, kwargs = _family()["perceiver"]
    model = model.to(dtype)
    args = tuple(a.to(dtype) for a in args)
    save_pretrained(model, tmp_path / "own")
    loaded = from_pretrained(tmp_path / "own")
    assert {t.dtype for t in loaded.state_dict().values()} == {dtype}
    assert torch.equal(_outputs(loaded, args, kwargs), _outputs(model, args, kwargs))
    into = load_checkpoint(Perceiver(num_freq_bands=2, depth=3, max_freq=4.0, num_classes=5, weight_tie_layers=True,
                                     **SMALL), tmp_path / "own")
    assert {t.dtype for t in into.state_dict().values()} == {torch.float32}

    task = create_model("language-perceiver-classifier", tiny=True).to(dtype)
    save_transformers(task, tmp_path / "hf")
    ids = torch.randint(0, 262, (2, 8))
    again = from_pretrained(tmp_path / "hf")
    assert {t.dtype for t in again.state_dict().values() if t.is_floating_point()} == {dtype}
    assert torch.equal(again(ids).logits, task.eval()(ids).logits)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_load_checkpoint_unwraps_compile_and_data_parallel_prefixes(tmp_path, prefix):
    """The state dict of a ``torch.compile``d or ``DistributedDataParallel``-wrapped model of ours loads (every key
    prefixed ``_orig_mod.`` / ``module.``), as perceiver-pytorch's do; it used to fail with 72 missing tensors."""
    model = create_model("vision-perceiver-fourier", tiny=True)
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    fresh = create_model("vision-perceiver-fourier", tiny=True)
    load_checkpoint(fresh, tmp_path / "w.pt")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_differing_copies_of_a_tied_tensor_are_refused(tmp_path):
    """A checkpoint whose copies of one tied tensor differ (e.g. of an untied model) is refused, naming them; it
    used to load whichever copy came last and drop the other silently."""
    model = _Tied()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.weight"] = state["head.weight"] + 1
    torch.save(state, tmp_path / "untied.pt")
    with pytest.raises(CheckpointError, match="emb.weight and head.weight are one tensor in _Tied but differ"):
        load_checkpoint(_Tied(), tmp_path / "untied.pt")
    state["head.weight"] = state["emb.weight"].clone()  # equal copies are fine
    torch.save(state, tmp_path / "tied.pt")
    load_checkpoint(_Tied(), tmp_path / "tied.pt")
