"""Argument parsing shared by the command-line tools with their own flag registries.

`fit`, `predict` and `demo_images` keep their flags in a private
`absl.flags.FlagValues` (their names clash with eval's, and tests import them
together); `parse` gives them one behaviour for help, flag errors and stray
arguments, and `report_errors` one error path: an error of bad input (the
package's error classes) is one `error: ...` line and exit status 2, never a
traceback. What is process-wide (`XLA_FLAGS` for eval's `--devices`) is set
here, at the edge, never by the engine in `protorefine_jax.app`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence

from absl import flags

from protorefine_jax.config import RefineConfig
from protorefine_jax.data.errors import DatasetError
from protorefine_jax.io.errors import CheckpointError

# Bad input of every kind: flags, files, folders, model directories (ModelFormatError and
# ModelMismatchError are ValueErrors; UnsafePathError too), checkpoints, datasets.
INPUT_ERRORS = (ValueError, OSError, DatasetError, CheckpointError)


class Definers:
    """absl's `DEFINE_*` bound to one tool's flag registry (`fit`, `predict`) and module.

    `module_name` (the tool's `__name__`) is where `--helpfull` lists the flags
    (absl names a module run as a program by `sys.argv[0]`, as here).
    """

    def __init__(self, flag_values: flags.FlagValues, module_name: str):
        module_name = sys.argv[0] if module_name == "__main__" else module_name
        bind = functools.partial(
            functools.partial, flag_values=flag_values, module_name=module_name
        )
        self.string = bind(flags.DEFINE_string)
        self.bool = bind(flags.DEFINE_bool)
        self.integer = bind(flags.DEFINE_integer)
        self.float = bind(flags.DEFINE_float)
        self.enum = bind(flags.DEFINE_enum)

    def refine_flags(self, names: Sequence[str], prefix: str = "") -> None:
        """One flag per `RefineConfig` field in `names`, unset by default.

        Its type is the field's default's (bool, int, str or float) and its
        help the field's docstring entry (`refine_help`, after `prefix`).
        """
        defaults = RefineConfig()
        for name in names:
            kind = type(getattr(defaults, name))
            define = {bool: self.bool, int: self.integer, str: self.string}.get(kind, self.float)
            define(name, None, refine_help(name, prefix=prefix))


def report_errors(fn: Callable[[], object]) -> int:
    """Runs `fn`; returns 0, or 2 after printing `error: <message>` for bad input."""
    try:
        fn()
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def parse(
    flag_values: flags.FlagValues, argv: list[str], doc: str, essential: Sequence[str] = ()
) -> int | None:
    """Parses `argv` into `flag_values`.

    Args:
      flag_values: the tool's flag registry.
      argv: `sys.argv`-style list (program name first).
      doc: the tool's module docstring, printed above the flags for `--help`.
      essential: the flags `--help` lists first (`help_text`).

    Returns:
      None when the tool should run; else its exit status (0 after printing
      help, 2 after printing a flag error or unexpected arguments).
    """
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        full = "--helpfull" in argv[1:]
        print(help_text(flag_values, doc, essential, full=full))
        return 0
    # Every run starts from the defaults: a flag of an earlier run in this process
    # (a notebook, a test) must not carry over to a run that does not give it.
    flag_values.unparse_flags()
    try:
        rest = flag_values(argv)
    except flags.Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(rest) > 1:
        print(f"error: unexpected arguments: {rest[1:]}", file=sys.stderr)
        return 2
    return None


# --------------------------------------------------------------------------- start-up noise

# JAX logs "Unable to initialize backend 'tpu': ..." at INFO from this logger on every
# start without a TPU; absl's app.run (eval) shows INFO by default.
_JAX_BACKEND_LOGGER = "jax._src.xla_bridge"


def quiet_jax_startup(verbose: bool = False) -> None:
    """Hides JAX's INFO lines about platforms it did not find (e.g. no TPU); keeps warnings.

    Only the log level of JAX's backend-discovery logger is raised, to
    WARNING: which platform JAX picks is not touched (`JAX_PLATFORMS` stays the
    user's; CUDA is used when installed), and its warnings (a GPU seen but no
    CUDA jaxlib, a CUDA start-up failure) still show. Nothing is changed with
    `verbose`, when the user set `JAX_LOGGING_LEVEL`, or when the logger
    already has a level of its own.
    """
    logger = logging.getLogger(_JAX_BACKEND_LOGGER)
    if verbose or os.environ.get("JAX_LOGGING_LEVEL") or logger.level != logging.NOTSET:
        return
    logger.setLevel(logging.WARNING)


# --------------------------------------------------------------------------- host devices


def request_host_devices(count: int) -> None:
    """Asks XLA for `count` CPU host devices (0: one per core) if JAX has not started.

    The command line's edge, not the engine's: the option is process-wide
    (`XLA_FLAGS`, read once when JAX starts), so only a tool that owns its
    process sets it, from its `--devices` flag, before anything starts JAX.
    XLA:CPU runs most of a program's operations on one thread; split into
    host devices, a sharded batch keeps every core busy (docs/method.md,
    "Batching": PatchCore and PatchCore+ end to end about 1.4x faster on 2
    cores). Only the CPU platform reads the option, so it changes nothing
    where the devices are GPUs. Once JAX has started it cannot take effect
    and is not set; `app.batching.device_mesh` then names the fix if too
    few devices exist.
    """
    from protorefine_jax.app.batching import HOST_DEVICES_FLAG

    count = (os.cpu_count() or 1) if count == 0 else count
    current = os.environ.get("XLA_FLAGS", "")
    if count <= 1 or HOST_DEVICES_FLAG in current:
        return
    from jax._src import xla_bridge  # no public "has JAX started" query

    # A JAX without the query: assume it started (device_mesh then names the fix).
    if not getattr(xla_bridge, "backends_are_initialized", lambda: True)():
        os.environ["XLA_FLAGS"] = f"{current} {HOST_DEVICES_FLAG}={count}".strip()


# --------------------------------------------------------------------------- --help

_FIELD_LINE = re.compile(r"^ {6}(\w+): (.*)$")


def refine_field_docs() -> dict[str, str]:
    """`{field: text}`: the field entries of `RefineConfig`'s docstring, joined to one line."""
    docs: dict[str, list[str]] = {}
    current = None
    for line in (RefineConfig.__doc__ or "").splitlines():
        m = _FIELD_LINE.match(line)
        if m:
            current = m.group(1)
            docs[current] = [m.group(2)]
        elif current and line.startswith(" " * 8) and line.strip():
            docs[current].append(line.strip())
        else:
            current = None
    return {k: " ".join(v).replace("`", "") for k, v in docs.items()}


def first_sentence(text: str) -> str:
    """`text` up to its first full stop outside brackets (and not in a number or "e.g.")."""
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        elif ch == "." and depth == 0 and (i + 1 == len(text) or text[i + 1] == " "):
            if not text[max(0, i - 3) : i + 1].endswith(("e.g.", "i.e.")):
                return text[: i + 1]
    return text


def refine_help(name: str, prefix: str = "") -> str:
    """One help line of a refinement flag, from `RefineConfig`'s docstring (its first sentence)."""
    text = first_sentence(refine_field_docs().get(name, "")).rstrip(".")
    field = next(f for f in dataclasses.fields(RefineConfig) if f.name == name)
    text = text[:1].upper() + text[1:]
    return f"{prefix}{text}. [RefineConfig.{name}; its default: {field.default}]"


def _choices(flag) -> list[str] | None:
    values = getattr(flag.parser, "enum_values", None)
    if values:
        return list(values)
    from protorefine_jax.app import schema

    field = schema.FLAGS.get(flag.name)
    return list(field.choices) if getattr(field, "choices", None) else None


def _usage(flag) -> str:
    if flag.boolean:
        return f"--[no]{flag.name}"
    choices = _choices(flag)
    if choices:
        return f"--{flag.name}={'|'.join(choices)}"
    return f"--{flag.name}"


def _default(flag) -> str:
    empty = isinstance(flag.default, str | list | tuple) and not flag.default
    if flag.default is None or empty:
        return ""
    value = str(flag.default).lower() if flag.boolean else flag.default_as_str.strip("'")
    return f" [default: {value}]"


def _own_flags(flag_values: flags.FlagValues) -> list[str]:
    """The tool's flags: every registered flag but absl's own (logging, flagfile, ...)."""
    names = set()
    for module, module_flags in flag_values.flags_by_module_dict().items():
        if "absl" in module:
            continue
        names.update(f.name for f in module_flags)
    return sorted(names)


def help_text(
    flag_values: flags.FlagValues,
    doc: str,
    essential: Sequence[str] = (),
    full: bool = False,
    special: dict[str, str] | None = None,
) -> str:
    """`--help`: the docstring, the essential flags first (one line each), then the others.

    Refinement flags (`schema.REFINE_FLAGS`) come last, under their own
    heading. `full` (`--helpfull`) appends absl's complete listing.
    `special`: help of essential names absl handles itself (`--flagfile`).
    """
    from protorefine_jax.app import schema

    def line(name: str, wrap: bool) -> str:
        if special and name in special:
            return f"  --{name}  {special[name]}"
        flag = flag_values[name]
        head = f"  {_usage(flag)}"
        text = re.sub(r"^<[^>]*>: ", "", flag.help) + _default(flag)  # absl's enum prefix
        if not wrap:
            return f"{head}  {text}"
        return "\n".join(
            [head, *textwrap.wrap(text, 94, initial_indent=" " * 6, subsequent_indent=" " * 6)]
        )

    own = _own_flags(flag_values)
    refine = [n for n in schema.REFINE_FLAGS if n in own and n not in essential]
    others = [n for n in own if n not in essential and n not in refine]
    out = [doc.rstrip(), ""]
    if essential:
        out += ["Essential flags:"] + [line(n, wrap=False) for n in essential]
        out += ["", "Other flags:"]
    else:
        out += ["Flags:"]
    out += [line(n, wrap=True) for n in others]
    if refine:
        out += ["", "Refinement flags (PatchCore+; unset: the shipped default; docs/method.md):"]
        out += [line(n, wrap=True) for n in refine]
    if full:
        out += ["", "All flags, absl's own included:", flag_values.get_help()]
    else:
        out += ["", "--helpfull also lists absl's own flags (--flagfile, logging)."]
    return "\n".join(out) + "\n"
