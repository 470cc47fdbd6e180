"""The ``datadam-fast`` command line: :mod:`.main` (the subcommands and the entry point),
:mod:`.args` (every flag and its help, derived from the engine's config and registries),
:mod:`.config_file` (``distill --config FILE.toml``)."""
from .args import build_parser
from .main import entry, main

__all__ = ["build_parser", "entry", "main"]
