"""What a stage's `main()` does with an error the user can fix: one clear line and exit code 2, or, with
`--debug`, the exception itself with its traceback.

    try:
        ...
    except USER_ERRORS as e:
        return report_error(e, args.debug)
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline import storage

USER_ERRORS = (ValueError, storage.StorageError)
"""A bad value or config (`ConfigError`), a manifest that does not fit (`ManifestError`), both ValueErrors, or
storage that cannot be read or written. Anything else is a bug and keeps its traceback."""
EXIT_USER_ERROR = 2


def report_error(error: BaseException, debug: bool) -> int:
    """Write `error: <message>` to stderr and return the exit code; with `debug`, re-raise `error`."""
    if debug:
        raise error
    sys.stderr.write(f"error: {error}\n")
    return EXIT_USER_ERROR


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """`main(argv)` for a stage whose `main` lets user errors out: one line and exit code 2 for them, the
    traceback when `--debug` is among the arguments."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except USER_ERRORS as e:
        return report_error(e, "--debug" in argv)
