"""The tail every ``python -m model.X`` stage command shares: bad input ends the run with one readable line."""

from __future__ import annotations

from typing import Callable, NoReturn


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Call ``main()`` and exit with its status; a ``FileNotFoundError`` or ``ValueError`` (a missing file, a bad
    setting: the user's input) exits with status 1 and ``error: <message>`` on stderr instead of a traceback."""
    try:
        status = main()
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    raise SystemExit(status)


__all__ = ["run_main"]
