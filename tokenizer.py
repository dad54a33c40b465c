"""A checkpoint's tokenizer, from its own files, giving the ids Hugging Face gives (no downloads).

    from tokenizer import load_tokenizer
    tok = load_tokenizer("assets/SmolLM2-135M-Instruct")
    ids = tok.encode("Hello world"); text = tok.decode(ids)
    prompt = tok.encode("Hello", add_special_tokens=True)   # with the BOS / EOS its template adds
    chat = tok.encode_chat([{"role": "user", "content": "Hi"}])

    python -m pytest -q test_tokenizer.py -s   # equals Hugging Face tokenizers token for token

The oracle is Hugging Face `tokenizers` reading the same tokenizer.json (the library transformers
runs). One Tokenizer interface, two engines, chosen by what the file contains:

- tiktoken, for byte-level BPE (GPT-2, SmolLM, Qwen2, Llama-3; Llama-3's tiktoken tokenizer.model
  too). tiktoken merges any adjacent pair whose result is a token, lowest rank first, and takes a
  piece that is a token whole; Hugging Face merges only listed pairs, first listed first. So the
  tiktoken ranks are positions in the merge list (a table turns ranks into the model's ids), and
  `_out_of_order` checks that the two rules agree on the file: they do when the merges were
  learned in order, as BPE training makes them, or list every split of a token (files converted
  from tiktoken); merges appended later send the file to tokenizers. Added tokens are cut out
  here, as Hugging Face's added vocabulary cuts them: first those with `normalized: false` from
  the raw text, then the normalizer (NFC / NFKC) runs on what is left and the `normalized: true`
  ones are cut from that; at each position the longest wins (regex alternation, longest first).
  Each piece in between goes to tiktoken, except a piece holding a byte the vocabulary lacks
  (SmolLM2 lacks 21 control bytes): Hugging Face drops it before merging, so that piece goes
  through tokenizers' own pre-tokenizer and BPE.
- Hugging Face `tokenizers`, for everything tiktoken cannot run exactly: SentencePiece-style
  BPE (Llama-2, Mistral, Mixtral, TinyLlama: a Prepend / Replace normalizer or a Metaspace
  pre-tokenizer, `byte_fallback` to the <0x00>..<0xFF> tokens, a ByteFallback / Fuse / Strip
  decoder), added tokens with `lstrip` / `rstrip` / `single_word` (Phi-3's chat markers,
  `<mask>`), added token ids the library would number otherwise, other pre-tokenizers,
  normalizers, post-processors, decoders and models. `_tiktoken_obstacle` names the feature that
  sends a file there; the library is needed only for those files.

Special tokens around a sequence (`add_special_tokens=True`) follow transformers 5: the
tokenizer.json's post-processor (TemplateProcessing, e.g. Llama-3's BOS; none: nothing added).
tokenizer_config.json's `add_bos_token` / `add_eos_token` count only without a tokenizer.json
(transformers drops them when there is one). generate.py adds them to a plain prompt, as
transformers' tokenizer(prompt) does; perplexity (evaluate.py, convert.py, bench.py,
finetune.py) encodes without them, its documented protocol. transformers' named tokenizer
classes (LlamaTokenizer, ...) rebuild the pipeline from the vocabulary and merges rather than
reading the file's; we read the file, as `tokenizers` does.

Chat formats are rendered by our own code, no jinja: ChatML (SmolLM2, Qwen2) and Llama-3. The
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


TO_BYTE = _unicode_to_byte()


class AddedTokens:
    """Hugging Face's added vocabulary: cut added tokens out of a text, longest first at each position.

    tokens: (content, id, normalized, special) per added token; normalize: None, "NFC" or "NFKC"."""

    def __init__(self, tokens: list[tuple[str, int, bool, bool]], normalize: str | None = None):
        self.normalize = normalize
        self.raw = {c: i for c, i, normalized, _ in tokens if c and not normalized}
        # a normalized token is matched in normalized text, so its own content is normalized too
        self.norm = {self._normalized(c): i for c, i, normalized, _ in tokens if c and normalized}
        self.ids = {c: i for c, i, _, _ in tokens}
        self.special = {i for _, i, _, special in tokens if special}
        self._raw_re, self._norm_re = self._alternation(self.raw), self._alternation(self.norm)

    def _normalized(self, text: str) -> str:
        return unicodedata.normalize(self.normalize, text) if self.normalize else text

    @staticmethod
    def _alternation(tokens: dict[str, int]) -> re.Pattern | None:
        # re takes the first alternative that matches at the leftmost position: longest first
        return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))) if tokens else None

    @staticmethod
    def _cut(text: str, pattern: re.Pattern | None, ids: dict[str, int]):
        """Yields (piece, None) for text between matches and (match, id) for each match."""
        start = 0
        for m in pattern.finditer(text) if pattern else ():
            if m.start() > start:
                yield text[start:m.start()], None
            yield m.group(), ids[m.group()]
            start = m.end()
        if start < len(text):
            yield text[start:], None

    def split(self, text: str):
        """Yields (normalized piece, None) for ordinary text and (token, id) for each added token."""
        for piece, i in self._cut(text, self._raw_re, self.raw):
            if i is not None:
                yield piece, i
            else:
                yield from self._cut(self._normalized(piece), self._norm_re, self.norm)


class TiktokenBPE:
    """Byte-level BPE run by tiktoken (see the module docstring for why it is exact).

    enc: an Encoding without special tokens; to_id[rank]: the model's id (None: a byte the vocabulary
    lacks, dropped as Hugging Face drops it); token_bytes[id]: what each id decodes to;
    template: (ids before, ids after) the sequence, for add_special_tokens."""

    name = "tiktoken"

    def __init__(self, enc: tiktoken.Encoding, to_id: list[int | None], token_bytes: dict[int, bytes],
                 added: AddedTokens, template: tuple[list[int], list[int]], path: Path | None = None):
        self.enc, self.to_id, self.token_bytes, self.added, self.template = enc, to_id, token_bytes, added, template
        # bytes the vocabulary lacks: Hugging Face drops them before merging, so their neighbours
        # merge across them, which tiktoken cannot do; a piece holding one goes to tokenizers
        missing = bytes(b for r, b in zip(to_id, range(256)) if r is None)
        self.missing = re.compile(b"[" + re.escape(missing) + b"]") if missing else None
        self.path, self._hf = path, None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for piece, i in self.added.split(text):
            if i is not None:
                ids.append(i)
            elif self.missing and self.missing.search(piece.encode()):
                ids += self._hf_piece(piece)
            else:
                ids += [t for t in map(self.to_id.__getitem__, self.enc.encode_ordinary(piece)) if t is not None]
        return [*self.template[0], *ids, *self.template[1]] if add_special_tokens else ids

    def _hf_piece(self, piece: str) -> list[int]:
        """Hugging Face's pre-tokenizer and BPE on one normalized piece between added tokens."""
        if self._hf is None:
            self._hf = HFTokenizers(self.path, "text with bytes the vocabulary lacks").hf
        words = self._hf.pre_tokenizer.pre_tokenize_str(piece)
        return [t.id for word, _ in words for t in self._hf.model.tokenize(word)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        # ids past the tokenizer (embedding rows padded to a round number) decode to nothing;
        # bytes that are not UTF-8 become U+FFFD, as in Rust's from_utf8_lossy
        skip = self.added.special if skip_special_tokens else ()
        return b"".join(self.token_bytes.get(i, b"") for i in ids if i not in skip).decode("utf-8", "replace")


class HFTokenizers:
    """A tokenizer.json run by Hugging Face `tokenizers` itself; `why` names what sent it here."""

    name = "tokenizers"

    def __init__(self, path: Path, why: str):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise UserError(f"{path}: {why}, which only Hugging Face tokenizers runs exactly: "
                            f"pip install tokenizers") from None
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exceptions for malformed files
            raise UserError(f"{path}: Hugging Face tokenizers cannot read it ({str(e).splitlines()[0]})") from None
        self.hf.no_truncation()  # transformers turns both off unless a call asks for them
        self.hf.no_padding()
        self.why = why
        added = self.hf.get_added_tokens_decoder()
        self.added = AddedTokens([(t.content, i, t.normalized, t.special) for i, t in added.items()])

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)


