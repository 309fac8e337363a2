"""
Train a GPT on the token files prepare.py writes, on the CPU, one GPU, or several with DDP:
  $ python train.py config/cpu.py                                    # a laptop, ~6.5 minutes
  $ python train.py config/small.py --batch_size=32                  # one GPU
  $ torchrun --standalone --nproc_per_node=4 train.py config/small.py
Every eval_interval steps it writes out_dir/last.pt (and best.pt when the validation loss
improved), metrics.jsonl and loss.png. --init_from=resume continues exactly where last.pt left
off; --init_from=path/to/ckpt.pt fine-tunes those weights on new data. SIGINT (Ctrl-C) or
SIGTERM finishes the current step, saves last.pt and exits with status 128 + the signal number.
--init_from=gpt2 (gpt2-medium, gpt2-large, gpt2-xl) or a transformers GPT-2 folder fine-tunes
those weights (hf.py maps them) on GPT-2-tokenized data.
"""
import math
import os
import re
import signal
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import distributed
from checkpoints import gather_rng_states, load_for_training, nanogpt_model_args, resume_state, write_checkpoint
from common import autocast, compile_for_training, get_device, get_dtype, keep_freed_memory, log, read_meta
from guards import check_settings, check_splits, claim_out_dir, diverged, refuse_to_replace
from metrics import MetricsLog
from model import GPT, GPTConfig
from tokenizer import data_tokenizer

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out-small'  # last.pt, best.pt, metrics.jsonl and loss.png go here
data_dir = 'data/tinystories'  # train.bin, validation.bin and meta.json from prepare.py
eval_interval = 250  # steps between evaluations, each followed by a checkpoint (>= 1)
log_interval = 10  # steps between log lines (>= 1)
eval_iters = 100  # batches per split in an evaluation (>= 1)
eval_only = False  # print the train and validation loss of the model init_from gives, then exit
init_from = 'scratch'  # 'scratch', 'resume' (out_dir/last.pt), the path of a checkpoint to fine-tune, or gpt2* / a transformers folder
overwrite = False  # let a new run (from scratch or fine-tuning) replace the best.pt and last.pt already in out_dir
patience = 0  # stop after this many evaluations without a better validation loss (>= 0; 0 = never)
tensorboard_log = False  # also log to TensorBoard, in out_dir/tensorboard (pip install tensorboard)
wandb_log = False  # also log to Weights & Biases (pip install wandb)
wandb_project = 'tinystories'
wandb_run_name = 'gpt'
# data
batch_size = 64  # sequences per micro-step, in each process (>= 1)
# micro-steps per optimizer step, summed over all DDP processes (>= 1); each of N processes runs
# ceil(gradient_accumulation_steps / N) of them, so a step holds at least as many tokens as asked, on any N
gradient_accumulation_steps = 2
block_size = 128  # context length in tokens (>= 1)
# model: config/small.py's shape
n_layer = 6  # >= 1
n_head = 6  # >= 1
n_embd = 384  # a multiple of n_head
dropout = 0.1  # in [0, 1)
attn_dropout: float | None = None  # dropout on the attention weights, in [0, 1); None: dropout's
bias = True  # biases in Linears and LayerNorms
pos_emb = 'learned'  # 'learned' (GPT-2) or 'rope' (rotary, Llama)
norm = 'layernorm'  # 'layernorm' (GPT-2) or 'rmsnorm' (Llama)
mlp = 'gelu'  # 'gelu' (GPT-2), 'swiglu' (Llama; about as many weights) or 'relu2' (GELU's shape, relu(x)^2)
tie_embeddings = True  # the output layer reuses the token embedding (GPT-2); False gives it its own
rope_theta = 10000.0  # rotary base (pos_emb='rope', > 0): larger turns slower, for longer contexts
# optimizer: AdamW, or Muon for the matrices inside the blocks
learning_rate = 1e-3  # peak learning rate (> 0)
max_iters = 5000  # optimizer steps in all (>= 0)
weight_decay = 0.1  # >= 0
beta1 = 0.9  # in [0, 1)
beta2 = 0.99  # in [0, 1); a little above GPT-2's 0.95: steps of a few thousand tokens are noisy
grad_clip = 1.0  # clip the gradient norm to this (>= 0; 0 = no clipping)
optimizer = 'adamw'  # 'adamw', or 'muon': Muon for the matrices inside the blocks, AdamW for the rest
# Muon's peak learning rate (> 0; None: learning_rate), on AdamW's scale (match_rms_adamw); scheduled like learning_rate
muon_learning_rate: float | None = None
muon_momentum = 0.95  # Muon's (Nesterov) momentum, in [0, 1)
# an exponential moving average of the weights (torch.optim.swa_utils), updated every step with this decay, in
# [0, 1): evaluations and checkpoints' 'model' are the average (the trained weights go beside it, to resume); 0 = off
ema = 0.0
# learning rate schedule: linear warmup, then cosine decay
decay_lr = True  # False keeps learning_rate throughout
warmup_iters = 200  # >= 0
lr_decay_iters: int | None = None  # where the cosine ends (>= warmup_iters); None: max_iters
min_lr: float | None = None  # the learning rate it ends at (>= 0); None: learning_rate / 10
# system
device = 'auto'  # 'auto' (cuda, then mps, then cpu), or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bf16 where fast, fp16 on GPUs without bf16, else fp32), 'float32', 'bfloat16', 'float16'
compile: bool | None = None  # torch.compile the model; None: on CUDA only
backend = 'auto'  # DDP backend: 'auto' (nccl on CUDA, gloo on the CPU), 'nccl' or 'gloo'
threads = 0  # CPU threads torch computes with; 0: one per core (torch's own); beside another busy process, give each its share
seed = 1337
peak_flops = 0.0  # the MFU's denominator in FLOP/s (>= 0); 0 = the GPU's datasheet bf16 peak (a rough 1e12 on a CPU)
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# settings that follow others, derived after every override: config/cpu.py --max_iters=40 decays over 40 steps
if lr_decay_iters is None:
    lr_decay_iters = config['lr_decay_iters'] = max(max_iters, warmup_iters)
