"""ImageFolderDataModule(pipeline="official"): DeepMind's per-image ImageNet pipeline in the loader workers,
the official evaluation crop, and the imagenet-perceiver-io recipe selecting it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from train_configs import TINY_PERCEIVER, tiny_config, write_config

from perceivers import cli
from perceivers.data import IMAGENET_MEAN, IMAGENET_STD, ImageNetEvalTransform, ImageNetTrainTransform
from perceivers.data.datasets import DataError
from perceivers.data.transforms import ImageAugment
from perceivers.train import ImageFolderDataModule
from perceivers.train.data import EpochShuffleSampler, EpochTaggedSampler, PerImageFolder

RECIPE_AUGMENT = ImageAugment(flip=True, crop_scale=(0.08, 1.0), crop_sampler="tf", randaugment_layers=4,
                              randaugment_magnitude=5)


def _photo_folder(root: Path, per_class: int = 3, splits=("train", "val")) -> Path:
    """JPEGs cut from scikit-learn's sample photographs, landscape and portrait, one folder per class."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    for split in splits:
        for c, name in enumerate(("china", "flower")):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = (80, 60) if i % 2 else (60, 80)
                crop = photos[c][10 * i : 10 * i + 300, 20 * i : 20 * i + 400]
                Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR).save(folder / f"{i}.JPEG", quality=90)
    return root


def _module(root: Path, **kwargs) -> ImageFolderDataModule:
    args = {"load_size": 32, "pipeline": "official", "batch_size": 2, "augment": RECIPE_AUGMENT, **kwargs}
    dm = ImageFolderDataModule(str(root), **args)
    dm.setup("fit")
    return dm


def test_training_items_are_the_per_image_transform_with_seeded_draws(tmp_path):
    dm = _module(_photo_folder(tmp_path / "imgs"))
    train = dm.datasets["train"]
    assert isinstance(train, PerImageFolder) and train.takes_epoch
    transform = train.transform
    assert transform == ImageNetTrainTransform(32, area_range=(0.08, 1.0), flip=True, randaugment_layers=4,
                                               randaugment_magnitude=5.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for index, epoch in [(0, 0), (3, 0), (3, 1), (5, 7)]:
        path, label = train.folder.samples[index]
        item = train[(index, epoch)]
        want = ImageNetTrainTransform(32)(path, generator=train.generator(index, epoch)).permute(1, 2, 0)
        assert item["inputs"].shape == (32, 32, 3) and item["inputs"].dtype == torch.float32
        assert torch.equal(item["inputs"], want) and int(item["target"]) == label
    assert not torch.equal(train[(3, 0)]["inputs"], train[(3, 1)]["inputs"])  # a new epoch, new draws
    assert torch.equal(train[3]["inputs"], train[(3, 0)]["inputs"])  # a plain index is epoch 0
    # batches arrive ready: transform_batch adds nothing, and no statistics were computed
    batch = {"inputs": item["inputs"][None], "target": item["target"][None]}
    assert dm.transform_batch(batch, train=True) is batch and dm.normalizer is None


def test_evaluation_uses_the_official_centre_crop(tmp_path):
    dm = _module(_photo_folder(tmp_path / "imgs"))
    val = dm.datasets["val"]
    assert isinstance(val.transform, ImageNetEvalTransform) and not val.takes_epoch
    for index in range(len(val)):
        path, _ = val.folder.samples[index]
        want = ImageNetEvalTransform(32)(path).permute(1, 2, 0)  # 224/256 crop, TF bicubic, ImageNet mean/std
        assert torch.equal(val[index]["inputs"], want)
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(batch["inputs"][0], ImageNetEvalTransform(32)(val.folder.samples[0][0]).permute(1, 2, 0))


def test_loader_draws_do_not_depend_on_workers(tmp_path):
    dm = _module(_photo_folder(tmp_path / "imgs"), num_workers=2)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochTaggedSampler)
    loader.sampler.set_epoch(2)
    order = list(loader.sampler)
    got = torch.cat([b["inputs"] for b in loader])
    train = dm.datasets["train"]
    want = torch.stack([train[key]["inputs"] for key in order[: got.shape[0]]])
    assert all(epoch == 2 for _, epoch in order) and torch.equal(got, want)


