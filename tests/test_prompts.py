"""Prompt extraction (Sec. 3.3, Eq. 7; docs/method.md §4) on hand-built maps."""

from __future__ import annotations

import numpy as np
import pytest

from clipsam_jax.refine.prompts import PAD_LABEL, extract_prompts


def _map(size: int, cells: list[tuple[int, int]], value: float = 0.9) -> np.ndarray:
    rough = np.zeros((size, size), dtype=np.float32)
    for r, c in cells:
        rough[r, c] = value
    return rough


def _diagonal_blobs() -> np.ndarray:
    """Two 2×2 blobs that touch only at a corner: (1..2, 1..2) and (3..4, 3..4)."""
    rough = np.zeros((8, 8), dtype=np.float32)
    rough[1:3, 1:3] = 0.9
    rough[3:5, 3:5] = 0.8
    return rough


def test_connectivity_8_joins_diagonal_blobs_4_does_not():
    rough = _diagonal_blobs()
    rng = np.random.default_rng(0)
    eight = extract_prompts(rough, 0.5, 3, (8, 8), rng, connectivity=8)
    four = extract_prompts(rough, 0.5, 3, (8, 8), rng, connectivity=4)
    assert eight.num_boxes == 1
    assert four.num_boxes == 2
    assert eight.components.max() == 1 and four.components.max() == 2
    # Image size = grid size: a box is [c0, r0, c1 + 1, r1 + 1].
    np.testing.assert_array_equal(eight.boxes, [[1, 1, 5, 5]])
    np.testing.assert_array_equal(four.boxes, [[1, 1, 3, 3], [3, 3, 5, 5]])


def test_threshold_is_strict_and_binary_matches():
    rough = np.array([[0.47, 0.48], [0.1, 0.9]], dtype=np.float32)
    p = extract_prompts(rough, 0.47, 2, (2, 2), np.random.default_rng(0))
    np.testing.assert_array_equal(p.binary, [[False, True], [False, True]])
    assert p.num_boxes == 1


def test_boxes_hand_computed_on_square_upscale():
    # Grid 4, image 16: 4 pixels per cell. Component at rows 1..2, col 3 → x 12..16, y 4..12.
    rough = _map(4, [(1, 3), (2, 3), (0, 0)])
    p = extract_prompts(rough, 0.5, 1, (16, 16), np.random.default_rng(0))
    assert p.num_boxes == 2
    # scipy labels in raster order: (0, 0) first.
    np.testing.assert_allclose(p.boxes, [[0, 0, 4, 4], [12, 4, 16, 12]])
    assert p.boxes.dtype == np.float32


def test_coordinate_mapping_non_square_image():
    # Grid 4×4 onto an image H=100, W=300: a cell is 75 px wide and 25 px high.
    rough = _map(4, [(2, 1), (2, 2), (3, 2)])
    p = extract_prompts(rough, 0.5, 3, (100, 300), np.random.default_rng(0))
    assert p.image_hw == (100, 300)
    # cols 1..2 → x0 = 1·75 = 75, x1 = 3·75 = 225; rows 2..3 → y0 = 2·25 = 50, y1 = 4·25 = 100.
    np.testing.assert_allclose(p.boxes, [[75, 50, 225, 100]])
    # All 3 anomalous cells are taken (m = 3); their centres, hand-computed:
    expected = {(112.5, 62.5), (187.5, 62.5), (187.5, 87.5)}
    got = {tuple(map(float, xy)) for xy in p.points[0]}
    assert got == expected