if min_lr is None:
    min_lr = config['min_lr'] = learning_rate / 10
if muon_learning_rate is None:
    muon_learning_rate = config['muon_learning_rate'] = learning_rate
# every setting's range, before anything is read or written (vocab_size: GPTConfig's default until meta.json's)
model_config = check_settings(config)
threads = distributed.set_process_threads(threads)
# -----------------------------------------------------------------------------

refuse_to_replace(out_dir, init_from, eval_only, overwrite)

# torchrun starts one process per device and tells each its RANK, LOCAL_RANK and WORLD_SIZE
ddp = 'RANK' in os.environ
rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
master_process = rank == 0  # the one process that logs and writes files
gradient_accumulation_steps = -(-gradient_accumulation_steps // world_size)  # per process, rounded up
device = get_device(device)
device_type = device.split(':')[0]
if ddp:
    device = distributed.join(device, backend)
dtype = get_dtype(dtype, device_type)
ctx = autocast(device_type, dtype)
torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (Ampere and later)
keep_freed_memory(device_type)
torch.manual_seed(seed + rank)  # each process draws its own batches
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size

# the tokenizer that a missing data_dir's prepare.py command names: a checkpoint's own, or the bpe:N
# that a name like run.sh's data/sample-bpe4096 asks for (else GPT-2's, prepare.py's default)
ckpt = os.path.join(out_dir, 'last.pt') if init_from == 'resume' else init_from
bpe = re.search(r'bpe(\d+)', os.path.basename(os.path.normpath(data_dir)))
meta = read_meta(data_dir, ckpt if init_from != 'scratch' and os.path.isfile(ckpt) else
                 f'bpe:{bpe[1]}' if bpe and init_from == 'scratch' else '', splits=('train', 'validation'))
tokenizer = data_tokenizer(data_dir, meta)  # stored in every checkpoint: sample.py and eval.py need no data_dir
data_dtype = np.dtype(meta['dtype'])
check_splits(data_dir, meta, block_size)
model_config = replace(model_config, vocab_size=meta['vocab_size'])

if master_process and not eval_only:
    claim_out_dir(out_dir)  # before anything lands in it
    metrics_log = MetricsLog(out_dir, tensorboard_log, wandb_log, wandb_project, wandb_run_name, config)


def get_batch(split):
    # a fresh memmap per batch: one kept open keeps every page it has read mapped (on Linux with large
    # folios ~100 MB after one batch of 64 rows), and the memory grows to the file's size
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=data_dtype, mode='r')
    ix = torch.randint(len(data) - block_size, (batch_size,))
    rows = torch.from_numpy(data[ix.numpy()[:, None] + np.arange(block_size + 1)].astype(np.int64))  # one gather
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    if device_type == 'cuda':
        # from pinned memory the copy runs asynchronously: with no host sync in a step (see the loop),
        # the next batch is read and sent while the GPU still works on the current step
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


started_from = init_from  # for the model card; a resume keeps its first run's
if init_from == 'scratch':
    model = GPT(model_config)
