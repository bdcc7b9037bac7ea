"""The API classes, in vdsm's conventions.

vdsm dispatches a verb ``Namespace.verb`` like this (``rpc/Bridge.py``)::

    params = schema params, positional in schema order, missing optional
             ones taking their defaultvalue
    api = getattr(API, Namespace)(*ctorArgs)
    response = getattr(api, verb)(*params)
    # {'status': {'code': 0, 'message': 'Done'}, <key>: value}
    if response['status']['code']: -> JSON-RPC error (code, message)
    result = response[command_info['Namespace_verb']['ret']]  # or None

So this module provides exactly that shape: ``ManagedVolume`` (the verbs),
``Host`` (``getCapabilities`` for the standalone agent; inside vdsm the
after_get_caps hook contributes instead, see docs/vdsm-integration.md) and
``RETURN_KEYS``, the ``Namespace_verb -> key`` table.  ``jsonrpc`` calls the
very same classes, so the standalone agent and vdsm take one path.

The classes get the service from ``get_service()``: the dispatcher binds
its own for each call (``using``), a program may inject one for the whole
process (``set_service``); inside vdsm the first call creates one
(``Service(config.load())``, started) lazily.

Every method returns a response, never raises: an ``errors.Error`` becomes
its code and (masked) message, anything else an internal error (-32603)
whose text is masked and whose traceback goes to the log only.  Results are
masked too (``mask.mask``); volumes_info's by the service itself, which
returns them masked unless ``include_secrets`` (the one explicit request
for them).
"""

import contextvars
import importlib
import logging
import sys
import threading
import time

from . import __version__
from . import errors
from . import log as log_lines
from . import mask
from . import validate

log = logging.getLogger("managedvolume.api")

# '<Namespace>_<verb>' -> the response key holding the result; a verb
# missing here returns None (true on the wire).  The ManagedVolume entries
# are the ones registered into vdsm's command_info.
RETURN_KEYS = {
    "ManagedVolume_attach_volume": "result",
    "ManagedVolume_volumes_info": "result",
    "ManagedVolume_extend_volume": "result",
    "Host_getCapabilities": "info",
}

DONE = {"code": 0, "message": "Done"}

# The verbs that act on the host (the data plane): they may take seconds
# at the storage, so the agent runs them apart from everything else and
# bounds how many run at once ([agent] max_operations).
OPERATIONS = ("ManagedVolume.attach_volume", "ManagedVolume.detach_volume",
              "ManagedVolume.extend_volume")

_service = None
_service_lock = threading.Lock()
# The ``using`` of this call, or None.
_current = contextvars.ContextVar("managedvolume_service", default=None)


def set_service(service):
    """Use ``service`` for every API call (the agent, tests)."""
    global _service
    with _service_lock:
        _service = service


class using:
    """Context manager: run the block's API calls against ``service``
    (the dispatcher binds its own service per call; thread and task
    local).

    checked: the params of the block's calls were bound by the schema
    (``schema.Schema.bind``, which bounds their nesting): the API layer
    does not walk them again.  Inside vdsm, whose own code parses the
    request, nobody says so and every call is checked here.

    mask_later: the caller masks the block's results itself, on their
    JSON text (``jsonrpc``: ``mask.masked_json``): a result this layer
    would have masked is returned as it is and ``unmasked`` is set
    (except at DEBUG, whose line shows the result: masked here then).
    """

    __slots__ = ("service", "checked", "mask_later", "unmasked", "_token")

    def __init__(self, service, checked=False, mask_later=False):
        self.service = service
        self.checked = checked
        self.mask_later = mask_later
        self.unmasked = False

    def __enter__(self):
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc):
        _current.reset(self._token)
        return False


def get_service():
    """The service of this call: the one bound by ``using``, else the
    process's one, created on first use inside vdsm.

    Inside vdsm nobody injects one: the first call loads the configuration
    (``/etc/vdsm/managedvolume.conf`` or its defaults: vdsm's paths) and
    starts a Service (opening the journal, reconciling).
    """
    global _service
    bound = _current.get()
    if bound is not None:
        return bound.service
    with _service_lock:
        if _service is None:
            from . import config
            from . import service as service_module
            svc = service_module.Service(config.load())
            # Records of an earlier boot are detached in a thread: this
            # first call (maybe getCapabilities) must not wait for them.
            svc.start(defer_detach_stale=True)
            svc.detach_stale_later()
            _service = svc
        return _service


def command_info():
    """``RETURN_KEYS`` of the ManagedVolume verbs in vdsm's command_info
    shape (``{'ManagedVolume_attach_volume': {'ret': 'result'}, ...}``)."""
    return {cmd: {"ret": key} for cmd, key in RETURN_KEYS.items()
            if cmd.startswith("ManagedVolume_")}


