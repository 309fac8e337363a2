"""
The records of a training run in its out_dir, which train.py's master process writes:
metrics.jsonl, one JSON object a line (a step's loss, lr, ms_per_iter, tokens_per_s and mfu, or an
evaluation's train_loss, val_loss and lr, each with its iter), loss.png drawn from it after each
evaluation, and the same rows in TensorBoard (out_dir/tensorboard) and Weights & Biases when asked.
A failed write (a full disk) does not stop the training: its rows wait for the next write that
succeeds, and loss.png is drawn again at the next evaluation.
"""
import contextlib
import json
import os

import matplotlib
matplotlib.use('Agg')  # draw into files; no display needed
import matplotlib.pyplot as plt

from common import atomic_output, die, log


class MetricsLog:

    def __init__(self, out_dir, tensorboard_log=False, wandb_log=False, wandb_project=None, wandb_run_name=None,
                 config=None):
        """Fails at once, before any training, when TensorBoard or W&B is asked for but not installed."""
        self.out_dir, self.path = out_dir, os.path.join(out_dir, 'metrics.jsonl')
        self.tb_writer = self.wandb = None
        self.unwritten, self.failing = [], set()  # rows not in metrics.jsonl yet; files whose last write failed
        if tensorboard_log:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                die("tensorboard_log=True needs TensorBoard: pip install tensorboard")
            self.tb_writer = SummaryWriter(os.path.join(out_dir, 'tensorboard'))
        if wandb_log:
            try:
                import wandb
            except ImportError:
                die("wandb_log=True needs Weights & Biases: pip install wandb")
            wandb.init(project=wandb_project, name=wandb_run_name, config=config)
            self.wandb = wandb

    def start(self, resumed_at=None):
        """A run resumed at iter resumed_at redoes the steps logged after its checkpoint; any other
        run starts a new log."""
        lines = []
        if resumed_at is not None and os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.readlines()
        kept = [line for line in lines if line.endswith('\n') and json.loads(line)['iter'] <= resumed_at]
        if lines and kept == lines:
            return  # the log ends where the checkpoint does: appending needs no room for a copy
        try:
            with atomic_output(self.path) as tmp, open(tmp, 'w') as f:
                f.writelines(kept)
        except OSError as e:
            die(f"cannot write {self.path}: {e.strerror or e} (disk full?): make room, then run again")

    def record(self, **row):
        self.unwritten.append(json.dumps(row) + '\n')
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        try:
            with open(self.path, 'a') as f:
                f.writelines(self.unwritten)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)  # no half row: the next write goes on from a whole one
            self._failed(self.path, e)
        else:
            self.unwritten = []
            self.failing.discard(self.path)
        if self.tb_writer:
            for key, value in row.items():
                self.tb_writer.add_scalar(key, value, row['iter'])
        if self.wandb:
            self.wandb.log(row, step=row['iter'])

    def plot(self):
        """loss.png: every step's loss, and the evaluations' train and validation losses."""
        with open(self.path) as f:
            rows = [json.loads(line) for line in f]
        steps, evals = [r for r in rows if 'loss' in r], [r for r in rows if 'val_loss' in r]
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.plot([r['iter'] for r in steps], [r['loss'] for r in steps], alpha=0.4, label='train (one step)')
        ax.plot([r['iter'] for r in evals], [r['train_loss'] for r in evals], 'o-', label='train')
        ax.plot([r['iter'] for r in evals], [r['val_loss'] for r in evals], 'o-', label='validation')
        ax.set(xlabel='iteration', ylabel='loss', title=self.out_dir)
        ax.grid(alpha=0.3)
        ax.legend()
        path = os.path.join(self.out_dir, 'loss.png')
        try:
            with atomic_output(path) as tmp:
                fig.savefig(tmp, format='png', dpi=100)
            self.failing.discard(path)
        except OSError as e:
            self._failed(path, e)
        finally:
            plt.close(fig)

    def _failed(self, path, e):
        """One line for a file that cannot be written, and none more until a write of it succeeds again."""
        if path not in self.failing:
            log(f"warning: cannot write {path}: {e.strerror or e} (disk full?); training goes on, and it is written "
                "once there is room")
        self.failing.add(path)
