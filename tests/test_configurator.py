import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from configurator import configure

DEFAULTS = dict(batch_size=12, learning_rate=6e-4, compile=True, device='auto', top_k=None, out_dir='out')
# what a script's `compile: bool | None = None` and `top_k: int | None = 200` leave in its globals
TYPED = dict(compile=None, top_k=200, max_iters=100, lr_decay_iters=50, __annotations__={'compile': bool | None,
                                                                                         'top_k': int | None})


def run(argv, defaults=DEFAULTS):
    g = dict(defaults)
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
    (['--compile=false'], 'compile must be True or False'),
    (['--compile=no'], 'compile must be True or False'),
    (['--batch_size=None'], 'batch_size expects int, got NoneType'),
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


def test_annotated_settings_take_only_their_declared_types():
    config, _ = run(['--compile=False', '--top_k=None'], TYPED)
    assert config['compile'] is False and config['top_k'] is None
    config, _ = run(['--compile=None', '--top_k=40', '--top_k=5.0'], TYPED)
    assert config['compile'] is None and config['top_k'] == 5 and type(config['top_k']) is int
    for arg, message in (('--compile=false', 'compile must be True, False or None'),
                         ('--compile=no', 'compile must be True, False or None'),
                         ('--compile=1', 'compile must be True, False or None'),
                         ('--top_k=ten', "top_k expects int or None, got str 'ten'"),
                         ('--top_k=0.5', 'top_k expects int or None, got float')):
        with pytest.raises(SystemExit, match=message):
            run([arg], TYPED)


def test_a_script_declares_the_type_of_a_none_setting(tmp_path):
    """The mechanism sample.py, eval.py, bench.py and prepare.py use: an annotation at module level."""
    script = tmp_path / 'script.py'
    script.write_text('import os\ncompile: bool | None = None  # on CUDA only\n'
                      'if __name__ == "__main__":\n'
                      f'    exec(open({os.path.join(ROOT, "configurator.py")!r}).read())\n'
                      '    print(repr(compile))\n')
    ok = subprocess.run([sys.executable, str(script), '--compile=False'], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == 'False', ok.stderr
    bad = subprocess.run([sys.executable, str(script), '--compile=false'], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: compile must be True, False or None, got 'false' in --compile=false"


def test_a_config_file_sees_the_settings_before_it(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text('max_iters = 2 * max_iters  # nanoGPT-style\nlr_decay_iters = max_iters\n')
    config, _ = run(['--max_iters=300', str(cfg)], TYPED)
    assert config['max_iters'] == 600 and config['lr_decay_iters'] == 600


@pytest.mark.parametrize('text, message', [
    (b'max_iters = 10\nlr_decay_iters = max_iters +\n', ':2: invalid syntax'),
    (b'max_iters = 10\n\nlr_decay_iters = 1 / 0\n', ':3: ZeroDivisionError: division by zero'),
    (b'max_iters = 10\nlr_decay_iters = n_iters\n', ":2: NameError: name 'n_iters' is not defined"),
    (b'# caf\xe9\nmax_iters = 10\n', ':1: not UTF-8 text'),
    (b'max_iters = 1\x00\n', ':1: '),
])
def test_a_broken_config_file_is_one_line_with_file_and_line(tmp_path, text, message):
    cfg = tmp_path / 'broken.py'
    cfg.write_bytes(text)
    with pytest.raises(SystemExit, match=f'^error: {cfg}{message}') as e:
        run([str(cfg)], TYPED)
    assert '\n' not in str(e.value)


def test_a_broken_config_file_prints_no_traceback(tmp_path):
    cfg = tmp_path / 'broken.py'
    cfg.write_text('n_layer = 4\nn_head = n_layer // 0\n')
    run = subprocess.run([sys.executable, 'train.py', str(cfg)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and 'Traceback' not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == f'error: {cfg}:2: ZeroDivisionError: integer division or modulo by zero'


def settings_block(script):
    """(name, default as --help shows it, comment) of each `name = default  # comment` line of a script's
    settings: between its `# ----` lines, else every line before it runs configurator.py."""
    lines = open(os.path.join(ROOT, script), encoding='utf-8').read().splitlines()
    marks = [i for i, line in enumerate(lines) if line.startswith('# ----')]
    end = next(i for i, line in enumerate(lines) if "'configurator.py'" in line)
    settings = []
    for line in lines[marks[0]:marks[1]] if len(marks) >= 2 else lines[:end]:
        m = re.fullmatch(r"(\w+)(?:: [^=]+)? = (.+?)(?:  # (.*))?", line)
        if m:
            value = ast.literal_eval(m[2])
            settings.append((m[1], value if isinstance(value, str) else repr(value), m[3] or ''))
    return settings


@pytest.mark.parametrize('script', ['train.py', 'sample.py', 'eval.py', 'export.py', 'prepare.py', 'bench.py', 'serve.py'])
def test_help_lists_each_setting_with_its_default_and_comment(script):
    run = subprocess.run([sys.executable, script, '--help'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stderr == '', run.stderr
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, script), encoding='utf-8').read()))
    assert run.stdout.startswith(f'usage: python {script} [config.py ...] [--key=value ...]\n\n{doc.splitlines()[0]}\n')
    settings = settings_block(script)
    assert len(settings) >= 4
    for name, default, comment in settings:
        beside = re.escape(comment) if comment else '.*'  # else the lines above it: test_help_reads_the_script_as_written
        assert re.search(rf'^  --{name}={re.escape(default)}( +{beside})?$', run.stdout, re.M), name
    shown = re.findall(r'^  --(\w+)=', run.stdout, re.M)
    assert shown == [name for name, _, _ in settings]


def test_help_reads_the_script_as_written(tmp_path):
    """-h wins over the other arguments, even wrong ones; a '#' in a default is not a comment, and a
    setting without a comment of its own shows the lines above it."""
    script = tmp_path / 'script.py'
    script.write_text('"""\nDo a thing.\n  $ python script.py --n=3\n"""\nimport os\n'
                      'before = 0  # not a setting of the block\n'
                      '# -----\n'
                      "tag = 'a#b'  # a tag\n"
                      'top_k: int | None = 200  # the k likeliest\n'
                      '# how many, counted\n# twice\n'
                      'n = 1\n'
                      '# -----\n'
                      'after = 0\n'
                      f'exec(open({os.path.join(ROOT, "configurator.py")!r}).read())\n'
                      'print("ran")\n')
    run = subprocess.run([sys.executable, str(script), '--nope=1', '-h'], capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == '', run.stderr
    assert run.stdout.split('\n') == [
        'usage: python script.py [config.py ...] [--key=value ...]', '',
        'Do a thing.', '  $ python script.py --n=3', '',
        'settings, with their defaults (give them as --key=value, or as key = value in a config file):',
        '  --tag=a#b    a tag',
        '  --top_k=200  the k likeliest',
        '  --n=1        how many, counted twice', '']
