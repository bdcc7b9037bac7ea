"""managedvolume-cinderlib-client: the engine's cinderlib client, drop-in.

ovirt-engine runs ``<client> SUB-COMMAND DRIVER_JSON DB_URL CORRELATION_ID
[ARGS...]`` once per storage operation and reads our stdout (see
``runner`` for the exact lines, ``args`` for the command line).  This
module is only the process around an operation:

1. stdout is reserved for the one line the engine parses: file descriptor
   1 is pointed at stderr for everything else (a library's print(), a C
   library's warning), and the answer is written to a private copy of the
   original stdout at the very end.  The engine merges stderr into stdout,
   so once the command line is read, both go to the log file (or
   /dev/null) unless logging to stderr was asked for (``_quiet_stderr``);
2. inline secrets on argv are hidden from /proc/PID/cmdline as early as
   possible (setproctitle), for the rest of the process's life;
3. the request goes to the warm service when one is running
   (``forward``), else runs here (``runner``): same bytes, same exit code;
   only the latter loads anything heavy;
4. the process ends with ``os._exit`` right after flushing: no second of
   interpreter and cinderlib teardown per operation.

When the warm service answers, this process is most of what the engine
waits for (~20 ms of Python start-up, then a millisecond of work), so the
forwarding path loads only this module, ``args``, ``forward``, ``outcome``,
``errors``, the standard library's ``json`` and the built-in
``faulthandler`` (stacks on SIGUSR1): no logging, no ``socket``
module (``forward`` uses ``_socket``), and the masker only when argv may
hold a secret at all (``_may_hold_secret``).
"""

import os
import sys

from vdsm_managedvolume import errors

from . import args
from . import forward
from . import outcome

# Every shape ``mask.mask_text`` hides contains one of these, in any case
# (its secret words, ``auth_``, a URL's ``user:password@``, a keyring's
# ``key =`` or ``AQ...==``); an argument without any has nothing to hide.
# tests/engine_client_test.py keeps the list in step with ``mask``.
SECRET_HINTS = ("passw", "secret", "key", "token", "credential", "auth",
                "one_time_pass", "@", "aq")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    _dump_stacks_on_signal()
    out = _reserve_stdout()
    opts = None
    try:
        exposed = _hide_secrets_from_cmdline(argv)
        if argv[:1] in (["-h"], ["--help"]):
            _finish(out, outcome.Outcome(args.USAGE.encode("utf-8")))
        if argv[:1] == ["--version"]:
            from vdsm_managedvolume import __version__
            _finish(out, outcome.Outcome("managedvolume-cinderlib-client "
                                         "{}\n".format(__version__).encode()))
        try:
            opts, request = args.parse(argv)
        except errors.EngineUsage as e:
            _finish(out, outcome.error(e, outcome.EXIT_USAGE))
        except errors.EngineError as e:
            # A command line that is well formed but cannot work (a driver
            # configuration without volume_driver).
            _finish(out, outcome.error(e, outcome.EXIT_FAILED))
        if request is not None:
            _quiet_stderr(request.log_file)
            if exposed:
                _warn_exposed(request)
        socket_path = opts.socket or args.default_socket()
        if opts.serve:
            from . import warm
            # The service's own log: stderr (the journal) unless a file is
            # named; the requests it runs log where each request says.
            service_log = "" if opts.log_file == args.LOG_STDERR else \
                opts.log_file
            _exit(warm.serve(socket_path, service_log, opts.log_level))
        result = None
        if not opts.cold:
            result = forward.forward(request, socket_path)
        if result is None:
            # Only now the heavy part: logging setup, threads, cinderlib.
            from . import runner
            result = runner.run(request)
        _finish(out, result)
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        from vdsm_managedvolume import mask
        reason = "{}: {}".format(type(e).__name__, mask.mask_text(str(e)))
        _log_unexpected(reason, opts)
        _finish(out, outcome.error("internal error: " + reason))


# Private helpers