def return_key(namespace, verb):
    return RETURN_KEYS.get("{}_{}".format(namespace, verb))


class APIBase:
    """vdsm's API class shape: constructed with ``*ctorArgs``."""

    ctorArgs = []

    def __init__(self, *args):
        pass


class ManagedVolume(APIBase):
    """The ``ManagedVolume`` namespace.  Params in schema order, defaults
    as in the schema (tests/api_test.py checks both)."""

    ctorArgs = []

    def attach_volume(self, vol_id, connection_info,
                      sd_id=validate.BLANK_UUID):
        return _call("ManagedVolume.attach_volume",
                     lambda s: s.attach_volume(vol_id, connection_info,
                                               sd_id),
                     key="result",
                     args={"vol_id": vol_id,
                           "connection_info": connection_info,
                           "sd_id": sd_id},
                     shown=_attached)

    def detach_volume(self, vol_id, sd_id=validate.BLANK_UUID):
        return _call("ManagedVolume.detach_volume",
                     lambda s: s.detach_volume(vol_id, sd_id),
                     key=None,
                     args={"vol_id": vol_id, "sd_id": sd_id},
                     shown=_detached)

    def extend_volume(self, vol_id, sd_id=validate.BLANK_UUID, new_size=None):
        return _call("ManagedVolume.extend_volume",
                     lambda s: s.extend_volume(vol_id, sd_id, new_size),
                     key="result",
                     args={"vol_id": vol_id, "sd_id": sd_id,
                           "new_size": new_size})

    def volumes_info(self, vol_ids=(), include_secrets=False):
        return _call("ManagedVolume.volumes_info",
                     lambda s: s.volumes_info(
                         list(vol_ids or ()), include_secrets),
                     key="result",
                     args={"vol_ids": vol_ids,
                           "include_secrets": include_secrets},
                     masked=include_secrets is not True, masks=False)


class Host(APIBase):
    """The ``Host`` namespace of the standalone agent (vdsm has its own)."""

    ctorArgs = []

    def getCapabilities(self):
        return _call("Host.getCapabilities", get_caps, key="info", args={})


# Namespace -> class, for the standalone dispatcher (vdsm uses its API
# module instead; see register()).
NAMESPACES = {"ManagedVolume": ManagedVolume, "Host": Host}


def get_caps(service):
    """This package's contribution to the host capabilities.

    ``connector_info``: os-brick's connector properties (the service caches
    them); absent when os-brick is missing (925) - never an error, as in
    vdsm - and also when the privileged helper fails or times out, so that
    getCapabilities always answers.  ``managedvolume``: what the package
    knows of itself, with ``connector_info_age``: seconds since
    connector_info was fetched (a stale value is served while it is
    refreshed, rather than making the engine wait).
    """
    caps = {}
    try:
        caps.update(service.caps())
    except errors.NotSupported as e:
        log.info("No connector_info in capabilities: %s", e)
    except errors.Error as e:
        log.warning("No connector_info in capabilities: %s (code %s)",
                    mask.mask_text(str(e)), e.code)
    cfg = getattr(service, "cfg", None)
    if cfg is not None:
        allowed = list(cfg.allowed_types)
    else:
        from . import config
        allowed = list(config.DEFAULT_ALLOWED_TYPES)
    caps["managedvolume"] = {"version": __version__,
                             "allowed_types": allowed}
    age = getattr(service, "connector_info_age", None)
    age = age() if age is not None and "connector_info" in caps else None
    if age is not None:
        caps["managedvolume"]["connector_info_age"] = round(age, 1)
    return caps


# What the verbs' first call would import (get_service, Service,
# config.load): imported when vdsm registers the verbs, at its start, so
# that all of this package that vdsmd runs is of one version, the one
# it started with.  Imported lazily, an upgrade between vdsmd's start and
# its first ManagedVolume verb would run the old api and errors with the
# new service and privileged (whose privsep handshake then passes).
# After the upgrade only the privsep daemon runs other files, and the
# handshake catches that (privsep.py, "Versions").
CLIENT_MODULES = ("config", "adapters", "schema", "service", "privileged")


