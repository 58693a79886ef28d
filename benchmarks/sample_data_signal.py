"""
Shows that the bundled sample sets need their images, measured in one run.

For the examples whose label is decided by the picture (the same text occurs with different labels), it compares:
- the best any text-only predictor can do: one answer per distinct text, so at most the most frequent label of each
  group of identical texts is right (computed exactly on the test split, not learned);
- a learned text-only baseline: logistic regression on the bag of words of the sentence;
- a linear probe on a randomly initialized, frozen timm backbone: each stage's feature map is average-pooled, the
  concatenation feeds a logistic regression, trained on the train split and scored on test;
and prints the text-only ceiling of the whole task's test F1 (perfect on everything the text decides, best guess on
the rest), which an image-aware model can exceed.

    python benchmarks/sample_data_signal.py [--backbone resnet18] [--image_size 64] [--seeds 3] [--data_dir DIR]

`--data_dir` measures a set written by `python tools/build_sample_data.py --output_dir DIR` instead (e.g. the
harder `--cues texture` variant).
"""

import argparse
from collections import Counter, defaultdict
from pathlib import Path

import timm
import torch
from PIL import Image
from seqeval.metrics import f1_score

from hvpnet_hf import load_mner_dataset, load_mre_dataset
from hvpnet_hf.loading import find_release_layout
from hvpnet_hf.sample_data import SAMPLE_DIR, SAMPLE_LAYOUT

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def load_sample_sets(root: Path = SAMPLE_DIR):
    """The NER and MRE sets under `root` (the bundled ones, or a folder written by `tools/build_sample_data.py`)."""
    ner, mre = ({name: root / path for name, path in SAMPLE_LAYOUT[task].items()} for task in ("ner", "re"))
    return (
        load_mner_dataset(
            data_dir=ner["data_dir"], **find_release_layout(ner["image_dir"], ner["object_dir"], ner["data_dir"])
        ),
        load_mre_dataset(
            data_dir=mre["data_dir"],
            **find_release_layout(mre["image_dir"], mre["object_dir"], mre["data_dir"]),
            rel2id=mre["rel2id"],
        ),
    )


def ner_examples(split) -> list[dict]:
    """Per tweet: text key, tag strings, image path."""
    names = split.features["ner_tags"].feature.names
    return [
        {"text": tuple(tokens), "words": tokens, "tags": [names[tag] for tag in tags], "image": image}
        for tokens, tags, image in zip(split["tokens"], split["ner_tags"], split["image"], strict=True)
    ]


def mre_examples(split) -> list[dict]:
    """Per sample: text key (words and entity spans), relation name, image path."""
    names = split.features["relation"].names
    return [
        {"text": (tuple(tokens), head["start"], head["end"], tail["start"], tail["end"]), "words": tokens,
         "label": names[relation], "image": image}
        for tokens, head, tail, relation, image in zip(
            split["tokens"], split["head"], split["tail"], split["relation"], split["image"], strict=True
        )
    ]  # fmt: skip


def ambiguous_ner(examples: list[dict]) -> list[tuple[dict, str]]:
    """(example, entity type at the ambiguous word) for every tweet whose text also occurs with other tags."""
    by_text = defaultdict(list)
    for example in examples:
        by_text[example["text"]].append(example)
    decided = []
    for group in by_text.values():
        if len({tuple(example["tags"]) for example in group}) < 2:
            continue
        differing = [i for i in range(len(group[0]["tags"])) if len({e["tags"][i] for e in group}) > 1]
        for example in group:
            decided.append((example, example["tags"][differing[0]][2:]))
    return decided


def ambiguous_mre(examples: list[dict]) -> list[tuple[dict, str]]:
    by_text = defaultdict(list)
    for example in examples:
        by_text[example["text"]].append(example)
    return [(e, e["label"]) for group in by_text.values() if len({e["label"] for e in group}) > 1 for e in group]


def text_oracle(examples: list[dict], key: str) -> list:
    """The best deterministic text-only answer: each text gets its group's most frequent gold answer."""
    by_text = defaultdict(Counter)
    for example in examples:
        by_text[example["text"]][str(example[key])] += 1
    best = {text: counts.most_common(1)[0][0] for text, counts in by_text.items()}
    lookup = {str(example[key]): example[key] for example in examples}
    return [lookup[best[example["text"]]] for example in examples]


def micro_f1_without_none(gold: list[str], predicted: list[str]) -> float:
    true_positive = sum(g == p != "None" for g, p in zip(gold, predicted, strict=True))
    num_predicted = sum(p != "None" for p in predicted)
    num_gold = sum(g != "None" for g in gold)
    return 2 * true_positive / max(num_predicted + num_gold, 1)


