import numpy as np
import pytest
import torch

from steelray import config, model_io, models, presets, train, train_data
from steelray.models import ModelError


def cfg_for(*overrides):
    return config.load(None, list(overrides))


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "mobilenetv3_large_100", "simple_cnn"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_classifiers_build_and_run(name, in_chans):
    cfg = cfg_for(f"model.name={name}", f"data.in_chans={in_chans}", "task=multilabel", "model.dropout=0.3")
    model = models.build_model(cfg, 4).eval()
    assert model(torch.zeros(2, in_chans, 64, 96)).shape == (2, 4)
    assert len(models.preprocess_for(cfg).mean) == in_chans


def test_binary_has_one_output():
    assert models.build_model(cfg_for("model.name=simple_cnn", "task=binary"), 4)(torch.zeros(1, 1, 32, 32)).shape == (1, 1)


@pytest.mark.parametrize("arch", ["unet", "fpn"])
def test_segmenters_give_one_mask_channel_per_class(arch):
    cfg = cfg_for("task=segmentation", f"model.arch={arch}", "model.name=resnet18")
    assert models.build_model(cfg, 4).eval()(torch.zeros(1, 1, 64, 128)).shape == (1, 4, 64, 128)


@pytest.mark.parametrize("name, n", [("resnet18", 2), ("efficientnet_b0", 3), ("simple_cnn", 1)])
def test_freeze_stages_freezes_the_front_and_keeps_the_head(name, n):
    model = models.build_model(cfg_for(f"model.name={name}", f"model.freeze_stages={n}", "task=multiclass"), 6)
    flags = [p.requires_grad for p in model.parameters()]
    assert not flags[0] and flags[-1]                      # stem frozen, classifier trainable
    assert flags == sorted(flags)                          # frozen ones all come first
    fewer = models.build_model(cfg_for(f"model.name={name}", f"model.freeze_stages={n - 1}", "task=multiclass"), 6)
    assert sum(not p.requires_grad for p in fewer.parameters()) < flags.count(False)


def test_freeze_more_stages_than_the_model_has():
    with pytest.raises(ModelError, match="simple_cnn has 4 stages, got 5"):
        models.build_model(cfg_for("model.name=simple_cnn", "model.freeze_stages=5"), 4)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ModelError, match="'resnet5000' is not a timm model"):
        models.build_model(cfg_for("model.name=resnet5000"), 4)


def test_pretrained_from_a_weights_file_local_and_s3(tmp_path, bucket):
    """The offline-cluster path: pretrained weights from a file instead of the hub."""
    import s3fs
    from safetensors.torch import save_file

    source = models.build_model(cfg_for("model.name=resnet18", "task=multiclass", "data.in_chans=3"), 1000)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    s3fs.S3FileSystem().put(str(path), f"{bucket}/weights/resnet18.safetensors")
    for uri in (str(path), f"{bucket}/weights/resnet18.safetensors"):
        model = models.build_model(cfg_for("model.name=resnet18", "task=multiclass", "data.in_chans=3",
                                           "model.pretrained=true", f"model.weights={uri}"), 6)
        assert torch.equal(model.conv1.weight, source.conv1.weight)   # loaded, not a fresh init
        assert model.fc.out_features == 6                             # new head for our classes


def test_pretrained_without_hub_or_file_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported ...
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # ... which may have happened
    with pytest.raises(ModelError, match="could not download resnet18 weights.*set model.weights"):
        models.build_model(cfg_for("model.name=resnet18", "model.pretrained=true"), 4)
    with pytest.raises(ModelError, match="model.weights: .*missing.pt not found"):
        models.build_model(cfg_for("model.name=resnet18", "model.pretrained=true",
                                   f"model.weights={tmp_path / 'missing.pt'}"), 4)