def register(vdsm_api, bridge=None, vdsm_schema=None, schema=None):
    """Plug the ManagedVolume verbs into a running vdsm, in memory.

    vdsm has no discovery for verbs, so this does by hand what vdsm's build
    does for its own (no installed file is edited):

    vdsm_api: vdsm's ``vdsm.API`` module; its ``ManagedVolume`` becomes
        ours.
    bridge: vdsm's ``vdsm.rpc.Bridge`` module; its ``command_info`` gets
        our return keys.
    vdsm_schema: a ``vdsm.api.vdsmapi.Schema`` instance (the bridge's
        ``_schema``); our types and ManagedVolume methods are merged into
        its ``_types`` / ``_methods`` (ours win: same names, a superset of
        vdsm's params).  ``Host.getCapabilities`` stays vdsm's.

    See docs/vdsm-integration.md for where vdsm calls this.  Imports
    the rest of the client (``CLIENT_MODULES``), never os-brick.
    """
    for name in CLIENT_MODULES:
        importlib.import_module("." + name, __package__)
    vdsm_api.ManagedVolume = ManagedVolume
    if bridge is not None:
        bridge.command_info.update(command_info())
    if vdsm_schema is not None:
        from . import schema as schema_module
        if schema is None:
            schema = schema_module.load()
        raw = schema_module.read(schema.path)
        vdsm_schema._types.update(raw.pop("types"))
        vdsm_schema._methods.update(
            {name: spec for name, spec in raw.items()
             if name.startswith("ManagedVolume.")})


