"""One small tokenizer interface over the two formats LLaMA-family checkpoints ship.

- `tokenizer.json` (Hugging Face `tokenizers`): byte-level BPE (SmolLM2, LLaMA 3, ...) or SentencePiece-style BPE.
- `tokenizer.model` (SentencePiece): LLaMA 1/2, Mistral 7B, ...
A GGUF file's vocabulary is rebuilt as one of the two (gguf_loader.py) and comes with the same settings in memory.

Checkpoint conventions come from `tokenizer_config.json` (bos/eos tokens, `add_bos_token`, `chat_template`) and
`config.json` / `generation_config.json` (`bos_token_id`, `eos_token_id`, int or list), when present.
Special-token strings inside the text (`<|im_start|>`, `<s>`) always become their single ids, so a chat prompt is
plain text. With SentencePiece, text after a special token gets no dummy-prefix space, as if the special token were
part of the same string (`transformers` with `legacy=False`); a tokenizer_config.json with `"legacy": true` encodes
each piece between special tokens on its own instead, as Meta's and Mistral's reference code do ("<s>[INST]" gives
"▁[INST]").
"""

import json
import re
from pathlib import Path

from minipass.errors import MinipassError

CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer_config.json")
_CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MinipassError(f"cannot read {path}: {e}") from e


def _content(token) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as serialized AddedToken dicts.
    return token.get("content") if isinstance(token, dict) else token


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


