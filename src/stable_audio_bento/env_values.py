"""Settings read from the environment, the same way everywhere: a variable set but empty (as templating often
leaves one) means unset, and a value that cannot be used is a ValueError that names the variable, the value and
what it takes, so that the server stops with one line about it."""

from __future__ import annotations

from collections.abc import Mapping


def env_text(env: Mapping[str, str], variable: str) -> str | None:
    return env.get(variable) or None


def env_integer(env: Mapping[str, str], variable: str, default: int | None, minimum: int) -> int | None:
    if (value := env_text(env, variable)) is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{variable}={value!r}: give a whole number, at least {minimum}")
    return number


def env_seconds(env: Mapping[str, str], variable: str, default: float) -> float:
    if (value := env_text(env, variable)) is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is None or not 0 < seconds < float("inf"):
        raise ValueError(f"{variable}={value!r}: give a number of seconds above 0")
    return seconds


def env_choice(env: Mapping[str, str], variable: str, allowed: tuple[str, ...], default: str | None = None) -> str:
    """One of ``allowed``; ``default`` (else the first) when unset."""
    value = env_text(env, variable) or default or allowed[0]
    if value not in allowed:
        raise ValueError(f"{variable}={value!r}: use one of {', '.join(allowed)}")
    return value