@pytest.mark.parametrize("preset", ["strong", "robust"])
def test_augmentation_moves_masks_with_the_image(preset):
    pre = model_io.Preprocess((64, 64), (48, 48), 1, (0.5,), (0.25,))
    pipeline = presets.build(pre, preset)
    image = np.full((64, 64, 1), 60, np.uint8)
    mask = np.zeros((64, 64, 2), np.uint8)
    image[10:30, 5:25] = 220
    mask[10:30, 5:25, 1] = 1
    compared = 0
    for seed in range(20):
        presets.reseed(pipeline, seed)  # albumentations draws from its own generator, not np.random's
        out = pipeline(image=image, mask=mask)
        x, m = out["image"][..., 0].astype(float), out["mask"][..., 1].astype(bool)
        assert out["image"].shape == (48, 48, 1) and out["mask"].shape == (48, 48, 2)
        # robust's under-exposure blacks the bright square out in ~4% of draws: nothing to compare then
        if m.any() and (~m).any() and x[m].max() >= 32:
            assert x[m].mean() > x[~m].mean() + 1.0, f"draw {seed}: the mask did not move with the image"
            compared += 1
    assert compared >= 10


def test_turns_off_keeps_the_rolling_direction():
    pre = model_io.Preprocess((32, 32), None, 1, (0.5,), (0.25,))
    image = np.full((32, 32, 1), 40, np.uint8)
    image[:, 8:12] = 220  # a streak along the rolling direction (top to bottom)
    for turns, expect in ((False, {"along"}), (True, {"along", "across"})):
        pipeline, seen = presets.build(pre, "medium", turns), set()
        for seed in range(30):
            presets.reseed(pipeline, seed)
            x = pipeline(image=image)["image"][..., 0].astype(float)
            seen.add("along" if x.mean(axis=0).std() > x.mean(axis=1).std() else "across")
        assert seen == expect, f"turns={turns}: saw the streak {seen}"


def test_training_augmentations_follow_train_seed_and_differ_per_loader_process(tmp_path):
    """The same seed draws the same augmentations (a rerun of a fold trains on the same images); each
    DataLoader process draws its own (forked copies of one random state would repeat each other)."""
    import cv2
    from torch.utils.data import DataLoader

    cv2.imwrite(str(tmp_path / "a.png"), np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8))
    records = [{"image_id": "a.png", "uri": str(tmp_path / "a.png"), "target": 0, "rles": None}] * 8
    pre = model_io.Preprocess((32, 32), None, 1, (0.5,), (0.25,))

    def draws(seed, workers=0, init=train_data.seed_worker):
        torch.manual_seed(seed)
        ds = train_data.SheetDataset(records, "multiclass", pre, "robust", train=True, seed=seed)
        loader = DataLoader(ds, batch_size=4, num_workers=workers, worker_init_fn=init if workers else None)
        return [x for x, _ in loader]  # worker k makes batch k

    import albumentations as A

    flips = A.Compose([A.HorizontalFlip(), A.VerticalFlip()])
    presets.reseed(flips, 0)  # one stream: the two flips draw independently (Compose(seed=0): together)
    corner = {int(flips(image=np.arange(16, dtype=np.uint8).reshape(4, 4, 1))["image"][0, 0, 0]) for _ in range(64)}
    assert corner == {0, 3, 12, 15}, f"seeded flips draw together: top-left pixel only ever {corner}"

    same, other = draws(3), draws(4)
    assert all(torch.equal(a, b) for a, b in zip(same, draws(3)))
    assert not all(torch.equal(a, b) for a, b in zip(same, other))
    forked = draws(3, workers=2)
    assert not torch.equal(*forked), "two loader processes drew the same augmentations"
    assert all(torch.equal(a, b) for a, b in zip(forked, draws(3, workers=2)))
    assert torch.equal(*draws(3, workers=2, init=None))  # what seed_worker is there for


@pytest.mark.parametrize("normalize", ["dataset", "image"])
def test_model_input_normalises_as_albumentations_does(normalize):
    """``model_io.model_input`` (training, evaluation and scoring, on the device) against
    albumentations' Normalize on one image at a time: the standard definition, written elsewhere."""
    import albumentations as A
    import torch

    pre = model_io.Preprocess((40, 56), None, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), normalize)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    images[1] = images[1] // 4 + 100  # a dim, low-contrast one
    reference = (A.Normalize(normalization="image") if normalize == "image"
                 else A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0))
    batch = model_io.model_input(torch.from_numpy(images).permute(0, 3, 1, 2), pre).numpy()
    one_by_one = np.stack([reference(image=im)["image"].transpose(2, 0, 1) for im in images])
    assert np.allclose(batch, one_by_one, atol=1e-5)
    if normalize == "image":  # each image comes out at zero mean and unit std, whatever its lighting
        assert np.allclose(batch.mean(axis=(1, 2, 3)), 0, atol=1e-4) and np.allclose(batch.std(axis=(1, 2, 3)), 1, atol=1e-3)


