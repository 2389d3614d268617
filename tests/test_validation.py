"""serving/validation.py on its own: the form values, `top_k`, options, class names and image
decoding that every upload route checks, each mistake a RequestError with its status, its metric
reason and a message naming the field. (The same answers over HTTP: test_error_shape.py,
test_service.py, test_explain_http.py; these run in-process, so mutation testing sees them.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from starlette.datastructures import UploadFile

from service_fixtures import CLASS_NAMES, encode, picture
from vit_service.preprocessing import Preprocessing
from vit_service.serving.errors import RequestError
from vit_service.serving.validation import (DEFAULT_TOP_K, choice, class_index, decode_upload, form_value,
                                            parse_top_k, top_k_or_default)

TEN_CLASSES = [f"c{i}" for i in range(10)]


def refused(call, *args) -> RequestError:
    with pytest.raises(RequestError) as e:
        call(*args)
    return e.value


@pytest.mark.parametrize("given,expected", [
    (None, None), ("", None), ("   ", None), ("null", None), (" null ", None), ('""', None), ('" "', None),
    ("png", "png"), (" png ", "png"), ('"png"', "png"), ('" png "', "png"),  # BentoML's client JSON-encodes
    ("3", "3"), ("[1]", "[1]"), ("{bad", "{bad"),  # JSON but not a string, or not JSON: the text as it is
])
def test_form_value(given, expected):
    assert form_value(given) == expected


@pytest.mark.parametrize("values,expected", [
    ([], None), (["null"], None), ([" null "], None), (["null", "3"], 3),
    (["3"], 3), ([" 3 "], 3), (['"3"'], 3), (["-1"], -1), (["007"], 7),  # the range is checked later
])
def test_top_k_parsed(values, expected):
    assert parse_top_k(values) == expected


@pytest.mark.parametrize("values,fragment", [
    (["2", "3"], "'top_k' given 2 times; give it once"),
    (["x"], "'top_k' must be an integer, got 'x'"),
    ([""], "'top_k' must be an integer, got ''"),
    (["3.0"], "must be an integer"),
    (["1_000"], "must be an integer"),  # int() takes it; BentoML's validation behind us would not
    (["\u0663"], "must be an integer"),  # ARABIC-INDIC DIGIT THREE: int() takes it too
    (["+3"], "must be an integer"),
    (["x" * 50], "must be an integer, got '" + "x" * 40 + "'"),  # the echo is cut at 40 characters
])
def test_top_k_not_an_integer_is_400(values, fragment):
    e = refused(parse_top_k, values)
    assert (e.status, e.reason) == (400, "bad_top_k") and fragment in e.message, e.message


def test_top_k_as_a_file_is_400():
    e = refused(parse_top_k, [UploadFile(io.BytesIO(b"3"), filename="k.txt")])
    assert (e.status, e.reason) == (400, "bad_top_k") and "not a file" in e.message


@pytest.mark.parametrize("top_k,classes,expected", [
    (None, CLASS_NAMES, 4),  # the default 5, capped at the 4 classes
    (None, TEN_CLASSES, DEFAULT_TOP_K),
    (1, CLASS_NAMES, 1), (4, CLASS_NAMES, 4), (10, TEN_CLASSES, 10),
])
def test_top_k_default_and_range(top_k, classes, expected):
    assert DEFAULT_TOP_K == 5
    assert top_k_or_default(top_k, classes) == expected


@pytest.mark.parametrize("top_k", [0, -1, 5, 10**20])
def test_top_k_out_of_range_is_400_naming_the_range(top_k):
    e = refused(top_k_or_default, top_k, CLASS_NAMES)
    assert (e.status, e.reason) == (400, "bad_top_k")
    assert e.message == f"top_k must be between 1 and 4 (the number of classes), got {top_k}"


def test_choice():
    choices = ("rollout", "grad")
    assert choice(None, choices, "method", "rollout") == "rollout"
    assert choice("", choices, "method", "rollout") == "rollout"
    assert choice("null", choices, "method", "grad") == "grad"
    assert choice('"grad"', choices, "method", "rollout") == "grad"
    e = refused(choice, "Grad", choices, "method", "rollout")
    assert (e.status, e.reason) == (400, "bad_option")
    assert e.message == "'method' must be one of rollout, grad; got 'Grad'"
    assert refused(choice, "x" * 100, choices, "method", "rollout").message.endswith("got '" + "x" * 40 + "'")


def test_class_index():
    assert class_index(None, "class_name", CLASS_NAMES) is None
    assert class_index("", "class_name", CLASS_NAMES) is None
    assert class_index("square", "class_name", CLASS_NAMES) == 1
    assert class_index('"star"', "class_name", CLASS_NAMES) == 3
    e = refused(class_index, "Square", "class_name", CLASS_NAMES)
    assert (e.status, e.reason) == (400, "bad_option")
    assert e.message.startswith("unknown 'class_name' 'Square'; the model's classes are: ")
    assert all(name in e.message for name in CLASS_NAMES)
    assert "'" + "y" * 60 + "'" in refused(class_index, "y" * 100, "class_name", CLASS_NAMES).message


PRE = Preprocessing(image_size=32, crop_pct=1.0)


def test_decode_upload_gives_the_image_and_the_models_pixels():
    data = encode(picture(3, (96, 72)), "PNG")
    image, pixels = decode_upload("a.png", data, PRE, 10_000, jpeg_draft=True)
    assert image.mode == "RGB" and image.size == (96, 72)
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 32, 32)
    np.testing.assert_array_equal(pixels, PRE.to_uint8(Image.open(io.BytesIO(data)).convert("RGB")).numpy())


def test_decode_upload_drafts_large_jpegs_only_when_asked():
    data = encode(picture(4, (640, 480)), "JPEG")
    drafted, _ = decode_upload("big.jpg", data, PRE, 10**6, jpeg_draft=True)
    full, _ = decode_upload("big.jpg", data, PRE, 10**6, jpeg_draft=False)
    assert full.size == (640, 480)
    assert drafted.size == (80, 60)  # DCT scaling by 1/8: the shorter side still >= 32


@pytest.mark.parametrize("name,data,fragment", [
    ("cat.jpg", b"not an image", "cat.jpg: not a recognised image format"),
    ("", b"not an image", "upload: not a recognised image format"),
    ("empty.png", b"", "empty.png: empty file"),
    ("huge.png", encode(Image.new("L", (200, 100)), "PNG"), "huge.png: image is 200x100 = 20000 pixels, "
                                                             "above the limit of 10000"),
])
def test_a_bad_image_is_400_naming_the_file(name, data, fragment):
    e = refused(decode_upload, name, data, PRE, 10_000, True)
    assert (e.status, e.reason, e.message) == (400, "bad_image", fragment)
