"""Data in CMNER's published format, written by the tests: invented Weibo posts (CRLF line endings, a byte-order
mark) and several small images per post."""

from pathlib import Path

from PIL import Image

# Invented posts in CMNER's format: a WID header, one character and its tag per line.
POSTS = {
    "train": [
        ("Ab12Cd", "张伟在北京", ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]),
        ("Ef34Gh", "华为新品", ["B-ORG", "I-ORG", "O", "O"]),
        ("Ij56Kl", "今天天气好", ["O"] * 5),
    ],
    "dev": [("Mn78Op", "李娜去上海", ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"])],
    "test": [("Qr90St", "小米发布会", ["B-ORG", "I-ORG", "O", "O", "B-MISC"])],
}
# Each post's images, `<WID>_<suffix>.jpg` in one folder; Ij56Kl has none, and Ab12Cd9 is another post's prefix.
IMAGES = ["Ab12Cd_zz9.jpg", "Ab12Cd_a01.jpg", "Ab12Cd9_x.jpg", "Ef34Gh_k7.jpg", "Mn78Op_1.jpg", "Mn78Op_2.jpg"]
IMAGES += ["Qr90St_a.jpg", "Qr90St_b.jpg", "Qr90St_c.jpg"]


def post_text(wid: str, characters: str, tags: list[str]) -> str:
    return f"WID:{wid}\r\n" + "".join(
        f"{character}\t{tag}\r\n" for character, tag in zip(characters, tags, strict=True)
    )


def write_cmner(tmp_path: Path, image_names: list[str] = IMAGES) -> tuple[Path, Path]:
    """`text/{train,dev,test}.txt` as published (CRLF, blank lines between posts and at the end; a BOM on train)
    and an image folder of small colored JPEGs."""
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    for split, posts in POSTS.items():
        text = "\r\n".join(post_text(*post) for post in posts) + "\r\n\r\n"
        (text_dir / f"{split}.txt").write_bytes(("\ufeff" if split == "train" else "").encode() + text.encode())
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for index, name in enumerate(image_names):
        Image.new("RGB", (24, 16), (40 * index % 256, 90, 160)).save(image_dir / name)
    return text_dir, image_dir
