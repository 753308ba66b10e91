"""Settings read from the environment, the same way everywhere: a variable set but empty (as templating often
leaves one) means unset, and a value that cannot be used is a ValueError that names the variable, the value and
what it takes, so that the server stops with one line about it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def env_text(env: Mapping[str, str], variable: str) -> str | None:
    return env.get(variable) or None


def env_integer(env: Mapping[str, str], variable: str, default: int | None, minimum: int,
                or_word: str | None = None) -> int | None:
    """``or_word``: the word the variable also takes (read by the caller), for the message."""
    return _env_number(env, variable, default, int, lambda number: number >= minimum,
                       f"give a whole number, at least {minimum}" + (f", or {or_word}" if or_word else ""))


def env_seconds(env: Mapping[str, str], variable: str, default: float) -> float:
    return _env_number(env, variable, default, float, lambda seconds: 0 < seconds < float("inf"),
                       "give a number of seconds above 0")


def _env_number(env: Mapping[str, str], variable: str, default, parse: Callable[[str], Any],
                acceptable: Callable[[Any], bool], wanted: str):
    if (value := env_text(env, variable)) is None:
        return default
    try:
        number = parse(value)
    except ValueError:
        number = None
    if number is None or not acceptable(number):
        raise ValueError(f"{variable}={value!r}: {wanted}")
    return number


def env_choice(env: Mapping[str, str], variable: str, allowed: tuple[str, ...], default: str | None = None) -> str:
    """One of ``allowed``; ``default`` (else the first) when unset."""
    value = env_text(env, variable) or default or allowed[0]
    if value not in allowed:
        raise ValueError(f"{variable}={value!r}: use one of {', '.join(allowed)}")
    return value
