"""The Hugging Face boundary: read a checkpoint folder into our Transformer.

What is in here:
- UserError: a mistake in what the user asked for; scripts print it as one line, exit 1.
- find_checkpoint: `--ckpt` may name the folder or any file in it.
- args_from_config: a `config.json` (llama, qwen2, mistral, mixtral, deepseek_v2/v3, mistral4) -> ModelArgs.
- HF_NAMES / hf_name: the one mapping from our parameter names to Hugging Face's; STACKED_EXPERTS:
  how mistral4 (MLA + Mixtral's router, what convert.py writes for Mixtral) stacks experts.
- The RoPE layout change at the boundary: DeepSeek checkpoints lay rotary pairs out
  interleaved (x0, x1), (x2, x3), ...; model.py works in rotate_half (x_i, x_{i+D/2}). Rows of
  the projections that produce q_pe and k_pe are permuted here once, so scores are unchanged.
- load_model: build on the meta device, then stream tensors one at a time from the
  safetensors file(s) with shapes checked, so memory never holds two copies of the weights.
- CheckpointWriter: the way back, tensor by tensor and atomically.
"""
import json
import math
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from model import ModelArgs, Transformer


class UserError(Exception):
    """A mistake in what the user asked for: scripts print it as one line and exit non-zero."""


SUPPORTED = ("llama", "qwen2", "mistral", "mixtral", "deepseek_v2", "deepseek_v3", "mistral4")

# mistral4 is DeepSeek's MLA with a router that, set as below, is exactly Mixtral's (softmax over all
# experts, top-k, renormalised); transformers' defaults first, for fields a config.json may leave out
MISTRAL4_AS_MIXTRAL = {"n_shared_experts": (1, 0), "n_group": (1, 1), "topk_group": (1, 1),
                       "norm_topk_prob": (True, True), "routed_scaling_factor": (1.0, 1.0),
                       "first_k_dense_replace": (0, 0)}


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder, given the folder itself or any file inside it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json here; expected a Hugging Face checkpoint folder")
    return folder


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{folder / 'config.json'}: cannot read it ({e})") from None


def _rope_config(cfg: dict) -> tuple[float, dict | None]:
    # transformers 5 writes "rope_parameters"; older configs write "rope_theta" + "rope_scaling"
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("llama3", "linear"):
        raise UserError(f"rope type {kind!r} is not supported (supported: default, linear, llama3)")
    return theta, {**scaling, "rope_type": kind}


def args_from_config(cfg: dict, **overrides) -> ModelArgs:
    kind = cfg.get("model_type")
    if kind not in SUPPORTED:
        raise UserError(f"model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    theta, scaling = _rope_config(cfg)
    n_heads = cfg["num_attention_heads"]
    a = dict(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6), tie_embeddings=cfg.get("tie_word_embeddings", False),
        max_seq_len=cfg.get("max_position_embeddings", 4096), hidden_dim=cfg["intermediate_size"],
        n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        rope_theta=theta, rope_scaling=scaling, extra=cfg,
    )
    if kind == "llama":
        a.update(qkv_bias=cfg.get("attention_bias", False), o_bias=cfg.get("attention_bias", False),
                 mlp_bias=cfg.get("mlp_bias", False))
    elif kind == "qwen2":
        if cfg.get("use_sliding_window"):
            raise UserError("qwen2 with use_sliding_window is not supported")
        a.update(qkv_bias=True)
    elif kind in ("mistral", "mixtral"):
        a.update(sliding_window=cfg.get("sliding_window"))
        if kind == "mixtral":
            a.update(n_experts=cfg["num_local_experts"], n_experts_per_tok=cfg["num_experts_per_tok"])
    else:  # MLA: deepseek_v2 / v3 with dense layers, mistral4 with Mixtral's routing
        if kind == "mistral4":
            _check_mistral4(cfg)
            a.update(n_experts=cfg["n_routed_experts"], n_experts_per_tok=cfg["num_experts_per_tok"],
                     hidden_dim=cfg["moe_intermediate_size"])
        elif cfg.get("n_routed_experts") and cfg.get("first_k_dense_replace", 0) < cfg["num_hidden_layers"]:
            raise UserError(f"{kind} with MoE layers is not supported: only all-dense layers "
                            "(first_k_dense_replace >= num_hidden_layers), as convert.py writes")
        a.update(kv_lora_rank=cfg["kv_lora_rank"], q_lora_rank=cfg.get("q_lora_rank") or 0,
                 qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
                 v_head_dim=cfg["v_head_dim"], qkv_bias=cfg.get("attention_bias", False),
                 o_bias=cfg.get("attention_bias", False), head_dim=cfg["qk_rope_head_dim"])
    a.update(overrides)
    return ModelArgs(**a)


