"""train.py --init_from=resume: it goes on exactly as a run that never stopped, the weight average too, and
refuses a checkpoint of another shape or without what it needs to resume."""
import os

import torch

from common import load_checkpoint
from conftest import assert_error, metrics, train


def test_resume_is_exact(data, tmp_path):
    # dropout and accumulation exercise the random state and the optimizer state in the checkpoint
    args = ['--eval_interval=4', '--lr_decay_iters=16', '--dropout=0.2', '--gradient_accumulation_steps=2']
    train(data, tmp_path / 'straight', '--max_iters=16', *args)
    train(data, tmp_path / 'halves', '--max_iters=8', *args)
    run = train(data, tmp_path / 'halves', '--max_iters=16', '--init_from=resume', *args)
    assert 'resumed from iter 8 of 16' in run.stderr
    straight = load_checkpoint(tmp_path / 'straight' / 'last.pt')
    halves = load_checkpoint(tmp_path / 'halves' / 'last.pt')
    assert halves['iter_num'] == 16
    for name, weight in straight['model'].items():
        assert torch.equal(weight, halves['model'][name]), name
    assert straight['best_val_loss'] == halves['best_val_loss']

    def losses(out_dir):
        return [(r['iter'], r.get('loss'), r.get('val_loss')) for r in metrics(out_dir)]
    assert losses(tmp_path / 'straight') == losses(tmp_path / 'halves')  # the log continues where last.pt left off


def test_ema_averages_the_trained_weights_and_resumes_exactly(data, tmp_path):
    """--ema=0.8: after two steps the saved model is 0.8 w1 + 0.2 w2 (the average starts at the first step's
    weights, w1 and w2 from a run without it: the average never changes the training), and a resumed run ends
    with the same average and weights as one that never stopped."""
    args = ['--eval_interval=2', '--lr_decay_iters=8']
    for name, steps in (('one', 1), ('two', 2)):
        train(data, tmp_path / name, f'--max_iters={steps}', *args)
    w1, w2 = (load_checkpoint(tmp_path / name / 'last.pt')['model'] for name in ('one', 'two'))
    train(data, tmp_path / 'ema', '--max_iters=2', '--ema=0.8', *args)
    ema = load_checkpoint(tmp_path / 'ema' / 'last.pt')
    assert ema['ema_updates'] == 2
    for name in w2:
        assert torch.equal(ema['trained_model'][name], w2[name]), name
        torch.testing.assert_close(ema['model'][name], 0.8 * w1[name] + 0.2 * w2[name])
    assert not torch.equal(ema['model']['lm_head.weight'], w2['lm_head.weight'])

    args += ['--ema=0.8', '--dropout=0.2']
    train(data, tmp_path / 'straight', '--max_iters=6', *args)
    train(data, tmp_path / 'halves', '--max_iters=4', *args)
    train(data, tmp_path / 'halves', '--max_iters=6', '--init_from=resume', *args)
    straight, halves = (load_checkpoint(tmp_path / name / 'last.pt') for name in ('straight', 'halves'))
    for key in ('model', 'trained_model'):
        for name, weight in straight[key].items():
            assert torch.equal(weight, halves[key][name]), (key, name)
    assert [r.get('val_loss') for r in metrics(tmp_path / 'straight')] == [r.get('val_loss') for r in metrics(tmp_path / 'halves')]


def test_a_checkpoint_of_another_shape_is_an_error(data, trained, out):
    run = train(data, out, f'--init_from={trained}/last.pt', '--n_embd=64', ok=False)
    assert_error(run, 'n_embd=32 (the config says 64)')
    run = train(data, trained, '--init_from=resume', '--n_layer=3', ok=False)
    assert_error(run, 'n_layer=2 (the config says 3)')


def test_a_checkpoint_with_missing_keys_is_an_error(data, trained, tmp_path):
    ckpt = load_checkpoint(os.path.join(trained, 'last.pt'))
    torch.save({**ckpt, 'model_args': {k: v for k, v in ckpt['model_args'].items() if k != 'n_head'}},
               tmp_path / 'no-head.pt')
    run = train(data, tmp_path / 'out', f'--init_from={tmp_path}/no-head.pt', ok=False)
    assert_error(run, "no-head.pt lacks model_args['n_head']")
    os.makedirs(tmp_path / 'weights')
    torch.save({'model': ckpt['model'], 'model_args': ckpt['model_args']}, tmp_path / 'weights' / 'last.pt')
    run = train(data, tmp_path / 'weights', '--init_from=resume', ok=False)
    assert_error(run, 'holds no optimizer, iter_num, best_val_loss, rng to resume from')
    assert f'--init_from={tmp_path}/weights/last.pt' in run.stderr  # fine-tuning it works
