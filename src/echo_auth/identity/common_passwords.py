"""Passwords too common to accept: the blocklist NIST SP 800-63B asks verifiers to keep.

The lists come from the maintained ``zxcvbn`` package: its ``passwords`` list (the most
frequent passwords of public breach corpora) and its two word lists (English Wikipedia,
US television and film), since a lone dictionary word is what a guesser tries right after
the breached passwords. They are loaded on first use, not at import time, and only the
entries that could pass the length rule at all are kept.
"""

from __future__ import annotations

from functools import cache
from typing import Final

BLOCKLISTS: Final = ("passwords", "english_wikipedia", "us_tv_and_film")
# ``password_min_length`` may not be set below 8 (see config.py), so shorter entries can
# never be the deciding check.
_SHORTEST_KEPT: Final = 8


@cache
def _blocklist() -> frozenset[str]:
    from zxcvbn.frequency_lists import FREQUENCY_LISTS  # type: ignore[import-untyped]

    return frozenset(
        word.casefold()
        for name in BLOCKLISTS
        for word in FREQUENCY_LISTS[name]
        if len(word) >= _SHORTEST_KEPT
    )


def is_common_password(password: str) -> bool:
    """True when ``password`` is, ignoring case, an entry of the blocklist."""
    return password.casefold() in _blocklist()
