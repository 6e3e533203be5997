"""``mypyc_attr`` for the data-plane modules, with or without mypy installed.

mypyc reads ``@mypyc_attr(...)`` on a class while it compiles (it recognises
``mypy_extensions.mypyc_attr``, re-exported here) and never calls it; run as
plain Python the decorator does nothing. ``mypy_extensions`` comes with mypy,
so a pure install without mypy gets the do-nothing fallback below.

Not ``if TYPE_CHECKING: ... else: ...``: mypyc compiles the ``else`` branch
as unreachable, and reaching it raises at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["mypyc_attr"]

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # no mypy here: nothing will read the decorator
    if TYPE_CHECKING:
        from _typeshed import IdentityFunction

    def mypyc_attr(*attrs: str, **kwattrs: object) -> IdentityFunction:
        return lambda cls: cls
