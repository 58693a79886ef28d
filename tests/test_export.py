"""torch.export and torch.compile of HVPNetModel with images.

Exported and compiled graphs take the masked prefix path (every image through the backbone, absent ones masked
out), eager PyTorch the skipping one; comparing the two checks that they give the same outputs."""

import torch
from modeling_utils import tiny_config, tiny_inputs
from torch.export import Dim

from hvpnet_hf import HVPNetModel


def stacked_inputs(batch_size: int, text_length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Text with padding, the global image and two crops per example, some of them absent (and the last example
    without any image)."""
    inputs = tiny_inputs(batch_size, text_length, seed=seed)
    image_mask = torch.ones(inputs["pixel_values"].shape[:2], dtype=torch.bool)
    image_mask[0, -1] = False
    image_mask[-1] = False
    return {**inputs, "image_mask": image_mask}


def tiny_model() -> HVPNetModel:
    torch.manual_seed(0)
    return HVPNetModel(tiny_config()).eval()


def assert_same_states(exported: torch.nn.Module, model: HVPNetModel, inputs: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        actual = exported(**inputs).last_hidden_state
    # The same float32 kernels; the backbone runs on more images at once in the graph, which may change the
    # summation order of its convolutions: rounding only.
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_export_with_images_at_a_fixed_size_matches_eager():
    model = tiny_model()
    inputs = stacked_inputs(3, 9)
    with torch.no_grad():
        program = torch.export.export(model, (), inputs)
    assert_same_states(program.module(), model, inputs)


def test_export_with_images_at_dynamic_batch_size_and_text_length():
    model = tiny_model()
    batch, text = Dim("batch", min=1, max=16), Dim("text", min=2, max=model.config.text_config.max_position_embeddings)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: text},
        "attention_mask": {0: batch, 1: text},
        "pixel_values": {0: batch},
        "image_mask": {0: batch},
    }
    with torch.no_grad():
        program = torch.export.export(model, (), stacked_inputs(3, 9), dynamic_shapes=dynamic_shapes)
    for batch_size, text_length in ((2, 5), (4, 13)):
        assert_same_states(program.module(), model, stacked_inputs(batch_size, text_length, seed=batch_size))


def test_prefix_encoder_compiles_as_one_graph_with_the_eager_outputs():
    encoder = tiny_model().visual_encoder
    inputs = stacked_inputs(3, 9)
    images, present = inputs["pixel_values"], inputs["image_mask"]
    with torch.no_grad():
        explanation = torch._dynamo.explain(encoder)(images, present)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        # The "eager" backend runs the captured graph without generating code: the masked path, cheaply.
        compiled = torch.compile(encoder, backend="eager", fullgraph=True)(images, present)
        expected = encoder(images, present)
    for name in ("keys", "values", "gate_weights"):
        torch.testing.assert_close(getattr(compiled, name), getattr(expected, name), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(compiled.mask, expected.mask)
