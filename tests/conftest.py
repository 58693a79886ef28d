"""Fixtures several test modules share: random tiny models saved as model folders, which tests only read."""

import pytest
import torch
from modeling_utils import tiny_model_folder


@pytest.fixture(scope="session")
def tiny_ner_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_ner")
    tiny_model_folder(folder, "ner")
    return str(folder)


@pytest.fixture(scope="session")
def tiny_re_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_re")
    tiny_model_folder(folder, "re")
    return str(folder)


@pytest.fixture(scope="session")
def tiny_gmner_dir(tmp_path_factory) -> str:
    """A tiny grounding model trained on the toy batch of `test_grounding_model.py` (Alice's region is the red crop,
    Bob's the blue one, Paris has none), saved with its processor and pipeline code."""
    from PIL import Image
    from test_grounding_model import grounded_model_and_processor, toy_batch

    from hvpnet_hf import MultimodalGroundedNerPipeline

    folder = tmp_path_factory.mktemp("tiny_gmner")
    image = folder / "tweet.png"
    Image.new("RGB", (64, 48), (30, 160, 60)).save(image)
    model, processor = grounded_model_and_processor()
    batch = toy_batch(processor, str(image))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    image.unlink()
    MultimodalGroundedNerPipeline(model=model.eval(), processor=processor).save_pretrained(folder)
    return str(folder)
