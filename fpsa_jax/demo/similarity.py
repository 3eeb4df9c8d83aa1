"""Video similarity: PSNR and SSIM of videos [F, H, W, 3] in [-1, 1], NumPy float64.

Both map pixels to [0, 1] first (data range 1). SSIM is Wang et al. (2004) as commonly used: an
11 x 11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, computed per frame and channel over
the window positions that fit inside the frame ("valid"), averaged over positions, channels and
frames. Frames smaller than the window use a window cut to the frame size.
"""

from __future__ import annotations

import numpy as np

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def _unit(video: np.ndarray) -> np.ndarray:
    return (np.asarray(video, np.float64) + 1.0) / 2.0


def _check(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"videos must both be [F, H, W, 3], got {a.shape} and {b.shape}")


def psnr(video: np.ndarray, reference: np.ndarray) -> float:
    """10 log10(1 / MSE) in dB over all pixels; inf for identical videos."""
    a, b = _unit(video), _unit(reference)
    _check(a, b)
    mse = float(np.mean(np.square(a - b)))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    """float64 [size]: the normalised 1D Gaussian (the 2D window is its outer product)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of [..., H, W] by the window g (x then y)."""
    wins = np.lib.stride_tricks.sliding_window_view(x, g.shape[0], axis=-1)
    x = wins @ g
    wins = np.lib.stride_tricks.sliding_window_view(x, g.shape[0], axis=-2)
    return wins @ g


def ssim(video: np.ndarray, reference: np.ndarray) -> float:
    """Mean SSIM over frames, channels and window positions (module docstring); 1 if equal."""
    a, b = _unit(video), _unit(reference)
    _check(a, b)
    # [F, H, W, 3] -> [F, 3, H, W]
    a, b = np.moveaxis(a, -1, 1), np.moveaxis(b, -1, 1)
    g = gaussian_window(min(WINDOW, *a.shape[-2:]))
    c1, c2 = K1**2, K2**2
    mu_a, mu_b = _filter(a, g), _filter(b, g)
    var_a = _filter(a * a, g) - mu_a**2
    var_b = _filter(b * b, g) - mu_b**2
    cov = _filter(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))
