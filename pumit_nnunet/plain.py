"""The one conversion between config dataclasses and the plain dicts that checkpoints and JSON files hold.

:func:`to_plain` turns a dataclass into ``dict``/``list``/scalars (tuples become lists, nested dataclasses dicts);
:func:`from_plain` rebuilds it, strictly by default: a key the class does not know is an error naming it (an old
file either loads, because every key it holds is still understood and absent keys take today's defaults, or it is
refused with the keys named). Stdlib only, so the command-line layer can use it without importing torch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, TypeVar

from pumit_nnunet.errors import DataError

__all__ = ["PlainFormatError", "to_plain", "from_plain"]

T = TypeVar("T")


class PlainFormatError(DataError, ValueError):
    """A stored config holds keys this version does not know, or lacks required ones (exit 1 on the CLI)."""


def to_plain(value: Any) -> Any:
    """A dataclass (or a structure of them) as plain JSON/``weights_only``-safe values: dicts, lists, scalars."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _is_tuple_field(field: dataclasses.Field) -> bool:
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    return str(annotation).replace("typing.", "").lower().startswith("tuple") or isinstance(field.default, tuple)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) if isinstance(v, list) else v for v in value) if isinstance(value, list) else value


def from_plain(cls: type[T], data: Mapping[str, Any], strict: bool = True, what: str | None = None,
               source: str | os.PathLike | None = None) -> T:
    """Rebuild dataclass ``cls`` from ``data`` (lists become tuples where the field is a tuple).

    ``strict`` refuses keys ``cls`` does not know (naming them); with ``strict=False`` they are dropped. Absent keys
    take the class's defaults; absent required keys are refused by name. ``what``/``source`` name the record and the
    file in the message.
    """
    what = what or cls.__name__
    if not isinstance(data, Mapping):
        raise PlainFormatError(f"{what} must be a mapping, got {type(data).__name__}", source)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(by_name))
    if unknown and strict:
        raise PlainFormatError(f"{what} holds keys this version does not know: {', '.join(unknown)} (written by "
                               "another version of pumit-nnunet?)", source)
    missing = sorted(name for name, f in by_name.items() if name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise PlainFormatError(f"{what} lacks required keys: {', '.join(missing)}", source)
    values = {k: (_as_tuple(v) if _is_tuple_field(by_name[k]) else v) for k, v in data.items() if k in by_name}
    return cls(**values)
