"""`speed_up_frozen_backbone` keeps the outputs and the saved weights of the model it speeds up, is applied by the code
that runs a model (pipelines, trainer, feature cache), and is safe for threads; the bfloat16 warning comes where
bfloat16 is asked for."""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from modeling_utils import tiny_config, tiny_inputs, tiny_model_folder
from transformers import pipeline

from hvpnet_hf import (
    HVPNetForTokenClassification,
    HVPNetModel,
    HVPNetTrainer,
    HVPNetTrainingArguments,
    frozen_backbone,
)
from hvpnet_hf.frozen_backbone import NormFoldedIntoConvolution, speed_up_frozen_backbone
from hvpnet_hf.vision_backbone import create_feature_backbone

# Folding applies the norm's scale to the weights instead of the maps: float32 rounding moves the features by a few
# 1e-7 of their largest entry; 1e-4 leaves room for the order of the convolutions' sums, which oneDNN may change with
# the weights' layout.
FOLDED = 1e-4
# A backbone held in bfloat16 under autocast (whose convolutions computed in bfloat16 before too): bfloat16 has an
# 8-bit mantissa, and the losses of a tiny model differ by about 1e-3 relative.
BFLOAT16 = 2e-2


def with_trained_norm_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics and affine terms, far from the identity that a new backbone's norms are."""
    generator = torch.Generator().manual_seed(seed)
    for norm in model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            for tensor, low, high in [
                (norm.running_mean, -0.5, 0.5),
                (norm.running_var, 0.5, 2.0),
                (norm.weight, 0.5, 1.5),
                (norm.bias, -0.2, 0.2),
            ]:
                tensor.data.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=generator))
    return model


def resnet18_model(seed: int = 0) -> HVPNetModel:
    torch.manual_seed(seed)
    return with_trained_norm_statistics(HVPNetModel(tiny_config(vision_backbone="resnet18")), seed).eval()


def features(model: HVPNetModel, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.visual_encoder.visual_features(images)


def assert_folded_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=FOLDED, atol=FOLDED * expected.abs().max().item())


def test_a_sped_up_backbone_gives_the_features_and_saves_the_weights_of_the_model_before():
    model = resnet18_model()
    images = torch.randn(5, 3, 64, 64)
    expected = features(model, images)
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    done = speed_up_frozen_backbone(model)
    assert done == frozen_backbone.BackboneSpeedUps(folded_norms=20, channels_last=True, dtype=torch.float32)
    norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert len(norms) == 20 and all(isinstance(norm, NormFoldedIntoConvolution) for norm in norms)
    weights = [parameter for parameter in model.visual_encoder.backbone.parameters() if parameter.dim() == 4]
    assert all(weight.is_contiguous(memory_format=torch.channels_last) for weight in weights)
    assert_folded_close(features(model, images), expected)
    assert model.state_dict().keys() == saved.keys(), "the saved names do not change"
    assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())
    assert speed_up_frozen_backbone(model) == done, "applying it again does nothing more"


def test_a_saved_sped_up_model_loads_into_a_model_as_built(tmp_path):
    model = resnet18_model()
    speed_up_frozen_backbone(model)
    model.save_pretrained(tmp_path)
    reloaded = HVPNetModel.from_pretrained(tmp_path).eval()
    assert not any(isinstance(module, NormFoldedIntoConvolution) for module in reloaded.modules())
    inputs = tiny_inputs()
    with torch.no_grad():
        expected, output = reloaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state
    assert_folded_close(output, expected)


@pytest.mark.parametrize("assign", [False, True])
def test_weights_loaded_after_the_speed_up_are_the_ones_used(assign):
    model, trained = resnet18_model(), resnet18_model(seed=1)
    speed_up_frozen_backbone(model)
    # `assign=True` puts the checkpoint's tensors in place of the parameters, as loading from the meta device does.
    model.visual_encoder.backbone.load_state_dict(trained.visual_encoder.backbone.state_dict(), assign=assign)
    images = torch.randn(2, 3, 64, 64)
    assert_folded_close(features(model, images), features(trained, images))


def test_a_sped_up_backbone_in_training_mode_computes_its_batch_norms():
    model = resnet18_model()
    speed_up_frozen_backbone(model)
    reference = create_feature_backbone(model.config)
    reference.load_state_dict(model.visual_encoder.backbone.state_dict())
    images = torch.randn(4, 3, 64, 64)
    model.visual_encoder.backbone.train()  # not what a frozen encoder does, but what its modules must then compute
    with torch.no_grad():
        expected, maps = reference.train()(images), model.visual_encoder.backbone(images)
    for feature_map, expected_map in zip(maps, expected, strict=True):
        assert_folded_close(feature_map, expected_map)


