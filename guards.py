"""What train.py checks, each failure one line that says how to fix it: the settings' ranges, an out_dir
that holds an earlier run or cannot be written, data too short for block_size, and a loss that diverged."""
import os
import tempfile
from dataclasses import fields

from common import die, lock_folder, open_split, remove_stale_temps
from model import GPTConfig


def check_settings(config):
    """The range of every training setting in `config`, before anything is read or written, and the GPTConfig
    of its model settings, which checks theirs; dtype's is checked in get_dtype (every script's precision rule)
    and threads' in set_threads."""
    for k in ('eval_interval', 'log_interval', 'eval_iters', 'batch_size', 'gradient_accumulation_steps'):
        if config[k] < 1:
            die(f"need {k} >= 1, got {k}={config[k]!r}")
    for k in ('patience', 'max_iters', 'weight_decay', 'grad_clip', 'warmup_iters', 'min_lr', 'peak_flops'):
        if config[k] < 0:
            die(f"need {k} >= 0, got {k}={config[k]!r}")
    for k in ('learning_rate', 'muon_learning_rate'):
        if config[k] <= 0:
            die(f"need {k} > 0, got {k}={config[k]!r}")
    for k in ('beta1', 'beta2', 'muon_momentum', 'ema'):
        if not 0 <= config[k] < 1:
            die(f"need 0 <= {k} < 1, got {k}={config[k]!r}")
    for k, choices in (('optimizer', ('adamw', 'muon')), ('backend', ('auto', 'nccl', 'gloo'))):
        if config[k] not in choices:
            die(f"need {k} in {choices}, got {k}={config[k]!r}")
    if config['decay_lr'] and config['lr_decay_iters'] < config['warmup_iters']:
        die(f"need not decay_lr or lr_decay_iters >= warmup_iters, got decay_lr={config['decay_lr']!r}, "
            f"lr_decay_iters={config['lr_decay_iters']!r}, warmup_iters={config['warmup_iters']!r}")
    try:
        return GPTConfig(**{f.name: config[f.name] for f in fields(GPTConfig) if f.name in config})
    except ValueError as e:
        die(str(e))


def refuse_to_replace(out_dir, init_from, eval_only, overwrite):
    """A new run would replace a trained model and reset its metrics.jsonl: only when asked to."""
    trained = [name for name in ('best.pt', 'last.pt') if os.path.exists(os.path.join(out_dir, name))]
    if trained and init_from != 'resume' and not eval_only and not overwrite:
        die(f"{out_dir} already holds {', '.join(trained)} from an earlier run: continue it with --init_from=resume, "
            "choose another --out_dir, or replace it with --overwrite=True")


def check_splits(data_dir, meta, block_size):
    """Each split must hold more than block_size tokens: a batch row reads block_size + 1 of them."""
    for split in ('train', 'validation'):
        tokens = len(open_split(data_dir, meta, split))
        if tokens <= block_size:
            die(f"{data_dir}/{split}.bin holds {tokens} tokens, too few for block_size={block_size}: "
                "use a smaller --block_size or more data")


def claim_out_dir(out_dir):
    """Make out_dir, check that it can be written and lock it for this run."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # fail now, not at the first checkpoint
    except OSError as e:
        die(f"cannot write to out_dir {out_dir}: {e.strerror or e} (choose another --out_dir)")
    # before anything lands in out_dir: two runs into one would mix their metrics.jsonl and checkpoints
    lock_folder(out_dir, "choose another --out_dir")
    remove_stale_temps(out_dir)  # a kill -9 mid-write leaves a checkpoint-sized NAME.tmpPID


def diverged(which, iter_num, out_dir, saved_at):
    """End the run whose `which` loss ('evaluated' or 'training') is not finite at iter_num."""
    die(f"the {which} loss is not finite at iter {iter_num}: training diverged (try a lower learning_rate); "
        f"{out_dir}/last.pt keeps iter {saved_at}")
