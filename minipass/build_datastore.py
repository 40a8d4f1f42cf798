"""Build a datastore file (datastore.py) from self-distilled text: the tree mode's datastore chains.

    python -m minipass.build_datastore --out weights/smollm2-135m-instruct.datastore.safetensors \\
        --data data/distill-code.jsonl --data data/distill-sharegpt.jsonl

--data files are minipass.distill's output (or any .jsonl of {"text"} / {"messages"} lines, or .txt); the file
records the tokenizer's vocabulary size, and a model of another vocabulary refuses it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minipass.datastore import save_datastore
from minipass.errors import MinipassError


def parse_args(argv=None) -> argparse.Namespace:
    from minipass.cli import add_model_args

    p = argparse.ArgumentParser(prog="python -m minipass.build_datastore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--data", action="append", required=True,
                   help="a JSONL file of {\"text\": ...} lines (minipass.distill's output); repeatable")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from minipass.cli import run_cli
    from minipass.loading import load_checkpoint
    from minipass.data import read_data_file

    args = parse_args(argv)

    def work():
        for path in args.data:
            if not Path(path).is_file():
                raise MinipassError(f"--data file not found: {path} (make it with python -m minipass.distill)")
        model, tok, _ = load_checkpoint(args.ckpt, "fp32", "cpu")
        tokens = []
        for path in args.data:
            for text in read_data_file(Path(path), tok):
                tokens += tok.encode(text) + [-1]
        made_by = "python -m minipass.build_datastore " + " ".join(argv or sys.argv[1:])
        save_datastore(args.out, tokens, model.args.vocab_size, made_by=made_by)
        print(f"wrote {args.out}: {sum(t >= 0 for t in tokens)} tokens of {len(args.data)} file(s)")

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
