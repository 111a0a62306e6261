"""Caption datasets: reading COCO / Karpathy / Flickr files into records, and splits by image.

A record is one image (keyed by its path relative to the images folder) with all of its
captions; splitting works on records, so captions of one image never land in two splits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    """One image and all of its captions."""

    image: str                      # path relative to the images folder, POSIX separators
    captions: list[str]             # raw captions in file order, empty ones removed
    split: Optional[str] = None     # "train" / "val" / "test" ("restval" read as "train")
    image_id: Any = None            # COCO id, Karpathy cocoid/imgid, else a running index
    objects: Optional[list] = None  # shapes ground truth: [{color, shape, size, bbox}]


def split_images(keys: Iterable[str], val_fraction: float, test_fraction: float,
                 seed: int) -> dict[str, str]:
    """Deterministic split by image: key -> "train" / "val" / "test".

    Images are ranked by a hash of (seed, key), so the result does not depend on the order of
    `keys`; the first round(n * test_fraction) go to test, the next round(n * val_fraction) to
    val, the rest to train.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"`{name}` must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"`val_fraction` + `test_fraction` must be < 1, got "
                         f"{val_fraction} + {test_fraction}")
    keys = sorted(set(keys))
    ranked = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).digest())
    n_test = round(len(ranked) * test_fraction)
    n_val = round(len(ranked) * val_fraction)
    out = {}
    for i, key in enumerate(ranked):
        out[key] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out
