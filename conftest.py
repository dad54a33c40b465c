"""What the test files share: the tiny checkpoints the ladder's rungs run on (written by transformers
itself), the embedded model, and the helpers that run a script, or a job of ranks as torchrun
would, and check that what it says is one clear line. pytest loads this file first; a test file
imports the helpers it uses by name (from conftest import ...).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_model
from cli import init_distributed


ROOT = Path(__file__).resolve().parent

VOCAB = 128


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float):
    diff = (ours.float() - ref.float()).abs().max().item()
    print(f"{name}: max |diff| = {diff:.3g} (atol {atol:g})")
    assert diff <= atol, f"{name}: max |diff| {diff} > {atol}"


def _tiny_configs():
    import transformers as tf
    gqa = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256)
    mla = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256, kv_lora_rank=16,
               qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, first_k_dense_replace=2)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    return {
        "llama": (tf.LlamaConfig(**gqa, rope_parameters=llama3), tf.LlamaForCausalLM),
        "llama_tied_headdim": (tf.LlamaConfig(**gqa, tie_word_embeddings=True, head_dim=24), tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config(**gqa), tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig(**gqa, sliding_window=8), tf.MistralForCausalLM),
        "mixtral": (tf.MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2), tf.MixtralForCausalLM),
        "deepseek_v3": (tf.DeepseekV3Config(**mla, q_lora_rank=None), tf.DeepseekV3ForCausalLM),
        "deepseek_v3_qlora_bias": (tf.DeepseekV3Config(**mla, q_lora_rank=24, attention_bias=True),
                                   tf.DeepseekV3ForCausalLM),
        "deepseek_v2": (tf.DeepseekV2Config(**mla, q_lora_rank=None, n_routed_experts=4), tf.DeepseekV2ForCausalLM),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (folder, transformers model): random weights, norms and biases perturbed off 1 and 0."""
    out = {}
    for name, (cfg, cls) in _tiny_configs().items():
        torch.manual_seed(0)
        ref = cls(cfg).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        folder = tmp_path_factory.mktemp(name)
        ref.save_pretrained(folder)
        out[name] = (folder, ref)
    return out


@pytest.fixture(scope="module")
def smollm():
    from fetch import ensure_default_model, ensure_texts
    from transformers import LlamaForCausalLM
    folder = ensure_default_model()
    ensure_texts()
    ref = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model, _ = load_model(folder)
    return folder, model, ref


def _script(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)  # no clock decides a test


def _one_clear_line(res, needle):
    print(res.stderr.strip())
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> dict:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _launch(world: int, *argv, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Run a script as `world` ranks, as torchrun would, but each rank's stderr kept apart."""
    import os
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **_rank_env(r, world, port)}) for r in range(world)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]  # a hang fails here
    finally:
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


CONVERTIBLE = ["llama", "qwen2", "mistral", "llama_tied_headdim", "mixtral"]  # GQA families convert.py takes


def _engine_eps(model, eps: float):
    """The latent norms (kv_a_layernorm, q_a_layernorm) with eps = rms_norm_eps, as vLLM, SGLang and
    llama.cpp build them (transformers fixes 1e-6)."""
    for name, m in model.named_modules():
        if name.endswith(("kv_a_layernorm", "q_a_layernorm")):
            m.variance_epsilon = eps


