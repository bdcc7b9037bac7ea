"""managedvolume-client: vdsm-client for the managed volume verbs.

Same syntax, output, errors and exit codes as vdsm-client, so that what an
admin types against vdsm works here and back::

    managedvolume-client [-h] [-a HOST] [-p PORT] [--insecure]
                         [--flow-id ID] [--timeout SEC] [-f FILE|-]
                         [--cert FILE --key FILE --cacert FILE]
                         [--state-dir DIR]
                         Namespace method [name=value ...]

    $ managedvolume-client ManagedVolume detach_volume vol_id=<uuid>
    true
    $ managedvolume-client ManagedVolume attach_volume -f params.json

- ``name=value`` values are strings, as in vdsm-client; where the schema
  says a param is a boolean, a number, a list or an object, the value is
  read as JSON first (``include_secrets=true``, ``vol_ids=["..."]``) - vdsm
  would reject the string anyway.  Nested params go in ``-f file.json`` or
  ``-f -`` (stdin): one JSON object holding every param; not combinable
  with ``name=value``.
- Success: ``json.dumps(result, indent=4, sort_keys=True)`` on stdout,
  exit 0.
- A failed command: on stderr, exit 1::

      managedvolume-client: Command ManagedVolume.detach_volume with args
      {'vol_id': 'x'} failed:
      (code=-32602, message=Invalid parameter vol_id: ...)

  (vdsm-client's shape, with our program name; secrets in the args are
  masked).  Connection failures and timeouts also exit 1, Ctrl-C 130:
  both only stop the waiting, the call goes on on the host, and the
  message says so with the command that shows the outcome.  Usage errors
  exit 2 (a list typed bare, ``vol_ids=[<uuid>]`` after the shell ate
  its quotes, among them).
- Help comes from the schema: ``Namespace -h`` lists the verbs,
  ``Namespace verb -h`` their params with types and defaults.

TLS: mutual, by default with vdsm's PKI files (like vdsm-client, no host
name check: vdsm's certificate names the host, not "localhost").
``--state-dir DIR`` uses the development PKI the agent created under
``DIR/pki`` (client-cert.pem, client-key.pem, cacert.pem; host names
checked).  ``--cert/--key/--cacert`` name other files.  ``--insecure``
speaks plain TCP.  Without any of them, on a development machine where
vdsm's files are missing, the error names the ``.state`` of a running
``make run`` agent nearby (``config.state_dir_hint``).
"""

import argparse
import json
import math
import os
import socket
import ssl
import sys
import textwrap

from . import __version__
from . import cli
from . import config
from . import errors
from . import mask
from . import schema as schema_module

PROG = "managedvolume-client"

# Every user of the host can read a process's arguments (/proc/PID/cmdline,
# ps) and the shell keeps them in its history.
SECRETS_HELP = (
    "Secrets (CHAP passwords, keyrings, any connection_info) do not belong "
    "on the command line: name=value arguments are visible to every user "
    "of the host in /proc/<pid>/cmdline and stay in the shell history. "
    "Pass them with -f FILE (a file readable by you only) or -f - "
    "(standard input) instead.")

# JSON-typed params: read name=value values of these as JSON first.
_STRING_TYPES = ("string",)

EXAMPLES = """\
examples:
  {0} -a host1 Host getCapabilities
  {0} ManagedVolume volumes_info vol_ids='["<vol_id>"]'
  {0} -f attach.json ManagedVolume attach_volume
  {0} ManagedVolume detach_volume vol_id=<vol_id>
  {0} --flow-id flow-1 -p 54323 ManagedVolume volumes_info
  {0} --state-dir .state Host getCapabilities   # make run's

exit status:
  0    the call succeeded; the result is on standard output
  1    the call failed (the error, as vdsm-client prints it)
  2    usage error
  130  interrupted while waiting: the call may still complete""".format(
    PROG)


# --timeout: seconds, finite, above zero and at most a day (a socket
# timeout or a wait of 1e300 s overflows: a traceback, not an answer).
MAX_TIMEOUT = 86400.0

# Params nested deeper than this are refused (no verb's are deeper than
# a few levels; 10,000 levels ended in a RecursionError traceback).
MAX_NESTING = mask.MAX_DEPTH