class Tokenizer:
    """Encode/decode text for one checkpoint; build it with `Tokenizer.from_dir(path)` (or, for a GGUF file, with
    `GGUFCheckpoint(path).tokenizer()`)."""

    def __init__(self, path: Path, hf=None, sp=None, configs: dict | None = None):
        """path names the tokenizer's source in messages; `configs` holds the contents of config.json,
        generation_config.json and tokenizer_config.json under those names (default: read from the directory)."""
        self.path, self._hf, self._sp = path, hf, sp
        in_files = configs is None
        if in_files:
            configs = {name: _read_json(path / name) for name in CONFIG_FILES}
        config, generation, tok_config = (configs.get(name) or {} for name in CONFIG_FILES)

        # Special tokens by text; SentencePiece cannot match them in text itself, so encode() splits on them.
        if hf is not None:
            self._special = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        else:
            self._special = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                             if sp.is_control(i) or sp.is_unknown(i)}
            for i, t in (tok_config.get("added_tokens_decoder") or {}).items():
                self._special[_content(t)] = int(i)
        self._special_ids = set(self._special.values())
        # Longest first, so a special token that contains another one wins.
        alternatives = "|".join(re.escape(t) for t in sorted(self._special, key=len, reverse=True))
        self._split = re.compile(f"({alternatives})") if self._special else None

        bos, eos = _content(tok_config.get("bos_token")), _content(tok_config.get("eos_token"))
        bos_ids = [self.token_to_id(bos)] if bos else []
        bos_ids += _ids(config.get("bos_token_id")) + _ids(generation.get("bos_token_id"))
        if sp is not None and sp.bos_id() >= 0:
            bos_ids.append(sp.bos_id())
        bos_ids = [i for i in bos_ids if i is not None]
        self.bos_id: int | None = bos_ids[0] if bos_ids else None

        eos_ids = _ids(config.get("eos_token_id")) + _ids(generation.get("eos_token_id"))
        eos_ids += [self.token_to_id(eos)] if eos else []
        if not eos_ids and sp is not None and sp.eos_id() >= 0:
            eos_ids.append(sp.eos_id())
        self.eos_ids: list[int] = list(dict.fromkeys(i for i in eos_ids if i is not None))

        self.bos_token = bos or (self.id_to_token(self.bos_id) if self.bos_id is not None else "")
        self.eos_token = eos or (self.id_to_token(self.eos_ids[0]) if self.eos_ids else "")
        self.add_bos: bool = tok_config.get("add_bos_token", self._post_processor_adds_bos() if hf else True)
        self.chat_template: str | None = self._chat_template(path if in_files else None, tok_config)
        self._legacy = bool(tok_config.get("legacy", False))

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """Load `tokenizer.json` if present, else `tokenizer.model`, plus the checkpoint's config files."""
        path = Path(path)
        if not path.is_dir():
            raise MinipassError(f"tokenizer directory {path} does not exist.")
        file = path / "tokenizer.json"
        if file.is_file():
            from tokenizers import Tokenizer as HFTokenizer
            try:
                hf = HFTokenizer.from_file(str(file))
            except Exception as e:  # tokenizers raises a bare Exception for malformed files
                raise MinipassError(f"cannot read tokenizer file {file}: {e}") from e
            return cls(path, hf=hf)
        file = path / "tokenizer.model"
        if file.is_file():
            import sentencepiece
            try:
                sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
            except (OSError, RuntimeError) as e:
                raise MinipassError(f"cannot read tokenizer file {file}: {e}") from e
            return cls(path, sp=sp)
        raise MinipassError(f"directory {path} has neither tokenizer.json nor tokenizer.model.")

    @property
    def vocab_size(self) -> int:
        if self._hf is not None:
            return self._hf.get_vocab_size(with_added_tokens=True)
        return max([self._sp.get_piece_size(), *(i + 1 for i in self._special_ids)])

    def token_to_id(self, token: str) -> int | None:
        if token in self._special:
            return self._special[token]
        if self._hf is not None:
            return self._hf.token_to_id(token)
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None  # unknown pieces map to <unk>, not to None

    def id_to_token(self, i: int) -> str | None:
        if self._hf is not None:
            return self._hf.id_to_token(i)
        if 0 <= i < self._sp.get_piece_size():
            return self._sp.id_to_piece(i)
        return next((t for t, j in self._special.items() if j == i), None)

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of `text`; `bos=None` follows the checkpoint (tokenizer_config's add_bos_token)."""
        if bos is None:
            bos = self.add_bos
        if bos and self.bos_id is None:
            raise MinipassError(f"tokenizer in {self.path} has no BOS token, so encode(bos=True) is impossible.")
        ids = [self.bos_id] if bos else []
        if self._hf is not None:
            return ids + self._hf.encode(text, add_special_tokens=False).ids
        for k, part in enumerate(self._split.split(text) if self._split else [text]):
            if k % 2:
                ids.append(self._special[part])
            elif part:
                ids += self._sp_encode(part, dummy_prefix=k == 0 or self._legacy)
        return ids

    def _sp_encode(self, text: str, dummy_prefix: bool) -> list[int]:
        if dummy_prefix:
            return self._sp.encode(text)
        # SentencePiece would prepend its dummy "▁" to every segment; encoding behind a throwaway prefix and
        # dropping the prefix's pieces tokenizes the segment as the continuation of one string.
        prefix = self._sp.id_to_piece(self._sp.unk_id())
        return self._sp.encode(prefix + text)[len(self._sp.encode(prefix)):]

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens skipped."""
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._sp.decode([i for i in ids if i not in self._special_ids and 0 <= i < self._sp.get_piece_size()])

    def chat_prompt(self, messages) -> str:
        """Prompt text for a chat: `messages` is one user turn (str) or a list of {"role", "content"} dicts."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
            raise MinipassError("chat messages must be a string or a list of {'role': ..., 'content': ...} dicts.")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise MinipassError(f"chat template of {self.path} refused the messages: {message}")

        # The same environment transformers renders chat templates in, so templates written for it behave alike.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template or _CHATML).render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise MinipassError(f"chat template of {self.path} failed to render: {e}") from e

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def _post_processor_adds_bos(self) -> bool:
        with_special = self._hf.encode("a", add_special_tokens=True).ids
        return len(with_special) > len(self._hf.encode("a", add_special_tokens=False).ids) \
            and with_special[0] in self._special_ids

    @staticmethod
    def _chat_template(path: Path | None, tok_config: dict) -> str | None:
        # Newer transformers save the template as its own file; older ones may store a list of named templates.
        if path is not None and (path / "chat_template.jinja").is_file():
            return (path / "chat_template.jinja").read_text(encoding="utf-8")
        template = tok_config.get("chat_template")
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        return template


class StreamDecoder:
    """Incremental decoding: `push(id)` returns only new, complete text; `flush()` returns the rest.

    Tokens are decoded in a sliding window that starts one token before the unread ones: decoding a token alone
    would lose SentencePiece's leading space ("▁world" alone decodes to "world"), and a token can end inside a
    multi-byte character, which decodes to U+FFFD until the bytes that complete it arrive.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        self._read = 0  # self._ids[:self._read] has been emitted; self._ids[0] is the window's context token

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        seen = self.tokenizer.decode(self._ids[:self._read])
        text = self.tokenizer.decode(self._ids)
        if len(text) <= len(seen) or text.endswith("\ufffd"):
            return ""
        self._ids, self._read = self._ids[self._read:], len(self._ids) - self._read
        return text[len(seen):]

    def flush(self) -> str:
        text = self.tokenizer.decode(self._ids)[len(self.tokenizer.decode(self._ids[:self._read])):]
        self._ids, self._read = [], 0
        return text
