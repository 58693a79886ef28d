"""Numpy images reach the pipelines like PIL images (the processor's conversion is tested in test_processing.py)."""

import numpy as np
import pytest
import torch
from modeling_utils import tiny_model_folder
from PIL import Image
from transformers import pipeline

import hvpnet_hf  # noqa: F401  (registers the pipelines)


@pytest.mark.parametrize("task", ["ner", "re"])
def test_pipelines_take_numpy_images_like_pil_images(tmp_path, task):
    tiny_model_folder(tmp_path, task)
    generator = np.random.default_rng(0)
    array = generator.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = generator.integers(0, 256, (12, 12), dtype=np.uint8)
    example = {"words": ["Kevin", "Durant", "in", "Boston"]}
    if task == "re":
        example.update(head=(0, 2), tail=(3, 4))
    runner = pipeline("multimodal-ner" if task == "ner" else "multimodal-re", model=str(tmp_path))
    calls = []
    original_forward = runner.model.forward

    def recording_forward(**inputs):
        calls.append({name: value.clone() for name, value in inputs.items() if torch.is_tensor(value)})
        return original_forward(**inputs)

    runner.model.forward = recording_forward
    from_arrays = runner({**example, "image": array, "objects": [gray]})
    from_pil = runner({**example, "image": Image.fromarray(array), "objects": [Image.fromarray(gray)]})
    assert from_arrays == from_pil
    assert calls[0]["image_mask"][0].tolist() == [True, True, False]
    torch.testing.assert_close(calls[0]["pixel_values"], calls[1]["pixel_values"])
