"""prefix_mode="original": the visual prefix and forward of the authors' released code (zjunlp/HVPNeT)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from modeling_utils import TINY_TEXT
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizer, DynamicCache

from hvpnet_hf import (
    MNER_LABELS,
    HVPNetConfig,
    HVPNetForTokenClassification,
    HVPNetModel,
    HVPNetProcessor,
    load_mner_dataset,
)

SAMPLE_TWITTER = Path(__file__).resolve().parents[1] / "hvpnet_hf" / "sample_data" / "twitter"

TEXT = {**TINY_TEXT, "num_hidden_layers": 3}
# float32 sums over a few hundred terms: differences of ~1e-6 are rounding, not layout.
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def tiny_config(**overrides) -> HVPNetConfig:
    """A 3-layer BERT of width 32 with timm's `test_resnet`, in original prefix mode unless overridden."""
    settings = {
        "text_config": dict(TEXT),
        "vision_backbone": "test_resnet",
        "prefix_mode": "original",
        "num_object_images": 2,
    }
    return HVPNetConfig(**{**settings, **overrides})


def original_model(seed: int = 0, **overrides) -> HVPNetModel:
    torch.manual_seed(seed)
    return HVPNetModel(tiny_config(**overrides)).eval()


def images(batch_size: int, num_images: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, num_images, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_prefix(encoder: nn.Module, global_images: torch.Tensor, crops: torch.Tensor) -> list:
    """The original `get_visual_prompt` of zjunlp/HVPNeT, written out image by image and layer by layer: returns
    one (key, value) pair (B, H, P, h) per layer."""
    batch_size = len(global_images)
    hidden, heads, layers = TEXT["hidden_size"], TEXT["num_attention_heads"], TEXT["num_hidden_layers"]
    chunks = encoder.num_stages

    def prompt_chunks(image: torch.Tensor) -> tuple:
        pooled = []
        for feature_map in encoder.backbone(image):
            kernel = feature_map.shape[2] // 2
            pooled.append(nn.AvgPool2d(kernel_size=(kernel, kernel), stride=kernel)(feature_map))
        tokens = torch.cat(pooled, dim=1).view(batch_size, 4, -1)
        return encoder.encoder_conv(tokens).split(2 * hidden, dim=-1)  # c x (B, 4, 2d)

    def gated(split: tuple, layer: int) -> torch.Tensor:
        gate = nn.Linear(4 * 2 * hidden, chunks)
        gate.weight.data = encoder.gate.weight[layer * chunks : (layer + 1) * chunks]
        gate.bias.data = encoder.gate.bias[layer * chunks : (layer + 1) * chunks]
        summed = torch.stack(split).sum(0).view(batch_size, -1) / chunks
        weights = nn.functional.softmax(nn.functional.leaky_relu(gate(summed)), dim=-1)
        result = torch.zeros_like(split[0])
        for index in range(chunks):
            result = result + weights[:, index].view(-1, 1, 1) * split[index]
        return result

    global_split = prompt_chunks(global_images)
    crop_splits = [prompt_chunks(crop) for crop in crops.permute(1, 0, 2, 3, 4)]
    per_layer = []
    for layer in range(layers):
        key_value = torch.cat([gated(global_split, layer)] + [gated(split, layer) for split in crop_splits], dim=1)
        key, value = key_value.split(hidden, dim=-1)
        head_size = hidden // heads
        per_layer.append(
            (key.reshape(batch_size, heads, -1, head_size), value.reshape(batch_size, heads, -1, head_size))
        )
    return per_layer


def test_pooling_and_raw_view_follow_the_original():
    encoder = original_model().visual_encoder
    torch.manual_seed(0)
    maps = [torch.randn(1, 2, 8, 8), torch.randn(1, 3, 4, 4), torch.randn(1, 2, 7, 7), torch.randn(1, 1, 2, 2)]
    tokens = encoder.pool_feature_maps(maps)
    maps[2][..., 6, :] = 1e6  # a 7x7 map is pooled with kernel 3: its last row and column are never read
    maps[2][..., :, 6] = 1e6
    assert torch.equal(encoder.pool_feature_maps(maps), tokens)

    assert tokens.shape == (1, 4, 8)
    stage_2 = maps[2][0, :, :6, :6].reshape(2, 2, 3, 2, 3).mean(dim=(2, 4))  # (channels, 2, 2)
    channels_first = torch.cat(
        [maps[0][0].reshape(2, 2, 4, 2, 4).mean(dim=(2, 4)), maps[1][0].reshape(3, 2, 2, 2, 2).mean(dim=(2, 4))]
        + [stage_2, maps[3][0]]
    )  # (8, 2, 2)
    # A raw view of the (C, 2, 2) memory: token 0 holds channel 0's four cells, then channel 1's, and so on.
    torch.testing.assert_close(tokens[0], channels_first.flatten().view(4, 8))
    assert not torch.allclose(tokens[0], channels_first.flatten(1).T)  # which a transpose would give


def test_prefix_matches_a_per_image_loop_of_the_original():
    model = original_model()
    # 224 pixels give the original map sizes 56, 28, 14 and 7 (kernel 3 on the last stage).
    pixels = images(2, 3, 224)
    present = torch.tensor([[True, True, True], [True, True, False]])
    prefix = model.visual_encoder(pixels, present)

    crops = pixels[:, 1:].clone()
    crops[1, 1] = 0.0  # the absent crop is an all-zero image
    with torch.no_grad():
        expected = reference_prefix(model.visual_encoder, pixels[:, 0], crops)
    for layer, (key, value) in enumerate(expected):
        torch.testing.assert_close(prefix.keys[layer], key, **TOLERANCE)
        torch.testing.assert_close(prefix.values[layer], value, **TOLERANCE)
    assert prefix.mask.all() and prefix.mask.shape == (2, 12)
    assert prefix.gate_weights.shape == (2, 3, 3, 4)
    torch.testing.assert_close(prefix.gate_weights.sum(-1), torch.ones(2, 3, 3))


def test_forward_equals_bert_with_the_prefix_as_past_key_values():
    """The original passes the prefix to BERT as `past_key_values`, with the mask [ones(P); text_mask] and text
    positions pinned to start at 0."""
    model = original_model()
    input_ids = torch.randint(5, 99, (2, 9), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    pixels = images(2, 3, 64)
    with torch.no_grad():
        output = model(input_ids, attention_mask, pixel_values=pixels[:, 0], object_pixel_values=pixels[:, 1:])
        prefix = model.visual_encoder(pixels, torch.ones(2, 3, dtype=torch.bool))

    bert = BertModel(model.config.text_config, add_pooling_layer=True)
    bert.load_state_dict(model.text_model.state_dict())
    bert.eval()
    cache = DynamicCache()
    for layer in range(TEXT["num_hidden_layers"]):
        cache.update(prefix.keys[layer], prefix.values[layer], layer)
    with torch.no_grad():
        expected = bert(
            input_ids,
            attention_mask=torch.cat([torch.ones(2, prefix.keys.shape[3], dtype=torch.long), attention_mask], dim=1),
            position_ids=torch.arange(9).expand(2, -1),
            past_key_values=cache,
        ).last_hidden_state
    torch.testing.assert_close(output.last_hidden_state, expected, **TOLERANCE)


def test_absent_crops_are_zero_images_that_stay_attended():
    model = original_model()
    input_ids = torch.randint(5, 99, (2, 7), generator=torch.Generator().manual_seed(4))
    pixels = images(2, 3, 64)
    zeroed = pixels.clone()
    zeroed[:, 2] = 0.0
    with torch.no_grad():
        masked = model(input_ids, pixel_values=pixels[:, 0], object_pixel_values=pixels[:, 1:],
                       object_mask=torch.tensor([[True, False], [True, False]])).last_hidden_state  # fmt: skip
        as_zero_image = model(
            input_ids, pixel_values=pixels[:, 0], object_pixel_values=zeroed[:, 1:]
        ).last_hidden_state
        one_crop_given = model(
            input_ids, pixel_values=pixels[:, 0], object_pixel_values=pixels[:, 1:2]
        ).last_hidden_state
        text_only = model(input_ids).last_hidden_state
    torch.testing.assert_close(masked, as_zero_image, **TOLERANCE)
    torch.testing.assert_close(one_crop_given, as_zero_image, **TOLERANCE)
    # Unlike the paper mode, a masked image still changes the result: its zero image is attended.
    with torch.no_grad():
        global_only = model(input_ids, pixel_values=pixels[:, 0]).last_hidden_state
    assert (global_only - text_only).abs().max() > 1e-3


def test_images_too_small_for_the_pooling_grid_raise():
    model = original_model()
    # test_resnet's last stage is 1x1 for 32-pixel images: kernel 1 // 2 = 0.
    with pytest.raises(ValueError, match="prefix_mode='original' pools backbone stage 3"):
        model(torch.tensor([[2, 7, 3]]), pixel_values=torch.zeros(1, 3, 32, 32))


def test_torchvision_resnet50_weights_give_the_same_stages():
    """The original's backbone is torchvision's resnet50; its weights (without `fc`) load into timm's by name."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    backbone = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(-4, -3, -2, -1))
    weights = {name: value for name, value in reference.state_dict().items() if not name.startswith("fc.")}
    backbone.load_state_dict(weights, strict=True)
    backbone.eval()
    pixels = torch.randn(1, 3, 64, 64)
    expected, x = [], pixels
    with torch.no_grad():
        for name, layer in reference.named_children():
            if name in ("avgpool", "fc"):
                continue
            x = layer(x)
            if name.startswith("layer"):
                expected.append(x)
        stages = backbone(pixels)
    for stage, stage_expected in zip(stages, expected, strict=True):
        torch.testing.assert_close(stage, stage_expected, **TOLERANCE)


def test_saved_model_loads_with_trust_remote_code_only(tmp_path):
    """The saved folder carries the modeling code, original mode included, so it loads where hvpnet_hf is not importable."""
    model = original_model()
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "modeling_hvpnet.py").exists()
    input_ids = torch.tensor([[2, 11, 12, 13, 3]])
    pixels = images(1, 3, 64)
    with torch.no_grad():
        expected = model(input_ids, pixel_values=pixels[:, 0], object_pixel_values=pixels[:, 1:]).last_hidden_state
    torch.save({"input_ids": input_ids, "pixels": pixels, "expected": expected}, tmp_path / "case.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hvpnet_hf"] = None  # any import of the installed package fails
        import torch
        from transformers import AutoModel
        case = torch.load({str(tmp_path / "case.pt")!r})
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(model.visual_encoder).__name__ == "HVPNetOriginalVisualPrefixEncoder"
        assert not type(model).__module__.startswith("hvpnet_hf")
        with torch.no_grad():
            pixels = case["pixels"]
            output = model(case["input_ids"], pixel_values=pixels[:, 0], object_pixel_values=pixels[:, 1:])
        torch.testing.assert_close(output.last_hidden_state, case["expected"], atol=1e-5, rtol=1e-5)
        print("remote code ok")
        """
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code ok" in result.stdout


def sample_ner_batch(tmp_path: Path, num_examples: int) -> dict:
    """The first training tweets of the bundled sample set with their images and crops, encoded with a word-level
    vocabulary built from them (nothing is downloaded)."""
    train = load_mner_dataset(
        data_files={"train": SAMPLE_TWITTER / "train.txt"},
        image_dir=SAMPLE_TWITTER / "images",
        object_dir=SAMPLE_TWITTER / "aux_images" / "train" / "crops",
        object_maps={"train": SAMPLE_TWITTER / "twitter_train_dict.pth"},
    )["train"].select(range(num_examples))
    words = sorted({word.lower() for tokens in train["tokens"] for word in tokens})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    processor = HVPNetProcessor(BertTokenizer(str(tmp_path / "vocab.txt")), image_size=64, num_object_images=2)
    return dict(processor(train["tokens"], train["image"], train["objects"], tags=train["ner_tags"]))


@pytest.mark.parametrize("prefix_mode", ["pyramid", "original"])
def test_paper_and_original_modes_learn_the_sample_set(tmp_path, prefix_mode):
    batch = sample_ner_batch(tmp_path, num_examples=12)
    # The images really take part: most global images (slot 0) and some crops are present.
    assert batch["image_mask"][:, 0].sum() > 8 and batch["image_mask"][:, 1:].any()
    text_config = BertConfig(**{**TEXT, "vocab_size": int(batch["input_ids"].max()) + 1})
    torch.manual_seed(0)
    model = HVPNetForTokenClassification(
        tiny_config(text_config=text_config, prefix_mode=prefix_mode, num_labels=len(MNER_LABELS))
    )

    def evaluation_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch).loss.item()

    initial = evaluation_loss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(6):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    # Measured: 33.9 -> 14.8 (pyramid) and 35.8 -> 15.5 (original) after six full-batch steps; 0.7 leaves room for
    # other machines' rounding while a model that does not learn stays near its initial loss.
    assert evaluation_loss() < 0.7 * initial
