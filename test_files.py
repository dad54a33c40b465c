"""The file boundary and the rules for failing, proven by breaking things on purpose.

    pytest test_files.py -s        # -s shows what each test tried and what it was told

- Malformed checkpoints (the index, safetensors headers, dtypes, config.json, files cut short at
  every tensor boundary and inside tensors) are refused with one line, before any tensor is read.
- FP8 weights with block scales are dequantized as transformers dequantizes them; other
  quantized checkpoints are refused.
- Every tensor is accounted for: each optional part of a source (attention and MLP biases, tied
  embeddings) converts into a folder transformers loads without a missing or unexpected tensor,
  or is refused in one line; the writer reads its folder back before it commits it.
- --out: a folder that could cost the user a file is refused before any work; an earlier output
  of ours is replaced in one step, and kill -9 at every step of the write leaves the old output
  or the new one, whole, with the source byte for byte unchanged.
- Under torchrun a rank that fails ends the job at once, with one line from that rank.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoint import CheckpointReader, SafetensorsFile, load_model
from cli import UserError
from writer import MARKER, CheckpointWriter, check_output, check_output_file
from conftest import VOCAB, _free_port, _one_clear_line, _rank_env, _script, assert_close


ROOT = Path(__file__).resolve().parent
WORDS = ("the a of river city council said on monday that new plans would bring more water to farms "
         "near town after rain fell for weeks and prices rose while people waited").split()


def _byte_tokenizer(folder: Path):
    """A byte-level BPE tokenizer.json with no merges: ids 0..255, one per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))


def _llama(folder: Path, **kw):
    """A tiny random Llama written by transformers (with a byte tokenizer): what users bring."""
    from transformers import LlamaConfig, LlamaForCausalLM
    sharded = kw.pop("sharded", False)
    cfg = LlamaConfig(**{**dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=96, vocab_size=256, max_position_embeddings=256,
                                rms_norm_eps=1e-5), **kw})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, **({"max_shard_size": "100KB"} if sharded else {}))
    _byte_tokenizer(folder)
    return model


def _calib(path: Path) -> Path:
    import random
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(40)) + "\n")
    return path


def _convert_argv(src: Path, out: Path, calib: Path, rank: int = 24) -> list[str]:
    return ["--ckpt", str(src), "--out", str(out), "--calib-text", str(calib), "--eval-text", "none",
            "--calib-len", "64", "--calib-tokens", "512", "--kv-lora-rank", str(rank), "--rope-dim", "8",
            "--freqfold", "2"]


def _digest(folder: Path) -> dict:
    """name -> sha256 of every file under folder: the folder's exact content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors(path: Path, header: dict, data: bytes):
    """A safetensors file from a header as given (any dtype, any offsets) and raw data bytes."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A single-file and a sharded tiny Llama, both as transformers writes them."""
    base = tmp_path_factory.mktemp("llama")
    _llama(base / "single")
    _llama(base / "sharded", sharded=True)
    assert (base / "sharded" / "model.safetensors.index.json").is_file()
    return base


# ----------------------------------------------------------------------------- reading: refused in one line

def _refused(folder: Path, needle: str):
    """load_model refuses the folder with a UserError of one line that holds needle, no tensor read."""
    reads = []
    get = SafetensorsFile.get
    SafetensorsFile.get = lambda self, *a, **k: reads.append(a) or get(self, *a, **k)
    try:
        with pytest.raises(UserError) as e:
            load_model(folder)
    finally:
        SafetensorsFile.get = get
    print(f"  refused: {e.value}")
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not reads, f"{len(reads)} tensors read before the refusal"


def _index_cases(folder: Path) -> list:
    index = folder / "model.safetensors.index.json"
    wm = json.loads(index.read_text())["weight_map"]
    shards = sorted(set(wm.values()))
    first, other = next(iter(wm)), next(k for k, v in wm.items() if v != wm[next(iter(wm))])

    def set_index(obj):
        return lambda: index.write_text(json.dumps(obj))

    return [
        ("a shard the index names is missing", lambda: (folder / shards[-1]).unlink(), shards[-1]),
        ("the index is not JSON", lambda: index.write_text('{"weight_map": {'), "not valid JSON"),
        ("the index is a JSON list", set_index([wm]), "no weight_map"),
        ("a weight_map value is not a file name", set_index({"weight_map": {**wm, first: 3}}), "no weight_map"),
        ("a tensor listed under a shard that does not hold it", set_index({"weight_map": {**wm, first: wm[other]}}),
         "which does not hold it"),
        ("a shard outside the folder", set_index({"weight_map": {**wm, first: "../x.safetensors"}}),
         "not a .safetensors file in this folder"),
    ]


