"""Tests of the feature cache (caption_attn/feature_cache.py): file checks and the refusal of
a cache made by another backbone.

`cache_copy` is a private copy of the session's float16 extraction (conftest.py).
"""

import os

import numpy as np
import pytest

from caption_attn.backbone import FEATURE_SHAPE
from caption_attn.errors import UserError
from caption_attn.extract import extract_features
from caption_attn.feature_cache import check_feature_file, npy_header
from image_samples import extract_cfg


def test_check_feature_file_reasons(tmp_path):
    good = np.ones(FEATURE_SHAPE, np.float16)
    cases = {"good": good, "shape": np.ones((8, 8, 2048), np.float16),
             "dtype": good.astype(np.float32), "nan": np.where(good, np.nan, 0).astype(np.float16),
             "fortran": np.asfortranarray(good)}
    for name, array in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
    with open(tmp_path / "good.npy", "rb") as f:
        data = f.read()
    (tmp_path / "short.npy").write_bytes(data[:-100])
    (tmp_path / "garbage.npy").write_bytes(os.urandom(len(data)))

    def check(name, full=False):
        return check_feature_file(str(tmp_path / f"{name}.npy"), "float16", full=full)

    assert check("good") is None and check("good", full=True) is None
    assert "shape" in check("shape")
    assert "dtype" in check("dtype")
    assert "Fortran" in check("fortran")
    assert "truncated" in check("short")
    assert "header" in check("garbage")
    assert check("missing") == "missing"
    assert check("nan") is None                              # quick check reads no data
    assert check("nan", full=True) == "non-finite values"
    assert len(npy_header("float16")) == len(data) - good.nbytes == 128


@pytest.mark.parametrize("change,message", [
    ({"seed": 1}, "weights random \\(seed 0\\)"),
    ({"dtype": "float32"}, "dtype float16"),
    ({"precision": "bfloat16"}, "precision float32"),
    ({"weights": "imagenet"}, "weights random"),
])
def test_cache_with_other_backbone_is_refused(images, cache_copy, change, message):
    with pytest.raises(UserError, match=message) as e:
        extract_features(images, extract_cfg(cache_copy, **change), progress=False)
    assert "another --cache" in str(e.value)