elif init_from in ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') or os.path.isdir(init_from):
    from hf import from_pretrained  # needs transformers, which only this path imports
    hf_args, state_dict = from_pretrained(init_from, meta, block_size, dropout, tokenizer)
    model = GPT(GPTConfig(**hf_args))
    model.load_state_dict(state_dict)
else:
    ckpt_path = os.path.join(out_dir, 'last.pt') if init_from == 'resume' else init_from
    model, checkpoint = load_for_training(ckpt_path, init_from, device, model_config, tokenizer, data_dir, optimizer)
    if init_from == 'resume':
        started_from = checkpoint.get('started_from') or (checkpoint.get('config') or {}).get('init_from', 'scratch')
model.to(device)
model_args = nanogpt_model_args(model.config)

# a GradScaler keeps small fp16 gradients from flushing to zero; it does nothing for other dtypes
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
# the optimizer that the setting `optimizer` names ('adamw' or 'muon'), which keeps that name
opt = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer,
                                 muon_learning_rate, muon_momentum)
lr_scales = [group['lr'] / learning_rate for group in opt.param_groups]  # the schedule scales every group alike
iter_num, best_val_loss = 0, float('inf')
if init_from == 'resume':
    iter_num, best_val_loss = resume_state(checkpoint, ckpt_path, opt, scaler, device_type, rank, world_size, seed)
    if not eval_only:
        if master_process:
            log(f"resumed from iter {iter_num} of {max_iters}" if iter_num < max_iters else
                f"{ckpt_path} is at iter {iter_num}, so max_iters={max_iters} is already reached and there is nothing "
                f"to train: to train further, raise --max_iters above {iter_num}")
        if iter_num >= max_iters:
            if ddp:
                dist.destroy_process_group()
            sys.exit(0)

raw_model = model  # the bare model: its state_dict has no compile or DDP prefixes
averaged = None  # with ema, the average of the weights, evaluated and saved in their place
if ema:
    averaged = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(ema)).eval()
    if init_from == 'resume' and 'ema_updates' in checkpoint:  # the average goes on from the resumed one
        averaged.module.load_state_dict(checkpoint['model'])
        averaged.n_averaged.fill_(checkpoint['ema_updates'])
checkpoint = None  # free its memory
if compile is None:
    compile = device_type == 'cuda'
if compile:
    model = compile_for_training(model, device_type)
if ddp:
    model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches of each split (and over all processes), of the averaged weights with ema."""
    evaluated = averaged.module if averaged else model
    model.eval()
    losses = torch.zeros(2, device=device)
    for i, split in enumerate(('train', 'validation')):
        for _ in range(eval_iters):
            X, Y = get_batch(split)
            with ctx:
                _, loss = evaluated(X, Y)
            losses[i] += loss.float() / eval_iters
    model.train()
    if ddp:
        dist.all_reduce(losses)
        losses /= world_size
    return losses.tolist()


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - warmup_iters) / (lr_decay_iters - warmup_iters)))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


if eval_only:  # the model's losses on stdout, and no files written
    train_loss, val_loss = estimate_loss()
    if master_process:
        print(f"train loss {train_loss:.4f}, val loss {val_loss:.4f}")
    sys.exit(0)

if master_process:
    metrics_log.start(iter_num if init_from == 'resume' else None)


def save_checkpoint(names):
    """Every process calls it: each one's random state goes in, so that resume is exact under DDP too."""
    rngs = gather_rng_states(device_type, ddp, world_size)
    if not master_process:
        return
    checkpoint = {
        # 'model' is what sample.py, eval.py and export.py read: the average, if any, with the trained weights beside
        # it to resume from
        'model': (averaged.module if averaged else raw_model).state_dict(),
        **({'trained_model': raw_model.state_dict(), 'ema_updates': int(averaged.n_averaged)} if averaged else {}),
        'model_args': model_args,
        'tokenizer': tokenizer,
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        'started_from': started_from,
        'optimizer': opt.state_dict(),
        'scaler': scaler.state_dict() if scaler.is_enabled() else None,
        'rng': rngs,  # rank by rank
    }
    for name in names:
        write_checkpoint(checkpoint, os.path.join(out_dir, name))


stop_signal = 0


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signum
    if master_process:
        log(f"{signal.Signals(signum).name}: finishing this step{' and those up to the next log line' * ddp}, "
            f"then saving {out_dir}/last.pt")


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)

