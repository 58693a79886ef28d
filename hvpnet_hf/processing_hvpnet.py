"""
Processor for HVPNeT: the text encoder's tokenizer plus `HVPNetImageProcessor`, as a transformers `ProcessorMixin`.

Saved with `save_pretrained`, a processor writes its tokenizer files and `processor_config.json` (the task, the
maximum length and the image settings under `image_processor`); with `HVPNetProcessor.register_for_auto_class()`
(done when `hvpnet_hf` is imported) it also copies this file and `image_processing_hvpnet.py`, so
`AutoProcessor.from_pretrained(folder_or_hub_id, trust_remote_code=True)` loads it where `hvpnet_hf` is not
installed. This module therefore imports only transformers, timm, torch and PIL (through the image processor).
"""

import copy
import os
from collections.abc import Mapping, Sequence

import timm
import torch
from PIL import Image
from timm.data import resolve_data_config
from transformers import AutoTokenizer, BatchEncoding, BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

from .image_processing_hvpnet import IMAGE_INPUT_NAMES, HVPNetImageProcessor

TASKS = ("ner", "re")
# Entity markers of the relation task (head start, head end, tail start, tail end): `<s> head </s>`, `<o> tail </o>`,
# the original code's choice (zjunlp/HVPNeT), kept for BERT tokenizers. Where one of them is already a special token
# of the tokenizer (RoBERTa, XLM-R and CamemBERT use `<s>` and `</s>` as BOS/CLS and EOS/SEP), the next choice is
# used, so "head start" never reads as the start of the sentence.
ENTITY_MARKERS = ["<s>", "</s>", "<o>", "</o>"]
ENTITY_MARKER_CHOICES = (ENTITY_MARKERS, ["<e1>", "</e1>", "<e2>", "</e2>"])
# The tokenizer attributes that name its own special tokens.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The image inputs that replace the pixels when a frozen backbone's features are read from a cache.
IMAGE_FEATURE_INPUT_NAMES = ("image_features", "image_features_mask")


