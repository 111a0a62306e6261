import pytest

from caption_attn.errors import counted


@pytest.mark.parametrize("n, noun, plural, want", [
    (1, "image", "", "1 image"), (2, "image", "", "2 images"), (0, "image", "", "0 images"),
    ("1", "object", "", "1 object"), ("3", "object", "", "3 objects"),   # a JSON key
    (1, "test image", "", "1 test image"), (5, "test image", "", "5 test images"),
    (1, "child", "children", "1 child"), (2, "child", "children", "2 children"),
])
def test_counted_says_one_thing_or_many(n, noun, plural, want):
    """The one helper messages count things with (evaluate, export, images, data and
    captioner each spelt it out)."""
    assert counted(n, noun, plural) == want
