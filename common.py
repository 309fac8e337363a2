"""Small helpers shared by the scripts: errors, device and dtype, atomic writes, data, loading checkpoints.
torch is imported inside the functions that need it: prepare.py uses this module too, and
importing torch would cost it a second and ~300 MB for nothing."""
import contextlib
import ctypes
import json
import os
import sys

import numpy as np


def die(msg):
    """End the run with one readable line on stderr and exit status 1."""
    raise SystemExit(f"error: {msg}")


def get_device(device='auto'):
    """'auto' is cuda, else mps, else cpu; a named device must be one this machine has."""
    import torch
    cuda = [f'cuda:{i}' for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    here = ['cpu'] + (['cuda'] + cuda if cuda else []) + (['mps'] if torch.backends.mps.is_available() else [])
    if device == 'auto':
        return 'cuda' if cuda else 'mps' if 'mps' in here else 'cpu'
    if device not in here:
        known = device in ('cpu', 'cuda', 'mps') or device.startswith('cuda:') and device[5:].isdigit()
        problem = "is not available here" if known else "is not one of auto, cpu, cuda, cuda:N, mps"
        die(f"device={device} {problem}: this machine has {', '.join(here)} (or use --device=auto)")
    return device


def get_dtype(dtype, device_type):
    """The one precision rule of every script. 'auto' is bf16 on GPUs that have it and fp16 on older
    ones (train.py adds a GradScaler); on the CPU bf16 where it has bf16 instructions (AVX512-BF16,
    AMX: ~2.5x fp32 in training, within 0.01 nats/token in eval.py) and fp32 elsewhere (most
    laptops, where bf16 is emulated and >10x slower). --dtype=float32 gives exact figures anywhere."""
    import torch
    if dtype == 'auto':
        if device_type == 'cuda':
            dtype = 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
        elif device_type == 'cpu':
            # torch.cpu's check is private: a torch without it gets the safe fp32
            dtype = 'bfloat16' if getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)() else 'float32'
        else:
            dtype = 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        die(f"dtype={dtype} is not one of auto, float32, bfloat16, float16")
    if dtype == 'float16' and device_type == 'cpu':
        die("dtype=float16 is for GPUs; on the CPU use --dtype=bfloat16 or --dtype=float32")
    return dtype


def keep_freed_memory(device_type):
    """On Linux, make glibc keep freed memory for reuse when the tensors live on the CPU. By default
    it hands big tensors (the logits and their gradients) back to the OS when they are freed, and a
    CPU training step then faults them in again: ~40% of the step; sampling's logits and sampler
    buffers likewise. No mmap, and trim only above 2 GB."""
    if device_type == 'cpu' and sys.platform == 'linux':
        libc = ctypes.CDLL(None)
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def set_threads(threads=0):
    """Compute with `threads` CPU threads (0: torch's default, one per core this process may use); return
    the number used. Processes that each take every core fight over them, their OpenMP threads spinning
    while they wait on each other: on 2 cores two sample.py at once wrote 7-11.5 tokens/s each, against
    57-610 each with one thread apiece. So a script that runs beside another busy one gets its share of the
    cores (--threads=N); OMP_WAIT_POLICY=PASSIVE in the environment (read as torch loads OpenMP, too late to set
    here) stops the spinning too (196-230 tokens/s each)."""
    import torch
    if not (type(threads) is int and threads >= 0):
        die(f"threads must be a whole number >= 0 (0: one per core), got {threads!r}")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def check_compiler(device_type):
    """torch.compile on the CPU builds its kernels with a C++ compiler: say so before the slow start."""
    if device_type == 'cpu':
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
        try:
            get_cpp_compiler()
        except InvalidCxxCompiler:
            die("--compile=True on the CPU needs a C++ compiler (torch.compile builds its kernels with one): "
                "install g++ or clang, or leave compile off")


def compile_for_training(model, device_type):
    """torch.compile a model to train. On the CPU with aten's random numbers for dropout: with inductor's own,
    config/cpu.py's whole step took 1.07x as long on 2 threads, 1.23x on one (docs/performance.md)."""
    import torch
    check_compiler(device_type)
    if device_type == 'cpu':
        import torch._inductor.config
        torch._inductor.config.fallback_random = True
    return torch.compile(model)


