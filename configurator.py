"""
Config for the flat scripts, nanoGPT-style. A script defines its defaults as globals, then

    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

applies, in order, the Python config files given as bare arguments and the --key=value
overrides, and leaves `config`, a dict of every setting, in the script's globals.
  $ python train.py config/small.py --batch_size=16 --compile=False
Unlike nanoGPT, mistakes (unknown key, wrong type, missing file, malformed argument) end the
run with one readable line instead of an assert.
"""
import ast
import builtins
import difflib
import sys

_CONFIG_TYPES = (int, float, bool, str, type(None), tuple, list)


def _fail(msg):
    raise SystemExit(f"error: {msg}")


def _check(key, value, defaults, source):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see the defaults at the top of the script)"
        _fail(f"unknown config key '{key}' in {source}{hint}")
    default = defaults[key]
    if default is None or value is None or type(value) is type(default):
        return value
    if type(default) is float and type(value) is int:
        return float(value)  # --learning_rate=1 means 1.0
    if type(default) is int and type(value) is float and value.is_integer():
        return int(value)  # --max_iters=1e4
    if type(default) is bool:
        _fail(f"{key} must be True or False, got {value!r} in {source}")
    _fail(f"{key} expects {type(default).__name__}, got {type(value).__name__} {value!r} in {source}")


def configure(g, argv):
    """Apply config files and --key=value overrides in argv to the globals dict g."""
    defaults = {k: v for k, v in g.items() if not k.startswith('_') and isinstance(v, _CONFIG_TYPES)}
    for arg in argv:
        if not arg.startswith('--'):
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                _fail(f"cannot read config file '{arg}': {e.strerror} (give an existing .py file, e.g. config/small.py)")
            values = {}
            # builtins.compile: a script's own `compile` setting shadows the builtin here
            exec(builtins.compile(source, arg, 'exec'), {}, values)
            for key, value in values.items():
                if key.startswith('_') or not isinstance(value, _CONFIG_TYPES):
                    continue
                g[key] = _check(key, value, defaults, arg)
                print(f"config: {key} = {g[key]!r}  ({arg})", file=sys.stderr)
            continue
        key, eq, text = arg[2:].partition('=')
        if not eq or not key:
            _fail(f"malformed argument '{arg}': expected --key=value, e.g. --batch_size=16 or --compile=False")
        if isinstance(defaults.get(key), str):
            value = text  # strings need no quotes: --device=cuda:1
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        g[key] = _check(key, value, defaults, arg)
        print(f"config: {key} = {g[key]!r}", file=sys.stderr)
    return {k: g[k] for k in defaults}


if __name__ != 'configurator':  # exec'd by a script, not imported by a test
    config = configure(globals(), sys.argv[1:])
