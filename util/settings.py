"""The settings machinery: every flag is declared once, as a field of a frozen dataclass (type, default, help).

* :func:`setting` declares a field with its help text.
* :class:`SettingsParser` turns groups of such dataclasses into an ``argparse`` parser whose ``--help`` shows the
  real defaults, refuses unknown flags with one line that names them (and the method they belong to, if any),
  and returns only what the command line set.
* :func:`preparse` reads the few values needed before that parser can be built (which model, which checkpoint).
* :func:`resolve` merges layers of values over the dataclass defaults, validates each group (``__post_init__``
  and the group's ``check``) and records where each value came from, for :meth:`Settings.table`.

What the settings are (the shared groups, the run-level rules) is ``util.config``; each method's own settings are in
its model file.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from util.distributed import is_main_process
from util.errors import UserError


class SettingsError(UserError):
    """A setting that cannot be used; the message is the one ``error:`` line the user sees. Every rank resolves the
    same settings, so every rank raises it and rank 0 says it."""

    def __init__(self, message: str):
        super().__init__(message, every_rank=True)


def setting(default: Any, help: str) -> Any:  # noqa: A002  (argparse's word)
    """A dataclass field with its help text (tuples and other defaults are copied per instance)."""
    return dataclasses.field(default=default, metadata={"help": help})


def str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def field_help(cls: type, name: str) -> str:
    """Help text of a field, looked up through the base classes (a subclass may redeclare only the default)."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return f.metadata["help"]
    return ""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _value_parser(tp: Any) -> tuple[Callable[[str], Any], dict]:
    """(function that parses one command-line word, extra argparse kwargs) for a field type."""
    tp, optional = _unwrap_optional(tp)
    extra: dict = {}
    origin = typing.get_origin(tp)
    if tp is bool:
        parse: Callable[[str], Any] = str2bool
        extra = dict(nargs="?", const=True, metavar="{true,false}")
    elif origin is Literal:
        choices = typing.get_args(tp)
        parse, extra = type(choices[0]), dict(choices=choices)
    elif origin is tuple:
        items = typing.get_args(tp)
        parse = items[0]
        extra = dict(nargs="+" if items[-1] is Ellipsis else len(items))
    elif tp in (int, float, str):
        parse = tp
    else:
        raise TypeError(f"unsupported setting type {tp!r}")
    if optional:  # 'none' on the command line gives None (e.g. --clip_grad none turns a recipe's clipping off)
        inner = parse

        def parse(word: str, inner=inner):
            return None if word.lower() == "none" else inner(word)

        parse.__name__ = getattr(inner, "__name__", "value")
    return parse, extra


def coerce(value: Any, tp: Any) -> Any:
    """A stored value (JSON / checkpoint: lists where tuples were) as the field's type."""
    tp, _ = _unwrap_optional(tp)
    if value is not None and typing.get_origin(tp) is tuple:
        return tuple(value)
    return value


@dataclass(frozen=True)
class Group:
    """One dataclass of settings, shown under ``title`` in ``--help``, with the rules that span more than one field
    of a run: ``implied`` gives what the command line implies, as a layer just under it (source name, {setting:
    value}; e.g. an explicit --blr drops an absolute lr from the recipe), ``check`` validates the resolved settings
    (e.g. settings of two groups that cannot go together, or a directory that must be writable), ``derive`` gives
    values that follow from the resolved ones, as a last layer (source name, {setting: value}), e.g.
    --global_batch's accum_iter."""

    title: str
    cls: type
    implied: Callable[[dict], tuple[str, dict]] | None = None
    check: Callable[[Settings], None] | None = None
    derive: Callable[[Settings], tuple[str, dict]] | None = None

    def names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.cls)]

    def default(self, name: str) -> Any:
        f = self.cls.__dataclass_fields__[name]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


Layers = Sequence[tuple[str, dict]]  # (where the values come from, {setting: value}), lowest precedence first