def _converted_at_eps_1e5(tiny, name, tmp_path):
    """The tiny source with rms_norm_eps 1e-5 (Llama's, SmolLM2's) at tmp_path / "src", converted at
    R = 20 (fitted) into the stock folder tmp_path / "mla"; returns (src, out, calib, the conversion's recipe)."""
    from checkpoint import CheckpointReader
    from dataclasses import replace
    from convert import FITTED, convert_layers, write_checkpoint
    src = tmp_path / "src"
    shutil.copytree(tiny[name][0], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    a = CheckpointReader(src).args
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(6))
    recipe = replace(FITTED, rope_dim=a.head_dim // 2, kv_lora_rank=20, freqfold=2)
    out = tmp_path / "mla"
    write_checkpoint(CheckpointReader(src), out, convert_layers(CheckpointReader(src), calib, recipe),
                     torch.float32, {"method": "fitted"})
    return src, out, calib, recipe


@pytest.fixture(scope="module")
def tp_tiny(tiny, tmp_path_factory):
    """Tiny checkpoints with 3 heads, so 2 ranks split them unevenly (as SmolLM2's 9): an MLA one
    and a GQA one with a single KV head (2 ranks > 1 KV head: replicated); and the q_lora + bias MLA."""
    import transformers as tf
    shape = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                 vocab_size=VOCAB, max_position_embeddings=256)
    out = {"mla_qlora_bias": tiny["deepseek_v3_qlora_bias"][0]}
    for name, cfg, cls in (
            ("mla3", tf.DeepseekV3Config(**shape, num_key_value_heads=3, kv_lora_rank=16, q_lora_rank=None,
                                         qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
                                         first_k_dense_replace=2), tf.DeepseekV3ForCausalLM),
            ("mqa3", tf.LlamaConfig(**shape, num_key_value_heads=1, head_dim=16), tf.LlamaForCausalLM)):
        torch.manual_seed(0)
        ref = cls(cfg).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        out[name] = tmp_path_factory.mktemp(name)
        ref.save_pretrained(out[name])
    # mla3 with queries 6x larger: sharp attention, where a shard's softmax differs most from the whole's
    out["mla3_sharp"] = sharp = tmp_path_factory.mktemp("mla3_sharp")
    shutil.copytree(out["mla3"], sharp, dirs_exist_ok=True)
    from safetensors.torch import load_file, save_file
    state = load_file(sharp / "model.safetensors")
    for k in state:
        if k.endswith("self_attn.q_proj.weight"):
            state[k] *= 6
    save_file(state, sharp / "model.safetensors", metadata={"format": "pt"})
    return out


def _calib():
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(8))


def _tp_tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def one_rank():
    """A gloo process group of one in this process: world size 1 runs the same code as torchrun's ranks."""
    import torch.distributed as dist
    init_distributed("cpu")
    yield
    dist.destroy_process_group()


def _converted(folder: Path, out: Path, R: int = 8, **kw) -> Path:
    """A tiny GQA checkpoint converted to a stock DeepSeek-V3 folder at a lossy rank (something to learn)."""
    from checkpoint import CheckpointReader
    from dataclasses import replace
    from convert import OFFICIAL, convert_layers, write_checkpoint
    a = CheckpointReader(folder).args
    calib = torch.randint(0, a.vocab_size, (8, 32), generator=torch.Generator().manual_seed(6))
    recipe = replace(OFFICIAL, rope_dim=a.head_dim // 2, kv_lora_rank=R, freqfold=2, **kw)
    layers = convert_layers(CheckpointReader(folder), calib, recipe)
    write_checkpoint(CheckpointReader(folder), out, layers, torch.float32, {"method": "transmla"})
    return out


def _tiny_pair_with_tokenizer(tmp_path) -> tuple[Path, Path]:
    """A tiny random Llama with the embedded model's tokenizer (tmp_path / "gqa") and its lossy
    conversion (tmp_path / "mla"): something finetune.py can run on in seconds."""
    import transformers as tf
    from writer import TOKENIZER_FILES
    from fetch import ensure_default_model, ensure_texts
    ensure_texts()
    gqa = tmp_path / "gqa"
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=96, vocab_size=49152,
                                       max_position_embeddings=256, tie_word_embeddings=True)).save_pretrained(gqa)
    for name in TOKENIZER_FILES:
        if (ensure_default_model() / name).is_file():
            shutil.copy(ensure_default_model() / name, gqa / name)
    return gqa, _converted(gqa, tmp_path / "mla")


STOP_DRIVER = """import sys
sys.path.insert(0, {root!r})
import cli, finetune
calls, step = [0], finetune.distill_step


def interrupted(*a, **kw):  # Ctrl-C as step {after} + 1 begins, on every rank
    calls[0] += 1
    if calls[0] > {after}:
        raise KeyboardInterrupt
    return step(*a, **kw)


finetune.distill_step = interrupted
sys.argv[0] = "finetune.py"
cli.run(finetune.main)
"""


def _stopped_after(steps: int, folder: Path) -> Path:
    """A finetune.py that Ctrl-C stops as step `steps` + 1 begins, written into folder: the run ends
    as an interrupted one does (its state saved, one line, exit 130), after exactly `steps` steps."""
    driver = folder / f"finetune_stopped_after_{steps}.py"
    driver.write_text(STOP_DRIVER.format(root=str(ROOT), after=steps))
    return driver
