"""The models under bfloat16 autocast on CPU (what `Trainer`'s `--bf16` does) against float32."""

import pytest
import torch
from modeling_utils import tiny_config, tiny_inputs

from hvpnet_hf import HVPNetForSequenceClassification, HVPNetForTokenClassification

# bfloat16 keeps 8 significant bits: every matmul rounds by up to 2**-8 (0.4%) of its size. Through 4 layers the
# logits may drift by a few of those steps; 5% of the largest logit leaves room for that and still fails when a
# part of the model breaks (a dropped prefix moves the logits by far more, see test_modeling.py).
RELATIVE_TOLERANCE = 0.05


def ner_inputs() -> dict:
    inputs = tiny_inputs()
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, inputs["input_ids"].shape, generator=generator)
    inputs["labels"] = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    inputs["object_mask"] = torch.tensor([[True, False], [True, True], [False, False]])
    return inputs


@pytest.mark.parametrize("prefix_mode", ["pyramid", "original"])
def test_token_classification_under_bf16_autocast(prefix_mode):
    torch.manual_seed(0)
    model = HVPNetForTokenClassification(tiny_config(prefix_mode=prefix_mode)).eval()
    inputs = ner_inputs()
    reference = model(**inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(**inputs)
    assert mixed.logits.dtype == torch.bfloat16, "autocast is active"
    assert mixed.loss.dtype == torch.float32, "the CRF loss stays in float32"
    scale = reference.logits.abs().max().item()
    torch.testing.assert_close(mixed.logits.float(), reference.logits, atol=RELATIVE_TOLERANCE * scale, rtol=0)
    assert mixed.loss.item() == pytest.approx(reference.loss.item(), rel=RELATIVE_TOLERANCE)


def test_relation_classification_trains_under_bf16_autocast():
    torch.manual_seed(0)
    model = HVPNetForSequenceClassification(tiny_config(relation_pooling="cls", num_labels=4)).train()
    inputs = tiny_inputs()
    inputs["labels"] = torch.tensor([0, 3, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    assert loss.dtype == torch.float32
    loss.backward()
    gradient = model.hvpnet.visual_encoder.key_value_weight.grad
    assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0