def test_image_normalisation_removes_a_brightness_and_contrast_change():

    pre = model_io.Preprocess((32, 32), None, 1, (0.5,), (0.25,), "image")
    image = np.random.default_rng(1).integers(60, 180, (32, 32, 1), dtype=np.uint8)
    darker = (image.astype(np.float32) * 0.7 + 20).round().astype(np.uint8)  # no clipping: exact up to rounding
    a, b = (model_io.model_input(model_io.to_chw(im)[None], pre).numpy() for im in (image, darker))
    assert np.abs(a - b).max() < 0.05
    assert model_io.Preprocess.from_dict({k: v for k, v in pre.to_dict().items() if k != "normalize"}).normalize == "dataset"
    assert model_io.Preprocess.from_dict(pre.to_dict()) == pre


def test_centred_normalisation_removes_stray_light_and_keeps_contrast():
    """``normalize: center``: each image's own mean off, the fixed std kept. Stray light (an offset)
    vanishes; a contrast change (dimming) stays, as it does for a dataset-normalised model."""
    pre = model_io.Preprocess((32, 32), None, 1, (0.5,), (0.25,), "center")
    image = np.random.default_rng(2).integers(40, 160, (32, 32, 1), dtype=np.uint8)
    glare = (image.astype(np.float32) + 70).astype(np.uint8)  # stray light, no clipping
    dim = (image.astype(np.float32) * 0.7).round().astype(np.uint8)
    a, b, c = (model_io.model_input(model_io.to_chw(im)[None], pre).numpy() for im in (image, glare, dim))
    assert np.abs(a - b).max() < 1e-4
    assert np.allclose(a, (image.transpose(2, 0, 1)[None] - image.mean()) / (0.25 * 255), atol=1e-5)
    assert np.allclose(c, 0.7 * a, atol=0.01)  # the model still sees the sheet's contrast fall
    dataset = model_io.Preprocess((32, 32), None, 1, (0.5,), (0.25,), "dataset")
    d, e = (model_io.model_input(model_io.to_chw(im)[None], dataset).numpy() for im in (image, glare))
    assert np.abs(d - e).min() > 1  # where a fixed mean leaves the whole image shifted


def test_equalisation_ranks_each_pixel_in_its_image_whatever_the_exposure():
    """``normalize: equalize``: each pixel to the share of its image's pixels darker than it (scipy's
    rank, the standard definition), centred and scaled. A rising map of the grey levels (brighter,
    dimmer, flatter) changes nothing; clipping the shadows to black changes only the clipped pixels,
    which go to the image's darkest value."""
    from scipy.stats import rankdata

    pre = model_io.Preprocess((32, 32), None, 1, (0.5,), (0.25,), "equalize")
    image = np.random.default_rng(3).integers(0, 128, (32, 32, 1), dtype=np.uint8)
    brighter = image * 2 + 1                    # a rising map that merges no grey levels
    crushed = np.where(image >= 64, image, 0).astype(np.uint8)  # every pixel under 64 clipped to black
    a, b, c = (model_io.model_input(model_io.to_chw(im)[None], pre).numpy() for im in (image, brighter, crushed))
    below = (rankdata(image.ravel(), method="min") - 1) / image.size
    assert np.allclose(a.ravel(), (below - 0.5) * 12 ** 0.5, atol=1e-5)
    assert np.array_equal(a, b)
    lit = image.transpose(2, 0, 1)[None] >= 64
    assert np.array_equal(a[lit], c[lit]) and np.allclose(c[~lit], -(3 ** 0.5))
    assert not np.allclose(a[~lit], c[~lit])
    ramp = model_io.model_input(model_io.to_chw(np.arange(256, dtype=np.uint8).reshape(16, 16, 1))[None], pre)
    assert abs(float(ramp.mean())) < 0.01 and abs(float(ramp.std()) - 1) < 0.01  # on the scale of the others


