"""Similarity heatmaps: the cells of each side sum to the pair's cosine; the crop and the rendered PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from benchmarks.fixtures.tiny_onnx import GRID, make_tiny_model
from retrieval.embedder import OnnxEmbedder
from retrieval.heatmaps import (
    BAR_PANEL,
    contribution_grid,
    displayed_image,
    heatmap_size,
    render_heatmap,
    symmetric_limit,
)
from retrieval.preprocessing import Preprocessing


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> OnnxEmbedder:
    return OnnxEmbedder(make_tiny_model(tmp_path_factory.mktemp("model") / "model.onnx", image_size=16, dim=8))


def random_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        height, width = (int(v) for v in rng.integers(12, 60, size=2))
        images.append(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB"))
    return images


def test_cells_of_both_sides_sum_to_the_cosine(embedder):
    embeddings, maps = embedder.embed_with_maps(random_images(6))
    for a, b in [(0, 1), (2, 5), (3, 4), (1, 1)]:
        cosine = float(embeddings[a].astype(np.float64) @ embeddings[b])  # from the embedding output alone
        grid_a = contribution_grid(maps[a], embeddings[b])
        grid_b = contribution_grid(maps[b], embeddings[a])
        assert grid_a.shape == grid_b.shape == (GRID, GRID)
        assert grid_a.sum() == pytest.approx(cosine, abs=1e-5)
        assert grid_b.sum() == pytest.approx(cosine, abs=1e-5)
    assert not np.allclose(contribution_grid(maps[0], embeddings[1]), contribution_grid(maps[1], embeddings[0]))


def test_grid_rows_follow_the_feature_map_order():
    """Location i of the map is cell (i // w, i % w), as the model flattens its h×w grid."""
    feature_map = np.zeros((9, 2))
    feature_map[:, 0] = 1.0
    feature_map[5, 1] = 3.0  # location 5 = row 1, column 2; the pooled vector is (1, 1/3)
    grid = contribution_grid(feature_map, np.array([0.0, 1.0]))
    assert grid.shape == (3, 3) and np.argmax(grid) == 5
    assert grid[1, 2] == pytest.approx(3.0 / (9 * np.hypot(1, 1 / 3)))


@pytest.mark.parametrize(
    ("feature_map", "other", "message"),
    [
        (np.ones((6, 4)), np.ones(4), "not a square grid"),
        (np.ones((4, 4)), np.ones(3), "must be"),
        (np.ones(4), np.ones(4), "must be"),
    ],
)
def test_contribution_grid_rejects_bad_shapes(feature_map, other, message):
    with pytest.raises(ValueError, match=message):
        contribution_grid(feature_map, other)


def test_displayed_image_is_the_resized_center_crop():
    spec = Preprocessing(image_size=16, resize_size=20, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
    image = random_images(1, seed=3)[0].resize((40, 30))
    shown = displayed_image(image, spec)
    # shorter side 30 → 20, longer 40 → int(20·40/30) = 26; the 16-px crop starts at (5, 2)
    expected = np.asarray(image.resize((26, 20), Image.BILINEAR))[2:18, 5:21]
    assert shown.size == (16, 16) and shown.mode == "RGB"
    assert np.abs(np.asarray(shown).astype(int) - expected).max() <= 1


def test_render_heatmap_is_a_png_of_the_expected_size_and_colours():
    image = Image.new("RGB", (16, 16), (128, 128, 128))
    grid = np.zeros((4, 4))
    grid[0, 0], grid[3, 3] = 0.05, -0.05
    png = render_heatmap(image, grid, limit=symmetric_limit(grid))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    picture = Image.open(io.BytesIO(png))
    picture.load()
    assert picture.format == "PNG" and picture.size == heatmap_size(image) == (256 + BAR_PANEL, 256)
    pixels = np.asarray(picture.convert("RGBA")).astype(int)
    red, green, blue, alpha = pixels[2, 2]
    assert alpha == 255 and red > blue + 40  # the top-left cell adds to the similarity
    red, green, blue, alpha = pixels[253, 253]
    assert blue > red + 40
    assert (pixels[:, 256:, 3] == 0).any() and (pixels[:, 256:, 3] == 255).any()  # a bar on a transparent panel


@pytest.mark.parametrize(("side", "expected"), [(16, 256), (224, 448), (256, 256), (300, 300)])
def test_small_crops_are_enlarged_by_a_whole_factor(side, expected):
    assert heatmap_size(Image.new("RGB", (side, side))) == (expected + BAR_PANEL, expected)


def test_render_heatmap_rejects_non_square_images_and_bad_limits():
    with pytest.raises(ValueError, match="square"):
        render_heatmap(Image.new("RGB", (16, 12)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="positive"):
        render_heatmap(Image.new("RGB", (16, 16)), np.zeros((2, 2)), limit=0)
