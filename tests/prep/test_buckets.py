"""Resolution buckets: parsing, the official choice rule, and the resize-to-cover + crop transform."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltxf.prep.buckets import Bucket, choose_bucket, cover_size, crop_offsets, fit_to_bucket, parse_buckets


def test_parse_buckets():
    assert parse_buckets(" 768x512x49 ; 512x512x97;") == (
        Bucket(width=768, height=512, num_frames=49), Bucket(width=512, height=512, num_frames=97)
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("768x512", r"'768x512' is not 'WxHxF'"),
        ("768x512x49;abc", r"entry 'abc' is not 'WxHxF'"),
        ("770x512x49", r"multiples of 32, got 770x512"),
        ("768x512x48", r"8k \+ 1"),
        ("768x512x0", r"8k \+ 1"),
        ("", "expected 'WxHxF'"),
        ("64x64x9;64x64x9", "listed twice"),
    ],
)
def test_malformed_bucket_strings_are_quoted(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_buckets(spec)
    assert repr(spec) in str(info.value)


def test_choice_prefers_aspect_then_frames_then_area():
    buckets = parse_buckets("512x512x49;768x512x49;768x512x25;384x256x49;512x768x97")
    # Landscape 3:2 clip with plenty of frames: the 3:2 buckets tie on aspect; most frames (49), then largest area.
    assert choose_bucket(buckets, width=1920, height=1280, num_frames=200) == Bucket(width=768, height=512,
                                                                                      num_frames=49)
    # Only 30 frames: the 49-frame buckets are out, so the 25-frame 3:2 bucket wins over a better-area square one.
    assert choose_bucket(buckets, width=1920, height=1280, num_frames=30) == Bucket(width=768, height=512,
                                                                                     num_frames=25)
    # Portrait clip: the 2:3 bucket.
    assert choose_bucket(buckets, width=720, height=1080, num_frames=100).height == 768
    # Aspect is judged in log space: 2:1 is as far from 1:1 as 1:2 is.
    assert choose_bucket(parse_buckets("64x32x1;32x64x1;64x64x1"), width=100, height=100, num_frames=1).width == 64
    assert choose_bucket(buckets, width=64, height=64, num_frames=24) is None


def test_scaled_down():
    assert Bucket(width=512, height=256, num_frames=9).scaled_down(2) == Bucket(width=256, height=128, num_frames=9)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        Bucket(width=96, height=64, num_frames=9).scaled_down(2)
    with pytest.raises(ValueError, match="does not divide"):
        Bucket(width=96, height=64, num_frames=9).scaled_down(5)


def test_cover_and_center_crop_without_resize():
    bucket = Bucket(width=64, height=64, num_frames=1)
    assert cover_size(128, 64, bucket) == (128, 64)
    # Each pixel holds its column index (0..127); the centre crop keeps columns 32..95 untouched.
    frames = torch.arange(128, dtype=torch.uint8).view(1, 1, 128, 1).expand(1, 64, 128, 3).contiguous()
    out = fit_to_bucket(frames, bucket)
    assert out.shape == (3, 1, 64, 64)
    expected = torch.arange(32, 96).float() / 255 * 2 - 1
    torch.testing.assert_close(out[0, 0, 10], expected, atol=1e-6, rtol=0)


def test_resize_to_cover_is_bicubic_antialiased_and_first_frames_kept():
    bucket = Bucket(width=32, height=64, num_frames=9)
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (12, 40, 100, 3), dtype=torch.uint8, generator=generator)
    out = fit_to_bucket(frames, bucket)
    # 100x40 covering 32x64: height 64 -> width int(100 * 64 / 40) = 160, centre crop of 32 columns at 64.
    assert cover_size(100, 40, bucket) == (160, 64)
    source = frames[:9].permute(0, 3, 1, 2).float() / 255
    resized = F.interpolate(source, size=(64, 160), mode="bicubic", antialias=True, align_corners=False)
    expected = (resized[:, :, :, 64:96].clamp(0, 1) * 2 - 1).permute(1, 0, 2, 3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert out.min() >= -1 and out.max() <= 1 and out.dtype == torch.float32


def test_anchor_crop():
    bucket = Bucket(width=32, height=32, num_frames=1)
    assert crop_offsets((32, 100), bucket) == (34, 0)
    assert crop_offsets((32, 100), bucket, (0.0, 0.5)) == (0, 0)
    assert crop_offsets((32, 100), bucket, (0.999, 0.0)) == (68, 0)
    with pytest.raises(ValueError, match="anchor"):
        crop_offsets((32, 100), bucket, (1.0, 0.0))
    frames = torch.arange(100, dtype=torch.uint8).view(1, 100, 1, 1).expand(1, 100, 32, 3).contiguous()
    top = fit_to_bucket(frames, bucket, anchor=(0.0, 0.0))
    assert top[0, 0, 0, 0] == pytest.approx(-1.0)


def test_too_few_frames():
    with pytest.raises(ValueError, match="has 8 frames, bucket 32x32x9 needs 9"):
        fit_to_bucket(torch.zeros(8, 32, 32, 3, dtype=torch.uint8), Bucket(width=32, height=32, num_frames=9))
