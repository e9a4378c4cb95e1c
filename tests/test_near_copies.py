"""The near-copy measures (analysis/near_copies.py) on synthetic images whose truth is known: an
exact copy shifted by 2 pixels and rescaled passes the pixel measure's threshold, unrelated images
do not; the threshold and its false-near-copy rate from known non-copies; the weight indicator on
weight changes built inside and outside the base weight's principal subspace."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from carlos_audit.run.near_copy_arms import off_subspace_energy

from carlos_audit.analysis.near_copies import (
    block_of,
    calibrate,
    pixels,
    tiled_distance,
    weight_indicator,
    wilson,
    work_warnings,
)


def smooth_image(seed: int, size: int = 96) -> Image.Image:
    """A random picture of low spatial frequency (an 8 x 8 grid of colours upsampled)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def shifted(im: Image.Image, dx: int, dy: int) -> Image.Image:
    a = np.asarray(im)
    return Image.fromarray(np.roll(np.roll(a, dy, axis=0), dx, axis=1))


def test_shifted_rescaled_copy_passes_and_unrelated_images_fail():
    works = [smooth_image(s) for s in range(6)]
    # a copy of work 0, shifted by 2 pixels at the common size and saved at another resolution
    copy = shifted(works[0].resize((64, 64), Image.Resampling.LANCZOS), 2, -2).resize((150, 150), Image.Resampling.BICUBIC)
    unrelated = [smooth_image(100 + s, size=80) for s in range(200)]
    w = np.stack([pixels(im) for im in works])
    noncopy = tiled_distance(w, np.stack([pixels(im) for im in unrelated]))
    cal = calibrate(noncopy, alpha=0.01)
    assert cal["n_noncopies"] == 6 * 200 and cal["resolved"]
    assert cal["rate"] <= 0.01 and cal["rate_ci"][0] <= cal["rate"] <= cal["rate_ci"][1]
    d_copy = tiled_distance(w, pixels(copy)[None])[:, 0]
    assert d_copy[0] < cal["threshold"]            # the copy of work 0 is found
    assert (d_copy[1:] >= cal["threshold"]).all()  # and is no near-copy of the other works
    assert d_copy[0] < 0.25 * cal["min_noncopy"]
    # without the shift search the same copy is much farther
    assert tiled_distance(w[:1], pixels(copy)[None], max_shift=0)[0, 0] > 3 * d_copy[0]


def test_tiled_distance_is_a_max_over_tiles():
    a = pixels(smooth_image(1))
    b = a.copy()
    b[:16, :16] = 1.0 - b[:16, :16]          # one corner tile changed
    d = tiled_distance(a[None], b[None], max_shift=0)[0, 0]
    rms_tile = np.sqrt(((a[:16, :16] - b[:16, :16]) ** 2).mean())
    assert d == pytest.approx(rms_tile)
    assert tiled_distance(a[None], a[None])[0, 0] == pytest.approx(0.0, abs=1e-7)


def test_calibration_counts_strictly_below():
    cal = calibrate(np.arange(1, 201, dtype=float), alpha=0.01)
    assert cal["threshold"] == 2.0 and cal["n_below"] == 1 and cal["rate"] == pytest.approx(0.005)
    small = calibrate(np.arange(10, dtype=float), alpha=0.01)
    assert not small["resolved"] and small["n_below"] == 0


def test_wilson_interval():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert wilson(0, 0) is None


def test_blank_and_identical_works_are_stated():
    works = [smooth_image(1), smooth_image(1), Image.new("RGB", (64, 64), (200, 200, 200)), smooth_image(2)]
    blank, same, notes = work_warnings(np.stack([pixels(w) for w in works]), ["w1", "w2", "w3", "w4"])
    assert blank == ["w3"] and same == [(0, 1)]
    assert any("blank" in n for n in notes) and any("same picture" in n for n in notes)


def test_weight_indicator_separates_aligned_from_orthogonal_changes():
    rng = np.random.default_rng(0)
    u, _, vt = np.linalg.svd(rng.standard_normal((32, 32)))
    w0 = u @ np.diag(np.r_[np.full(8, 10.0), np.full(24, 0.1)]) @ vt
    inside = off_subspace_energy(w0, u[:, :2], rng.standard_normal((2, 32)), 0.5, k=8)
    outside = off_subspace_energy(w0, u[:, 20:22], rng.standard_normal((2, 32)), 0.5, k=8)
    assert inside[1] / inside[0] == pytest.approx(0.0, abs=1e-9)
    assert outside[1] / outside[0] == pytest.approx(1.0, abs=1e-9)
    up, down = rng.standard_normal((32, 4)), rng.standard_normal((4, 32))
    total, _ = off_subspace_energy(w0, up, down, 2.0, k=8)
    assert total == pytest.approx(float(((2.0 * up @ down) ** 2).sum()))
    ind = weight_indicator({"unet.down_blocks.0.a": inside, "unet.down_blocks.0.b": outside,
                            "unet.mid_block.attn": outside}, 8)
    assert [b["block"] for b in ind["blocks"]] == ["unet.down_blocks.0", "unet.mid_block"]
    assert ind["blocks"][1]["share"] == pytest.approx(1.0) and ind["exploratory"]
    assert block_of("text_encoder.text_model.encoder.layers.3.mlp.fc1") == "text_encoder.text_model"
    assert block_of("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q") == "unet.mid_block"
