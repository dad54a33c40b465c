"""A checkpoint's tokenizer, from its own files, giving the ids Hugging Face gives (no downloads).

    from tokenizer import load_tokenizer
    tok = load_tokenizer("assets/SmolLM2-135M-Instruct")
    ids = tok.encode("Hello world"); text = tok.decode(ids)
    prompt = tok.encode("Hello", add_special_tokens=True)   # with the BOS / EOS its template adds
    chat = tok.encode_chat([{"role": "user", "content": "Hi"}])

    python -m pytest -q test_tokenizer.py -s   # against transformers and its converters

One Tokenizer interface, one engine per file format:

- a tokenizer.json (every family: byte-level BPE as in GPT-2, SmolLM, Qwen2, Llama-3;
  SentencePiece-style BPE as in Llama-2, Mistral, TinyLlama) is run by Hugging Face `tokenizers`,
  the library transformers runs on the same file, so its ids are transformers' by construction.
  tiktoken encodes byte-level text several times faster, but nowhere a user waits for it (a
  second or two on the embedded texts, and loading is slower: docs/tokenizers.md, with the
  command that measures it), so it is not worth an engine of our own that must copy every rule.
- a tokenizer.model in tiktoken's format (Llama-3's original release: a base64 token and its rank
  per line, the rank being the id) is run by tiktoken, what the format was written for, with
  Llama-3's split regex as transformers' TikTokenConverter uses it. tiktoken also cuts the special
  tokens out of the text: Meta's 256 after the base vocabulary when tokenizer_config.json lists
  none, else the special ones of its added_tokens_decoder.

Special tokens around a sequence (`add_special_tokens=True`) follow transformers 5: with a
tokenizer.json, the file's post-processor (TemplateProcessing, e.g. Llama-3's BOS; none: nothing
added), since transformers then drops tokenizer_config.json's `add_bos_token` / `add_eos_token`;
with only a tokenizer.model, those two flags. generate.py adds them to a plain prompt, as
transformers' tokenizer(prompt) does; perplexity (evaluate.py, convert.py, bench.py,
finetune.py) encodes without them, its documented protocol.

Chat formats are rendered by our own code, no jinja: ChatML (SmolLM2, Qwen2) and Llama-3. The
template is read only to recognise the format, its default system prompt and its date line.
"""
import base64
import re
import time
from pathlib import Path

from cli import UserError, read_json

# Llama-3's split (tiktoken's pat_str in Meta's release; transformers' TikTokenConverter default)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class HFTokenizers:
    """A tokenizer.json run by Hugging Face `tokenizers`. added: each added token's text -> id.

    Raises UserError (one line) when the library is not installed or cannot read the file."""

    name = "tokenizers"

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise UserError(f"{path}: reading a tokenizer.json needs Hugging Face tokenizers: "
                            f"pip install tokenizers") from None
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exceptions for malformed files
            spec = _json(path)  # the plainer reasons first: not JSON, not an object, no model
            if not isinstance(spec.get("model"), dict):
                raise UserError(f"{path}: not a tokenizer.json (no model)") from None
            raise UserError(f"{path}: Hugging Face tokenizers cannot read it ({str(e).splitlines()[0]})") from None
        self.hf.no_truncation()  # transformers turns both off unless a call asks for them
        self.hf.no_padding()
        self.added = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items()}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)


class TiktokenModel:
    """A tiktoken-format tokenizer.model run by tiktoken, its special tokens included.

    enc: the tiktoken Encoding (token bytes -> rank, the rank being the id; special tokens beside
    them); ranks: the ids of the file's tokens; added: special token -> id; template: (ids before,
    ids after) a sequence, for add_special_tokens."""

    name = "tiktoken"

    def __init__(self, enc, ranks: set[int], special: dict[str, int], template: tuple[list[int], list[int]]):
        self.enc, self.added, self.template = enc, special, template
        self.special = set(special.values())
        self.known = ranks | self.special

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.enc.encode(text, allowed_special="all")  # a special token written in the text is one
        return [*self.template[0], *ids, *self.template[1]] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        # ids past the tokenizer (embedding rows padded to a round number) decode to nothing where
        # tiktoken would raise; bytes that are not UTF-8 become U+FFFD (tiktoken's errors="replace")
        skip = self.special if skip_special_tokens else ()
        return self.enc.decode([i for i in ids if i in self.known and i not in skip])


class Tokenizer:
    """encode / decode / encode_chat over one engine; bos_id, eos_ids (the ids that end generation).
    Streaming: decode the growing list of ids and hold back a trailing "\ufffd" (half a character)."""

    def __init__(self, engine: "HFTokenizers | TiktokenModel", bos_id: int | None, eos_ids: set[int],
                 chat_template: str, bos_token: str = ""):
        self.engine = engine
        self.bos_id, self.eos_ids, self.chat_template, self.bos_token = bos_id, eos_ids, chat_template, bos_token

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it count as special tokens (as in Hugging
        Face). add_special_tokens: add what the post-processor adds around a sequence (a BOS...).
        Raises UserError for text that is not valid Unicode (a lone surrogate, from bytes that were
        not UTF-8 on a command line)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError("the text is not valid UTF-8 (it holds a lone surrogate)") from None
        return self.engine.encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.engine.decode(ids, skip_special_tokens)

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
        # the template writes its own BOS: transformers tokenizes its text without special tokens
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


