"""Benchmark: autoregressive decoding vs PaSS and token trees, on your checkpoint, your hardware, your prompts.

    python bench.py                                   # default model, both prompt sets, greedy + top-k 10 / T 0.8
    python bench.py --ckpt path/to/llama --lookahead-file la.safetensors --dataset prompts.jsonl
    python bench.py --modes ar,pass,pass1 --lookahead 1,2,4,6,8 --temperature 0 --plot sweep.png

Every mode decodes the same prompts with the same seeds; speed-ups are ratios to the autoregressive run of the same
invocation, and greedy runs say whether the output was token-identical to it. Wall time covers whole generate calls
(prefill included, the same for every mode), after a warm-up call per configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from minipass.data import humaneval_prompts, jsonl_prompts, sharegpt_prompts
from minipass.decoding import DecodeStats, SamplingParams
from minipass.distributed import init_from_env, rank
from minipass.errors import MinipassError
from minipass.generate import (LOOKAHEAD_MODES, MODES, add_decoding_args, add_model_args, make_decoder)
from minipass.loading import load_checkpoint

PAPER_SAMPLING = (0.8, 10, 1.0)  # the paper's setting: temperature 0.8, top-k 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--modes", default="ar,pass,pass1,ngram,tree",
                   help=f"comma-separated, from {','.join(MODES)} (ar always runs: it is the baseline)")
    p.add_argument("--lookahead", default="4", help="look-ahead tokens L, or a comma-separated sweep (1,2,4,6,8)")
    p.add_argument("--dataset", default="humaneval,sharegpt",
                   help="humaneval, sharegpt (held-out first turns, chat format), or a JSONL file of "
                        "{\"prompt\": text} / {\"messages\": [...]} lines; comma-separated")
    p.add_argument("--num-prompts", type=int, default=3, help="prompts per data set (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--temperature", type=float, default=None,
                   help="one sampling setting (default: greedy and the paper's top-k 10 / temperature 0.8)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_decoding_args(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward with static shapes (CUDA graphs on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--peer", choices=["hf"], default=None,
                   help="also time transformers' generate on the same weights, plain and with prompt lookup")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--plot", default=None, help="write speed-up and tokens per call against L to this PNG")
    return p.parse_args(argv)


def load_prompts(spec: str, tok, n: int) -> list:
    """(name, token ids per prompt) for a data set name or a JSONL file."""
    if spec == "humaneval":
        texts = humaneval_prompts()[:n]
    elif spec == "sharegpt":
        texts = [tok.chat_prompt(t) for t in sharegpt_prompts("eval")[:n]]
    else:
        texts = [tok.chat_prompt(r["messages"]) if "messages" in r else r["prompt"] for r in jsonl_prompts(spec)[:n]]
        spec = Path(spec).stem
    return spec, [tok.encode(t) for t in texts]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        bar = "#" * (20 * self.done // self.total)
        print(f"\rbench [{bar:<20}] {self.done}/{self.total} {what:<48} {time.perf_counter() - self.t0:6.0f}s",
              end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


def run(decode, model, prompts, args, sampling, stop_ids) -> tuple:
    """Decode every prompt in batches; returns (outputs, merged DecodeStats)."""
    total, outputs = DecodeStats(), []
    for i in range(0, len(prompts), args.batch_size):
        batch = prompts[i:i + args.batch_size]
        seeds = [args.seed + i + j for j in range(len(batch))]
        out = decode(model, batch, args.max_new_tokens, sampling, seeds=seeds, stop_ids=stop_ids)
        outputs += out.tokens
        s = out.stats
        total.calls += s.calls
        total.row_calls += s.row_calls
        total.tokens += s.tokens
        total.wall_s += s.wall_s
        width = max(len(total.attempted), len(s.attempted))
        total.attempted = [sum(x[k] if k < len(x) else 0 for x in (total.attempted, s.attempted)) for k in range(width)]
        total.accepted = [sum(x[k] if k < len(x) else 0 for x in (total.accepted, s.accepted)) for k in range(width)]
    return outputs, total


def hf_runs(ckpt, dtype, device, prompts, args, sampling, stop_ids) -> list:
    """transformers' generate on the same weights: plain, and with prompt-lookup decoding."""
    try:
        import transformers
    except ImportError:
        print("bench: --peer hf skipped: transformers is not installed (pip install transformers)", file=sys.stderr)
        return []
    hf = transformers.LlamaForCausalLM.from_pretrained(str(ckpt), dtype=dtype).to(device).eval()
    results = []
    for name, extra in (("hf", {}), ("hf-lookup", {"prompt_lookup_num_tokens": 10})):
        gen = dict(max_new_tokens=args.max_new_tokens, eos_token_id=list(stop_ids) or None, pad_token_id=0,
                   do_sample=sampling.temperature > 0, **extra)
        if sampling.temperature > 0:
            gen.update(temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p)
        outputs, wall, tokens = [], 0.0, 0
        for i, p in enumerate([prompts[0]] + prompts):  # the first call warms up
            ids = torch.tensor([p], device=device)
            torch.manual_seed(args.seed + i)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), **gen)[0, len(p):].tolist()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i > 0:
                wall += time.perf_counter() - t0
                tokens += len(out)
                outputs.append(out)
        results.append((name, outputs, wall, tokens))
    return results


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def record(dataset, mode, L, sampling, args, n_prompts, stats, outputs, ar, gb) -> dict:
    greedy = sampling.temperature == 0
    tps = stats.tokens / stats.wall_s if stats.wall_s else 0.0
    return {
        "dataset": dataset, "mode": mode, "lookahead": L, "temperature": sampling.temperature,
        "top_k": sampling.top_k, "top_p": sampling.top_p, "batch_size": args.batch_size, "prompts": n_prompts,
        "new_tokens": stats.tokens, "wall_s": round(stats.wall_s, 4), "tokens_per_s": round(tps, 3),
        "calls": stats.calls, "tokens_per_call": round(stats.tokens_per_call, 4),
        "acceptance_by_position": [round(a, 4) for a in stats.acceptance],
        "mean_accepted": round(stats.mean_accepted, 4) if stats.attempted else None,
        "weights_gb_per_s": round(gb * stats.calls / stats.wall_s, 3) if stats.wall_s else 0.0,
        "speedup_vs_ar": round(tps / ar["tokens_per_s"], 4) if ar and ar["tokens_per_s"] else 1.0,
        "identical_to_ar": (True if ar is None else outputs == ar["outputs"]) if greedy else None,
    }


