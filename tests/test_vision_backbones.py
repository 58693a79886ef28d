"""
Every kind of timm backbone gives an image-dependent, multi-level visual prefix: CNNs (ResNet, ConvNeXt), a
hierarchical transformer whose maps come channels last (Swin) and plain ViTs with a class token (CLIP ViT-B/16 and
B/32) or a class token and register tokens (DINOv2). The backbones are timm's architectures at tiny random sizes
(`TINY_BACKBONES`); nothing is downloaded.
"""

import pytest
import timm
import torch
from huggingface_hub.errors import StrictDataclassError
from modeling_utils import (
    TINY_BACKBONES,
    TINY_TEXT,
    TINY_VIT,
    VIT_B_LEVELS,
    tiny_images,
    tiny_task_model,
    tiny_vision_config,
)
from PIL import Image
from test_hub_round_trip import run_offline
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from hvpnet_hf import (
    HVPNetConfig,
    HVPNetForTokenClassification,
    HVPNetModel,
    HVPNetProcessor,
    VisualFeatureCache,
    speed_up_frozen_backbone,
)
from hvpnet_hf.pipelines import MultimodalNerPipeline
from hvpnet_hf.vision_backbone import default_out_indices

KINDS = list(TINY_BACKBONES)
PLAIN_VITS = ["clip_vit_b16", "clip_vit_b32", "dinov2_registers"]
# Two float32 runs of the same model on the same inputs may differ by the order of float operations only.
SAME = 1e-5