def test_an_unknown_normalisation_is_refused_not_taken_for_dataset():
    """A checkpoint whose preprocess names a normalisation this steelray lacks (a newer one wrote it)
    is refused, naming it, rather than scored with the dataset's mean and std."""
    meta = model_io.Preprocess((32, 32), None, 1, (0.5,), (0.25,), "center").to_dict()
    with pytest.raises(ValueError, match="'percentile'.*dataset, image, center"):
        model_io.Preprocess.from_dict({**meta, "normalize": "percentile"})
    from typing import get_args, get_type_hints

    assert set(get_args(get_type_hints(config.InputConfig)["normalize"])) == set(model_io.NORMALIZATIONS)


def test_resize_then_model_input():
    import cv2

    pre = model_io.Preprocess((32, 64), None, 1, (0.5,), (0.25,))
    image = np.random.default_rng(2).integers(0, 256, (64, 128, 1), dtype=np.uint8)
    small = model_io.resize(image, pre.size)
    assert small.shape == (32, 64, 1) and small.dtype == np.uint8
    assert (small[..., 0] == cv2.resize(image, (64, 32), interpolation=cv2.INTER_LINEAR)).all()
    x = model_io.model_input(model_io.to_chw(np.full((32, 64, 1), 255, np.uint8))[None], pre)
    assert x.shape == (1, 1, 32, 64) and np.allclose(x.numpy(), (1 - 0.5) / 0.25)


def test_an_image_decoded_at_the_model_size_reaches_the_model_as_its_own_copy():
    """PIL lends decoded pixels read-only; at the model's own size nothing resizes them, so the
    tensor must not share (and write through to) that memory."""
    import io

    from PIL import Image

    from steelray import images

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 40), dtype=np.uint8)).save(buf, "JPEG")
    image = model_io.resize(images.decode_image(buf.getvalue(), 1), (40, 40))
    before = image.copy()
    t = model_io.to_chw(image)
    t += 1
    assert (image == before).all() and (t.numpy()[0] == before[..., 0] + 1).all()


