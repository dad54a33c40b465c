"""A tiktoken tokenizer built from the checkpoint's own files (tiktoken cannot download here).

    from tokenizer import load_tokenizer
    tok = load_tokenizer("assets/SmolLM2-135M-Instruct")
    ids = tok.encode("Hello world"); text = tok.decode(ids)
    prompt = tok.encode_chat([{"role": "user", "content": "Hi"}])

    python -m pytest -q test_fetch_tokenizer.py -s   # equals Hugging Face tokenizers token for token

What is in here:
- Tokenizer: encode / decode / encode_chat, bos_id, eos_ids (the ids that end generation).
  Streaming: decode the growing list of ids and hold back a trailing "\ufffd" (half a character).
- load_tokenizer, from one of two sources:
  - tokenizer.json with a byte-level BPE model (GPT-2 style: SmolLM, Qwen2, Llama-3 exports).
    Its pre-tokenizer becomes one tiktoken regex. tiktoken merges the adjacent pair whose result
    has the lowest rank; Hugging Face merges the pair that comes first in the merge list. So the
    tiktoken ranks are positions in the merge list and a table turns ranks into the model's ids.
    (For SmolLM2 the ids already grow in merge order, 252 + position; the table is still needed
    for the 21 control bytes the vocabulary lacks, which Hugging Face drops and so do we.)
  - a Llama-3 tokenizer.model, which is tiktoken's own format (base64 token, rank = id).
- Chat formats rendered by our own code, no jinja: ChatML (SmolLM2, Qwen2) and Llama-3. The
  template is read only to recognise the format, its default system prompt and its date line.
"""
import base64
import json
import re
import time
import unicodedata
from pathlib import Path

import tiktoken

from cli import UserError

# GPT-2's byte-level split; tokenizers' ByteLevel(use_regex=True) uses exactly this
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# the same after Digits(individual_digits=True) has cut every digit out on its own: a digit is a
# piece, and a whitespace run before a digit is a whole piece ("  1" -> "  ", "1"; GPT-2 alone
# would give " ", " 1"), because the GPT-2 regex then sees the run at the end of its piece
GPT2_DIGITS_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's map from the printable stand-in characters of a byte-level vocabulary to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}


class Tokenizer:
    def __init__(self, enc: tiktoken.Encoding, to_id: list[int | None], bos_id: int | None, eos_ids: set[int],
                 chat_template: str, bos_token: str = "", normalize: str | None = None):
        self.enc, self.to_id = enc, to_id  # to_id[rank]: the model's id, None for a byte it lacks
        self.to_rank = {i: r for r, i in enumerate(to_id) if i is not None}
        self.bos_id, self.eos_ids, self.chat_template, self.bos_token = bos_id, eos_ids, chat_template, bos_token
        self.normalize = normalize

    def encode(self, text: str, bos: bool = False) -> list[int]:
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        # special tokens written in the text count as special tokens, as in Hugging Face tokenizers
        ids = [self.to_id[r] for r in self.enc.encode(text, allowed_special="all")]
        ids = [i for i in ids if i is not None]
        return [self.bos_id] + ids if bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        # ids past the tokenizer (embedding rows padded to a round number) decode to nothing
        return self.enc.decode([self.to_rank[i] for i in ids if i in self.to_rank])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        t = self.chat_template
        if "<|im_start|>" in t:  # ChatML (SmolLM2, Qwen2)
            # a default system prompt is a literal inside the template: no quotes or jinja in it
            default = re.search(r"<\|im_start\|>system\n([^'\"{}]*?)<\|im_end\|>", t)
            if default and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": default.group(1)}, *messages]
            out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if "<|start_header_id|>" in t:  # Llama-3
            out = self.bos_token
            if "Cutting Knowledge Date" in t:  # Llama-3.1 and later: always a system turn, dated
                system = messages[0]["content"].strip() if messages and messages[0]["role"] == "system" else ""
                messages = messages[1:] if messages and messages[0]["role"] == "system" else messages
                cutoff = re.search(r"Cutting Knowledge Date: (\w+ \d+)", t).group(1)
                date = re.search(r"date_string = \"([^\"]+)\"", t)
                # transformers hands templates strftime_now, which Llama-3.2 uses for today's date
                date = time.strftime("%d %b %Y") if "strftime_now" in t or not date else date.group(1)
                out += (f"<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: {cutoff}\n"
                        f"Today Date: {date}\n\n{system}<|eot_id|>")
            out += "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                           for m in messages)
            return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
        raise UserError("this checkpoint has no chat template we know (ChatML or Llama-3)")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


