"""Point and box prompts for SAM from the CLIP-stage rough map (Sec. 3.3, Eq. 7; docs/method.md §4).

The rough map lives on the model grid (S×S); SAM works in the original image's pixels. Boxes
and points are therefore mapped from grid cells to image pixels here, so the refiner only has
to apply SAM's own resize transform.

Numpy/scipy only: this module must import without torch or jax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# scipy.ndimage structuring elements: 4-connectivity = edge neighbours only, 8 adds diagonals.
_STRUCTURES = {
    4: ndimage.generate_binary_structure(2, 1),
    8: ndimage.generate_binary_structure(2, 2),
}

# SAM's label for "no point here" (its prompt encoder pads with it); used to pad ragged
# per-component point sets so that every box of an image can go into one batched call.
PAD_LABEL = -1


@dataclass(frozen=True)
class Prompts:
    """SAM prompts of one image, in original-image pixel coordinates.

    Attributes:
      boxes: float32 (q, 4), XYXY `[x0, y0, x1, y1]`, one per connected component.
      points: float32 (q, m', 2), `(x, y)` per box. Shared sampling repeats the same m' points
        for every box; per-component sampling pads short components with label `PAD_LABEL`.
      point_labels: int32 (q, m'), 1 = foreground point, `PAD_LABEL` (-1) = padding.
      components: int32 (S, S) component label map on the grid (0 = background, i+1 = box i).
      binary: bool (S, S), the binarized rough map (Eq. 7).
      image_hw: (H, W) of the image the coordinates refer to.
    """

    boxes: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray
    components: np.ndarray
    binary: np.ndarray
    image_hw: tuple[int, int]

    @property
    def num_boxes(self) -> int:
        """q, the number of boxes (= connected components)."""
        return int(self.boxes.shape[0])

    def select(self, index: np.ndarray | slice) -> Prompts:
        """The prompts of a subset of boxes (components/binary are kept whole)."""
        return Prompts(
            boxes=self.boxes[index],
            points=self.points[index],
            point_labels=self.point_labels[index],
            components=self.components,
            binary=self.binary,
            image_hw=self.image_hw,
        )


def extract_prompts(
    rough_map: np.ndarray,
    threshold: float,
    num_points: int,
    image_hw: tuple[int, int],
    rng: np.random.Generator,
    connectivity: int = 8,
    per_component: bool = False,
) -> Prompts:
    """Binarize the rough map, find its components, and build SAM box and point prompts.

    Args:
      rough_map: float (S, S) anomaly map in [0, 1] on the model grid (a non-square (Sh, Sw)
        grid also works).
      threshold: pixels strictly above it are anomalous (Eq. 7).
      num_points: m, the number of random foreground points.
      image_hw: (H, W) of the original image; the coordinates are mapped to it.
      rng: the generator used for point sampling (the only source of randomness).
      connectivity: 8 (default, diagonal neighbours connect) or 4.
      per_component: False (paper): m points among all anomalous pixels, shared by every box.
        True: m points per component, drawn inside that component.

    Returns:
      `Prompts` with q = number of components; q = 0 for a map with nothing above threshold.
    """
    rough_map = np.asarray(rough_map)
    if rough_map.ndim != 2:
        raise ValueError(f"rough_map must be 2-D (S, S), got shape {rough_map.shape}")
    if connectivity not in _STRUCTURES:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if num_points < 0:
        raise ValueError(f"num_points must be >= 0, got {num_points}")
    image_hw = (int(image_hw[0]), int(image_hw[1]))

    binary = rough_map > threshold  # Eq. 7; NaN compares False
    components, q = ndimage.label(binary, structure=_STRUCTURES[connectivity])
    components = components.astype(np.int32)
    scale = _grid_to_image_scale(binary.shape, image_hw)

    boxes = _component_boxes(components, q, scale)
    if per_component:
        cells, labels = _sample_per_component(components, q, num_points, rng)
    else:
        cells, labels = _sample_shared(binary, q, num_points, rng)
    points = _cell_centres(cells, scale)
    points[labels == PAD_LABEL] = 0.0  # SAM ignores the coordinates of padding points
    return Prompts(
        boxes=boxes,
        points=points,
        point_labels=labels,
        components=components,
        binary=binary,
        image_hw=image_hw,
    )


def _grid_to_image_scale(grid_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """(sx, sy): image pixels per grid cell along x (columns) and y (rows)."""
    return np.array([image_hw[1] / grid_hw[1], image_hw[0] / grid_hw[0]], dtype=np.float64)


def _component_boxes(components: np.ndarray, q: int, scale: np.ndarray) -> np.ndarray:
    """float32 (q, 4) XYXY boxes covering each component's cells edge to edge.

    A component spanning columns c0..c1 covers image x in [c0·W/S, (c1+1)·W/S]; same for rows.
    """
    boxes = np.zeros((q, 4), dtype=np.float64)
    for i, (rows, cols) in enumerate(ndimage.find_objects(components, max_label=q)):
        # find_objects gives half-open slices, so .stop is already c1 + 1.
        boxes[i] = [cols.start, rows.start, cols.stop, rows.stop]
    boxes[:, 0::2] *= scale[0]
    boxes[:, 1::2] *= scale[1]
    return boxes.astype(np.float32)


def _sample_shared(
    binary: np.ndarray, q: int, m: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """m cells among all anomalous cells, repeated for each box: (q, m', 2) (row, col), labels."""
    flat = np.flatnonzero(binary)
    take = min(m, flat.size)
    picked = flat[rng.choice(flat.size, size=take, replace=False)] if take else flat[:0]
    cells = np.stack(np.unravel_index(picked, binary.shape), axis=-1)  # (m', 2) (row, col)
    cells = np.broadcast_to(cells, (q, take, 2)).copy()
    return cells, np.ones((q, take), dtype=np.int32)


def _sample_per_component(
    components: np.ndarray, q: int, m: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """m cells inside each component; components with fewer cells are padded (label -1)."""
    flat_labels = components.ravel()
    per_box = []
    for label in range(1, q + 1):
        flat = np.flatnonzero(flat_labels == label)
        take = min(m, flat.size)
        per_box.append(flat[rng.choice(flat.size, size=take, replace=False)])
    width = max((p.size for p in per_box), default=0)
    cells = np.zeros((q, width, 2), dtype=np.int64)
    labels = np.full((q, width), PAD_LABEL, dtype=np.int32)
    for i, picked in enumerate(per_box):
        cells[i, : picked.size] = np.stack(np.unravel_index(picked, components.shape), axis=-1)
        labels[i, : picked.size] = 1
    return cells, labels


def _cell_centres(cells: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(…, 2) grid (row, col) → float32 (…, 2) image (x, y) at the cell centres."""
    rows, cols = cells[..., 0], cells[..., 1]
    xy = np.stack([(cols + 0.5) * scale[0], (rows + 0.5) * scale[1]], axis=-1)
    return xy.astype(np.float32).reshape(*cells.shape[:-1], 2)
