"""
Config for the flat scripts, nanoGPT-style. A script defines its defaults as globals, then

    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

applies, in order, the Python config files given as bare arguments and the --key=value
overrides, and leaves `config`, a dict of every setting, in the script's globals.
  $ python train.py config/small.py --batch_size=16 --compile=False
A setting takes the type of its default; one whose default is None (or that may be None)
declares its types with an annotation, `compile: bool | None = None`. A config file runs with
the settings so far visible (`lr_decay_iters = max_iters`). Unlike nanoGPT, mistakes (unknown
key, wrong type, a config file that is missing or fails) end the run with one readable line
instead of an assert or a traceback. --help (or -h) prints the script's docstring and its settings,
each with its default and the comment beside it in the script, and exits.
"""
import ast
import builtins
import difflib
import os
import sys
import types

_CONFIG_TYPES = (int, float, bool, str, type(None), tuple, list)


def _fail(msg):
    raise SystemExit(f"error: {msg}")


def _types(key, default, annotations):
    """The types a setting takes: its annotation's (`top_k: int | None = 200`), else its default's;
    None for an unannotated setting whose default is None, which takes anything."""
    declared = annotations.get(key)
    if isinstance(declared, types.UnionType):  # int | None
        return declared.__args__
    if isinstance(declared, type):
        return (declared,)
    return None if default is None else (type(default),)


def _check(key, value, defaults, annotations, source):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see the defaults at the top of the script)"
        _fail(f"unknown config key '{key}' in {source}{hint}")
    allowed = _types(key, defaults[key], annotations)
    if allowed is None or type(value) in allowed:
        return value
    if float in allowed and type(value) is int:
        return float(value)  # --learning_rate=1 means 1.0
    if int in allowed and type(value) is float and value.is_integer():
        return int(value)  # --max_iters=1e4
    if bool in allowed:  # 'false' and 'no' are strings, and a non-empty string would mean True
        _fail(f"{key} must be True{', False or None' if type(None) in allowed else ' or False'}, got {value!r} in {source}")
    names = ' or '.join('None' if t is type(None) else t.__name__ for t in allowed)
    _fail(f"{key} expects {names}, got {type(value).__name__} {value!r} in {source}")


def _run_file(path, settings):
    """The settings a config file assigns. It runs with the current settings visible, so that
    `lr_decay_iters = max_iters` works; any failure is one line naming the file and line."""
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except OSError as e:
        _fail(f"cannot read config file '{path}': {e.strerror} (give an existing .py file, e.g. config/small.py)")
    try:
        source = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b'\n') + 1
        _fail(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#x}); save it as UTF-8")
    try:
        # builtins.compile: a script's own `compile` setting shadows the builtin here
        code = builtins.compile(source, path, 'exec')
    except (SyntaxError, ValueError) as e:  # ValueError: a null byte
        _fail(f"{path}:{getattr(e, 'lineno', None) or 1}: {getattr(e, 'msg', None) or e}")
    assigned = {}
    try:
        exec(code, dict(settings), assigned)  # reads see the settings, assignments land in `assigned`
    except Exception as e:
        tb, line = e.__traceback__, 1
        while tb is not None:  # the deepest line of the config file itself
            if tb.tb_frame.f_code.co_filename == path:
                line = tb.tb_lineno
            tb = tb.tb_next
        _fail(f"{path}:{line}: {type(e).__name__}: {e}")
    return assigned


def _help(g, defaults):
    """--help: the script's docstring, then each setting of its settings block, in its order, with its
    default and the comment beside it, else the comment lines just above it. Read from the source:
    exec'ing this file has replaced the script's __doc__ with this file's."""
    path = g.get('__file__', '')
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
        tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError):
        source, tree = '', ast.parse('')
    lines, comments = source.splitlines(), {}
    # the settings block between the first two `# ----` lines, if the script marks one
    marks = [i + 1 for i, line in enumerate(lines) if line.startswith('# ----')][:2]
    first, last = marks if len(marks) == 2 else (0, len(lines))
    for node in tree.body:
        if not first < node.lineno < last:
            continue
        target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0] if isinstance(node, ast.Assign) else None
        name = getattr(target, 'id', None)
        if name not in defaults or name in comments or node.value is None:
            continue
        # from the value's end, so that a '#' inside a string default is not taken for a comment
        after = lines[node.end_lineno - 1][node.value.end_col_offset:].strip()
        above, i = [], node.lineno - 2
        while i >= 0 and lines[i].startswith('# ') and not lines[i].startswith('# ----'):
            above.insert(0, lines[i][2:])
            i -= 1
        comments[name] = after[1:].strip() if after.startswith('#') else ' '.join(above)
    comments = comments or dict.fromkeys(defaults, '')  # no source to read: the settings alone
    print(f"usage: python {os.path.basename(path or sys.argv[0])} [config.py ...] [--key=value ...]\n")
    if ast.get_docstring(tree):  # as written: prepare.py's example continues a line with a backslash
        print(ast.get_source_segment(source, tree.body[0].value).strip('"\n') + '\n')
    print("settings, with their defaults (give them as --key=value, or as key = value in a config file):")
    shown = {k: f"--{k}={defaults[k] if isinstance(defaults[k], str) else repr(defaults[k])}" for k in comments}
    width = min(32, max(map(len, shown.values()), default=0))
    for k, comment in comments.items():
        print(f"  {shown[k]:<{width}}  {comment}".rstrip())
    raise SystemExit(0)


def configure(g, argv):
    """Apply config files and --key=value overrides in argv to the globals dict g."""
    defaults = {k: v for k, v in g.items() if not k.startswith('_') and isinstance(v, _CONFIG_TYPES)}
    if '--help' in argv or '-h' in argv:
        _help(g, defaults)
    annotations = g.get('__annotations__', {})
    for arg in argv:
        if not arg.startswith('--'):
            for key, value in _run_file(arg, {k: g[k] for k in defaults}).items():
                if key.startswith('_') or not isinstance(value, _CONFIG_TYPES):
                    continue
                g[key] = _check(key, value, defaults, annotations, arg)
                print(f"config: {key} = {g[key]!r}  ({arg})", file=sys.stderr)
            continue
        key, eq, text = arg[2:].partition('=')
        if not eq or not key:
            _fail(f"malformed argument '{arg}': expected --key=value, e.g. --batch_size=16 or --compile=False")
        allowed = _types(key, defaults.get(key), annotations) or ()
        if str in allowed:  # strings need no quotes: --device=cuda:1
            value = None if text == 'None' and type(None) in allowed else text
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        g[key] = _check(key, value, defaults, annotations, arg)
        print(f"config: {key} = {g[key]!r}", file=sys.stderr)
    return {k: g[k] for k in defaults}


if __name__ != 'configurator':  # exec'd by a script, not imported by a test
    config = configure(globals(), sys.argv[1:])