def autocast(device_type, dtype):
    """Mixed precision context for forward passes; a no-op for float32."""
    import torch
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=getattr(torch, dtype))


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds,
    so an interrupted write never leaves a truncated file that looks valid."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temps(folder):
    """Remove the temporary files (NAME.tmpPID) that atomic_output leaves behind when its process
    is killed outright (kill -9, out of memory) and whose process no longer runs. Returns their paths."""
    if os.name != 'posix' or not os.path.isdir(folder):  # os.kill(pid, 0) only asks on POSIX; elsewhere it kills
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        base, tmp, pid = name.rpartition('.tmp')
        if not (base and tmp and pid.isdigit() and int(pid) > 0):
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running (a process of ours, or of another user: PermissionError)
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        path = os.path.join(folder, name)
        os.remove(path)
        removed.append(path)
        log(f"removed {path}, left by process {pid} that no longer runs")
    return removed


def lock_folder(folder, fix):
    """Make this process the one run writing to folder, until it exits: an exclusive lock on
    .NAME.lock beside the folder, holding the holder's pid and command. The kernel drops a lock
    whose process dies, so a killed run's lock is taken over; a run that finds it held dies with one
    line naming the holder and `fix`. (fcntl's locks are POSIX's; elsewhere nothing is locked.)"""
    if os.name != 'posix':
        return
    import atexit
    import fcntl
    folder = os.path.abspath(folder)
    path = os.path.join(os.path.dirname(folder), f'.{os.path.basename(folder)}.lock')
    while True:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            die(f"cannot create the lock file {path}: {e.strerror}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 300).decode(errors='replace').strip() or 'another run'
            os.close(fd)
            die(f"{folder} is in use by {holder}: wait for it to end, or {fix}")
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the file between our open and lock: lock the new one

    def unlock():
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)
    atexit.register(unlock)
    with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, unnamed
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} ({' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))})"[:300].encode())


def load_checkpoint(path, device='cpu', mmap=False):
    """Load a checkpoint written by train.py, safely (weights only), with readable errors; mmap=True maps
    its tensors from the file, read only where used (serve.py's web server reads just its tokenizer)."""
    import torch
    if not os.path.isfile(path):
        die(f"no checkpoint at {path} (train one first: python train.py config/cpu.py)")
    if os.path.getsize(path) == 0:  # torch.load's EOFError says nothing
        die(f"{path} is empty (0 bytes): a write cut off, or a copy that failed; train again, or use another checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:
        why = (str(e).splitlines() or [''])[0] or type(e).__name__
        die(f"cannot read checkpoint {path}: {why} (is it a train.py checkpoint?)")
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'model_args' not in ckpt:
        die(f"{path} is not a train.py checkpoint (it has no 'model' and 'model_args')")
    return ckpt


def checkpoint_path(out_dir, ckpt):
    """ckpt is 'best' or 'last' (out_dir/best.pt, out_dir/last.pt), or the path of a checkpoint."""
    if not ckpt:
        die("ckpt must be best, last or the path of a checkpoint")
    return os.path.join(out_dir, f'{ckpt}.pt') if ckpt in ('best', 'last') else ckpt


def load_model(path, device='cpu'):
    """The GPT stored in a train.py checkpoint, in eval mode, and the checkpoint itself."""
    from model import GPT, GPTConfig
    ckpt = load_checkpoint(path, device)
    try:
        model = GPT(GPTConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])
    except (TypeError, ValueError, RuntimeError) as e:
        die(f"checkpoint {path} does not fit model.py's GPT: {str(e).splitlines()[0]}")
    return model.to(device).eval(), ckpt



def compiled_folder(path):
    """Where sample.py and serve.py keep the compiled decoding code (compiled.aot_compiled) for the
    checkpoint at path: compiled/NAME beside it."""
    return os.path.join(os.path.dirname(path), 'compiled', os.path.splitext(os.path.basename(path))[0])


def load_for_generation(path, device='cpu', dtype='float32', int8=False):
    """A train.py checkpoint's model made ready to generate with, its tokenizer and the checkpoint:
    the weights cast to dtype, then laid out for decoding (layouts.py): int8, or the CPU's faster
    layouts (which leave the parameters and state_dict as they are). sample.py, serve.py, rate.py
    and export.py load through it."""
    import torch
    from layouts import use_fast_linears, use_int8_weights
    from tokenizer import checkpoint_tokenizer, get_tokenizer
    model, checkpoint = load_model(path, device)
    enc = get_tokenizer(checkpoint_tokenizer(checkpoint))
    if model.config.vocab_size < enc.n_vocab:
        die(f"{path} has vocab_size={model.config.vocab_size}, too small for its tokenizer {enc.name} ({enc.n_vocab})")
    if dtype != 'float32':
        # generation needs no float32 master weights: casting them once halves the bytes read per
        # token and skips autocast's casting at every op
        model.to(getattr(torch, dtype))
    (use_int8_weights if int8 else use_fast_linears)(model)
    return model, enc, checkpoint

def read_meta(data_dir, tokenizer='', splits=()):
    """meta.json that prepare.py writes beside train.bin and validation.bin, checked. Without it (or the
    .bin of a split in splits), the error names the prepare.py command that makes them in `tokenizer` (a
    checkpoint's path, or bpe:N; '' for GPT-2's, prepare.py's default), the one the model reads."""
    path = os.path.join(data_dir, 'meta.json')
    if not all(os.path.isfile(os.path.join(data_dir, name)) for name in ('meta.json', *(f'{s}.bin' for s in splits))):
        die(f"no prepared data in {data_dir} (meta.json, train.bin, validation.bin): make it with `python prepare.py"
            f"{f' --tokenizer={tokenizer}' if tokenizer else ''} --data_dir={data_dir}` (TinyStories from the Hugging "
            "Face hub; --source=FILES for your own text)")
    again = "run prepare.py again with --force=True"
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:
        die(f"{path} is not readable JSON ({str(e).splitlines()[0]}): {again}")
    if not isinstance(meta, dict):
        die(f"{path} holds no JSON object: {again}")
    missing = [k for k in ('vocab_size', 'dtype') if k not in meta]
    if missing:
        die(f"{path} lacks {', '.join(missing)}: {again}")
    if meta['dtype'] not in ('uint16', 'uint32'):
        die(f"{path} says dtype={meta['dtype']!r}, not uint16 or uint32: {again}")
    if type(meta['vocab_size']) is not int or meta['vocab_size'] < 1:
        die(f"{path} says vocab_size={meta['vocab_size']!r}, not a positive whole number: {again}")
    return meta


def open_split(data_dir, meta, split):
    """The tokens of data_dir/split.bin as a read-only memmap, after checking that the file holds
    exactly the tokens meta.json lists and that every id is below its vocab_size."""
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.isfile(path):
        die(f"no {path}: run prepare.py first")
    tokens = meta.get(split, {}).get('tokens') if isinstance(meta.get(split), dict) else None
    if type(tokens) is not int:
        die(f"{data_dir}/meta.json gives no token count for {split}: run prepare.py again with --force=True")
    dtype = np.dtype(meta['dtype'])
    if os.path.getsize(path) != tokens * dtype.itemsize:
        die(f"{path} does not hold the {tokens} {dtype} tokens that meta.json lists (truncated or replaced?): "
            "run prepare.py again with --force=True")
    data = np.memmap(path, dtype=dtype, mode='r') if tokens else np.zeros(0, dtype)
    # an id past the vocabulary is an IndexError on the CPU and a device-side assert on a GPU
    if tokens and int(data.max()) >= meta['vocab_size']:
        die(f"{path} holds token id {int(data.max())}, outside meta.json's vocab_size={meta['vocab_size']}: "
            "run prepare.py again with --force=True")
    return data


def log(*args):
    """Progress and diagnostics go to stderr, so stdout stays the script's real output."""
    print(*args, file=sys.stderr, flush=True)
