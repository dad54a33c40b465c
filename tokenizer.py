"""A tiktoken tokenizer built from the checkpoint's own files (tiktoken cannot download here).

    from tokenizer import load_tokenizer
    tok = load_tokenizer("assets/SmolLM2-135M-Instruct")
    tok.encode("Hello world"), tok.decode([19556, 905]), tok.encode_chat([{"role": "user", "content": "Hi"}])

Two sources:
- tokenizer.json with a byte-level BPE model (GPT-2 style: SmolLM, Qwen2, Llama-3 exports).
  tiktoken merges the adjacent pair whose result has the lowest rank, Hugging Face the pair
  that comes first in the merge list; with ranks = token ids the two agree when ids grow in
  merge order, which we check. The pre-tokenizer becomes one tiktoken regex.
- a Llama-3 tokenizer.model, which is already tiktoken's format (base64 token, rank).
Chat templates are rendered by our own code for the two formats in use (ChatML, Llama-3); we
read the template only to recognise it and to find its default system prompt.
"""
import base64
import json
import re
import unicodedata
from pathlib import Path

import tiktoken

from checkpoint import UserError

# GPT-2's byte-level split; tokenizers' ByteLevel(use_regex=True) uses exactly this
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# the same after Digits(individual_digits=True) has cut every digit out: a digit is a piece of its
# own, and a run of spaces before a digit ends its piece whole (the digit starts the next piece)
GPT2_DIGITS_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bytes_of_unicode() -> dict[str, int]:
    """GPT-2's map from the printable stand-in characters in a byte-level vocabulary to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Tokenizer:
    def __init__(self, enc: tiktoken.Encoding, bos_id: int | None, eos_ids: set[int], chat_template: str | None,
                 normalize: str | None = None, n_real: int | None = None):
        self.enc, self.bos_id, self.eos_ids = enc, bos_id, eos_ids
        # no template written down: recognise the format by its special tokens
        specials = " ".join(enc.special_tokens_set)
        self.chat_template = chat_template or ("<|start_header_id|>" if "<|start_header_id|>" in specials
                                               else "<|im_start|>" if "<|im_start|>" in specials else "")
        self.normalize = normalize
        self.n_real = n_real  # ids from here on stand for bytes the vocabulary lacks: dropped, as HF does

    def encode(self, text: str, bos: bool = False) -> list[int]:
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        # special tokens written in the text count as special tokens, as in Hugging Face tokenizers
        ids = self.enc.encode(text, allowed_special="all")
        if self.n_real is not None:
            ids = [i for i in ids if i < self.n_real]
        return [self.bos_id] + ids if bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        t = self.chat_template
        if "<|im_start|>" in t:  # ChatML (SmolLM2, Qwen2)
            default = re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", t, re.S)
            if default and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": default.group(1)}, *messages]
            out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if "<|start_header_id|>" in t:  # Llama-3
            out = "<|begin_of_text|>" + "".join(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages)
            return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
        raise UserError("--chat: this checkpoint has no chat template we know (ChatML or Llama-3)")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.apply_chat_template(messages))


def load_tokenizer(folder: str | Path) -> Tokenizer:
    folder = Path(folder)
    config = _json(folder / "tokenizer_config.json")
    model_config = {**_json(folder / "config.json"), **_json(folder / "generation_config.json")}
    if (folder / "tokenizer.json").is_file():
        enc, normalize, n_real = _from_tokenizer_json(folder / "tokenizer.json")
    elif (folder / "tokenizer.model").is_file():
        enc, normalize, n_real = _from_tiktoken_model(folder / "tokenizer.model", config), None, None
    else:
        raise UserError(f"{folder}: no tokenizer.json or tokenizer.model")
    ids = model_config.get("eos_token_id")
    eos = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    specials = enc._special_tokens
    name = config.get("eos_token")
    name = name.get("content") if isinstance(name, dict) else name
    eos |= {specials[t] for t in (name, "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>") if t in specials}
    bos = model_config.get("bos_token_id")
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return Tokenizer(enc, bos, eos, template if isinstance(template, str) else None, normalize, n_real)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _from_tokenizer_json(path: Path):
    spec = json.loads(path.read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{path}: tokenizer model {model.get('type')!r} is not supported (byte-level BPE only)")
    pattern = _pattern(spec.get("pre_tokenizer"), path)
    norm = spec.get("normalizer")
    normalize = None
    if norm is not None:
        if norm.get("type") not in ("NFC", "NFKC"):
            raise UserError(f"{path}: normalizer {norm.get('type')!r} is not supported")
        normalize = norm["type"]
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    to_byte = _bytes_of_unicode()
    ranks = {}
    for token, i in model["vocab"].items():
        if token in special:
            continue
        try:
            ranks[bytes(to_byte[c] for c in token)] = i
        except KeyError:
            raise UserError(f"{path}: token {token!r} is not byte-level BPE") from None
    merged = [model["vocab"][a + b] for a, b in (m.split(" ") if isinstance(m, str) else m for m in model["merges"])]
    if any(x >= y for x, y in zip(merged, merged[1:])):
        raise UserError(f"{path}: token ids do not grow in merge order, so tiktoken ranks cannot be the ids")
    # tiktoken needs every byte as a token; a byte the vocabulary lacks (ASCII control codes) gets an
    # id past the vocabulary, which encode() drops: Hugging Face's BPE drops it too
    n_real = max([*ranks.values(), *special.values()]) + 1
    missing = sorted({bytes([b]) for b in range(256)} - set(ranks))
    ranks.update({b: n_real + k for k, b in enumerate(missing)})
    enc = tiktoken.Encoding(name=path.parent.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    return enc, normalize, n_real if missing else None


def _pattern(pre: dict | None, path: Path) -> str:
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s["type"] for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return GPT2_DIGITS_PATTERN
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and "Regex" in steps[0]["pattern"]:
        return steps[0]["pattern"]["Regex"]
    raise UserError(f"{path}: pre-tokenizer {' + '.join(kinds) or 'none'} is not supported")


def _from_tiktoken_model(path: Path, config: dict) -> tiktoken.Encoding:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    added = config.get("added_tokens_decoder", {})
    special = {t["content"]: int(i) for i, t in added.items() if t.get("special")}
    if not special:  # Llama-3's layout: 256 reserved special tokens after the base vocabulary
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        names += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(names) + 2)]
        special = {name: len(ranks) + i for i, name in enumerate(names)}
    return tiktoken.Encoding(name=path.parent.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special)