def test_models_without_a_frozen_backbone_are_left_as_they_are():
    for config in (tiny_config(freeze_vision=False), tiny_config(use_visual_prefix=False)):
        model = HVPNetModel(config)
        saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        assert speed_up_frozen_backbone(model) == frozen_backbone.BackboneSpeedUps(0, False, None)
        assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())
        with pytest.raises(ValueError, match=r"dtype=torch.bfloat16: only a frozen backbone \(freeze_vision=True\)"):
            speed_up_frozen_backbone(model, dtype=torch.bfloat16)


def test_a_backbone_held_in_bfloat16_under_autocast_keeps_the_loss_and_trains_the_prefix_in_float32():
    torch.manual_seed(0)
    model = HVPNetForTokenClassification(tiny_config()).train()
    inputs = tiny_inputs()
    inputs["word_start_mask"] = inputs["attention_mask"].bool()
    inputs["labels"] = torch.where(inputs["attention_mask"].bool(), 0, -100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        expected = model(**inputs)
        assert speed_up_frozen_backbone(model, dtype=torch.bfloat16).dtype == torch.bfloat16
        torch.manual_seed(1)  # the same dropout masks
        held = model(**inputs)
    assert {parameter.dtype for parameter in model.hvpnet.visual_encoder.backbone.parameters()} == {torch.bfloat16}
    assert model.hvpnet.visual_encoder.key_value_projections[0].weight.dtype == torch.float32
    assert held.loss.item() == pytest.approx(expected.loss.item(), rel=BFLOAT16)
    held.loss.backward()
    gradient = model.hvpnet.visual_encoder.key_value_projections[-1].weight.grad
    assert gradient.dtype == torch.float32 and torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_a_sped_up_model_exports_and_compiles():
    model = resnet18_model()
    speed_up_frozen_backbone(model)
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        exported = torch.export.export(model, args=(), kwargs=inputs).module()(**inputs).last_hidden_state
        compiled = torch.compile(model, backend="eager")(**inputs).last_hidden_state
    # The graphs run every image in one backbone call, which may change the order of the convolutions' sums.
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-4)


def test_threads_that_share_a_sped_up_model_run_their_passes_at_the_same_time_and_get_their_own_features():
    model = resnet18_model()
    speed_up_frozen_backbone(model)
    batches = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    alone = [features(model, images) for images in batches]
    # Each pass waits inside the backbone until another thread's pass is inside it too: passes that took turns
    # would never meet there, and the barrier would break.
    inside = threading.Barrier(2, timeout=20)
    stem = next(module for module in model.visual_encoder.backbone.modules() if isinstance(module, torch.nn.Conv2d))

    def meet(*_) -> None:
        inside.wait()

    handle = stem.register_forward_hook(meet)
    with ThreadPoolExecutor(max_workers=2) as pool:
        shared = list(pool.map(lambda images: features(model, images), batches))
    handle.remove()
    for expected, output in zip(alone, shared, strict=True):
        torch.testing.assert_close(output, expected)


def test_the_pipelines_trainer_and_feature_cache_speed_up_their_model(tmp_path, monkeypatch):
    applied = []
    for module in ("hvpnet_hf.pipelines", "hvpnet_hf.training", "hvpnet_hf.feature_cache"):
        monkeypatch.setattr(
            f"{module}.speed_up_frozen_backbone", lambda model, module=module, **kwargs: applied.append(module)
        )
    tiny_model_folder(tmp_path / "ner", "ner")
    tagger = pipeline("multimodal-ner", model=str(tmp_path / "ner"))
    HVPNetTrainer(model=tagger.model, args=HVPNetTrainingArguments(tmp_path / "out", use_cpu=True, report_to=[]))
    from hvpnet_hf import VisualFeatureCache

    VisualFeatureCache(tagger.model, tagger.processor, tmp_path / "cache")
    assert applied == ["hvpnet_hf.pipelines", "hvpnet_hf.training", "hvpnet_hf.feature_cache"]


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_asked_for_on_a_cpu_that_emulates_it_is_warned_once(native, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(frozen_backbone, "cpu_computes_bfloat16_natively", lambda: native)
    logging.Logger.warning_once.cache_clear()  # transformers' once-only cache, shared by every logger
    tiny_model_folder(tmp_path / "ner", "ner")
    with caplog.at_level(logging.WARNING, logger="hvpnet_hf.frozen_backbone"):
        pipeline("multimodal-ner", model=str(tmp_path / "ner"))  # float32: nothing to warn about
        assert "bfloat16" not in caplog.text
        for _ in range(2):  # bfloat16 warns, once
            tagger = pipeline("multimodal-ner", model=str(tmp_path / "ner"), dtype=torch.bfloat16)
        assert caplog.text.count("emulates bfloat16") == (0 if native else 1)
        logging.Logger.warning_once.cache_clear()
        arguments = HVPNetTrainingArguments(tmp_path / "out", use_cpu=True, bf16=True, report_to=[])
        HVPNetTrainer(model=tagger.model.float(), args=arguments)  # so does bf16 training
    assert caplog.text.count("emulates bfloat16") == (0 if native else 2)