def _check_mistral4(cfg: dict):
    """Refuse, in one line, a mistral4 checkpoint whose MoE or attention our Transformer does not compute."""
    bad = [f"{k} {cfg.get(k, default)!r}" for k, (default, want) in MISTRAL4_AS_MIXTRAL.items()
           if cfg.get(k, default) != want]
    rope = cfg.get("rope_parameters")
    if not rope:
        bad.append("no rope_parameters (transformers then uses yarn)")
    elif rope.get("llama_4_scaling_beta"):  # queries scaled by 1 + beta log(1 + floor(pos / original_max))
        bad.append(f"llama_4_scaling_beta {rope['llama_4_scaling_beta']!r}")
    if bad:
        raise UserError(f"mistral4 with {', '.join(bad)} is not supported: only Mixtral's routing "
                        f"({', '.join(f'{k} {want!r}' for k, (_, want) in MISTRAL4_AS_MIXTRAL.items())}, "
                        "llama_4_scaling_beta 0), as convert.py writes")


def rope_interleaved(args: ModelArgs) -> bool:
    """Whether the checkpoint's q_pe / k_pe rows are interleaved pairs (DeepSeek) or halves (HF Llama)."""
    kind = args.extra.get("model_type")
    return kind == "deepseek_v2" or (kind in ("deepseek_v3", "mistral4") and args.extra.get("rope_interleave", True))


# ----------------------------------------------------------------------------- names

# our module path -> Hugging Face module path, inside a layer (model.layers.{i}.) and outside it
HF_NAMES = {
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention.wq_a": "self_attn.q_a_proj",
    "attention.q_norm": "self_attn.q_a_layernorm",
    "attention.wq_b": "self_attn.q_b_proj",
    "attention.wkv_a": "self_attn.kv_a_proj_with_mqa",
    "attention.kv_norm": "self_attn.kv_a_layernorm",
    "attention.wkv_b": "self_attn.kv_b_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.gate": "block_sparse_moe.gate",  # Mixtral router
    "feed_forward.experts": "block_sparse_moe.experts",  # + .{e}.w1 / w2 / w3, kept as is
}
TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
# mistral4 keeps the MoE under mlp., like DeepSeek: the router is mlp.gate, and the experts ...
MISTRAL4_NAMES = {**HF_NAMES, "feed_forward.gate": "mlp.gate", "feed_forward.experts": "mlp.experts"}
# ... are stacked per layer into 3-D tensors, rows in this order (expert e's weights are rows
# e * M ... (e + 1) * M of the tensor seen as 2-D, so one expert is one contiguous read):
#   mlp.experts.gate_up_proj (E, 2 * hidden, dim): [w1 ; w3] of expert 0, of expert 1, ...
#   mlp.experts.down_proj    (E, dim, hidden):      w2 of expert 0, of expert 1, ...
# The names mlp.experts.{e}.w1.weight that hf_name gives are therefore not on disk: CheckpointReader
# presents each expert's block of the stacked tensor under it, CheckpointWriter.add_layer stacks.
STACKED_EXPERTS = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}


def hf_name(ours: str, kind: str | None = None) -> str:
    """The Hugging Face name of one of our parameters in a checkpoint of model_type `kind`."""
    if not ours.startswith("layers."):
        module, param = ours.rsplit(".", 1)
        return f"{TOP_NAMES[module]}.{param}"
    _, i, rest = ours.split(".", 2)
    for mine, theirs in (MISTRAL4_NAMES if kind == "mistral4" else HF_NAMES).items():
        if rest.startswith(mine + "."):
            return f"model.layers.{i}.{theirs}{rest[len(mine):]}"
    raise KeyError(ours)


