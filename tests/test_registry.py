"""The refiner registry: `--sam` choices come from it, `none` is an entry, and a new refiner
family is one registered entry that the commands then build and use."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import eval.main
from clipsam_jax.config import RefineConfig, RuntimeConfig
from clipsam_jax.errors import ConfigError
from clipsam_jax.refine import registry
from eval.predict import main as predict_main


class WholeImageRefiner:
    """A stand-in family: every box's three masks cover the whole image, scores 1."""

    def __init__(self):
        self.calls = 0

    def refine_batch(self, images, prompts, multimask=True):
        self.calls += 1
        k = 3 if multimask else 1
        return [(np.ones((p.num_boxes, k, *im.shape[:2]), bool),
                 np.ones((p.num_boxes, k), np.float32)) for im, p in zip(images, prompts)]  # fmt: skip

    def refine(self, image, prompts, multimask=True):
        return self.refine_batch([image], [prompts], multimask)[0]


@pytest.fixture
def whole_image_family():
    built = []

    def build(config, runtime):
        built.append((config, runtime))
        return WholeImageRefiner()

    entry = registry.register(registry.RefinerEntry("whole-image", "test", build, "none"))
    yield entry, built
    del registry.REFINERS[entry.name]


def test_cli_choices_are_the_registry(whole_image_family, capsys):
    assert {"vit_h", "vit_l", "vit_b", "tiny-random", "none"} <= set(registry.refiner_names())
    for name in registry.refiner_names():  # every entry, the test's own included
        assert eval.main.parse(["--test", "visa", "--sam", name]).__dict__["refine.sam"] == name
    with pytest.raises(SystemExit):
        eval.main.parse(["--test", "visa", "--sam", "nope"])
    assert "whole-image" in capsys.readouterr().err  # the error lists the registry's names


def test_none_is_an_entry_and_unknown_names_are_refused():
    assert registry.build_refiner(RefineConfig(sam="none")) is None
    with pytest.raises(ConfigError, match=r"--sam 'nope'.*known: vit_h"):
        registry.build_refiner(RefineConfig(sam="nope"))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.RefinerEntry("none", "none", lambda c, r: None, ""))


def test_a_registered_family_is_built_and_used_by_the_commands(
    whole_image_family, tiny_clip_dir, tmp_path
):
    _, built = whole_image_family
    args = eval.main.parse(["--test", "visa", "--sam", "whole-image", "--sam-images-per-call", "2"])
    assert eval.main.config_from_args(args).refine.sam == "whole-image"
    image = tmp_path / "in" / "part.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)).save(image)
    common = ["--no-umci", "--clip", str(tiny_clip_dir), "--image-size", "112", "--dtype",
              "float32", "--threshold", "0", "--map-format", "npy", "--no-progress"]  # fmt: skip
    report = predict_main([str(image), "--output", str(tmp_path / "out"), *common, "--sam",
                           "whole-image", "--sam-images-per-call", "3"])  # fmt: skip
    assert report["images"] == 1
    ((config, runtime),) = built
    assert config.sam == "whole-image" and runtime == RuntimeConfig(sam_images_per_call=3)
    result = json.loads((tmp_path / "out" / "part_result.json").read_text())
    assert result["sam_boxes"] == 1  # threshold 0: the whole map is one component
    predict_main([str(image), "--output", str(tmp_path / "rough"), *common, "--sam", "none"])
    rough = np.load(tmp_path / "rough" / "part_map.npy")
    # Eq. 9 adds each mask times its score: three all-ones masks of score 1 add 3 everywhere,
    # and Norm_max(O + 3) = (O + 3) / (3 + max O), the max taken on the S x S grid.
    expected = (rough + 3.0) / (3.0 + result["rough_grid_score"])
    np.testing.assert_allclose(np.load(tmp_path / "out" / "part_map.npy"), expected, atol=1e-5)


def test_a_family_whose_package_is_missing_says_how_to_install_it():
    ghost = registry._Family("ghost", "no_such_package.refiner:GhostRefiner", "pip install ghost")
    ghost.register({"ghost_l": "nowhere"})
    try:
        with pytest.raises(
            ConfigError, match=r"'no_such_package'.*install it with: pip install ghost"
        ):
            registry.build_refiner(RefineConfig(sam="ghost_l"))
    finally:
        del registry.REFINERS["ghost_l"]