class UsageError(Exception):
    """Raised when usage is wrong (exit 2)."""


def timeout_arg(text):
    """argparse type of --timeout (a usage error otherwise: exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "invalid timeout {!r}: not a number".format(text))
    if not (0 < value <= MAX_TIMEOUT):   # NaN fails every comparison
        raise argparse.ArgumentTypeError(
            "invalid timeout {!r}: seconds above 0 and at most {:.0f}"
            .format(text, MAX_TIMEOUT))
    return value


def port_arg(text):
    """argparse type of -p (a usage error otherwise: exit 2); never
    wrapped (getaddrinfo took 70000 as 4464)."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(
            "invalid port {!r}: a number from 1 to 65535".format(text))
    return int(text)


@cli.entry_point
def main(args=None, connect=None):
    """Run the client; returns nothing, exits with vdsm-client's codes.

    connect: ``connect(host, port, ssl_context, timeout)`` returning an
        object with ``call(method, params, flow_id)`` and ``close()``;
        defaults to ``stompclient.Client`` (tests pass a stub).
    """
    schema = schema_module.load()
    parser = option_parser(schema)
    opts = parser.parse_args(args)
    try:
        method = "{}.{}".format(opts.namespace, opts.method)
        params = request_params(schema, method, opts)
        ssl_context = tls_context(opts)
    except UsageError as e:
        parser.error(str(e))
    if opts.method_args and mask.mask(params) != params:
        sys.stderr.write("{}: warning: a secret was passed as name=value; "
                         "it is visible in /proc and the shell history "
                         "(use -f FILE or -f -)\n".format(PROG))

    if connect is None:
        from . import stompclient
        connect = stompclient.Client
    try:
        result = _run(connect, opts, ssl_context, method, params)
    except _Failure as e:
        _fail(str(e))
    sys.stdout.write(json.dumps(result, indent=4, sort_keys=True) + "\n")
    sys.stdout.flush()


def option_parser(schema):
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_wrap("Call the managed volume verbs of a vdsm host "
                          "or a managedvolume-agent, as vdsm-client does."),
        epilog=EXAMPLES + "\n\n" + _wrap(
            "Run '{} NAMESPACE -h' for the verbs of a namespace, "
            "'{} NAMESPACE VERB -h' for a verb's params. {} See "
            "managedvolume-client(1).".format(PROG, PROG, SECRETS_HELP)),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version="{} {}".format(PROG, __version__))
    parser.add_argument("-a", "--host", dest="host", default="localhost",
                        help="host address (default localhost)")
    parser.add_argument("-p", "--port", dest="port", default=54321,
                        type=port_arg, help="port (default 54321)")
    parser.add_argument("--insecure", "--unsecure", dest="use_tls",
                        action="store_false",
                        help="plain TCP, no TLS")
    parser.set_defaults(use_tls=True)
    parser.add_argument("--flow-id", dest="flow_id", metavar="ID",
                        help="the flow id (ovirtCorrelationId) of the call: "
                             "it appears in every log line of the call")
    parser.add_argument("--timeout", dest="timeout", default=60,
                        metavar="SEC", type=timeout_arg,
                        help="seconds to wait for the response (default "
                             "60, at most 86400); the call is not cancelled "
                             "and may still complete on the host")
    parser.add_argument("-f", "--file", dest="file", metavar="FILE|-",
                        help="read method parameters from a JSON file, "
                             "'-' for standard input (the way to pass "
                             "secrets: never as name=value)")
    tls = parser.add_argument_group(
        "TLS", textwrap.fill("default: vdsm's PKI ({}, {}, {})".format(
            config.Config.cert_file, config.Config.key_file,
            config.Config.ca_file), 76, subsequent_indent="  "))
    tls.add_argument("--cert", dest="cert", metavar="FILE",
                     help="client certificate")
    tls.add_argument("--key", dest="key", metavar="FILE", help="client key")
    tls.add_argument("--cacert", dest="cacert", metavar="FILE",
                     help="CA certificate")
    tls.add_argument("--state-dir", dest="state_dir", metavar="DIR",
                     help="use the development PKI of an agent started "
                          "with --state-dir DIR (DIR/pki)")

    namespaces = parser.add_subparsers(dest="namespace", metavar="Namespace",
                                       title="namespaces")
    namespaces.required = True
    for namespace in schema.namespaces():
        verbs = schema.verbs(namespace)
        ns_parser = namespaces.add_parser(
            namespace, help="{} verbs".format(namespace),
            description="{} verbs: {}".format(
                namespace, ", ".join(m.verb for m in verbs)))
        methods = ns_parser.add_subparsers(dest="method", metavar="method",
                                           title="verbs")
        methods.required = True
        for method in verbs:
            m_parser = methods.add_parser(
                method.verb, help=method.summary,
                description=_wrap(method.description),
                epilog=_params_help(method) + "\n\n" + _example(method)
                + "\n\n" + _wrap(SECRETS_HELP),
                formatter_class=argparse.RawDescriptionHelpFormatter)
            m_parser.add_argument(
                "-f", "--file", dest="verb_file", default=argparse.SUPPRESS,
                metavar="FILE|-",
                help="read method parameters from a JSON file, '-' for "
                     "standard input")
            m_parser.add_argument(
                "method_args", metavar="name=value", nargs="*",
                help="method arguments: name1=value1 name2=value2")
    return parser


