"""
nanoGPT's configuration idea, made safe: a script's settings are plain module globals at its top, and

    python finetune.py config/alpaca.py --lr=3e-5 --compile=False

overrides them, the config file first, then each --key=value (parsed with ast.literal_eval; a string may
be bare). An unknown key or a value of the wrong type stops the script with exit status 2 and a one-line
message before any heavy work starts. --help lists every key with its default.

    from configurator import configure
    config = configure(globals())   # updates the globals in place, returns them as a dict
"""

import ast
import difflib
import sys
from pathlib import Path

SIMPLE_TYPES = (bool, int, float, str, type(None), tuple, list)


def fail(message, status=2):
    """Stop with a one-paragraph message for a person, not a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def config_keys(namespace):
    """The settings of a script: its public lowercase globals of simple types (not modules, functions or
    UPPERCASE constants)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper() and isinstance(v, SIMPLE_TYPES)}


def parse_value(key, text, default):
    """The value of --key=text, converted to default's type, or a ValueError that says why not."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
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
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return type(default)(value)
    raise ValueError(f"--{key}={value!r} is a {type(value).__name__}, but {key} takes a "
                     f"{type(default).__name__} (default: {default!r})")


def unknown_key_message(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    close += [k for k in known if k not in close and (key in k or k in key)][:3 - len(close)]
    hint = f" (did you mean {' or '.join(repr(k) for k in close)}?)" if close else ""
    return f"unknown config key '{key}'{hint}; run with --help to list them all"


def apply_config_file(namespace, path, defaults):
    for key, value in read_config_file(path).items():
        if key not in defaults:
            fail(f"{path}: {unknown_key_message(key, defaults)}")
        try:
            namespace[key] = convert(key, value, defaults[key])
        except ValueError as e:
            fail(f"{path}: {e}")


def read_config_file(path):
    if not Path(path).is_file():
        fail(f"config file '{path}' does not exist (a positional argument names a config/*.py file; "
             f"settings are given as --key=value)")
    namespace = {}
    exec(Path(path).read_text(), namespace)
    return config_keys(namespace)


def print_help(defaults, doc):
    if doc:
        print(doc.strip() + "\n")
    print("settings (override with --key=value):")
    width = max(len(k) for k in defaults)
    for key, value in defaults.items():
        print(f"  --{key:<{width}} = {value!r}")


def configure(namespace, argv=None):
    """Apply a config file and --key=value arguments to namespace's settings; return them as a dict."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = config_keys(namespace)
    if any(a in ("-h", "--help") for a in argv):
        print_help(defaults, namespace.get("__doc__"))
        sys.exit(0)
    for path in [a for a in argv if not a.startswith("--")]:
        apply_config_file(namespace, path, defaults)
    overrides = {}  # all checked before any is applied
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
    namespace.update(overrides)
    return config_keys(namespace)
