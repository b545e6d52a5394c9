"""A tiny LLaVA checkpoint (random weights, written by transformers) and small digit images with their data file,
shared by the vision data, training and serving tests (conftest's `tiny_llava` fixture holds the checkpoint)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

QUESTION = "Which digit is this?"


def make_tiny_llava_dir(folder: Path) -> Path:
    """The tiny LLaVA (conftest's `tiny_llava` fixture writes it once per session)."""
    from velotune.bench.tiny_vlm import make_tiny_llava
    return make_tiny_llava(folder, [QUESTION, " ".join("0123456789")] * 30, image_size=16,
                           patch_size=8)   # 4 image tokens per image


def digit_pngs(folder: Path, count: int, size: int = 16) -> list[tuple[Path, int]]:
    """`count` of scikit-learn's digits as size x size PNGs: [(path, digit)]."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        image = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8), mode="L").resize((size, size))
        path = folder / f"d{i}.png"
        image.save(path)
        out.append((path, int(digits.target[i])))
    return out


def digit_records(items, folder: Path) -> list[dict]:
    return [{"messages": [{"role": "user", "content": [{"type": "image", "image": p.name},
                                                        {"type": "text", "text": QUESTION}]},
                          {"role": "assistant", "content": str(label)}]} for p, label in items]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