def request_params(schema, method, opts):
    """The params dict of the request (UsageError when malformed)."""
    filename = getattr(opts, "verb_file", None) or opts.file
    if filename is not None and opts.method_args:
        raise UsageError(
            "Conflicting command line parameters: {!r} and file option: "
            "{!r}".format(opts.method_args, filename))
    if filename is not None:
        return parse_file(filename)
    return parse_params(schema.method(method), opts.method_args)


def parse_params(method, args):
    """["name=value", ...] -> {"name": value, ...}

    Values are strings, except for params the schema types as something
    else, whose values are read as JSON when they parse.
    """
    types = {p.name: p.type for p in method.params}
    params = {}
    for arg in args:
        if "=" not in arg:
            raise UsageError("Invalid param {!r}".format(arg))
        name, value = arg.split("=", 1)
        if name in types and types[name] not in _STRING_TYPES and not (
                isinstance(types[name], dict) and
                types[name].get("type") == "alias"):
            try:
                value = _json(value, name)
            except ValueError:
                if value.startswith(("[", "{")):
                    # vol_ids=["..."] typed bare: the shell ate the quotes.
                    raise UsageError(
                        "{}={} is not JSON: the shell removed the quotes "
                        "around the strings in it; quote the whole "
                        "argument: {}='[\"<uuid>\", ...]'".format(
                            name, value, name))
        params[name] = value
    return params


def parse_file(filename):
    """The params object in ``filename`` ("-": standard input), UTF-8
    JSON as the engine writes it; UsageError naming the file."""
    shown = "standard input" if filename == "-" else filename
    try:
        if filename == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(filename, "rb") as f:
                raw = f.read()
        data = raw.decode("utf-8")
    except OSError as e:
        raise UsageError(str(e))
    except UnicodeDecodeError as e:
        raise UsageError("{} is not UTF-8 JSON: byte 0x{:02x} at position "
                         "{}".format(shown, e.object[e.start], e.start))
    if not data.strip():
        raise UsageError("File is empty")
    try:
        params = _json(data, shown)
    except ValueError as e:
        raise UsageError("{} is not JSON: {}".format(shown, e))
    if not isinstance(params, dict):
        raise UsageError("The file must hold a JSON object of params")
    return params


def tls_context(opts):
    """The client SSLContext for the options, None with --insecure."""
    if not opts.use_tls:
        return None
    cert, key, ca = tls_files(opts)
    from . import pki
    try:
        return pki.client_context(ca, cert, key,
                                  check_hostname=bool(opts.state_dir))
    except (OSError, ValueError) as e:
        missing = [f for f in (cert, key, ca) if not os.path.exists(f)]
        if missing:
            problem = "TLS files not found: {}".format(", ".join(missing))
        else:
            problem = "Cannot use TLS files {}, {}, {}: {}".format(
                cert, key, ca, e)
        if opts.state_dir:
            hint = ("the agent started with --state-dir {} creates its "
                    "development PKI in {} at first start".format(
                        opts.state_dir, os.path.join(opts.state_dir, "pki")))
        elif opts.cert or opts.cacert:
            hint = ""
        else:
            hint = config.state_dir_hint(PROG) or (
                "vdsm's PKI is used unless --cert, --key and --cacert, or "
                "--state-dir DIR (an agent's development PKI) say "
                "otherwise")
        raise UsageError(problem + ("; " + hint if hint else ""))