def test_warmup_then_cosine():
    f = [train.lr_factor(s, 100, 10, True) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01
    assert train.lr_factor(50, 100, 0, False) == 1.0


def test_sharded_sampler_splits_an_epoch_across_ranks():
    shards = [list(train_data.ShardedSampler(10, r, 3, seed=1)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    assert set(sum(shards, [])) == set(range(10))
    again = list(train_data.ShardedSampler(10, 0, 3, seed=1))
    assert again == shards[0]
    s = train_data.ShardedSampler(10, 0, 3, seed=1)
    s.set_epoch(1)
    assert list(s) != shards[0]


def test_imbalance_weights():
    pos = train_data.imbalance_weights("multilabel", np.array([[1, 0], [0, 0], [0, 0], [0, 1]]), 2)
    assert pos.tolist() == [3.0, 3.0]
    cls = train_data.imbalance_weights("multiclass", np.array([0, 0, 0, 1]), 2)
    assert cls[1] > cls[0]
    w = train_data.sample_weights("multiclass", np.array([0, 0, 0, 1]))
    assert w[3] == pytest.approx(3 * w[0])


def test_label_smoothing_softens_the_multiclass_loss():
    logits, y = torch.tensor([[8.0, 0.0, 0.0]]), torch.tensor([0])
    hard = train.make_loss("multiclass", None)(logits, y)
    soft = train.make_loss("multiclass", None, cfg_for("train.label_smoothing=0.1").train.label_smoothing)(logits, y)
    assert soft > hard + 0.1   # a confident right answer is still penalised towards the smoothed target
    with pytest.raises(config.ConfigError, match="label_smoothing"):
        cfg_for("train.label_smoothing=0.9")


def test_mixup_blends_image_pairs_and_their_labels():
    assert train.make_mixup(cfg_for("task=multiclass"), 3) is None
    np.random.seed(0)
    mix = train.make_mixup(cfg_for("task=multiclass", "train.mixup=1.0"), 3)
    x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    mixed, target = mix(x.clone(), torch.tensor([0, 2]))
    lam = float(target[0, 0])  # image 0 keeps lam of itself and takes 1 - lam of image 1 (its reverse)
    assert 0 < lam < 1 and torch.allclose(target.sum(1), torch.ones(2))
    assert torch.allclose(target, torch.tensor([[lam, 0, 1 - lam], [1 - lam, 0, lam]]))
    assert torch.allclose(mixed[0], torch.full((1, 4, 4), 1 - lam))
    loss = train.make_loss("multiclass", None, 0.1)(torch.randn(2, 3), target)  # probabilities are taken as such
    assert torch.isfinite(loss)
    # and in the epoch loop: a pair of uint8 images and labels through train_epoch, mixed there
    cfg = cfg_for("task=multiclass", "model.name=simple_cnn", "train.mixup=1.0", "input.size=[16,16]")
    model = models.build_model(cfg, 3)
    seen = []
    loss_fn = lambda logits, y: (seen.append(y), train.make_loss("multiclass", None)(logits, y))[1]  # noqa: E731
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = (torch.randint(0, 255, (2, 1, 16, 16), dtype=torch.uint8), torch.tensor([0, 2]))
    train.train_epoch(model, [batch], loss_fn, optimizer, scheduler, cfg, models.preprocess_for(cfg),
                      torch.device("cpu"), False, train.make_mixup(cfg, 3))
    assert seen[0].shape == (2, 3) and seen[0][0, 1] == 0 and 0 < seen[0][0, 0] < 1
    with pytest.raises(config.ConfigError, match="train.mixup"):
        cfg_for("task=binary", "train.cutmix=1.0")


def test_underexposure_share_and_depth_reach_the_robust_preset():
    """``input.underexposure`` (share of images) and ``input.underexposure_depth`` (how dark) reach
    the robust preset through the config and the training dataset: more of either, more black."""
    pre = model_io.Preprocess((32, 32), None, 1, (0.5,), (0.25,))
    image = np.random.default_rng(0).integers(100, 161, (32, 32, 1), dtype=np.uint8)  # mid grey

    def black(share, depth):
        pipeline = presets.build(pre, "robust", seed=0, dark=(share, depth))
        return float(np.mean([(pipeline(image=image)["image"] == 0).mean() for _ in range(300)]))

    none, default, share, deep = black(0.0, 0.4), black(0.4, 0.4), black(1.0, 0.4), black(1.0, 0.9)
    assert none < 0.02 < default < share < deep, (none, default, share, deep)
    assert presets.underexposure(0.4).transforms[0].brightness_limit == (-0.4, -0.1)  # as before the knob

    cfg = config.load(None, ["input.augment=robust", "input.underexposure=1", "input.underexposure_depth=0.9"])
    assert (cfg.input.underexposure, cfg.input.underexposure_depth) == (1.0, 0.9)
    with pytest.raises(config.ConfigError, match="input.underexposure"):
        config.load(None, ["input.underexposure=1.5"])
    ds = train_data.SheetDataset([], "multiclass", pre, "robust", train=True, seed=0,
                                 dark=(cfg.input.underexposure, cfg.input.underexposure_depth))
    made = presets.build(pre, "robust", seed=0, dark=(1.0, 0.9))
    assert str(ds.transform) == str(made) != str(presets.build(pre, "robust", seed=0))


def test_the_dark_preset_under_exposes_every_image_then_draws_medium():
    pre = model_io.Preprocess((32, 32), None, 1, (0.5,), (0.25,))
    image = np.random.default_rng(0).integers(100, 161, (32, 32, 1), dtype=np.uint8)  # mid grey
    dark = presets.build(pre, "dark", seed=0, dark=(0.0, 0.45))  # the share is the robust preset's: not used
    medium = presets.build(pre, "medium", seed=0)
    means = {name: np.mean([float(p(image=image)["image"].mean()) for _ in range(200)])
             for name, p in (("dark", dark), ("medium", medium))}
    assert means["dark"] < means["medium"] - 30, means  # under-exposed whatever medium draws after
    names = [type(t).__name__ for t in dark.transforms]
    assert names[0] == "OneOf" and names[1:] == [type(t).__name__ for t in presets.build(pre, "medium").transforms]
    assert dark.transforms[0].transforms[0].brightness_limit == (-0.45, -0.15)
    assert config.load(None, ["input.augment=dark"]).input.augment == "dark"
