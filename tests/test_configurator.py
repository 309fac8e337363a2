import os
import subprocess
import sys

import pytest

from conftest import ROOT
from configurator import configure

DEFAULTS = dict(batch_size=12, learning_rate=6e-4, compile=True, device='auto', top_k=None, out_dir='out')


def run(argv):
    g = dict(DEFAULTS)
    return configure(g, argv), g


def test_overrides_are_typed_and_applied():
    config, g = run(['--batch_size=16', '--learning_rate=1', '--compile=False', '--device=cuda:1', '--top_k=40'])
    assert config == dict(batch_size=16, learning_rate=1.0, compile=False, device='cuda:1', top_k=40, out_dir='out')
    assert g['batch_size'] == 16 and type(g['learning_rate']) is float


def test_integral_float_is_accepted_for_int():
    config, _ = run(['--batch_size=1e2'])
    assert config['batch_size'] == 100 and type(config['batch_size']) is int


def test_config_file_then_overrides_in_order(tmp_path):
    cfg = tmp_path / 'my.py'
    cfg.write_text("batch_size = 64  # a comment\nout_dir = 'out-my'\n")
    config, _ = run([str(cfg), '--batch_size=8'])
    assert config['batch_size'] == 8 and config['out_dir'] == 'out-my'


@pytest.mark.parametrize('argv, message', [
    (['--batch_sise=3'], "unknown config key 'batch_sise'.*did you mean batch_size"),
    (['--compile=1'], 'compile must be True or False'),
    (['--batch_size=abc'], 'batch_size expects int, got str'),
    (['--learning_rate=fast'], 'learning_rate expects float'),
    (['--batch_size'], 'malformed argument'),
    (['--=3'], 'malformed argument'),
    (['no/such/config.py'], "cannot read config file 'no/such/config.py'"),
])
def test_mistakes_are_one_clear_error(argv, message):
    with pytest.raises(SystemExit, match=message):
        run(argv)


def test_config_file_in_a_script_with_a_compile_setting(tmp_path):
    """train.py's `compile` setting shadows the builtin where configurator.py is exec'd."""
    cfg = tmp_path / 'c.py'
    cfg.write_text('batch_size = 5\n')
    script = tmp_path / 'script.py'
    script.write_text(f'compile = None\nbatch_size = 1\nexec(open({os.path.join(ROOT, "configurator.py")!r}).read())\n'
                      'print(batch_size)\n')
    run = subprocess.run([sys.executable, str(script), str(cfg)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == '5', run.stderr


def test_unknown_key_in_config_file(tmp_path):
    cfg = tmp_path / 'bad.py'
    cfg.write_text('n_layers = 4\n')
    with pytest.raises(SystemExit, match=f"unknown config key 'n_layers' in {cfg}"):
        run([str(cfg)])


def test_exec_contract_from_a_script(tmp_path):
    script = tmp_path / 'script.py'
    script.write_text(
        'import os, sys\n'
        'batch_size = 12\n'
        'name = "x"\n'
        f'exec(open(os.path.join({ROOT!r}, "configurator.py")).read())\n'
        'print(batch_size, name, sorted(config))\n')
    ok = subprocess.run([sys.executable, str(script), '--batch_size=3', '--name=hello world'],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "3 hello world ['batch_size', 'name']"
    assert 'config: batch_size = 3' in ok.stderr
    bad = subprocess.run([sys.executable, str(script), '--batch=3'], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stdout == ''
    assert bad.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'batch'")