def test_held_out_split_and_normalize_off(tmp_path):
    root = _photo_folder(tmp_path / "imgs", per_class=4, splits=("",))
    dm = _module(root, val_fraction=0.25, normalize=False, augment=None)
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["val"]) == 2
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert not set(train.indices) & set(val.indices)
    # no augment: training images get the evaluation crop; normalize=False: values on the [0, 1] scale
    assert isinstance(train.transform, ImageNetEvalTransform)
    path = train.folder.samples[train.indices[0]][0]
    want = ImageNetEvalTransform(32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(path).permute(1, 2, 0)
    assert torch.equal(train[0]["inputs"], want) and -0.2 < float(want.min()) and float(want.max()) < 1.2


def test_batched_pipeline_is_unchanged(tmp_path):
    dm = ImageFolderDataModule(str(_photo_folder(tmp_path / "imgs")), load_size=32, center_crop=True, batch_size=2)
    dm.setup("fit")
    assert dm.pipeline == "batched" and dm.normalizer is not None
    assert type(dm.train_dataloader().sampler) is EpochShuffleSampler
    assert dm.datasets["train"][0]["inputs"].dtype == torch.uint8


def test_official_pipeline_refuses_what_it_cannot_do(tmp_path):
    root = str(_photo_folder(tmp_path / "imgs", per_class=1))
    with pytest.raises(DataError, match="pipeline must be 'batched' or 'official'"):
        ImageFolderDataModule(root, pipeline="tf")
    with pytest.raises(DataError, match="channels must be 3"):
        ImageFolderDataModule(root, pipeline="official", channels=1)
    with pytest.raises(DataError, match="zoom, rotate and translate"):
        ImageFolderDataModule(root, pipeline="official", augment=ImageAugment(rotate=10))
    with pytest.raises(DataError, match="image_size"):
        ImageFolderDataModule(root, pipeline="official", image_size=16)


def test_imagenet_recipe_selects_the_official_pipeline(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", "imagenet-perceiver-io", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    data = printed["data"]
    assert data["class_path"] == "perceivers.train.ImageFolderDataModule"
    assert data["init_args"]["pipeline"] == "official"
    # the recipe's data settings, on a small folder: the DeepMind transforms at 224
    recipe = yaml.safe_load((cli.RECIPE_DIR / "imagenet-perceiver-io.yaml").read_text())["data"]["init_args"]
    kwargs = {k: v for k, v in recipe.items() if k not in ("root", "augment")}
    kwargs.update(num_workers=0, batch_size=2, eval_batch_size=2)
    dm = ImageFolderDataModule(str(_photo_folder(tmp_path / "imgs", per_class=1)),
                               augment=ImageAugment(**recipe["augment"]), **kwargs)
    dm.setup("fit")
    assert dm.datasets["train"].transform == ImageNetTrainTransform(224)  # crop 0.08-1, flip, RandAugment 4/5
    assert dm.datasets["val"].transform == ImageNetEvalTransform(224)
    assert dm.datasets["train"][0]["inputs"].shape == (224, 224, 3)


def test_tiny_fit_with_the_official_pipeline(tmp_path, capsys):
    root = _photo_folder(tmp_path / "imgs", per_class=2)
    model = {**TINY_PERCEIVER, "init_args": {**TINY_PERCEIVER["init_args"], "input_channels": 3, "num_classes": 2}}
    data = {"class_path": "perceivers.train.ImageFolderDataModule",
            "init_args": {"root": str(root), "load_size": 16, "pipeline": "official", "batch_size": 2,
                          "augment": {"flip": True, "crop_scale": [0.08, 1.0], "crop_sampler": "tf",
                                      "randaugment_layers": 2, "randaugment_magnitude": 5}}}
    config = tiny_config(tmp_path / "run", model=model, data=data, trainer={"max_epochs": 2},
                         task={"mixup_alpha": 0.2, "cutmix_alpha": 1.0})
    assert cli.main(["fit", "--config", write_config(tmp_path / "official.yaml", config)]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1
    capsys.readouterr()


def test_mid_epoch_resume_draws_what_the_uninterrupted_run_drew(tmp_path):
    """Killed mid-epoch with a loader worker: the restarted worker draws each image's crop, flip and RandAugment
    from (seed, epoch, index), as the uninterrupted run's worker did, so the weights match exactly."""
    root = _photo_folder(tmp_path / "imgs", per_class=4)
    model = {**TINY_PERCEIVER, "init_args": {**TINY_PERCEIVER["init_args"], "input_channels": 3, "num_classes": 2}}
    data = {"class_path": "perceivers.train.ImageFolderDataModule",
            "init_args": {"root": str(root), "load_size": 16, "pipeline": "official", "batch_size": 2,
                          "num_workers": 1, "augment": {"crop_scale": [0.08, 1.0], "crop_sampler": "tf",
                                                        "randaugment_layers": 2, "randaugment_magnitude": 5}}}

    def config(name: str, callbacks: list | None = None) -> str:
        trainer = {"max_epochs": 2, "limit_train_batches": 4, **({"callbacks": callbacks} if callbacks else {})}
        settings = tiny_config(tmp_path / name, model=model, data=data, trainer=trainer,
                               task={"mixup_alpha": 0.2}, checkpoint={"every_n_train_steps": 2, "monitor": None},
                               plots={"attention": False, "learning_curves": False})
        return write_config(tmp_path / f"{name}-{len(callbacks or [])}.yaml", settings)

    crash = {"class_path": "train_helpers.CrashAt", "init_args": {"step": 7}}
    with pytest.raises(RuntimeError, match="CrashAt"):
        cli.main(["fit", "--config", config("run", [crash])])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 6  # mid-way through epoch 2
    assert cli.main(["fit", "--config", config("run"), "--resume", "true"]) == 0
    assert cli.main(["fit", "--config", config("whole")]) == 0
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == whole["global_step"] == 8
    for name, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