def test_points_inside_binary_mask_and_shared():
    rng = np.random.default_rng(1)
    rough = rng.random((20, 20)).astype(np.float32)
    p = extract_prompts(rough, 0.7, 5, (60, 40), rng)
    assert p.num_boxes > 1
    assert p.points.shape == (p.num_boxes, 5, 2)
    assert p.points.dtype == np.float32 and p.point_labels.dtype == np.int32
    np.testing.assert_array_equal(p.point_labels, 1)
    # Shared points: the same for every box (Sec. 3.3, "each box shares the same points").
    assert (p.points == p.points[:1]).all()
    # Back to grid cells: x / (W / S) and y / (H / S) floor to the cell, which must be set.
    cols = np.floor(p.points[..., 0] / (40 / 20)).astype(int)
    rows = np.floor(p.points[..., 1] / (60 / 20)).astype(int)
    assert p.binary[rows, cols].all()
    # Distinct points (no replacement).
    assert len({tuple(xy) for xy in p.points[0]}) == 5


def test_per_component_points_inside_their_component_and_padded():
    rough = np.zeros((10, 10), dtype=np.float32)
    rough[0:3, 0:3] = 0.9  # 9 cells
    rough[6, 6:8] = 0.9  # 2 cells: fewer than m = 4 → padded
    p = extract_prompts(rough, 0.5, 4, (10, 10), np.random.default_rng(0), per_component=True)
    assert p.points.shape == (2, 4, 2)
    np.testing.assert_array_equal(p.point_labels, [[1, 1, 1, 1], [1, 1, PAD_LABEL, PAD_LABEL]])
    for i in range(2):
        real = p.points[i][p.point_labels[i] == 1]
        cells = np.floor(real[:, ::-1]).astype(int)  # (x, y) → (row, col) at scale 1
        assert (p.components[cells[:, 0], cells[:, 1]] == i + 1).all()


def test_deterministic_given_seed():
    rough = np.random.default_rng(5).random((16, 16)).astype(np.float32)
    a = extract_prompts(rough, 0.6, 5, (32, 48), np.random.default_rng(42))
    b = extract_prompts(rough, 0.6, 5, (32, 48), np.random.default_rng(42))
    c = extract_prompts(rough, 0.6, 5, (32, 48), np.random.default_rng(43))
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.points, c.points)


def test_fewer_anomalous_pixels_than_m_takes_all():
    rough = _map(6, [(1, 1), (4, 4)])
    p = extract_prompts(rough, 0.5, 5, (6, 6), np.random.default_rng(0), connectivity=4)
    assert p.num_boxes == 2
    assert p.points.shape == (2, 2, 2)
    assert {tuple(map(float, xy)) for xy in p.points[0]} == {(1.5, 1.5), (4.5, 4.5)}


@pytest.mark.parametrize("per_component", [False, True])
def test_empty_map_gives_no_boxes(per_component):
    p = extract_prompts(
        np.zeros((8, 8)), 0.47, 5, (30, 40), np.random.default_rng(0), per_component=per_component
    )
    assert p.num_boxes == 0
    assert p.boxes.shape == (0, 4)
    assert p.points.shape[0] == 0 and p.points.shape[-1] == 2
    assert p.point_labels.shape[0] == 0
    assert not p.binary.any() and not p.components.any()


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="connectivity"):
        extract_prompts(np.zeros((4, 4)), 0.5, 1, (4, 4), rng, connectivity=6)
    with pytest.raises(ValueError, match="2-D"):
        extract_prompts(np.zeros((1, 4, 4)), 0.5, 1, (4, 4), rng)


# ---------------------------------------------------------------- the text prompts of CLIP
# (clipsam_jax.clip.prompts; added for the mutation score, benchmarks/mutation/README.md).
# Expected sentences written out by hand from the paper's Figure 7 (Appendix A), not built
# with the code under test.

_NORMAL_BY_HAND = (
    "{}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
)  # fmt: skip
_ANOMALOUS_BY_HAND = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
_CLIPSAM29_BY_HAND = (
    "a bad photo of a {}.", "a bad photo of the {}.",
    "a low resolution photo of a {}.", "a low resolution photo of the {}.",
    "a cropped photo of a {}.", "a cropped photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of a {}.", "a dark photo of the {}.",
    "a photo of a cool {}.", "a photo of the cool {}.",
    "a black and white photo of a {}.", "a black and white photo of the {}.",
    "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of a {}.", "a blurry photo of the {}.",
    "a photo of a {}.", "a photo of the {}.",
    "a photo of a large {}.", "a photo of the large {}.",
    "a photo of a small {}.", "a photo of the small {}.",
    "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.",
    "this is one {} in the scene.",
)  # fmt: skip
_APRILGAN_EXTRA_BY_HAND = (
    "a photo of my {}.", "a photo of one {}.",
    "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a good photo of a {}.", "a good photo of the {}.",
)  # fmt: skip


