"""The Python face of minipass: load a checkpoint once, then decode prompts with any mode, or stream one.

    import minipass
    m = minipass.load()                                   # the default model, its tokenizer, its look-ahead file
    r = m.generate(["def fibonacci(n):"], mode="tree", max_new_tokens=48)
    print(r.texts[0], r.stats.tokens_per_call)
    for piece in m.stream("Write a haiku about the sea.", chat=True, mode="pass", temperature=0.8, top_k=10):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from minipass.decoders import LOOKAHEAD_MODES, DecoderOptions, datastore_for, lookahead_for, make_decoder
from minipass.decoding import DecodeStats, SamplingParams
from minipass.errors import MinipassError
from minipass.loading import load_checkpoint

Prompt = Union[str, Sequence[int], Sequence[dict]]  # text, token ids, or chat messages


@dataclass
class Result:
    texts: list  # per prompt, the generated text
    ids: list  # per prompt, the generated token ids (a stop token that ended the row included)
    stats: DecodeStats


class Minipass:
    """A loaded model with its tokenizer; `generate` and `stream` decode with any of the modes of decoders.py."""

    def __init__(self, model, tokenizer, checkpoint: Path, lookahead_file: Optional[str] = None,
                 default_model: bool = False, datastore_file: Optional[str] = None):
        self.model, self.tokenizer, self.checkpoint = model, tokenizer, checkpoint
        self.lookahead_file, self.default_model, self.datastore_file = lookahead_file, default_model, datastore_file
        self._lookahead, self._datastore = {}, []

    def encode(self, prompt: Prompt, chat: bool) -> list:
        """Token ids of a prompt: ids as they are, chat messages through the chat template, text as is or, with
        chat=True, as one user turn."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(self.tokenizer.chat_prompt(prompt) if chat else prompt)
        prompt = list(prompt)
        if prompt and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode(self.tokenizer.chat_prompt(prompt))
        if all(isinstance(t, int) for t in prompt):
            return prompt
        raise MinipassError("a prompt must be a string, a list of token ids or a list of chat messages "
                            "({'role': ..., 'content': ...})")

    def lookahead(self, L: int):
        if L not in self._lookahead:
            self._lookahead[L] = lookahead_for(self.model, self.lookahead_file, L, self.default_model)[0]
        return self._lookahead[L]

    def datastore(self):
        """The tree mode's datastore (datastore_for), loaded once; None if there is none."""
        if not self._datastore:
            self._datastore.append(datastore_for(self.model, self.datastore_file, self.default_model)[0])
        return self._datastore[0]

    def decoder(self, mode: str, options: DecoderOptions):
        if mode == "tree" and options.datastore is None:
            options = replace(options, datastore=self.datastore())
        return make_decoder(mode, options, self.lookahead(options.lookahead) if mode in LOOKAHEAD_MODES else None)

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], mode: str = "ar", *, chat: bool = False,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, lookahead: int = 4, options: Optional[DecoderOptions] = None,
                 on_tokens=None) -> Result:
        """Decode a batch of prompts (or one) with `mode`; row i draws its random numbers from seed + i, so its
        output does not depend on the other rows. options: every other decoder option (decoders.py)."""
        batch = [prompts] if isinstance(prompts, str) or _is_single(prompts) else list(prompts)
        ids = [self.encode(p, chat) for p in batch]
        options = replace(options or DecoderOptions(), lookahead=lookahead)
        sampling = SamplingParams(temperature, top_k, top_p)
        out = self.decoder(mode, options)(self.model, ids, max_new_tokens, sampling,
                                          seeds=[seed + i for i in range(len(ids))],
                                          stop_ids=self.tokenizer.eos_ids, on_tokens=on_tokens)
        return Result([self.tokenizer.decode(t) for t in out.tokens], out.tokens, out.stats)

    def stream(self, prompt: Prompt, mode: str = "ar", **kwargs) -> Iterator[str]:
        """Yield the text of one prompt's completion piece by piece as the decoder commits tokens (the keyword
        options are those of generate)."""
        pieces: queue.Queue = queue.Queue()
        text = self.tokenizer.stream()
        printed = [0]

        def on_tokens(out, n_out):
            n = int(n_out[0])
            pieces.put("".join(text.push(t) for t in out[0, printed[0]:n].tolist()))
            printed[0] = n

        def work():
            try:
                self.generate([prompt], mode, on_tokens=on_tokens, **kwargs)
                pieces.put(text.flush())
                pieces.put(None)
            except BaseException as e:  # handed to the consumer, which raises it
                pieces.put(e)

        threading.Thread(target=work, daemon=True).start()
        while True:
            piece = pieces.get()
            if piece is None:
                return
            if isinstance(piece, BaseException):
                raise piece
            if piece:
                yield piece


def _is_single(prompts) -> bool:
    """A list of token ids or of chat messages is one prompt, not a batch."""
    return bool(prompts) and all(isinstance(x, (int, dict)) for x in prompts)


def load(ckpt: Optional[Union[str, Path]] = None, dtype: str = "auto", device: str = "auto", kernels: str = "auto",
         lookahead_file: Optional[str] = None, datastore_file: Optional[str] = None) -> Minipass:
    """A checkpoint directory (None: the embedded default model, converted on first use) with its tokenizer, the
    look-ahead file of the PaSS modes (None: the shipped one for the default model, else untrained) and the tree
    mode's datastore file (None: the shipped one for the default model, else none; "none": none)."""
    model, tok, path = load_checkpoint(ckpt, dtype, device, kernels)
    return Minipass(model, tok, path, lookahead_file, default_model=ckpt is None, datastore_file=datastore_file)
