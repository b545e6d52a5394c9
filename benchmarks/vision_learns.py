"""Does a tiny vision-language model learn to read digits? Offline, on the CPU, from random weights.

Images: scikit-learn's handwritten digits (1,797 8x8 greyscale scans that ship with the package), upscaled to 32x32
PNG files. Each sample asks "Which digit is this?" about one image; the answer is the digit. A seeded split keeps
300 images out of training. Model: a LLaVA-style checkpoint with random weights (a CLIP vision tower, a projector and
a Llama text model; velotune.bench.tiny_vlm), loaded and trained by velotune (`vt.train`, objective sft, which a
vision-language model.path turns into the vision objective). Accuracy: greedy answers on the held-out images,
exact match, before and after training. Three runs from the same random weights: full fine-tuning; LoRA on the
language model only (the projector trained in full); LoRA on the vision tower and the language model (the
projector trained in full).

    python benchmarks/vision_learns.py [--steps 300] [--batch-size 16] [--out benchmarks/results/vision-learns-cpu]
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTION = "Which digit is this?"


def digit_images(folder: Path, size: int = 32):
    """[(png path, digit)] for every image of scikit-learn's digits, upscaled to size x size."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), mode="L").resize((size, size),
                                                                                        Image.BILINEAR)
        path = folder / f"{i:04d}.png"
        grey.save(path)
        out.append((path, int(label)))
    return out


def records(items, folder: Path):
    return [{"messages": [{"role": "user", "content": [{"type": "image", "image": str(p.relative_to(folder))},
                                                        {"type": "text", "text": QUESTION}]},
                          {"role": "assistant", "content": str(label)}]} for p, label in items]


def accuracy(model, tokenizer, held, batch: int = 50) -> float:
    from velotune.infer.generation import generate_batch
    right = 0
    for start in range(0, len(held), batch):
        part = held[start:start + batch]
        prompts = [[{"role": "user", "content": [{"type": "image", "image": str(p)},
                                                 {"type": "text", "text": QUESTION}]}] for p, _ in part]
        answers = generate_batch(model, tokenizer, prompts, max_new_tokens=3, temperature=0.0)
        right += sum(a.strip() == str(label) for a, (_, label) in zip(answers, part))
    return right / len(held)


def train_run(name, model_dir, data_path, out_root: Path, args, **settings):
    import velotune as vt
    config = {"model": {"path": str(model_dir), "dtype": "float32"},
              "data": {"path": str(data_path), "max_seq_length": 64},
              "train": {"output_dir": str(out_root / name), "max_steps": args.steps, "batch_size": args.batch_size,
                        "lr": settings.pop("lr"), "scheduler": "cosine", "warmup_steps": 20, "log_every": 50,
                        "progress": False, "seed": 0}}
    for key, value in settings.items():
        config.setdefault(key, {}).update(value)
    start = time.perf_counter()
    result = vt.train(config)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vision-learns-cpu"))
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    import velotune as vt
    from velotune.bench.tiny_vlm import make_tiny_llava
    work = Path(tempfile.mkdtemp(prefix="vision-learns-"))
    items = digit_images(work / "images")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
    held = [items[i] for i in order[:args.held_out]]
    train = [items[i] for i in order[args.held_out:]]
    data = work / "images" / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(train, work / "images")))
    model_dir = make_tiny_llava(work / "base", [QUESTION, " ".join("0123456789")] * 50, size="small")

    runs = {   # run name -> (directory, settings)
        "full fine-tuning": ("full", dict(lr=1e-3, finetune={"method": "full"})),
        "LoRA, language model only (projector in full)": ("lora-language", dict(
            lr=2e-3, finetune={"method": "lora"}, lora={"r": 16, "alpha": 32},
            vision={"vision_layers": False, "language_layers": True, "projector": "full"})),
        "LoRA, vision tower + language model (projector in full)": ("lora-vision-language", dict(
            lr=2e-3, finetune={"method": "lora"}, lora={"r": 16, "alpha": 32},
            vision={"vision_layers": True, "language_layers": True, "projector": "full"})),
    }
    base, tokenizer = vt.load(str(model_dir), dtype="float32")
    before = accuracy(base, tokenizer, held)
    rows = []
    for name, (folder, settings) in runs.items():
        result, seconds = train_run(folder, model_dir, data, work / "runs", args, **settings)
        if result.adapter_dir:
            model, tok = vt.load(str(model_dir), dtype="float32")
            vt.load_adapter(model, str(result.adapter_dir))
        else:
            model, tok = vt.load(str(result.model_dir), dtype="float32")
        after = accuracy(model, tok, held)
        rows.append((name, before, after, seconds, result.final_loss))
        print(f"{name}: held-out accuracy {before:.3f} -> {after:.3f} ({seconds:.0f} s)", flush=True)
    write_report(Path(args.out), args, rows, len(train), len(held))


def write_report(out: Path, args, rows, n_train: int, n_held: int):
    import sklearn
    import torch
    import transformers
    lines = ["# A tiny vision-language model learns to read digits (cpu, fp32, from random weights)", "",
             f"Command: `python benchmarks/vision_learns.py --steps {args.steps} --batch-size {args.batch_size}`  ",
             f"Data: scikit-learn {sklearn.__version__}'s digits, 8x8 scans upscaled to 32x32; {n_train} training "
             f"images, {n_held} held out (seeded split). Prompt: an image and \"{QUESTION}\"; answer: the digit.  ",
             "Model: velotune.bench.tiny_vlm `small` (CLIP tower 96 wide x 3 layers on 8x8 patches = 16 image "
             "tokens, projector, Llama 128 wide x 3 layers), random weights, seed 0.  ",
             f"Training: {args.steps} steps of {args.batch_size} samples, AdamW, cosine schedule, 20 warm-up steps; "
             "loss on the answer only. Accuracy: greedy answer == digit, on the held-out images. The LoRA runs keep "
             "the random output head and final norm as they are, so their logits stay small: the right answer wins "
             "the argmax while the loss stays near 3 (full fine-tuning trains the head).", "",
             "| run | accuracy before | accuracy after | training s | last logged loss |", "|---|---|---|---|---|"]
    for name, before, after, seconds, loss in rows:
        shown = f"{loss:.4f}" if isinstance(loss, float) else "—"
        lines.append(f"| {name} | {before:.3f} | {after:.3f} | {seconds:.0f} | {shown} |")
    lines += ["", "Training seconds are wall time on a machine shared with other work (the load average moves them "
              "several-fold); speed is measured side by side by `velotune bench --vision`.", "", "## Machine", "",
              f"- cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores), {args.threads} torch "
              f"thread(s); python {platform.python_version()}",
              f"- torch {torch.__version__}, transformers {transformers.__version__}; load average at the end "
              f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}",
              f"- {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
