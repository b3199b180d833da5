"""``perceivers.hf.PerceiverModel.from_pretrained`` / ``save_pretrained`` and ``PerceiverConfig.from_pretrained``
against transformers' own: checkpoint directories written by transformers (a task model's, whose trunk and
blocks sit under ``perceiver.``) load into ours as into transformers' ``PerceiverModel``, and ours writes
directories that transformers' ``PerceiverModel.from_pretrained`` loads."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _transformers_models import randomize
from transformers.models.perceiver import modeling_perceiver as tm

from perceivers import hf as phf
from perceivers.convert.state_dict import CheckpointError

TRUNK = {"num_latents": 6, "d_latents": 16, "d_model": 16, "num_blocks": 1, "num_self_attends_per_block": 2,
         "num_self_attention_heads": 2, "num_cross_attention_heads": 1, "attention_probs_dropout_prob": 0.0,
         "vocab_size": 30, "max_position_embeddings": 10}


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    """A transformers ``PerceiverForMaskedLM`` checkpoint with every tensor random."""
    torch.manual_seed(0)
    model = randomize(tm.PerceiverForMaskedLM(transformers.PerceiverConfig(**TRUNK)).eval(), seed=3)
    path = tmp_path_factory.mktemp("mlm")
    model.save_pretrained(path)
    return path


def _ids():
    ids = torch.randint(0, TRUNK["vocab_size"], (2, TRUNK["max_position_embeddings"]),
                        generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"inputs": ids, "attention_mask": mask}


def test_trunk_and_preprocessor_of_a_task_checkpoint(mlm_dir):
    """The masked LM's trunk and text preprocessor, its decoder and embedding decoder left out, as transformers."""
    hf_cfg = transformers.PerceiverConfig.from_pretrained(mlm_dir)
    theirs = tm.PerceiverModel.from_pretrained(mlm_dir, input_preprocessor=tm.PerceiverTextPreprocessor(hf_cfg))
    cfg = phf.PerceiverConfig.from_pretrained(mlm_dir)
    assert cfg.d_latents == TRUNK["d_latents"] and cfg.vocab_size == TRUNK["vocab_size"]
    with pytest.warns(UserWarning, match=r"not used from the checkpoint: embedding_decoder, decoder"):
        ours = phf.PerceiverModel.from_pretrained(mlm_dir, input_preprocessor=phf.PerceiverTextPreprocessor(cfg),
                                                  numerics="transformers")
    assert not ours.training
    with torch.no_grad():
        a, b = ours(**_ids()).last_hidden_state, theirs.eval()(**_ids()).last_hidden_state
    assert a.shape == (2, TRUNK["num_latents"], TRUNK["d_latents"])
    assert float((a - b).abs().max()) < 1e-5


def test_the_decoder_of_a_task_checkpoint(mlm_dir):
    """Passing the masked LM's own decoder loads it too: the decoder's output equals transformers'."""
    cfg = phf.PerceiverConfig.from_pretrained(mlm_dir)
    hf_cfg = transformers.PerceiverConfig.from_pretrained(mlm_dir)
    mlm = transformers.PerceiverForMaskedLM.from_pretrained(mlm_dir)
    hf_dec = mlm.perceiver.decoder
    # the checkpoint's own decoder sizes (transformers' masked LM builds it from the config)
    kw = {"output_num_channels": hf_dec.output_num_channels, "output_index_dims": cfg.max_position_embeddings,
          "num_channels": cfg.d_model, "qk_channels": hf_dec.decoding_cross_attention.attention.self.qk_channels,
          "v_channels": cfg.d_model, "num_heads": hf_dec.decoding_cross_attention.attention.self.num_heads,
          "use_query_residual": False, "final_project": False,
          "trainable_position_encoding_kwargs": {"num_channels": cfg.d_model, "index_dims": cfg.max_position_embeddings}}
    theirs = tm.PerceiverModel.from_pretrained(mlm_dir, input_preprocessor=tm.PerceiverTextPreprocessor(hf_cfg),
                                               decoder=tm.PerceiverBasicDecoder(hf_cfg, **kw)).eval()
    with pytest.warns(UserWarning, match=r"not used from the checkpoint: embedding_decoder$"):
        ours = phf.PerceiverModel.from_pretrained(mlm_dir, input_preprocessor=phf.PerceiverTextPreprocessor(cfg),
                                                  decoder=phf.PerceiverBasicDecoder(cfg, **kw), numerics="transformers")
    with torch.no_grad():
        a, b = ours(**_ids()).logits, theirs(**_ids()).logits
    assert a.shape == b.shape == (2, TRUNK["max_position_embeddings"], TRUNK["d_model"])
    assert float((a - b).abs().max()) < 1e-5


