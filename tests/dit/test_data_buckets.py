import math

import pytest

from refgen.dit.buckets import (DEFAULT_BUCKETS, Bucket, aspect_distortion, nearest_bucket, parse_buckets,
                                upscale_factor)


def test_default_set_is_about_one_megapixel_with_sides_multiple_of_64():
    bs = parse_buckets(None)
    assert len(bs) == len(DEFAULT_BUCKETS)
    for b in bs:
        assert b.width % 64 == 0 and b.height % 64 == 0, b.name
        assert 0.9e6 < b.width * b.height < 1.1e6, b.name
        assert Bucket(b.height, b.width) in bs, f"{b.name} has no portrait/landscape twin"
    names = {b.name for b in bs}
    assert {"1024x1024", "832x1216", "1216x832"} <= names


def test_default_set_bounds_the_stretch_inside_its_aspect_range():
    bs = parse_buckets(None)
    lo, hi = min(b.aspect for b in bs), max(b.aspect for b in bs)
    worst = 0.0
    for i in range(200):
        ar = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / 199)
        w, h = round(1000 * ar), 1000
        worst = max(worst, aspect_distortion(w, h, nearest_bucket(w, h, bs)))
    assert worst < 0.075  # documented: at most ~7.2 %


def test_nearest_bucket_uses_log_aspect():
    bs = parse_buckets("64x64,64x128,128x64")
    assert nearest_bucket(100, 100, bs).name == "64x64"
    assert nearest_bucket(60, 120, bs).name == "64x128"
    assert nearest_bucket(300, 140, bs).name == "128x64"
    # 1.41:1 is equally far (in log space) from 1:1 and 2:1; closer to 1:1 below that.
    assert nearest_bucket(140, 100, bs).name == "64x64"
    assert nearest_bucket(142, 100, bs).name == "128x64"


def test_distortion_and_upscale():
    b = Bucket(128, 64)
    assert aspect_distortion(256, 128, b) == pytest.approx(0.0)
    assert aspect_distortion(220, 100, b) == pytest.approx(0.1)
    assert aspect_distortion(180, 100, b) == pytest.approx(2 / 1.8 - 1)
    assert upscale_factor(64, 32, b) == pytest.approx(2.0)
    assert upscale_factor(256, 128, b) == pytest.approx(0.5)


@pytest.mark.parametrize("spec, msg", [("64x60", "multiples of 16"), ("64", "WIDTHxHEIGHT"),
                                       ("64x64,64x64", "twice"), ("", "no buckets"), ("0x64", "positive")])
def test_bad_bucket_specs_are_refused(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_buckets(spec)


def test_bucket_specs_in_several_forms():
    assert [b.name for b in parse_buckets("64x64, 128x64")] == ["64x64", "128x64"]
    assert [b.name for b in parse_buckets([(64, 128), "128X64"])] == ["64x128", "128x64"]