class HVPNetProcessor(ProcessorMixin):
    r"""
    Turns words (NER), or words with a head and a tail span (RE), plus a global image and object crops into the
    inputs of the HVPNeT models.

    For `task="re"` the processor adds the entity markers (`entity_markers`, by default `<s> </s> <o> </o>`, or
    `<e1> </e1> <e2> </e2>` where `<s>` or `</s>` is a special token of the tokenizer) as special tokens to its own
    copy of the tokenizer when it is built (if they are not there already), so the tokenizer given is left as it
    was: use `processor.tokenizer`. The model's embeddings must then be resized to `len(processor.tokenizer)`, which
    `from_text_vision_pretrained(..., processor=processor)` does.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the text encoder's tokenizer: WordPiece (BERT, ELECTRA), byte-level
            BPE (RoBERTa; loaded with `add_prefix_space=True`, as words are tokenized one by one) or
            SentencePiece/Unigram (XLM-R, CamemBERT). Its own special tokens frame every input (`[CLS] ... [SEP]`,
            `<s> ... </s>`).
        image_processor (`HVPNetImageProcessor`, *optional*): the image part; when not given it is built from
            `image_settings`.
        task (`str`): `"ner"` or `"re"`.
        max_length (`int`): maximum token count, special tokens and entity markers included.
        entity_markers (`list[str]`, *optional*): the four relation markers (head start, head end, tail start, tail
            end); by default the first of `ENTITY_MARKER_CHOICES` without a special token of the tokenizer. Saved
            in `processor_config.json`. None for NER.
        image_settings: `image_size`, `crop_pct`, `crop_mode`, `image_mean`, `image_std`, `interpolation`,
            `num_object_images` of a new `HVPNetImageProcessor` (see there).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: HVPNetImageProcessor | None = None,
        task: str = "ner",
        max_length: int = 128,
        entity_markers: Sequence[str] | None = None,
        **image_settings,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task == "re":
            _check_re_max_length(max_length)
        if image_processor is None:
            image_processor = HVPNetImageProcessor(**image_settings)
        elif image_settings:
            raise ValueError(f"give either image_processor or image settings, not both (got {sorted(image_settings)})")
        _check_word_tokenization(tokenizer)
        self.task = task
        self.max_length = max_length
        self.entity_markers = _entity_markers(tokenizer, entity_markers) if task == "re" else None
        if task == "re":
            missing = [marker for marker in self.entity_markers if marker not in tokenizer.get_vocab()]
            if missing:
                tokenizer = copy.deepcopy(tokenizer)
                tokenizer.add_special_tokens(
                    {"additional_special_tokens": missing}, replace_extra_special_tokens=False
                )
        super().__init__(tokenizer=tokenizer, image_processor=image_processor)

    @property
    def model_input_names(self) -> list[str]:
        """What Trainer's length grouping and pipelines read to know the model inputs: the tokenizer's (with
        `token_type_ids` only where it makes them) and the images."""
        return [*self.tokenizer.model_input_names, *IMAGE_INPUT_NAMES]

    @classmethod
    def from_backbone(
        cls,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike,
        vision_backbone: str = "resnet50",
        task: str = "ner",
        image_size: int | None = None,
        **kwargs,
    ) -> "HVPNetProcessor":
        """
        Builds a processor whose image transform follows the timm pretrained config of `vision_backbone` (read from
        timm's registry, nothing is downloaded): its size, mean and std (CLIP's differ from ImageNet's),
        interpolation, crop_pct and crop mode; a tag picks the config of those weights
        (`"vit_base_patch16_clip_224.openai"`). `image_size` overrides the crop size (a plain ViT then needs the same
        `img_size` in `HVPNetConfig.vision_model_args`). Backbones without a pretrained config get ImageNet
        statistics and 224 pixels. A tokenizer given by name is loaded with `add_prefix_space=True`, which byte-level
        BPE tokenizers need for words (the others ignore it).
        """
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, add_prefix_space=True)
        pretrained_cfg = timm.get_pretrained_cfg(vision_backbone)
        settings = {}
        if pretrained_cfg is not None:
            data_config = resolve_data_config({}, pretrained_cfg=pretrained_cfg.to_dict())
            settings = {
                "image_size": data_config["input_size"][-1],
                "crop_pct": data_config["crop_pct"],
                "image_mean": data_config["mean"],
                "image_std": data_config["std"],
                "interpolation": data_config["interpolation"],
                "crop_mode": data_config["crop_mode"],
            }
        if image_size is not None:
            settings["image_size"] = image_size
        return cls(tokenizer, task=task, **{**settings, **kwargs})

    @property
    def head_start_token_id(self) -> int:
        """Id of the head start marker (`<s>` with BERT tokenizers), for `HVPNetConfig.head_start_token_id`."""
        return self.tokenizer.convert_tokens_to_ids(self._markers()[0])

    @property
    def tail_start_token_id(self) -> int:
        """Id of the tail start marker (`<o>` with BERT tokenizers), for `HVPNetConfig.tail_start_token_id`."""
        return self.tokenizer.convert_tokens_to_ids(self._markers()[2])

    def _markers(self) -> list[str]:
        if self.entity_markers is None:
            raise ValueError("entity markers belong to relation processors (task='re'), this one is for NER")
        return list(self.entity_markers)

    def __call__(
        self,
        images: "Image.Image | str | None | Sequence[Image.Image | str | None]" = None,
        text: Sequence[str] | Sequence[Sequence[str]] | None = None,
        objects: Sequence | None = None,
        *,
        word_labels: Sequence[int] | Sequence[Sequence[int]] | None = None,
        head: Mapping | Sequence[Mapping] | None = None,
        tail: Mapping | Sequence[Mapping] | None = None,
        labels: int | Sequence[int] | None = None,
        padding: bool | str = True,
        max_length: int | None = None,
        missing_images: str = "mask",
    ) -> BatchFeature:
        """
        Encodes one example (`text` is a list of words, `images` its global image, `objects` its crops) or a batch
        (`text` a list of word lists; the other arguments are then lists too) into PyTorch model inputs, padded by
        the tokenizer (`padding` as `tokenizer.pad` takes it; `max_length` caps the tokens, special tokens
        included): `input_ids`, `attention_mask`, `token_type_ids` (B, T), `pixel_values` (B, 1 + k, 3, S, S) (the
        global image in slot 0, then the k = `num_object_images` crop slots), `image_mask` (B, 1 + k), plus
        `word_start_mask` (B, T) for NER and `labels`: NER `word_labels` (a tag id per word) on each word's first
        sub-word, (B, T), or the RE relation ids `labels`, (B,). RE needs `head` and `tail` as
        `{"start": int, "end": int}` word spans (end exclusive).
        """
        if text is None:
            raise ValueError(
                "HVPNetProcessor needs `text`, the words of an example or a batch of word lists; the first positional "
                "argument is `images`, as in transformers' processors: processor(images, words) or processor(text=words)"
            )
        if self.task == "ner" and (head is not None or tail is not None or labels is not None):
            raise ValueError("head, tail and labels are relation inputs; an NER processor takes word_labels")
        if self.task == "re" and (head is None or tail is None or word_labels is not None):
            raise ValueError(
                "a relation processor takes head and tail spans and labels (relation ids), not word_labels"
            )
        if not text or isinstance(text[0], str):  # one example
            text, images, objects = [text], [images], [objects]
            word_labels = [word_labels] if word_labels is not None else None
            head, tail, labels = [head], [tail], [labels] if labels is not None else None
        if self.task == "ner":
            encoded = self.encode_ner(text, word_labels, max_length)
        else:
            encoded = self.encode_re(text, head, tail, labels, max_length)
        images = images if images is not None else [None] * len(text)
        objects = objects if objects is not None else [None] * len(text)
        features = []
        for index in range(len(text)):
            feature = {name: values[index] for name, values in encoded.items()}
            feature.update(self.image_processor.preprocess_example(images[index], objects[index], missing_images))
            features.append(feature)
        return self.pad(features, padding, max_length)

    def pad(
        self, features: Sequence[Mapping], padding: bool | str = True, max_length: int | None = None
    ) -> BatchFeature:
        """
        Pads and stacks encoded examples with their image tensors into model inputs. The tokenizer's `pad` pads
        `input_ids`, `attention_mask` and `token_type_ids` (B, T; the last when the tokenizer makes them), on its
        padding side; NER `word_start_mask` (B, T, padded with False) and `labels` (B, T, padded with -100) are padded
        alongside, RE `labels` (B,) stacked. The image tensors are stacked: `pixel_values` (B, 1 + k, 3, S, S) and
        `image_mask` (B, 1 + k), or the cached backbone features `image_features` (B, 1 + k, g*g, C) with
        `image_features_mask` (B, 1 + k) when the examples carry those. Other keys are dropped.
        """
        text_names = [name for name in self.tokenizer.model_input_names if name in features[0]]
        batch = self.tokenizer.pad(
            [{name: feature[name] for name in text_names} for feature in features],
            padding=padding,
            max_length=max_length,
            return_tensors="pt",
        ).data
        length = batch["input_ids"].shape[1]
        if "word_start_mask" in features[0]:
            batch["word_start_mask"] = self._pad_alongside([f["word_start_mask"] for f in features], length, False)
        if "labels" in features[0]:
            labels = [torch.as_tensor(feature["labels"], dtype=torch.long) for feature in features]
            batch["labels"] = self._pad_alongside(labels, length, -100) if labels[0].ndim else torch.stack(labels)
        image_names = IMAGE_FEATURE_INPUT_NAMES if "image_features" in features[0] else IMAGE_INPUT_NAMES
        for name in image_names:
            batch[name] = torch.stack([torch.as_tensor(feature[name]) for feature in features])
        return BatchFeature(batch)

    def _pad_alongside(self, sequences: Sequence[Sequence], length: int, padding_value: bool | int) -> torch.Tensor:
        """Token-level values (B, T) padded to `length` on the tokenizer's padding side, as its `pad` pads the ids."""
        padded = torch.full((len(sequences), length), padding_value)
        for row, sequence in enumerate(sequences):
            sequence = torch.as_tensor(sequence, dtype=padded.dtype)
            if self.tokenizer.padding_side == "left":
                padded[row, length - len(sequence) :] = sequence
            else:
                padded[row, : len(sequence)] = sequence
        return padded

    def encode_ner(
        self,
        words: Sequence[Sequence[str]],
        word_labels: Sequence[Sequence[int]] | None = None,
        max_length: int | None = None,
        stride: int | None = None,
        return_overflowing_tokens: bool = False,
    ) -> dict[str, list]:
        """
        Tokenizes a batch of word lists. Returns lists (one per row) of `input_ids`, `attention_mask`,
        `token_type_ids` (when the tokenizer makes them), `word_start_mask` (True at the first sub-word of each
        word), `word_ids` (word index per token, -1 for special tokens) and, with `word_labels`, `labels` (the word's
        tag id at its first sub-word, -100 elsewhere).

        A word that tokenizes to nothing (control characters, some symbols) is replaced by the unknown token, so
        every word keeps one first sub-word. Without `return_overflowing_tokens`, a text longer than `max_length`
        is cut: its last words have no token, and the metrics (`align_word_predictions`) score them as `"O"`. With
        it, the tokenizer reads the text in as many rows of at most `max_length` tokens as it takes, each next row
        repeating the last `stride` tokens of the previous one (default: half a row), so every word has its first
        sub-word in some row; `overflow_to_sample_mapping` gives each row's example and `word_ids` count the words
        of the whole example, so `ner_word_positions` merges the rows. A row may then start inside a word: its
        leading sub-words are not word starts, and a word that straddles a row end and starts more than `stride`
        tokens before it is read whole in no row (only its first row reads its first sub-word).
        """
        max_length = max_length or self.max_length
        room = max_length - self.tokenizer.num_special_tokens_to_add()  # [CLS] and [SEP], <s> and </s>
        if room < 1:
            raise ValueError(f"max_length must leave room for the special tokens and one token, got {max_length}")
        stride = room // 2 if stride is None else stride
        if not 0 <= stride < room:
            raise ValueError(f"stride must be in [0, {room}) for max_length={max_length}, got {stride}")
        if word_labels is not None:
            for index, (example, tags) in enumerate(zip(words, word_labels, strict=True)):
                if len(tags) != len(example):
                    raise ValueError(f"Example {index}: {len(example)} words but {len(tags)} word_labels")
        words, whole = self._tokenize_words(words)
        encoding = self.tokenizer(
            words,
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=return_overflowing_tokens,
        )
        names = ("input_ids", "attention_mask", "token_type_ids", "overflow_to_sample_mapping")
        encoded = {name: encoding[name] for name in names if name in encoding}
        encoded["word_start_mask"], encoded["word_ids"] = [], []
        if word_labels is not None:
            encoded["labels"] = []
        rows_read = [0] * len(words)
        for row in range(len(encoding["input_ids"])):
            example = encoding["overflow_to_sample_mapping"][row] if return_overflowing_tokens else row
            # The tokenizer's row k holds the tokens [k * (room - stride), ...) of the whole example, so a token is a
            # word start where the token before it in the whole example belongs to another word.
            position = rows_read[example] * (room - stride)
            rows_read[example] += 1
            whole_word_ids, word_ids = whole.word_ids(example), encoding.word_ids(row)
            starts = []
            for word in word_ids:
                starts.append(word is not None and (position == 0 or whole_word_ids[position - 1] != word))
                position += word is not None
            encoded["word_start_mask"].append(starts)
            encoded["word_ids"].append([-1 if word is None else word for word in word_ids])
            if word_labels is not None:
                tags = word_labels[example]
                encoded["labels"].append(
                    [tags[word] if start else -100 for word, start in zip(word_ids, starts, strict=True)]
                )
        return encoded

    def encode_re(
        self,
        words: Sequence[Sequence[str]],
        heads: Sequence[Mapping],
        tails: Sequence[Mapping],
        labels: Sequence[int] | None = None,
        max_length: int | None = None,
    ) -> dict[str, list]:
        """
        Tokenizes a batch of word lists with the entity markers (`<s> head </s>`, `<o> tail </o>` for BERT) inserted
        around the entity spans (`{"start", "end"}` in words, end exclusive) and the tokenizer's own special tokens
        around the whole (`[CLS] ... [SEP]`, `<s> ... </s>`). Returns lists of `input_ids`, `attention_mask`,
        `token_type_ids` (when the tokenizer makes them) and, with `labels`, `labels` (relation ids).

        A word that spells an entity marker is read as the unknown token. When a sentence is longer than
        `max_length`, the tokens kept are the ones closest to an entity marker, so the four markers and the context
        around both entities survive, wherever they are in the sentence: a cut the tokenizer's truncation cannot make.
        """
        max_length = max_length or self.max_length
        _check_re_max_length(max_length)
        _, encoding = self._tokenize_words(words)
        markers = self._markers()
        marker_ids = dict(zip(markers, self.tokenizer.convert_tokens_to_ids(markers), strict=True))
        first, last = self._sequence_special_token_ids()
        with_token_types = "token_type_ids" in self.tokenizer.model_input_names
        encoded = {"input_ids": [], "attention_mask": []} | ({"token_type_ids": []} if with_token_types else {})
        for index, (head, tail) in enumerate(zip(heads, tails, strict=True)):
            # A word that spells a marker ("<s>") is read as unknown, so each marker is in the input exactly once.
            word_tokens = [[] for _ in words[index]]
            for token_id, word in zip(encoding["input_ids"][index], encoding.word_ids(index), strict=True):
                word_tokens[word].append(self.tokenizer.unk_token_id if token_id in marker_ids.values() else token_id)
            token_ids = _insert_entity_markers(word_tokens, head, tail, index, markers, marker_ids)
            token_ids = _keep_near_markers(token_ids, set(marker_ids.values()), max_length - 2)
            input_ids = [first, *token_ids, last]
            encoded["input_ids"].append(input_ids)
            encoded["attention_mask"].append([1] * len(input_ids))
            if with_token_types:
                encoded["token_type_ids"].append([0] * len(input_ids))
        if labels is not None:
            encoded["labels"] = list(labels)
        return encoded

    def _tokenize_words(self, words: Sequence[Sequence[str]]) -> tuple[list[list[str]], BatchEncoding]:
        """
        Tokenizes word lists without special tokens or truncation, after replacing every word that tokenizes to
        nothing by the unknown token. Returns the words used and their encoding (the tokenizer runs a second time
        only when a word had to be replaced).
        """
        encoding = self.tokenizer(list(words), is_split_into_words=True, add_special_tokens=False)
        unk = self.tokenizer.unk_token
        replaced, any_empty = [], False
        for index, example in enumerate(words):
            present = set(encoding.word_ids(index))  # a word missing from `word_ids` produced no token
            any_empty = any_empty or len(present) < len(example)
            replaced.append([word if position in present else unk for position, word in enumerate(example)])
        if any_empty:
            encoding = self.tokenizer(replaced, is_split_into_words=True, add_special_tokens=False)
        return replaced, encoding

    def _sequence_special_token_ids(self) -> tuple[int, int]:
        """The ids that open and close a relation input: the tokenizer's classifier and separator tokens
        (`[CLS]`/`[SEP]`, `<s>`/`</s>`), or its BOS and EOS tokens where it names no classifier or separator."""
        first = self.tokenizer.cls_token_id if self.tokenizer.cls_token is not None else self.tokenizer.bos_token_id
        last = self.tokenizer.sep_token_id if self.tokenizer.sep_token is not None else self.tokenizer.eos_token_id
        if first is None or last is None:
            raise ValueError(
                f"{type(self.tokenizer).__name__} names neither a cls/sep nor a bos/eos token pair to frame relation "
                "inputs with"
            )
        return first, last


def _check_word_tokenization(tokenizer: PreTrainedTokenizerBase) -> None:
    """
    The processor tokenizes words one by one (`is_split_into_words=True`); a word must then give the tokens it gives
    in running text, or the model reads every word as if it started a text. A byte-level BPE tokenizer (RoBERTa)
    marks a word start by a preceding space, and only does so for pre-split words with `add_prefix_space=True`.
    """
    pre_split = tokenizer(["one", "word"], is_split_into_words=True, add_special_tokens=False)
    running = tokenizer("one word", add_special_tokens=False)

    def second_word(encoding: BatchEncoding) -> list[int]:
        return [token for token, word in zip(encoding["input_ids"], encoding.word_ids(), strict=True) if word == 1]

    if second_word(pre_split) != second_word(running):
        raise ValueError(
            f"{type(tokenizer).__name__} tokenizes the words of a pre-split text differently from running text, so "
            "word starts would be lost; load a byte-level BPE tokenizer with add_prefix_space=True, e.g. "
            "AutoTokenizer.from_pretrained(name, add_prefix_space=True)"
        )


def _entity_markers(tokenizer: PreTrainedTokenizerBase, entity_markers: Sequence[str] | None) -> list[str]:
    """The given markers, checked, or the first choice of `ENTITY_MARKER_CHOICES` free of the tokenizer's named
    special tokens (its bos, eos, cls, sep, ... tokens; markers added earlier are extra special tokens, not these)."""
    special = {str(token) for name in NAMED_SPECIAL_TOKENS if (token := getattr(tokenizer, name, None)) is not None}
    if entity_markers is not None:
        entity_markers = list(entity_markers)
        taken = [marker for marker in entity_markers if marker in special]
        if len(entity_markers) != 4 or len(set(entity_markers)) != 4 or taken:
            raise ValueError(
                "entity_markers must be 4 distinct tokens (head start, head end, tail start, tail end) that are not "
                f"special tokens of the tokenizer ({sorted(special)}), got {entity_markers}"
            )
        return entity_markers
    for choice in ENTITY_MARKER_CHOICES:
        if not special.intersection(choice):
            return list(choice)
    raise ValueError(
        f"every entity marker choice {ENTITY_MARKER_CHOICES} holds a special token of {type(tokenizer).__name__}; "
        "pass entity_markers explicitly"
    )


def ner_word_positions(
    word_ids: Sequence[Sequence[int]], num_words: int, word_start_mask: Sequence[Sequence[bool]] | None = None
) -> list[tuple[int, int] | None]:
    """
    For each of `num_words` words, the `(row, token)` position of its first sub-word in the row that reads it best,
    or None when no row has it. `word_ids` (W, T) holds a word index per token (-1 or None for special tokens and
    padding); `word_start_mask` (W, T) marks the first sub-words where a row may start inside a word (the rows of
    `encode_ner(..., return_overflowing_tokens=True)`), and without it a token starts a word where its word index
    differs from the previous token's. A row reading a middle part of the text is cut on the sides where it does
    not reach the text's first or last word; among the rows holding a word, the one where the word is farthest from
    such a cut wins (the earlier row on ties), as a word near a cut misses the context beyond it.
    """
    positions: list[tuple[int, int] | None] = [None] * num_words
    best_distance = [-1.0] * num_words
    for row, row_word_ids in enumerate(word_ids):
        row_word_ids = [-1 if word is None else int(word) for word in row_word_ids]
        seen = [word for word in row_word_ids if word >= 0]
        if not seen:
            continue
        first, last = min(seen), max(seen)
        if word_start_mask is None:
            previous_words = [-1, *row_word_ids[:-1]]
            starts = [
                word >= 0 and word != previous for word, previous in zip(row_word_ids, previous_words, strict=True)
            ]
        else:
            starts = [bool(start) for start in word_start_mask[row]]
        for token, (word, start) in enumerate(zip(row_word_ids, starts, strict=False)):
            if not start:
                continue
            if word >= num_words:
                raise ValueError(f"word_ids row {row} names word {word} of a {num_words}-word input")
            left = word - first if first > 0 else float("inf")
            right = last - word if last < num_words - 1 else float("inf")
            if min(left, right) > best_distance[word]:
                positions[word], best_distance[word] = (row, token), min(left, right)
    return positions


def _check_re_max_length(max_length: int) -> None:
    if max_length < len(ENTITY_MARKERS) + 2:
        raise ValueError(
            f"max_length must leave room for the 2 special tokens and the 4 entity markers, got {max_length}"
        )


def _insert_entity_markers(
    word_tokens: Sequence[Sequence[int]],
    head: Mapping,
    tail: Mapping,
    index: int,
    markers: Sequence[str],
    marker_ids: Mapping[str, int],
) -> list[int]:
    """
    The token ids of one example's words (`word_tokens`: the ids of each word) with the ids of the head markers
    (`markers[:2]`, `<s>`/`</s>` for BERT) around the head span and the tail markers (`markers[2:]`, `<o>`/`</o>`)
    around the tail span (word offsets).
    """
    for name, span in (("head", head), ("tail", tail)):
        if not 0 <= span["start"] < span["end"] <= len(word_tokens):
            raise ValueError(f"Example {index}: {name} span [{span['start']}, {span['end']}) out of range")
    before = [[] for _ in range(len(word_tokens) + 1)]
    for span, start_marker, end_marker in ((head, *markers[:2]), (tail, *markers[2:])):
        before[span["start"]].append(marker_ids[start_marker])
        before[span["end"]].insert(0, marker_ids[end_marker])
    marked = []
    for position, tokens in enumerate(word_tokens):
        marked += before[position]
        marked += tokens
    return marked + before[len(word_tokens)]


def _keep_near_markers(token_ids: list[int], marker_ids: set[int], budget: int) -> list[int]:
    """
    Keeps at most `budget` tokens, in order: all marker tokens, then the tokens nearest to a marker. This cuts the
    sentence around the entities instead of from the right.
    """
    if len(token_ids) <= budget:
        return token_ids
    markers = [position for position, token in enumerate(token_ids) if token in marker_ids]
    distance = [min(abs(position - marker) for marker in markers) for position in range(len(token_ids))]
    kept = sorted(sorted(range(len(token_ids)), key=lambda position: (distance[position], position))[:budget])
    return [token_ids[position] for position in kept]


__all__ = ["ENTITY_MARKERS", "ENTITY_MARKER_CHOICES", "HVPNetProcessor", "ner_word_positions"]
