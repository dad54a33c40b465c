"""Our tokenizers give Hugging Face's ids, token for token, on every kind the supported families ship.

    pytest test_tokenizer.py -s        # -s shows the counts

A tokenizer.json runs in Hugging Face `tokenizers` itself, so what is ours there is the wrapper
(special tokens, decode flags, the BOS / EOS and end-of-turn ids), the chat templates' rendering
(jinja2, set up as transformers sets it up) and the generation around it; the oracle is transformers. A tiktoken-format tokenizer.model (Llama-3's
release) runs in tiktoken with special tokens of our choosing: the oracle is transformers'
TikTokenConverter and AutoTokenizer. Kinds: the embedded SmolLM2 (byte-level); SentencePiece-style
BPE in both forms (Llama-2 / Mistral v0.1 normalizer, Mistral v0.3 Metaspace) with byte fallback
and a BOS template; byte-level with overlapping added tokens and with flagged ones; Llama-3's
tokenizer.model. Chat templates as checkpoints write them: Qwen2.5-Instruct's (its default system
turn), a reasoning model's, transformers' helpers, and the one-line errors of one that does not
render. Then generate.py's prompt and greedy tokens against transformers, and a Mistral with a
SentencePiece tokenizer converted end to end.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent

# digits after spaces, whitespace runs, tabs, CRLF, no-break and ideographic spaces, non-ASCII
# digits (Arabic-Indic, superscript, fraction, Roman numeral), emoji with joiners, combining
# marks, control codes the vocabulary lacks, contractions, special tokens written in the text
TRICKY = ("Hello  world 123 4567,  x  1\n\n  22 \t3 ünïcödé 😀 👩‍👩‍👧 \x04ctrl's don't I'LL  \n 9.5% 1,000 "
          "«quote» 中文字符 ٣٤ x² ½ Ⅻ e\u0301 a\u00a0 1\u3000 2\r\n\r\n3   \n\n\t\t7 <|im_start|>user <|endoftext|>")


# what a tokenizer gets wrong first: characters outside the vocabulary (byte fallback), spaces
# leading, trailing and repeated, newlines and tabs, digits, special-token text inside ordinary text
ADVERSARIAL = ["", " ", "  ", "x", " x", "   leading", "trailing   ", "a  b   c    d", "\n", "\n\nx\n\n ",
               "\t\tTab\tbed\t", "line\r\nbreak\r", "1234567890 3.14159 1,000,000 007 ٣٤ x² ½",
               "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀👩‍👩‍👧 中文字符 Ⅻ e\u0301 \u00e9 ﬁ", "\x00\x04\x7f\u200b",
               "!\x04! ..\x06.. ==\x14== a\x1db", "▁ metaspace ▁▁x▁",
               "<s>", "</s>", "x<s>y", " <s> ", "a</s>b<s>", "<unk>", "<0x41>", "<|endoftext|>x",
               "<|user|>\nHi<|end|>\n<|assistant|>", " <mask> ", "a<mask>b", "word <mask>", " <|user|> x ",
               "<|begin_of_text|><|begin_of_text|>", "def f(x):\n    return [\n        x,\n            x]\n",
               "col1" + " " * 16 + "col2" + " " * 23 + "col3", "e\u0301x éx \u00e9<y> <y>", TRICKY]


def _differ(a: list[int], b: list[int]) -> int:
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


def _byte_level_ranks(path: Path) -> dict[bytes, int]:
    """The tiktoken ranks of a byte-level tokenizer.json, as a tiktoken-format tokenizer.model of the
    same vocabulary holds them: the 256 bytes first, then each merge's result in merge order, the
    tokens' characters read back to bytes through GPT-2's byte-to-unicode table."""
    # GPT-2 shows the printable bytes as themselves, the other 68 as chr(256), chr(257), ... in order
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in shown]
    to_byte = {chr(b): b for b in shown} | {chr(256 + k): b for k, b in enumerate(hidden)}
    merges = json.loads(path.read_text())["model"]["merges"]
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    ranks = {}
    for token in [bytes([b]) for b in range(256)] + [bytes(to_byte[c] for c in a + b) for a, b in pairs]:
        ranks.setdefault(token, len(ranks))
    return ranks


def test_decode_encode_round_trip():
    from fetch import EVAL_TEXT, ensure_default_model, ensure_texts
    from tokenizer import load_tokenizer
    tok = load_tokenizer(ensure_default_model())
    ensure_texts()
    # \x04 is not in SmolLM2's vocabulary: both tokenizers drop it, so it cannot come back
    for text in (EVAL_TEXT.read_text(), TRICKY.replace("\x04", "")):
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("Grüße 😀")  # streaming: a prefix of the ids may end inside a character
    partial = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    print("growing decodes:", partial)
    assert partial[-1] == "Grüße 😀" and all(p.rstrip("\ufffd") == "Grüße 😀"[:len(p.rstrip("\ufffd"))]
                                             for p in partial)
    assert tok.bos_id == 1 and tok.eos_ids == {2}  # <|im_start|>; <|im_end|> (config and chat turns)


def test_chat_template_matches_transformers():
    from transformers import AutoTokenizer
    from fetch import ensure_default_model
    from tokenizer import load_tokenizer
    folder = ensure_default_model()
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for messages in ([{"role": "user", "content": "What is 2 + 2?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                     [{"role": "user", "content": "Hi  \n"}, {"role": "assistant", "content": "Hello! 😀"},
                      {"role": "user", "content": "Name 3 colours."}]):
        for gen in (True, False):
            text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            ids = theirs.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False)
            mine = ours.apply_chat_template(messages, add_generation_prompt=gen)
            print(f"chat, {len(messages)} messages, generation prompt {gen}: {len(ids)} tokens, "
                  f"{_differ(ours.encode_chat(messages, gen), ids)} differ from transformers")
            assert mine == text and ours.encode_chat(messages, gen) == ids


# a Llama-3-style chat template written for this test (the dated system turn of Llama-3.1 and
# later, without tools), rendered by transformers' jinja as the oracle for our own renderer
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" + "Today Date: " + date_string + "\n\n" }}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"""
LLAMA30_TEMPLATE = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
                    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
                    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_llama3_chat_format_and_tokenizer_model(tmp_path):
    """A Llama-3-style folder: tokenizer.model in tiktoken's format (here SmolLM2's byte-level ranks,
    standing in for Meta's file), no added tokens listed, so the 256 specials come after the base
    vocabulary as in Meta's layout; the chat renders as transformers renders the template."""
    import base64
    from transformers import AutoTokenizer
    from fetch import ensure_default_model
    from tokenizer import load_tokenizer
    folder = ensure_default_model()
    ranks = _byte_level_ranks(folder / "tokenizer.json")
    (tmp_path / "tokenizer.model").write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    n = max(ranks.values()) + 1
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "What is 2 + 2?\n"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}]
    for template in (LLAMA30_TEMPLATE, LLAMA31_TEMPLATE):
        shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")  # only for transformers
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
             "eos_token": "<|eot_id|>", "chat_template": template}))
        for msgs in (messages, messages[1:]):
            theirs = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(msgs, tokenize=False,
                                                                                add_generation_prompt=True)
            (tmp_path / "tokenizer.json").unlink()  # so that ours reads tokenizer.model
            tok = load_tokenizer(tmp_path)
            shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
            assert tok.apply_chat_template(msgs) == theirs, (tok.apply_chat_template(msgs), theirs)
        ids = tok.encode_chat(messages)
        print(f"Llama-3 chat ({'3.1' if 'Cutting' in template else '3.0'} template): {len(ids)} tokens, "
              f"{sum(i >= n for i in ids)} of them special, base vocabulary {n}")
        assert ids[0] == n and ids.count(n + 6) == 5 and ids.count(n + 9) == 4  # begin, start_header, eot
        assert tok.eos_ids == {n + 9} and tok.decode(ids) == tok.apply_chat_template(messages)
        assert n + 9 in tok.encode("4<|eot_id|>")


