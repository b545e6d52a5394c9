"""Generation speed: velotune's decoder against transformers' `generate`, same model, same prompts, greedy, one run.

    python -m velotune.bench.generation            # CPU: a ~56M-parameter Llama shape, vocab 32000, random weights
    python -m velotune.bench.generation --quick    # under 30 s
    python -m velotune.bench.generation --device cuda
    python benchmarks/generation.py ...            # the same, from a clone

A random Llama checkpoint is written once and loaded by both (velotune through `vt.load`, transformers through
`from_pretrained` with its default SDPA attention). Each case (batch size x prompt length) runs the two engines
alternately (A B B A ...) after one warm-up each, and reports medians of:
- time to first token (TTFT): from the call to the first new token being available (prefill + one sample);
- decode tokens/s: new tokens per second after the first, summed over the batch.
EOS never stops either engine, so both make exactly the same number of tokens; the greedy tokens are compared
too (a mismatch is reported, as a check that both ran the same model). Results go to
<out>/generation-<device>.json and .md (./benchmarks/results in a clone) with the machine, the versions and the
command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .machine import command_line, cpu_name, default_out_dir, load_average

# Llama-2-like proportions at ~56M parameters (32.8M of them in the untied embedding and output head).
SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)

FULL = dict(cases=[(1, 32), (1, 512), (4, 128)], new_tokens=128, reps=5)
QUICK = dict(cases=[(1, 32)], new_tokens=24, reps=3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small case, 3 repetitions (< 30 s on a CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", help="default: float32 on the CPU, bfloat16 on a GPU")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on a busy machine)")
    p.add_argument("--reps", type=int, help="timed runs of each engine per case (default: 5, --quick 3)")
    p.add_argument("--new-tokens", dest="new_tokens", type=int, help="tokens generated per run")
    p.add_argument("--out", help="directory for the result files (default: ./benchmarks/results when it exists, "
                                 "else ./velotune-bench-results)")
    p.add_argument("--no-save", dest="save", action="store_false", help="print only")
    return p.parse_args(argv)


# ---- the model ------------------------------------------------------------------------------------------------

def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random Llama checkpoint in Hugging Face layout. Weights are drawn here (normal, std 0.02; norms at 1)
    rather than by transformers' initialisation, which takes seconds at this size."""
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02, generator=g)
    model.save_pretrained(str(path))
    return path


