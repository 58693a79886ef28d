"""`ObjectCropper` on images of every shape, with a stand-in detector (the detectors themselves are tested in
test_extract_objects.py)."""

import numpy as np
import pytest
from PIL import Image
from transformers import Pipeline

from hvpnet_hf.object_detection import DETECTION_MAX_SIDE, ObjectCropper


class HalfImageDetector(Pipeline):
    """A stand-in closed-vocabulary detector: finds the first half of any image along its longer side (the left or
    the top half), and records the sizes it saw."""

    def __init__(self):  # no model: only what `ObjectCropper` reads
        self.seen_sizes: list[tuple[int, int]] = []

    def __call__(self, image: Image.Image, **kwargs) -> list[dict]:
        self.seen_sizes.append(image.size)
        wide = image.width >= image.height
        box = {
            "xmin": 0,
            "ymin": 0,
            "xmax": image.width / (2 if wide else 1),
            "ymax": image.height / (1 if wide else 2),
        }
        return [{"score": 0.9, "label": "thing", "box": box}]

    def _sanitize_parameters(self, **kwargs):
        raise NotImplementedError

    def preprocess(self, inputs):
        raise NotImplementedError

    def _forward(self, inputs):
        raise NotImplementedError

    def postprocess(self, outputs):
        raise NotImplementedError


@pytest.mark.parametrize("size", [(40000, 1), (1, 40000), (9000, 6000)])
def test_large_images_are_detected_in_scaled_down_and_cut_at_full_size(size):
    detector = HalfImageDetector()
    cropper = ObjectCropper(detector, min_size=1)
    crops = cropper.crops(Image.new("RGB", size))
    assert max(detector.seen_sizes[0]) == DETECTION_MAX_SIDE
    # The box is mapped back to the image's own pixels: its first half along the longer side.
    half = (size[0] // 2, size[1]) if size[0] >= size[1] else (size[0], size[1] // 2)
    assert [crop.size for crop in crops] == [half]


def test_ordinary_images_are_detected_as_they_are():
    detector = HalfImageDetector()
    crops = ObjectCropper(detector, min_size=1).crops(Image.new("RGB", (4032, 3024)))
    assert detector.seen_sizes == [(4032, 3024)] and [crop.size for crop in crops] == [(2016, 3024)]


@pytest.mark.parametrize("empty", [np.zeros((0, 5, 3), np.uint8), Image.new("RGB", (0, 0))], ids=["0x5", "0x0"])
def test_images_without_pixels_get_no_crops(empty):
    detector = HalfImageDetector()
    assert ObjectCropper(detector, min_size=1).crops(empty) == [] and detector.seen_sizes == []