def test_llama3_style_tokenizer_model(tmp_path):
    """A tiktoken-format tokenizer.model (Llama-3's) loads and encodes as transformers' own
    converter of that format does. The vocabulary is SmolLM2's, renumbered from 0."""
    import base64
    import random
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from fetch import EVAL_TEXT, ensure_default_model, ensure_texts
    from tokenizer import LLAMA3_PATTERN, load_tokenizer
    ranks = _byte_level_ranks(ensure_default_model() / "tokenizer.json")  # token bytes -> rank
    ensure_texts()
    order = sorted(ranks, key=ranks.get)
    (tmp_path / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in enumerate(order)))
    ours = load_tokenizer(tmp_path)
    theirs = TikTokenConverter(vocab_file=str(tmp_path / "tokenizer.model"), pattern=LLAMA3_PATTERN).converted()
    text = EVAL_TEXT.read_text()
    a, b = ours.encode(text), theirs.encode(text, add_special_tokens=False).ids
    print(f"tokenizer.model: {len(a)} tokens, {_differ(a, b)} differ")
    assert a == b and ours.decode(a) == text
    # with Meta's 256 special tokens handed to the converter in id order: tiktoken cuts them out of
    # a text as Hugging Face does, and decodes ids (special, past the vocabulary, half a character) alike
    names = sorted(ours.engine.added, key=ours.engine.added.get)
    theirs = TikTokenConverter(vocab_file=str(tmp_path / "tokenizer.model"), pattern=LLAMA3_PATTERN,
                               extra_special_tokens=names).converted()
    chat = "<|begin_of_text|>x<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\nHi<|reserved_special_token_3|>"
    n = d = 0
    for t in [*ADVERSARIAL, chat]:
        c, e = ours.encode(t), theirs.encode(t, add_special_tokens=False).ids
        n, d = n + len(e), d + _differ(c, e)
    rng, size = random.Random(0), theirs.get_vocab_size()
    samples = [[rng.randrange(size + 3) for _ in range(rng.randint(1, 8))] for _ in range(2000)]
    n_random = sum(ours.decode(ids, skip) != theirs.decode(ids, skip_special_tokens=skip)
                   for ids in samples for skip in (False, True))
    print(f"with special tokens: {n} tokens, {d} differ; {2 * len(samples)} decodes of random ids, {n_random} differ")
    assert d == 0 and n_random == 0
    first = ours.decode(ours.encode_chat([{"role": "user", "content": "hi"}])[:1])  # one special token
    assert first in ("<|begin_of_text|>", "<|start_header_id|>")