def test_save_pretrained_loads_in_transformers(tmp_path):
    cfg_kw = dict(TRUNK, num_labels=5)

    def blocks(ns, c):
        return {"input_preprocessor": ns.PerceiverImagePreprocessor(
                    c, prep_type="conv1x1", spatial_downsample=1, out_channels=12, position_encoding_type="trainable",
                    concat_or_add_pos="concat",
                    trainable_position_encoding_kwargs={"num_channels": 4, "index_dims": 16}),
                "decoder": ns.PerceiverClassificationDecoder(
                    c, num_channels=c.d_latents, use_query_residual=True,
                    trainable_position_encoding_kwargs={"num_channels": c.d_latents, "index_dims": 1})}

    cfg = phf.PerceiverConfig(**cfg_kw)
    ours = randomize(phf.PerceiverModel(cfg, **blocks(phf, cfg), numerics="transformers").eval(), seed=5)
    path = ours.save_pretrained(tmp_path / "model")
    written = json.loads((path / "config.json").read_text())
    assert written["model_type"] == "perceiver" and written["architectures"] == ["PerceiverModel"]
    hf_cfg = transformers.PerceiverConfig.from_pretrained(path)
    theirs = tm.PerceiverModel.from_pretrained(path, **blocks(tm, hf_cfg)).eval()
    again = phf.PerceiverModel.from_pretrained(path, **blocks(phf, phf.PerceiverConfig.from_pretrained(path)),
                                               numerics="transformers")
    images = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mine, hf_out, reloaded = ours(images).logits, theirs(images).logits, again(images).logits
    assert mine.shape == (2, 5)
    assert float((mine - hf_out).abs().max()) < 1e-5
    assert torch.equal(mine, reloaded)


def test_blocks_the_checkpoint_lacks_keep_their_weights(mlm_dir):
    """As transformers: a block the checkpoint has not (or has of another kind) keeps its initialisation, and
    the checkpoint's block that nothing here takes is skipped; both named in one warning."""
    cfg = phf.PerceiverConfig.from_pretrained(mlm_dir)
    dec = phf.PerceiverClassificationDecoder(cfg, num_channels=cfg.d_latents, trainable_position_encoding_kwargs={
        "num_channels": cfg.d_latents, "index_dims": 1})
    post = phf.PerceiverProjectionPostprocessor(in_channels=cfg.num_labels, out_channels=3)
    before = {k: v.clone() for k, v in {**dec.state_dict(), **post.state_dict()}.items()}
    with pytest.warns(UserWarning, match="not used from the checkpoint: embedding_decoder, decoder; not in the "
                                         "checkpoint, left as initialised: decoder, output_postprocessor"):
        model = phf.PerceiverModel.from_pretrained(mlm_dir, decoder=dec, output_postprocessor=post,
                                                   input_preprocessor=phf.PerceiverTextPreprocessor(cfg))
    after = {**model.decoder.state_dict(), **model.output_postprocessor.state_dict()}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model(torch.zeros(1, cfg.max_position_embeddings, dtype=torch.long)).logits.shape == (1, 3)


def test_a_checkpoint_that_does_not_fit_is_refused(mlm_dir):
    """The trunk must be complete and of the checkpoint's sizes."""
    with pytest.raises(CheckpointError, match="shape"):
        phf.PerceiverModel.from_pretrained(mlm_dir, config=dict(TRUNK, d_latents=32))
    with pytest.raises(CheckpointError, match="does not fit PerceiverModel: unexpected 16: encoder.self_attends.1"):
        phf.PerceiverModel.from_pretrained(mlm_dir, config=dict(TRUNK, num_self_attends_per_block=1))


def test_config_from_pretrained_refuses_other_configs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a transformers Perceiver config.*'bert'"):
        phf.PerceiverConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a Hub repo id"):
        phf.PerceiverConfig.from_pretrained(tmp_path / "missing")