def test_clip_prompt_states_and_templates_written_out():
    from clipsam_jax.clip import prompts

    assert prompts.NORMAL_STATES == _NORMAL_BY_HAND
    assert prompts.ANOMALOUS_STATES == _ANOMALOUS_BY_HAND
    assert prompts.TEMPLATE_SETS == {
        "clipsam29": _CLIPSAM29_BY_HAND,
        "aprilgan35": _CLIPSAM29_BY_HAND + _APRILGAN_EXTRA_BY_HAND,
    }
    assert prompts.UNKNOWN_OBJECT == "object"


@pytest.mark.parametrize("templates", ["clipsam29", "aprilgan35"])
def test_build_sentences_states_times_templates_in_order(templates):
    from clipsam_jax.clip.prompts import build_sentences

    lines = _CLIPSAM29_BY_HAND + (_APRILGAN_EXTRA_BY_HAND if templates == "aprilgan35" else ())
    normal, anomalous = build_sentences("metal_nut", templates)
    # state-major order: all templates of the first state, then the next state ...
    assert normal == [t.replace("{}", s.replace("{}", "metal_nut"))
                      for s in _NORMAL_BY_HAND for t in lines]  # fmt: skip
    assert anomalous == [t.replace("{}", s.replace("{}", "metal_nut"))
                         for s in _ANOMALOUS_BY_HAND for t in lines]  # fmt: skip
    assert normal[1] == "a bad photo of the metal_nut."
    assert anomalous[-1] == (
        "this is one metal_nut with damage in the scene."
        if templates == "clipsam29"
        else "a good photo of the metal_nut with damage."
    )


def test_build_sentences_unknown_template_set():
    from clipsam_jax.clip.prompts import build_sentences

    with pytest.raises(ValueError) as info:
        build_sentences("bottle", "winclip")
    assert str(info.value) == (
        "unknown template set 'winclip'; choose from ['aprilgan35', 'clipsam29']"
    )


def test_object_name_modes():
    from clipsam_jax.clip.prompts import object_name

    assert object_name("metal_nut") == "metal_nut"
    assert object_name("metal_nut", "as_written") == "metal_nut"
    assert object_name("metal_nut", "spaced") == "metal nut"
    assert object_name("pipe_fryum_x", "spaced") == "pipe fryum x"
    assert object_name("metal_nut", "object") == "object"
    assert object_name(None, "spaced") == object_name("", "as_written") == "object"


