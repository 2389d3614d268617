"""The pointing game: a briefly trained demo model's attention maps point at the drawn shape.

The demo generator records each shape's box (boxes.json), and draws a probe set with the shapes
off-centre (a centre guess scores ~0 there). After a short real `vit-train fit`, the peak patch of
each method's map must fall inside the box for a clear majority of the probe images, far above a
random patch's chance (the baselines are computed on the same images).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from training.demo_data import read_boxes
from training.pointing_game import PROBE_SPLIT, SHAPE_CLASSES, VARIANTS, pointing_game, train_demo_model
from vit_service.explain import Explainer
from vit_service.formats.sources import load_model_source

# A training run of its own (~90 s on an AVX2-only 2-core host): the slow set. The attention-map
# methods themselves are tested fast in test_explain.py.
pytestmark = pytest.mark.slow
# Kept small: about a minute of CPU on 2 cores (data, 12 epochs, scoring).
TRAIN_PER_CLASS, VAL_PER_CLASS, PROBE_PER_CLASS, EPOCHS = 60, 10, 10, 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Explainer, Path]:
    data, ckpt = train_demo_model(tmp_path_factory.mktemp("pointing"), TRAIN_PER_CLASS, VAL_PER_CLASS, EPOCHS,
                                  PROBE_PER_CLASS)
    return Explainer(*load_model_source(str(ckpt))), data


def test_boxes_are_recorded_for_every_image(trained: tuple[Explainer, Path]) -> None:
    _, data = trained
    boxes = read_boxes(data)
    assert len(boxes) == 6 * (TRAIN_PER_CLASS + VAL_PER_CLASS) + 4 * PROBE_PER_CLASS == len(list(data.rglob("*.jpg")))
    from PIL import Image

    for key, (left, top, right, bottom) in boxes.items():
        w, h = Image.open(data / key).size
        assert 0 <= left < right <= w and 0 <= top < bottom <= h, key
        if key.split("/")[1] in SHAPE_CLASSES:
            assert (right - left) * (bottom - top) < 0.7 * w * h, key  # a shape, not the whole image
        else:
            assert (left, top, right, bottom) == (0, 0, w, h), key  # textures fill the image


@pytest.mark.parametrize("label,method,fusion,discard", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_attention_points_at_the_shape(trained: tuple[Explainer, Path], label: str, method: str,
                                       fusion: str, discard: float) -> None:
    explainer, data = trained
    score = pointing_game(explainer, data, PROBE_SPLIT, method, fusion, discard)
    assert score.images == len(SHAPE_CLASSES) * PROBE_PER_CLASS
    assert score.baseline < 0.2 and score.centre_hit_rate < 0.2  # neither chance nor the centre scores
    # A clear majority, and far above chance.
    assert score.hit_rate >= 0.65, (label, score)
    assert score.hit_rate >= score.baseline + 0.25, (label, score)
