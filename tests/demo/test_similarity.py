"""PSNR and SSIM against their definitions: analytic cases and a brute-force SSIM."""

import numpy as np
import pytest

from fpsa_jax.demo.similarity import K1, K2, gaussian_window, psnr, ssim


def _brute_ssim(a, b):
    """SSIM by the definition: every 11x11 window position, every frame and channel, in [0, 1]."""
    a, b = (np.asarray(a, np.float64) + 1) / 2, (np.asarray(b, np.float64) + 1) / 2
    w2 = np.outer(gaussian_window(), gaussian_window())
    c1, c2 = K1**2, K2**2
    vals = []
    f, h, wd, ch = a.shape
    for t in range(f):
        for c in range(ch):
            for y in range(h - 10):
                for x in range(wd - 10):
                    pa, pb = a[t, y : y + 11, x : x + 11, c], b[t, y : y + 11, x : x + 11, c]
                    ma, mb = (w2 * pa).sum(), (w2 * pb).sum()
                    va = (w2 * (pa - ma) ** 2).sum()
                    vb = (w2 * (pb - mb) ** 2).sum()
                    cov = (w2 * (pa - ma) * (pb - mb)).sum()
                    vals.append(
                        (2 * ma * mb + c1)
                        * (2 * cov + c2)
                        / ((ma**2 + mb**2 + c1) * (va + vb + c2))
                    )
    return float(np.mean(vals))


def test_ssim_matches_the_windowed_definition():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (2, 14, 15, 3))
    b = np.clip(a + 0.3 * rng.standard_normal(a.shape), -1, 1)
    assert ssim(a, b) == pytest.approx(_brute_ssim(a, b), rel=1e-10)


def test_ssim_of_constant_frames_is_the_luminance_term():
    a, b = np.full((1, 16, 16, 3), -0.2), np.full((1, 16, 16, 3), 0.4)
    ma, mb = 0.4, 0.7  # in [0, 1]
    want = (2 * ma * mb + K1**2) / (ma**2 + mb**2 + K1**2)
    assert ssim(a, b) == pytest.approx(want, rel=1e-12)


def test_identical_videos_score_perfectly_and_noise_lowers_both_scores():
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, (3, 32, 32, 3))
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == float("inf")
    small, large = (np.clip(a + s * rng.standard_normal(a.shape), -1, 1) for s in (0.05, 0.3))
    assert ssim(a, small) > ssim(a, large) and psnr(a, small) > psnr(a, large)
    assert ssim(a, small) == pytest.approx(ssim(small, a))


def test_psnr_is_ten_log_of_one_over_mse_in_unit_range():
    a = np.zeros((1, 4, 4, 3))
    b = a + 0.2  # 0.1 in [0, 1] units: MSE 0.01 -> 20 dB
    assert psnr(b, a) == pytest.approx(20.0)


def test_frames_smaller_than_the_window_still_work():
    rng = np.random.default_rng(2)
    a = rng.uniform(-1, 1, (1, 8, 8, 3))
    assert ssim(a, a) == pytest.approx(1.0)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="videos must both be"):
        ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 9, 3)))
    with pytest.raises(ValueError, match="videos must both be"):
        psnr(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))