def logistic_regression(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, l2: float = 1e-3):
    """Multinomial logistic regression on standardized features, fitted with L-BFGS; returns a predict function."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    weight = torch.zeros(train_x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")
    inputs = (train_x - mean) / std

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(inputs @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return lambda x: (((x - mean) / std) @ weight + bias).argmax(-1)


def bag_of_words(texts: list[list[str]], vocabulary: dict[str, int]) -> torch.Tensor:
    features = torch.zeros(len(texts), len(vocabulary))
    for row, words in enumerate(texts):
        for word in words:
            if word.lower() in vocabulary:
                features[row, vocabulary[word.lower()]] = 1.0
    return features


@torch.no_grad()
def pooled_features(backbone: torch.nn.Module, paths: list[str], image_size: int) -> torch.Tensor:
    """(N, sum of stage channels): every stage's feature map averaged over space, for each image file."""
    pixels = []
    for path in paths:
        image = Image.open(path).convert("RGB").resize((image_size, image_size), Image.BICUBIC)
        tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3)
        pixels.append((tensor.permute(2, 0, 1).float() / 255 - IMAGENET_MEAN) / IMAGENET_STD)
    stages = backbone(torch.stack(pixels))
    return torch.cat([stage.mean(dim=(2, 3)) for stage in stages], dim=1)


def accuracy(predicted, gold) -> float:
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)


def measure(name: str, train: list[tuple[dict, str]], test: list[tuple[dict, str]], args) -> None:
    classes = sorted({label for _, label in train})
    index = {label: i for i, label in enumerate(classes)}
    train_y = torch.tensor([index[label] for _, label in train])
    test_gold = [label for _, label in test]
    majority = Counter(label for _, label in train).most_common(1)[0][0]

    train_words, test_words = [e["words"] for e, _ in train], [e["words"] for e, _ in test]
    vocabulary = {w: i for i, w in enumerate(sorted({w.lower() for words in train_words for w in words}))}
    text_model = logistic_regression(bag_of_words(train_words, vocabulary), train_y, len(classes))
    text_predicted = [classes[i] for i in text_model(bag_of_words(test_words, vocabulary))]
    ceiling = text_oracle([{"text": e["text"], "label": label} for e, label in test], "label")

    # Only examples whose picture exists can be probed; the generator never drops the picture of these examples.
    train_img = [(e, label) for e, label in train if e["image"] is not None]
    test_img = [(e, label) for e, label in test if e["image"] is not None]
    probe_scores = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        backbone = timm.create_model(args.backbone, pretrained=False, features_only=True).eval()
        train_x = pooled_features(backbone, [e["image"] for e, _ in train_img], args.image_size)
        test_x = pooled_features(backbone, [e["image"] for e, _ in test_img], args.image_size)
        probe = logistic_regression(train_x, torch.tensor([index[label] for _, label in train_img]), len(classes))
        probe_scores.append(accuracy([classes[i] for i in probe(test_x)], [label for _, label in test_img]))

    print(f"\n{name}: {len(train)} train / {len(test)} test examples whose label only the picture decides, "
          f"{len(classes)} labels: {', '.join(classes)}")  # fmt: skip
    print(f"  majority label (chance)           accuracy {accuracy([majority] * len(test), test_gold):.3f}")
    print(f"  best possible text-only answer    accuracy {accuracy(ceiling, test_gold):.3f}")
    print(f"  text-only bag-of-words regression accuracy {accuracy(text_predicted, test_gold):.3f}")
    scores = ", ".join(f"{score:.3f}" for score in probe_scores)
    print(f"  random frozen {args.backbone} probe     accuracy {min(probe_scores):.3f} (seeds: {scores})")
    print(f"  probe / best text-only ratio      {min(probe_scores) / accuracy(ceiling, test_gold):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--backbone", default="resnet18", help="timm model name, built with pretrained=False")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3, help="backbone initializations to probe")
    parser.add_argument("--data_dir", type=Path, default=SAMPLE_DIR, help="a folder written by the sample generator")
    args = parser.parse_args()
    ner, mre = load_sample_sets(args.data_dir)

    ner_test = ner_examples(ner["test"])
    ner_oracle = text_oracle(ner_test, "tags")
    mre_test = mre_examples(mre["test"])
    mre_oracle = text_oracle(mre_test, "label")
    print("Text-only ceiling of the whole test split (every text-decided label right, best guess elsewhere):")
    print(f"  NER entity F1 {f1_score([e['tags'] for e in ner_test], ner_oracle):.3f}   "
          f"MRE micro F1 without None {micro_f1_without_none([e['label'] for e in mre_test], mre_oracle):.3f}   "
          "(an image-aware model can reach 1.000)")  # fmt: skip

    measure("NER", ambiguous_ner(ner_examples(ner["train"])), ambiguous_ner(ner_test), args)
    measure("MRE", ambiguous_mre(mre_examples(mre["train"])), ambiguous_mre(mre_test), args)


if __name__ == "__main__":
    main()