def load_models(path: Path, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    import velotune as vt
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None     # never stop early: both engines make every token
    hf.generation_config.pad_token_id = 0
    ours, _ = vt.load(path, dtype=dtype, device=device, load_tokenizer_files=False)
    return ours.eval(), hf


# ---- one timed run of each engine -------------------------------------------------------------------------------

def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run_velotune(model, input_ids, new_tokens: int, device):
    """(seconds to the first token, seconds for all, generated ids [B, new_tokens])."""
    from velotune.infer import Decoder, SamplingParams
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    _sync(device)
    start = time.perf_counter()
    decoder = Decoder(model, input_ids, None, params, eos_token_ids=[])
    first = None
    for _ in decoder.steps():
        if first is None:
            _sync(device)
            first = time.perf_counter()
    _sync(device)
    end = time.perf_counter()
    return first - start, end - start, torch.tensor(decoder.tokens)


class _Clock:
    """A transformers streamer that only notes when each new token arrives (its first `put` is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.inference_mode()
def run_transformers(model, input_ids, new_tokens: int, device):
    clock = _Clock()
    _sync(device)
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                         do_sample=False, streamer=clock)
    _sync(device)
    end = time.perf_counter()
    return clock.times[1] - start, end - start, out[:, input_ids.shape[1]:].cpu()


ENGINES = {"velotune": run_velotune, "transformers": run_transformers}


def run_case(models: dict, batch: int, prompt_len: int, new_tokens: int, reps: int, device, seed=1):
    """Alternating timed runs of both engines on one batch of random prompts; medians per engine."""
    g = torch.Generator().manual_seed(seed + batch * 1000 + prompt_len)
    ids = torch.randint(3, SHAPE["vocab_size"], (batch, prompt_len), generator=g).to(device)
    samples = {name: [] for name in ENGINES}
    tokens = {}
    for name in ENGINES:   # warm-up (allocations, first-call costs), not timed
        tokens[name] = ENGINES[name](models[name], ids, new_tokens, device)[2]
    order = list(ENGINES)
    for rep in range(reps):
        for name in (order if rep % 2 == 0 else order[::-1]):
            ttft, total, _ = ENGINES[name](models[name], ids, new_tokens, device)
            samples[name].append((ttft, total))
    row = dict(batch=batch, prompt_tokens=prompt_len, new_tokens=new_tokens, reps=reps)
    for name, runs in samples.items():
        ttft = statistics.median(r[0] for r in runs)
        decode_rate = statistics.median(batch * (new_tokens - 1) / (r[1] - r[0]) for r in runs)
        row[name] = dict(ttft_ms=round(1000 * ttft, 2), decode_tokens_per_s=round(decode_rate, 1),
                         runs=[[round(a, 5), round(b, 5)] for a, b in runs])
    row["decode_speedup"] = round(row["velotune"]["decode_tokens_per_s"] / row["transformers"]["decode_tokens_per_s"], 3)
    row["ttft_speedup"] = round(row["transformers"]["ttft_ms"] / row["velotune"]["ttft_ms"], 3)
    row["same_greedy_tokens"] = bool(torch.equal(tokens["velotune"], tokens["transformers"]))
    row["first_mismatch"] = _first_mismatch(tokens["velotune"], tokens["transformers"])
    return row


def _first_mismatch(a, b):
    diff = (a != b).any(dim=0).nonzero()
    return None if diff.numel() == 0 else int(diff[0])


# ---- report -----------------------------------------------------------------------------------------------------

def machine_info(device, dtype, threads) -> dict:
    import transformers

    import velotune
    info = dict(platform=platform.platform(), python=platform.python_version(), cpu_count=os.cpu_count(),
                cpu=cpu_name(), torch=torch.__version__, transformers=transformers.__version__,
                velotune=velotune.__version__, device=str(device), dtype=str(dtype).replace("torch.", ""),
                torch_threads=threads, load_average=load_average(), command=command_line(),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(rows) -> str:
    head = ("| batch | prompt | new | velotune TTFT ms | transformers TTFT ms | TTFT speedup | velotune tok/s "
            "| transformers tok/s | decode speedup | same tokens |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        v, t = r["velotune"], r["transformers"]
        lines.append(f"| {r['batch']} | {r['prompt_tokens']} | {r['new_tokens']} | {v['ttft_ms']:.1f} | "
                     f"{t['ttft_ms']:.1f} | {r['ttft_speedup']:.2f}x | {v['decode_tokens_per_s']:.1f} | "
                     f"{t['decode_tokens_per_s']:.1f} | {r['decode_speedup']:.2f}x | "
                     f"{'yes' if r['same_greedy_tokens'] else 'no (from step ' + str(r['first_mismatch']) + ')'} |")
    return "\n".join(lines)


def markdown(info, rows, params) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in SHAPE.items())
    machine = "\n".join(f"- {k}: {v}" for k, v in info.items())
    return (f"# Generation: velotune vs transformers `generate` ({info['device']})\n\n"
            f"Greedy decoding of random prompts with a random-weight Llama ({params / 1e6:.1f}M parameters: "
            f"{shape}). Medians of alternating runs; speedup = velotune / transformers (higher is better for "
            f"velotune). Command: `{info['command']}`\n\n{table(rows)}\n\n## Machine\n\n{machine}\n")


def write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    reps = args.reps or plan["reps"]
    new_tokens = args.new_tokens or plan["new_tokens"]
    torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda")
                                                           else torch.float32)
    with tempfile.TemporaryDirectory(prefix="vt-bench-gen-") as tmp:
        ours, hf = load_models(write_checkpoint(Path(tmp) / "llama"), device, dtype)
    params = sum(p.numel() for p in hf.parameters())
    models = {"velotune": ours, "transformers": hf}
    rows = []
    for batch, prompt_len in plan["cases"]:
        rows.append(run_case(models, batch, prompt_len, new_tokens, reps, device))
        print(table(rows[-1:]).splitlines()[-1] if rows[:-1] else table(rows), flush=True)
    info = machine_info(device, dtype, args.threads)
    report = markdown(info, rows, params)
    print("\n" + report)
    if args.save:
        out = Path(args.out) if args.out else default_out_dir()
        out.mkdir(parents=True, exist_ok=True)
        name = f"generation-{torch.device(device).type}{'-quick' if args.quick else ''}"
        write_atomic(out / f"{name}.json", json.dumps(dict(machine=info, model=dict(SHAPE, parameters=params),
                                                             results=rows), indent=2) + "\n")
        write_atomic(out / f"{name}.md", report)
        print(f"wrote {out / name}.json and .md")


if __name__ == "__main__":
    main()
