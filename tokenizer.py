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

Chats are rendered from the checkpoint's own Jinja chat template (chat_template.jinja, else
tokenizer_config.json's chat_template) by jinja2 as transformers renders it: the same sandbox,
whitespace rules, helpers (tojson, raise_exception, strftime_now) and variables (messages,
add_generation_prompt, the named special tokens, tools=None), and the text is encoded without
special tokens added around it, as transformers' apply_chat_template(tokenize=True) encodes it. A
template is the checkpoint's code, so its defaults (Qwen2.5's system turn, a reasoning block opened
in the generation prompt) come out as written. Only Meta's original Llama-3 release (a bare
tokenizer.model) has no template: its format comes from its tokens (Llama-3's, or ChatML's),
written below in Jinja too.
"""
import base64
import functools
import json
from datetime import datetime
from pathlib import Path

from cli import UserError, read_json

# Llama-3's split (tiktoken's pat_str in Meta's release; transformers' TikTokenConverter default)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# the chat formats of a tiktoken-format tokenizer.model folder without a template, by its tokens:
# Llama-3-Instruct's turns (a BOS where the folder names one), and ChatML's
LLAMA3_CHAT = ("{{- bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
               "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHATML_CHAT = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# what transformers hands a template by these names, where tokenizer_config.json names the token
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


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
    Streaming: decode the growing list of ids and hold back a trailing "\ufffd" (half a character).

    chat_template: the checkpoint's Jinja template ("" when it has none); template_where: the file
    it is written in, for error messages (without one, the line that says so); special_tokens: name
    -> text of the named special tokens (bos_token, eos_token...) the template may write."""

    def __init__(self, engine: "HFTokenizers | TiktokenModel", bos_id: int | None, eos_ids: set[int],
                 chat_template: str, template_where: str, special_tokens: dict[str, str]):
        self.engine = engine
        self.bos_id, self.eos_ids = bos_id, eos_ids
        self.chat_template, self.template_where, self.special_tokens = chat_template, template_where, special_tokens

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

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as the checkpoint's template writes it (transformers' apply_chat_template
        with tokenize=False). kwargs reach the template as variables (enable_thinking=False...).
        UserError (one line) without a template, or where the template fails."""
        if not self.chat_template:
            raise UserError(self.template_where)
        # transformers drops the keys whose value is None (an API's content=None), which templates
        # handle as missing and would otherwise print as "None"
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        return render_chat_template(self.chat_template, self.template_where, messages=messages,
                                    add_generation_prompt=add_generation_prompt, **variables)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # the template writes its own BOS where it wants one: transformers encodes the text without
        # special tokens added around it (one BOS, not two)
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))


class _TemplateRaised(Exception):
    """What a template's raise_exception(message) raises: the template refused its input."""


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: plain json.dumps (jinja's own escapes <, >, & and ' for HTML)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise _TemplateRaised(message)


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    """A chat template compiled in the environment transformers renders templates in: jinja's
    sandbox (a template is code from the checkpoint), a block tag taking the indent before it and
    the newline after it, {% break %} / {% continue %}, and its helpers."""
    import jinja2.ext
    import jinja2.sandbox

    class Generation(jinja2.ext.Extension):
        # {% generation %}...{% endgeneration %} marks the assistant's text for transformers' training
        # masks (return_assistant_tokens_mask); rendered, it is its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama-3.2's today's date
    return env.from_string(template)


def render_chat_template(template: str, where: str, **variables) -> str:
    """`template` rendered with `variables` as transformers renders a chat template. Raises UserError
    (one line) naming `where` (the template's file) and jinja's message when it does not render:
    a syntax error or unknown filter, raise_exception, an error inside."""
    import jinja2
    try:
        return _compile_template(template).render(**variables)
    except _TemplateRaised as e:
        raise UserError(f"{where}: the chat template refused the conversation: {e}") from None
    except jinja2.TemplateSyntaxError as e:  # an unknown filter or test is one too
        raise UserError(f"{where}: the chat template does not compile, line {e.lineno}: {e.message}") from None
    except Exception as e:  # whatever the template's code raises (undefined names, str + int...) is its own
        message = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{where}: the chat template failed ({type(e).__name__}: {message})") from None


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
    template, where = _chat_template(folder, config, engine)
    # the end of a chat turn ends generation too, where the chat format has one
    ends = [eos_token] + [t for t in ("<|im_end|>", "<|eot_id|>", "<|eom_id|>") if t in template]
    eos |= {ids[t] for t in ends if t in ids}

    bos_id = model_config.get("bos_token_id", ids.get(bos_token))
    if bos_id is not None and (not isinstance(bos_id, int) or isinstance(bos_id, bool)):
        raise UserError(f"{folder / 'config.json'}: bos_token_id must be a token id")
    special_tokens = {k: name for k in SPECIAL_TOKEN_NAMES if (name := _token_name(config.get(k))) is not None}
    return Tokenizer(engine, bos_id, eos, template, where, special_tokens)


def _chat_template(folder: Path, config: dict, engine: "HFTokenizers | TiktokenModel") -> tuple[str, str]:
    """(the folder's chat template, the file it is written in), as transformers picks it:
    chat_template.jinja first, then tokenizer_config.json's chat_template, from a list of named
    templates the one named "default". Without one, ("", the line that refuses a chat)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8"), str(folder / "chat_template.jinja")
    template, where = config.get("chat_template"), f"{folder / 'tokenizer_config.json'} (its chat_template)"
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", template)
        where = f"{folder / 'tokenizer_config.json'} (its chat_template 'default')" if "default" in named else where
    if isinstance(template, str) and template:
        return template, where
    if template is not None:
        return "", f"{where}: not a template (a string, or a list of named ones, one named 'default')"
    if isinstance(engine, TiktokenModel):  # Meta's original Llama-3 release writes none: its format by its tokens
        for token, builtin, name in (("<|start_header_id|>", LLAMA3_CHAT, "Llama-3"), ("<|im_start|>", CHATML_CHAT, "ChatML")):
            if token in engine.added:
                return builtin, f"{folder} (no chat template; {name}'s format, by its tokens)"
    return "", f"{folder}: no chat template (chat_template.jinja, or tokenizer_config.json's chat_template)"


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
