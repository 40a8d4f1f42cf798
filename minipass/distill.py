"""Self-distillation data: the model's own continuations of training prompts, for train_lookahead.

    python -m minipass.distill --out data/distill-sharegpt.jsonl --source sharegpt --num 600
    python -m minipass.distill --out data/distill-code.jsonl --source code --num 600

What greedy verification accepts is what the model itself would write, so its own generations are the closest
training text to what the drafts meet at decoding time. Prompts:
- sharegpt: first user turns of the ShareGPT train split, in the chat format (never the eval split);
- code: a function's signature and docstring from the running Python's standard library, completed as raw text
  like a HumanEval prompt (HumanEval itself is never used).
Output, one JSON object per line: {"messages": [user, assistant]} when the model ended its turn, else {"text": prompt
plus continuation}, so that train_lookahead closes a conversation with EOS only where the model did.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import textwrap
import time
from pathlib import Path

from minipass.decoding import SamplingParams, ar_decode
from minipass.errors import MinipassError
from minipass.cli import add_model_args, run_cli
from minipass.data import stdlib_files


def sharegpt_train_prompts(num: int, seed: int, max_chars: int = 2000) -> list[str]:
    from minipass.data import sharegpt_prompts

    prompts = sharegpt_prompts("train", max_chars)
    random.Random(seed).shuffle(prompts)
    return prompts[:num]


def code_prompts(num: int, seed: int, max_chars: int = 1500) -> list[str]:
    """Signature and docstring of documented standard-library functions (dedented, decorators dropped), at most
    max_chars long like HumanEval's prompts."""
    found = []
    for path in stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately not valid Python (lib2to3 fixtures, encodings)
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
                doc = node.body[0]
                prompt = textwrap.dedent("".join(lines[node.lineno - 1: doc.end_lineno]))
                if len(prompt) <= max_chars:
                    found.append(prompt)
    random.Random(seed).shuffle(found)
    return found[:num]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minipass.distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--source", default="sharegpt", choices=["sharegpt", "code"])
    parser.add_argument("--num", type=int, default=500, help="prompts to continue (default 500)")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=0, help="picks the prompts and seeds sampling")
    return parser.parse_args(argv)


def distill(args: argparse.Namespace) -> None:
    from minipass.loading import load_checkpoint

    if args.num < 1 or args.batch_size < 1:
        raise MinipassError("--num and --batch-size must be at least 1")
    sampling = SamplingParams(args.temperature)
    model, tok, _ = load_checkpoint(args.ckpt, args.dtype, args.device, check_weights=args.check_weights)
    chat = args.source == "sharegpt"
    prompts = sharegpt_train_prompts(args.num, args.seed) if chat else code_prompts(args.num, args.seed)
    texts = [tok.chat_prompt(p) if chat else p for p in prompts]
    ids = [tok.encode(t) for t in texts]
    room = model.args.max_seq_len - args.max_new_tokens - 1
    # Similar lengths batched together waste less attention on padding.
    order = sorted((i for i in range(len(ids)) if len(ids[i]) <= room), key=lambda i: len(ids[i]))
    records, t0, new_tokens = {}, time.perf_counter(), 0
    for start in range(0, len(order), args.batch_size):
        batch = order[start: start + args.batch_size]
        out = ar_decode(model, [ids[i] for i in batch], args.max_new_tokens, sampling,
                        seeds=[args.seed + i for i in batch], stop_ids=tok.eos_ids)
        for i, gen in zip(batch, out.tokens):
            new_tokens += len(gen)
            ended = bool(gen) and gen[-1] in tok.eos_ids
            if chat and ended:
                records[i] = {"messages": [{"role": "user", "content": prompts[i]},
                                           {"role": "assistant", "content": tok.decode(gen)}]}
            else:
                records[i] = {"text": texts[i] + tok.decode(gen)}
        dt = time.perf_counter() - t0
        print(f"\r{len(records)}/{len(order)} prompts  {new_tokens} tokens  {new_tokens / dt:.0f} tokens/s",
              end="", file=sys.stderr, flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in sorted(records):
            f.write(json.dumps(records[i], ensure_ascii=False) + "\n")
    tmp.replace(out_path)
    print(f"\nwrote {len(records)} continuations ({new_tokens} tokens) to {out_path} in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: distill(args))


if __name__ == "__main__":
    sys.exit(main())
