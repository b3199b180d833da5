"""transformers' documented Perceiver usage, run on transformers and on ``perceivers.hf``.

Each example of transformers' model docstrings (masked LM, sequence classification, the three image
classifiers, optical flow, multimodal autoencoding) is written out here once, as a function of the
library it imports from (``transformers`` or ``perceivers.hf``); only the import differs, and our loads
add ``numerics="transformers"``. The Hub ids are replaced by tiny random transformers checkpoints saved to
a temporary directory (with a tokenizer or image-processor config where the example loads one), and the
input sizes are shrunk to those checkpoints. Both runs must print the same things: shapes, predicted
classes and their names, decoded text, and logits and losses within 1e-5.

``PerceiverImageProcessor`` is also compared with transformers' processor on its own, at the official
224/256 sizes, on images whose crop margins are odd and even.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from _transformers_models import ALL_CONFIGS, checkpoint_factory

from perceivers import hf as phf

ATOL = 1e-5
TEXT = "This is an incomplete sentence where some words are missing."
NAMES = ("tench", "goldfish", "tabby, tabby cat", "tiger cat", "crane")

# Tiny heads for the examples: a masked LM long enough for the example sentence, image classifiers with
# class names; (size, crop_size) of each image classifier's processor (transformers crops
# size/crop_size of the shorter side, then resizes to size).
CONFIGS = {
    **ALL_CONFIGS,
    "PerceiverForMaskedLM": dict(ALL_CONFIGS["PerceiverForMaskedLM"], max_position_embeddings=72),
    **{arch: dict(ALL_CONFIGS[arch], id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
       for arch in ALL_CONFIGS if arch.startswith("PerceiverForImageClassification")},
}
PROCESSOR_SIZES = {"Learned": (6, 7), "Fourier": (12, 14), "ConvProcessing": (16, 18)}
MAX_LENGTH = 72
ERRORS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for what, err in sorted(ERRORS.items()):
        print(f"max |ours - transformers| {what}: {err:.2e}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    make = checkpoint_factory(tmp_path_factory, CONFIGS)

    def get(arch):
        _, directory = make(arch)
        if arch in ("PerceiverForMaskedLM", "PerceiverForSequenceClassification"):
            transformers.PerceiverTokenizer(model_max_length=MAX_LENGTH).save_pretrained(directory)
        for kind, (size, crop) in PROCESSOR_SIZES.items():
            if arch.endswith(kind):
                transformers.PerceiverImageProcessorPil(
                    size={"height": size, "width": size}, crop_size={"height": crop, "width": crop}
                ).save_pretrained(directory)
        return directory

    return get


def _both(example, directory, *args):
    """``example(lib, load_options, directory, *args)`` with transformers, then with perceivers.hf."""
    torch.manual_seed(0)
    want = example(transformers, {}, directory, *args)
    torch.manual_seed(0)
    got = example(phf, {"numerics": "transformers"}, directory, *args)
    return got, want


def _close(got, want, what):
    assert got.shape == want.shape, (what, tuple(got.shape), tuple(want.shape))
    err = float((got.detach() - want.detach()).abs().max())
    ERRORS[what] = max(err, ERRORS.get(what, 0.0))
    assert err < ATOL, f"{what}: max |ours - transformers| = {err:.3g}"
    return err


# --------------------------------------------------------------------------------------------- examples


def masked_lm_example(lib, load, directory):
    tokenizer = lib.AutoTokenizer.from_pretrained(directory)
    model = lib.PerceiverForMaskedLM.from_pretrained(directory, **load)

    # training: the bytes of " missing." are masked, the loss runs over every (padded) position
    inputs = tokenizer(TEXT, padding="max_length", return_tensors="pt")
    inputs["input_ids"][0, 52:61] = tokenizer.mask_token_id
    labels = tokenizer(TEXT, padding="max_length", return_tensors="pt").input_ids
    outputs = model(**inputs, labels=labels)
    loss, train_logits = outputs.loss, outputs.logits

    # inference
    encoding = tokenizer(TEXT, padding="max_length", return_tensors="pt")
    encoding["input_ids"][0, 52:61] = tokenizer.mask_token_id
    with torch.no_grad():
        outputs = model(**encoding)
    logits = outputs.logits
    predictions = logits[0, 52:61].argmax(dim=-1).tolist()
    return {"loss": loss, "train_logits": train_logits, "logits": logits, "input_ids": encoding["input_ids"],
            "attention_mask": encoding["attention_mask"], "decoded": tokenizer.decode(predictions),
            "decoded_all": tokenizer.decode(logits[0].argmax(-1)), "mask_token_id": tokenizer.mask_token_id,
            "model_max_length": tokenizer.model_max_length}


def sequence_classification_example(lib, load, directory):
    tokenizer = lib.AutoTokenizer.from_pretrained(directory)
    model = lib.PerceiverForSequenceClassification.from_pretrained(directory, **load)
    inputs = tokenizer("hello world", return_tensors="pt").input_ids
    outputs = model(inputs=inputs)
    return {"logits": outputs.logits, "id2label": dict(model.config.id2label)}


def image_classification_example(lib, load, directory, arch, image):
    image_processor = lib.AutoImageProcessor.from_pretrained(directory)
    model = getattr(lib, arch).from_pretrained(directory, **load)
    inputs = image_processor(images=image, return_tensors="pt").pixel_values
    outputs = model(inputs=inputs)
    logits = outputs.logits
    predicted_class_idx = logits.argmax(-1).item()
    return {"pixel_values": inputs, "logits": logits, "predicted": predicted_class_idx,
            "name": model.config.id2label[predicted_class_idx], "label2id": dict(model.config.label2id)}


def optical_flow_example(lib, load, directory):
    model = lib.PerceiverForOpticalFlow.from_pretrained(directory, **load)
    # 3×3 patches of 3 channels around each pixel of two frames, at the training size (here 6×8); seeded
    # here, as loading may draw random numbers
    patches = torch.randn(1, 2, 27, 6, 8, generator=torch.Generator().manual_seed(0))
    outputs = model(inputs=patches)
    return {"logits": outputs.logits}


def multimodal_example(lib, load, directory, nchunks):
    images = torch.randn((1, 2, 3, 8, 8))
    audio = torch.randn((1, 32, 1))
    inputs = {"image": images, "audio": audio, "label": torch.zeros((images.shape[0], 5))}
    model = lib.PerceiverForMultimodalAutoencoding.from_pretrained(directory, **load)
    # the paper decodes the video in chunks of the image and audio queries
    image_chunk_size = np.prod((2, 8, 8)) // nchunks
    audio_chunk_size = audio.shape[1] // model.config.samples_per_patch // nchunks
    chunks = []
    for chunk_idx in range(nchunks):
        subsampling = {
            "image": torch.arange(image_chunk_size * chunk_idx, image_chunk_size * (chunk_idx + 1)),
            "audio": torch.arange(audio_chunk_size * chunk_idx, audio_chunk_size * (chunk_idx + 1)),
            "label": None,
        }
        with torch.no_grad():
            chunks.append(model(inputs=inputs, subsampled_output_points=subsampling).logits)
    return {"chunks": chunks, "samples_per_patch": model.config.samples_per_patch}


# ------------------------------------------------------------------------------------------------ tests


def test_masked_lm_example(checkpoint):
    got, want = _both(masked_lm_example, checkpoint("PerceiverForMaskedLM"))
    assert got["mask_token_id"] == want["mask_token_id"] == 3
    assert got["model_max_length"] == want["model_max_length"] == MAX_LENGTH
    assert torch.equal(got["input_ids"], want["input_ids"]) and list(got["input_ids"].shape) == [1, MAX_LENGTH]
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert list(got["logits"].shape) == list(want["logits"].shape) == [1, MAX_LENGTH, 262]
    _close(got["train_logits"], want["train_logits"], "training logits (padded positions included)")
    _close(got["loss"], want["loss"], "loss over the padded labels")
    got["loss"].backward()
    _close(got["logits"], want["logits"], "inference logits")
    assert got["decoded"] == want["decoded"]
    assert got["decoded_all"] == want["decoded_all"]


def test_sequence_classification_example(checkpoint):
    got, want = _both(sequence_classification_example, checkpoint("PerceiverForSequenceClassification"))
    assert list(got["logits"].shape) == list(want["logits"].shape) == [1, 3]
    _close(got["logits"], want["logits"], "logits")
    assert got["id2label"] == want["id2label"] == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}


def test_sequence_classification_from_masked_lm_example(checkpoint):
    """The docstring loads the masked-LM checkpoint: a new random decoder, so only shapes compare."""
    got, want = _both(sequence_classification_example, checkpoint("PerceiverForMaskedLM"))
    assert list(got["logits"].shape) == list(want["logits"].shape) == [1, 2]
    assert got["id2label"] == want["id2label"] == {0: "LABEL_0", 1: "LABEL_1"}


def _digit(height, width, index=0):
    """A real photograph-like test image: a scikit-learn digit (8×8) in colour, resized (PIL) to height×width."""
    digits = pytest.importorskip("sklearn.datasets").load_digits()
    gray = (digits.images[index] * (255 / 16)).astype(np.uint8)
    rgb = np.stack([gray, 255 - gray, np.roll(gray, 3, axis=1)], axis=-1)
    return Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("arch", ["PerceiverForImageClassificationLearned", "PerceiverForImageClassificationFourier",
                                  "PerceiverForImageClassificationConvProcessing"])
@pytest.mark.parametrize("image_shape", [(45, 38), (40, 53)])
def test_image_classification_example(checkpoint, arch, image_shape):
    image = _digit(*image_shape, index=sum(image_shape) % 10)
    got, want = _both(image_classification_example, checkpoint(arch), arch, image)
    _close(got["pixel_values"], want["pixel_values"], "pixel_values")
    assert list(got["logits"].shape) == list(want["logits"].shape) == [1, 5]
    _close(got["logits"], want["logits"], "logits")
    assert got["predicted"] == want["predicted"]
    assert got["name"] == want["name"] == NAMES[want["predicted"]]
    assert got["label2id"] == want["label2id"]


def test_optical_flow_example(checkpoint):
    got, want = _both(optical_flow_example, checkpoint("PerceiverForOpticalFlow"))
    assert list(got["logits"].shape) == list(want["logits"].shape) == [1, 6, 8, 2]
    _close(got["logits"], want["logits"], "logits")


def test_multimodal_example(checkpoint):
    got, want = _both(multimodal_example, checkpoint("PerceiverForMultimodalAutoencoding"), 4)
    assert got["samples_per_patch"] == want["samples_per_patch"] == 8
    for i, (g, w) in enumerate(zip(got["chunks"], want["chunks"])):
        assert set(g) == set(w) == {"audio", "image", "label"}
        assert [list(g[k].shape) for k in ("audio", "image", "label")] == [[1, 8], [1, 32, 3], [1, 5]]
        for key in g:
            _close(g[key], w[key], f"chunk {i} {key}")


# ------------------------------------------------------------------------------------- image processor

# (height, width): crop margins odd and even in either direction, portrait and landscape, exact 256.
SHAPES = [(256, 256), (257, 400), (300, 257), (375, 500), (500, 333), (231, 231), (240, 241)]


@pytest.mark.parametrize("shape", SHAPES)
def test_image_processor_matches_transformers(shape):
    rng = np.random.default_rng(sum(shape))
    smooth = np.asarray(_digit(*shape, index=shape[0] % 10), dtype=np.float64)
    pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    want = transformers.PerceiverImageProcessorPil()(images=image, return_tensors="pt").pixel_values
    processor = phf.PerceiverImageProcessor()
    got = processor(images=image, return_tensors="pt").pixel_values
    assert list(got.shape) == list(want.shape) == [1, 3, 224, 224]
    _close(got, want, f"pixel_values of a {shape} image")
    # a list of images, and numpy / tensor inputs, give the same batch
    batch = processor([image, pixels, torch.from_numpy(pixels)], return_tensors="pt")["pixel_values"]
    assert torch.equal(batch, got.expand(3, -1, -1, -1))


def test_image_processor_reads_transformers_config(tmp_path):
    transformers.PerceiverImageProcessorPil(size={"height": 12, "width": 12}, crop_size={"height": 15, "width": 15},
                                           image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4]).save_pretrained(tmp_path)
    image = _digit(61, 47)
    want = transformers.AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt").pixel_values
    got = phf.AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt").pixel_values
    assert isinstance(phf.AutoImageProcessor.from_pretrained(tmp_path), phf.PerceiverImageProcessor)
    _close(got, want, "pixel_values with a saved processor config")
    # without return_tensors: a list of [3, H, W] float32 arrays, as transformers' PIL processor
    listed = phf.PerceiverImageProcessor.from_pretrained(tmp_path)(image).pixel_values
    assert isinstance(listed, list) and listed[0].shape == (3, 12, 12) and listed[0].dtype == np.float32


# ---------------------------------------------------------------------------------------- class names


def test_class_names_defaults_and_round_trips(tmp_path):
    from perceivers.convert.transformers import save_transformers
    from perceivers.data import imagenet_class_names
    from perceivers.tasks import ImageClassificationConfig, SequenceClassificationConfig

    # the official ImageNet models: our 1000 short names (deepmind/vision-perceiver-* on the Hub carry
    # transformers' longer ones, "tabby, tabby cat", which a transformers checkpoint brings along)
    official = ImageClassificationConfig()
    assert official.id2label == dict(enumerate(imagenet_class_names())) and official.id2label[281] == "tabby"
    assert ImageClassificationConfig(num_labels=5).id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert SequenceClassificationConfig().label2id == {"LABEL_0": 0, "LABEL_1": 1}
    with pytest.raises(ValueError, match="3 names but num_labels=5"):
        ImageClassificationConfig(num_labels=5, labels=["a", "b", "c"])

    config = {"num_latents": 8, "d_latents": 32, "num_blocks": 1, "num_self_attends_per_block": 1,
              "num_self_attention_heads": 2, "num_cross_attention_heads": 1,
              "id2label": {str(i): n for i, n in enumerate(NAMES)}}
    model = phf.PerceiverForImageClassificationFourier(config)
    assert model.config.id2label == dict(enumerate(NAMES)) and model.config.label2id["crane"] == 4
    model.save_pretrained(tmp_path / "ours")  # our format keeps the names
    assert phf.PerceiverForImageClassificationFourier.from_pretrained(tmp_path / "ours").config.labels == NAMES
    save_transformers(model, tmp_path / "hf")  # transformers reads them from config.json
    theirs = transformers.PerceiverForImageClassificationFourier.from_pretrained(tmp_path / "hf")
    assert theirs.config.id2label == dict(enumerate(NAMES))
    # a PerceiverConfig's names, unless num_labels is overridden
    hf_config = transformers.PerceiverConfig(**{k: v for k, v in config.items() if k != "id2label"},
                                             id2label=dict(enumerate(NAMES)))
    assert phf.PerceiverForImageClassificationFourier(hf_config).config.labels == NAMES
    assert phf.PerceiverForImageClassificationFourier(hf_config, num_labels=3).config.id2label[2] == "LABEL_2"
