"""What every script's command line shares: the rules for failing, and the device and dtype flags.

- UserError: a mistake in what the user asked for, or a file we cannot use; read_text and
  read_json read a file or say in one line why they cannot.
- run(main): how a script fails. A UserError, an OSError (disk full, permission denied), running
  out of memory or a closed standard output is one line on stderr and exit 1; SIGTERM unwinds like Ctrl-C (so
  temporary folders go), exit 143; anything else is a bug and keeps its traceback. Under torchrun
  a rank that fails leaves at once, and the job ends within seconds with one line from it.
- temporary_folder, remove_temporary: a scratch folder that goes however the process ends, short
  of kill -9 (a signal between its making and the code that would remove it included).
- pick_device, pick_dtype: --device and --dtype, with defaults that suit the hardware.
- progress_bar: a tqdm bar on stderr whose clock moves while a long item runs; a line every
  LOG_INTERVAL seconds instead where stderr is a file or a pipe.
- init_distributed, leave_process_group: join torchrun's process group (or make one of a single
  rank, so one process runs the same code) and leave it; first_on_rank_0: what one rank makes
  for all (the default conversion) made once.
"""
import atexit
import json
import os
import shutil
import secrets
import signal
import sys
import threading
import time
import weakref
from pathlib import Path

import torch


class UserError(Exception):
    """A mistake in what the user asked for, or a file we cannot use: run() prints it as one line
    and exits 1."""


class FailedElsewhere(Exception):
    """Another rank failed and said why: this one exits 1 without a word of its own."""


