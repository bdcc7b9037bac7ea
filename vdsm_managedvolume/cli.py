"""What every console script of the package shares.

``main`` functions are wrapped with ``entry_point`` so that the ordinary
ways a command-line tool ends are not tracebacks: the reader of our output
went away (``... | head``), or the user pressed Ctrl-C.
"""

import functools
import os
import sys

# 128 + SIGPIPE / SIGINT: what a shell reports for a program killed by them.
EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130


def entry_point(main):
    """Wrap a console script's ``main``."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
            sys.stdout.flush()
            return result
        except BrokenPipeError:
            # Python would complain again flushing stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    return wrapper
