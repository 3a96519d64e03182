"""The ``--help`` layout of the three commands: every option shows its default.

argparse's ``ArgumentDefaultsHelpFormatter`` also prints ``(default: False)`` for flags and
``(default: None)`` for options whose default is computed later, and shows lists as Python
lists; this one shows a default only where there is a value, in the form it is typed.
"""
from __future__ import annotations

import argparse
import copy


def shown_default(value) -> str:
    """A default as the user would type it: ``0 5 15`` for a list, ``0.001`` for a float."""
    if isinstance(value, (list, tuple)):
        return " ".join(shown_default(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def has_default(action: argparse.Action) -> bool:
    """Whether ``action`` has a default worth showing (not a flag, not None, not suppressed)."""
    return (action.nargs != 0 and action.default is not None
            and action.default is not argparse.SUPPRESS and action.default != [])


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless its text already speaks of its
    default (many say what the default depends on, e.g. "default: the paper's")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if has_default(action) and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text

    def _expand_help(self, action: argparse.Action) -> str:
        shown = copy.copy(action)
        if has_default(action):
            shown.default = shown_default(action.default)
        return super()._expand_help(shown)
