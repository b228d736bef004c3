"""Batch pipeline: contents, deterministic order, resume, ragged batches, errors, mosaic."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from clipsam_jax.data.image_io import (
    normalize,
    preprocess,
    read_image,
    read_mask,
    resize_mask,
    resize_rgb,
)
from clipsam_jax.data.pipeline import BatchLoader, load_mosaic, load_sample
from clipsam_jax.data.registry import load_dataset
from clipsam_jax.data.synthetic import generate
from clipsam_jax.errors import ImageReadError

S = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate("mvtec", tmp_path_factory.mktemp("mvtec"), images_per_class=3, image_size=48)


@pytest.fixture(scope="module")
def samples(root):
    """All test samples of the synthetic MVTec data: 4 classes, 21 images."""
    return [s for v in load_dataset("mvtec", root).values() for s in v]


def _indices(loader) -> list[list[int]]:
    return [batch["indices"].tolist() for batch in loader]


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def test_batch_contents(samples):
    loader = BatchLoader(samples, S, 4, keep_rgb=True, num_workers=2)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, S, S, 3) and batch["images"].dtype == np.float32
    assert batch["masks"].shape == (4, S, S) and batch["masks"].dtype == bool
    assert batch["indices"].tolist() == [0, 1, 2, 3]
    assert batch["original_sizes"].shape == (4, 2)
    assert len(batch["class_names"]) == len(batch["paths"]) == len(batch["rgb"]) == 4
    for k, i in enumerate(batch["indices"]):
        sample = samples[i]
        rgb = read_image(sample.image_path)
        assert np.array_equal(batch["rgb"][k], rgb)
        assert tuple(batch["original_sizes"][k]) == rgb.shape[:2]
        assert np.array_equal(batch["images"][k], preprocess(rgb, S))
        assert batch["paths"][k] == str(sample.image_path)
        assert batch["labels"][k] == sample.label
        if sample.mask_path is None:
            assert not batch["masks"][k].any()
        else:
            expected = resize_mask(read_mask(sample.mask_path), S)
            assert np.array_equal(batch["masks"][k], expected) and expected.any()
    assert not batch["mosaic"].any()


@pytest.mark.parametrize("mosaic_prob", [0.0, 1.0])
def test_unnormalized_batches_are_the_resized_uint8_images(samples, mosaic_prob):
    """normalized=False (evaluation: the model normalizes on the device) hands out the uint8
    images that `normalize` turns exactly into the default batches; everything else is equal."""
    kwargs = dict(num_workers=2, mosaic_prob=mosaic_prob, seed=3)
    floats = list(BatchLoader(samples, S, 4, **kwargs))
    raw = list(BatchLoader(samples, S, 4, normalized=False, **kwargs))
    assert len(raw) == len(floats)
    for a, b in zip(raw, floats):
        assert a["images"].dtype == np.uint8 and a["images"].shape == b["images"].shape
        np.testing.assert_array_equal(normalize(a["images"]), b["images"])
        np.testing.assert_array_equal(a["masks"], b["masks"])
        assert a["indices"].tolist() == b["indices"].tolist()
    if not mosaic_prob:
        first = read_image(samples[0].image_path)
        np.testing.assert_array_equal(raw[0]["images"][0], resize_rgb(first, S))


def test_load_sample_normal_image_has_empty_mask(samples):
    normal = next(s for s in samples if s.label == 0)
    item = load_sample(normal, S)
    assert item["image"].shape == (S, S, 3) and not item["mask"].any()
    assert "rgb" not in item


def test_order_is_deterministic_and_changes_with_epoch(samples):
    def order(epoch, seed=3):
        return _indices(BatchLoader(samples, S, 5, shuffle=True, seed=seed, epoch=epoch))

    first = order(0)
    assert first == order(0)
    expected = np.random.default_rng([3, 0]).permutation(len(samples))
    assert _flat(first) == expected.tolist()
    assert order(1) != first and sorted(_flat(order(1))) == list(range(len(samples)))
    assert order(0, seed=4) != first
    assert _flat(_indices(BatchLoader(samples, S, 5))) == list(range(len(samples)))


@pytest.mark.parametrize("mosaic_prob", [0.0, 0.5])
def test_skip_batches_equals_dropping_the_first_batches(samples, mosaic_prob):
    args = dict(shuffle=True, seed=1, epoch=2, mosaic_prob=mosaic_prob)
    full = list(BatchLoader(samples, S, 4, **args))
    resumed = BatchLoader(samples, S, 4, skip_batches=2, **args)
    assert len(resumed) == len(full) - 2
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for a, b in zip(full[2:], rest):
        assert a["indices"].tolist() == b["indices"].tolist()
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["masks"], b["masks"])
        assert np.array_equal(a["mosaic"], b["mosaic"])
    assert list(BatchLoader(samples, S, 4, skip_batches=99)) == []


@pytest.mark.parametrize("mosaic_prob", [0.0, 0.5])
def test_rows_are_a_processes_share_of_each_batch(samples, mosaic_prob):
    """rows=(start, stop): those rows of every batch, as the whole batch has them (a mosaic
    too: it is drawn by position); a batch whose share is empty is left out."""
    args = dict(shuffle=True, seed=3, epoch=1, mosaic_prob=mosaic_prob)
    full = list(BatchLoader(samples, S, 8, **args))  # 21 images: 8, 8, 5
    share = list(BatchLoader(samples, S, 8, rows=(6, 8), **args))
    assert [len(b["indices"]) for b in share] == [2, 2]  # the last batch has no rows 6, 7
    for whole, part in zip(full, share):
        assert part["indices"].tolist() == whole["indices"][6:8].tolist()
        assert np.array_equal(part["images"], whole["images"][6:8])
        assert np.array_equal(part["mosaic"], whole["mosaic"][6:8])


def test_ragged_last_batch_and_drop_last(samples):
    n = len(samples)  # 21
    loader = BatchLoader(samples, S, 8, num_workers=1)
    assert len(loader) == loader.num_batches == 3
    assert [len(i) for i in _indices(loader)] == [8, 8, n - 16]
    last = list(loader)[-1]
    assert last["images"].shape[0] == n - 16 and last["original_sizes"].shape == (n - 16, 2)
    dropped = BatchLoader(samples, S, 8, drop_last=True)
    assert len(dropped) == 2 and [len(i) for i in _indices(dropped)] == [8, 8]


def test_threads_and_synchronous_decoding_agree(samples):
    args = dict(shuffle=True, seed=0, mosaic_prob=0.3)
    threaded = list(BatchLoader(samples, S, 6, num_workers=3, prefetch=1, **args))
    inline = list(BatchLoader(samples, S, 6, num_workers=0, **args))
    for a, b in zip(threaded, inline, strict=True):
        assert a["indices"].tolist() == b["indices"].tolist()
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["masks"], b["masks"])


def test_worker_error_reaches_the_consumer_naming_the_file(root, tmp_path):
    copy = Path(shutil.copytree(root, tmp_path / "m"))
    broken = copy / "grid/test/good/002.png"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated PNG
    samples = [s for v in load_dataset("mvtec", copy).values() for s in v]
    for workers in (0, 2):
        with pytest.raises(ImageReadError) as info:
            list(BatchLoader(samples, S, 4, num_workers=workers))
        assert str(broken) in str(info.value)


def test_stopping_early_does_not_hang(samples):
    loader = BatchLoader(samples, S, 2, num_workers=2, prefetch=3)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    assert _indices(loader)[0] == [0, 1]  # a fresh iteration starts over


def test_mosaic_is_deterministic_and_combines_one_class(samples):
    loader = BatchLoader(samples, S, 7, shuffle=True, seed=2, mosaic_prob=1.0)
    first, again = list(loader), list(loader)
    for a, b in zip(first, again):
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["masks"], b["masks"])
    batch = first[0]
    assert batch["mosaic"].all() and batch["images"].shape == (7, S, S, 3)
    assert np.array_equal(batch["labels"], batch["masks"].any(axis=(1, 2)))
    # A mosaic of four copies of one anomalous image repeats its mask in each quadrant.
    anomalous = next(s for s in samples if s.label)
    item = load_mosaic([anomalous] * 4, S)
    tile = resize_mask(read_mask(anomalous.mask_path), S // 2)
    assert np.array_equal(item["mask"], np.tile(tile, (2, 2)))
    odd = load_mosaic([anomalous] * 4, S + 1, keep_rgb=True)
    assert odd["image"].shape == (S + 1, S + 1, 3) and odd["rgb"].shape == (S + 1, S + 1, 3)


def test_invalid_arguments(samples):
    with pytest.raises(ValueError):
        BatchLoader(samples, S, 0)
    with pytest.raises(ValueError):
        BatchLoader(samples, S, 2, mosaic_prob=1.5)
    assert list(BatchLoader([], S, 2)) == []


@pytest.mark.parametrize("orientation", [3, 6])
def test_mask_follows_its_exif_turned_image(tmp_path, orientation):
    """An image with an EXIF orientation tag is read turned as displayed; its mask, drawn on the
    stored pixels without a tag of its own, is turned alike, so the two stay aligned."""
    from PIL import Image

    from clipsam_jax.data.pipeline import decode_sample
    from clipsam_jax.data.types import Sample

    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:5, :5] = 255  # a bright corner, and the mask marks exactly it
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation  # 3: turned 180°, 6: turned 90° clockwise
    image.save(tmp_path / "part.png", exif=exif)
    Image.fromarray(stored[..., 0]).save(tmp_path / "part_mask.png")
    rgb, mask = decode_sample(
        Sample(tmp_path / "part.png", tmp_path / "part_mask.png", "x", "d", 1)
    )
    assert rgb.shape[:2] == mask.shape == ((20, 30) if orientation == 3 else (30, 20))
    np.testing.assert_array_equal(rgb[..., 0] > 128, mask)
    assert not mask[:5, :5].any()  # turned: the corner is no longer at the top left
