"""What train.py needs of its checkpoints beyond loading one (common.load_checkpoint, which every script
uses): the model a checkpoint holds, checked against the run's, to resume or fine-tune; its optimizer and
each process's random states to resume exactly; and a write that a kill or a full disk cannot leave half done."""
import os
import random
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist

from common import atomic_output, die, load_checkpoint, log
from model import GPT, GPTConfig
from tokenizer import check_same, checkpoint_tokenizer

# nanoGPT's model_args, which every train.py checkpoint holds too; GPTConfig's later options default to GPT-2's recipe
NANOGPT_ARGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')


def checkpoint_config(checkpoint, path, config, resume):
    """The GPTConfig of a train.py (or nanoGPT) checkpoint, checked against the GPTConfig `config` of
    the run that loads it: to resume, the same model, with the optimizer and random states to go on
    with; to fine-tune, the same but for block_size (cropped, never grown) and vocab_size (the
    data's may be smaller). Neither depends on the dropout rates, which may be missing."""
    saved = checkpoint['model_args'] if isinstance(checkpoint['model_args'], dict) else {}
    missing = [f"model_args[{k!r}]" for k in NANOGPT_ARGS if k not in saved and k != 'dropout']
    if resume:
        missing += [k for k in ('optimizer', 'iter_num', 'best_val_loss', 'rng') if k not in checkpoint]
        if 'optimizer' in missing:
            die(f"{path} holds no {', '.join(missing)} to resume from (a weights-only file?): "
                f"fine-tune it instead, --init_from={path} with another --out_dir")
    if missing:
        die(f"{path} lacks {', '.join(missing)}: it is not a complete train.py checkpoint")
    try:
        saved = GPTConfig(**saved)  # older checkpoints lack the newer options: theirs are the defaults
    except (TypeError, ValueError) as e:
        die(f"{path} holds model_args that model.py cannot build: {e}")
    have, wanted = asdict(saved), asdict(config)
    differ = [f"{k}={have[k]} (the config says {wanted[k]})" for k in wanted if have[k] != wanted[k]
              and k not in ('dropout', 'attn_dropout', 'vocab_size') and (k != 'block_size' or resume)]
    if differ:
        die(f"{path} holds a model of another shape: {', '.join(differ)}; train with the config it was made with")
    if config.block_size > saved.block_size:
        die(f"{path} was trained with block_size={saved.block_size}; fine-tuning can shrink it, not grow it")
    if config.vocab_size > saved.vocab_size:
        die(f"the data's vocabulary ({config.vocab_size} tokens) is larger than that of {path} ({saved.vocab_size})")
    return saved


def nanogpt_model_args(config):
    """GPTConfig `config` as a checkpoint's model_args: its options join nanoGPT's only where they differ from its
    defaults (GPT-2's recipe), so that nanoGPT reads a default model's checkpoint."""
    return {k: v for k, v in asdict(config).items() if k in NANOGPT_ARGS or v != getattr(GPTConfig, k)}


def load_for_training(path, init_from, device, config, tokenizer, data_dir, optimizer):
    """The model of the checkpoint at `path`, and the checkpoint, for a run that resumes it (init_from='resume')
    or fine-tunes it: checked against the run's GPTConfig `config`, tokenizer and optimizer, and cropped to
    config.block_size."""
    resume = init_from == 'resume'
    if not os.path.isfile(path):
        die(f"init_from=resume but there is no {path}: start the run without --init_from=resume, or check "
            "--out_dir" if resume
            else f"init_from={init_from} is neither scratch, resume nor a checkpoint file")
    checkpoint = load_checkpoint(path, device)
    check_same(tokenizer, checkpoint_tokenizer(checkpoint), data_dir, path)
    saved = checkpoint_config(checkpoint, path, config, resume=resume)
    if resume and checkpoint['config'].get('optimizer', 'adamw') != optimizer:
        die(f"{path} was trained with optimizer={checkpoint['config'].get('optimizer', 'adamw')}; "
            f"resume it with that optimizer")
    model = GPT(replace(config, vocab_size=saved.vocab_size, block_size=saved.block_size))
    try:
        model.load_state_dict(checkpoint['trained_model'] if resume and 'trained_model' in checkpoint
                              else checkpoint['model'])
    except RuntimeError as e:
        die(f"{path} does not fit its own model_args: {str(e).splitlines()[0]}")
    if config.block_size < saved.block_size:
        model.crop_block_size(config.block_size)
    return model, checkpoint


def resume_state(checkpoint, path, opt, scaler, device_type, rank, world_size, seed):
    """Go on with the optimizer, GradScaler and this process's random states of the checkpoint at `path`;
    returns its iter_num and best_val_loss."""
    iter_num = checkpoint['iter_num']
    opt.load_state_dict(checkpoint['optimizer'])
    if checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])
    rngs = checkpoint['rng']  # one per process
    if len(rngs) == world_size:  # the same batches and dropout masks as a run that never stopped
        set_rng_state(rngs[rank], device_type)
    else:
        if rank == 0:  # the master process
            log(f"warning: {path} holds the random states of {len(rngs)} processes, not {world_size}: "
                "each process starts a fresh stream, so this run will not repeat the batches of one that never stopped")
        torch.manual_seed(seed + rank + iter_num)  # distinct, and not the streams of the first steps again
    return iter_num, checkpoint['best_val_loss']


def gather_rng_states(device_type, ddp, world_size):
    """Every process's random states, rank by rank; under DDP every process must call it."""
    rng = rng_state(device_type)
    rngs = [rng]
    if ddp:
        rngs = [None] * world_size
        dist.all_gather_object(rngs, rng)
    return rngs


def rng_state(device_type):
    """This process's random states, as plain tensors, tuples and ints (torch.load(weights_only=True) reads them)."""
    np_state = np.random.get_state()
    return {'python': random.getstate(), 'numpy': (np_state[0], np_state[1].tolist(), *np_state[2:]),
            'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}


def set_rng_state(rng, device_type):
    """Go on with the random states rng_state gave."""
    random.setstate(rng['python'])
    np.random.set_state((rng['numpy'][0], np.array(rng['numpy'][1], dtype=np.uint32), *rng['numpy'][2:]))
    torch.set_rng_state(rng['torch'].cpu())
    if device_type == 'cuda' and rng['cuda'] is not None:
        torch.cuda.set_rng_state(rng['cuda'].cpu())


def write_checkpoint(checkpoint, path):
    """torch.save, atomically (a kill mid-write keeps the old file); a failed write ends the run with one
    line, the old file kept."""
    try:
        # through a file of ours, a failed write's OSError (No space left on device) reaches us, as the
        # context of the RuntimeError torch.save makes of it
        with atomic_output(path) as tmp, open(tmp, 'wb') as f:
            torch.save(checkpoint, f)
    except (OSError, RuntimeError) as e:
        why = next((x for x in (e, e.__context__) if isinstance(x, OSError)), e)
        reason = getattr(why, 'strerror', None) or str(why).split('\n')[0]
        die(f"cannot save {path} at iter {checkpoint['iter_num']}: {reason} (disk full?); it keeps its previous "
            "version: make room, then continue with --init_from=resume")
