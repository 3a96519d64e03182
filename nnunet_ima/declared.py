"""Settings declared once, in the dataclass field itself.

Each field of a settings dataclass carries, in ``dataclasses.field(metadata=...)``, its help
text and its rule (the range or the choices it must lie in), made by :func:`setting`::

    steps: int = setting(20, help="PGD iterations", rule=Count(1))

From that one declaration :func:`validate_declared` checks an instance (called in its
``__post_init__``), and a command line builds the option of the field (type, default,
choices, help) instead of repeating them.

A settings class that composes others (``TrainerSettings`` holds an ``AttackConfig`` and an
``IMAConfig``) is still written and read as one flat JSON object: :class:`FlatKeys` lists, per
composing class, which flat key is which field of which part (``pgd_steps`` is
``attack.steps``), so that files keep their keys while the fields are declared once.

An out-of-range value is an :class:`InvalidSetting`, which names the field; a composing class
renames it to its flat key (:meth:`InvalidSetting.renamed`), and a command line spells it as
its option (:meth:`InvalidSetting.spelled`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple, Type

METADATA_KEY = "nnunet_ima.declared"

# ``{name}`` in a problem text refers to another setting (spelled like ``name`` is).
_REFERENCE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


class InvalidSetting(ValueError):
    """Setting ``name`` is out of range; ``problem`` is the rest of the sentence.

    ``problem`` refers to other settings as ``{key}``; ``str()`` spells every setting by its
    name (``"delta (2) must not exceed eps_max (1)"``), :meth:`spelled` by any other spelling
    (a command line's option names).
    """

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(self.spelled(lambda key: key))

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with this setting and the ones it refers to spelled by ``spell``."""
        return f"{spell(self.name)} " + _REFERENCE.sub(lambda m: spell(m.group(1)), self.problem)

    def renamed(self, rename: Callable[[str], str]) -> "InvalidSetting":
        """The same error in other names (a composing class's flat keys)."""
        return InvalidSetting(rename(self.name),
                              _REFERENCE.sub(lambda m: "{" + rename(m.group(1)) + "}",
                                             self.problem))


# ----------------------------------------------------------------------------- rules
class Rule(Protocol):
    """What a field's value must be. ``check`` raises :class:`InvalidSetting` naming ``name``;
    ``value_type`` is what a command line parses the option as."""

    value_type: type

    def check(self, name: str, value: Any) -> None: ...


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Positive:
    """A finite number > 0."""

    value_type: type = float

    def check(self, name: str, value: Any) -> None:
        if not (_is_number(value) and math.isfinite(value) and value > 0):
            raise InvalidSetting(name, f"must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class Count:
    """An integer >= ``minimum`` (``True`` / ``False`` are not counts)."""

    minimum: int = 0
    value_type: type = int

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < self.minimum:
            raise InvalidSetting(name, f"must be an integer >= {self.minimum}, got {value!r}")


@dataclass(frozen=True)
class Integer:
    """Any integer (``True`` / ``False`` are not integers): a seed."""

    value_type: type = int

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidSetting(name, f"must be an integer, got {value!r}")


@dataclass(frozen=True)
class UnitInterval:
    """A number in ``[0, 1]``."""

    value_type: type = float

    def check(self, name: str, value: Any) -> None:
        if not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise InvalidSetting(name, f"must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class OpenUnitInterval:
    """A number strictly between 0 and 1."""

    value_type: type = float

    def check(self, name: str, value: Any) -> None:
        if not (isinstance(value, (int, float)) and 0 < float(value) < 1):
            raise InvalidSetting(name, f"must lie strictly between 0 and 1, got {value!r}")


@dataclass(frozen=True)
class Choice:
    """One of ``options`` (the module's tuple of names, e.g. ``nnunet_ima.norms.NORMS``)."""

    options: Tuple[str, ...]
    value_type: type = str

    def __post_init__(self):
        object.__setattr__(self, "options", tuple(self.options))

    def check(self, name: str, value: Any) -> None:
        if value not in self.options:
            raise InvalidSetting(name, f"must be one of {self.options}, got {value!r}")


@dataclass(frozen=True)
class Flag:
    """``True`` or ``False``."""

    value_type: type = bool

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise InvalidSetting(name, f"must be true or false, got {value!r}")


@dataclass(frozen=True)
class Text:
    """A non-empty string (a name, a path)."""

    value_type: type = str

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, str) or not value:
            raise InvalidSetting(name, f"must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class Several:
    """A tuple of values, each by ``each`` (a command line takes them as ``nargs="+"``, of the
    type and choices of ``each``); at least ``minimum`` of them."""

    each: Rule
    minimum: int = 1

    @property
    def value_type(self) -> type:
        return self.each.value_type

    def __getattr__(self, attribute: str) -> Any:
        if attribute == "options":  # the choices of each value, where ``each`` has them
            return getattr(self.each, "options")
        raise AttributeError(attribute)

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, tuple) or len(value) < self.minimum:
            raise InvalidSetting(name, f"must be a tuple of at least {self.minimum} value"
                                       f"{'s' * (self.minimum != 1)}, got {value!r}")
        for item in value:
            self.each.check(name, item)


# ----------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Declaration:
    """What a field declares: its help text, its rule, and whether ``None`` is allowed (the help
    then says what ``None`` means)."""

    help: str
    rule: Rule
    optional: bool = False

    def check(self, name: str, value: Any) -> None:
        if value is None and self.optional:
            return
        self.rule.check(name, value)

    @property
    def choices(self) -> Optional[Tuple[str, ...]]:
        return getattr(self.rule, "options", None)


def setting(default: Any = MISSING, *, help: str, rule: Rule, optional: bool = False):
    """A dataclass field whose help text and rule travel with it (see the module docstring)."""
    return dataclasses.field(default=default,
                             metadata={METADATA_KEY: Declaration(help, rule, optional)})


def declaration(cls: Type, name: str) -> Declaration:
    """The declaration of field ``name`` of dataclass ``cls``."""
    for f in fields(cls):
        if f.name == name and METADATA_KEY in f.metadata:
            return f.metadata[METADATA_KEY]
    raise KeyError(f"{cls.__name__} declares no setting {name!r}")


def field_default(cls: Type, name: str) -> Any:
    """The default of field ``name`` of ``cls`` (``None`` for a field without one)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            return f.default_factory() if f.default_factory is not MISSING else None
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def validate_declared(obj: Any) -> None:
    """Check every declared field of ``obj`` by its rule, in declaration order.

    Raises:
        InvalidSetting: the first field out of range, named by its field name.
    """
    for f in fields(obj):
        declared = f.metadata.get(METADATA_KEY)
        if declared is not None:
            declared.check(f.name, getattr(obj, f.name))


# -------------------------------------------------------------------------- flat keys
@dataclass(frozen=True)
class FlatKeys:
    """The flat JSON keys of a settings class that composes settings dataclasses ("parts").

    ``parts`` maps the composing class's attribute to the part's class (``"attack":
    AttackConfig``); ``keys`` maps each flat key to ``(part, field)``: ``"pgd_steps": ("attack",
    "steps")`` stores ``settings.attack.steps`` under the key ``pgd_steps``. Every other field
    of the composing class is a key of its own name. A part's fields missing from ``keys`` are
    not written (they keep their defaults when read). A part that is ``None`` (an optional part)
    is written as its fields' defaults, ``None`` for a field without one.
    """

    parts: Mapping[str, Type]
    keys: Mapping[str, Tuple[str, str]]

    def key_of(self, part: str, name: str) -> str:
        """The flat key of field ``name`` of ``part`` (the name itself when it has none)."""
        for key, target in self.keys.items():
            if target == (part, name):
                return key
        return name

    def part_keys(self, part: str) -> Dict[str, str]:
        """``{flat key: field}`` of one part, in the order of ``keys``."""
        return {key: name for key, (p, name) in self.keys.items() if p == part}

    def own_fields(self, cls: Type) -> Tuple[str, ...]:
        """The fields of ``cls`` that are flat keys of their own (all but the parts)."""
        return tuple(f.name for f in fields(cls) if f.name not in self.parts)

    def known(self, cls: Type) -> Tuple[str, ...]:
        """Every flat key of ``cls``."""
        return self.own_fields(cls) + tuple(self.keys)

    def check_parts(self, obj: Any, optional: Tuple[str, ...] = ()) -> None:
        """Raise ``TypeError`` unless each part of ``obj`` is an instance of its class (or
        ``None``, for the parts named in ``optional``)."""
        for part, cls in self.parts.items():
            value = getattr(obj, part)
            if not (isinstance(value, cls) or (value is None and part in optional)):
                raise TypeError(f"{type(obj).__name__}.{part} must be an instance of "
                                f"{cls.__name__}, got {value!r}")

    def flatten(self, obj: Any) -> Dict[str, Any]:
        """``obj`` as one flat dict: its own fields, then each part's keys."""
        flat = {name: getattr(obj, name) for name in self.own_fields(type(obj))}
        for key, (part, name) in self.keys.items():
            value = getattr(obj, part)
            flat[key] = (getattr(value, name) if value is not None
                         else field_default(self.parts[part], name))
        return flat

    def split(self, values: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
        """Flat ``values`` -> ``(own fields, {part: {field: value}})`` (every part listed)."""
        own = {k: v for k, v in values.items() if k not in self.keys}
        parts: Dict[str, Dict[str, Any]] = {part: {} for part in self.parts}
        for key, value in values.items():
            if key in self.keys:
                part, name = self.keys[key]
                parts[part][name] = value
        return own, parts

    def build_part(self, part: str, values: Mapping[str, Any], base: Any = None) -> Any:
        """Part ``part`` from its field ``values`` (over ``base`` when given); an out-of-range
        value is an :class:`InvalidSetting` named by its flat key."""
        try:
            if base is not None:
                return dataclasses.replace(base, **values)
            return self.parts[part](**values)
        except InvalidSetting as e:
            raise e.renamed(lambda name: self.key_of(part, name)) from None


def flag_name(key: str) -> str:
    """The command-line option of a flat key: ``pgd_steps`` -> ``--pgd-steps``."""
    return "--" + key.replace("_", "-")


def option_arguments(cls: Type, name: str, help_prefix: str = "") -> Dict[str, Any]:
    """``argparse.add_argument`` keywords of field ``name`` of ``cls`` from its declaration:
    ``type`` and ``choices`` from its rule, the field's ``default``, ``help``."""
    declared = declaration(cls, name)
    kwargs: Dict[str, Any] = {"help": help_prefix + declared.help,
                              "default": field_default(cls, name)}
    if declared.choices is not None:
        kwargs["choices"] = declared.choices
    elif declared.rule.value_type is bool:
        raise TypeError(f"{cls.__name__}.{name}: true/false settings have no generated option")
    else:
        kwargs["type"] = declared.rule.value_type
    return kwargs


def add_option(parser: Any, cls: Type, name: str, *names: str, help_prefix: str = "",
               **overrides: Any) -> Any:
    """Add field ``name`` of ``cls`` to ``parser`` (an ``argparse`` parser or argument group) as
    the option :func:`flag_name` spells it, or as ``names`` where given (``-f``, ``--fold``),
    storing into ``name``, with the keywords of :func:`option_arguments`. A field whose default
    is a list or tuple takes one or more values (``nargs="+"``). ``overrides`` replace or add
    keywords (a ``metavar``, a ``default`` that the command computes, another ``dest``).

    Returns:
        The ``argparse`` action.
    """
    kwargs = option_arguments(cls, name, help_prefix)
    if isinstance(kwargs["default"], (list, tuple)):
        kwargs.update(nargs="+", default=list(kwargs["default"]))
    kwargs["dest"] = name
    kwargs.update(overrides)
    return parser.add_argument(*(names or (flag_name(name),)), **kwargs)
