"""Writing a Hugging Face checkpoint folder, without ever costing the user a file.

    with CheckpointWriter(out, config, args, inputs=[source]) as w:   # out checked here, before any work
        w.add(...); w.add_layer(...)                                   # tensor by tensor, to a hidden sibling
        w.commit(source=source)                                        # read back, then swapped into place

- check_output / check_output_file: the --out (--state, --json) every writing script asks about
  before it starts: never an input, a folder holding one or inside one, and never a folder this
  project did not write, or has had files added since (MARKER lists what it wrote).
- CheckpointWriter: tensors stream to disk one at a time into .NAME.transmla-HOST-PID-XXXX; stage()
  finishes the folder there and reads it back as any checkpoint is read (every tensor its config
  declares, nothing it does not); commit() swaps it into place in one step (renameat2
  RENAME_EXCHANGE), so a crash or kill -9 at any moment leaves the old folder or the new one.
- write_model: a model loaded from a checkpoint and then changed (fine-tuned, rotated), written
  as a folder like its source.
- write_random_checkpoint: a folder of a real model's shape with random weights, for measuring
  speed and memory at sizes nothing here can download.
"""
import ctypes
import errno
import json
import math
import os
import re
import shutil
import socket
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from checkpoint import (INDEX, SAFETENSORS_DTYPES, STACKED_EXPERTS, CheckpointReader, args_from_config,
                        checkpoint_tensors, float32_or, hf_name, read_config, rope_rows)
from cli import UserError, read_json, remove_temporary, temporary_folder
from model import ModelArgs


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model", "chat_template.jinja")
MARKER = "transmla_output.json"  # in every folder this project writes: by what, from what, when, which files


def _overlaps(path: Path, inputs, flag: str):
    """UserError if `path` is one of the inputs, holds one or lies inside one."""
    where = path.resolve()
    for src in inputs:
        src_path = Path(src).resolve()
        if where == src_path or where in src_path.parents:
            raise UserError(f"{flag} {path} {'is' if where == src_path else 'contains'} the input {src}: "
                            "writing there would replace it; choose a new path")
        if src_path in where.parents:
            raise UserError(f"{flag} {path} lies inside the input {src}; choose a path outside it")


def _creatable(path: Path, flag: str):
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot create anything in {parent}")


def check_output(out: str | Path, inputs=()) -> Path:
    """The folder a script is about to write, refused in one line (UserError) before any work if
    writing it could cost the user a file: `out` is one of the `inputs` (checkpoints, texts, state
    files), contains one or lies inside one, or holds the current folder; it exists and is a
    file, a symbolic link or a mount point; it is a folder that is not empty and that this project
    did not write, or that holds files besides those it wrote (MARKER lists them: a note, a
    .git, a model written into it later would be lost); nothing can be created where it would go.
    Returns the folder as an absolute path. A folder we wrote earlier, untouched, is replaced
    atomically by CheckpointWriter.commit()."""
    out = Path(os.path.abspath(out))
    _overlaps(out, inputs, "--out")
    if out == Path.cwd() or out in Path.cwd().parents:
        raise UserError(f"--out {out} holds the current folder; give a folder outside it")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} exists and is {'a symbolic link' if out.is_symlink() else 'a file'}: "
                        "give a folder to create")
    if out.is_dir() and os.path.ismount(out):
        raise UserError(f"--out {out} is a mount point, which cannot be replaced: give a folder inside it")
    present = set(os.listdir(out)) if out.is_dir() else set()
    if present and MARKER not in present:
        raise UserError(f"--out {out} exists and was not written by this project (no {MARKER} in it): "
                        "choose a new folder, or empty this one yourself")
    if present:
        written = _written_files(out)
        extra = sorted(present - written - {MARKER})
        if extra:
            raise UserError(f"--out {out} holds files this project did not write there ({', '.join(extra[:3])}"
                            f"{' ...' if len(extra) > 3 else ''}): move them out, or choose a new folder")
    _creatable(out, "--out")
    return out


def earlier_output(out: str | Path) -> bool:
    """Whether `out` holds an earlier output of this project (its MARKER): after check_output, the
    folder the new one will replace (an empty folder replaces nothing)."""
    return (Path(out) / MARKER).is_file()


def _written_files(folder: Path) -> set[str]:
    marker = folder / MARKER
    try:
        files = read_json(marker)["files"]
        assert isinstance(files, list) and all(isinstance(f, str) for f in files)
        return set(files)
    except (UserError, KeyError, TypeError, AssertionError):  # unreadable, not JSON, not what we wrote
        raise UserError(f"--out {folder}: its {MARKER} is damaged, so what else the folder holds is "
                        "unknown; choose a new folder, or empty this one yourself") from None