def print_table(runs: list) -> None:
    head = f"{'dataset':<10} {'setting':<12} {'mode':<9} {'L':>2} {'tok/s':>7} {'speedup':>7} {'tok/call':>8} " \
           f"{'GB/s':>6} {'same':>5}  acceptance by position"
    print(head)
    print("-" * len(head))
    for r in runs:
        setting = "greedy" if r["temperature"] == 0 else f"T{r['temperature']:g} k{r['top_k']} p{r['top_p']:g}"
        same = {True: "yes", False: "NO", None: "-"}[r["identical_to_ar"]]
        acc = " ".join(f"{a:.2f}" for a in r["acceptance_by_position"])
        print(f"{r['dataset']:<10} {setting:<12} {r['mode']:<9} {r['lookahead']:>2} {r['tokens_per_s']:>7.1f} "
              f"{r['speedup_vs_ar']:>6.2f}x {r['tokens_per_call']:>8.2f} {r['weights_gb_per_s']:>6.1f} {same:>5}  {acc}")


def plot(runs: list, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MinipassError("--plot needs matplotlib (pip install 'minipass[plot]')") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    keys = sorted({(r["dataset"], r["temperature"], r["mode"]) for r in runs if r["mode"] in LOOKAHEAD_MODES})
    for dataset, temp, mode in keys:
        pts = sorted((r["lookahead"], r["speedup_vs_ar"], r["tokens_per_call"]) for r in runs
                     if (r["dataset"], r["temperature"], r["mode"]) == (dataset, temp, mode))
        label = f"{mode} {dataset} {'greedy' if temp == 0 else f'T={temp:g}'}"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set(xlabel="look-ahead tokens L", ylabel="speed-up vs autoregressive", title="Speed-up")
    ax2.set(xlabel="look-ahead tokens L", ylabel="tokens per forward call", title="Tokens per call")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    init_from_env()  # under torchrun: tensor parallel over the processes, rank 0 prints and writes files
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        for m in modes:
            if m not in MODES:
                raise MinipassError(f"unknown mode {m!r} in --modes; choose from {', '.join(MODES)}")
        modes = ["ar"] + [m for m in modes if m != "ar"]
        try:
            lookaheads = [int(x) for x in args.lookahead.split(",")]
        except ValueError:
            raise MinipassError(f"--lookahead must be integers separated by commas, got {args.lookahead!r}") from None
        if args.num_prompts < 1 or args.batch_size < 1:
            raise MinipassError("--num-prompts and --batch-size must be >= 1")
        if args.temperature is None:
            settings = [SamplingParams(), SamplingParams(*PAPER_SAMPLING)]
        else:
            settings = [SamplingParams(args.temperature, args.top_k, args.top_p)]

        model, tok, ckpt = load_checkpoint(args.ckpt, args.dtype, args.device, args.kernels)
        device = model.embed_tokens.weight.device
        if args.compile:
            model.compile_for_decoding(**({"mode": "reduce-overhead"} if device.type == "cuda" else {}))
        datasets = [load_prompts(d.strip(), tok, args.num_prompts) for d in args.dataset.split(",") if d.strip()]
        # Decoders (and their look-ahead embeddings) are built once; building one checks its options.
        decoders = {("ar", 0): make_decoder("ar", model, args, 0)}
        for m in modes[1:]:
            for L in (lookaheads if m in LOOKAHEAD_MODES else [0]):
                decoders[(m, L)] = make_decoder(m, model, args, L, quiet=(m, L) != ("pass", lookaheads[0]))
        gb = weight_bytes(model) / 1e9
        progress = Progress(len(datasets) * len(settings) * (len(decoders) + (2 if args.peer else 0)))
        runs = []
        for name, prompts in datasets:
            for sampling in settings:
                ar = None
                for (mode, L), decode in decoders.items():
                    decode(model, prompts[:1], 4, sampling, stop_ids=tok.eos_ids)  # warm-up
                    outputs, stats = run(decode, model, prompts, args, sampling, tok.eos_ids)
                    r = record(name, mode, L, sampling, args, len(prompts), stats, outputs, ar, gb)
                    if mode == "ar":
                        ar = {"tokens_per_s": r["tokens_per_s"], "outputs": outputs}
                    runs.append(r)
                    progress.step(f"{name} {mode} L={L} T={sampling.temperature:g}")
                if args.peer:
                    for mode, outputs, wall, tokens in hf_runs(ckpt, model.embed_tokens.weight.dtype, device,
                                                               prompts, args, sampling, tok.eos_ids):
                        stats = DecodeStats(calls=tokens, row_calls=tokens, tokens=tokens, wall_s=wall)
                        r = record(name, mode, 0, sampling, args, len(prompts), stats, outputs, ar, gb)
                        r["calls"], r["tokens_per_call"], r["weights_gb_per_s"] = None, None, None
                        runs.append(r)
                        progress.step(f"{name} {mode} T={sampling.temperature:g}")
        progress.close()

        print(f"model: {ckpt}  device: {device_name(device)}  dtype: {model.embed_tokens.weight.dtype}  "
              f"weights: {gb:.3f} GB  prompts: {args.num_prompts} x {args.max_new_tokens} new tokens, "
              f"batch {args.batch_size}")
        printable = [dict(r, weights_gb_per_s=r["weights_gb_per_s"] or 0.0, tokens_per_call=r["tokens_per_call"] or 0.0)
                     for r in runs]
        print_table(printable)
        if args.json and rank() == 0:
            doc = {"model": str(ckpt), "device": device_name(device), "dtype": str(model.embed_tokens.weight.dtype),
                   "runs": runs}
            tmp = Path(args.json).with_name(Path(args.json).name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(args.json)
        if args.plot and rank() == 0:
            plot(runs, args.plot)
    except MinipassError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
