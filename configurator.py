"""
nanoGPT's configuration idea, made safe: a script's settings are plain module globals at its top, each with a
comment that says what it does, and

    python finetune.py config/alpaca.py --lr=3e-5 --compile=False

overrides them, the config file first, then each --key=value (parsed with ast.literal_eval; a string may
be bare). An unknown key or a value of the wrong type stops the script with exit status 2 and a one-line
message before any heavy work starts. --help lists every key with its default and its comment.

    from configurator import configure
    config = configure(globals())   # updates the globals in place, returns them as a dict

A setting whose name would hide a Python builtin is written with a trailing underscore (compile_, input_)
and given without it on the command line (--compile=True).
"""

import ast
import difflib
import io
import math
import sys
import tokenize
from pathlib import Path
from types import SimpleNamespace

SIMPLE_TYPES = (bool, int, float, str, type(None), tuple, list)


def fail(message, status=2):
    """Stop with a one-paragraph message for a person, not a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def setting_names(namespace):
    """{command-line key: global name} for a script's settings: its public lowercase globals of simple types
    (not modules, functions or UPPERCASE constants); compile_ is the key 'compile'."""
    return {name.removesuffix("_"): name for name, v in namespace.items()
            if not name.startswith("_") and not name.isupper() and isinstance(v, SIMPLE_TYPES)}


def config_keys(namespace):
    """The settings of a script as {key: value}."""
    return {key: namespace[name] for key, name in setting_names(namespace).items()}


def parse_value(key, text, default):
    """The value of --key=text, converted to default's type, or a ValueError that says why not."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = text  # a bare string: --model=gpt2-medium
    if isinstance(default, str):
        return value if isinstance(value, str) else text
    return convert(key, value, default)


def convert(key, value, default):
    if default is None:  # no type to check against: whatever the user wrote
        return value
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if value in (0, 1) and not isinstance(value, float):
            return bool(value)
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # nan or inf: no setting means that, and nan slips past every < check
                raise ValueError(f"--{key}={value!r} is not a finite number; {key} takes one (default: {default!r})")
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return type(default)(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    raise ValueError(f"--{key}={value!r} is a {type(value).__name__}, but {key} takes a "
                     f"{type(default).__name__} (default: {default!r})")


def unknown_key_message(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    close += [k for k in known if k not in close and (key in k or k in key)][:3 - len(close)]
    hint = f" (did you mean {' or '.join(repr(k) for k in close)}?)" if close else ""
    return f"unknown config key '{key}'{hint}; run with --help to list them all"


def read_config_file(path):
    if not Path(path).is_file():
        fail(f"config file '{path}' does not exist (a positional argument names a config/*.py file; "
             f"settings are given as --key=value)")
    namespace = {}
    try:
        exec(compile(Path(path).read_text(), str(path), "exec"), namespace)
    except SyntaxError as e:
        fail(f"config file '{path}' is not valid Python: {e.msg} at line {e.lineno}; it holds lines like lr = 3e-5")
    except (Exception, SystemExit) as e:  # a config file that raises, or calls exit(): it sets no settings
        fail(f"config file '{path}' failed to run ({e.__class__.__name__}: {e}); it holds lines like lr = 3e-5")
    return config_keys(namespace)


def comments(path):
    """{global name: the comment on the line(s) of its assignment} in a Python file: the one place a setting
    is explained, shown by --help."""
    try:
        source = Path(path).read_text()
        tree = ast.parse(source)
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, SyntaxError, tokenize.TokenError):
        return {}
    by_line = {t.start[0]: t.string.lstrip("# ").strip() for t in tokens if t.type == tokenize.COMMENT}
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            text = " ".join(by_line[n] for n in range(node.lineno, node.end_lineno + 1) if n in by_line)
            found[node.targets[0].id] = text
    return found


def print_help(namespace):
    doc, names = namespace.get("__doc__"), setting_names(namespace)
    if doc:
        print(doc.strip() + "\n")
    explained = comments(namespace["__file__"]) if namespace.get("__file__") else {}
    print("settings (override with --key=value):")
    width = max(len(k) for k in names)
    shown = {key: f"  --{key:<{width}} = {namespace[name]!r}" for key, name in names.items()}
    column = min(max(map(len, shown.values())), 48)  # comments line up, unless a default is very long
    for key, name in names.items():
        print(f"{shown[key]:<{column}}  # {explained[name]}" if explained.get(name) else shown[key])


def configure(namespace, argv=None):
    """Apply a config file and --key=value arguments to namespace's settings; return them as a dict."""
    argv = sys.argv[1:] if argv is None else argv
    names = setting_names(namespace)
    defaults = config_keys(namespace)
    if any(a in ("-h", "--help") for a in argv):
        print_help(namespace)
        sys.exit(0)
    overrides = {}  # all checked before any is applied
    for path in [a for a in argv if not a.startswith("--")]:
        for key, value in read_config_file(path).items():
            if key not in defaults:
                fail(f"{path}: {unknown_key_message(key, defaults)}")
            try:
                overrides[key] = convert(key, value, defaults[key])
            except ValueError as e:
                fail(f"{path}: {e}")
    for arg in argv:
        if not arg.startswith("--"):
            continue
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            fail(f"'{arg}' has no value: write --{key}=VALUE")
        if key not in defaults:
            fail(unknown_key_message(key, defaults))
        try:
            overrides[key] = parse_value(key, text, defaults[key])
        except ValueError as e:
            fail(str(e))
    namespace.update({names[key]: value for key, value in overrides.items()})
    return config_keys(namespace)


def checked(config, problems):
    """config with its settings as attributes (c.lr), once problems (what is wrong with them, found before any
    work starts) is empty; else stop with all of them in one line."""
    if problems:
        fail("; ".join(problems))
    return SimpleNamespace(**config)


def seed_problems(seed):
    """[the problem] with a seed that numpy's and torch's generators would not both take, or []."""
    return [] if 0 <= seed < 2 ** 63 else [f"seed={seed} must be a whole number from 0 to 2**63 - 1"]


def given_keys(argv=None):
    """The settings named on the command line or in a config file there: what a resumed run was asked to
    change, as opposed to what it should take from its checkpoint."""
    argv = sys.argv[1:] if argv is None else argv
    keys = {a[2:].partition("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    for path in [a for a in argv if not a.startswith("--")]:
        keys |= set(read_config_file(path))
    return keys
