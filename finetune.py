"""Fine-tune a converted MLA checkpoint by distillation from the GQA model it came from, and write
it back as a stock DeepSeek-V3 folder with the same cache size.

    python finetune.py                                  # embedded model's default conversion, 30 minutes
    python finetune.py --minutes 5 --out /tmp/smollm-mla-ft
    python finetune.py --resume                         # continue an interrupted run from its state folder
    torchrun --nproc_per_node=2 finetune.py --minutes 3 # FSDP2 over 2 processes (gloo on CPU, NCCL on GPUs)
    python finetune.py --ckpt llama-mla --teacher llama --text a.txt b.txt --tokens 20000000 \\
        --seq-len 2048 --batch 8 --minutes 0 --device cuda --dtype bfloat16

The conversion loses most where it drops RoPE and where the joint PCA drops latent dims; what the
cache can still hold is better used after training. The loss is the KL divergence from the
teacher's (the original GQA model's) next-token distribution to the student's, at temperature 1
over the whole vocabulary, plus --ce-weight times the ordinary next-token loss. The teacher runs
on the same batch under no_grad. Only the attention weights train by default (`--trainable
attn`: the part the conversion changed); gradients still flow back through every layer, but the
feed-forward, norm and embedding weights get none.

The latent RMSNorm. Stock DeepSeek always normalises the latent (eps 1e-6); convert.py makes that
norm nearly linear by scaling the latent down to an RMS of 3e-5 and putting sqrt(eps) / scale
into the norm weight, with the attention's input scaled by s1 (config
transmla.attention_input_scale) to share the smallness. Adam moves every weight by about lr per
step whatever its size, so trained in that form the small weights would be wiped out in a few
steps. So before training each such norm is *unfolded*: its gain w / sqrt(eps) goes into the
latent rows, an UnfoldedNorm that computes exactly what the norm did takes its place, and the
input's scale s1 comes off (the same for q_a_proj / q_a_layernorm with a q_lora path); after
training all of it is *folded* back. Neither changes the logits (test_equivalence.py checks
both). A norm whose input is not small is a real RMSNorm and is left as it is.

The residual stream. convert.py writes rms_norm_eps 1e-6 (what every engine reads alike) with the
embeddings, o_proj and down_proj scaled by alpha = sqrt(1e-6 / the source's eps) (config
transmla.residual_scale). For the same reason, Adam would move those alpha-times-smaller weights
1/alpha times faster; their optimizer group gets lr * alpha, weight decay / alpha and gradients
times alpha before clipping (optimizer): the steps training the unscaled weights would take.

Data: random windows of --seq-len tokens (seeded) from the training texts, each file tokenized
as a whole (one document per line, as the perplexity protocol reads the evaluation text). The
default texts are the calibration split and the Wikipedia training articles of the setup step
(fetch.py); the evaluation split and the held-out Wikipedia articles are refused as training text.

LR: linear warm-up, then cosine decay to --lr / 10. The run ends after --tokens or --minutes,
whichever comes first; with a time budget the schedule follows the clock (progress is the larger
of the token and the time fraction), so the decay ends when the time does.

Across GPUs (or CPU processes): `torchrun --nproc_per_node=N finetune.py ...` shards the student
and the teacher with FSDP2 (shard): each block its own unit, each rank holding 1 / N of every
weight, gradient and Adam moment in training (each rank loads the whole teacher and the whole
float32 student once, then shards them: that, not training, sets the peak for the largest
models), a bf16 mixed-precision policy on GPUs; --batch is the global
batch, each rank training on its N-th of every step's windows (the same windows as one process
would draw); each block's activations are recomputed in the backward (--no-checkpoint-activations
keeps them: more memory, less compute; one CPU process keeps them by default).
Without torchrun the same code runs as a group of one.

Resuming: every --save-every steps, at the end and on Ctrl-C or SIGTERM (one process) the
trainable weights (unfolded) and their optimizer state go to the state folder (--state, default
OUT.state beside the output) as torch.distributed.checkpoint shards, by name, with the step,
the data generator and the settings beside them; written aside and put in place when complete.
`--resume` continues with the saved settings, on the same number of ranks or another. The output
folder is written once, at the end, by rank 0 from the gathered weights, into a temporary folder
that is moved into place when complete (writer.CheckpointWriter); its config.json keeps the
conversion's record ("transmla") and adds one of the fine-tuning ("finetune"). Then the state
folder goes, unless --keep-state.

The compute dtype: the default --dtype is bfloat16 autocast where the CPU has AMX / AVX512-BF16
matmuls (and on CUDA); the weights that train stay float32 (Adam needs their precision) and are
cast for each matmul. On a CPU without them (AVX2 only) bf16 is emulated and many times slower,
so the default is float32 there (the speeds measured: docs/accuracy.md).

The script's plumbing is below the method, in the order a run takes: prepare (every check and
path, the data), build (the models, sharded, and the optimizer), train (the loop; train_step is
one step), write (the folder, evaluated), summary.
"""
import argparse
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.fsdp import FSDPModule

from checkpoint import CheckpointReader, find_checkpoint, load_model, read_config
from cli import (UserError, first_on_rank_0, init_distributed, keep, peak_rss_mb, pick_device, progress_bar, read_json,
                 read_text, run)
from evaluate import WindowBar, perplexity
from fetch import default_or, ensure_default_conversion
from model import MLA, RMSNorm, Transformer
from writer import check_output, check_output_file, earlier_output, put_in_place, write_model
import tpla