def read_text(path: str | Path) -> str:
    """A text file as UTF-8; UserError in one line where it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a text file") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start} cannot be decoded)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None


def read_json(path: Path, data: bytes | None = None):
    """A JSON file (or its bytes), or UserError in one line: unreadable, not UTF-8, not JSON, or JSON
    that Python refuses (integers of thousands of digits, nesting thousands deep)."""
    try:
        return json.loads((data if data is not None else path.read_bytes()).decode("utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: not valid JSON ({str(e)[:120]})") from None


_TEMPORARY: set[Path] = set()  # scratch folders this process made and has not removed yet


def temporary_folder(prefix: str, parent: Path) -> Path:
    """A new private folder parent/PREFIXxxxxxxxx, removed at exit if still there (Ctrl-C, SIGTERM,
    an error), or by remove_temporary. Its name is recorded before the folder is made, so a signal
    at any instant leaves nothing that exit does not remove. (Blocking the signals around mkdtemp
    does not do it: torch's threads do not block them, and the kernel may hand a signal sent to the
    process to one of them.) Raises OSError when parent cannot hold it."""
    for _ in range(100):
        folder = Path(parent) / f"{prefix}{secrets.token_hex(4)}"
        _TEMPORARY.add(folder)
        try:
            os.mkdir(folder, 0o700)
            return folder
        except FileExistsError:  # someone else's: not ours to remove
            _TEMPORARY.discard(folder)
        except OSError:  # nothing was made (a Ctrl-C is no OSError: the folder may exist, keep its record)
            _TEMPORARY.discard(folder)
            raise
    raise OSError(f"{parent}: cannot make a new temporary folder there")


def remove_temporary(folder: Path) -> None:
    """Remove a folder from temporary_folder (gone already, as after a rename: nothing to do)."""
    shutil.rmtree(folder, ignore_errors=True)
    _TEMPORARY.discard(folder)


@atexit.register
def _remove_temporaries() -> None:
    for folder in list(_TEMPORARY):
        remove_temporary(folder)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (what `top` calls RES, at its highest)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pick_device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return name


def pick_dtype(name: str | None, device: str) -> torch.dtype:
    # fp32 by default on CPU: its bf16 matmuls are slow on most CPUs and the references use fp32
    name = name or ("bfloat16" if device.startswith("cuda") else "float32")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UserError(f"--dtype {name}: choose one of {', '.join(dtypes)}")
    return dtypes[name]


_BARS = weakref.WeakSet()  # the progress bars open in this process: run() closes them before its last line
LOG_INTERVAL = 30.0  # seconds between the lines of a bar written to a file or a pipe (not a terminal)


def progress_bar(**kw):
    """A tqdm bar on stderr (kw: tqdm's). On a terminal it redraws in place, and a daemon thread
    redraws it every second until it is closed (tqdm's close() disables it) or dropped, so its
    clock keeps moving while one long item runs (a layer of an 8B model takes minutes on a CPU).
    Written to a file or a pipe (CI, nohup, a cluster's log), where every redraw would stay in the
    log, it writes a line of its own at most every LOG_INTERVAL seconds, and when it ends. One
    still open when the script ends (an error, Ctrl-C) is closed by run(), so the line that ends
    the run stands on a line of its own."""
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    if not tty:
        kw.setdefault("mininterval", LOG_INTERVAL)
    bar = tqdm(file=sys.stderr if tty else LogLines(sys.stderr), **kw)
    if not bar.disable:
        _BARS.add(bar)
        threading.Thread(target=_redraw, args=(weakref.ref(bar), 1.0 if tty else LOG_INTERVAL),
                         name="progress bar", daemon=True).start()
    return bar


class LogLines:
    """A file for tqdm that is not a terminal: each redraw (tqdm writes a carriage return, the bar
    and spaces over the last one) becomes a line of its own."""

    def __init__(self, file):
        self.file = file

    def write(self, s: str):
        for part in s.split("\r"):
            if part.strip():
                self.file.write(part.rstrip() + "\n")

    def flush(self):
        self.file.flush()


def _redraw(ref, interval: float) -> None:
    """Every `interval` seconds, redraw the bar `ref` points to, unless it drew itself meanwhile,
    until it is closed or gone. It holds no reference across the wait (a dropped bar is collected,
    and closes itself), and it looks at the bar under tqdm's lock, so a bar closed meanwhile is
    never drawn again after its last line."""
    while True:
        time.sleep(interval)
        bar = ref()
        if bar is None:
            return
        with bar.get_lock():
            if bar.disable:
                return
            if time.time() - bar.last_print_t >= interval:  # tqdm's clock of its last line
                bar.refresh(nolock=True)
                bar.last_print_t = time.time()
        del bar


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as Ctrl-C does: temporary folders
    are removed and finetune.py saves its state. (A KeyboardInterrupt, so every handler of Ctrl-C
    handles it too.)"""


def _terminate(signum, frame):
    raise Terminated()


_kept: dict[str, str] = {}


def keep(path, what: str) -> None:
    """Name something at `path` that an interrupted run leaves for the user (finetune.py's saved
    state), in words: run() says it in the one line that ends the run. A later call for the same
    path replaces the words."""
    _kept[str(path)] = what


# how a gloo / NCCL collective fails when a peer process has gone: this rank is not the one that failed
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def run(main) -> None:
    """Run a script's main() under the project's rules for failing:
    - a UserError, an OSError (disk full, permission denied) or running out of memory is one line
      on stderr, exit 1;
    - standard output closed early (`| head`) is one line too, and no flush error after it;
    - SIGTERM unwinds like Ctrl-C (temporary files removed), exit 143; Ctrl-C exits 130; either
      ends in one line saying what was kept (keep());
    - any other exception is a bug: its traceback is what a developer needs.
    Under torchrun each rank that fails says so in one line (ending [rank N]) and leaves at once,
    without waiting for the others: they learn it from their next collective, which breaks, and
    leave without a word, so the job ends within seconds. (A check every rank fails alike is one
    line per rank: a rank cannot tell whether another has said it already; what rank 0 does for
    all, first_on_rank_0, is rank 0's line alone.)"""
    signal.signal(signal.SIGTERM, _terminate)
    rank = int(os.environ["RANK"]) if os.environ.get("RANK", "").isdigit() else 0
    world = os.environ.get("WORLD_SIZE", "1")
    parallel = world.isdigit() and int(world) > 1
    code, line = 0, None
    try:
        main()
    except UserError as e:
        code, line = 1, f"error: {e}"
    except FailedElsewhere:
        code = 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        code, line = 1, "error: standard output was closed before the output was complete (piped into head?)"
    except (OSError, MemoryError) as e:
        code, line = 1, f"error: {e}" if str(e) else f"error: {type(e).__name__}"
    except KeyboardInterrupt as e:
        code = 143 if isinstance(e, Terminated) else 130
        if rank == 0:  # one line for the job: what stopped it, what is left of it
            line = (f"interrupted ({'SIGTERM' if code == 143 else 'Ctrl-C'}): "
                    + "".join(f"kept {what}; " for what in _kept.values()) + "temporary files removed")
    except Exception as e:
        if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
            code, line = 1, f"error: out of memory: {str(e).splitlines()[0][:200]}"
        elif not parallel:
            raise
        else:  # a rank whose peer has gone says nothing: the rank that failed said why
            code, line = 1, None if any(s in str(e) for s in PEER_GONE) else _where_it_failed(e)
    _end(code, line, rank, parallel)


def _where_it_failed(e: Exception) -> str:
    """One line for a bug on one rank of many: the exception and the line of code it came from."""
    where = e.__traceback__
    while where.tb_next:
        where = where.tb_next
    return (f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            f"({Path(where.tb_frame.f_code.co_filename).name}:{where.tb_lineno})")


def _end(code: int, line: str | None, rank: int, parallel: bool) -> None:
    """The end of run(): open bars closed, the one line said, and the process gone with `code`
    (under torchrun at once, not through a barrier that would wait for ranks stuck waiting for it)."""
    import torch.distributed as dist
    for bar in list(_BARS):  # a bar cut short ends its line before ours
        bar.close()
    if line:
        print(f"{line} [rank {rank}]" if parallel else line, file=sys.stderr, flush=True)
    if dist.is_available() and dist.is_initialized():
        if code:
            try:
                sys.stdout.flush()
            except OSError:
                pass
            _remove_temporaries()  # os._exit skips atexit
            os._exit(code)
        leave_process_group()
    if code:
        sys.exit(code)


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


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether torchrun (or anything that sets its whole environment) started this process. A
    job that exports only some of torchrun's variables (a scheduler's WORLD_SIZE=1, an old
    `export`) runs as one process when it asks for one, and is refused in one line when it asks
    for more. Raises UserError for the latter."""
    present = [k for k in TORCHRUN_VARIABLES if k in os.environ]
    if not present:
        return False
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        raise UserError(f"WORLD_SIZE={world!r} in the environment: must be a positive whole number")
    if len(present) == len(TORCHRUN_VARIABLES):
        return True
    if int(world) == 1:
        return False  # one process asked for: run as one, whatever else is missing
    missing = ", ".join(k for k in TORCHRUN_VARIABLES if k not in os.environ)
    raise UserError(f"WORLD_SIZE={world} is set but {missing} not: start the ranks with torchrun "
                    f"(torchrun --nproc-per-node {world} ...), or unset WORLD_SIZE to run one process")


def init_distributed(device: str) -> tuple[int, int, str]:
    """Join torchrun's process group (env://), or make a group of one, so one rank runs the same
    code. gloo on CPU, NCCL on CUDA. Returns rank, world size and this rank's device."""
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if launched():
            dist.init_process_group(backend)
            # every rank connected before any goes on: rank 0 hosts the rendezvous store, and if it
            # failed (and left, cli.run) while a slower rank was still connecting, that rank
            # would print a wall of C++ warnings before failing too
            dist.barrier()
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if device.startswith("cuda"):
        if launched():  # torchrun: each rank its own GPU; one process keeps the one it was given
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    else:  # ranks on one machine share its cores: without this each would start a thread per core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return dist.get_rank(), dist.get_world_size(), device


def first_on_rank_0(fn, *args):
    """fn(*args) on rank 0, then on the other ranks: what it makes on first use (the default
    conversion, the texts, a synthetic checkpoint) is made once, and the others find it made and
    get their own result (their own paths). A UserError on rank 0 reaches every rank: rank 0 says
    it, the others leave without a word (FailedElsewhere), and none waits for a rank that has
    gone. Needs the process group."""
    import torch.distributed as dist
    box = [None]
    if dist.get_rank() == 0:
        try:
            result = fn(*args)
        except UserError as e:
            box = [str(e)]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UserError(box[0]) if dist.get_rank() == 0 else FailedElsewhere(box[0])
    return result if dist.get_rank() == 0 else fn(*args)
