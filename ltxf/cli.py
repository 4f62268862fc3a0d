"""The one command-line convention of ``train.py`` and every tool in ``tools/``.

Flags are the config field names as written in Python and in ``config.json``: underscores, nested sections joined
with a dot (``--optim.learning_rate 2e-4``, ``--lora_path x.safetensors``). Booleans take a value (``--skip_audio
True``, ``--model.train_connectors False``), so a preset's default can be switched either way with the same flag.
The official tools' hyphenated names (``--resolution-buckets``) are accepted as aliases of the underscore names.
tyro builds the parser from the dataclass; attribute docstrings are the ``--help`` texts; a config's own
``ValueError`` is reported in tyro's error box under the flag's section name.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import tyro

ConfigT = TypeVar("ConfigT")

_FLAG = re.compile(r"--[a-z][a-z0-9_.-]*")

CONVENTION = {"use_underscores": True, "config": (tyro.conf.FlagConversionOff, tyro.conf.AvoidSubcommands)}
"""The keyword arguments every ltxf command line passes to tyro. ``AvoidSubcommands``: an optional section with a
default (the flexible strategy's ``strategy.video`` / ``strategy.audio``) is set by its flags
(``--strategy.audio.is_generated False``), not chosen as a subcommand."""


def canonical_flags(args: Sequence[str]) -> list[str]:
    """Accept the official tools' hyphenated spelling (``--resolution-buckets``) as an alias of the canonical
    underscore flag (``--resolution_buckets``): users come from the official trainer's scripts. Only flag names
    are rewritten (``--name`` or ``--name=value``); values are left as they are."""
    out = []
    for arg in args:
        name, sep, value = arg.partition("=")
        if _FLAG.fullmatch(name):
            name = name[:2] + name[2:].replace("-", "_")
        out.append(name + sep + value)
    return out


def parse_bool(text: str) -> bool:
    """A boolean flag's value for the benchmark tools' argparse parsers, as tyro reads it: True or False."""
    if text not in ("True", "False"):
        raise ValueError(f"expected True or False, got {text!r}")
    return text == "True"


def parse(config_type: type[ConfigT], *, args: Sequence[str] | None, description: str | None,
          default: ConfigT | None = None, prog: str | None = None, console_outputs: bool = True) -> ConfigT:
    """``tyro.cli`` with the ltxf convention."""
    args = canonical_flags(sys.argv[1:] if args is None else args)
    return tyro.cli(config_type, args=args, description=description, default=default, prog=prog,
                    console_outputs=console_outputs, **CONVENTION)


def parse_preset(config_type: type[ConfigT], presets: Mapping[str, Callable[[], ConfigT]], *,
                 args: Sequence[str] | None, prog: str, console_outputs: bool = True) -> ConfigT:
    """``PRESET [--section.field VALUE ...]``: the preset's config with overrides.

    Without a known preset name first (``--help``, nothing, a typo) tyro's preset chooser answers, listing every
    preset with the first paragraph of its docstring. With one, the preset's config is the default of a plain
    ``tyro.cli`` over ``config_type``, so errors name the user's flags (``optim``), not a wrapper's internals.
    """
    args = canonical_flags(sys.argv[1:] if args is None else args)
    summaries = {name: " ".join((fn.__doc__ or name).strip().split("\n\n")[0].split()) for name, fn in presets.items()}
    if not args or args[0] not in presets:
        configs = {name: (summaries[name], fn()) for name, fn in presets.items()}
        return tyro.extras.overridable_config_cli(configs, args=args, prog=prog, console_outputs=console_outputs,
                                                  **CONVENTION)
    name = args[0]
    return parse(config_type, args=args[1:], description=summaries[name], default=presets[name](),
                 prog=f"{prog} {name}", console_outputs=console_outputs)
