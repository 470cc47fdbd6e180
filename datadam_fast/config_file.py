"""``distill --config FILE.toml`` and the ``config.toml`` every run writes.

A config file sets ``distill`` flags by their long names, one ``name = value`` line each
(``batch-real = 64``, ``no-dsa = true``, ``compile = false``; ``batch_real`` is accepted too).
Flags given on the command line override the file. Every run writes its fully resolved
configuration (preset defaults filled in: norm, power, depth, iterations, ...) as
``config.toml`` into its directory; ``distill --config RUN/config.toml --out NEW`` repeats the
run. Where the run goes (``out``, ``resume``, ``overwrite``) is not written: it is given on the
command line. A value that stays at "not set" (no TOML null exists) is written as a comment.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional

from .errors import UserError

CONFIG = "config.toml"
# flags that say where and whether to run, not what: never written into config.toml
_RUN_LOCATION = {"out", "resume", "overwrite", "config", "plan_only", "download", "help"}


def _key(action) -> str:
    return next(o for o in action.option_strings if o.startswith("--"))[2:]


def distill_actions(parser=None) -> Dict[str, object]:
    """``{long flag name: argparse action}`` of every ``distill`` flag."""
    if parser is None:
        from .cli_args import build_parser
        parser = build_parser().distill_parser
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


# ----------------------------------------------------------------------------- writing
def toml_value(v) -> str:
    """A flat TOML value: bool, int, float, string or a list of those."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(ch in r for ch in ".en") else r + ".0"
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__} {v!r}")


def resolved_flags(cfg, run_flags: Optional[Dict] = None) -> Dict[str, object]:
    """``{long flag name: value}`` of the resolved ``DistillConfig`` (``None`` = not set)."""
    import dataclasses
    from .cli_args import _NEGATED
    fields = {f.name for f in dataclasses.fields(cfg)}
    run_flags = run_flags or {}
    out: Dict[str, object] = {}
    for key, a in distill_actions().items():
        if a.dest in _RUN_LOCATION:
            continue
        if a.dest in run_flags:
            v = run_flags[a.dest]
        elif a.dest in _NEGATED:
            v = not getattr(cfg, _NEGATED[a.dest])
        elif a.dest in fields:
            v = getattr(cfg, a.dest)
        elif a.dest == "folder":
            v = cfg.data_opts.get("path")
        else:
            v = a.default
        out[key] = v
    return out


def format_config(flags: Dict[str, object], header: str = "") -> str:
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    for k, v in flags.items():
        lines.append(f"# {k} = (not set: the default applies)" if v is None else f"{k} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


def write_run_config(out_dir: str, cfg, run_flags: Optional[Dict] = None) -> str:
    """Write ``out_dir/config.toml`` (atomically); returns its path."""
    from ._io import atomic_write_text
    flags = resolved_flags(cfg, run_flags)
    header = ("datadam-fast distill configuration, fully resolved.\n"
              "Repeat the run: datadam-fast distill --config config.toml --out NEW_DIR")
    extra = sorted(k for k in cfg.data_opts if k != "path")
    if extra:
        header += f"\nDataset options set through the Python API are not flags and are not repeated: {extra}"
    path = os.path.join(out_dir, CONFIG)
    atomic_write_text(path, format_config(flags, header))
    return path


__all__ = ["CONFIG", "apply_config_file", "read_config_file", "write_run_config", "resolved_flags", "toml_value",
           "format_config", "distill_actions"]