def _header_cases(path: Path) -> list:
    header, data = _header(path)
    meta = header.pop("__metadata__", None)
    names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    a, b = names[1], names[2]

    def change(fn, tail=b""):
        def apply():
            h = json.loads(json.dumps(header))
            fn(h)
            _write_safetensors(path, {**({"__metadata__": meta} if meta else {}), **h}, data + tail)
        return apply

    def write_raw(raw: bytes):
        return lambda: path.write_bytes(raw)

    text = json.dumps(header).encode()
    return [
        ("the header is a JSON list", write_raw((8).to_bytes(8, "little") + b"[1, 2]  " + data), "not a JSON object"),
        ("the header is not JSON", write_raw(len(text).to_bytes(8, "little") + text[:-1] + b"!" + data),
         "not valid JSON"),
        ("the header is longer than the file", write_raw((1 << 40).to_bytes(8, "little") + text), "cut short"),
        ("the file is shorter than 8 bytes", write_raw(b"\x10\x00\x00"), "cut short"),
        ("a shape that disagrees with the offsets", change(lambda h: h[a].update(shape=[h[a]["shape"][0] + 1,
                                                                                         *h[a]["shape"][1:]])), "needs"),
        ("two tensors overlap", change(lambda h: h[b].update(data_offsets=[h[b]["data_offsets"][0] - 4,
                                                                            h[b]["data_offsets"][1] - 4])),
         "overlaps"),
        ("bytes after the last tensor", change(lambda h: None, tail=b"\0" * 8), "after the last tensor"),
        ("an unknown dtype", change(lambda h: h[a].update(dtype="F7")), "unknown dtype 'F7'"),
        ("an entry without data_offsets", change(lambda h: h[a].pop("data_offsets")), "not an object with"),
        ("a negative dimension", change(lambda h: h[a].update(shape=[-1])), "non-negative integers"),
        ("a weight stored as U32", change(lambda h: h[a].update(dtype="U32")), "stored as U32"),
        ("a weight stored as I32", change(lambda h: h[a].update(dtype="I32")), "stored as I32"),
        ("a weight stored as U16", change(lambda h: h[a].update(dtype="U16", shape=h[a]["shape"] + [2])),
         "stored as U16"),
        ("a weight stored as U64", change(lambda h: h[a].update(dtype="U64", shape=[*h[a]["shape"][:-1],
                                                                                  h[a]["shape"][-1] // 2])),
         "stored as U64"),
        ("a weight stored as F4", change(lambda h: h[a].update(dtype="F4", shape=[*h[a]["shape"], 8])),
         "stored as F4"),
        ("FP8 weights without a quantization_config", change(lambda h: h[a].update(dtype="F8_E4M3",
                                                                                  shape=[*h[a]["shape"], 4])),
         "FP8 without a quantization_config"),
        ("a dtype that is not a string", change(lambda h: h[a].update(dtype=["F32"])), "unknown dtype"),
        ("a shape of astronomical size", change(lambda h: h[a].update(shape=[10 ** 200, 10 ** 200])), "of F32 needs 4000"),
        ("an integer of 5000 digits", write_raw(len(big := b'{"x": ' + b"9" * 5000 + b"}").to_bytes(8, "little")
                                                + big + data), "not valid JSON"),
        ("nesting 100000 deep", write_raw(len(deep := b"[" * 100000 + b"]" * 100000).to_bytes(8, "little") + deep + data),
         "not valid JSON"),
    ]


def _config_cases(folder: Path) -> list:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())

    def set_config(obj):
        return lambda: path.write_text(json.dumps(obj))

    cases = [
        ("config.json is not JSON", lambda: path.write_text("{"), "not valid JSON"),
        ("config.json is a list", set_config([cfg]), "not a JSON object"),
        ("no hidden_size", set_config({k: v for k, v in cfg.items() if k != "hidden_size"}), "has no hidden_size"),
        ("hidden_size as a string", set_config({**cfg, "hidden_size": "64"}), "hidden_size is '64'"),
        ("heads not a multiple of KV heads", set_config({**cfg, "num_attention_heads": 5}), "not a multiple"),
        ("an unsupported rope type", set_config({**cfg, "rope_scaling": {"rope_type": "longrope"}}), "'longrope'"),
        ("a config that declares fewer layers", set_config({**cfg, "num_hidden_layers": 1}), "does not account for"),
        ("a config that declares more layers", set_config({**cfg, "num_hidden_layers": 3}), "is missing"),
        ("only a pickle checkpoint", lambda: (folder / "model.safetensors").rename(folder / "pytorch_model.bin"),
         "pickle checkpoint"),
    ]
    for what, change, needle in (
            ("linear RoPE scaling without a factor", {"rope_scaling": {"rope_type": "linear"}}, "has no rope_scaling factor"),
            ("llama3 RoPE scaling without its fields", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
             "has no rope_scaling low_freq_factor"),
            ("a RoPE factor of 0", {"rope_scaling": {"type": "linear", "factor": 0}}, "rope_scaling factor is 0"),
            ("a RoPE factor as a string", {"rope_scaling": {"type": "linear", "factor": "2"}}, "rope_scaling factor is '2'"),
            ("rope_theta as a string", {"rope_parameters": {"rope_theta": "1e4"}}, "rope_parameters rope_theta is '1e4'"),
            ("rope_theta infinite", {"rope_theta": float("inf"), "rope_parameters": None}, "rope_theta is inf"),
            ("rms_norm_eps infinite", {"rms_norm_eps": float("inf")}, "rms_norm_eps is inf"),
            ("an integer of 5000 digits", None, "not valid JSON")):
        if change is None:
            cases.append((what, lambda: path.write_text('{"hidden_size": ' + "9" * 5000 + "}"), needle))
        else:
            cases.append((what, set_config({**cfg, **change}), needle))
    for method in ("gptq", "awq", "bitsandbytes", "compressed-tensors", "fbgemm_fp8", "torchao"):
        cases.append((f"quantization_config {method}", set_config({**cfg, "quantization_config": {"quant_method": method}}),
                      f"quant_method {method!r}"))
    cases.append(("FP8 without a block size", set_config({**cfg, "quantization_config": {"quant_method": "fp8"}}),
                  "quant_method 'fp8'"))
    return cases


def test_malformed_checkpoints_refused_in_one_line(llama, tmp_path):
    """Each fault of a kind users meet (an index out of step with its shards, a header that is not
    what its file holds, a dtype we do not read, a config.json cut short or quantized) ends in a
    UserError of one line that names the fault, before any tensor is read."""
    kinds = [("sharded", _index_cases), ("single", lambda f: _header_cases(f / "model.safetensors")),
             ("single", _config_cases)]
    n = 0
    for source, cases_of in kinds:
        for k in range(len(cases_of(_fresh(llama / source, tmp_path / "probe")))):
            folder = _fresh(llama / source, tmp_path / f"case{n}")
            what, apply, needle = cases_of(folder)[k]
            print(f"{what}:")
            apply()
            _refused(folder, needle)
            n += 1
    print(f"{n} malformed checkpoints, each refused in one line")
    # and as a user meets it: one line on stderr, exit 1, no traceback
    folder = _fresh(llama / "sharded", tmp_path / "cli")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _one_clear_line(_script("generate.py", "--ckpt", str(folder), "--prompt", "hi", "--max-new-tokens", "1"),
                    shard.name)


def _fresh(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def test_cut_short_at_every_tensor_boundary_and_inside_tensors(llama, tmp_path):
    """A download or copy that stopped anywhere: at the start, at the end and in the middle of every
    tensor's bytes, and inside the header. Every cut is refused in one line, nothing read."""
    folder = _fresh(llama / "single", tmp_path / "cut")
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    header, _ = _header(path)
    start = len(raw) - sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__")
    cuts = {4, 8, start // 2, start}
    for k, e in header.items():
        if k != "__metadata__":
            begin, end = e["data_offsets"]
            cuts |= {start + begin, start + (begin + end) // 2, start + end - 1}
    cuts.discard(len(raw))
    for cut in sorted(cuts):
        path.write_bytes(raw[:cut])
        with pytest.raises(UserError) as e:
            load_model(folder)
        assert "cut short" in str(e.value) or "truncated" in str(e.value), e.value
        assert "\n" not in str(e.value)
    print(f"cut at {len(cuts)} places of {len(raw)} bytes: each refused, e.g. {e.value}")


def test_checks_run_before_any_tensor_is_read(llama, tmp_path):
    """The last layer's last tensor missing: refused before the first tensor is read (a 70B load
    does not run for minutes and then fail)."""
    folder = _fresh(llama / "single", tmp_path / "missing")
    path = folder / "model.safetensors"
    from safetensors.torch import load_file, save_file
    state = load_file(path)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})
    _refused(folder, "model.layers.1.mlp.down_proj.weight is missing")


# ----------------------------------------------------------------------------- FP8

def _fp8_quantize(folder: Path, block: int):
    """Rewrite every projection weight as F8_E4M3 with a float32 scale per block x block tile, as
    DeepSeek-V3 ships its weights (quant_method fp8, weight_block_size, {weight}_scale_inv)."""
    from safetensors.torch import load_file, save_file
    state, out = load_file(folder / "model.safetensors"), {}
    for k, w in state.items():
        if not k.endswith("_proj.weight"):
            out[k] = w
            continue
        rows, cols = w.shape
        gr, gc = -(-rows // block), -(-cols // block)
        tiles = torch.zeros(gr * block, gc * block)
        tiles[:rows, :cols] = w
        tiles = tiles.view(gr, block, gc, block)
        scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # e4m3's largest value
        q = (tiles / scale[:, None, :, None]).view(gr * block, gc * block)[:rows, :cols]
        out[k], out[k + "_scale_inv"] = q.to(torch.float8_e4m3fn), scale
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return out


@torch.no_grad()
def test_fp8_block_scales_dequantized_as_transformers_does(llama, tmp_path):
    """FP8 weights with 16 x 16 block scales load to the same model transformers dequantizes them
    into; a block that does not divide the shapes (24: ragged edge tiles) equals a hand dequantization;
    written back (write_model), the folder is plain float with no quantization_config."""
    from transformers import AutoModelForCausalLM
    from writer import write_model
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    folder = _fresh(llama / "single", tmp_path / "fp8")
    _fp8_quantize(folder, 16)
    ours, _ = load_model(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert_close("FP8 (16 x 16 blocks): ours vs transformers' dequantization", ours(tokens), ref(tokens).logits, 1e-5)
    original = load_model(llama / "single")[0](tokens)
    lost = (ours(tokens) - original).abs().max().item()
    print(f"  FP8 vs the float32 original: max |diff| {lost:.3g} (the quantization's own error)")
    assert lost > 1e-4  # the weights really went through FP8

    folder = _fresh(llama / "single", tmp_path / "fp8_ragged")
    stored = _fp8_quantize(folder, 24)
    reader = CheckpointReader(folder)
    reader.check()
    for name, t in stored.items():
        if t.dtype == torch.float8_e4m3fn:
            s = stored[name + "_scale_inv"]
            rows = torch.arange(t.shape[0]) // 24
            cols = torch.arange(t.shape[1]) // 24
            hand = t.float() * s[rows][:, cols]
            assert torch.equal(reader.get(name), hand), name
    print("  FP8 (24 x 24 blocks, ragged edges): every weight equals the hand dequantization exactly")

    model, _ = load_model(folder)
    write_model(model, folder, tmp_path / "fp8_written", torch.float32, {})
    cfg = json.loads((tmp_path / "fp8_written" / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert_close("FP8 checkpoint written back as float32", load_model(tmp_path / "fp8_written")[0](tokens),
                 model(tokens), 0)


# ----------------------------------------------------------------------------- every tensor accounted for

@torch.no_grad()
def test_every_source_tensor_has_a_place_or_is_refused(tmp_path):
    """Optional parts of a Llama: attention biases (q, k, v and o) and tied embeddings convert into a
    folder stock transformers loads without a missing or unexpected tensor, equal to our model on
    it; MLP biases, which stock DeepSeek-V3 has no place for, are refused in one line before any
    work, with nothing written. (test_equivalence.py walks Qwen2, Mistral and Mixtral.)"""
    from transformers import AutoModelForCausalLM
    from dataclasses import replace
    from convert import OFFICIAL, check_source, convert_layers, write_checkpoint
    recipe = replace(OFFICIAL, rope_dim=8, kv_lora_rank=24, freqfold=2)
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(6))
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(7))
    for name, kw in (("attention_bias", dict(attention_bias=True)), ("tied", dict(tie_word_embeddings=True)),
                     ("attention_bias_tied", dict(attention_bias=True, tie_word_embeddings=True))):
        src, out = tmp_path / name, tmp_path / f"{name}-mla"
        _llama(src, **kw)
        reader = CheckpointReader(src)
        check_source(reader, recipe)
        write_checkpoint(reader, out, convert_layers(CheckpointReader(src), calib, recipe), torch.float32, {})
        ref, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
        assert_close(f"Llama with {name}, converted: ours vs transformers", load_model(out)[0](tokens),
                     ref.eval()(tokens).logits, 1e-4)
    src = tmp_path / "mlp_bias"
    _llama(src, mlp_bias=True)
    with pytest.raises(UserError, match="mlp.gate_proj.bias has no place in a stock DeepseekV3ForCausalLM") as e:
        check_source(CheckpointReader(src), recipe)
    print("  refused:", e.value)
    out = tmp_path / "mlp_bias-mla"
    res = _script("convert.py", *_convert_argv(src, out, _calib(tmp_path / "calib.txt")))
    _one_clear_line(res, "mlp.gate_proj.bias has no place")
    assert "calibrate" not in res.stderr and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_tied_config_with_a_trained_head_computes_the_head(tmp_path):
    """A config that says tie_word_embeddings while the file holds an lm_head.weight of its own
    values (a head fine-tuned apart): the logits come from that head, as transformers computes
    them, and the conversion writes that head; a head equal to the embeddings stays tied."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    from dataclasses import replace
    from convert import OFFICIAL, convert_layers, write_checkpoint
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(7))
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(6))
    for name, moved in (("trained head", 0.05), ("head equal to the embeddings", 0.0)):
        src = tmp_path / name.replace(" ", "-")
        _llama(src, tie_word_embeddings=True)
        weights = load_file(src / "model.safetensors")
        emb = weights["model.embed_tokens.weight"]
        weights["lm_head.weight"] = emb + moved * torch.randn(emb.shape, generator=torch.Generator().manual_seed(3))
        save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
        ref = AutoModelForCausalLM.from_pretrained(src).eval()
        assert torch.equal(ref.lm_head.weight, weights["lm_head.weight"])  # the oracle keeps the file's head
        ours, _ = load_model(src)
        assert ours.args.tie_embeddings == (moved == 0)
        assert_close(f"{name}: ours vs transformers", ours(tokens), ref(tokens).logits, 1e-4)
        out = tmp_path / f"{src.name}-mla"
        recipe = replace(OFFICIAL, rope_dim=8, kv_lora_rank=24, freqfold=2)
        write_checkpoint(CheckpointReader(src), out, convert_layers(CheckpointReader(src), calib, recipe),
                         torch.float32, {})
        written = load_file(out / "model.safetensors")["lm_head.weight"]
        print(f"  {name}: converted lm_head vs the file's, max |diff| "
              f"{(written - weights['lm_head.weight']).abs().max().item():.3g}")
        assert torch.equal(written, weights["lm_head.weight"])


def test_writer_reads_its_folder_back_before_commit(llama, tmp_path):
    """A tensor the written config has no place for, or one it declares and did not get: the writer
    refuses to commit, in one line, and leaves nothing behind (not even its temporary folder)."""
    reader = CheckpointReader(llama / "single")
    state = {name: reader.get(name) for name in reader.weight_map}
    for what, change, needle in (("an extra tensor", lambda s: {**s, "model.layers.0.mlp.up_proj.bias": torch.zeros(96)},
                                  "does not account for"),
                                 ("a missing tensor", lambda s: {k: v for k, v in s.items() if "layers.1.mlp.up" not in k},
                                  "is missing")):
        out = tmp_path / "out"
        with pytest.raises(UserError) as e, CheckpointWriter(out, reader.args.extra, reader.args) as w:
            for name, t in change(state).items():
                w._write(name, [t], tuple(t.shape), t.dtype)
            w.commit(source=reader.folder)
        print(f"  {what}: {e.value}")
        assert needle in str(e.value) and str(out) in str(e.value) and "\n" not in str(e.value)
        assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- --out

def test_out_that_could_cost_a_file_is_refused_before_any_work(llama, tmp_path, monkeypatch):
    """--out is refused in one line when it is an input, holds one, lies inside one, holds the
    current folder, is a file, a symbolic link or a mount point, or a folder this project did not
    write, or an earlier output of ours to which something was added since (a note, a .git) or
    whose record is damaged; an empty folder and an untouched earlier output of ours are fine.
    The same for the files a run writes (--state, --json). convert.py, tpla.py, finetune.py and
    bench.py ask before reading any text or tensor."""
    models = tmp_path / "models"
    src = _fresh(llama / "single", models / "llama")
    (tmp_path / "texts").mkdir()
    calib = _calib(tmp_path / "texts" / "calib.txt")
    (models / "notes.txt").write_text("results of last week's runs\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "data.bin").write_bytes(b"keep me")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    for name, extra in (("ours", None), ("ours_noted", "notes.txt"), ("ours_git", ".git"), ("ours_damaged", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / MARKER).write_text(json.dumps({"files": ["config.json"]}))
        if extra:
            (tmp_path / name / extra).mkdir()
    (tmp_path / "ours_damaged" / MARKER).write_text("{")
    inputs = [src, calib]
    cases = [(models, "contains the input"), (src, "is the input"), (src / "sub", "lies inside the input"),
             (tmp_path / "texts", "contains the input"), (tmp_path / "a_file", "is a file"),
             (tmp_path / "link", "symbolic link"), (tmp_path / "theirs", "was not written by this project"),
             (tmp_path / "ours_noted", "holds files this project did not write there (notes.txt)"),
             (tmp_path / "ours_git", "(.git)"), (tmp_path / "ours_damaged", "is damaged"),
             (tmp_path / "a_file" / "out", "cannot create")]
    if os.path.ismount("/proc"):
        cases.append((Path("/proc"), "mount point"))
    for out, needle in cases:
        with pytest.raises(UserError) as e:
            check_output(out, inputs)
        print(f"  {e.value}")
        assert needle in str(e.value)
    for out in (tmp_path / "empty", tmp_path / "ours", tmp_path / "new" / "deeper"):
        assert check_output(out, inputs) == out
    monkeypatch.chdir(tmp_path / "ours")  # an output of ours, but the shell stands in it
    with pytest.raises(UserError, match="holds the current folder") as e:
        check_output(".", inputs)
    print(f"  {e.value}")
    monkeypatch.undo()
    for path, kind, needle in ((calib, "state", "is the input"), (src / "state", "state", "lies inside the input"),
                               (tmp_path / "a_file", "state", "is not a training state"),
                               (tmp_path / "empty", "state", "is not a training state"),
                               (tmp_path / "empty", None, "is a folder")):
        with pytest.raises(UserError) as e:
            check_output_file(path, inputs, "--state", kind)
        print(f"  {e.value}")
        assert needle in str(e.value)
    before = _digest(tmp_path)
    # case 06 of ../shared/cases, as a user meets it: refused before any work, nothing touched
    res = _script("convert.py", *_convert_argv(src, models, calib))
    _one_clear_line(res, "contains the input")
    assert "calibrate" not in res.stderr
    mla = tmp_path / "mla"
    shutil.copytree(llama / "single", mla)
    cfg = json.loads((llama / "single" / "config.json").read_text())
    (mla / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v3", "kv_lora_rank": 16,
                                                  "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16}))
    _one_clear_line(_script("tpla.py", "--ckpt", str(mla), "--out", str(tmp_path)), "contains the input")
    finetune = ["finetune.py", "--ckpt", str(mla), "--teacher", str(src), "--text", str(calib)]
    _one_clear_line(_script(*finetune, "--out", str(tmp_path / "theirs")), "was not written by this project")
    _one_clear_line(_script(*finetune, "--out", str(tmp_path / "ft"), "--state", str(calib)), "--state")
    _one_clear_line(_script(*finetune, "--out", str(tmp_path / "ft"), "--state", str(tmp_path / "a_file"), "--resume"),
                    "is not a training state")
    _one_clear_line(_script("bench.py", "--ppl", "--ckpt", str(src), "--json", str(src / "config.json")), "--json")
    shutil.rmtree(mla)
    assert _digest(tmp_path) == before


def _kill_driver(tmp_path: Path) -> Path:
    """convert.py with every step of its write counted; at step K (argv[1]) the process kill -9s itself."""
    path = tmp_path / "kill_driver.py"
    path.write_text(f'''import json, os, shutil, signal, sys
sys.path.insert(0, {str(ROOT)!r})
kill_at, log = int(sys.argv[1]), sys.argv[2]
sys.argv = ["convert.py", *sys.argv[3:]]
import cli, convert, writer
steps = []
def step(name, fn):
    def counted(*a, **k):
        steps.append(name)
        if len(steps) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return counted
W = writer.CheckpointWriter
for name in ("_write", "_close_shard", "stage", "commit"):
    setattr(W, name, step(name, getattr(W, name)))
if os.environ.get("NO_EXCHANGE"):  # a filesystem without RENAME_EXCHANGE (NFS, Lustre)
    writer._exchange = lambda a, b: False
for name in ("_exchange", "_fsync"):
    setattr(writer, name, step(name, getattr(writer, name)))
os.replace, shutil.rmtree, shutil.copy2 = (step(f.__name__, f) for f in (os.replace, shutil.rmtree, shutil.copy2))
try:
    cli.run(convert.main)
finally:
    open(log, "w").write(json.dumps(steps))
''')
    return path


def _whole_output(out: Path, old: dict, src: Path) -> str:
    """'old' if out is exactly the earlier output, 'new' if it is a complete new conversion; fails otherwise."""
    if _digest(out) == old:
        return "old"
    CheckpointReader(out).check()
    load_model(out)
    assert json.loads((out / "config.json").read_text())["kv_lora_rank"] == 24
    assert (out / MARKER).is_file() and (out / "convert_report.json").is_file()
    return "new"


def test_kill_during_the_write_leaves_old_or_new_output(llama, tmp_path):
    """convert.py replacing an earlier output of its own is killed (SIGKILL, as kill -9) before each
    step of its write: every tensor written, the shard closed, the folder checked, each file copied,
    fsynced and renamed, the swap, the removal of the old output. Each time the output folder holds
    the old output byte for byte or the complete new one, and the source is byte for byte unchanged;
    the next run removes what the killed one left. Then once more from outside, at a moment the
    clock picks."""
    src = _fresh(llama / "single", tmp_path / "llama")
    calib = _calib(tmp_path / "calib.txt")
    source = _digest(src)
    old_out = tmp_path / "old"
    old_out.mkdir()  # an empty folder: nothing is replaced
    for replacing in (False, True):  # the summary says when the folder held an earlier output of ours
        res = _script("convert.py", *_convert_argv(src, old_out, calib, rank=16))
        assert res.returncode == 0, res.stderr
        written = next(line for line in res.stdout.splitlines() if line.startswith("written"))
        print(written)
        assert ("it replaced the earlier output there" in written) == replacing
    old = _digest(old_out)
    driver = _kill_driver(tmp_path)

    def run(k: int, out: Path) -> subprocess.Popen:
        _fresh(old_out, out)
        return subprocess.Popen([sys.executable, str(driver), str(k), str(out) + ".steps", *_convert_argv(src, out, calib)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    p = run(0, tmp_path / "count")  # never killed: count the steps
    assert p.wait() == 0, p.stderr.read()
    steps = json.loads((tmp_path / "count.steps").read_text())
    assert _whole_output(tmp_path / "count", old, src) == "new"
    writes = [i for i, s in enumerate(steps, 1) if s == "_write"]
    kills = sorted({writes[0], writes[len(writes) // 2], writes[-1]} | {i for i, s in enumerate(steps, 1) if s != "_write"})
    print(f"{len(steps)} steps in the write ({', '.join(dict.fromkeys(steps))}); killing before each of {len(kills)}")
    seen = {}
    for batch in (kills[i:i + 2] for i in range(0, len(kills), 2)):  # two at a time: two cores
        procs = {k: run(k, tmp_path / f"kill{k}") for k in batch}
        for k, proc in procs.items():
            assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
            seen[k] = _whole_output(tmp_path / f"kill{k}", old, src)
            assert _digest(src) == source
    print("  output after the kill at each step:", ", ".join(f"{steps[k - 1]}#{k}: {v}" for k, v in seen.items()))
    assert set(seen.values()) == {"old", "new"}  # the swap is the one moment it changes
    left = [p.name for p in tmp_path.iterdir() if ".transmla-" in p.name]
    assert left, "a kill mid-write leaves its temporary folder"
    k = kills[0]
    assert _script("convert.py", *_convert_argv(src, tmp_path / f"kill{k}", calib)).returncode == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".kill{k}.transmla-")]
    print(f"  {len(left)} temporary folders left by the kills; the next run into kill{k} removed its own")

    # where the filesystem cannot swap two folders in one step, commit renames twice; killed between them
    out = tmp_path / "noswap"
    _fresh(old_out, out)
    env = {**os.environ, "NO_EXCHANGE": "1"}
    argv = [sys.executable, str(driver), "0", str(out) + ".steps", *_convert_argv(src, out, calib)]
    assert subprocess.run(argv, cwd=ROOT, env=env, capture_output=True).returncode == 0
    steps = json.loads((tmp_path / "noswap.steps").read_text())
    last_rename = max(i for i, s in enumerate(steps, 1) if s == "replace")
    _fresh(old_out, out)
    argv[2] = str(last_rename)
    assert subprocess.run(argv, cwd=ROOT, env=env, capture_output=True).returncode == -signal.SIGKILL
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith(".noswap.transmla-") and p.name.endswith("-old")]
    assert not out.exists() and len(aside) == 1
    reader = CheckpointReader(old_out)
    with CheckpointWriter(out, reader.args.extra, reader.args):  # the next writer of the folder puts it back
        assert _digest(out) == old
    print(f"  no RENAME_EXCHANGE, killed between the two renames: the output stood aside as {aside[0]}; "
          "the next writer of the folder put it back, byte for byte")

    out = tmp_path / "outside"
    _fresh(old_out, out)
    proc = subprocess.Popen([sys.executable, "convert.py", *_convert_argv(src, out, calib)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not [p for p in tmp_path.iterdir() if p.name.startswith(".outside.transmla-")]:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    print(f"  kill -9 from outside once the write began: exit {proc.returncode}, "
          f"output {_whole_output(out, old, src)}")
    assert _digest(src) == source


def test_sigterm_removes_the_temporary_folder(llama, tmp_path):
    """SIGTERM (a scheduler's stop) unwinds like Ctrl-C: the temporary folder goes, the old output stays."""
    src = _fresh(llama / "single", tmp_path / "llama")
    calib = _calib(tmp_path / "calib.txt")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "convert.py", *_convert_argv(src, out, calib)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.transmla-")]:
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    rc, err = proc.wait(), proc.stderr.read()
    print(f"SIGTERM once the write began: exit {rc}; left beside the output: "
          f"{[p.name for p in tmp_path.iterdir() if p.name.startswith('.')]}")
    assert rc in (143, 0) and "Traceback" not in err  # 0: it finished before the signal came
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.transmla-")]
    if rc == 143:  # the run ends in one line saying what stopped it and what is left
        assert err.strip().splitlines()[-1] == "interrupted (SIGTERM): temporary files removed"


SIGNAL_AT_MKDIR = """import os, signal, sys
sys.path.insert(0, {root!r})
import cli
from writer import CheckpointWriter
from checkpoint import CheckpointReader
made = os.mkdir
def mkdir(path, *a, **kw):  # the signal lands the instant the temporary folder appears
    made(path, *a, **kw)
    if ".transmla-" in str(path):
        os.kill(os.getpid(), signal.{signal})
os.mkdir = mkdir
reader = CheckpointReader({src!r})
def main():
    with CheckpointWriter({out!r}, reader.args.extra, reader.args):
        print("the body of the with-statement ran")
cli.run(main)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_as_the_temporary_folder_appears_leaves_nothing(llama, tmp_path, sig):
    """Ctrl-C or SIGTERM in the instant the writer's temporary folder appears (where CI once caught
    the test above) still removes it: its name is recorded before it is made. Run 5 times: the
    signal may reach any of torch's threads first."""
    script = tmp_path / "signal_at_mkdir.py"
    script.write_text(SIGNAL_AT_MKDIR.format(root=str(ROOT), signal=sig, src=str(llama / "single"),
                                             out=str(tmp_path / "out")))
    for _ in range(5):
        res = _script(str(script))
        left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        print(f"{sig} as the folder appears: exit {res.returncode}; left beside the output: {left}")
        assert res.returncode == {"SIGTERM": 143, "SIGINT": 130}[sig] and "Traceback" not in res.stderr
        assert res.stderr.strip() == f"interrupted ({ {'SIGTERM': 'SIGTERM', 'SIGINT': 'Ctrl-C'}[sig] }): temporary files removed"
        assert "ran" not in res.stdout and not left


# ----------------------------------------------------------------------------- a failing rank

FAULT = '''import os, sys, time
sys.path.insert(0, {root!r})
sys.argv = ["generate.py", *sys.argv[1:]]
import model
if os.environ["RANK"] == "1":  # rank 1 fails on its own, in the middle of decode
    forward, calls = model.Transformer.forward, [0]
    def failing(self, *a, **k):
        calls[0] += 1
        if calls[0] == 6:
            with open({fault_at!r}, "w") as f:  # when the fault happened, by the wall clock
                f.write(repr(time.time()))
            raise RuntimeError("injected fault on rank 1")
        return forward(self, *a, **k)
    model.Transformer.forward = failing
import cli, generate
cli.run(generate.main)
'''


def test_failing_rank_ends_the_job_at_once(llama, tmp_path):
    """Two ranks decoding; rank 1 raises in its 5th decode step. Both exit 1, rank 1 says one line,
    rank 0 nothing; neither waits for the other in a barrier. What is timed is what is claimed: from
    the fault to each rank's exit (process start-up and loading are not part of it). The stall this
    replaces was a barrier's 60 s timeout; the bound is half of it, so a stall fails it and a busy
    machine, which stretches the second or two the exits take, does not. Then rank 0's stdout
    closed early (piped into head), and a checkpoint missing on one rank only: the same."""
    import threading
    driver, fault_at = tmp_path / "fault.py", tmp_path / "fault_at"
    driver.write_text(FAULT.format(root=str(ROOT), fault_at=str(fault_at)))
    argv = ["--ckpt", str(llama / "single"), "--prompt", "Once upon a time", "--temperature", "0",
            "--max-new-tokens", "400"]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(driver), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **_rank_env(r, 2, port)})
             for r in range(2)]
    outs, exited = [None, None], [None, None]

    def wait(r: int):  # each rank's exit time, by the wall clock, as it happens
        outs[r] = procs[r].communicate(timeout=600)
        exited[r] = time.time()
    waiting = [threading.Thread(target=wait, args=(r,)) for r in range(2)]
    for w in waiting:
        w.start()
    for w in waiting:
        w.join()
    after = [t - float(fault_at.read_text()) for t in exited]
    print(f"rank 1 raised mid-decode: exits {[p.returncode for p in procs]}, {after[0]:.2f} s (rank 0) and "
          f"{after[1]:.2f} s (rank 1) after the fault; rank 1 said {outs[1][1].strip()!r}, rank 0 said {outs[0][1].strip()!r}")
    assert [p.returncode for p in procs] == [1, 1]
    assert outs[1][1].strip().splitlines() == [outs[1][1].strip()] and "injected fault on rank 1" in outs[1][1]
    assert "[rank 1]" in outs[1][1] and "Traceback" not in outs[1][1]
    assert "Traceback" not in outs[0][1] and "error" not in outs[0][1]
    assert max(after) < 30

    letters = _fresh(llama / "single", tmp_path / "letters")
    from safetensors.torch import load_file, save_file
    from tokenizers import pre_tokenizers
    state = load_file(letters / "model.safetensors")
    keep = torch.tensor([c.isascii() and c.isalpha() for c in sorted(pre_tokenizers.ByteLevel.alphabet())])
    state["lm_head.weight"][~keep] = 0  # letters only: every token prints at once, none ends the text
    state["lm_head.weight"][keep] *= 5
    save_file(state, letters / "model.safetensors", metadata={"format": "pt"})
    port = _free_port()
    argv = ["generate.py", "--ckpt", str(letters), "--prompt", "Once", "--temperature", "0", "--max-new-tokens", "3000"]
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, **_rank_env(r, 2, port)}) for r in range(2)]
    procs[0].stdout.read(1)  # what `| head -c 1` reads before it exits
    procs[0].stdout.close()
    t0 = time.monotonic()
    errs = [p.stderr.read().decode() for p in procs]
    rcs = [p.wait(timeout=600) for p in procs]
    took = time.monotonic() - t0
    print(f"rank 0's stdout closed: exits {rcs} after {took:.1f} s; rank 0 said {errs[0].strip().splitlines()[-1:]}, "
          f"rank 1 {errs[1].strip().splitlines()[-1:]}")
    assert rcs == [1, 1] and took < 60
    assert "standard output was closed" in errs[0] and "Traceback" not in errs[0] + errs[1]
    assert not [line for line in errs[1].splitlines() if line.startswith("error")]

    # a user error on one rank only (a path missing on one node): that rank says it, the job ends
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "generate.py", "--ckpt", str(letters if r == 0 else tmp_path / "nowhere"),
                               "--prompt", "Once", "--max-new-tokens", "3000"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **_rank_env(r, 2, port)})
             for r in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    print(f"a checkpoint missing on rank 1 only: exits {[p.returncode for p in procs]}; rank 1 said "
          f"{errs[1].strip()!r}, rank 0 {errs[0].strip().splitlines()[-1:]}")
    assert [p.returncode for p in procs] == [1, 1]
    assert errs[1].strip().splitlines() == [errs[1].strip()] and "no such file" in errs[1] and "[rank 1]" in errs[1]
    assert "Traceback" not in errs[0] and "error" not in errs[0]