def tls_files(opts):
    """(cert, key, cacert) to use: flags, else --state-dir, else vdsm's."""
    if opts.state_dir:
        from . import pki
        cfg = config.with_state_dir(config.Config(), opts.state_dir)
        cert, key, ca = pki.client_files(cfg)
    else:
        defaults = config.Config()
        cert, key, ca = (defaults.cert_file, defaults.key_file,
                         defaults.ca_file)
    if opts.cert or opts.key:
        if not (opts.cert and opts.key):
            raise UsageError("--cert and --key go together")
        cert, key = opts.cert, opts.key
    if opts.cacert:
        ca = opts.cacert
    return cert, key, ca


# Private helpers

def _json(text, where):
    """``json.loads(text)``; UsageError when nested deeper than
    MAX_NESTING or holding a number no JSON peer reads (NaN, Infinity, or
    one too large for a float, ``1e400``: Python's json would read it as
    infinity and send ``Infinity``); ValueError when it is no JSON."""
    def refuse(number):
        raise UsageError("{}: {} is not a finite number".format(
            where, number))

    def finite(number):
        value = float(number)
        if not math.isfinite(value):
            refuse(number)
        return value

    try:
        value = json.loads(text, parse_float=finite, parse_constant=refuse)
    except RecursionError:
        value = None
        too_deep = True
    else:
        too_deep = _depth_over(value, MAX_NESTING)
    if too_deep:
        raise UsageError("{}: JSON nested more than {} levels deep".format(
            where, MAX_NESTING))
    return value