def install_vdsm_hook():
    """Register with vdsm as soon as vdsm builds its JSON-RPC bridge.

    Called from the ``sitecustomize`` that vdsmd's systemd drop-in puts on
    its PYTHONPATH (docs/vdsm-integration.md).  Nothing is imported now:
    when vdsm imports ``vdsm.rpc.Bridge``, its ``DynamicBridge.__init__``
    is wrapped so that, once vdsm loaded its own schema, ``register()``
    merges ours into that instance.  Any failure is logged and leaves vdsm
    as it was: vdsm must start even if this package is broken.
    """
    if not any(isinstance(f, _BridgeFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _BridgeFinder())


def patch_bridge(bridge):
    """Wrap ``bridge.DynamicBridge.__init__`` to ``register()`` (see
    install_vdsm_hook)."""
    cls = bridge.DynamicBridge
    original = cls.__init__
    if getattr(original, "_managedvolume", False):
        return

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        try:
            vdsm_api = importlib.import_module("vdsm.API")
            register(vdsm_api, bridge, self._schema)
            log.info("ManagedVolume verbs registered (vdsm-managedvolume "
                     "%s)", __version__)
        except Exception:
            log.exception("Cannot register the ManagedVolume verbs; "
                          "vdsm keeps its own")

    __init__._managedvolume = True
    cls.__init__ = __init__


# Private helpers

class _BridgeFinder:
    """Meta path finder: patches vdsm.rpc.Bridge right after it executed."""

    name = "vdsm.rpc.Bridge"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            try:
                patch_bridge(module)
            except Exception:
                log.exception("Cannot patch %s", fullname)

        loader.exec_module = exec_and_patch
        return spec


def _call(name, fn, key, args, masked=True, masks=True, shown=None):
    """Run ``fn(service)`` and return vdsm's response dict.

    ``masked``: the result may be logged (False: it holds secrets);
    ``masks``: it is masked here (False: the service returned it masked);
    ``shown``: what the FINISH line shows of the outcome (``_attached``,
    ``_detached``), else only "ok".  key None: the value is the outcome
    only, never returned (true on the wire).
    """
    start = time.monotonic()
    bound = _current.get()
    checked = bound is not None and bound.checked
    if log.isEnabledFor(logging.INFO):
        line = _start_line(name, args) if checked else None
        if line is not None:
            log.info(line)
        else:
            log.info("START %s(%s)", name, _Args(args, checked))
    try:
        if not checked:
            # vdsm parses and type-checks requests with its own schema
            # code: bound the nesting here too, before anything walks the
            # values.
            from . import schema
            for arg_name, arg in args.items():
                schema.check_depth(arg_name, arg)
        value = fn(get_service())
    except errors.Error as e:
        status = {"code": e.code, "message": mask.mask_text(str(e))}
        log.info("FINISH %s error=%s code=%s (%.3f s)", name,
                 status["message"], e.code, time.monotonic() - start)
        return {"status": status}
    except Exception as e:
        # The caller sees the kind of failure, never our internals.
        err = errors.InternalError("{}: {}".format(type(e).__name__,
                                                   mask.mask_text(str(e))))
        log.error("FINISH %s internal error (%.3f s)", name,
                  time.monotonic() - start, exc_info=True)
        return {"status": {"code": err.code,
                           "message": mask.mask_text(str(err))}}
    if key is not None and masked and masks:
        if bound is not None and bound.mask_later and \
                not log.isEnabledFor(logging.DEBUG):
            bound.unmasked = True
        else:
            value = mask.mask(value)
    # As vdsm's FINISH line logs return= (common/api.py, ``logged``):
    # INFO names what the call did, masked by the log filter like any
    # line's arguments (the value itself may still be unmasked here).
    if shown is None:
        log.info("FINISH %s ok (%.3f s)", name, time.monotonic() - start)
    elif log.isEnabledFor(logging.INFO):
        text, values = shown(value)
        args = (name,) + values + (time.monotonic() - start,)
        line = _finish_line(text, args)
        if line is not None:
            log.info(line)
        else:
            log.info(text, name, *_masked(values),
                     time.monotonic() - start)
    log.debug("%s returned %s", name, value if masked else "<unmasked>")
    response = {"status": dict(DONE)}
    if key is not None:
        response[key] = value
    return response


def _start_line(name, args):
    """A START line of arguments the schema bound (``_Args`` with
    json), made here as ``_Args`` would show them when it can be
    written as it is (``log.clean_line``): one scan of the whole line
    (it holds each argument's repr whole: none longer than
    mask.MAX_LOGGED_ARG, which would be cut), not one of the reprs and
    then one of the line.  None otherwise: ``_Args`` decides, as
    before.  Two reprs side by side hold no marker that neither holds
    (a repr of a JSON value begins with a quote, a bracket, a digit,
    "-", "T", "F", "N", "i" or "n" and no marker goes on with one of
    those after a character such a repr ends with), so this line is
    clean exactly when ``_Args``'s scan of the joined reprs and the
    scan of its line both are."""
    try:
        texts = list(map(repr, args.values()))
    except Exception:
        return None     # _Args's line says what logging makes of it
    for text in texts:
        if len(text) > mask.MAX_LOGGED_ARG:
            return None
    return log_lines.clean_line("START {}({})".format(
        name, ", ".join(map("{}={}".format, args, texts))))


def _finish_line(text, args):
    """The FINISH line ``text % args`` when every argument is a plain
    value and the line can be written as it is (``log.clean_line``):
    it holds each value's text whole, so none holds a marker and
    ``_masked`` would return them as they are.  None otherwise."""
    for arg in args:
        # (Those the log's short path writes as their text.)
        if type(arg) not in log_lines.PLAIN_TYPES:
            return None
    try:
        line = text % args
    except Exception:
        return None     # logging's own handling decides, as before
    return log_lines.clean_line(line)


def _attached(value):
    """An attach's FINISH line: where its device is (the service logs
    the same at DEBUG only); its values, as they are."""
    if not isinstance(value, dict):
        return "FINISH %s ok (%.3f s)", ()
    return ("FINISH %s ok vol_id=%s path=%s managed_path=%s (%.3f s)",
            (value.get("vol_id"), value.get("path"),
             value.get("managed_path")))


def _detached(value):
    """A detach's FINISH line: what it detached (the device's path and
    the state its record was in), or that nothing was attached
    (``Service.detach_volume``'s outcome); its values, as they are."""
    if not isinstance(value, dict):
        return "FINISH %s ok (%.3f s)", ()
    if value.get("was") is None:
        return ("FINISH %s ok vol_id=%s not attached (%.3f s)",
                (value.get("vol_id"),))
    return ("FINISH %s ok vol_id=%s path=%s was=%s (%.3f s)",
            (value.get("vol_id"), value.get("path"), value.get("was")))


def _masked(values):
    """A FINISH line's ``values`` as it shows them, masked here:
    inside vdsm no filter of ours masks its log lines' arguments (a
    path an adapter returned may hold a password's shape).  Nearly
    every value is plainly clean: ``mask_text`` returns it as it is."""
    texts = [v for v in values if isinstance(v, str)]
    # Joined by a newline, which no secret's marker holds: the whole is
    # plainly clean only when each value is (then mask_text returns each
    # as it is), one scan instead of one per value.
    if mask.plainly_clean("\n".join(texts)):
        return values
    return tuple(mask.mask_text(v) if isinstance(v, str) else v
                 for v in values)


class _Args(mask.Masked):
    """The arguments of a START line, masked and formatted only when the
    line is written (not at all when INFO is off).

    json: the arguments are what the schema bound from a JSON request
    (``using(checked=True)``): only JSON's types (dict, list, str,
    numbers, booleans, None), nested at most schema.MAX_PARAM_DEPTH
    levels.  Then their plain reprs are the line's text when that text
    holds no secret's marker (``mask.plainly_clean``): masking them
    first would change nothing that shows (a secret's key, a string of
    a secret's shape, a secret named in a list all show one in their
    repr), so the values are not walked and copied for it.
    """

    __slots__ = ("json",)

    def __init__(self, value, json=False):
        super().__init__(value)
        self.json = json

    def _format(self):
        if self.json:
            texts = list(map(repr, self.value.values()))
            # The whole text, before any cut: a password's marker may
            # come after it ("user:s3cret@host").
            if mask.plainly_clean("".join(texts)):
                return ", ".join(map("{}={}".format, self.value,
                                     map(mask.shorten, texts)))
        return ", ".join("{}={}".format(k, mask.shorten(repr(v)))
                         for k, v in mask.mask_params(self.value).items())
