"""``${VAR}``, ``${VAR:-default}`` and ``${VAR-default}`` in beanflow.yaml.

Variables are found in the raw text and swapped for placeholders of the same length before
YAML reads it, so a variable may stand anywhere a value or a key can — in a flow mapping such
as ``{workers: ${N:-2}}`` too — and every line and column stays where it was written. After
parsing, each placeholder is replaced by its variable's value, with the shell's meaning:
``${VAR:-default}`` when VAR is unset or empty, ``${VAR-default}`` only when it is unset.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")
# a placeholder: one character of a private-use plane numbering it, padded with U+E000
_FIRST = 0xF0000
_PLACEHOLDER = re.compile("([\U000f0000-\U000ffffd])\ue000*")
_MOST = 0xFFFFD - _FIRST


class Variables:
    """The variables written in one file, and their values in ``env``."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.written: list[re.Match[str]] = []

    def protect(self, text: str) -> str:
        """``text`` with each variable (up to 65,000 of them) swapped for its placeholder."""

        def placeholder(match: re.Match[str]) -> str:
            if len(self.written) >= _MOST:
                return match.group(0)
            self.written.append(match)
            return chr(_FIRST + len(self.written) - 1) + "\ue000" * (len(match.group(0)) - 1)

        return _VARIABLE.sub(placeholder, text)

    def present(self, text: str) -> bool:
        return bool(self.written) and _PLACEHOLDER.search(text) is not None

    def original(self, text: str) -> str:
        """``text`` with placeholders turned back into what was written (for messages)."""
        return _PLACEHOLDER.sub(lambda m: self._match(m).group(0), text)

    def substitute(self, text: str, unset: Callable[[str], None]) -> str:
        """``text`` with each variable replaced by its value; ``unset(name)`` is called for a
        variable that is not set and has no default (it is replaced by nothing)."""

        def value(placeholder: re.Match[str]) -> str:
            name, operator, default = self._match(placeholder).groups()
            if name in self.env and not (operator == ":-" and self.env[name] == ""):
                return self.env[name]
            if operator is not None:
                return default
            unset(name)
            return ""

        return _PLACEHOLDER.sub(value, text)

    def whole(self, text: str) -> bool:
        """Whether ``text`` is exactly one variable."""
        match = _PLACEHOLDER.fullmatch(text)
        return match is not None and len(text) == len(self._match(match).group(0))

    def _match(self, placeholder: re.Match[str]) -> re.Match[str]:
        return self.written[ord(placeholder.group(1)) - _FIRST]