def _reserve_stdout():
    """Keep the real stdout for the answer; send fd 1 writes to stderr."""
    sys.stdout.flush()
    out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _quiet_stderr(log_file):
    """Point fds 1 and 2 at the log file: nothing but the answer may reach
    the engine (a library's print, a C library's warning, logging's last
    resort).  ``log_file`` "" means stderr was asked for: left alone.  A
    log file that cannot be opened here: /dev/null (the runner's logging
    falls back to the run directory's file on its own)."""
    if not log_file:
        return
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)),
                    exist_ok=True)
        fd = os.open(log_file, flags, 0o640)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    os.close(fd)


def _dump_stacks_on_signal():
    """On SIGUSR1 every command writes its threads' stacks to fd 2 (the
    log file once _quiet_stderr pointed it there), as the warm service
    does (warm.py): a cold run shows its operation, a forwarding command
    its wait for the service.  First thing in main: SIGUSR1's default
    action would kill a forwarding command while the service goes on with
    its request.  (``_signal``: ``signal`` builds its enums at import.)"""
    import _signal
    import faulthandler
    # Ignored first (this cannot fail): without a usable fd 2 (started
    # with stderr closed) faulthandler refuses, and the command must
    # still run, as it did before it dumped stacks.
    _signal.signal(_signal.SIGUSR1, _signal.SIG_IGN)
    try:
        faulthandler.register(_signal.SIGUSR1, all_threads=True)
    except (RuntimeError, ValueError, OSError):
        pass


def _may_hold_secret(text):
    """False only when ``mask.mask_text(text)`` would change nothing.
    Text that is not ASCII may: the masker's patterns fold case the
    Unicode way ("\u017fecret" is a secret's key), lower() does not
    (as ``mask.plainly_clean``)."""
    if not text.isascii():
        return True
    lowered = text.lower()
    return any(hint in lowered for hint in SECRET_HINTS)


def _hide_secrets_from_cmdline(argv):
    """Rewrite /proc/PID/cmdline masked; True when argv holds a secret
    that cannot be hidden (setproctitle is missing)."""
    if not any(_may_hold_secret(a) for a in argv):
        return False
    from vdsm_managedvolume import mask
    masked = [mask.mask_text(a) for a in argv]
    if masked == argv:
        return False
    try:
        import setproctitle
    except ImportError:
        return True
    setproctitle.setproctitle(" ".join(
        ["managedvolume-cinderlib-client"] + masked))
    return False


def _warn_exposed(request):
    """Say in the log (never on stdout) that the secrets on this command
    line stayed visible: without setproctitle (a dependency of the
    package; missing only from a broken install) that happened silently.
    Only then is logging loaded by a forwarding command."""
    import logging
    from . import runner
    try:
        runner.configure_logging(request.log_level, request.log_file,
                                 request.correlation_id)
    except Exception:
        return
    logging.getLogger("vdsm_managedvolume.engine").warning(
        "setproctitle is not installed: the secrets on this command line "
        "stay readable by every local user in /proc/%d/cmdline (install "
        "python3-setproctitle, or pass DRIVER_JSON and DB_URL as @FILE, - "
        "or env:)", os.getpid())


def _log_unexpected(reason, opts):
    """One ERROR line in the log (never stdout, stderr only when asked);
    the traceback only at DEBUG, as the runner does for failed operations."""
    import logging
    from . import runner
    if opts is None:
        level = os.environ.get(args.ENV_LOG_LEVEL) or "INFO"
        filename = os.environ.get(args.ENV_LOG_FILE, "")
    else:
        level, filename = opts.log_level, opts.log_file
    filename = args.resolve_log_file(filename)
    try:
        runner.configure_logging(level, filename)
    except Exception:
        pass    # a bad level or log file: logging's last resort (stderr)
    log = logging.getLogger("vdsm_managedvolume.engine")
    log.error("Unexpected error: %s (the traceback is logged at DEBUG)",
              " ".join(reason.split()))
    log.debug("Unexpected error", exc_info=True)


def _finish(out, result):
    data = result.output
    try:
        while data:
            data = data[os.write(out, data):]
    except OSError:
        pass    # the reader went away; the exit code still tells
    _exit(result.exit_code)


def _exit(code):
    try:
        if "logging" in sys.modules:
            sys.modules["logging"].shutdown()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    main()