def check_output_file(path: str | Path, inputs=(), flag: str = "--json", kind: str | None = None) -> Path:
    """A file a script is about to write (a report, a training state), refused in one line before any
    work: it is an input, holds one or lies inside one (a checkpoint folder); it is a folder; or it
    exists and is not of `kind` ("state": finetune.py's folder of torch.distributed.checkpoint
    shards, its .metadata index and train_state.pt in it, written over as training goes)."""
    path = Path(os.path.abspath(path))
    _overlaps(path, inputs, flag)
    if kind == "state":  # finetune.py's: torch.distributed.checkpoint's .metadata beside its train_state.pt
        if path.is_symlink() or (path.exists() and not (path.is_dir() and (path / ".metadata").is_file()
                                                        and (path / "train_state.pt").is_file())):
            raise UserError(f"{flag} {path} exists and is not a training state: choose another name")
    elif path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    _creatable(path, flag)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 with RENAME_EXCHANGE: at every moment
    each name holds one of the two folders). False where the system or filesystem has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriter:
    """Writes a Hugging Face folder atomically and tensor by tensor: each tensor's bytes go
    straight to disk (a shard's data file; the shard gets its header when it closes), so memory
    holds one tensor at a time. Everything lands in a temporary sibling folder,
    .NAME.transmla-HOST-PID-XXXX, that takes the place of `folder` only in commit(). Use it as a
    context manager: an error, Ctrl-C or SIGTERM before commit() leaves nothing behind; a kill -9
    leaves the temporary folder, which the next writer of the same folder removes. (Where the
    filesystem cannot swap two folders in one step, commit() renames twice; a kill between the
    two leaves the earlier output as .NAME.transmla-HOST-PID-XXXX-old, and the next writer of the
    folder puts it back.)

    `inputs` are the files and folders the run reads: check_output refuses a `folder` that could
    touch them (and any other folder that is not ours to replace) before anything is written."""

    def __init__(self, folder: str | Path, config: dict, args: ModelArgs, inputs=(), max_shard_bytes: int = 2 << 30):
        self.folder, self.inputs = check_output(folder, inputs), list(inputs)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        # the host in the name: on a shared filesystem, a process id says nothing about another machine's
        prefix = f".{self.folder.name}.transmla-{re.sub(r'[^A-Za-z0-9]', '', socket.gethostname())[:24]}-"
        for old in sorted(self.folder.parent.iterdir()):  # left by a writer of this folder that was killed
            rest = old.name[len(prefix):]
            if not old.name.startswith(prefix) or not rest.split("-")[0].isdigit() or _alive(int(rest.split("-")[0])):
                continue
            if rest.endswith("-old") and not self.folder.exists():
                os.replace(old, self.folder)  # killed between commit's two renames: the earlier output goes back
            else:
                shutil.rmtree(old, ignore_errors=True)
        self.tmp = temporary_folder(f"{prefix}{os.getpid()}-", self.folder.parent)
        self.config, self.args = config, replace(args, extra=config)
        self.max_shard_bytes, self.shards, self.header, self.data = max_shard_bytes, [], {}, None
        self.staged, self.source = False, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.data:
            self.data.close()
        remove_temporary(self.tmp)

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
                self.add(f"layers.{i}.{k}", t.to(float32_or(k, dtype)))
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
            if t.is_floating_point() and not torch.isfinite(t).all():  # never a file that computes NaN
                hint = " (float16 holds at most 65504: use --dtype bfloat16 or float32)" if dtype == torch.float16 else ""
                raise UserError(f"{theirs} would hold NaN or infinite values{hint}; nothing is written")
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

    def stage(self, source: Path | None = None, extra_files: dict | None = None) -> Path:
        """Finish the folder where it is, still under its temporary name, and check it: close the last
        shard, write the index and config.json, copy the tokenizer files from `source`. The
        folder is then read back as any checkpoint is (CheckpointReader.check): every tensor its
        config declares is there with its shape, and none is without a place in it. Returns the
        temporary folder, complete and loadable (to evaluate it before commit(), say)."""
        self._close_shard()
        n, weight_map = len(self.shards), {}
        for k, (name, keys) in enumerate(self.shards):
            final = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / name, self.tmp / final)
            weight_map.update({key: final for key in keys})
        self.source = source
        files = {"config.json": json.dumps(self.config, indent=2) + "\n", **(extra_files or {})}
        if n > 1:
            files[INDEX] = json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        for name, text in files.items():
            (self.tmp / name).write_text(text, encoding="utf-8")
        for name in TOKENIZER_FILES if source else ():
            if (source / name).is_file():
                shutil.copy2(source / name, self.tmp / name)
        try:
            CheckpointReader(self.tmp).check()
        except UserError as e:
            raise UserError(f"not written, the folder would be inconsistent: {str(e).replace(str(self.tmp), str(self.folder))}") from None
        self.staged = True
        return self.tmp

    def commit(self, source: Path | None = None, extra_files: dict | None = None):
        """stage() if not done yet, add `extra_files` (name -> text), then put the folder in place in one
        step: an earlier output at `folder` (ours: check_output is asked again) is swapped out and
        then removed, so a kill at any moment leaves the old folder or the new one, whole."""
        if not self.staged:
            self.stage(source)
        for name, text in (extra_files or {}).items():
            (self.tmp / name).write_text(text, encoding="utf-8")
        (self.tmp / MARKER).write_text(json.dumps({  # last: what check_output lets the next run replace
            "written_by": Path(sys.argv[0]).name, "source": str(self.source) if self.source else None,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": sorted(os.listdir(self.tmp))}, indent=2) + "\n", encoding="utf-8")
        for f in self.tmp.iterdir():  # on disk before the rename makes them visible (a power cut)
            _fsync(f)
        os.chmod(self.tmp, 0o755)  # mkdtemp made it private; the result is an ordinary folder
        check_output(self.folder, self.inputs)
        put_in_place(self.tmp, self.folder)


def put_in_place(staged: Path, folder: Path):
    """Move the complete folder `staged` to `folder` in one step: an earlier `folder` is swapped out
    and then removed, so a kill at any moment leaves the old folder or the new one, whole."""
    if folder.is_dir() and _exchange(staged, folder):
        shutil.rmtree(staged, ignore_errors=True)  # the old folder, now under the staged name
    else:  # no earlier folder, or no atomic exchange here: the old one waits aside until the new one is in
        old = staged.with_name(staged.name + "-old")
        if folder.is_dir():
            os.replace(folder, old)
        os.replace(staged, folder)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(folder.parent)


def write_model(model, source: Path, out: Path, dtype: torch.dtype, record: dict, inputs=(), finish=None):
    """A model loaded from `source` and then changed (fine-tuned, rotated) as a stock folder like
    its source: the source's config plus `record` (what was done to it), its tokenizer files.
    `inputs`: what else the run read (check_output). finish(folder), if given, runs on the complete
    folder before it is put in place and returns extra files to add (name -> text): a report."""
    config = {k: v for k, v in read_config(source).items() if k != "quantization_config"}  # written dequantized
    config.update(torch_dtype=str(dtype).removeprefix("torch."), **record)
    args = CheckpointReader(source).args
    config["tie_word_embeddings"] = args.tie_embeddings  # False where the source's head was trained apart
    state = model.state_dict()
    with CheckpointWriter(out, config, args, inputs=[source, *inputs]) as writer:
        for name in ("tok_embeddings", "norm") + (() if args.tie_embeddings else ("output",)):
            writer.add(f"{name}.weight", state[f"{name}.weight"].to(dtype))
        for i in range(args.n_layers):
            p = f"layers.{i}."
            writer.add_layer(i, {k[len(p):]: v for k, v in state.items() if k.startswith(p)}, dtype)
        staged = writer.stage(source=source)
        writer.commit(extra_files=finish(staged) if finish else None)


def write_random_checkpoint(out: Path, config: dict, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            std: float = 0.02, tokenizer_from: Path | None = None):
    """A checkpoint of `config` (a config.json as a dict) with random weights: matrices N(0, std^2),
    norm weights 1, biases and the router's correction bias 0. Written tensor by tensor (memory: one
    tensor), with the tokenizer files of `tokenizer_from` if given. For timing and memory at a real
    model's shape; its outputs mean nothing."""
    args = args_from_config(config)
    g = torch.Generator().manual_seed(seed)
    with CheckpointWriter(out, {**config, "torch_dtype": str(dtype).removeprefix("torch.")}, args) as writer:
        for ours, (_, shape) in checkpoint_tensors(args).items():
            if ours.endswith("norm.weight"):
                t = torch.ones(shape)
            elif len(shape) == 1:
                t = torch.zeros(shape)
            else:
                t = torch.empty(shape).normal_(0, std, generator=g)
            writer.add(ours, t.to(float32_or(ours, dtype)))
        writer.commit(tokenizer_from)