def differs(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether two tensors differ by more than 0.1% of their largest entry: four orders of magnitude above float32
    noise (some 1e-7 of it). Random different images move a random model's features and states that much (tiny
    DINOv2 blocks start close to identity, so its prefix moves the text states by about 0.5%)."""
    return bool((first - second).abs().max() > 1e-3 * torch.maximum(first.abs().max(), second.abs().max()))


def text_ids(batch_size: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(5, TINY_TEXT["vocab_size"], (batch_size, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def models() -> dict:
    """One tiny random `HVPNetModel` per backbone kind, in eval mode, built on first use."""
    built = {}

    def get(kind: str) -> HVPNetModel:
        if kind not in built:
            torch.manual_seed(0)
            built[kind] = HVPNetModel(tiny_vision_config(kind)).eval()
        return built[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_default_levels_follow_the_kind_of_backbone(models, kind):
    model = models(kind)
    assert list(model.visual_encoder.backbone.feature_info.out_indices) == TINY_BACKBONES[kind][3]
    assert model.config.vision_out_indices is None, "the configuration keeps None: the backbone's levels follow it"
    assert len(model.visual_encoder.stage_channels) == 4


def test_plain_vit_levels_are_spread_over_its_depth():
    vit = {"embed_dim": 16, "num_heads": 1, "img_size": 32}
    assert default_out_indices("vit_base_patch16_clip_224", {**vit, "depth": 24}) == [5, 11, 17, 23]
    assert default_out_indices("vit_base_patch16_clip_224", {**vit, "depth": 6}) == [0, 2, 3, 5]
    assert default_out_indices("vit_base_patch16_clip_224", {**vit, "depth": 3}) == [0, 1, 2]
    assert default_out_indices("resnet50", {}) == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", KINDS)
def test_every_level_and_layer_of_the_prefix_depends_on_the_image(models, kind):
    model = models(kind)
    encoder = model.visual_encoder
    images = tiny_images(kind, batch_size=1, num_images=2)
    with torch.no_grad():
        features = encoder.visual_features(images[0])  # the two images: (2, g*g, C)
        prefix = model.visual_prefix(images.transpose(0, 1), None, batch_size=2)
    for level in features.split(encoder.stage_channels, dim=2):
        assert differs(level[0], level[1])
    for layer_keys, layer_values in zip(prefix.keys, prefix.values, strict=True):
        assert differs(layer_keys[0], layer_keys[1])
        assert differs(layer_values[0], layer_values[1])


@pytest.mark.parametrize("kind", KINDS)
def test_masked_images_give_the_text_only_states_and_present_ones_change_them(models, kind):
    model = models(kind)
    ids, images = text_ids(), tiny_images(kind)
    with torch.no_grad():
        text_only = model(ids).last_hidden_state
        masked = model(ids, pixel_values=images, image_mask=torch.zeros(images.shape[:2], dtype=torch.bool))
        with_images = model(ids, pixel_values=images).last_hidden_state
    assert (masked.last_hidden_state - text_only).abs().max() <= SAME
    assert differs(with_images, text_only)


def full_timm_model(model: HVPNetModel) -> torch.nn.Module:
    """The whole timm model (`features_only=False`) of the model's backbone, with the backbone's weights."""
    config = model.config
    full = timm.create_model(config.vision_backbone, pretrained=False, **config.vision_model_args).eval()
    # timm's feature wrappers rename the modules they keep: "layers_0" for "layers.0" (Swin), "model." ahead (ViT).
    weights = {
        name.removeprefix("model.").replace("layers_", "layers."): weight
        for name, weight in model.visual_encoder.backbone.state_dict().items()
    }
    missing, unexpected = full.load_state_dict(weights, strict=False)
    assert not unexpected and all(name.split(".")[0] in ("norm", "head", "fc_norm") for name in missing), missing
    return full


def test_swin_levels_are_its_stage_maps_channels_first():
    torch.manual_seed(0)
    model = HVPNetModel(tiny_vision_config("swin", prefix_grid=1)).eval()
    images = tiny_images("swin")[0]
    with torch.no_grad():
        # timm's own channels-first intermediates of the whole Swin are the reference.
        maps = full_timm_model(model).forward_intermediates(images, output_fmt="NCHW", intermediates_only=True)
        features = model.visual_encoder.visual_features(images)  # prefix_grid=1: each level's spatial mean
    expected = torch.cat([feature_map.mean(dim=(2, 3)) for feature_map in maps], dim=1)
    assert features.shape == (len(images), 1, expected.shape[1])
    assert (features[:, 0] - expected).abs().max() <= SAME


@pytest.mark.parametrize("kind", PLAIN_VITS)
def test_vit_levels_are_grids_of_patch_tokens_without_class_or_register_tokens(models, kind):
    model = models(kind)
    vit = full_timm_model(model)
    assert vit.num_prefix_tokens == (5 if kind == "dinov2_registers" else 1)  # class token (+ 4 registers)
    images = tiny_images(kind)[0]
    with torch.no_grad():
        maps = model.visual_encoder.backbone(images)
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        block_outputs = []
        for block in vit.blocks:
            tokens = block(tokens)
            block_outputs.append(tokens)
    side = TINY_BACKBONES[kind][2] // vit.patch_embed.patch_size[0]
    for feature_map, index in zip(maps, model.visual_encoder.backbone.feature_info.out_indices, strict=True):
        patches = block_outputs[index][:, vit.num_prefix_tokens :]
        expected = patches.transpose(1, 2).reshape(len(images), -1, side, side)
        assert feature_map.shape == expected.shape
        assert (feature_map - expected).abs().max() <= SAME


@pytest.mark.parametrize("kind", KINDS)
def test_ablations_chunking_and_cached_features_work_with_every_backbone(models, kind):
    ids, images = text_ids(), tiny_images(kind)
    model = models(kind)
    with torch.no_grad():
        text_only = model(ids).last_hidden_state
        reference = model(ids, pixel_values=images).last_hidden_state
        # The cached-feature path: what `VisualFeatureCache` stores, given instead of the pixels.
        features = model.visual_encoder.visual_features(images.flatten(0, 1))
        cached = model(ids, image_features=features.view(*images.shape[:2], *features.shape[1:]))
    assert (cached.last_hidden_state - reference).abs().max() <= SAME
    for overrides in ({"vision_chunk_size": 1}, {"vision_chunk_size": None}):
        chunked = HVPNetModel(tiny_vision_config(kind, **overrides)).eval()
        chunked.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (chunked(ids, pixel_values=images).last_hidden_state - reference).abs().max() <= SAME
    for overrides in ({"prefix_mode": "flat"}, {"prefix_mode": "one_to_three"}, {"use_global_image": False}):
        ablation = HVPNetModel(tiny_vision_config(kind, **overrides)).eval()
        with torch.no_grad():
            output = ablation(ids, pixel_values=images, output_gate_weights=True)
        assert differs(output.last_hidden_state, text_only), overrides
        assert output.gate_weights.shape[:2] == (2, 2 if "use_global_image" in overrides else 3)


@pytest.mark.parametrize("kind", ["swin", "dinov2_registers"])
def test_the_feature_cache_serves_what_the_backbone_gives_the_pixels(models, kind, tmp_path):
    model = models(kind)
    side = TINY_BACKBONES[kind][2]
    processor = HVPNetProcessor(tiny_task_model("ner")[1].tokenizer, image_size=side, num_object_images=2)
    paths = []
    for index, color in enumerate([(200, 40, 30), (10, 120, 250)]):
        paths.append(tmp_path / f"{index}.png")
        Image.new("RGB", (side + 10, side), color).save(paths[-1])
    cache = VisualFeatureCache(model, processor, tmp_path / "cache").build(paths)
    features, present = cache.example_features(paths[0], [paths[1]])
    images = processor.image_processor.preprocess_example(paths[0], [paths[1]])
    with torch.no_grad():
        expected = model.visual_encoder.visual_features(images["pixel_values"][:2])
    assert present.tolist() == [True, True, False]
    assert (features[:2] - expected).abs().max() <= SAME
    assert differs(features[0], features[1])


@pytest.mark.parametrize(
    "backbone, model_args",
    [("resnet_with_a_typo", {}), ("inception_v3", {"aux_logits": True}), ("test_resnet", {"no_such_argument": 1})],
)
def test_a_backbone_timm_cannot_build_as_a_feature_extractor_is_refused_by_name(backbone, model_args):
    with pytest.raises(ValueError, match=f"vision_backbone '{backbone}': timm cannot build it with features_only"):
        HVPNetModel(tiny_vision_config("cnn", vision_backbone=backbone, vision_model_args=model_args))


def test_model_args_that_the_config_sets_itself_are_refused():
    with pytest.raises(StrictDataclassError, match=r"must not set \['features_only', 'out_indices'\]"):
        tiny_vision_config("cnn", vision_model_args={"out_indices": [1], "features_only": False})
    with pytest.raises(StrictDataclassError, match="vision_out_indices must be None"):
        tiny_vision_config("cnn", vision_out_indices=[])
    with pytest.raises(StrictDataclassError, match="names a level twice"):
        tiny_vision_config("cnn", vision_out_indices=[1, 1])


@pytest.mark.parametrize("kind", ["swin", "clip_vit_b16"])
def test_original_prefix_mode_is_refused_where_its_pooling_does_not_apply(kind):
    backbone = TINY_BACKBONES[kind][0]
    layout = "channels-last maps" if kind == "swin" else "several levels of one resolution"
    with pytest.raises(ValueError, match=f"vision_backbone '{backbone}' gives {layout}"):
        HVPNetModel(tiny_vision_config(kind, prefix_mode="original"))


def test_image_processor_follows_the_data_config_of_a_cnn_and_of_a_clip_vit():
    tokenizer = tiny_task_model("ner")[1].tokenizer
    cnn = HVPNetProcessor.from_backbone(tokenizer, "resnet50").image_processor
    clip = HVPNetProcessor.from_backbone(tokenizer, "vit_base_patch16_clip_224.openai").image_processor
    dinov2 = HVPNetProcessor.from_backbone(tokenizer, "vit_base_patch14_dinov2.lvd142m").image_processor
    assert (cnn.image_mean, cnn.image_std) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert (clip.image_mean, clip.image_std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    # What timm's pretrained configs say: resnet50 (a1_in1k) crops 95%, CLIP 90%, DINOv2 takes 518 px whole.
    assert (cnn.image_size, cnn.crop_pct, cnn.interpolation, cnn.crop_mode) == (224, 0.95, "bicubic", "center")
    assert (clip.image_size, clip.crop_pct, clip.interpolation, clip.crop_mode) == (224, 0.9, "bicubic", "center")
    assert (dinov2.image_size, dinov2.crop_pct) == (518, 1.0)
    gray = Image.new("RGB", (300, 250), (128, 128, 128))
    for image_processor, mean, std in (
        (cnn, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        (clip, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ):
        pixels = image_processor.preprocess_example(gray)["pixel_values"][0]
        expected = (128 / 255 - torch.tensor(mean)) / torch.tensor(std)
        # A constant image stays constant through resize and crop; 1e-5 is float32 rounding of the normalization.
        assert (pixels - expected[:, None, None]).abs().max() <= SAME


def test_a_local_checkpoint_loads_into_a_vit_built_with_model_args(tmp_path):
    config = tiny_vision_config("clip_vit_b16")
    torch.manual_seed(3)
    source = timm.create_model(config.vision_backbone, pretrained=False, **config.vision_model_args)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    model = HVPNetModel(config)
    encoder = model.visual_encoder
    assert not torch.equal(encoder.backbone.model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    encoder.load_pretrained_backbone(str(tmp_path / "vit.pth"), config)
    for name, weight in encoder.backbone.model.state_dict().items():
        assert torch.equal(weight, source.state_dict()[name]), name


def test_a_vit_model_works_from_its_saved_folder_where_hvpnet_hf_cannot_be_imported(tmp_path):
    """Model, AutoProcessor and pipeline of a CLIP-ViT-based NER model, loaded by the saved code alone."""
    base_model, processor = tiny_task_model("ner")  # the processor's images are 32 px: the ViT is built for that
    base_config = base_model.config.to_dict()
    base_config.update(
        vision_backbone="vit_base_patch16_clip_224.openai",
        vision_model_args={**TINY_VIT, "img_size": 32},
        vision_out_indices=None,
    )
    torch.manual_seed(0)
    model = HVPNetForTokenClassification(HVPNetConfig.from_dict(base_config)).eval()
    image = tmp_path / "tweet.png"
    Image.new("RGB", (48, 32), (200, 40, 30)).save(image)
    example = {"text": "Kevin Durant enters Oracle Arena", "image": str(image)}
    pipe = MultimodalNerPipeline(model=model, processor=processor)
    folder = tmp_path / "vit-ner"
    pipe.save_pretrained(folder)
    inputs = processor(example["image"], example["text"].split())
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save({"inputs": dict(inputs), "logits": logits}, tmp_path / "expected.pt")
    script = f"""
    import json
    import torch
    from transformers import AutoModelForTokenClassification, AutoProcessor, pipeline

    expected = torch.load("expected.pt", weights_only=False)
    model = AutoModelForTokenClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
    inputs = processor({example["image"]!r}, {example["text"].split()!r})
    with torch.no_grad():
        logits = model(**inputs).logits
    pipe = pipeline(model={str(folder)!r}, trust_remote_code=True)
    import sys
    print(json.dumps({{
        "classes": [type(model).__module__, type(processor).__module__, type(pipe).__module__],
        "backbone": type(model.hvpnet.visual_encoder.backbone).__name__,
        "levels": list(model.hvpnet.visual_encoder.backbone.feature_info.out_indices),
        "same_pixels": torch.equal(inputs["pixel_values"], expected["inputs"]["pixel_values"]),
        "logits_difference": (logits - expected["logits"]).abs().max().item(),
        "pipeline": pipe({example!r}),
        "imported": sorted(name for name in sys.modules if name.split(".")[0] == "hvpnet_hf"),
    }}))
    """
    report = run_offline({"root": tmp_path}, script, block=True)
    assert report["imported"] == []
    assert all(module.startswith("transformers_modules.") for module in report["classes"]), report["classes"]
    assert report["backbone"] == "FeatureGetterNet" and report["levels"] == VIT_B_LEVELS
    assert report["same_pixels"] and report["logits_difference"] <= SAME
    assert [entity["word"] for entity in report["pipeline"]] == [entity["word"] for entity in pipe(example)]


@pytest.mark.parametrize("kind", KINDS)
def test_the_speed_ups_keep_the_features_of_every_kind_of_backbone(kind):
    torch.manual_seed(0)
    model = HVPNetModel(tiny_vision_config(kind)).eval()
    images = tiny_images(kind).flatten(0, 1)
    with torch.no_grad():
        expected = model.visual_encoder.visual_features(images)
        done = speed_up_frozen_backbone(model)
        features = model.visual_encoder.visual_features(images)
    assert done.channels_last and (done.folded_norms > 0) == (kind == "cnn"), "only the ResNet has BatchNorms"
    # Folded norms and channels_last weights reorder float32 arithmetic: rounding only (see test_frozen_backbone.py).
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