# a latent norm is convert.py's linear carrier if its input's mean square stays below LINEAR * eps on every
# probe token (convert.py's: ~1e-3 on average, under 0.1 for a 7x outlier token at --latent-rms 1e-4;
# DeepSeek's own latents: ~1e6)
LINEAR = 0.5
WARMUP = (20, 0.05)  # linear LR warm-up for 20 steps or 5% of the run, whichever ends first
MIN_LR = 0.1  # the cosine ends at this fraction of --lr


# ----------------------------------------------------------------------------- unfold / fold the latent norms

def latent_norms(attn: MLA) -> list[tuple[str, str]]:
    """(down-projection, norm) pairs whose norm stock DeepSeek forces: the KV latent, the q latent."""
    return [("wkv_a", "kv_norm")] + ([("wq_a", "q_norm")] if attn.q_lora_rank else [])


@torch.no_grad()
def latent_mean_squares(model: Transformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """For every latent norm (or the identity standing in for it): the mean square of its input
    per token, (B * T,) float64, over one forward of `tokens`."""
    found, hooks = {}, []
    dt = model.tok_embeddings.weight.dtype  # bf16 frozen weights, fp32 trainable ones: autocast runs both
    autocast = torch.autocast(tokens.device.type, dtype=dt) if dt != torch.float32 else nullcontext()
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.attention, MLA):
            continue
        for _, norm in latent_norms(layer.attention):
            def hook(module, inputs, name=f"layers.{i}.attention.{norm}"):
                found[name] = inputs[0].double().pow(2).mean(-1).flatten()
            hooks.append(getattr(layer.attention, norm).register_forward_pre_hook(hook))
    try:
        with autocast:
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return found


class UnfoldedNorm(nn.Module):
    """A latent RMSNorm(c) = w c / sqrt(mean(c^2) + eps) whose gain w / sqrt(eps) has moved into the
    rows of the down-projection feeding it: on their output u = c w / sqrt(eps) it computes
    u / sqrt(1 + mean(c^2) / eps), what the norm computed, exactly. (For convert.py's latent,
    mean(c^2) / eps ~ 1e-3: nearly the identity.) w stays, to fold back."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.eps = norm.eps
        self.register_buffer("w", norm.weight.detach().clone(), persistent=False)

    def forward(self, u):
        c = u.float() * (math.sqrt(self.eps) / self.w.float())
        return u * torch.rsqrt(1 + c.pow(2).mean(-1, keepdim=True) / self.eps).to(u.dtype)


def input_scales(model: Transformer) -> list[float]:
    """The scale convert.py put on each layer's attention input (convert.balance_input), 1 where none."""
    scales = (model.args.extra.get("transmla") or {}).get("attention_input_scale")
    return scales if scales else [1.0] * len(model.layers)


def _scale_input(layer, s: float):
    """Multiply the attention's input by s (its norm's weight) and divide the maps reading it: exact.
    A frozen norm weight (not float32: bf16 training) gets its own weight back when the scale comes
    back on, not a second rounding of it."""
    attn, norm = layer.attention, layer.attention_norm
    if norm.weight.dtype != torch.float32:
        kept = getattr(norm, "frozen_weight", None)
        if kept is None:
            norm.frozen_weight = norm.weight.detach().clone()
            norm.weight.mul_(s)
        else:
            norm.weight.copy_(kept)
            del norm.frozen_weight
    else:
        norm.weight.mul_(s)
    for lin in (attn.wq_a if attn.q_lora_rank else attn.wq, attn.wkv_a):
        lin.weight.div_(s)


def _scale_rows(lin: nn.Linear, gain: torch.Tensor):
    n = len(gain)
    lin.weight[:n] = (lin.weight[:n].double() * gain[:, None]).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias[:n] = (lin.bias[:n].double() * gain).to(lin.bias.dtype)


@torch.no_grad()
def unfold(model: Transformer, tokens: torch.Tensor | None = None, names: list[str] | None = None) -> list[str]:
    """Unfold each of convert.py's latent norms (input mean square < LINEAR * eps on `tokens`; or
    exactly the norms in `names`): its gain w / sqrt(eps) moves into the rows of the
    down-projection that feed it, and an UnfoldedNorm takes its place; where the kv latent's norm
    goes, the layer's attention input loses convert.py's scale too (input_scales). Exact. Returns
    the names of the norms unfolded."""
    ms = latent_mean_squares(model, tokens) if names is None else None
    scales = input_scales(model)
    done = []
    for i, layer in enumerate(model.layers):
        attn = layer.attention
        if not isinstance(attn, MLA):
            continue
        for down, norm in latent_norms(attn):
            name, m = f"layers.{i}.attention.{norm}", getattr(attn, norm)
            if (name not in names) if names is not None else (ms[name].max().item() >= LINEAR * m.eps):
                continue  # a real RMSNorm (DeepSeek's own weights): train it as it is
            _scale_rows(getattr(attn, down), m.weight.double() / math.sqrt(m.eps))
            setattr(attn, norm, UnfoldedNorm(m))
            done.append(name)
            if norm == "kv_norm":
                _scale_input(layer, 1 / scales[i])
    return done


@torch.no_grad()
def fold(model: Transformer, names: list[str]):
    """Undo unfold exactly: the gain back out of the rows into a stock RMSNorm, the attention input's
    scale back on (convert.py's form)."""
    scales = input_scales(model)
    for name in names:
        _, i, _, norm = name.split(".")
        layer = model.layers[int(i)]
        attn, m = layer.attention, getattr(layer.attention, norm)
        down = dict((b, a) for a, b in latent_norms(attn))[norm]
        _scale_rows(getattr(attn, down), math.sqrt(m.eps) / m.w.double())
        new = RMSNorm(len(m.w), m.eps).to(device=m.w.device, dtype=getattr(attn, down).weight.dtype)
        new.weight.copy_(m.w)
        setattr(attn, norm, new)
        if norm == "kv_norm":
            _scale_input(layer, scales[int(i)])