class _FakeTokenizer:
    """Word-level ids; records the keyword arguments of each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, sentences, **kwargs):
        self.calls.append(kwargs)
        ids = [[1 + len(w) for w in s.split()] for s in sentences]
        if "max_length" not in kwargs:
            return {"input_ids": ids}
        length = kwargs["max_length"]
        padded = np.zeros((len(ids), length), np.int32)
        mask = np.zeros((len(ids), length), np.int32)
        for i, row in enumerate(ids):
            row = row[:length]
            padded[i, : len(row)], mask[i, : len(row)] = row, 1
        return {"input_ids": padded, "attention_mask": mask}


def _fake_clip(limit=77):
    from types import SimpleNamespace

    config = SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=limit))
    return SimpleNamespace(
        source="fake", fingerprint="fp", config=config, tokenizer=_FakeTokenizer(), params={}
    )


def _fake_embeddings(sentences):
    """A deterministic (N, 3) embedding per sentence: not unit length, different norms."""
    out = []
    for s in sentences:
        n = len(s)
        out.append([1.0 + n % 7, 2.0 * (n % 3) - 1.0, 0.5 + (n % 5)])
    return np.array(out, np.float64)


def _text_features(tmp_path, **kwargs):
    from clipsam_jax.clip.prompts import TextFeatures

    text = TextFeatures(_fake_clip(), cache_dir=tmp_path, **kwargs)
    text.calls = []

    def encode(params, input_ids, attention_mask):
        text.calls.append(input_ids.shape)
        raise AssertionError("replaced below")

    text._encode = encode
    text.encode_sentences = lambda sentences: (text.calls.append(len(sentences)),
                                               _fake_embeddings(sentences))[1]  # fmt: skip
    return text


@pytest.mark.parametrize("normalization", ["sentence_and_mean", "mean"])
def test_text_features_math_with_a_fake_encoder(tmp_path, normalization):
    from clipsam_jax.clip.prompts import build_sentences

    text = _text_features(tmp_path / normalization, normalization=normalization)
    got = text.features("bottle")
    # Independent numpy: (optionally) unit sentences, mean per group, unit mean; float32.
    normal, anomalous = build_sentences("bottle")
    rows = []
    for group in (normal, anomalous):
        e = _fake_embeddings(group)
        if normalization == "sentence_and_mean":
            e = e / np.sqrt((e**2).sum(axis=1, keepdims=True))
        mean = e.mean(axis=0)
        rows.append(mean / np.sqrt((mean**2).sum()))
    assert got.dtype == np.float32 and got.shape == (2, 3)
    np.testing.assert_allclose(got, np.array(rows), rtol=1e-6)
    assert text.calls == [len(normal) + len(anomalous)]  # one encoder call, both groups


def test_text_features_default_normalization_is_sentence_and_mean(tmp_path):
    default = _text_features(tmp_path / "a").features("bottle")
    both = _text_features(tmp_path / "b", normalization="sentence_and_mean").features("bottle")
    mean = _text_features(tmp_path / "c", normalization="mean").features("bottle")
    np.testing.assert_array_equal(default, both)
    assert not np.allclose(default, mean, atol=1e-4)


def test_text_features_object_mode_memory_and_disk_cache(tmp_path):
    import hashlib

    text = _text_features(tmp_path, object_mode="spaced")
    first = text.features("metal_nut")
    again = text.features("metal_nut")
    assert again is first and text.calls == [12 * 29]  # memory cache: no second encoding
    # "spaced": the sentences name "metal nut"; None → "object"
    spaced = _text_features(tmp_path / "x", use_disk_cache=False)
    np.testing.assert_array_equal(first, spaced.features("metal nut"))
    np.testing.assert_array_equal(text.batch([None])[0], spaced.features("object"))
    assert text.batch(["metal_nut", None]).shape == (2, 2, 3)
    # The disk cache: <cache>/text/<sha256(source|fingerprint|templates|norm)[:16]>/<sha(name)[:16]>.npy
    key = hashlib.sha256(b"fake|fp|clipsam29|sentence_and_mean").hexdigest()[:16]
    name = hashlib.sha256(b"metal nut").hexdigest()[:16]
    path = tmp_path / "text" / key / f"{name}.npy"
    assert path.is_file() and not path.with_suffix(".partial").exists()
    np.testing.assert_array_equal(np.load(path), first)
    reloaded = _text_features(tmp_path, object_mode="spaced")
    np.testing.assert_array_equal(reloaded.features("metal_nut"), first)
    assert reloaded.calls == []  # read from disk, not encoded
    other = _text_features(tmp_path, templates="aprilgan35", object_mode="spaced")
    other.features("metal_nut")
    assert other.calls == [12 * 35]  # another template set: another cache entry
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == sorted(
        [key, hashlib.sha256(b"fake|fp|aprilgan35|sentence_and_mean").hexdigest()[:16]]
    )


def test_text_features_without_disk_cache_writes_nothing(tmp_path):
    text = _text_features(tmp_path, use_disk_cache=False)
    text.features("bottle")
    assert not (tmp_path / "text").exists()


@pytest.mark.parametrize(("longest", "limit", "expected"),
                         [(15, 77, 16), (16, 77, 16), (17, 77, 32), (33, 77, 48), (70, 77, 77),
                          (20, 20, 20)])  # fmt: skip
def test_encode_sentences_pads_to_a_multiple_of_16_capped_at_the_limit(longest, limit, expected):
    from clipsam_jax.clip.prompts import TextFeatures

    clip = _fake_clip(limit)
    text = TextFeatures(clip, use_disk_cache=False)
    seen = []

    def encode(params, input_ids, attention_mask):
        seen.append((input_ids.copy(), attention_mask.copy()))
        return np.full((input_ids.shape[0], 2), 0.5, np.float32)

    text._encode = encode
    sentences = ["w " * longest, "w"]  # `longest` and 1 token(s)
    out = text.encode_sentences(sentences)
    assert out.shape == (2, 2) and out.dtype == np.float32
    call = clip.tokenizer.calls[-1]
    assert call == {"padding": "max_length", "max_length": expected, "truncation": True,
                    "return_tensors": "np"}  # fmt: skip
    ids, mask = seen[0]
    assert ids.shape == (2, expected)
    np.testing.assert_array_equal(mask.sum(axis=1), [min(longest, expected), 1])


# ---------------------------------------------------------------- SAM prompts: more edge cases
# (refine.prompts; added for the mutation score, benchmarks/mutation/README.md)


def test_non_square_grid_scales_rows_and_columns_separately():
    # Grid 2 rows × 4 columns onto an image H = 100, W = 40: a cell is 10 px wide, 50 px high.
    rough = np.zeros((2, 4), dtype=np.float32)
    rough[1, 2] = 0.9  # one cell: row 1, column 2
    p = extract_prompts(rough, 0.5, 1, (100, 40), np.random.default_rng(0))
    np.testing.assert_allclose(p.boxes, [[20, 50, 30, 100]])  # x 2·10..3·10, y 1·50..2·50
    np.testing.assert_allclose(p.points, [[[25, 75]]])  # centre (2.5·10, 1.5·50)


@pytest.mark.parametrize("per_component", [False, True])
def test_zero_points_gives_boxes_only(per_component):
    rough = _map(4, [(1, 1)])
    p = extract_prompts(
        rough, 0.5, 0, (8, 8), np.random.default_rng(0), per_component=per_component
    )
    np.testing.assert_allclose(p.boxes, [[2, 2, 4, 4]])
    assert p.points.shape == (1, 0, 2) and p.point_labels.shape == (1, 0)


@pytest.mark.parametrize("per_component", [False, True])
def test_empty_map_point_arrays_have_no_point_axis(per_component):
    # q = 0: both samplings give (0, 0, 2) points and (0, 0) labels
    p = extract_prompts(
        np.zeros((8, 8)), 0.5, 5, (30, 40), np.random.default_rng(0), per_component=per_component
    )
    assert p.points.shape == (0, 0, 2) and p.point_labels.shape == (0, 0)


def test_argument_errors_exact_messages():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError) as info:
        extract_prompts(np.zeros((4, 4)), 0.5, -1, (4, 4), rng)
    assert str(info.value) == "num_points must be >= 0, got -1"
    with pytest.raises(ValueError) as info:
        extract_prompts(np.zeros((4, 4)), 0.5, 1, (4, 4), rng, connectivity=6)
    assert str(info.value) == "connectivity must be 4 or 8, got 6"
    with pytest.raises(ValueError) as info:
        extract_prompts(np.zeros((1, 4, 4)), 0.5, 1, (4, 4), rng)
    assert str(info.value) == "rough_map must be 2-D (S, S), got shape (1, 4, 4)"


def test_prompts_are_frozen():
    import dataclasses

    p = extract_prompts(_map(4, [(1, 1)]), 0.5, 1, (4, 4), np.random.default_rng(0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.boxes = np.zeros((0, 4), np.float32)
