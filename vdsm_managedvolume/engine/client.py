"""managedvolume-cinderlib-client: the engine's cinderlib client, drop-in.

ovirt-engine runs ``<client> SUB-COMMAND DRIVER_JSON DB_URL CORRELATION_ID
[ARGS...]`` once per storage operation and reads our stdout (see
``runner`` for the exact lines, ``args`` for the command line).  This
module is only the process around an operation:

1. stdout is reserved for the one line the engine parses: file descriptor
   1 is pointed at stderr for everything else (a library's print(), a C
   library's warning), and the answer is written to a private copy of the
   original stdout at the very end;
2. inline secrets on argv are hidden from /proc/PID/cmdline as early as
   possible (setproctitle), for the rest of the process's life;
3. the request goes to the warm service when one is running (``warm``),
   else runs here (``runner``): same bytes, same exit code;
4. the process ends with ``os._exit`` right after flushing: no second of
   interpreter and cinderlib teardown per operation.
"""

import logging
import os
import sys

from vdsm_managedvolume import errors
from vdsm_managedvolume import mask

from . import args
from . import runner
from . import warm

log = logging.getLogger("vdsm_managedvolume.engine")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    out = _reserve_stdout()
    try:
        _hide_secrets_from_cmdline(argv)
        if argv[:1] in (["-h"], ["--help"]):
            _finish(out, runner.Outcome(args.USAGE.encode("utf-8")))
        try:
            opts, request = args.parse(argv)
        except errors.EngineUsage as e:
            _finish(out, runner.error(e, runner.EXIT_USAGE))
        socket_path = opts.socket or args.default_socket()
        if opts.serve:
            _exit(warm.serve(socket_path, opts.log_file, opts.log_level))
        outcome = None
        if not opts.cold:
            outcome = warm.forward(request, socket_path)
        if outcome is None:
            outcome = runner.run(request)
        _finish(out, outcome)
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        # The traceback goes to the log (stderr by default), never stdout.
        log.exception("Unexpected error")
        _finish(out, runner.error("internal error: {}: {}".format(
            type(e).__name__, mask.mask_text(str(e)))))


# Private helpers

def _reserve_stdout():
    """Keep the real stdout for the answer; send fd 1 writes to stderr."""
    sys.stdout.flush()
    out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _hide_secrets_from_cmdline(argv):
    masked = [mask.mask_text(a) for a in argv]
    if masked == argv:
        return
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(" ".join(
        ["managedvolume-cinderlib-client"] + masked))


def _finish(out, outcome):
    data = outcome.output
    try:
        while data:
            data = data[os.write(out, data):]
    except OSError:
        pass    # the reader went away; the exit code still tells
    _exit(outcome.exit_code)


def _exit(code):
    try:
        logging.shutdown()
        sys.stderr.flush()
    finally:
        os._exit(code)
