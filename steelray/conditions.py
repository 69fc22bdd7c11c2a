"""Imaging conditions a plant meets (glare, dimming, under-exposure, blur, noise) applied to a sheet:
what evaluation's robustness passes and the glare fixtures of the tests and benchmarks run images under."""

from __future__ import annotations

import numpy as np

# glare adds stray light (an offset) and washes out contrast; dimming is less light, which scales every
# pixel down (darker, and its contrast falls with it). "crushed" is a darker exposure than any plant
# camera should run at: -30% of full scale with contrast -30% sends every pixel below 43% grey to
# black (12-82% of a NEU image), erasing dark defects; it is reported, not part of the gap.
CONDITIONS = {
    "glare": "stray light: +30% of full scale, contrast -30%",
    "dim": "30% less light: every pixel x0.7",
    "crushed": "under-exposed: -30% of full scale, contrast -30% (pixels below 43% grey clip to black)",
    "blur": "Gaussian blur, sigma 2 px",
    "noise": "Gaussian noise, sigma 8% of full scale",
}


def perturb_image(image: np.ndarray, condition: str, seed: int = 0) -> np.ndarray:
    """One of ``CONDITIONS`` applied to a uint8 HxWxC image, deterministically (albumentations)."""
    import albumentations as A

    if condition == "glare":
        t = A.RandomBrightnessContrast(brightness_limit=(0.3, 0.3), contrast_limit=(-0.3, -0.3), p=1)
    elif condition == "dim":
        t = A.MultiplicativeNoise(multiplier=(0.7, 0.7), per_channel=False, elementwise=False, p=1)
    elif condition == "crushed":
        t = A.RandomBrightnessContrast(brightness_limit=(-0.3, -0.3), contrast_limit=(-0.3, -0.3), p=1)
    elif condition == "blur":
        t = A.GaussianBlur(blur_limit=(0, 0), sigma_limit=(2.0, 2.0), p=1)
    elif condition == "noise":
        t = A.GaussNoise(std_range=(0.08, 0.08), p=1)
    else:
        raise ValueError(f"unknown condition {condition!r}; choose one of {', '.join(CONDITIONS)}")
    return A.Compose([t], seed=seed)(image=image)["image"]
