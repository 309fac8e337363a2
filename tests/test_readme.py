"""The README's commands as a newcomer runs them: every bash and python block, in order, in a fresh
copy of the project beside ../shared, with a few settings made tiny (fewer stories, steps and tokens,
a smaller model) so that the walk takes a minute or two. A command that needs the hub, a GPU or
another machine is named in NOT_RUN with its reason; every other one must succeed, and do something."""
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from conftest import ROOT, SHARED, needs_shared, needs_tokenizer

pytestmark = [needs_shared, needs_tokenizer]

NOT_RUN = {  # a command (a regular expression it matches whole): why this test leaves it out
    r'bash run\.sh': "the main job itself (CI runs it)",
    r'bash test\.sh': "the tests themselves",
    r'bash setup\.sh .*': "the tests run in the environment it makes",
    r'pip install -r requirements-serve\.txt': "setup.sh installs them",
    r'python prepare\.py': "the whole of TinyStories from the Hugging Face hub",
    r'python train\.py config/small\.py': "the GPU recipe, on the hub's data",
    r'python sample\.py --out_dir=out-small .*': "the GPU recipe's model",
    r'python train\.py --init_from=gpt2 .*': "GPT-2's weights from the Hugging Face hub",
    r'python sample\.py --out_dir=out-gpt2 .*': "the GPT-2 fine-tune's model",
    r'torchrun --standalone --nproc_per_node=8 .*': "8 GPUs",
    r'torchrun --nnodes=2 .*': "two machines",
    r'llama-(completion|server) .*': "llama.cpp's tools, built outside the project (tests/test_gguf.py runs them)",
    r'python rate\.py --out_dirs=.*': "it serves until stopped, and a second checkpoint is the user's (tests/test_rate.py runs it)",
}
TINY_ITERS = 4  # the steps of every run the walk trains
TINY = {  # settings appended to a script's command (later settings win)
    'prepare.py': ['--max_docs=200'],
    'train.py': [f'--max_iters={TINY_ITERS}', '--eval_interval=2', '--eval_iters=1', '--batch_size=4', '--n_layer=1',
                 '--n_head=2', '--n_embd=32', '--block_size=64', '--compile=False'],
    'sample.py': ['--max_new_tokens=12'],
    'eval.py': ['--max_tokens=4096', '--max_new_tokens=16'],  # the second for --stories
    'rate.py': [],
    'serve.py': [],
    'export.py': [],
}
# what a command says when it did nothing: a resume of a run already at its max_iters, a prepare.py of data already made
DID_NOTHING = ('nothing to train', 'nothing to do')


def readme_blocks():
    """[(language, [command, ...])] for the README's bash and python blocks, in order; a bash command
    is one line (continuations joined), without its comment."""
    with open(os.path.join(ROOT, 'README.md')) as f:
        blocks = re.findall(r'^```(bash|python)\n(.*?)^```', f.read(), re.M | re.S)
    out = []
    for language, text in blocks:
        if language == 'python':
            out.append((language, [text]))
            continue
        lines = [without_comment(line) for line in re.sub(r'\\\n\s*', '', text).splitlines()]
        out.append((language, [line for line in lines if line]))
    return out


def without_comment(line):
    """line without its comment: from a # that begins a word outside quotes."""
    quote = None
    for i, c in enumerate(line):
        quote = None if c == quote else c if quote is None and c in '"\'' else quote
        if c == '#' and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def why_not_run(command):
    return next(((pattern, reason) for pattern, reason in NOT_RUN.items() if re.fullmatch(pattern, command)), None)


def steps_past_its_run(words):
    """The steps a train.py --init_from=resume command trains past the end of the run it resumes, the one its
    config file trains (the walk ran it before, cut to TINY_ITERS): the command's max_iters less the config's."""
    config = next(w for w in words if w.startswith('config/'))
    settings = {}
    exec(open(os.path.join(ROOT, config)).read(), {}, settings)
    asked = [int(w.split('=', 1)[1]) for w in words if w.startswith('--max_iters=')]
    return (asked[-1] if asked else settings['max_iters']) - settings['max_iters']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_every_readme_command_runs(tmp_path):
    project, shared = tmp_path / 'project', tmp_path / 'shared'
    project.mkdir()
    shared.symlink_to(SHARED)
    for name in os.listdir(ROOT):  # what a clone holds, without a user's data/ and out-*/
        if name.endswith('.py') or name in ('serve.html', 'config'):
            (shutil.copytree if name == 'config' else shutil.copy)(os.path.join(ROOT, name), project / name)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    server, port, ran, skipped = None, None, [], set()

    def run(command):
        done = subprocess.run(['bash', '-c', command], cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\nexit {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        said = next((words for words in DID_NOTHING if words in done.stdout + done.stderr), None)
        assert not said, f"{command}\nsays {said!r}:\n{done.stderr[-2000:]}"
        ran.append(command)

    try:
        for language, commands in readme_blocks():
            for command in commands:
                if language == 'python':
                    run(f"python -c {shlex.quote(command.replace(':8000', f':{port}'))}")
                    continue
                words = shlex.split(command)
                if skip := why_not_run(command):
                    skipped.add(skip[0])
                    continue
                script = next((w for w in words if w.endswith('.py') and not w.startswith('config/')), None)
                if script == 'serve.py':  # it serves until stopped: the commands after it ask it
                    port = free_port()
                    server = subprocess.Popen(['bash', '-c', f"exec {command} --port={port}"], cwd=project, env=env,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    deadline = time.time() + 60
                    while True:
                        try:
                            urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=1).close()
                            break
                        except OSError:
                            assert server.poll() is None and time.time() < deadline, f"{command} did not start"
                            time.sleep(0.2)
                    ran.append(command)
                    continue
                assert script in TINY or words[0] in ('curl', 'echo', 'mkdir'), f"a README command this test does not know: {command}"
                tiny = TINY.get(script, [])
                if script == 'train.py' and '--init_from=resume' in words:  # on the walk's scale: a few steps past
                    tiny = [*tiny, f'--max_iters={TINY_ITERS + max(0, min(steps_past_its_run(words), 2))}']
                run(' '.join([command.replace(':8000', f':{port}'), *map(shlex.quote, tiny)]))
    finally:
        if server:
            server.terminate()
            server.wait(30)
    assert skipped == set(NOT_RUN), f"NOT_RUN names commands the README no longer has: {set(NOT_RUN) - skipped}"
    assert len(ran) >= 15, ran
