"""
Write stories with a model trained by train.py.
  $ python sample.py --start="Once upon a time"
  $ python sample.py --start=FILE:prompt.txt --num_samples=3 --ckpt=last --temperature=0.7
The stories go to stdout (a single one is printed as it is written); the speed goes to stderr.
The checkpoint holds its tokenizer, so sample.py needs no data_dir.
"""
import os
import signal
import sys
import time

import torch

from common import (check_compiler, checkpoint_path, compiled_folder, die, get_device, get_dtype, keep_freed_memory,
                    load_for_generation, log, set_threads)
from generate import check_options, generate, stream, window_shift_for
from tokenizer import decode_utf8, prompt_ids

# -----------------------------------------------------------------------------
out_dir = 'out-cpu'  # where train.py saved its checkpoints: config/cpu.py's, the README's first run
ckpt = 'best'  # best or last (out_dir/best.pt, out_dir/last.pt), or the path of a checkpoint
start = ''  # the story's beginning, or FILE:path to read it from a file; empty starts a fresh story
num_samples = 1  # stories to write, all generated as one batch
max_new_tokens = 500  # most tokens to add to each story
temperature = 0.8  # 1.0 samples the model as it is, lower is more predictable, 0 is greedy
top_k: int | None = 200  # sample only from the k likeliest tokens (None: from all of them)
top_p: float | None = None  # sample only from the likeliest tokens that together reach probability top_p (None: off)
repetition_penalty = 1.0  # > 1 makes tokens already in the story less likely
stop_at_eot = True  # end each story at <|endoftext|>; False writes on past it
window_shift: int | None = None  # past block_size, forget this many oldest tokens at once; 1 is exact, None: block_size // 4
slide = 'reread'  # past block_size, 'reread' the tokens kept, or 'shift' the cache back (rotary models): nearly free, other text
seed = 1337  # the same seed and settings give the same stories
device = 'auto'  # auto, cpu, cuda, cuda:1, mps
dtype = 'auto'  # bf16 where the CPU or GPU has it (fp16 on older GPUs), else float32 (common.get_dtype); not float32 casts the weights
compile = False  # compile the decoding step with its sampling (generate.compiled_step): on the CPU ~1 min the first time for a
# checkpoint and settings, kept in compiled/ beside the checkpoint, then about a second to start; 2.5-14x eager's tokens/s
int8 = False  # int8 weights (one scale per output): half bf16's bytes a token, for models large enough that reading weights bounds it; a little less exact
threads = 0  # CPU threads torch computes with; 0: one per core (torch's own); beside another busy process, give each its share
# -----------------------------------------------------------------------------


if __name__ == '__main__':  # a plain script
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    # every setting's range, checked before the slow part, loading the model
    if num_samples < 1:
        die(f"num_samples must be at least 1, got {num_samples}")
    if max_new_tokens < 1:
        die(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    try:
        check_options(**options, window_shift=window_shift, slide=slide)  # against the model once it is known
    except ValueError as e:
        die(str(e))
    if start.startswith('FILE:'):
        try:
            with open(start[len('FILE:'):], encoding='utf-8') as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            die(f"cannot read the prompt file {start[len('FILE:'):]}: {getattr(e, 'strerror', None) or e}")
    set_threads(threads)
    device = get_device(device)
    device_type = device.split(':')[0]
    dtype = get_dtype(dtype, device_type)
    keep_freed_memory(device_type)  # as train.py does
    if compile:
        check_compiler(device_type)

    path = checkpoint_path(out_dir, ckpt)
    model, enc, _ = load_for_generation(path, device, dtype, int8)
    block_size = model.config.block_size
    window_shift = window_shift_for(window_shift, block_size)
    try:
        check_options(window_shift=window_shift, block_size=block_size, slide=slide, pos_emb=model.config.pos_emb)
    except ValueError as e:
        die(str(e))

    ids = prompt_ids(enc, start)
    if len(ids) > block_size:
        log(f"warning: the prompt is {len(ids)} tokens, more than block_size={block_size}; "
            f"the model sees only its last {block_size}")
        ids = ids[-block_size:]
    x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    options.update(eos_token=enc.eot_token if stop_at_eot else None, window_shift=window_shift, slide=slide, compile=compile and compiled_folder(path))

    if compile:  # before the clock starts: the speed logged below is the stories'
        t0 = time.time()
        generate(model, x, 3, **options)  # the same settings: the compiled step is made for them
        log(f"the compiled decoding step is ready in {time.time() - t0:.1f} s")
    torch.manual_seed(seed)
    t0 = time.time()
    new = [[] for _ in range(num_samples)]  # every story's new tokens, as they come

    def steps():
        """Run the model, adding each step's tokens to the stories; yield the first story's, to show it as it comes."""
        for step in stream(model, x, max_new_tokens, **options):
            for row, t in zip(new, step[:, 0].tolist()):
                row.append(t)
            if not (stop_at_eot and new[0][-1] == enc.eot_token):
                yield new[0][-1]

    def cut(row):
        return row[:row.index(enc.eot_token)] if stop_at_eot and enc.eot_token in row else row

    try:
        interrupted = False
        try:
            if num_samples == 1:
                print(start, end='', flush=True)
                for text in decode_utf8(steps(), enc):
                    print(text, end='', flush=True)
            else:
                for _ in steps():
                    pass
        except KeyboardInterrupt:  # Ctrl-C: show what exists of every story
            interrupted = True
            # a second one, while they print (to a slow pipe, a stuck terminal), leaves at once and as quietly,
            # without waiting to flush them
            signal.signal(signal.SIGINT, lambda *_: os._exit(130))
        if num_samples == 1:
            print(flush=True)
        else:
            print('\n---------------\n'.join(start + ''.join(decode_utf8(cut(row), enc)) for row in new), flush=True)
    except BrokenPipeError:
        # the reader went away (`python sample.py | head`): stop as `cat` would, with 128 + SIGPIPE, and
        # point stdout at /dev/null so that Python's own flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    dt = time.time() - t0
    n = sum(len(cut(row)) for row in new)
    log(f"{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s")
    if interrupted:
        log("interrupted")
        sys.exit(130)  # 128 + SIGINT, as a shell reports a Ctrl-C