def test_degenerate_weights_and_dtypes(tmp_path):
    """A layer whose o_proj is all zeros (attention that nothing reads) still converts to finite
    weights; a float16 source is written as float16 and runs in float16; with a latent float16
    cannot hold (--latent-rms 1e-10) it is written as bfloat16 with a one-line notice and --dtype
    float16 is refused before any work, as is a latent RMS past 1e-4; a writer never writes NaN or inf."""
    from safetensors.torch import load_file, save_file
    calib = _calib(tmp_path / "calib.txt")
    src, out = tmp_path / "zero_o", tmp_path / "zero_o-mla"
    _llama(src)
    state = load_file(src / "model.safetensors")
    state["model.layers.0.self_attn.o_proj.weight"].zero_()
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    res = _script("convert.py", *_convert_argv(src, out, calib))
    assert res.returncode == 0, res.stderr[-2000:]
    bad = [k for k, v in load_file(out / "model.safetensors").items() if not torch.isfinite(v).all()]
    print("zero o_proj: non-finite tensors written:", bad)
    assert not bad
    half = tmp_path / "half"
    _llama(half, torch_dtype="float16").to(torch.float16).save_pretrained(half)
    res = _script("convert.py", *_convert_argv(half, tmp_path / "half-mla", calib))
    assert res.returncode == 0 and "note:" not in res.stderr, res.stderr[-2000:]
    assert json.loads((tmp_path / "half-mla" / "config.json").read_text())["torch_dtype"] == "float16"
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        f16 = load_model(tmp_path / "half-mla", dtype=torch.float16)[0](tokens).float()
        f32 = load_model(tmp_path / "half-mla")[0](tokens)
    print(f"float16 source written as float16, run in float16 vs float32: max |diff| {(f16 - f32).abs().max():.3g}")
    assert torch.isfinite(f16).all() and (f16 - f32).abs().max() < 1e-2 * f32.abs().max()
    # a latent float16 cannot hold (--latent-rms 1e-10): bfloat16 with a notice, or refused when asked for
    res = _script("convert.py", *_convert_argv(half, tmp_path / "half-mla-tiny", calib), "--latent-rms", "1e-10")
    notice = [line for line in res.stderr.splitlines() if line.startswith("note:")]
    print("float16 source, --latent-rms 1e-10:", notice)
    assert res.returncode == 0 and len(notice) == 1 and "writing bfloat16" in notice[0]
    assert json.loads((tmp_path / "half-mla-tiny" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    res = _script("convert.py", *_convert_argv(half, tmp_path / "half-mla16", calib), "--dtype", "float16",
                  "--latent-rms", "1e-10")
    _one_clear_line(res, "--dtype float16: float16 cannot hold a latent of RMS 1e-10")
    assert "calibrate" not in res.stderr and not (tmp_path / "half-mla16").exists()
    res = _script("convert.py", *_convert_argv(half, tmp_path / "half-mla-big", calib), "--latent-rms", "1e-3")
    _one_clear_line(res, "--latent-rms 0.001: must be above 0 and at most 1e-4")
    assert not (tmp_path / "half-mla-big").exists()
    reader = CheckpointReader(src)
    with pytest.raises(UserError, match="would hold NaN or infinite values .float16 holds at most 65504"):
        with CheckpointWriter(tmp_path / "inf", json.loads((src / "config.json").read_text()), reader.args) as w:
            w.add("norm.weight", torch.full((64,), 1e6).to(torch.float16))
    assert not (tmp_path / "inf").exists()


# ----------------------------------------------------------------------------- configs we do not compute

def test_mistral4_other_than_mixtral_is_refused():
    """A mistral4 checkpoint with a router or query scaling that is not Mixtral's (Mistral-Small-4:
    shared expert, llama-4 query scaling, yarn) is refused in one line naming the field."""
    from transformers import Mistral4Config
    from checkpoint import args_from_config
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=96, moe_intermediate_size=96, vocab_size=VOCAB, n_routed_experts=4,
                 num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16)
    rope = {"rope_type": "linear", "factor": 1.0, "rope_theta": 1e6, "llama_4_scaling_beta": 0.0,
            "original_max_position_embeddings": 256}
    ok = Mistral4Config(**shape, n_shared_experts=0, rope_parameters=rope).to_dict()
    a = args_from_config(ok)
    assert (a.n_experts, a.n_experts_per_tok, a.hidden_dim, a.kv_lora_rank) == (4, 2, 96, 16)
    bad = [({"n_shared_experts": 1}, "n_shared_experts 1"), ({"n_group": 2}, "n_group 2"),
           ({"topk_group": 2}, "topk_group 2"), ({"norm_topk_prob": False}, "norm_topk_prob False"),
           ({"routed_scaling_factor": 2.5}, "routed_scaling_factor 2.5"),
           ({"first_k_dense_replace": 1}, "first_k_dense_replace 1"),
           ({"rope_parameters": {**rope, "llama_4_scaling_beta": 0.1}}, "llama_4_scaling_beta 0.1"),
           (Mistral4Config(**shape).to_dict(), "rope type 'yarn'")]  # the stock defaults
    for change, needle in bad:
        with pytest.raises(UserError) as e:
            args_from_config({**ok, **change})
        print("refused:", e.value)
        assert needle in str(e.value) and "\n" not in str(e.value)
