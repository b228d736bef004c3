"""Prompt extraction (Sec. 3.3, Eq. 7; SPEC §4) on hand-built maps."""

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