# ----------------------------------------------------------------------------- the loss

def distill_step(student: Transformer, teacher: Transformer, x: torch.Tensor, y: torch.Tensor, ce_weight: float,
                 autocast, chunk: int = 512, backward: bool = True) -> tuple[float, float]:
    """Forward both models on x (B, T), accumulate the gradient of KL(teacher || student) + ce_weight * CE
    (means over the B * T tokens) into the student; returns (KL, CE). The vocabulary-sized logits are
    made `chunk` tokens at a time and dropped after their backward, so memory holds one chunk of them:
    the trunk's graph is cut at the final hidden state and its gradient collected there first."""
    with autocast, torch.no_grad():
        h_t = teacher.hidden(x).flatten(0, 1)  # (N, D)
    with autocast, torch.set_grad_enabled(backward):
        h_s = student.hidden(x).flatten(0, 1)  # (N, D), with the graph back through every layer
    cut = h_s.detach().requires_grad_(backward)
    y = y.flatten()
    N, kl_sum, ce_sum = len(y), 0.0, 0.0
    for a in range(0, N, chunk):
        with autocast, torch.no_grad():
            logp_t = F.log_softmax(teacher.logits(h_t[a:a + chunk]).float(), -1)  # (n, V)
        with autocast, torch.set_grad_enabled(backward):
            logp_s = F.log_softmax(student.logits(cut[a:a + chunk]).float(), -1)
            kl = (logp_t.exp() * (logp_t - logp_s)).sum()
            ce = F.nll_loss(logp_s, y[a:a + chunk], reduction="sum")
        if backward:
            ((kl + ce_weight * ce) / N).backward()  # into cut.grad (and the head, if it trains)
        kl_sum, ce_sum = kl_sum + kl.item(), ce_sum + ce.item()
    if isinstance(teacher, FSDPModule):
        teacher.reshard()  # its head stayed gathered for the chunks (shard)
    if backward:
        h_s.backward(cut.grad)
    return kl_sum / N, ce_sum / N


# ----------------------------------------------------------------------------- data

def training_ids(paths: list[Path], tok) -> torch.Tensor:
    """Every file tokenized as a whole (its non-empty lines joined by newlines), files joined by a newline."""
    ids = []
    for p in paths:
        text = "\n".join(line for line in read_text(p).splitlines() if line.strip())
        ids += tok.encode(("\n" if ids else "") + text)
    return torch.tensor(ids, dtype=torch.long)