def _depth_over(value, limit):
    """Whether lists and objects in ``value`` nest deeper than ``limit``
    (iterative: no recursion limit)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, list):
            continue
        if depth >= limit:
            return True
        stack.extend((item, depth + 1) for item in v)
    return False


class _Failure(Exception):
    """A failure to report on stderr (exit 1)."""


def _run(connect, opts, ssl_context, method, params):
    shown = mask.mask_params(params)
    try:
        cli = connect(opts.host, opts.port, ssl_context, opts.timeout)
    except (OSError, errors.Error) as e:
        raise _Failure(
            "Connection to {}:{} with use_tls={}, timeout={} failed: "
            "{}{}".format(opts.host, opts.port, opts.use_tls, opts.timeout,
                          mask.mask_text(str(e)), _hint(opts, e)))
    try:
        return cli.call(method, params, opts.flow_id)
    except KeyboardInterrupt:
        sys.stderr.write("{}: Request {} with args {} interrupted: {}\n"
                         .format(PROG, method, shown,
                                 _still_running(method, params)))
        raise
    except errors.Error as e:
        local = _local_error(e)
        if local == "timeout":
            raise _Failure("Request {} with args {} timed out after {} "
                           "seconds: {}".format(
                               method, shown, opts.timeout,
                               _still_running(method, params)))
        if local:
            raise _Failure("Request {} with args {} failed: {}".format(
                method, shown, mask.mask_text(str(e))))
        raise _Failure("Command {} with args {} failed:\n"
                       "(code={}, message={})".format(
                           method, shown, e.code, mask.mask_text(str(e))))
    except OSError as e:
        raise _Failure("Request {} with args {} failed: {}".format(
            method, shown, mask.mask_text(str(e))))
    finally:
        try:
            cli.close()
        except (OSError, errors.Error):
            pass


def _still_running(method, params):
    """What a client that stopped waiting should know: the call goes on."""
    vol_id = params.get("vol_id") if isinstance(params, dict) else None
    if method.startswith("ManagedVolume.") and isinstance(vol_id, str):
        see = ("{} ManagedVolume volumes_info vol_ids='[\"{}\"]'".format(
            PROG, vol_id))
    else:
        see = "{} ManagedVolume volumes_info".format(PROG)
    return ("the call was sent and is not cancelled: it may still "
            "complete on the host; see the outcome with: {} (or "
            "managedvolume-tool list on the host)".format(see))


def _hint(opts, error):
    """A likely cause of a failed connection, for the admin."""
    if isinstance(error, ConnectionRefusedError):
        return " (is managedvolume-agent or vdsmd running on that port?)"
    if not opts.use_tls and isinstance(error, (ConnectionResetError,
                                               BrokenPipeError)):
        return " (the server requires TLS? drop --insecure)"
    if opts.use_tls and getattr(error, "reason", None) == \
            "WRONG_VERSION_NUMBER":
        # What a TLS client reads from a plain TCP server: the agent
        # answers a ClientHello on its plain port in plain text.
        return " (the server serves plain TCP, without TLS: use --insecure)"
    if opts.use_tls and isinstance(error, socket.timeout) and \
            "handshake" in str(error):
        # An agent before it answered TLS clients on its plain port kept
        # them waiting.
        return (" (no TLS handshake within --timeout: the server may "
                "serve plain TCP (then use --insecure), or be overloaded)")
    if opts.use_tls and isinstance(error, (ssl.SSLEOFError,
                                           ConnectionResetError)):
        # The agent closes a connection at once when all its places are
        # taken (stompserver.MAX_CONNECTIONS): its log says so.
        return (" (the server closed the connection: it may have too "
                "many connections open (see its log), serve without TLS "
                "(then use --insecure), or not trust our certificate)")
    if opts.use_tls and isinstance(error, ssl.SSLError):
        return (" (a server without TLS needs --insecure; a TLS server "
                "must trust our certificate and we its CA)")
    return ""


def _local_error(error):
    """"timeout" or True when the error happened here (connection lost,
    no answer in time); False for a JSON-RPC error of the server."""
    from . import stompclient
    if isinstance(error, stompclient.Timeout):
        return "timeout"
    return isinstance(error, stompclient.ClientError)


def _fail(msg):
    sys.stderr.write("{}: {}\n".format(PROG, msg))
    sys.exit(1)


def _example(method):
    """An example call of ``method``, built from its schema: its required
    params (else its first optional one) as name=value, or -f FILE when
    one is an object (connection_info)."""
    params = [p for p in method.params if p.required] or method.params[:1]
    call = "  {} {} {}".format(PROG, method.namespace, method.verb)
    if any(isinstance(p.type, dict) and p.type.get("type") == "object"
           for p in params):
        return ("example (params.json: a JSON object holding {}):\n"
                "{} -f params.json".format(
                    ", ".join(p.name for p in params), call))
    args = []
    for p in params:
        if isinstance(p.type, list):
            value = "'[\"<{}>\"]'".format(schema_module.type_name(
                p.type[0]))
        elif p.type == "boolean":
            value = "true"
        elif p.type in ("int", "long"):
            value = "<{}>".format(p.name)
        else:
            value = "<{}>".format(p.type_name)
        args.append("{}={}".format(p.name, value))
    return "example:\n" + " ".join([call] + args)


def _wrap(text):
    return "\n".join(textwrap.wrap(text, 78))


def _params_help(method):
    if not method.params:
        return "params: none"
    lines = ["params:"]
    for p in method.params:
        head = "  {} ({}{})".format(
            p.name, p.type_name,
            "" if p.required else ", default {}".format(
                json.dumps(p.default)))
        lines.append(head)
        lines.extend(textwrap.wrap(p.description, 74,
                                   initial_indent="      ",
                                   subsequent_indent="      "))
        lines.extend(_properties_help(p.type))
    return "\n".join(lines)


def _properties_help(type_):
    """One level of an object param's properties (connection_info)."""
    if not isinstance(type_, dict) or type_.get("type") != "object":
        return []
    lines = []
    for spec in type_.get("properties") or ():
        prop = schema_module.Param(spec)
        if prop.name == schema_module.ANY_KEY:
            continue
        lines.append("      {} ({}{})".format(
            prop.name, prop.type_name,
            "" if prop.required else ", optional"))
    return lines


if __name__ == "__main__":
    main()