def layered_defaults(groups: Sequence[Group], layers: Layers) -> tuple[dict[str, Any], dict[str, str]]:
    """Every setting's value after applying ``layers`` over the dataclass defaults, and where each came from.
    Keys that no group declares are skipped (a checkpoint also stores other scripts' settings)."""
    values, sources = {}, {}
    for g in groups:
        hints = typing.get_type_hints(g.cls)
        for n in g.names():
            values[n], sources[n] = g.default(n), "default"
            for layer, given in layers:
                if n in given:
                    values[n], sources[n] = coerce(given[n], hints[n]), layer
    return values, sources


class OneLineParser(argparse.ArgumentParser):
    """argparse, but every mistake is a SettingsError (one ``error:`` line, exit 2) instead of usage + exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise SettingsError(message)


class SettingsParser:
    """The command line of one entry script (for one model): a flag per field of every group."""

    def __init__(self, prog: str, description: str, groups: Sequence[Group], base_layers: Layers = (),
                 subject: str = "", help_command: str = "", owner_of: Callable[[str], list[str]] = lambda name: []):
        """``base_layers``: the recipe and preset values, shown as the defaults in ``--help``; ``subject`` and
        ``help_command`` name what the flags configure and how to list them, for the error on a foreign flag."""
        self.prog, self.groups, self.subject, self.owner_of = prog, list(groups), subject or prog, owner_of
        self.help_command = help_command or f"{prog} --help"
        seen: dict[str, str] = {}
        for g in self.groups:
            for name in g.names():
                if name in seen:  # one home per flag: two groups may not declare the same setting
                    raise TypeError(f"setting {name!r} is declared by both {seen[name]} and {g.cls.__name__}")
                seen[name] = g.cls.__name__
        self.defaults, _ = layered_defaults(self.groups, base_layers)
        self.parser = self._build(description, self.defaults)  # --help shows the resolved defaults
        self._given_parser = self._build(description, None)     # parses what the command line gives, nothing else

    def _build(self, description: str, defaults: dict | None) -> OneLineParser:
        parser = OneLineParser(prog=self.prog, description=description, allow_abbrev=False,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for g in self.groups:
            hints = typing.get_type_hints(g.cls)
            arg_group = parser.add_argument_group(g.title)
            for f in dataclasses.fields(g.cls):
                parse, extra = _value_parser(hints[f.name])
                default = defaults[f.name] if defaults is not None else argparse.SUPPRESS
                arg_group.add_argument(f"--{f.name}", type=parse, default=default,
                                       help=field_help(g.cls, f.name) or " ", **extra)
        return parser

    def names(self) -> list[str]:
        return [n for g in self.groups for n in g.names()]

    def format_help(self) -> str:
        return self.parser.format_help()

    def parse(self, argv: Sequence[str]) -> dict:
        """The settings the command line gives explicitly ({} for none). ``-h`` prints the help and exits 0."""
        if any(a in ("-h", "--help") for a in argv):
            self.parser.print_help()
            raise SystemExit(0)
        given, rest = self._given_parser.parse_known_args(list(argv))
        if rest:
            raise SettingsError(self.unknown_message(rest))
        return vars(given)

    def unknown_message(self, rest: list[str]) -> str:
        flags = [a.split("=", 1)[0] for a in rest if a.startswith("-")]
        if not flags:
            return f"unexpected argument(s) {' '.join(rest)} (every setting is a --flag)"
        described = []
        for flag in flags:
            owners = self.owner_of(flag.lstrip("-"))
            described.append(f"{flag} (a setting of {' and '.join(owners)})" if owners else flag)
        verb = "is not a setting" if len(flags) == 1 else "are not settings"
        return f"{', '.join(described)} {verb} of {self.subject}; see {self.help_command}"


class Settings:
    """The resolved settings of a run: one frozen dataclass instance per group, read as flat attributes.

    ``settings.epochs`` reads a value, ``settings.of(XTRAConfig)`` returns a group's typed instance; nothing can be
    assigned (``AttributeError``)."""

    __slots__ = ("_groups", "_sources")

    def __init__(self, groups: dict[type, Any], sources: dict[str, str]):
        object.__setattr__(self, "_groups", dict(groups))
        object.__setattr__(self, "_sources", dict(sources))

    def __getattr__(self, name: str) -> Any:
        """A setting (what a group computes from its settings is reached through :meth:`of`)."""
        for instance in self._groups.values():
            if name in instance.__dataclass_fields__:
                return getattr(instance, name)
        raise AttributeError(f"no setting {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"settings are read-only once resolved (tried to set {name!r})")

    def of(self, cls: type) -> Any:
        return self._groups[cls]

    def as_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), as stored in args.json and in checkpoints."""
        out: dict[str, Any] = {}
        for instance in self._groups.values():
            out.update({k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(instance).items()})
        return out

    def source(self, name: str) -> str:
        return self._sources.get(name, "default")

    def table(self) -> str:
        """One line per setting: name, value and where it came from (unless it is the dataclass default)."""
        values = self.as_dict()
        width = max(map(len, values))
        lines = []
        for name, value in values.items():
            src = self.source(name)
            lines.append(f"  {name:<{width}} = {value!r}" + (f"   [{src}]" if src != "default" else ""))
        return "\n".join(lines)