cpu_threads = f" with {threads} thread{'s' * (threads > 1)}{' each' * ddp}" if device_type == 'cpu' else ''
if master_process:
    log(f"{raw_model.get_num_params() / 1e6:.2f}M parameters, {tokens_per_iter:,} tokens per step ({world_size} process"
        f"{'es' * (world_size > 1)} x {gradient_accumulation_steps} micro-step{'s' * (gradient_accumulation_steps > 1)} x "
        f"{batch_size} x {block_size} tokens), {world_size} x {device}{cpu_threads}, {dtype}")
    if decay_lr and 0 < max_iters <= warmup_iters:
        log(f"warning: warmup_iters={warmup_iters} is not below max_iters={max_iters}: the learning rate only warms up "
            "(give a smaller --warmup_iters)")
run_start = time.time()
bar = tqdm(total=max_iters, initial=iter_num, unit='step', disable=None if master_process else True)
resumed_at = iter_num if init_from == 'resume' else -1  # its checkpoint was saved after that step's evaluation
saved_at = resumed_at
evals_since_best, stop = 0, False
window_time, window_iters = 0.0, 0  # time spent training since the last log line
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for group, scale in zip(opt.param_groups, lr_scales):
        group['lr'] = lr * scale

    if (iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != resumed_at:
        train_loss, val_loss = estimate_loss()
        if not math.isfinite(train_loss + val_loss):
            diverged('evaluated', iter_num, out_dir, saved_at)
        improved = val_loss < best_val_loss
        best_val_loss = min(best_val_loss, val_loss)
        evals_since_best = 0 if improved else evals_since_best + 1
        if master_process:
            bar.write(f"iter {iter_num}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"
                      + (" (best)" if improved else ""), file=sys.stderr)
            metrics_log.record(iter=iter_num, train_loss=train_loss, val_loss=val_loss, lr=lr)
            metrics_log.plot()
        # best.pt first: a kill between the two leaves last.pt recording an older best, never a newer one
        save_checkpoint(['best.pt', 'last.pt'] if improved else ['last.pt'])
        saved_at = iter_num
    if patience and evals_since_best >= patience:
        if master_process:
            log(f"early stop at iter {iter_num}: no better validation loss in {patience} evaluations")
        break
    if iter_num >= max_iters or stop:
        break

    t0 = time.time()
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        X, Y = get_batch('train')
        if ddp:  # average the gradients across processes on the last micro-step only, as no_sync() does
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        with ctx:
            _, loss = model(X, Y)
        loss = loss / gradient_accumulation_steps  # the step's loss is the mean over its micro-steps
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    # reading the loss on the host waits for the GPU to finish the step, and the GPU then idles while the
    # next step is prepared: only at log steps, and at a signal. Divergence found a few steps late costs
    # nothing: every checkpoint is written after a check (here or estimate_loss's), so none holds NaNs
    log_step = (iter_num + 1) % log_interval == 0
    if log_step or (stop_signal and not ddp):
        lossf = loss_sum.item()
        # every DDP process must stop at the same step, or the others would wait forever in the next
        # all-reduce: they agree at log steps (a signal stops the run there)
        flags = torch.tensor([not math.isfinite(lossf), stop_signal != 0], dtype=torch.float32, device=device)
        if ddp:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        not_finite, stop = flags.tolist()
        if not_finite:
            diverged('training', iter_num, out_dir, saved_at)
    if grad_clip:
        scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    if averaged:
        averaged.update_parameters(raw_model)
    window_time += time.time() - t0
    window_iters += 1
    iter_num += 1
    bar.update()
    if log_step:
        dt = window_time / window_iters
        if master_process:
            mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt, peak_flops)
            bar.write(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                      f"{tokens_per_iter / dt:,.0f} tokens/s, MFU {mfu * 100:.2f}%", file=sys.stderr)
            metrics_log.record(iter=iter_num, loss=lossf, lr=lr, ms_per_iter=dt * 1000, tokens_per_s=tokens_per_iter / dt, mfu=mfu)
        window_time, window_iters = 0.0, 0
bar.close()
if master_process:
    log(f"stopped at iter {iter_num} after {(time.time() - run_start) / 60:.1f} min; best val loss {best_val_loss:.4f}")

if stop and saved_at != iter_num:
    save_checkpoint(['last.pt'])
if ddp:
    distributed.check_same_weights(raw_model, world_size)
    # free DDP's reducer, which holds gloo work objects, while the process group still lives: left to
    # the interpreter's teardown, they abort the process now and then (SIGABRT)
    model = None
    dist.barrier()
    dist.destroy_process_group()
if stop_signal:
    sys.exit(128 + stop_signal)