def load_tokenizer(ckpt_dir: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder, from tokenizer.json or a tiktoken-format tokenizer.model.

    Raises UserError (one line) for a missing folder or file, a file that is not valid, or an
    engine the file needs (tokenizers for a tokenizer.json, tiktoken for a tokenizer.model) that is
    not installed."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    config, model_config = _json(folder / "tokenizer_config.json"), _json(folder / "config.json")
    config = _json(folder / "special_tokens_map.json") | config  # where older folders name BOS / EOS
    eos_token, bos_token = (_token_name(config.get(k)) for k in ("eos_token", "bos_token"))
    if (folder / "tokenizer.json").is_file():
        engine = HFTokenizers(folder / "tokenizer.json")
    elif (folder / "tokenizer.model").is_file():
        engine = _from_tiktoken_model(folder / "tokenizer.model", config)
    else:
        raise UserError(f"{folder}: no tokenizer.json or tokenizer.model")
    ids = engine.added

    eos = set()
    for name, source in (("config.json", model_config), ("generation_config.json",
                                                         _json(folder / "generation_config.json"))):
        e = source.get("eos_token_id")
        e = e if isinstance(e, list) else [] if e is None else [e]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in e):
            raise UserError(f"{folder / name}: eos_token_id must be a token id or a list of them")
        eos |= set(e)
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
    if bos_id is not None and (not isinstance(bos_id, int) or isinstance(bos_id, bool)):
        raise UserError(f"{folder / 'config.json'}: bos_token_id must be a token id")
    return Tokenizer(engine, bos_id, eos, template, bos_token or "")


def _token_name(entry) -> str | None:
    entry = entry.get("content") if isinstance(entry, dict) else entry  # {"content": ...} in older files
    return entry if isinstance(entry, str) else None


def _json(path: Path) -> dict:
    """A JSON object from `path` ({} when there is no such file); UserError in one line otherwise."""
    out = read_json(path) if path.is_file() else {}
    if not isinstance(out, dict):
        raise UserError(f"{path}: not a JSON object")
    return out


def _flag_template(config: dict, ids: dict[str, int], path: Path) -> tuple[list[int], list[int]]:
    """Without a tokenizer.json, transformers adds BOS / EOS as tokenizer_config.json's add_bos_token
    / add_eos_token say (with one, it drops both flags and keeps the file's post-processor)."""
    out = []
    for flag, key in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
        name = _token_name(config.get(key))
        if config.get(flag) and name is not None:
            if name not in ids:
                raise UserError(f"{path}: tokenizer_config.json's {flag} adds {name!r}, which is not a token")
            out.append([ids[name]])
        else:
            out.append([])
    return out[0], out[1]


def _from_tiktoken_model(path: Path, config: dict) -> TiktokenModel:
    """A tiktoken-format tokenizer.model and its folder's tokenizer_config.json as one engine."""
    try:
        import tiktoken
    except ImportError:
        raise UserError(f"{path}: reading a tiktoken-format tokenizer.model needs tiktoken: "
                        f"pip install tiktoken") from None
    ranks = _tiktoken_ranks(path)
    special = _special_tokens(path, config, ranks)
    enc = tiktoken.Encoding(name=path.parent.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens=special)
    return TiktokenModel(enc, set(ranks.values()), special, _flag_template(config, special, path))


def _tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """token bytes -> rank (the id) from a tiktoken-format file; UserError if it is not one."""
    # tiktoken.load.load_tiktoken_bpe reads this format too, but caches files by their path string
    # in the temp folder, so a tokenizer.model replaced at the same path would read stale
    try:
        lines = [line.split() for line in path.read_bytes().splitlines() if line]
        ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in lines}
    except ValueError:  # binascii.Error is one too
        ranks = {}
    if not ranks:
        raise UserError(f"{path}: not a tiktoken (Llama-3) tokenizer.model; a SentencePiece one needs its "
                        f"tokenizer.json (transformers' save_pretrained writes it)")
    if len(set(ranks.values())) < len(ranks) or not all(0 <= r < 1 << 31 for r in ranks.values()):
        raise UserError(f"{path}: ranks repeat or are out of range (a damaged tokenizer.model)")
    if not all(bytes([b]) in ranks for b in range(256)):
        raise UserError(f"{path}: lacks some of the 256 single bytes (a damaged tokenizer.model)")
    return ranks


def _special_tokens(path: Path, config: dict, ranks: dict[bytes, int]) -> dict[str, int]:
    """The special tokens of a tokenizer.model folder, text -> id: tokenizer_config.json's
    added_tokens_decoder's special ones, else Meta's layout. UserError where tiktoken would not
    give Hugging Face's ids (an id the file already uses, one token the start of another)."""
    added = config.get("added_tokens_decoder", {})
    try:
        special = {t["content"]: int(i) for i, t in added.items() if t.get("special")}
        assert all(isinstance(c, str) for c in special)
    except (AttributeError, KeyError, TypeError, ValueError, AssertionError):
        raise UserError(f"{path.parent / 'tokenizer_config.json'}: added_tokens_decoder is not "
                        f"{{id: {{\"content\": ..., \"special\": ...}}}}") from None
    if not special:  # Meta's layout: 256 special tokens after the base vocabulary; these ids are
        # the same in Llama-3.0 to 3.2 (the reserved names in between differ, and matter little)
        named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
                 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>"}
        reserved = (f"<|reserved_special_token_{k}|>" for k in range(256))
        special = {named.get(k) or next(reserved): len(ranks) + k for k in range(256)}
    used = set(ranks.values())
    for token, i in special.items():
        if i in used:
            raise UserError(f"{path}: special token {token!r} has the id {i} of one of the file's own tokens")
    # Hugging Face cuts the longest special token at a position, tiktoken the first its regex tries:
    # they differ only where one token starts another, which sorted order puts side by side
    names = sorted(special)
    for a, b in zip(names, names[1:]):
        if b.startswith(a):
            raise UserError(f"{path.parent / 'tokenizer_config.json'}: special token {a!r} is the start of {b!r}, "
                            f"which tiktoken does not cut as Hugging Face does (give the folder a tokenizer.json)")
    return special