def batch(ids: torch.Tensor, B: int, T: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """B random windows of T + 1 tokens: inputs (B, T) and next tokens (B, T)."""
    starts = torch.randint(0, len(ids) - T, (B,), generator=gen)
    w = torch.stack([ids[s:s + T + 1] for s in starts.tolist()])  # (B, T + 1)
    return w[:, :-1], w[:, 1:]


def lr_at(step: int, progress: float, lr: float) -> float:
    """progress: the fraction of the run done, by tokens or by time, whichever is further."""
    warm = min(1.0, max((step + 1) / WARMUP[0], progress / WARMUP[1]))
    return warm * lr * (MIN_LR + (1 - MIN_LR) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ----------------------------------------------------------------------------- models

def trainable_names(model: Transformer, which: str) -> list[str]:
    """attn: the attention of every layer (what the conversion changed); norms: plus every RMSNorm; all: everything."""
    names = []
    for name, _ in model.named_parameters():
        if which == "all" or ".attention." in name or (which == "attn+norms" and "norm" in name):
            names.append(name)
    return names


def load_student(folder: Path, device: str, dtype: torch.dtype, which: str, probe: torch.Tensor,
                 unfolded: list[str] | None = None) -> tuple[Transformer, list[str], list[nn.Parameter]]:
    """The student in training form: frozen weights in `dtype`, trainable ones float32 (Adam's
    updates are far below bf16's resolution), latent norms unfolded."""
    model, _ = load_model(folder, device=device, dtype=torch.float32 if which == "all" else dtype)
    names = trainable_names(model, which)
    if which != "all" and dtype != torch.float32:
        reader = CheckpointReader(folder)  # the trainable weights again, float32 from the file, not via bf16
        for i, layer in enumerate(model.layers):
            reader.fill(layer.attention, f"layers.{i}.attention.", device, torch.float32)
        for name, p in model.named_parameters():
            if name in names:
                p.data = p.data.float()
    model.requires_grad_(False)
    unfolded = (unfold(model, None if probe is None else probe.to(device), unfolded)
                if probe is not None or unfolded is not None else [])
    params = [p for name, p in model.named_parameters() if name in names]  # the norms unfolded have gone
    for p in params:
        p.requires_grad_(True)
    return model, unfolded, params


RESIDUAL_WRITERS = ("tok_embeddings.weight", "attention.wo.weight", "attention.wo.bias", "w2.weight")


def optimizer(model: Transformer, params: list[nn.Parameter], lr: float, weight_decay: float):
    """AdamW that trains a converted model as if its residual stream were not scaled.

    convert.py writes the residual stream scaled by alpha (config transmla.residual_scale, so that
    rms_norm_eps can be the 1e-6 every engine reads alike): the embeddings, o_proj and down_proj
    are alpha times their source's size. The model is the same, but Adam's steps are absolute
    (lr per step whatever the weight's size), so those weights would move 1/alpha times faster
    relative to their size. Their group ("scale" alpha) gets lr * alpha, weight decay / alpha
    and gradients times alpha before clipping: step for step what training the unscaled weights
    would do, up to Adam's epsilon."""
    alpha = (model.args.extra.get("transmla") or {}).get("residual_scale", 1.0)
    names = {id(p): n for n, p in model.named_parameters()}
    scaled = {id(p) for p in params if alpha != 1 and names[id(p)].endswith(RESIDUAL_WRITERS)}
    groups = [{"params": [p for p in params if id(p) not in scaled], "scale": 1.0},
              {"params": [p for p in params if id(p) in scaled], "scale": alpha}]
    groups = [{**g, "weight_decay": weight_decay / g["scale"]} for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


# ----------------------------------------------------------------------------- across ranks (FSDP2)

def shard(model: Transformer, device: str, param_dtype: torch.dtype | None = None,
          checkpoint_activations: bool = False) -> Transformer:
    """Shard `model` in place over the process group with FSDP2 (fully_shard): every block is its
    own unit, whose weights are gathered for its forward and again for its backward and freed
    after each; the embedding, final norm and head form the root unit. Each rank keeps 1 / world of
    every weight, gradient and Adam moment. param_dtype: the dtype gathered weights compute in
    (bf16 on GPUs halves the traffic; gradients are reduced in float32); None keeps theirs.
    hidden() gathers as forward() does; the root stays gathered after it (FSDP2 does not reshard
    the root after its forward), so logits() can follow a chunk at a time (distill_step).
    checkpoint_activations: each block keeps only its input and recomputes the rest in the
    backward (torch.utils.checkpoint): activation memory of one block instead of all of them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    from torch.utils.checkpoint import checkpoint
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in model.layers:
        if checkpoint_activations:
            layer.forward = lambda *a, f=layer.forward: checkpoint(f, *a, use_reentrant=False)
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.set_reduce_scatter_unused_params(True)  # an expert no token on this rank chose still takes part
    register_fsdp_forward_method(model, "hidden")
    return model


STATE_FILE = "train_state.pt"  # in the state folder, beside the shards: the step, the clock, the sampler, the record


def save_state(path: Path, model: Transformer, opt: torch.optim.Optimizer, state: dict):
    """The training state as a folder: every rank writes its shards of the trainable weights and
    their Adam moments (torch.distributed.checkpoint, by name, so any number of ranks can read
    them back), rank 0 the rest (`state`: step, clock, sampler, settings, record) into
    STATE_FILE. Written beside `path` and put in place when complete: a crash while saving leaves
    the previous state whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    tmp = path.with_name(f".{path.name}.tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save cut short earlier
    dist.barrier()
    weights, moments = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    try:
        dcp.save({"model": weights, "optim": moments}, checkpoint_id=tmp)
    except CheckpointException as e:  # not an Exception: name what failed (disk full, no permission)
        raise OSError(f"could not save the training state in {tmp}: {_first_failure(e)}") from None
    if dist.get_rank() == 0:
        torch.save(state, tmp / STATE_FILE)
        put_in_place(tmp, path)
    dist.barrier()


def _first_failure(e: BaseException) -> str:
    """One line from a torch.distributed.checkpoint failure (it gathers every rank's traceback)."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]  # (exception, traceback summary) of the first rank that failed
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


def read_state(path: Path) -> dict:
    """STATE_FILE of a state folder (save_state); UserError if it is not one."""
    try:
        state = torch.load(path / STATE_FILE, weights_only=False)
        assert isinstance(state, dict) and isinstance(state.get("settings"), dict)
    except Exception:  # anything torch.load can raise on a file that is not a state
        raise UserError(f"--resume: {path} is not a training state of finetune.py") from None
    return state


def load_state(path: Path, model: Transformer, opt: torch.optim.Optimizer):
    """The trainable weights and Adam moments of save_state into the sharded `model` and `opt`,
    resharded for this world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    options = StateDictOptions(ignore_frozen_params=True)
    weights, moments = get_state_dict(model, opt, options=options)
    try:
        dcp.load({"model": weights, "optim": moments}, checkpoint_id=path)
    except (CheckpointException, Exception) as e:  # DCP's is a BaseException; it names what is missing
        raise UserError(f"--resume: {path} does not fit this model and optimizer ({_first_failure(e)})") from None
    # the frozen weights are not in the state (they are the checkpoint's): not strict about them
    set_state_dict(model, opt, model_state_dict=weights, optim_state_dict=moments,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def gathered(model: Transformer) -> dict:
    """The whole state dict of a sharded model on rank 0's CPU (empty on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------- the script

def main():
    args = parse_args()
    rank, world, device = init_distributed(pick_device(args.device))  # a group of one without torchrun
    if args.threads:  # init_distributed shares the cores between the ranks; an explicit --threads wins
        torch.set_num_threads(args.threads)
    job = prepare(args, rank, world, device)
    run_ = build(job)
    train(job, run_)
    whole = gathered(run_.student)  # a collective: every rank takes part, rank 0 receives
    run_.student = run_.teacher = run_.opt = run_.params = None  # freed before the folder is written
    if rank == 0:
        write(job, run_, whole)
        summary(job, run_)


SETTINGS = ("ckpt", "teacher", "text", "tokens", "minutes", "seq_len", "batch", "lr", "weight_decay",
            "ce_weight", "trainable", "seed", "tpla")  # what a state keeps, and --resume continues with


@dataclass
class Job:
    """What a run is, settled before any model is loaded: its settings (args; on --resume the saved
    ones), where it runs, what it reads and writes, its data."""
    args: argparse.Namespace
    rank: int
    world: int
    device: str
    dtype: torch.dtype  # what the matmuls compute in (bf16: autocast)
    student_dir: Path
    teacher_dir: Path
    texts: list  # the training text files
    out: Path
    state_path: Path
    state: dict | None  # the saved state --resume continues from
    ids: torch.Tensor  # the training texts' tokens
    evals: dict  # evaluation text name -> ids
    replacing: bool  # out holds an earlier output

    @property
    def autocast(self):
        return torch.autocast(self.device.split(":")[0], dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()

    def say(self, *a, **kw):
        if self.rank == 0:
            print(*a, **kw)


@dataclass
class Run:
    """The models and the moving parts of the training loop, on this rank."""
    student: Transformer  # sharded over the ranks (shard), latent norms unfolded
    teacher: Transformer
    params: list  # the student's trainable parameters
    opt: torch.optim.Optimizer
    gen: torch.Generator  # the window sampler, the same on every rank
    unfolded: list  # the latent norms unfold() took out, to fold back
    rows: slice  # this rank's windows of each global batch
    report: dict
    step: int = 0
    elapsed: float = 0.0  # seconds trained, sessions before this one included
    rng: torch.Tensor | None = None  # the sampler's state at the start of the step now running
    session_steps: int = 0
    session_s: float = 0.0

    def snapshot(self, args: argparse.Namespace, world: int) -> dict:
        """What save_state keeps beside the weights: the run as of its last finished step."""
        return {"settings": {k: getattr(args, k) for k in SETTINGS}, "step": self.step, "elapsed": self.elapsed,
                "rng": self.rng if self.rng is not None else self.gen.get_state(), "unfolded": self.unfolded,
                "report": self.report, "world_size": world}


def prepare(args: argparse.Namespace, rank: int, world: int, device: str) -> Job:
    """Every check and every path before a model is loaded; the training and evaluation tokens."""
    check_values(args)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, None: default_dtype(device)}.get(args.dtype)
    if dtype is None:
        raise UserError(f"--dtype {args.dtype}: choose bfloat16 or float32")
    student_dir, teacher_dir, texts = first_on_rank_0(resolve_paths, args)  # it may convert and fetch
    out = Path(args.out) if args.out else student_dir.parent / f"{student_dir.name}-ft"
    state_path = Path(args.state) if args.state else out.with_name(out.name + ".state")
    state = resumed_state(args, state_path) if args.resume else None
    if state:  # the run continues with its saved settings
        student_dir, teacher_dir, texts = first_on_rank_0(resolve_paths, args)
    check_batch(args, world)
    inputs = [student_dir, teacher_dir, *texts, *eval_paths(args)]
    check_output_file(state_path, inputs, "--state", kind="state")  # it is written over as training goes
    check_output(out, [*inputs, state_path])
    from tokenizer import load_tokenizer
    tok = load_tokenizer(student_dir)
    ids = training_ids(texts, tok)
    if len(ids) <= args.seq_len + 1:
        raise UserError(f"the training text has {len(ids)} tokens, too few for --seq-len {args.seq_len}")
    evals = {Path(e).stem: tok.encode(read_text(e))[: args.eval_tokens] for e in eval_paths(args)}
    for name, e in evals.items():
        if len(e) < args.eval_ctx:
            raise UserError(f"--eval-text {name}: {len(e)} tokens, fewer than one window of --eval-ctx {args.eval_ctx}")
    return Job(args, rank, world, device, dtype, student_dir, teacher_dir, texts, out, state_path, state, ids, evals,
               earlier_output(out))


def check_values(args: argparse.Namespace):
    for name, value in (("--tokens", args.tokens), ("--seq-len", args.seq_len), ("--batch", args.batch),
                        ("--save-every", args.save_every), ("--eval-ctx", args.eval_ctx)):
        if value < 1:
            raise UserError(f"{name} must be positive")
    if args.minutes < 0 or args.lr <= 0:
        raise UserError("--minutes must be >= 0 and --lr positive")


def check_batch(args: argparse.Namespace, world: int):
    """The global batch against the ranks and --tpla (after --resume: the saved settings')."""
    if args.batch % world:
        raise UserError(f"--batch {args.batch} does not split over {world} ranks: give a multiple of the world size")
    if args.tpla > 1 and args.batch < 2:
        raise UserError("--tpla needs --batch 2 or more: half the windows train the TPLA form, half the MLA form")


def resumed_state(args: argparse.Namespace, state_path: Path) -> dict:
    """The state --resume continues from (read_state), its saved settings put into args (a setting
    added since that state was saved: its default)."""
    if not state_path.exists():
        raise UserError(f"--resume: no state folder {state_path}")
    if not state_path.is_dir():
        raise UserError(f"--resume: {state_path} is not a training state of finetune.py (a file)")
    state = read_state(state_path)
    keep(state_path, f"the state in {state_path}, as it was (continue with --resume)")
    for k in SETTINGS:
        setattr(args, k, state["settings"].get(k, parser().get_default(k)))
    return state


def build(job: Job) -> Run:
    """Both models whole on this rank's device, then sharded over the ranks (shard): the student
    all float32 (FSDP2 gathers one dtype per unit), computed in bf16 through its policy on GPUs or
    autocast; the optimizer; the saved state on --resume, else the perplexities before training."""
    args, device = job.args, job.device
    teacher, _ = load_model(job.teacher_dir, device=device, dtype=job.dtype)
    teacher.requires_grad_(False)
    if teacher.args.vocab_size != CheckpointReader(job.student_dir).args.vocab_size:
        raise UserError(f"the teacher's vocabulary ({teacher.args.vocab_size}) differs from the student's")
    teacher = shard(teacher, device)
    T = args.seq_len
    probe = job.ids[: min(len(job.ids) // T, 4) * T].view(-1, T).to(device)  # fixed windows: unfold measures the latent here
    student, unfolded, _ = load_student(job.student_dir, device, torch.float32, args.trainable, probe,
                                        job.state["unfolded"] if job.state else None)
    names = trainable_names(student, args.trainable)
    gpu_bf16 = torch.bfloat16 if device.startswith("cuda") and job.dtype == torch.bfloat16 else None
    student = shard(student, device, gpu_bf16, recompute_activations(args.checkpoint_activations, job.world, device))
    params = [p for name, p in student.named_parameters() if name in names]  # the norms unfolded have gone
    b = args.batch // job.world
    run_ = Run(student, teacher, params, optimizer(student, params, args.lr, args.weight_decay),
               torch.Generator().manual_seed(args.seed), unfolded, slice(job.rank * b, (job.rank + 1) * b), {"before": {}})
    if job.state:
        load_state(job.state_path, student, run_.opt)
        run_.gen.set_state(job.state["rng"])
        run_.step, run_.elapsed, run_.report = job.state["step"], job.state["elapsed"], job.state["report"]
        job.say(f"resuming at step {run_.step} of {total_steps(args)} ({run_.elapsed / 60:.1f} min trained) from "
                f"{job.state_path}" + (f" on {job.world} ranks" if job.world > 1 else ""), file=sys.stderr)
    elif job.evals:
        run_.report["before"] = {"teacher": perplexities(teacher, job, "the teacher"),
                                 "student": perplexities(student, job, "the student")}
    if args.tpla > 1:  # odd windows of the global batch: MLA-form prefill of the first half, TPLA-form decode of the second
        rows = [i - run_.rows.start for i in range(run_.rows.start, run_.rows.stop) if i % 2]
        tpla.simulate(student, args.tpla, start=T // 2, rows=torch.tensor(rows, dtype=torch.long, device=device))
    job.say(header(job, run_), file=sys.stderr)
    return run_


def header(job: Job, run_: Run) -> str:
    """The line that says what the run will do."""
    args = job.args
    n_train = sum(p.numel() for p in run_.params)  # the whole weights' sizes (each rank holds 1 / world of them)
    b = run_.rows.stop - run_.rows.start
    return (f"student {job.student_dir}, teacher {job.teacher_dir}; training {n_train / 1e6:.1f}M weights "
            f"({args.trainable}, {len(run_.unfolded)} latent norms unfolded) on {len(job.ids):,} tokens of "
            f"{', '.join(t.name for t in job.texts)}; {total_steps(args)} steps of {args.batch} x {args.seq_len} tokens"
            + (f" or {args.minutes:g} min, whichever ends first" if args.minutes else "")
            + (f", {b} window{'s' if b > 1 else ''} per rank on {job.world} ranks (FSDP2)" if job.world > 1 else ""))


def total_steps(args: argparse.Namespace) -> int:
    return max(1, args.tokens // (args.batch * args.seq_len))


def train(job: Job, run_: Run):
    """The training loop: a step at a time until the tokens or the time budget are spent (a step
    that would end past the budget is not started), the state saved every --save-every steps and
    at the end. Ctrl-C or SIGTERM: the state saved (one process; ranks stopped at different
    points cannot save together, so theirs is the last --save-every), and the run ends."""
    args, budget = job.args, job.args.minutes * 60
    steps = total_steps(args)

    def done() -> float:  # the share of the run behind us: whichever of the tokens and the time budget ends it
        return min(1.0, max(run_.step / steps, run_.elapsed / budget if budget else 0.0))
    bar = progress_bar(total=1.0, initial=done(), disable=job.rank != 0, desc="distill",
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
    t_session, kl_ema, last_step_s = time.perf_counter(), None, 0.0
    run_.student.train()
    try:
        while run_.step < steps and not (budget and run_.elapsed + last_step_s > budget):
            lr = lr_at(run_.step, done(), args.lr)
            kl, ce, last_step_s = train_step(job, run_, lr)
            kl_ema = kl if kl_ema is None else 0.9 * kl_ema + 0.1 * kl
            bar.set_postfix(step=run_.step, kl=f"{kl_ema:.4f}", ce=f"{ce:.3f}", lr=f"{lr:.1e}", refresh=False)
            bar.update(done() - bar.n)
            if run_.step % args.save_every == 0:
                save_state(job.state_path, run_.student, run_.opt, run_.snapshot(args, job.world))
    except KeyboardInterrupt:
        bar.close()
        if job.world == 1:
            save_state(job.state_path, run_.student, run_.opt, run_.snapshot(args, job.world))
            keep(job.state_path, f"the state at step {run_.step} in {job.state_path} (continue with --resume)")
        elif job.state_path.is_dir():
            keep(job.state_path, f"the state saved last in {job.state_path} (continue with --resume)")
        raise
    bar.update(1.0 - bar.n)  # the run is done: by its tokens or by its time budget
    bar.close()
    run_.session_s = time.perf_counter() - t_session
    run_.report["train_peak_rss_mb"] = round(peak_rss_mb())  # this rank's, loading and training
    if job.device.startswith("cuda"):
        run_.report["train_peak_device_mb"] = round(torch.cuda.max_memory_allocated(job.device) / 2**20)
    save_state(job.state_path, run_.student, run_.opt, run_.snapshot(args, job.world))
    keep(job.state_path, f"the trained state in {job.state_path} (the folder is not written: --resume writes it)")


def train_step(job: Job, run_: Run, lr: float) -> tuple[float, float, float]:
    """One optimizer step on this rank's windows of the next global batch; returns the KL and CE over
    the global batch and the step's seconds on rank 0's clock (so the time budget stops every rank
    at the same step)."""
    t0 = time.perf_counter()
    run_.rng = run_.gen.get_state()  # a run stopped before the optimizer steps resumes at this step's start
    x, y = batch(job.ids, job.args.batch, job.args.seq_len, run_.gen)
    for g in run_.opt.param_groups:
        g["lr"] = lr * g["scale"]
    kl, ce = distill_step(run_.student, run_.teacher, x[run_.rows].to(job.device), y[run_.rows].to(job.device),
                          job.args.ce_weight, job.autocast)
    for g in run_.opt.param_groups:  # gradients as the unscaled weights would have them (see optimizer)
        for p in g["params"] if g["scale"] != 1 else ():
            if p.grad is not None:  # an expert no token chose has none
                p.grad.mul_(g["scale"])
    torch.nn.utils.clip_grad_norm_(run_.params, 1.0)
    run_.opt.step()
    run_.opt.zero_grad(set_to_none=True)
    run_.step, run_.session_steps, run_.rng = run_.step + 1, run_.session_steps + 1, None  # taken: a stop resumes after it
    summed = torch.tensor([kl, ce, time.perf_counter() - t0 if job.rank == 0 else 0.0], dtype=torch.float64,
                          device=job.device)  # NCCL reduces only GPU tensors
    dist.all_reduce(summed)  # the losses: the mean of the ranks' equal parts
    kl, ce, seconds = summed[0].item() / job.world, summed[1].item() / job.world, summed[2].item()
    run_.elapsed += seconds
    run_.report.setdefault("loss", []).append([run_.step, float(f"{kl:.7g}"), float(f"{ce:.7g}")])
    return kl, ce, seconds


def write(job: Job, run_: Run, whole: dict):
    """Rank 0: the trained weights, folded back into convert.py's form, as a stock folder like the
    student's (writer.write_model), evaluated where it stands before it is put in place; then the
    state folder goes, unless --keep-state."""
    args = job.args
    record = {"teacher": str(job.teacher_dir), "texts": [str(t) for t in job.texts],
              "tokens": run_.step * args.batch * args.seq_len, "steps": run_.step, "seq_len": args.seq_len,
              "batch": args.batch, "lr": args.lr, "schedule": "warm-up + cosine", "ce_weight": args.ce_weight,
              "trainable": args.trainable, "dtype": str(job.dtype).removeprefix("torch."),
              "minutes": round(run_.elapsed / 60, 2), "tpla": args.tpla, "world_size": job.world}
    tokens_per_s = run_.session_steps * args.batch * args.seq_len / max(run_.session_s, 1e-9)
    run_.report.update(record, out=str(job.out), tokens_per_s=round(tokens_per_s, 1))
    trained, _, _ = load_student(job.student_dir, "cpu", torch.float32, "all", None, run_.unfolded)
    trained.load_state_dict(whole)
    del whole
    fold(trained, run_.unfolded)

    def finish(folder: Path) -> dict:
        """The report, written into the folder before it is put in place (evaluated on it where it stands)."""
        if job.evals:
            model, _ = load_model(folder, device=job.device, dtype=job.dtype)
            run_.report["after"] = perplexities(model, job, "the trained student")
            if args.tpla > 1:  # the second half of every window by TPLA decode, as bench.py --ppl --tp tpla scores it
                tpla.simulate(model, args.tpla, start=args.eval_ctx // 2)
                run_.report["after_tpla"] = perplexities(model, job, f"TPLA x{args.tpla}")
        run_.report["peak_rss_mb"] = round(peak_rss_mb())  # writing and evaluating included
        return {"finetune_report.json": json.dumps(run_.report, indent=1) + "\n"}

    write_model(trained, job.student_dir, job.out, CheckpointReader(job.student_dir).stored_dtype(),
                {"finetune": record}, inputs=[job.teacher_dir, *job.texts, job.state_path], finish=finish)
    if not args.keep_state:
        shutil.rmtree(job.state_path, ignore_errors=True)


def summary(job: Job, run_: Run):
    args, report, world = job.args, run_.report, job.world
    losses = report.get("loss", [])
    n = max(1, min(10, len(losses) // 2))  # first and last n steps, never the same ones
    first_kl = sum(l[1] for l in losses[:n]) / max(1, len(losses[:n]))
    last_kl = sum(l[1] for l in losses[-n:]) / max(1, len(losses[-n:]))
    tokens = run_.step * args.batch * args.seq_len
    rows = [("steps x tokens", f"{run_.step} x {args.batch * args.seq_len} = {tokens:,} tokens in "
                               f"{run_.elapsed / 60:.1f} min" + (f" on {world} ranks" if world > 1 else "")),
            ("tokens / s (this session)", f"{report['tokens_per_s']}"),
            (f"KL, first -> last {n} steps" if len(losses) > 1 else "KL (one step)",
             f"{first_kl:.4f} -> {last_kl:.4f}" if len(losses) > 1 else f"{first_kl:.4f}")]
    for name in job.evals:
        before = report["before"].get("student", {}).get(name)
        rows.append((f"perplexity {name} (first {len(job.evals[name])} tokens)",
                     f"teacher {report['before'].get('teacher', {}).get(name)}, student {before} -> {report['after'][name]}"))
        if "after_tpla" in report:
            rows.append((f"  ... TPLA x{args.tpla} decode (simulated)", f"{report['after_tpla'][name]}"))
    rows.append(("peak memory", f"{report['train_peak_rss_mb']} MB training, {report['peak_rss_mb']} MB overall"
                                + (f"; {report['train_peak_device_mb']} MB on {job.device}" if "train_peak_device_mb" in report
                                   else "") + (" (rank 0)" if world > 1 else "")))
    rows.append(("written", f"{job.out} (stock {read_config(job.out)['architectures'][0]}"
                            + ("; it replaced the earlier output there)" if job.replacing else ")")
                            + (f"; state kept in {job.state_path}" if args.keep_state else "")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def recompute_activations(asked: bool | None, world: int, device: str) -> bool:
    """--checkpoint-activations, or by default: on GPUs and over several ranks, where the models
    that need it are trained; off in one CPU process, where memory is plenty for the models a CPU
    trains and the recompute costs a tenth of the speed (docs/accuracy.md)."""
    return asked if asked is not None else world > 1 or not device.startswith("cpu")


def default_dtype(device: str) -> torch.dtype:
    """bf16 autocast where matmuls run natively in it (CUDA; CPUs with AVX512-BF16 or AMX): a step
    is faster there than fp32. Elsewhere it is emulated: many times slower (docs/accuracy.md)."""
    if device.startswith("cuda") or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="the MLA checkpoint to fine-tune (default: the embedded model's default "
                                  "conversion, made on first use)")
    p.add_argument("--teacher", help="the original GQA checkpoint (default: the embedded model, or the source "
                                     "named in --ckpt's convert_report.json)")
    p.add_argument("--text", nargs="+", help="training text files, one document per line (default: the "
                                             "calibration split and the Wikipedia training articles)")
    p.add_argument("--tokens", type=int, default=500_000, help="training tokens in all (steps = tokens / (batch * seq-len))")
    p.add_argument("--minutes", type=float, default=30.0, help="time budget for training, evaluation not "
                                                                "included (0: none); the LR decay follows it")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per training window (the perplexity protocol's 1024)")
    p.add_argument("--batch", type=int, default=2, help="windows per step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0: keep the converted weights' scale)")
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of the next-token loss added to the KL")
    p.add_argument("--trainable", choices=("attn", "attn+norms", "all"), default="attn",
                   help="which student weights train: attention only, attention and RMSNorms, or all")
    p.add_argument("--seed", type=int, default=0, help="seed of the window sampler")
    p.add_argument("--tpla", type=int, default=1, metavar="G",
                   help="also train for TPLA decode on G ranks: every second window's second half runs in TPLA "
                        "form (tpla.simulate), the other windows in MLA form (default 1: MLA form only)")
    p.add_argument("--out", help="output folder (default: the checkpoint folder's name + '-ft', beside it)")
    p.add_argument("--state", help="training-state folder for --resume (default: OUT.state beside the output)")
    p.add_argument("--resume", action="store_true", help="continue from the state folder with its saved settings "
                                                         "(on any number of ranks)")
    p.add_argument("--save-every", type=int, default=50, help="save the training state every N steps")
    p.add_argument("--keep-state", action="store_true", help="keep the state folder after a finished run "
                                                             "(default: removed once the output is written)")
    p.add_argument("--checkpoint-activations", action=argparse.BooleanOptionalAction,
                   help="recompute each block's activations in the backward: the memory of one block's activations "
                        "instead of all of them, for a little compute (docs/real_sizes.md; default: on GPUs and "
                        "with several ranks, not in one CPU process)")
    p.add_argument("--eval-text", nargs="+", help="perplexity before and after on these files ('none': skip; "
                                                  "default: the evaluation split and held-out Wikipedia for the "
                                                  "embedded model, none otherwise)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="score only the first N tokens of each eval text")
    p.add_argument("--eval-ctx", type=int, default=1024, help="perplexity window length")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", help="compute dtype: bfloat16 (autocast) or float32 (default: bfloat16 on CUDA and "
                                   "on CPUs with bf16 matmuls, float32 on others)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core; 1 if another job holds a core)")
    return p


def parse_args() -> argparse.Namespace:
    return parser().parse_args()


def resolve_paths(args) -> tuple[Path, Path, list[Path]]:
    """Student, teacher and training texts, with the embedded model's defaults."""
    from fetch import EVAL_TEXT, WIKI_EVAL, ensure_texts, ensure_wiki_texts
    if args.ckpt:
        student = find_checkpoint(args.ckpt)
    else:
        student = ensure_default_conversion()
    if args.teacher:
        teacher = find_checkpoint(args.teacher)
    elif not args.ckpt:
        teacher = default_or(None)
    else:  # the model it was converted from, if convert.py's report says
        report = student / "convert_report.json"
        source = read_json(report).get("source") if report.is_file() else None
        if not source:
            raise UserError(f"{student}: no convert_report.json naming its source model; give --teacher")
        teacher = find_checkpoint(source)
    if args.text:
        texts = [Path(t) for t in args.text]
    else:
        texts = [ensure_texts()[0], ensure_wiki_texts()[0]]
    held_out = {EVAL_TEXT.resolve(), WIKI_EVAL.resolve()} | {Path(e).resolve() for e in args.eval_text or []
                                                             if e != "none"}
    for t in texts:
        if not t.is_file():
            raise UserError(f"--text {t}: no such file")
        if t.resolve() in held_out:
            raise UserError(f"--text {t}: that is an evaluation text; training on it would void the evaluation")
    return student, teacher, texts


def eval_paths(args) -> list[Path]:
    if args.eval_text:
        return [] if args.eval_text == ["none"] else [Path(e) for e in args.eval_text]
    if args.ckpt:
        return []
    from fetch import ensure_texts, ensure_wiki_texts
    return [ensure_texts()[1], ensure_wiki_texts()[1]]


def perplexities(model: Transformer, job: "Job", what: str) -> dict:
    """Perplexity of `model` on each evaluation text, a progress bar each on stderr (rank 0's)."""
    with job.autocast:
        return {name: round(perplexity(model, ids, job.args.eval_ctx,
                                       WindowBar(f"perplexity of {what}, {name}", job.rank != 0))["ppl"], 3)
                for name, ids in job.evals.items()}


if __name__ == "__main__":
    run(main)
