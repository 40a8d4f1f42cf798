"""minipass: a reference implementation of PaSS (Parallel Speculative Sampling).

    import minipass
    m = minipass.load()                                   # the default model, its tokenizer, its look-ahead file
    r = m.generate(["def fibonacci(n):"], mode="tree", max_new_tokens=48)
    print(r.texts[0], r.stats.tokens_per_call)

See api.py for `load`, `Minipass.generate` and `Minipass.stream`, decoders.py for the modes and their options.
"""

from minipass.api import Minipass, Result, load
from minipass.decoders import MODES, DecoderOptions
from minipass.decoding import SamplingParams
from minipass.errors import MinipassError
from minipass.tree_decoding import TreeConfig

__all__ = ["load", "Minipass", "Result", "MODES", "DecoderOptions", "SamplingParams", "TreeConfig", "MinipassError"]
