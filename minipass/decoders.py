"""The decoders by name, with their options: what the command lines, bench.py and the Python API all use.

    decode = make_decoder("tree", model, DecoderOptions(lookahead=4), lookahead=la)
    out = decode(model, prompts, max_new_tokens, sampling, seeds=seeds, stop_ids=tok.eos_ids)

Every decoder has the signature of `ar_decode` (decoding.py); the speculative ones add their options, which
`make_decoder` binds. Exactness does not depend on any option: they trade tokens per call against the width of a call.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Union

from torch import Tensor

from minipass.datastore import Datastore, load_datastore
from minipass.decoding import ar_decode
from minipass.errors import MinipassError
from minipass.lookahead import init_lookahead, load_lookahead
from minipass.pass_decoding import pass1_decode, pass_decode
from minipass.tree_decoding import NGRAM, TreeConfig, ngram_decode, tree_decode

MODES = {"ar": ar_decode, "pass": pass_decode, "pass1": pass1_decode, "ngram": ngram_decode, "tree": tree_decode}
LOOKAHEAD_MODES = ("pass", "pass1", "tree")
# Trained look-ahead embeddings shipped for the default model (see weights/README.md for how they were made).
DEFAULT_LOOKAHEAD_FILE = Path(__file__).resolve().parent.parent / "weights" / "smollm2-135m-instruct.lookahead.safetensors"
# The datastore shipped for it: the same self-distilled continuations, for the tree's datastore chains.
DEFAULT_DATASTORE_FILE = DEFAULT_LOOKAHEAD_FILE.with_name("smollm2-135m-instruct.datastore.safetensors")


@dataclass(frozen=True)
class DecoderOptions:
    lookahead: int = 4  # L: look-ahead tokens of pass, pass1 and tree
    pass1_blocks: int = 2  # pass1: look-ahead blocks after acceptance points 0..n-1; 0 = all L + 1
    tree: TreeConfig = field(default_factory=TreeConfig)  # tree mode
    ngram: TreeConfig = NGRAM  # ngram mode: one chain, no look-ahead
    compile: Union[bool, dict] = False  # compile the step (decoding.compile_fn): True, or the torch.compile kwargs
    check_every: Optional[int] = None  # steps between two looks at the state (None: decoding.check_every_default)
    cache_len: Optional[int] = None  # the least cache length: calls that pass the same share one compiled step
    datastore: Optional[Datastore] = None  # tree mode: chains from a datastore as well (see datastore_for)


def lookahead_for(model, lookahead_file: Optional[str], L: int, default_model: bool) -> tuple[Tensor, str]:
    """(look-ahead tensor, where it came from) for a PaSS mode: the file, the shipped one for the default model, or
    untrained (mean-embedding) embeddings, which draft poorly."""
    if L < 1:
        raise MinipassError(f"--lookahead must be >= 1, got {L}")
    path = lookahead_file
    if path is None and default_model and DEFAULT_LOOKAHEAD_FILE.is_file():
        path = DEFAULT_LOOKAHEAD_FILE
    if path is not None:
        return load_lookahead(path, model, L), str(path)
    return init_lookahead(model, L).to(model.embed_tokens.weight.dtype), "untrained (mean embedding)"


def datastore_for(model, datastore_file: Optional[str], default_model: bool) -> tuple[Optional[Datastore], str]:
    """(datastore or None, where it came from) for the tree mode: the file, 'none' for none, or by default the one
    shipped for the default model (other models have none unless given one: see datastore.py)."""
    if datastore_file == "none":
        return None, "none"
    path = datastore_file
    if path is None and default_model and DEFAULT_DATASTORE_FILE.is_file():
        path = DEFAULT_DATASTORE_FILE
    if path is None:
        return None, "none"
    return load_datastore(path, model.args.vocab_size, device=model.embed_tokens.weight.device), str(path)


def make_decoder(mode: str, options: DecoderOptions = DecoderOptions(),
                 lookahead: Optional[Tensor] = None) -> Callable:
    """decode(model, prompts, max_new_tokens, sampling, seeds=, stop_ids=, on_tokens=) for a mode and options.
    `lookahead` is needed by pass, pass1 and tree (see lookahead_for)."""
    if mode not in MODES:
        raise MinipassError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    run = dict(compile=options.compile, check_every=options.check_every, cache_len=options.cache_len)
    if mode == "ar":
        return partial(ar_decode, **run)
    if mode == "ngram":
        return partial(ngram_decode, tree=options.ngram, **run)
    if lookahead is None:
        raise MinipassError(f"mode {mode!r} needs look-ahead embeddings")
    if mode == "pass":
        return partial(pass_decode, lookahead=lookahead, **run)
    if mode == "pass1":
        return partial(pass1_decode, lookahead=lookahead, blocks=options.pass1_blocks or None, **run)
    return partial(tree_decode, lookahead=lookahead, tree=options.tree, datastore=options.datastore, **run)


def with_tree(options: DecoderOptions, **changes) -> DecoderOptions:
    """options with some TreeConfig fields of the tree mode changed."""
    return replace(options, tree=replace(options.tree, **changes))
