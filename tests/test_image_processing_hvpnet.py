"""HVPNetImageProcessor and the package's one image decoder, `load_image`: modes, EXIF, 16 bits, numpy arrays,
the transform, object slots, and unreadable files (missing, truncated, decompression bombs)."""

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from hvpnet_hf import image_processing_hvpnet
from hvpnet_hf.image_processing_hvpnet import (
    MAX_RESIZE_SQUARES,
    HVPNetImageProcessor,
    image_header_problem,
    image_slots,
    load_image,
)

IMAGE_SIZE = 16


def image_processor(**kwargs) -> HVPNetImageProcessor:
    settings = {"image_size": IMAGE_SIZE, "crop_pct": 1.0, "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3}
    return HVPNetImageProcessor(**{**settings, **kwargs})


def sideways_photo(path):
    """
    A JPEG stored 40 wide and 20 high with its left half black and EXIF orientation 6 (rotate 90 degrees clockwise
    to view), so that upright it is 20 x 40 with the black half on top.
    """
    image = Image.new("L", (40, 20), 255)
    image.paste(0, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=100)
    return path


# ---------------------------------------------------------------- conversion and transform


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGBA", "P", "LA", "I;16"])
def test_every_image_mode_becomes_rgb(mode):
    image = Image.new(mode, (40, 20))
    pixels = image_processor().preprocess_example(image)["pixel_values"][0]
    assert pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert pixels.dtype == torch.float32


def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path, caplog):
    # A 16-bit PNG whose left half is 0x4000 (a quarter of the range) and right half 0xC000 (three quarters).
    values = np.full((16, 32), 0x4000, dtype=np.uint16)
    values[:, 16:] = 0xC000
    path = tmp_path / "depth.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    squashed = image_processor(crop_mode="squash", image_size=32)
    image_processing_hvpnet._log_high_bit_depth.cache_clear()  # it logs once per mode and process
    with caplog.at_level(logging.INFO, logger="hvpnet_hf.image_processing_hvpnet"):
        pixels = squashed.preprocess_example(path)["pixel_values"][0]
    # 0x4000 / 257 rounds to 64 and 0xC000 / 257 to 191; normalized (v / 255 - 0.5) / 0.5. Columns next to the
    # middle are blended by the resize filter, so only the outer ones are compared (1e-5: float rounding).
    torch.testing.assert_close(pixels[:, :, :12], torch.full((3, 32, 12), 64 / 127.5 - 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[:, :, 20:], torch.full((3, 32, 12), 191 / 127.5 - 1), atol=1e-5, rtol=0)
    assert "I;16" in caplog.text and "scaled to 8 bits" in caplog.text


def test_exif_orientation_is_applied(tmp_path):
    path = sideways_photo(tmp_path / "phone.jpg")
    assert load_image(path).size == (20, 40)
    pixels = image_processor(crop_mode="squash", image_size=20).preprocess_example(path)["pixel_values"][0]
    # Rows away from the middle are pure black (-1) or white (1) up to JPEG noise (0.1 is ~13 of 255 gray levels).
    assert pixels[:, :8].max() < -0.9 and pixels[:, 12:].min() > 0.9
    in_memory = image_processor(crop_mode="squash", image_size=20).preprocess_example(Image.open(path))
    torch.testing.assert_close(in_memory["pixel_values"][0], pixels)


@pytest.mark.parametrize("shape", [(20, 40, 3), (20, 40), (20, 40, 1), (20, 40, 4)])
def test_numpy_images_are_accepted_like_pil_images(shape):
    array = np.zeros(shape, dtype=np.uint8)
    array[:, 20:] = 255
    if len(shape) == 3 and shape[-1] == 4:
        array[..., 3] = 255  # opaque
    from_array = image_processor().preprocess_example(array, [array])
    pil = Image.fromarray(array[..., 0] if len(shape) == 3 and shape[-1] == 1 else array)
    from_pil = image_processor().preprocess_example(pil, [pil])
    assert from_array["image_mask"].tolist() == [True, True, False, False]
    torch.testing.assert_close(from_array["pixel_values"], from_pil["pixel_values"])


@pytest.mark.parametrize(
    "array, message",
    [(np.zeros((3, 20, 40), dtype=np.uint8), "channels last"), (np.zeros((20, 40, 3)), "dtype float64")],
)
def test_unsupported_numpy_images_are_an_error(array, message):
    with pytest.raises(ValueError, match=message):
        image_processor().preprocess_example(array)


def test_image_values_are_resized_cropped_and_normalized():
    image = Image.new("L", (40, 20), 255)  # white; grayscale is replicated to three channels
    pixels = image_processor().preprocess_example(image)["pixel_values"][0]
    # (1.0 - 0.5) / 0.5 = 1 everywhere; 1e-5 covers float rounding of the resize.
    torch.testing.assert_close(pixels, torch.ones(3, IMAGE_SIZE, IMAGE_SIZE), atol=1e-5, rtol=0)
    transparent = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    pixels = image_processor().preprocess_example(transparent)["pixel_values"][0]
    torch.testing.assert_close(pixels, torch.ones(3, IMAGE_SIZE, IMAGE_SIZE), atol=1e-5, rtol=0)  # white background


def test_squash_keeps_the_whole_non_square_image():
    # 40x20, its left quarter black: squashing keeps that quarter, a center crop of the middle square drops it.
    image = Image.new("L", (40, 20), 255)
    image.paste(0, (0, 0, 10, 20))
    squashed = image_processor(crop_mode="squash").preprocess_example(image)["pixel_values"][0]
    cropped = image_processor().preprocess_example(image)["pixel_values"][0]
    assert squashed.shape == cropped.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    # Normalized black is -1 and white is 1; a column or two at the edge is blended by the resize filter.
    assert squashed[:, :, :2].max() < -0.99 and squashed[:, :, IMAGE_SIZE // 4 + 2 :].min() > 0.99
    assert cropped[:, :, 2:].min() > 0.99


def test_crop_mode_is_checked():
    # timm reads an unknown crop mode as "center": a misspelled "squash" would silently crop.
    with pytest.raises(ValueError, match=r"crop_mode must be one of \('center', 'squash', 'border'\), got 'sqaush'"):
        image_processor(crop_mode="sqaush")
    bordered = image_processor(crop_mode="border").preprocess_example(Image.new("L", (40, 20), 255))
    assert bordered["pixel_values"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_object_slots_are_padded_truncated_and_masked():
    processing = image_processor(num_object_images=3)
    crop = Image.new("RGB", (8, 8), (255, 0, 0))
    one = processing.preprocess_example(None, [crop])
    # Slot 0 is the (absent) global image, then the crop and two empty crop slots.
    assert one["pixel_values"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert one["image_mask"].tolist() == [False, True, False, False]
    assert one["pixel_values"][0].abs().sum() == 0 and one["pixel_values"][2:].abs().sum() == 0
    assert one["pixel_values"][1].abs().sum() > 0
    many = processing.preprocess_example(crop, [crop] * 5)
    assert many["pixel_values"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert many["image_mask"].tolist() == [True, True, True, True]


# ---------------------------------------------------------------- unreadable files


def test_missing_image_path_is_masked_or_raises(tmp_path):
    processing = image_processor()
    path = tmp_path / "gone.jpg"
    images = processing.preprocess_example(path, [path, None])
    assert images["image_mask"].tolist() == [False, False, False, False]
    with pytest.raises(OSError, match="gone.jpg"):
        processing.preprocess_example(path, missing_images="error")


def test_load_image_decodes_pixels_as_rgb(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("L", (24, 16), 7).save(path)
    image = load_image(path)
    assert (image.size, image.mode, image.getpixel((0, 0))) == ((24, 16), "RGB", (7, 7, 7))


def assert_unreadable(path, error_pattern: str, caplog) -> None:
    """`load_image` raises naming the file, as transformers' does; the processor masks the image and logs the file,
    or under `missing_images="error"` raises the same error."""
    with pytest.raises(OSError, match=error_pattern):
        load_image(path)
    with caplog.at_level(logging.WARNING, logger="hvpnet_hf.image_processing_hvpnet"):
        assert image_processor().preprocess_example(path)["image_mask"].tolist() == [False] * 4
    assert path.name in caplog.text
    with pytest.raises(OSError, match=error_pattern):
        image_processor().preprocess_example(path, missing_images="error")


def test_a_truncated_file_passes_the_header_check_and_fails_decoding(tmp_path, caplog):
    path = tmp_path / "big.jpg"
    Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48).save(path)
    path.write_bytes(path.read_bytes()[:-400])  # header intact, pixel data cut
    assert image_header_problem(path) is None  # so only decoding can notice
    assert_unreadable(path, "big.jpg", caplog)


def test_decompression_bombs_are_unreadable_not_an_uncaught_error(tmp_path, monkeypatch, caplog):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (200, 100)).save(path)
    # PIL refuses images of more than twice MAX_IMAGE_PIXELS with DecompressionBombError, which is not an OSError;
    # the limit is lowered here instead of writing a huge file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    assert "decompression bomb" in image_header_problem(path)
    assert_unreadable(path, "bomb.png.*decompression bomb", caplog)


def test_missing_images_policy_is_checked():
    with pytest.raises(ValueError, match="missing_images must be one of"):
        image_processor().preprocess_example("any.jpg", missing_images="skip")
    assert image_header_problem("no/such/file.jpg")


# ---------------------------------------------------------------- memory and empty images


def resize_pixels(image: Image.Image, size: tuple[int, int], box: tuple[float, ...] | None) -> int:
    """
    The pixels PIL allocates to resize `box` of `image` to `size`: the output, and the image of its first pass,
    which is horizontal (except for an image over 100 times taller than wide that gets shorter) and holds the rows
    (or columns) the second pass reads: the box's, widened by the largest filter support (3 pixels, Lanczos).
    """
    left, top, right, bottom = box or (0, 0, *image.size)
    if image.height > 100 * image.width and size[1] < image.height:
        first_pass = size[1] * min(image.width, math.ceil(right - left + 6 * max((right - left) / size[0], 1)) + 2)
    else:
        first_pass = size[0] * min(image.height, math.ceil(bottom - top + 6 * max((bottom - top) / size[1], 1)) + 2)
    return size[0] * size[1] + first_pass


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_strip_images_are_transformed_in_bounded_memory(tmp_path, monkeypatch, crop_mode):
    # A 40000 x 1 PNG is a few hundred bytes; timm's transform alone would resize it to 10 million x 256 pixels
    # (center crop mode), or to 256 x 0, which PIL refuses (border mode). Every resize is checked before PIL runs it,
    # so the test allocates nothing large.
    processing = HVPNetImageProcessor(crop_mode=crop_mode)  # 224 pixels, crop_pct 0.875
    strip = np.random.default_rng(0).integers(0, 256, (1, 40000, 3), dtype=np.uint8)
    path = tmp_path / "strip.png"
    Image.fromarray(strip).save(path)
    assert path.stat().st_size < 200_000
    largest = []
    resize = Image.Image.resize

    def checked_resize(image, size, resample=None, box=None, reducing_gap=None):
        largest.append(resize_pixels(image, size, box) - image.width * image.height)
        assert largest[-1] <= (MAX_RESIZE_SQUARES + 1) * 224**2, (image.size, size, box)
        return resize(image, size, resample, box, reducing_gap)

    monkeypatch.setattr(Image.Image, "resize", checked_resize)
    tall = np.ascontiguousarray(strip.transpose(1, 0, 2))
    for image in (path, strip, tall, Image.fromarray(strip), np.zeros((1_000_000, 1), np.uint8)):
        images = processing.preprocess_example(image)
        assert images["image_mask"][0] and images["pixel_values"].shape == (4, 3, 224, 224)
    assert largest


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_bounded_resizes_give_timm_s_pixels(crop_mode, interpolation):
    processing = HVPNetImageProcessor(
        crop_mode=crop_mode, interpolation=interpolation, image_mean=(0, 0, 0), image_std=(1, 1, 1)
    )
    generator = np.random.default_rng(0)
    # Ordinary shapes take timm's transform itself: the same values, bit for bit.
    for height, width in [(480, 640), (3000, 4000), (20, 40), (1, 1), (7, 300), (300, 14), (1000, 60)]:
        image = Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
        assert torch.equal(processing.preprocess_example(image)["pixel_values"][0], processing.image_transform(image))
    # Strips too long for that are resized over the crop's region only: at most 2 gray levels away.
    for height, width in [(3, 3000), (3000, 3), (27, 3644), (3644, 27), (1, 2000), (2000, 1), (50, 30000)]:
        image = Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
        bounded = processing.preprocess_example(image)["pixel_values"][0]
        torch.testing.assert_close(bounded, processing.image_transform(image), atol=2 / 255 + 1e-6, rtol=0)


@pytest.mark.parametrize(
    "empty",
    [np.zeros((0, 5, 3), np.uint8), np.zeros((5, 0), np.uint8), Image.new("RGB", (0, 0))],
    ids=["0x5 array", "5x0 array", "0x0 PIL image"],
)
def test_images_without_pixels_are_masked_or_named(empty, caplog):
    processing = image_processor()
    crop = Image.new("RGB", (8, 8), (255, 0, 0))
    with caplog.at_level(logging.WARNING, logger="hvpnet_hf.image_processing_hvpnet"):
        images = processing.preprocess_example(crop, [crop, empty])
    assert images["image_mask"].tolist() == [True, True, False, False]
    assert images["pixel_values"][2].abs().sum() == 0
    assert "'objects'[1] has no pixels" in caplog.text
    with pytest.raises(ValueError, match=r"'objects'\[1\] has no pixels \(\d x \d\)"):
        processing.preprocess_example(crop, [crop, empty], missing_images="error")
    with pytest.raises(ValueError, match=r"'image' has no pixels"):
        processing.preprocess_example(empty, missing_images="error")


# ---------------------------------------------------------------- datasets Image() values, URLs, several images


def image_feature_value(path, with_path: bool = True) -> dict:
    """What `datasets.Image(decode=False)` stores of an embedded image file: its bytes, and its path or None."""
    return {"bytes": path.read_bytes(), "path": str(path) if with_path else None}


def test_embedded_bytes_decode_exactly_as_their_file(tmp_path):
    generator = np.random.default_rng(0)
    png, jpeg = tmp_path / "noise.png", tmp_path / "noise.jpg"
    Image.fromarray(generator.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(png)
    Image.open(png).save(jpeg, quality=90)
    sideways = sideways_photo(tmp_path / "phone.jpg")
    processing = image_processor(crop_mode="squash")
    for path in (png, jpeg, sideways):
        from_file = processing.preprocess_example(path, [path])
        for value in (image_feature_value(path), image_feature_value(path, with_path=False), {"path": str(path)}):
            from_value = processing.preprocess_example(value, [value])
            assert from_value["image_mask"].tolist() == [True, True, False, False]
            torch.testing.assert_close(from_value["pixel_values"], from_file["pixel_values"], rtol=0, atol=0)
    # The EXIF orientation applies to bytes as to files: upright, 20 wide and 40 high.
    assert load_image(sideways.read_bytes()).size == (20, 40)
    # Bytes win over the path, which may name a file of the machine where the data set was made.
    elsewhere = {"bytes": png.read_bytes(), "path": str(tmp_path / "gone" / "noise.png")}
    torch.testing.assert_close(
        processing.preprocess_example(elsewhere)["pixel_values"], processing.preprocess_example(png)["pixel_values"]
    )


def test_unreadable_bytes_are_masked_or_named_by_slot_and_path(tmp_path, monkeypatch, caplog):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (200, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # the decompression-bomb limit, lowered as above
    bomb = image_feature_value(path)
    with caplog.at_level(logging.WARNING, logger="hvpnet_hf.image_processing_hvpnet"):
        masked = image_processor().preprocess_example(None, [None, bomb])
    assert masked["image_mask"].tolist() == [False, False, False, False]
    assert "'objects'[1] (the bytes of " in caplog.text and "decompression bomb" in caplog.text
    with pytest.raises(OSError, match=r"Cannot read image 'objects'\[1\] \(the bytes of .*bomb.png\):.*decompression"):
        image_processor().preprocess_example(None, [None, bomb], missing_images="error")
    with pytest.raises(OSError, match=r"Cannot read image 'image' \(7 bytes\)"):
        image_processor().preprocess_example({"bytes": b"not png", "path": None}, missing_images="error")


def test_empty_values_are_absent_images():
    absent = [None, "", {"bytes": None, "path": None}, {"bytes": None, "path": ""}]
    images = image_processor().preprocess_example(absent[0], absent[1:], missing_images="error")
    assert images["image_mask"].tolist() == [False] * 4
    assert images["pixel_values"].abs().sum() == 0


@pytest.mark.parametrize("policy", ["mask", "error"])
def test_urls_are_refused_by_slot_under_either_policy(policy):
    # A column of URLs is a data setting to fix, not a few missing files: masking it would train without images.
    url = "https://example.com/photo.jpg"
    with pytest.raises(ValueError, match=r"'image'\[1\] is a URL \(https://example.com/photo.jpg\).*download them"):
        image_processor().preprocess_example([None, url], missing_images=policy)
    with pytest.raises(ValueError, match=r"'objects'\[0\] is a URL \(hf://datasets/a/b/c.png\)"):
        image_processor().preprocess_example(None, [{"bytes": None, "path": "hf://datasets/a/b/c.png"}], policy)
    # A Windows drive is a path, not a URL scheme.
    assert image_processor().preprocess_example("C://photos/none.jpg", missing_images="mask")["image_mask"].sum() == 0


def test_values_of_other_types_are_named_by_slot():
    with pytest.raises(TypeError, match=r"'image'\[0\] must be a PIL image, .* got int"):
        image_processor().preprocess_example([3])
    with pytest.raises(TypeError, match=r"'objects'\[0\] must be a datasets Image\(\) value .* got keys \['src'\]"):
        image_processor().preprocess_example(None, [{"src": "a.png"}])


def colored(value: int) -> Image.Image:
    return Image.new("L", (8, 8), value)


def test_several_images_fill_the_slots_in_order_ahead_of_the_crops(caplog):
    processing = image_processor(num_object_images=3)
    pictures, crops = [colored(0), colored(100)], [colored(200), colored(250)]
    slots, num_dropped = image_slots(pictures, crops, num_object_images=3)
    assert [name for name, _ in slots] == ["'image'[0]", "'image'[1]", "'objects'[0]", "'objects'[1]"]
    assert num_dropped == 0
    images = processing.preprocess_example(pictures, crops)
    one_by_one = [processing.preprocess_example(image)["pixel_values"][0] for image in [*pictures, *crops]]
    torch.testing.assert_close(images["pixel_values"], torch.stack(one_by_one), rtol=0, atol=0)
    # Slots left over after the pictures and crops are padded; an empty list is no image.
    assert processing.preprocess_example([colored(0)], [])["image_mask"].tolist() == [True, False, False, False]
    assert processing.preprocess_example([], [colored(0)])["image_mask"].tolist() == [False, True, False, False]
    # Six pictures for four slots: the first four are used, the two others dropped, counted and logged.
    six = [colored(40 * position) for position in range(6)]
    with caplog.at_level(logging.WARNING, logger="hvpnet_hf.image_processing_hvpnet"):
        slots, num_dropped = image_slots(six, crops, num_object_images=3)
    assert [image for _, image in slots] == six[:4] and num_dropped == 2
    assert "has 6 images but 4 image slots" in caplog.text and "its last 2 are not used" in caplog.text
    torch.testing.assert_close(
        processing.preprocess_example(six, crops)["pixel_values"],
        torch.stack([processing.preprocess_example(image)["pixel_values"][0] for image in six[:4]]),
    )