def resolve(groups: Sequence[Group], layers: Layers) -> Settings:
    """Merge ``layers`` over the dataclass defaults (later layers win) and build each group, whose
    ``__post_init__`` validates; then each group's ``derive`` layer, and each group's ``check``. Their ValueError
    becomes a SettingsError."""
    try:
        settings = _build(groups, layers)
        derived = [layer for g in groups if g.derive is not None for layer in [g.derive(settings)] if layer[1]]
        if derived:
            settings = _build(groups, [*layers, *derived])
        for g in groups:
            if g.check is not None:
                g.check(settings)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    return settings


def _build(groups: Sequence[Group], layers: Layers) -> Settings:
    values, sources = layered_defaults(groups, layers)
    return Settings({g.cls: g.cls(**{n: values[n] for n in g.names()}) for g in groups}, sources)


def command_line_layers(argv: Sequence[str], parser: SettingsParser) -> list[tuple[str, dict]]:
    """What the command line gives (the last layer), under what each group's ``implied`` rule finds it implies."""
    given = parser.parse(argv)
    implied = [g.implied(given) for g in parser.groups if g.implied is not None]
    return [layer for layer in implied if layer[1]] + [("command line", given)]


def preparse(argv: Sequence[str], **kinds: type) -> dict[str, Any]:
    """The settings named in ``kinds`` (name -> int, str or bool) from the command line, None where absent, before
    the full parser exists (they decide which parser to build and which checkpoint to read): an argparse parser
    that knows only them reads what it can (``parse_known_args``, as timm's train.py reads ``--config`` first).
    A flag without its value is one error line."""
    return take_flags([a for a in argv if a not in ("-h", "--help")], **kinds)[0]


def take_flags(argv: Sequence[str], **kinds: type) -> tuple[dict[str, Any], list[str]]:
    """:func:`preparse`'s values, and the rest of the command line without those flags (a driver's own flags taken
    out of what it passes on)."""
    parser = OneLineParser(add_help=False, allow_abbrev=False)
    for name, kind in kinds.items():
        extra = dict(type=str2bool, nargs="?", const=True) if kind is bool else dict(type=kind)
        parser.add_argument(f"--{name}", default=None, **extra)
    known, rest = parser.parse_known_args(list(argv))
    return vars(known), rest


def print_resolved(settings: Settings, header: str) -> None:
    if is_main_process():
        print(f"{header}\n{settings.table()}", flush=True)