def load_tokenizer(ckpt_dir: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder, from tokenizer.json or a Llama-3 tokenizer.model."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    config, model_config = _json(folder / "tokenizer_config.json"), _json(folder / "config.json")
    if (folder / "tokenizer.json").is_file():
        enc, to_id, normalize = _from_tokenizer_json(folder / "tokenizer.json")
    elif (folder / "tokenizer.model").is_file():
        enc, normalize = _from_tiktoken_model(folder / "tokenizer.model", config), None
        to_id = list(range(enc.n_vocab))  # ranks are the ids
    else:
        raise UserError(f"{folder}: no tokenizer.json or tokenizer.model")
    ids = {t: to_id[enc.encode_single_token(t)] for t in enc.special_tokens_set}
    eos_token, bos_token = (_token_name(config.get(k)) for k in ("eos_token", "bos_token"))

    eos = set()
    for source in (model_config, _json(folder / "generation_config.json")):
        e = source.get("eos_token_id")
        eos |= set(e if isinstance(e, list) else [] if e is None else [e])
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    template = template if isinstance(template, str) else ""  # a list of named templates: not ours
    if not template:  # none written down (a bare Llama-3 tokenizer.model): recognise the format by its tokens
        template = next((t for t in ("<|start_header_id|>", "<|im_start|>") if t in ids), "")
    # the end of a chat turn ends generation too, where the chat format has one
    ends = [eos_token] + [t for t in ("<|im_end|>", "<|eot_id|>", "<|eom_id|>") if t in template]
    eos |= {ids[t] for t in ends if t in ids}

    bos_id = model_config.get("bos_token_id", ids.get(bos_token))
    return Tokenizer(enc, to_id, bos_id, eos, template, bos_token or "", normalize)


def _token_name(entry: str | dict | None) -> str | None:
    return entry.get("content") if isinstance(entry, dict) else entry  # {"content": ...} in older files


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _from_tokenizer_json(path: Path) -> tuple[tiktoken.Encoding, list[int | None], str | None]:
    spec = _json(path)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{path}: tokenizer model {model.get('type')!r} is not supported (byte-level BPE only)")
    pattern = _pattern(spec.get("pre_tokenizer"), path)
    norm = (spec.get("normalizer") or {}).get("type")
    if norm not in (None, "NFC", "NFKC"):
        raise UserError(f"{path}: normalizer {norm!r} is not supported (none, NFC or NFKC)")
    # Hugging Face cuts every added token out of the text before BPE; tiktoken's special tokens
    # (with allowed_special="all") do the same
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab, to_byte = model["vocab"], _unicode_to_byte()
    byte_char = {b: c for c, b in to_byte.items()}
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    # ranks: all 256 bytes (tiktoken needs each), then merge results in merge order, then any other
    # vocabulary token (never reached by a merge, so its rank hardly matters)
    ranks, to_id = {}, []
    for s in [byte_char[b] for b in range(256)] + [a + b for a, b in merges] + sorted(vocab, key=vocab.get):
        if s in added:
            continue
        if any(c not in to_byte for c in s):
            raise UserError(f"{path}: token {s!r} is not byte-level BPE (SentencePiece-style BPE is not supported)")
        key = bytes(to_byte[c] for c in s)
        if key not in ranks:
            if len(key) > 1 and s not in vocab:
                raise UserError(f"{path}: merge result {s!r} is not in the vocabulary")
            ranks[key] = len(to_id)
            to_id.append(vocab.get(s))  # None: a byte the vocabulary lacks
    special = {}
    for s, i in added.items():
        special[s] = len(to_id)
        to_id.append(i)
    enc = tiktoken.Encoding(name=path.parent.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    return enc, to_id, norm


def _pattern(pre: dict | None, path: Path) -> str:
    """The pre-tokenizer as one tiktoken regex."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s["type"] for s in steps]
    last = steps[-1] if steps else {}
    if kinds[-1:] == ["ByteLevel"] and not last.get("add_prefix_space", False):
        regex = last.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return GPT2_PATTERN
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and regex:
            return GPT2_DIGITS_PATTERN
        split = steps[0]
        if (kinds == ["Split", "ByteLevel"] and not regex and "Regex" in split["pattern"]
                and split.get("behavior") == "Isolated" and not split.get("invert")):
            return split["pattern"]["Regex"]  # Llama-3, Qwen2
    described = " + ".join(json.dumps({k: v for k, v in s.items() if k != "pattern"}) for s in steps) or "none"
    raise UserError(f"{path}: pre-tokenizer {described} is not supported")


def _from_tiktoken_model(path: Path, config: dict) -> tiktoken.Encoding:
    # tiktoken.load.load_tiktoken_bpe reads this format too, but caches files by their path string
    # in the temp folder, so a tokenizer.model replaced at the same path would read stale
    try:
        lines = [line.split() for line in path.read_bytes().splitlines() if line]
        ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in lines}
    except ValueError:  # binascii.Error is one too
        ranks = {}
    if not ranks:
        raise UserError(f"{path}: not a tiktoken (Llama-3) tokenizer.model; SentencePiece ones are not supported")
    added = config.get("added_tokens_decoder", {})
    special = {t["content"]: int(i) for i, t in added.items() if t.get("special")}
    if not special:  # Meta's layout: 256 special tokens after the base vocabulary; these ids are
        # the same in Llama-3.0 to 3.2 (the reserved names in between differ, and matter little)
        named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
                 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>"}
        reserved = (f"<|reserved_special_token_{k}|>" for k in range(256))
        special = {named.get(k) or next(reserved): len(ranks) + k for k in range(256)}
    return tiktoken.Encoding(name=path.parent.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special)
