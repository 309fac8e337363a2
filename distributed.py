"""train.py's processes under torchrun (DistributedDataParallel): the threads each computes with,
joining the process group, and the check at the end that they kept the same weights."""
import os

import torch
import torch.distributed as dist

from common import die, set_threads


def set_process_threads(threads):
    """set_threads for one of torchrun's LOCAL_WORLD_SIZE processes on this machine, which each get
    OMP_NUM_THREADS=1 unless the environment sets it: threads=0 gives each its share of the cores instead."""
    local_processes = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return set_threads(threads or (max(1, cores // local_processes) if local_processes > 1 else 0))


def join(device, backend):
    """Join torchrun's process group (on CUDA, each process on its LOCAL_RANK's GPU); returns the device."""
    if device.startswith('cuda'):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend=('nccl' if device.startswith('cuda') else 'gloo') if backend == 'auto' else backend)
    return device


def check_same_weights(model, world_size):
    """A real check that DDP did its job: every process ends with the same weights."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    all_sums = [torch.empty_like(sums) for _ in range(world_size)]
    dist.all_gather(all_sums, sums)
    if not all(torch.equal(s, sums) for s in all_sums):
        die("the DDP processes ended with different weights: their gradients were not kept in sync")