def _train_bpe(tmp_path, texts: list[str], pre_tokenizer):
    """A small byte-level BPE trained with Hugging Face tokenizers, saved as tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizer, decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    return hf


# ----------------------------------------------------------------------------- chat templates as checkpoints write them

# Qwen2.5-Instruct's chat_template, as its tokenizer_config.json holds it: its literals use Jinja's
# "\n" escape (a backslash and an n), and without a system message it writes its own system turn
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# a reasoning model's template, written for this test in the manner of QwQ and Qwen3: earlier
# answers lose their reasoning, the generation prompt opens a reasoning block (an empty one when
# the caller passes enable_thinking=False), and a role it does not know is refused
REASONING_TEMPLATE = r"""{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Conversation roles must be system, user or assistant, not ' + message.role) }}
    {%- endif %}
    {%- set content = message.content %}
    {%- if message.role == 'assistant' and '</think>' in content %}
        {%- set content = content.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}
"""


def _qwen_style_folder(folder: Path, template, where: str = "tokenizer_config.json") -> Path:
    """A Qwen2-style tokenizer folder: byte-level BPE over the 256 byte symbols alone (no merges, so
    a prompt's length is its bytes, plain to count), Qwen's three special tokens and the two
    reasoning markers as ordinary added tokens. The template goes where `where` says: in
    tokenizer_config.json, as the "default" of a list of named templates, or in chat_template.jinja."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    hf = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    hf.add_tokens([AddedToken(t, normalized=False) for t in ("<think>", "</think>")])
    folder.mkdir(exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
              "tokenizer_class": "Qwen2Tokenizer"}
    if where == "named list":
        config["chat_template"] = [{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
                                   {"name": "default", "template": template}]
    elif where == "chat_template.jinja":
        (folder / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _chat_both_ways(folder: Path, messages: list[dict], **kwargs) -> tuple[list[int], list[int], str, str]:
    """(our ids, transformers' ids, our text, transformers' text) of a chat with its generation prompt."""
    from transformers import AutoTokenizer
    from tokenizer import load_tokenizer
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    want = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, **kwargs)
    text = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    return ours.encode_chat(messages, **kwargs), list(want), ours.apply_chat_template(messages, **kwargs), text


@pytest.mark.parametrize("where", ["tokenizer_config.json", "named list", "chat_template.jinja"])
def test_qwen25_template_keeps_its_default_system_turn(tmp_path, where):
    """Qwen2.5-Instruct's template without a system message writes "You are Qwen, created by
    Alibaba Cloud..." itself; with one, it writes that instead. Both as transformers renders them."""
    folder = _qwen_style_folder(tmp_path / "qwen", QWEN25_TEMPLATE, where)
    user = [{"role": "user", "content": "Name three rivers."}]
    for messages in (user, [{"role": "system", "content": "Answer in French."}, *user]):
        ours, theirs, text, want = _chat_both_ways(folder, messages)
        print(f"Qwen2.5 template ({where}), {len(messages)} messages: ours {len(ours)} tokens, "
              f"transformers {len(theirs)}, {_differ(ours, theirs)} differ")
        assert ours == theirs and text == want
        assert ("You are Qwen, created by Alibaba Cloud." in text) == (len(messages) == 1)


def test_reasoning_template_opens_its_block(tmp_path):
    """A template whose generation prompt opens a reasoning block ("<think>\\n"), and one the caller
    closes with enable_thinking=False (a keyword passed through to the template), as transformers."""
    from tokenizer import load_tokenizer
    folder = _qwen_style_folder(tmp_path / "reasoning", REASONING_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
                {"role": "user", "content": "And 3 + 3?"}]
    think = load_tokenizer(folder).engine.added["<think>"]  # an added token: one id
    for kwargs in ({}, {"enable_thinking": False}):
        ours, theirs, text, want = _chat_both_ways(folder, messages, **kwargs)
        print(f"reasoning template {kwargs}: ours {len(ours)} tokens, transformers {len(theirs)}, "
              f"{_differ(ours, theirs)} differ; ends {text[-24:]!r}")
        assert ours == theirs and text == want and "Add them." not in text
        assert text.endswith("<think>\n" if not kwargs else "<think>\n\n</think>\n\n") and ours.count(think) == 1


def test_chat_template_helpers_and_bos_as_transformers(tmp_path):
    """The helpers transformers gives a template (tojson without HTML escapes and with an indent,
    strftime_now, {% break %}, {% generation %}) and a template that writes bos_token itself on a
    tokenizer whose post-processor adds one too: one BOS, as transformers encodes the chat."""
    from fetch import ensure_texts
    ensure_texts()
    _sentencepiece_bpe(tmp_path, "normalizer")  # its post-processor: "<s> $A"
    template = ("{{ bos_token }}Today: {{ strftime_now('%d %b %Y') }}\n{% for m in messages %}"
                "{% if loop.index > 2 %}{% break %}{% endif %}{{ m | tojson }}\n{{ m | tojson(indent=2) }}\n"
                "{% endfor %}{% if add_generation_prompt %}{% generation %}assistant:{% endgeneration %}{% endif %}")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    messages = [{"role": "user", "content": "Grüße <b>&</b> 😀", "name": None}, {"role": "assistant", "content": "x"},
                {"role": "user", "content": "never written"}]
    ours, theirs, text, want = _chat_both_ways(tmp_path, messages)
    print(f"helpers and BOS: ours {len(ours)} tokens, transformers {len(theirs)}, {_differ(ours, theirs)} differ, "
          f"BOS {ours.count(1)} time(s)")
    assert ours == theirs and text == want and ours.count(1) == 1 and "never" not in text and "Grüße <b>" in text


def _chat_refused(folder: Path, messages: list[dict], match: str) -> str:
    """encode_chat's one-line UserError for `folder`, which must match `match`."""
    from cli import UserError
    from tokenizer import load_tokenizer
    tok = load_tokenizer(folder)  # a template that cannot render still loads: only a chat needs it
    with pytest.raises(UserError, match=match) as e:
        tok.encode_chat(messages)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_chat_template_user_errors(tmp_path):
    """One line each, naming the template's file and jinja's message: raise_exception for a role
    the template refuses (transformers raises the same message), a syntax error, an unknown filter,
    an error inside the template's own code, a chat_template that is not one, none at all."""
    import jinja2
    from transformers import AutoTokenizer
    folder = _qwen_style_folder(tmp_path / "reasoning", REASONING_TEMPLATE)
    wrong = [{"role": "narrator", "content": "Once upon a time"}]
    with pytest.raises(jinja2.TemplateError, match="not narrator"):
        AutoTokenizer.from_pretrained(folder).apply_chat_template(wrong, tokenize=False)
    errors = [_chat_refused(folder, wrong, r"tokenizer_config.json \(its chat_template\): the chat template "
                                           r"refused the conversation: Conversation roles must be .* not narrator")]
    user = [{"role": "user", "content": "Hi"}]
    for template, match in (("{% for m in messages %}{{ m.content }}\n{% if %}", "does not compile, line 2"),
                            ("{{ messages | shout }}", "does not compile, line 1: No filter named 'shout'"),
                            ("{{ messages[0].content + 1 }}", r"failed \(TypeError: "),
                            ("{{ messages[5].content.upper() }}", r"failed \(UndefinedError: "),
                            ("{{ ''.__class__.__mro__ }}", r"failed \(SecurityError: "),
                            (["not", "named"], "not a template")):
        _qwen_style_folder(folder, template)
        errors.append(_chat_refused(folder, user, match))
    (folder / "tokenizer_config.json").write_text("{}")
    errors.append(_chat_refused(folder, user, r"no chat template \(chat_template.jinja, or tokenizer_config.json's"))
    print("\n".join(errors))


# ----------------------------------------------------------------------------- every kind the families ship

def _sentencepiece_bpe(folder: Path, form: str):
    """Llama-2 / Mistral-style BPE trained on our texts: <unk> <s> </s>, then <0x00>..<0xFF> (plain
    vocabulary, as Llama ships them), byte_fallback, a rare-character-poor alphabet so that byte
    fallback happens, the Replace / ByteFallback / Fuse / Strip decoder and a "<s> $A" template.
    form "normalizer": Prepend("▁") + Replace(" ", "▁") and no pre-tokenizer (Llama-2, Mistral
    v0.1); "metaspace": a Metaspace pre-tokenizer that prepends to the first piece only (v0.3)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from fetch import CALIB_TEXT
    specials = ["<unk>", "<s>", "</s>"]
    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)  # train by word
    hf.train_from_iterator(CALIB_TEXT.read_text().splitlines(), trainers.BpeTrainer(
        vocab_size=1500, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)], limit_alphabet=60,
        show_progress=False))
    if form == "normalizer":
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        hf.pre_tokenizer = None
    else:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    spec = json.loads(hf.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer" if form == "metaspace" else "PreTrainedTokenizerFast",
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def _byte_level_with_added(folder: Path, flags: bool):
    """A byte-level BPE trained on our texts (Llama-3's split, NFC as Qwen2) plus added tokens.
    flags False: tokens that overlap (runs of 2 to 24 spaces, as code models add them; "<|im_start|>"
    inside "<|im_start|>user"), normalized and not, and a "<|begin_of_text|> $A <|end_of_text|>"
    template after ByteLevel. flags True: Phi-3's chat markers (rstrip), RoBERTa's <mask> (lstrip),
    a single_word token, and "normalized" ones."""
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers, processors
    from fetch import CALIB_TEXT
    from tokenizer import LLAMA3_PATTERN
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf = _train_bpe(folder, CALIB_TEXT.read_text().splitlines(), pre)
    hf.normalizer = normalizers.NFC()
    if not flags:
        hf.add_tokens([AddedToken(" " * n, normalized=n % 2 == 0) for n in range(24, 1, -1)])
        hf.add_tokens([AddedToken("e\u0301x", normalized=True), AddedToken("\u00e9<y>", normalized=False),
                       AddedToken("<y>", normalized=True)])
        hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in
                               ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_start|>user")])
        ids = [hf.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>")]
        hf.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
            single="<|begin_of_text|> $A <|end_of_text|>", special_tokens=[("<|begin_of_text|>", ids[0]),
                                                                          ("<|end_of_text|>", ids[1])])])
    else:
        hf.add_special_tokens([AddedToken(t, rstrip=True, normalized=False, special=True)
                               for t in ("<|user|>", "<|assistant|>", "<|end|>")])
        hf.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False, special=True)])
        hf.add_tokens([AddedToken("word", single_word=True, normalized=False), AddedToken("  x", normalized=True),
                       AddedToken("col", lstrip=True, rstrip=True, normalized=True)])
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


KINDS = {"sentencepiece, normalizer form": lambda f: _sentencepiece_bpe(f, "normalizer"),
         "sentencepiece, metaspace form": lambda f: _sentencepiece_bpe(f, "metaspace"),
         "byte-level, overlapping added tokens": lambda f: _byte_level_with_added(f, False),
         "byte-level, added tokens with flags": lambda f: _byte_level_with_added(f, True)}


@pytest.mark.parametrize("kind", ["embedded SmolLM2", *KINDS])
def test_every_tokenizer_json_is_read_by_tokenizers(tmp_path, kind):
    """Every tokenizer.json kind goes to the tokenizers engine (the library transformers runs on the
    file), whatever its pre-tokenizer, normalizer, decoder or added tokens; only a tiktoken-format
    tokenizer.model goes to tiktoken (test_llama3_style_tokenizer_model)."""
    from fetch import ensure_default_model, ensure_texts
    from tokenizer import load_tokenizer
    ensure_texts()
    folder = ensure_default_model() if kind == "embedded SmolLM2" else tmp_path
    if folder == tmp_path:
        KINDS[kind](tmp_path)
    tok = load_tokenizer(folder)
    print(f"{kind}: {tok.engine.name}")
    assert tok.engine.name == "tokenizers"


@pytest.mark.parametrize("case", ["bos and eos flags", "bos flag off", "no post-processor, bos flag",
                                  "tokenizer.model, bos and eos flags", "tokenizer.model, no flags"])
def test_special_tokens_added_as_transformers(tmp_path, case):
    """What add_special_tokens adds, against AutoTokenizer: with a tokenizer.json its post-processor
    (transformers 5 drops tokenizer_config.json's add_bos_token / add_eos_token then), nothing if it
    has none; with only a tiktoken tokenizer.model, BOS / EOS as those flags say."""
    import base64
    from transformers import AutoTokenizer
    from fetch import ensure_default_model
    from tokenizer import load_tokenizer
    flags = {"add_bos_token": "bos flag" in case or "bos and" in case, "add_eos_token": "eos" in case}
    if "flag off" in case:
        flags = {"add_bos_token": False}
    if case.startswith("tokenizer.model"):
        ranks = _byte_level_ranks(ensure_default_model() / "tokenizer.json")
        (tmp_path / "tokenizer.model").write_text(
            "".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in ranks.items()))
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **(flags if "no flags" not in case else {})}))
    else:
        _sentencepiece_bpe(tmp_path, "normalizer")
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
        if "no post-processor" in case:
            spec = json.loads((tmp_path / "tokenizer.json").read_text())
            (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": None}))
    ours, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in ("Hello world", " x <s> y", ""):
        a, b = ours.encode(text, add_special_tokens=True), theirs(text).input_ids
        print(f"{case}: {text!r} -> ours {a}, transformers {b}")
        assert a == b


def _tiny_causal_lm(folder: Path, cls_name: str, vocab: int, **extra):
    """A tiny random transformers model whose output head can only pick tokens that are one ASCII
    letter (so greedy text is clean and says which tokens came), saved beside its tokenizer."""
    import transformers as tf
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    cfg = getattr(tf, f"{cls_name}Config")(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=96, vocab_size=vocab,
                                           max_position_embeddings=512, **extra)
    torch.manual_seed(0)
    model = getattr(tf, f"{cls_name}ForCausalLM")(cfg).eval()
    letters = [i for t, i in hf.get_vocab().items() if len(t) == 1 and t.isascii() and t.isalpha() and i < vocab]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[letters] = True
        model.lm_head.weight[~keep] = 0
        model.lm_head.weight[keep] *= 5
    model.save_pretrained(folder)
    return model


def _greedy_both_ways(folder: Path, prompt: str, model=None):
    """(our prompt ids, transformers' prompt ids, generate.py's text, transformers' text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tokenizer import load_tokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = model or AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    want = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    res = subprocess.run([sys.executable, "generate.py", "--ckpt", str(folder), "--prompt", prompt, "--temperature",
                          "0", "--max-new-tokens", "12"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    ours = load_tokenizer(folder).encode(prompt, add_special_tokens=True)  # what generate.py feeds the model
    return ours, enc["input_ids"][0].tolist(), res.stdout.strip(), want


@pytest.mark.parametrize("kind", ["sentencepiece, normalizer form", "byte-level, overlapping added tokens"])
def test_generate_prompt_and_greedy_match_transformers(tmp_path, kind):
    """generate.py on a tiny Llama whose tokenizer has a BOS template: the prompt is
    AutoTokenizer(prompt).input_ids and the greedy continuation is transformers'."""
    from fetch import ensure_texts
    ensure_texts()
    KINDS[kind](tmp_path)
    from tokenizers import Tokenizer as HFTokenizer
    vocab = HFTokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size()
    _tiny_causal_lm(tmp_path, "Llama", vocab)
    ours, theirs, got, want = _greedy_both_ways(tmp_path, "The capital of  France is")
    bos = HFTokenizer.from_file(str(tmp_path / "tokenizer.json")).token_to_id(
        "<s>" if "sentencepiece" in kind else "<|begin_of_text|>")
    print(f"{kind}: prompt ours {ours}, transformers {theirs}; greedy ours {got!r}, transformers {want!r}")
    assert ours == theirs and ours[0] == bos and got == want and len(got) == 12


def test_mistral_with_sentencepiece_tokenizer_converts_end_to_end(tmp_path):
    """A tiny Mistral with Mistral's own tokenizer kind (Metaspace, byte fallback, LlamaTokenizer
    class) converts through our tokenizer (calibration), and the converted folder generates the
    same greedy text in generate.py and in stock transformers (DeepseekV3ForCausalLM)."""
    from fetch import CALIB_TEXT, ensure_texts
    from tokenizers import Tokenizer as HFTokenizer
    ensure_texts()
    src, out = tmp_path / "mistral", tmp_path / "mistral-mla"
    src.mkdir()
    _sentencepiece_bpe(src, "metaspace")
    vocab = HFTokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size()
    _tiny_causal_lm(src, "Mistral", vocab, head_dim=16, sliding_window=None)
    res = subprocess.run([sys.executable, "convert.py", "--ckpt", str(src), "--out", str(out), "--calib-text",
                          str(CALIB_TEXT), "--calib-tokens", "2048", "--calib-len", "64", "--eval-text", "none",
                          "--rope-dim", "8", "--kv-lora-rank", "16"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v3"
    ours, theirs, got, want = _greedy_both_ways(out, "The capital of France is")
    print(f"converted Mistral: prompt ours {ours}, transformers {theirs}; greedy ours {got!r}, transformers {want!r}")
    assert ours == theirs and got == want and len(got) == 12


def test_generate_prints_what_transformers_decodes(tmp_path):
    """A model that only ever emits the byte token <0xE4> (the first third of a CJK character):
    each step alone is half a character, held back while the stream grows, and what is left when
    --max-new-tokens runs out is printed as transformers' decode of the same ids prints it."""
    from transformers import AutoTokenizer
    from fetch import ensure_texts
    from tokenizers import Tokenizer as HFTokenizer
    ensure_texts()
    _sentencepiece_bpe(tmp_path, "normalizer")
    vocab = HFTokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size()
    model = _tiny_causal_lm(tmp_path, "Llama", vocab)
    byte = AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids("<0xE4>")
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias = None
        model.lm_head.weight[byte] = 1.0
        model.model.norm.weight.fill_(1.0)
    model.save_pretrained(tmp_path)
    res = subprocess.run([sys.executable, "generate.py", "--ckpt", str(tmp_path), "--prompt", "Hi", "--temperature",
                          "0", "--max-new-tokens", "3"], cwd=ROOT, capture_output=True, text=True)
    want = AutoTokenizer.from_pretrained(tmp_path).decode([byte] * 3)
    print(f"3 x <0xE4>: generate.py printed {res.stdout!r}, transformers decodes {want!r}")
    assert res.returncode == 0 and res.stdout == want + "\n"


def test_generate_user_errors(tmp_path):
    """One line each, before the weights are read where the prompt alone decides: a prompt that is
    not UTF-8, --chat where the checkpoint has no chat template or one with a syntax error, a prompt
    token the model has no embedding for."""
    from fetch import ensure_texts
    ensure_texts()
    _sentencepiece_bpe(tmp_path, "normalizer")
    _tiny_causal_lm(tmp_path, "Llama", 259)  # embeddings for <unk> <s> </s> and the 256 byte tokens only

    def one_line(*argv, needle):
        res = subprocess.run([sys.executable, b"generate.py", b"--ckpt", str(tmp_path).encode(), *argv,
                              b"--temperature", b"0"], cwd=ROOT, capture_output=True, text=True)
        lines = res.stderr.strip().splitlines()
        print(lines[-1:])
        assert res.returncode == 1 and len(lines) == 1 and needle in lines[0], res.stderr[-2000:]

    one_line(b"--prompt", b"ab\xffcd", needle="not valid UTF-8")
    one_line(b"--prompt", b"Hi", needle="is past the model's vocab_size 259")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # damaged: only a check that reads it would notice
    one_line(b"--prompt", b"Hi", b"--chat", needle="no chat template (chat_template.jinja, or tokenizer_config")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}")  # no endfor
    one_line(b"--prompt", b"Hi", b"--chat", needle="chat_template.jinja: the chat template does not compile, line 1")


# ----------------------------------------------------------------------------- what cannot be read

def _refused(folder: Path, match: str) -> str:
    """load_tokenizer's one-line UserError for `folder`, which must match `match`."""
    from cli import UserError
    from tokenizer import load_tokenizer
    with pytest.raises(UserError, match=match) as e:
        load_tokenizer(folder)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_tokenizer_user_errors(tmp_path, monkeypatch):
    """One line each: no folder, no tokenizer file, invalid JSON, a file tokenizers cannot read, a
    tokenizer.json without tokenizers installed, a bad eos_token_id, a SentencePiece
    tokenizer.model without its tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    from tokenizer import load_tokenizer
    errors = [_refused(tmp_path / "absent", "no such folder")]
    hf = HFTokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    load_tokenizer(tmp_path)  # a valid file
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [[2]]}))
    errors.append(_refused(tmp_path, "eos_token_id must be a token id"))
    (tmp_path / "config.json").unlink()
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if it were not installed
    errors.append(_refused(tmp_path, "reading a tokenizer.json needs Hugging Face tokenizers: pip install tokenizers"))
    monkeypatch.delitem(sys.modules, "tokenizers")
    for bad, match in (('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a", "b"]]}, '
                        '"pre_tokenizer": {"type": "Whitespace"}}', "tokenizers cannot read it"),
                       ("{", "not valid JSON"), ("[]", "not a JSON object"), ('{"model": []}', "not a tokenizer.json")):
        (tmp_path / "tokenizer.json").write_text(bad)
        errors.append(_refused(tmp_path, match))
    for bad in ('"merges": 3}', '"merges": [["a"]]}', '"merges": []}, "added_tokens": [{"content": "x"}]'):
        (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"a": 0}, %s, '
                                                 '"pre_tokenizer": {"type": "ByteLevel"}, "decoder": {"type": '
                                                 '"ByteLevel"}}' % bad)  # byte-level, but malformed
        errors.append(_refused(tmp_path, "tokenizers cannot read it"))
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x11\x0a\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # SentencePiece
    errors.append(_refused(tmp_path, "not a tiktoken .* needs its tokenizer.json"))
    (tmp_path / "tokenizer.model").unlink()
    errors.append(_refused(tmp_path, "no tokenizer.json or tokenizer.model"))
    print("\n".join(errors))


def test_tiktoken_model_user_errors(tmp_path, monkeypatch):
    """One line each for a tiktoken-format tokenizer.model: bytes missing, ranks repeated, tiktoken
    not installed, an add_bos_token whose BOS is no token, a malformed added_tokens_decoder, and
    special tokens tiktoken would cut otherwise than Hugging Face (one the start of another, an id
    of the file's own tokens)."""
    import base64
    from tokenizer import load_tokenizer
    errors = []
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]  # tiktoken's format
    for bad, match in ((lines[1:], "lacks some of the 256 single bytes"), (lines + ["YWI= 7"], "ranks repeat")):
        (tmp_path / "tokenizer.model").write_text("\n".join(bad))
        errors.append(_refused(tmp_path, match))
    (tmp_path / "tokenizer.model").write_text("\n".join(lines))
    load_tokenizer(tmp_path)  # a valid file
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    errors.append(_refused(tmp_path, "reading a tiktoken-format tokenizer.model needs tiktoken: pip install tiktoken"))
    monkeypatch.delitem(sys.modules, "tiktoken")
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"add_bos_token": True, "bos_token": "<BOS>"}))
    errors.append(_refused(tmp_path, "add_bos_token adds '<BOS>', which is not a token"))
    config.write_text(json.dumps({"added_tokens_decoder": {"x": {"content": "<s>", "special": True}}}))
    errors.append(_refused(tmp_path, "added_tokens_decoder is not"))
    for decoder, match in (({"300": "<|im_start|>", "301": "<|im_start|>user"}, "is the start of '<|im_start|>user'"),
                           ({"65": "<s>"}, "special token '<s>' has the id 65 of one of the file's own tokens")):
        config.write_text(json.dumps({"added_tokens_decoder": {i: {"content": t, "special": True}
                                                               for i, t in decoder.items()}}))
        errors.append(_refused(tmp_path, match))
    print("\n".join(errors))
