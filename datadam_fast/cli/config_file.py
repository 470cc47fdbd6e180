"""``distill --config FILE.toml``: a TOML file of ``distill`` flags (the run directory writes
the ``config.toml`` of every run: :func:`datadam_fast.distill.rundir.write_run_config`).

A config file sets ``distill`` flags by their long names, one ``name = value`` line each
(``batch-real = 64``, ``no-dsa = true``, ``compile = false``; ``batch_real`` is accepted too).
Flags given on the command line override the file. Every run writes its fully resolved
configuration (preset defaults filled in: norm, power, depth, iterations, ...) as
``config.toml`` into its directory; ``distill --config RUN/config.toml --out NEW`` repeats the
run. Where the run goes (``out``, ``resume``, ``overwrite``) is not written: it is given on the
command line. A value that stays at "not set" (no TOML null exists) is written as a comment.
"""
from __future__ import annotations

from typing import Dict

from ..distill.rundir import CONFIG
from ..errors import UserError


def _key(action) -> str:
    return next(o for o in action.option_strings if o.startswith("--"))[2:]


def distill_actions(parser) -> Dict[str, object]:
    """``{long flag name: argparse action}`` of every flag of the ``distill`` parser."""
    return {_key(a): a for a in parser._actions
            if a.option_strings and any(o.startswith("--") for o in a.option_strings) and a.dest != "help"}


def read_config_file(path: str) -> Dict[str, object]:
    import tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None
    return data


def _check(action, key: str, value, path: str):
    where = f"config file {path}: {key}"
    if isinstance(value, (dict, list)):
        raise UserError(f"{where}: expected a single value (flat 'flag = value' lines), got a "
                        f"{'table' if isinstance(value, dict) else 'list'}")
    if action.nargs == 0:  # store_true / BooleanOptionalAction
        if not isinstance(value, bool):
            raise UserError(f"{where} = {value!r}: expected true or false")
        return value
    typ = action.type
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} = {value!r}: expected an integer")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} = {value!r}: expected a number")
        value = float(value)
    elif not isinstance(value, str):
        raise UserError(f"{where} = {value!r}: expected a string")
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where} = {value!r}: expected one of {', '.join(map(str, action.choices))}")
    return value


def apply_config_file(parser, path: str) -> Dict[str, object]:
    """Make the values of ``path`` the defaults of the ``distill`` parser (so that flags on the
    command line still win). Returns ``{dest: value}``."""
    actions = distill_actions(parser)
    data = read_config_file(path)
    out = {}
    for raw, value in data.items():
        key = raw.replace("_", "-")
        action = actions.get(key)
        if action is None or key == "config":
            what = "config files do not nest" if key == "config" else "not a distill flag"
            raise UserError(f"config file {path}: unknown key {raw!r} ({what}); keys are the long names of "
                            f"'datadam-fast distill --help' flags, e.g. ipc = 10, batch-real = 64, no-dsa = true")
        out[action.dest] = _check(action, raw, value, path)
    parser.set_defaults(**out)
    return out


__all__ = ["CONFIG", "apply_config_file", "read_config_file", "distill_actions"]