class Tokenizer:
    """encode / decode / encode_chat over one engine; bos_id, eos_ids (the ids that end generation).
    Streaming: decode the growing list of ids and hold back a trailing "\ufffd" (half a character)."""

    def __init__(self, engine: TiktokenBPE | HFTokenizers, bos_id: int | None, eos_ids: set[int],
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
    """The tokenizer of a checkpoint folder, from tokenizer.json or a Llama-3 tokenizer.model.

    Raises UserError (one line) for a missing folder or file, a file that is not valid, or a
    tokenizer.json that needs Hugging Face tokenizers when the library is not installed."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    config, model_config = _json(folder / "tokenizer_config.json"), _json(folder / "config.json")
    config = _json(folder / "special_tokens_map.json") | config  # where older folders name BOS / EOS
    eos_token, bos_token = (_token_name(config.get(k)) for k in ("eos_token", "bos_token"))
    if (folder / "tokenizer.json").is_file():
        path = folder / "tokenizer.json"
        spec = _json(path)
        if not isinstance(spec.get("model"), dict):
            raise UserError(f"{path}: not a tokenizer.json (no model)")
        try:
            why = _tiktoken_obstacle(spec)
            engine = None if why else _from_tokenizer_json(spec, path)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError):  # the library says what is wrong
            why, engine = "a layout our byte-level reader does not know", None
        engine = engine or HFTokenizers(path, why)
    elif (folder / "tokenizer.model").is_file():
        path = folder / "tokenizer.model"
        engine = _from_tiktoken_model(path, config)
    else:
        raise UserError(f"{folder}: no tokenizer.json or tokenizer.model")
    ids = engine.added.ids

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
    try:
        out = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
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


def _template(proc: dict | None) -> tuple[list[int], list[int]] | None:
    """The ids a post-processor puts before and after a single sequence; None for a kind we do not read."""
    kind = proc.get("type") if isinstance(proc, dict) else None
    if proc is None or kind == "ByteLevel":  # ByteLevel only trims offsets
        return [], []
    if kind == "Sequence":  # ByteLevel and one that adds tokens (Llama-3); two that add tokens
        # interact in ways of their own (the second sees the first's additions as a pair)
        steps = [p for p in proc.get("processors", []) if not (isinstance(p, dict) and p.get("type") == "ByteLevel")]
        return _template(steps[0]) if len(steps) == 1 else ([], []) if not steps else None
    if kind in ("BertProcessing", "RobertaProcessing"):
        return [proc["cls"][1]], [proc["sep"][1]]
    if kind == "TemplateProcessing":
        special, parts, seen = proc.get("special_tokens") or {}, ([], []), 0
        for item in proc.get("single", []):
            if "Sequence" in item:
                seen += 1
            elif "SpecialToken" in item:
                ids = special.get(item["SpecialToken"].get("id"), {}).get("ids")
                if not isinstance(ids, list):
                    return None
                parts[min(seen, 1)].extend(ids)
        return parts if seen == 1 else None
    return None


def _tiktoken_obstacle(spec: dict) -> str | None:
    """The first feature of a tokenizer.json that tiktoken cannot run exactly; None if there is none."""
    model = spec["model"]
    if model.get("type") != "BPE":
        return f"model {model.get('type')!r}"
    for key in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return key
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") not in ("NFC", "NFKC"):
        return f"normalizer {_describe(norm)}"
    if _pattern(spec.get("pre_tokenizer")) is None:
        return f"pre-tokenizer {_describe(spec.get('pre_tokenizer'))}"
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return f"decoder {_describe(spec.get('decoder'))}"
    post = spec.get("post_processor")
    if _template(post) is None:
        return f"post-processor {_describe(post)}"
    for t in spec.get("added_tokens") or []:
        flags = [f for f in ("lstrip", "rstrip", "single_word") if t.get(f)]
        if flags:
            return f"added token {t.get('content')!r} with {' and '.join(flags)}"
    vocab, added = model.get("vocab") or {}, _added(spec)
    if any(c not in TO_BYTE for s in vocab if s not in added for c in s):
        return "tokens that are not byte-level (SentencePiece-style BPE)"
    # tokenizers converted from tiktoken (Llama-3) list every split of a token as a merge, side by
    # side: still one rank per token. Merges of one token apart from each other are not.
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    made, last = set(), None
    for a, b in merges:
        if a + b in made and a + b != last:
            return f"merges that make {a + b!r} apart from each other"
        made.add(a + b)
        last = a + b
    if model.get("unk_token") is not None and any(chr_ not in vocab for chr_ in TO_BYTE):
        return "an unknown token for bytes the vocabulary lacks"
    if model.get("ignore_merges") and any(len(s) > 1 and s not in made for s in vocab if s not in added):
        return "ignore_merges with vocabulary tokens no merge makes"
    token = _out_of_order(merges, model.get("ignore_merges", False))
    if token is not None:
        return f"merges out of learning order (the merges alone do not make {token!r})"
    ids, expected = {}, {}
    for t in spec.get("added_tokens") or []:  # Hugging Face assigns the ids itself, as it reads them
        c = t["content"]
        if c not in ids:
            ids[c] = vocab[c] if c in vocab else max([len(vocab) - 1, *ids.values()]) + 1
        expected[c] = t["id"]
    if ids != expected:
        return "added token ids that Hugging Face assigns otherwise"
    return None


def _out_of_order(merges: list[tuple[str, str]], ignore_merges: bool) -> str | None:
    """A token that tiktoken's rule (merge any adjacent pair whose result has a rank; take a whole
    piece that is a token) would make where Hugging Face's (merge listed pairs, in list order)
    would not; None if there is none.

    Within a word, a token s is only ever built from the symbols Hugging Face's merges make of s
    alone (merges across s's ends never won, or s would not be there). So if those merges, run on
    s alone, end in two pieces, that unlisted pair can meet in a word and tiktoken would join it;
    if they end in anything but s, tiktoken's whole-piece lookup differs (unless ignore_merges,
    where Hugging Face looks the word up too). BPE training learns merges in an order where
    neither happens; merges appended later can break it."""
    rank = {}
    for i, pair in enumerate(merges):
        rank.setdefault(pair, i)
    for a, b in rank:
        parts = [*a, *b]
        while len(parts) > 1:  # Hugging Face's BPE on the token's own text
            pairs = [rank.get(pair, len(merges)) for pair in zip(parts, parts[1:])]
            best = pairs.index(min(pairs))
            if pairs[best] == len(merges):
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2 or len(parts) > 2 and not ignore_merges:
            return a + b
    return None


def _added(spec: dict) -> set[str]:
    return {t.get("content") for t in spec.get("added_tokens") or []}


def _describe(step: dict | None) -> str:
    return json.dumps({k: v for k, v in step.items() if k not in ("pattern", "precompiled_charsmap")}) if step \
        else "none"


def _from_tokenizer_json(spec: dict, path: Path) -> TiktokenBPE:
    model, added_spec = spec["model"], spec.get("added_tokens") or []
    norm = (spec.get("normalizer") or {}).get("type")
    added = AddedTokens([(t["content"], t["id"], t.get("normalized", False), t.get("special", False))
                         for t in added_spec], norm)
    vocab = model["vocab"]
    byte_char = {b: c for c, b in TO_BYTE.items()}
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    # ranks: all 256 bytes (tiktoken needs each), then merge results in merge order; with
    # ignore_merges (a whole word in the vocabulary is taken as is) every other token too
    ranks, to_id = {}, []
    results = [a + b for a, b in merges]
    others = [s for s in sorted(vocab, key=vocab.get) if s not in added.ids] if model.get("ignore_merges") else []
    for s in [byte_char[b] for b in range(256)] + results + others:
        key = bytes(TO_BYTE[c] for c in s)
        if key not in ranks:
            if len(key) > 1 and s not in vocab:
                raise UserError(f"{path}: merge result {s!r} is not in the vocabulary")
            ranks[key] = len(to_id)
            to_id.append(vocab.get(s))  # None: a byte the vocabulary lacks
    # what each id decodes to: Hugging Face's ByteLevel decoder maps a token through the byte table
    # when every character is in it (an added token too, in its normalized form if it is matched
    # as one), and keeps its UTF-8 otherwise
    token_bytes = {}
    for s, i in [*vocab.items(), *added.raw.items(), *added.norm.items()]:
        token_bytes[i] = bytes(TO_BYTE[c] for c in s) if all(c in TO_BYTE for c in s) else s.encode()
    post = spec.get("post_processor")
    template = _template(post)
    enc = tiktoken.Encoding(name=path.parent.name, pat_str=_pattern(spec.get("pre_tokenizer")),
                            mergeable_ranks=ranks, special_tokens={})
    try:  # a pattern that can match nothing panics in tiktoken's Rust (a BaseException)
        enc.encode_ordinary("a 1, \n\t b")
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError("tiktoken cannot run this pre-tokenizer") from None
    return TiktokenBPE(enc, to_id, token_bytes, added, template, path)


def _pattern(pre: dict | None) -> str | None:
    """The pre-tokenizer as one tiktoken regex; None if it is not one of the byte-level kinds."""
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
            # Llama-3, Qwen2. Hugging Face keeps the text between matches as pieces too; tiktoken
            # only encodes matches: the second branch takes each run no match starts in
            regex = split["pattern"]["Regex"]
            return f"(?:{regex})|(?:(?!(?:{regex}))[\\s\\S])+"
    return None


def _from_tiktoken_model(path: Path, config: dict) -> TiktokenBPE:
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
    enc = tiktoken.Encoding(name=path.parent.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    token_bytes = {r: t for t, r in ranks.items()} | {i: s.encode() for s, i in special.items()}
    added_tokens = AddedTokens([(s, i, False, True) for s, i in special.items()])
    return TiktokenBPE(enc, list(range(enc.n_vocab)), token_bytes, added_tokens,
                       _flag_template(config, special, path))