def test_conv_stem_follows_the_numerics(tmp_path):
    """transformers stores the official conv stem's kernel H/W-swapped: DeepMind numerics swap it back (equal to
    ``perceivers.from_pretrained``'s task model), transformers' numerics use it as stored (equal to transformers)."""
    import perceivers

    kw = {**TRUNK, "num_labels": 3}
    hf_model = tm.PerceiverForImageClassificationConvProcessing(transformers.PerceiverConfig(**kw))
    randomize(hf_model.eval(), seed=2).save_pretrained(tmp_path)
    cfg = phf.PerceiverConfig.from_pretrained(tmp_path)
    stem = phf.PerceiverImagePreprocessor(cfg, prep_type="conv", spatial_downsample=4, position_encoding_type="fourier",
                                          fourier_position_encoding_kwargs={"concat_pos": True, "num_bands": 64,
                                                                            "max_resolution": (56, 56)})
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        official = perceivers.from_pretrained(tmp_path)(images).last_hidden_state
        theirs = hf_model.perceiver(images).last_hidden_state
        for numerics, reference in (("deepmind", official), ("transformers", theirs)):
            with pytest.warns(UserWarning, match="not used from the checkpoint: decoder"):
                ours = phf.PerceiverModel.from_pretrained(tmp_path, input_preprocessor=stem, numerics=numerics)
            assert float((ours(images).last_hidden_state - reference).abs().max()) < 1e-5, numerics


def test_config_overrides(mlm_dir):
    cfg = phf.PerceiverConfig.from_pretrained(mlm_dir, num_labels=3, output_attentions=True)
    assert cfg.num_labels == 3 and cfg.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"} and cfg.output_attentions
    with pytest.raises(TypeError, match="unknown PerceiverConfig fields.*'num_lables'"):
        phf.PerceiverConfig.from_pretrained(mlm_dir, num_lables=3)


@pytest.mark.parametrize("numerics", ["deepmind", "transformers"])
def test_save_pretrained_round_trips_a_conv_stem(tmp_path, numerics):
    """``save_pretrained`` stores the conv stem's kernel as ``from_pretrained`` reads it back under the same numerics:
    H/W-swapped for DeepMind's (as transformers stores the official kernel), as is for transformers' (DeepMind
    numerics used to write it unswapped, and the reloaded model was off by 0.3)."""
    from safetensors.torch import load_file

    cfg = phf.PerceiverConfig(**{**TRUNK, "num_labels": 3})

    def blocks():
        return {"input_preprocessor": phf.PerceiverImagePreprocessor(
                    cfg, prep_type="conv", spatial_downsample=4, position_encoding_type="fourier",
                    fourier_position_encoding_kwargs={"concat_pos": True, "num_bands": 4, "max_resolution": (4, 5)}),
                "decoder": phf.PerceiverClassificationDecoder(cfg, num_channels=cfg.d_latents, trainable_position_encoding_kwargs={
                    "num_channels": cfg.d_latents, "index_dims": 1})}

    ours = randomize(phf.PerceiverModel(cfg, **blocks(), numerics=numerics).eval(), seed=4)
    ours.save_pretrained(tmp_path)
    again = phf.PerceiverModel.from_pretrained(tmp_path, **blocks(), numerics=numerics)
    images = torch.randn(2, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(images).logits, again(images).logits)
    kernel = ours.input_preprocessor.stem.layers[0].conv.weight
    stored = load_file(tmp_path / "model.safetensors")["input_preprocessor.convnet.conv.weight"]
    assert torch.equal(stored, kernel.transpose(-1, -2) if numerics == "deepmind" else kernel)


def test_from_pretrained_keeps_the_checkpoint_dtype(tmp_path):
    """A bfloat16 checkpoint gives a bfloat16 model (as transformers' ``dtype="auto"``), blocks it lacks included."""
    cfg = phf.PerceiverConfig(**TRUNK)
    model = phf.PerceiverModel(cfg, input_preprocessor=phf.PerceiverTextPreprocessor(cfg)).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    decoder = phf.PerceiverClassificationDecoder(cfg, num_channels=cfg.d_latents, trainable_position_encoding_kwargs={
        "num_channels": cfg.d_latents, "index_dims": 1})
    with pytest.warns(UserWarning, match="left as initialised: decoder"):
        again = phf.PerceiverModel.from_pretrained(tmp_path, input_preprocessor=phf.PerceiverTextPreprocessor(cfg),
                                                   decoder=decoder)
    assert {t.dtype for t in again.state_dict().values()} == {torch.bfloat16}
    assert again(torch.zeros(1, cfg.max_position_embeddings, dtype=torch.long)).logits.dtype == torch.bfloat16