def rope_rows(args: ModelArgs, ours: str) -> torch.Tensor | None:
    """For a DeepSeek tensor whose rows include rotary pairs, the row permutation that takes the
    checkpoint's interleaved pairs to our rotate_half layout; None for every other tensor."""
    if not (args.is_mla and rope_interleaved(args)):
        return None
    r = args.qk_rope_head_dim
    if ours.endswith(("attention.wq.weight", "attention.wq_b.weight")):
        n_groups, group, offset = args.n_heads, args.qk_nope_head_dim + r, args.qk_nope_head_dim
    elif ours.endswith(("attention.wkv_a.weight", "attention.wkv_a.bias")):
        n_groups, group, offset = 1, args.kv_lora_rank + r, args.kv_lora_rank
    else:
        return None
    perm = torch.arange(n_groups * group).view(n_groups, group)
    rope = perm[:, offset:]
    perm[:, offset:] = torch.cat([rope[:, 0::2], rope[:, 1::2]], dim=1)  # evens first, then odds
    return perm.flatten()


# ----------------------------------------------------------------------------- loading

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile:
    """One .safetensors file, read one tensor at a time with plain reads. (safetensors' own
    safe_open maps the whole file: every tensor read stays resident and counts as memory, which
    hides whether a conversion really streams.) Format: 8-byte little-endian header length, a
    JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data."""

    def __init__(self, path: Path):
        self.path, size = path, path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            try:
                if not 0 < n <= size - 8:
                    raise ValueError("bad header length")
                header = json.loads(f.read(n))
            except ValueError as e:
                raise UserError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.start, self.entries = 8 + n, header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.start + end > size:
            raise UserError(f"{path}: truncated ({size} bytes, its header describes {self.start + end})")

    def shape(self, name: str) -> tuple:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only rows [first, first + n) of it seen as 2-D (n, last dim): one contiguous read."""
        e = self.entries[name]
        dtype = SAFETENSORS_DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        shape = e["shape"]
        if rows is not None:
            first, n = rows
            row_bytes = shape[-1] * dtype.itemsize
            begin, end, shape = begin + first * row_bytes, begin + (first + n) * row_bytes, [n, shape[-1]]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            f.readinto(buf.numpy())
        return buf.view(dtype).reshape(shape)


class CheckpointReader:
    """Every tensor of a checkpoint, single-file or sharded; a tensor is read when asked for."""

    def __init__(self, path: str | Path, **overrides):
        self.folder = folder = find_checkpoint(path)
        self.args = args_from_config(read_config(folder), **overrides)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        names = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.files = {name: SafetensorsFile(folder / name) for name in names}
        self.weight_map = weight_map or {k: "model.safetensors" for k in self.files["model.safetensors"].entries}
        self.blocks = {}  # expert weight -> (stacked tensor, (first row, rows)), for mistral4
        if self.args.extra.get("model_type") == "mistral4":
            self._unstack_experts()

    def _unstack_experts(self):
        """List each expert's w1 / w3 / w2 (STACKED_EXPERTS) as a tensor of its own: rows of the stack."""
        for name in [k for k in self.weight_map if k.rsplit(".", 1)[-1] in STACKED_EXPERTS]:
            prefix, stacked = name.rsplit(".", 1)  # model.layers.{i}.mlp.experts, gate_up_proj
            parts = STACKED_EXPERTS[stacked]
            n_experts, m, _ = self.shape(name)  # m rows per expert, n per weight
            n = m // len(parts)
            for e in range(n_experts):
                for j, w in enumerate(parts):
                    self.blocks[f"{prefix}.{e}.{w}.weight"] = name, (e * m + j * n, n)
                    self.weight_map[f"{prefix}.{e}.{w}.weight"] = self.weight_map[name]
            del self.weight_map[name]

    def shape(self, name: str) -> tuple:
        file = self.files[self.weight_map[name]]
        if name in self.blocks:
            stacked, (_, n) = self.blocks[name]
            return n, file.shape(stacked)[-1]
        return file.shape(name)

    def stored_dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its weights in (its embeddings')."""
        emb = hf_name("tok_embeddings.weight")
        return SAFETENSORS_DTYPES[self.files[self.weight_map[emb]].entries[emb]["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        file = self.files[self.weight_map[name]]
        return file.get(*self.blocks[name]) if name in self.blocks else file.get(name)

    def fill(self, module: torch.nn.Module, prefix: str = "", device="cpu", dtype=torch.float32) -> dict:
        """Load every parameter of `module` (built on the meta device; its names are ours, under
        `prefix` in the whole model) from the checkpoint, shapes checked; returns the HF names used."""
        state, used = {}, set()
        for ours, meta in module.state_dict().items():
            theirs = hf_name(prefix + ours, self.args.extra["model_type"])
            if theirs not in self.weight_map:
                raise UserError(f"{self.folder}: tensor {theirs} is missing (config says model_type "
                                f"{self.args.extra['model_type']!r}, {self.args.n_layers} layers)")
            shape = self.shape(theirs)
            if shape != tuple(meta.shape):
                raise UserError(f"{self.folder}: tensor {theirs} has shape {list(shape)}, "
                                f"config.json implies {list(meta.shape)}")
            t = self.get(theirs)
            perm = rope_rows(self.args, prefix + ours)
            state[ours] = (t if perm is None else t[perm]).to(device=device, dtype=dtype)
            used.add(theirs)
        module.load_state_dict(state, strict=True, assign=True)
        return used


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
               **overrides) -> tuple[Transformer, Path]:
    """Load a Hugging Face checkpoint folder (or any file in it) into our Transformer."""
    reader = CheckpointReader(path, **overrides)
    args = reader.args
    with torch.device("meta"):
        model = Transformer(args)
    used = reader.fill(model, device=device, dtype=dtype)
    unused = [k for k in reader.weight_map if k not in used and not _ignorable(k, args)]
    if unused:
        raise UserError(f"{reader.folder}: tensors that config.json does not account for, e.g. {unused[0]} "
                        f"({len(unused)} in all)")
    model.set_rope(args.max_seq_len, device)
    return model.eval(), reader.folder


def _ignorable(name: str, args: ModelArgs) -> bool:
    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and args.tie_embeddings):
        return True
    if ".mlp.shared_experts." in name and args.extra.get("model_type") == "mistral4":
        return True  # n_shared_experts 0 (args_from_config checked): stock Mistral4 still lists them, empty
    # DeepSeek-V3 ships multi-token-prediction layers after the last layer: not used for generation
    parts = name.split(".")
    return name.startswith("model.layers.") and int(parts[2]) >= args.n_layers


# ----------------------------------------------------------------------------- command-line helpers

def default_or(ckpt: str | None) -> Path:
    """The checkpoint a script was given, or the embedded default model (fetched on first use)."""
    if ckpt:
        return find_checkpoint(ckpt)
    from fetch import ensure_default_model
    return ensure_default_model()


def pick_device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return name


def pick_dtype(name: str | None, device: str) -> torch.dtype:
    # fp32 by default on CPU: its bf16 matmuls are slow on most CPUs and the references use fp32
    name = name or ("bfloat16" if device.startswith("cuda") else "float32")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UserError(f"--dtype {name}: choose one of {', '.join(dtypes)}")
    return dtypes[name]


def run(main) -> None:
    """Run a script's main(): a UserError becomes one line on stderr and exit status 1. Under
    torchrun every rank exits 1 and only rank 0 prints (the ranks fail the same check)."""
    import sys
    import torch.distributed as dist
    try:
        main()
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            leave_process_group()


def leave_process_group(timeout_s: float = 60.0) -> None:
    """Tear the process group down after every rank got here: a gloo rank that closes its
    connections while another is still finishing can make that one abort. The wait has a
    timeout, so a rank that never comes (it failed elsewhere) cannot hang the others."""
    import datetime
    import torch.distributed as dist
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError:
        pass
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- writing

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model", "chat_template.jinja")


class CheckpointWriter:
    """Writes a Hugging Face folder atomically and tensor by tensor: each tensor's bytes go
    straight to disk (a shard's data file; the shard gets its header when it closes), so memory
    holds one tensor at a time. Everything lands in a temporary sibling folder that takes the
    place of `folder` only in commit(). Use it as a context manager: an error or interruption
    before commit() leaves nothing behind."""

    def __init__(self, folder: str | Path, config: dict, args: ModelArgs, max_shard_bytes: int = 2 << 30):
        self.folder = Path(folder)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", dir=self.folder.parent))
        self.config, self.args = config, replace(args, extra=config)
        self.max_shard_bytes, self.shards, self.header, self.data = max_shard_bytes, [], {}, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.data:
            self.data.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, ours: str, t: torch.Tensor):
        """Add one of our parameters under its Hugging Face name, in the checkpoint's RoPE layout."""
        if ours == "output.weight" and self.args.tie_embeddings:
            return
        perm = rope_rows(self.args, ours)
        t = t if perm is None else t[torch.argsort(perm)]
        self._write(hf_name(ours, self.config["model_type"]), [t], t.shape, t.dtype)

    def add_layer(self, i: int, tensors: dict, dtype: torch.dtype):
        """Add layer i's parameters (our names within the layer), each cast to dtype as it is written.
        In a mistral4 folder the experts go into the stacked tensors (STACKED_EXPERTS) one expert at
        a time, and the shared expert stock Mistral4 always builds gets zero rows: it adds nothing."""
        mistral4 = self.config["model_type"] == "mistral4"
        for k, t in tensors.items():
            if not (mistral4 and k.startswith("feed_forward.experts.")):
                self.add(f"layers.{i}.{k}", t.to(dtype))
        if not mistral4:
            return
        n_experts, prefix = self.args.n_experts, f"model.layers.{i}.mlp"
        for stacked, parts in STACKED_EXPERTS.items():
            blocks = [tensors[f"feed_forward.experts.{e}.{w}.weight"] for e in range(n_experts) for w in parts]
            shape = (n_experts, sum(b.shape[0] for b in blocks[:len(parts)]), blocks[0].shape[1])
            self._write(f"{prefix}.experts.{stacked}", (b.to(dtype) for b in blocks), shape, dtype)
        for name, shape in (("gate_proj", (0, self.args.dim)), ("up_proj", (0, self.args.dim)),
                            ("down_proj", (self.args.dim, 0))):
            self._write(f"{prefix}.shared_experts.{name}.weight", [torch.empty(shape, dtype=dtype)], shape, dtype)

    def _write(self, theirs: str, blocks, shape: tuple, dtype: torch.dtype):
        """One tensor of `shape` whose bytes come as consecutive blocks, each written as it arrives."""
        if self.data is None:
            self.data, self.offset = open(self.tmp / "data", "wb"), 0
        begin = self.offset
        for t in blocks:
            assert t.dtype == dtype, (theirs, t.dtype, dtype)
            self.data.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
            self.offset += t.numel() * t.element_size()
        assert self.offset - begin == math.prod(shape) * dtype.itemsize, (theirs, shape)
        self.header[theirs] = {"dtype": {v: k for k, v in SAFETENSORS_DTYPES.items()}[dtype], "shape": list(shape),
                               "data_offsets": [begin, self.offset]}
        if self.offset >= self.max_shard_bytes:
            self._close_shard()

    def _close_shard(self):
        if self.data is None:
            return
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}).encode()
        header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned
        name = f"shard-{len(self.shards)}.safetensors"
        with open(self.tmp / name, "wb") as out, open(self.tmp / "data", "rb") as data:
            out.write(len(header).to_bytes(8, "little") + header)
            shutil.copyfileobj(data, out, 16 << 20)
        os.remove(self.tmp / "data")
        self.shards.append((name, list(self.header)))
        self.header, self.data = {}, None

    def commit(self, source: Path | None = None, extra_files: dict | None = None):
        """Close the last shard, write config.json (and copy the tokenizer files from `source`),
        then move the folder into place."""
        self._close_shard()
        n, weight_map = len(self.shards), {}
        for k, (name, keys) in enumerate(self.shards):
            final = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / name, self.tmp / final)
            weight_map.update({key: final for key in keys})
        if n > 1:
            (self.tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        (self.tmp / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        for name in TOKENIZER_FILES if source else ():
            if (source / name).is_file():
                shutil.copy2(source / name, self.tmp / name)
        for name, text in (extra_files or {}).items():
            (self.tmp / name).write_text(text)
        os.chmod(self.tmp, 0o755)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self.tmp, self.folder)


def write_model(model, source: Path, out: Path, dtype: torch.dtype, record: dict):
    """A model loaded from `source` and then changed (fine-tuned, rotated) as a stock folder like
    its source: the source's config plus `record` (what was done to it), its tokenizer files."""
    config = {**read_config(source), **record}
    args = CheckpointReader(source).args
    state = model.state_dict()
    with CheckpointWriter(out, config, args) as writer:
        for name in ("tok_embeddings", "norm") + (() if args.tie_embeddings else ("output",)):
            writer.add(f"{name}.weight", state[f"{name}.weight"].to(dtype))
        for i in range(args.n_layers):
            p = f"layers.{i}."
            writer.add_layer(i, {k[len(p):]: v for k, v in state.items() if k.startswith(p)}, dtype)
        writer.commit(source=source)
