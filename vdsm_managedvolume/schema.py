"""The API schema: the one source of the verbs, their params and defaults.

``schema/managedvolume-api.yml`` is written in vdsm's ``vdsm-api.yml``
format, so that the very same file can be merged into vdsm's schema (see
docs/vdsm-integration.md) and read by the agent, the client's help and the
docs.  The format, as vdsm reads it::

    types:                        # YAML anchors, referenced as *Name
        UUID: &UUID {type: alias, sourcetype: string, ...}
        ManagedVolumeConnection: &ManagedVolumeConnection
            type: object
            properties: [{name, type, description, defaultvalue?}, ...]
    Namespace.verb:               # every other top-level key is a method
        params: [{name, type, description, defaultvalue?}, ...]
        return: {type, description}

A type is a primitive name (boolean float int long ulong string uint), a
one-element list ``[T]`` (a list of T), or a type dict whose ``type`` is
one of alias (``sourcetype``), enum (``values``), map (``key-type``,
``value-type``), union (``values``: object types) or object
(``properties``).  PyYAML resolves the anchors for us: a ``*UUID`` param
type *is* the UUID dict.

A param (or an object property) is optional iff it has ``defaultvalue``;
vdsm spells container defaults as the strings ``'[]'``, ``'{}'`` and
``'()'``.  An object with a property named ``any_string`` is open (vdsm's
idiom): any other key, of any JSON type, is accepted.

What this module checks is the *shape* of a request: names, presence and
JSON types.  The *meaning* of values (UUID syntax, the driver-type
allow-list) is checked by ``validate`` in the service, before any side
effect; type checks are not repeated there and meaning checks not here.
"""

import copy
import functools
import os

import yaml

from . import errors

SCHEMA_FILE = os.path.join(os.path.dirname(__file__), "schema",
                           "managedvolume-api.yml")

# vdsm's spelling of container defaults (vdsmapi.DEFAULT_VALUES).
DEFAULT_VALUES = {"[]": [], "{}": {}, "()": []}

# A primitive type: (the classes of its values, whether a bool is refused
# (an int to Python), whether a negative number is).
PRIMITIVES = {
    "boolean": (bool, False, False),
    "string": (str, False, False),
    "int": (int, True, False),
    "long": (int, True, False),
    "uint": (int, True, True),
    "ulong": (int, True, True),
    # JSON does not tell 1 from 1.0.
    "float": ((int, float), True, False),
}

# An open object: vdsm's marker property.
ANY_KEY = "any_string"

# How deeply a param's value may nest (objects and arrays).  Cinder's
# connection data nests a few levels (nvmeof: data.volume_replicas[].
# portals[][]); a request nested hundreds of levels deep is an attack on
# every recursive walker after the parser (masking, logging, json.dumps of
# the stored record) and is refused before any of them runs.
MAX_PARAM_DEPTH = 24


# Defaults of these types are returned as they are: nobody can change them.
_IMMUTABLE = frozenset((str, int, float, bool, type(None)))


class Param:
    """One parameter of a method (or property of an object type)."""

    def __init__(self, spec):
        self.name = spec["name"]
        self.type = spec["type"]
        self.description = _text(spec.get("description", ""))
        self.required = "defaultvalue" not in spec
        self._default = spec.get("defaultvalue")
        self.added = spec.get("added")

    @property
    def default(self):
        """The default value, a fresh copy each time (callers may mutate)."""
        value = self._default
        if isinstance(value, str) and value in DEFAULT_VALUES:
            value = DEFAULT_VALUES[value]
        if type(value) in _IMMUTABLE:
            return value    # sd_id's blank UUID in every attach and detach
        return copy.deepcopy(value)

    @property
    def type_name(self):
        return type_name(self.type)

    def __repr__(self):
        return "<Param {} {}>".format(self.name, self.type_name)


class Method:
    """One verb: ``Namespace.verb``, its params in schema order, its return."""

    def __init__(self, name, spec):
        self.name = name
        self.namespace, self.verb = name.split(".", 1)
        self.description = _text(spec.get("description", ""))
        self.added = spec.get("added")
        self.params = [Param(p) for p in spec.get("params") or ()]
        self.ret = spec.get("return")
        self._names = frozenset(p.name for p in self.params)
        # [(param, its type's checker)]: made by the Schema's first bind.
        self._checks = None

    @property
    def summary(self):
        """The first sentence of the description (for listings)."""
        text = self.description
        end = text.find(". ")
        return text if end == -1 else text[:end + 1]

    @property
    def param_names(self):
        return [p.name for p in self.params]

    def __repr__(self):
        return "<Method {}({})>".format(self.name,
                                        ", ".join(self.param_names))


class Schema:
    """A loaded API schema."""

    def __init__(self, data, path=None):
        data = dict(data)
        self.path = path
        self.types = data.pop("types", None) or {}
        # id(type) -> (the type, its checker): made on first use, not on
        # every request.  The entry holds the type, so its id is never
        # reused for another while it is there.
        self._checkers = {}
        self.methods = {}
        for name, spec in data.items():
            if not isinstance(name, str) or "." not in name:
                raise errors.ConfigError(
                    "{}: {!r} is not a Namespace.verb".format(path, name))
            self.methods[name] = Method(name, spec or {})

    @classmethod
    def load(cls, path=SCHEMA_FILE):
        return cls(read(path), path=path)

    def namespaces(self):
        return sorted({m.namespace for m in self.methods.values()})

    def verbs(self, namespace):
        """The methods of ``namespace``, sorted by verb."""
        return sorted((m for m in self.methods.values()
                       if m.namespace == namespace), key=lambda m: m.verb)

    def method(self, name):
        """The method named ``name``; errors.MethodNotFound otherwise."""
        try:
            return self.methods[name]
        except (KeyError, TypeError):
            raise errors.MethodNotFound(method=name)

    def bind(self, name, params, shallow=False):
        """Check ``params`` against the method and fill in the defaults.

        params: None, a list (positional, schema order) or a dict (named),
            as a JSON-RPC request carries them.
        shallow: the caller knows that no param nests more than
            MAX_PARAM_DEPTH levels (``jsonrpc`` counted the brackets of
            the message): their depth is not walked again.

        Returns a dict of every param in schema order.  Raises
        errors.MethodNotFound, or errors.InvalidParams naming the param
        (``connection_info.data`` for a nested one).
        """
        method = self.method(name)
        if params is None:
            params = {}
        if isinstance(params, list):
            if len(params) > len(method.params):
                raise errors.InvalidParams(
                    name="params",
                    reason="{} takes at most {} params, {} given".format(
                        name, len(method.params), len(params)))
            params = {p.name: v for p, v in zip(method.params, params)}
        elif not isinstance(params, dict):
            raise errors.InvalidParams(
                name="params",
                reason="must be an object or an array, got {}".format(
                    _json_type(params)))
        for key in params:
            if key not in method._names:
                raise errors.InvalidParams(
                    name=key, reason="unknown parameter of {} (known: {})"
                    .format(name, ", ".join(method.param_names) or "none"))
        if not shallow:
            for key, value in params.items():
                check_depth(key, value)
        checks = method._checks
        if checks is None:
            checks = method._checks = [(p, self._checker(p.type))
                                       for p in method.params]
        bound = {}
        for p, check in checks:
            value = params.get(p.name)
            if value is None:
                if p.required:
                    raise errors.InvalidParams(name=p.name,
                                               reason="missing")
                value = p.default
            else:
                refused = check(value)
                if refused is not None:
                    raise refused.error(p.name)
            bound[p.name] = value
        return bound

    def args(self, name, params, shallow=False):
        """``bind``, as a positional list in schema order (vdsm's call)."""
        return list(self.bind(name, params, shallow).values())

    def check(self, type_, value, name):
        """Check that ``value`` is of ``type_``; InvalidParams naming it
        (``name``, or the path below it: ``name.data``, ``name[2]``)."""
        refused = self._checker(type_)(value)
        if refused is not None:
            raise refused.error(name)

    # Private helpers

    def _checker(self, type_):
        """The checker of ``type_``, made once per type: a function of a
        value returning None when the value is of the type, else a
        _Refusal saying where below the value and why.  The path is
        spelled only on the way out of a refused value, so an accepted
        one (every bound param of a request) costs no names."""
        entry = self._checkers.get(id(type_))
        if entry is None:
            made = []
            # Placed first: a type nesting itself (a YAML anchor used
            # inside its own definition) finds its own entry.
            self._checkers[id(type_)] = (type_, lambda v: made[0](v))
            try:
                checker = self._compile(type_)
            except (KeyError, TypeError, AttributeError, IndexError) as e:
                # A malformed type fails where a value reaches it.
                checker = _failing(e)
            made.append(checker)
            entry = (type_, checker)
            self._checkers[id(type_)] = entry
        return entry[1]

    def _compile(self, type_):
        if isinstance(type_, str):
            if type_ not in PRIMITIVES:
                return _unknown("schema: unknown type {!r} of {}", type_)
            return _primitive(type_, type_)
        if isinstance(type_, list):
            return self._compile_list(type_)
        kind = type_.get("type")
        if kind == "alias":
            source = type_["sourcetype"]
            return _primitive(source, "{} ({})".format(type_name(type_),
                                                       source))
        if kind == "enum":
            return _enum(type_["values"])
        if kind == "map":
            return self._compile_map(type_)
        if kind == "union":
            return self._compile_union(type_)
        if kind == "object":
            return self._compile_object(type_)
        return _unknown("schema: unknown type kind {!r} of {}", kind)

    def _compile_list(self, type_):
        item = self._checker(type_[0])
        expected = type_name(type_)

        def check_list(value):
            if not isinstance(value, list):
                return _wrong(expected, value)
            if any(map(item, value)):
                for i, x in enumerate(value):
                    refused = item(x)
                    if refused is not None:
                        return refused.under("[{}]".format(i))
            return None
        return check_list

    def _compile_map(self, type_):
        key = self._checker(type_.get("key-type", "string"))
        item = self._checker(type_["value-type"]) \
            if "value-type" in type_ else None
        expected = type_name(type_)

        def check_map(value):
            if not isinstance(value, dict):
                return _wrong(expected, value)
            if any(map(key, value)) or (
                    item is not None and any(map(item, value.values()))):
                # The first item refused names the map (a key) or the
                # key's value, as the items come.
                for k, v in value.items():
                    refused = key(k)
                    if refused is not None:
                        return refused
                    if item is not None:
                        refused = item(v)
                        if refused is not None:
                            return refused.under(".{}".format(k))
            return None
        return check_map

    def _compile_union(self, type_):
        members = [self._checker(m) for m in type_.get("values") or ()]
        expected = type_name(type_)

        def check_union(value):
            first = None
            for member in members:
                refused = member(value)
                if refused is None:
                    return None
                if refused.internal:
                    return refused
                first = first or refused
            return _Refusal("matches none of {} ({})".format(
                expected, first.reason if first else "no members"))
        return check_union

    def _compile_object(self, type_):
        props = [Param(p) for p in type_.get("properties") or ()]
        known = frozenset(p.name for p in props)
        closed = ANY_KEY not in known
        fields = [(p.name, p.required, self._checker(p.type))
                  for p in props if p.name != ANY_KEY]
        expected = type_name(type_)

        def check_object(value):
            if not isinstance(value, dict):
                return _wrong(expected, value)
            if closed:
                for key in value:
                    if key not in known:
                        return _Refusal(
                            "unknown property of {} (known: {})".format(
                                expected, ", ".join(sorted(known))),
                            ".{}".format(key))
            for name, required, check in fields:
                x = value.get(name)
                if x is None:
                    if required:
                        return _Refusal("missing", "." + name)
                else:
                    refused = check(x)
                    if refused is not None:
                        return refused.under("." + name)
            return None
        return check_object


def too_deep(value, limit):
    """Whether ``value`` nests objects/arrays more than ``limit`` levels
    (a scalar is level 0).  Iterative: safe on any input.  Only containers
    are stacked (a request is walked twice: the message, then each param;
    on vdsm's path the API layer walks each argument instead)."""
    if not isinstance(value, _CONTAINERS):
        return False
    stack = [(value, 1)]
    while stack:
        obj, level = stack.pop()
        if level > limit:
            return True
        level += 1
        for child in obj.values() if isinstance(obj, dict) else obj:
            if isinstance(child, _CONTAINERS):
                stack.append((child, level))
    return False


_CONTAINERS = (dict, list, tuple)


def check_depth(name, value, limit=MAX_PARAM_DEPTH):
    """Raise InvalidParams naming ``name`` when ``value`` is too deep."""
    if too_deep(value, limit):
        raise errors.InvalidParams(
            name=name, reason="nested deeper than {} levels".format(limit))


def read_text(path=SCHEMA_FILE):
    """The schema file as written (``managedvolume-tool dump-schema``)."""
    with open(path) as f:
        return f.read()


def read(path=SCHEMA_FILE):
    """The schema file as plain data, the shape vdsm's own Schema holds:
    ``types`` and one ``Namespace.verb`` key per method.  A fresh copy on
    every call (callers may take it apart)."""
    return yaml.safe_load(read_text(path))


@functools.lru_cache(maxsize=None)
def load(path=SCHEMA_FILE):
    """The schema at ``path``, loaded once per process."""
    return Schema.load(path)


def type_name(type_):
    """A short display name: ``UUID``, ``[UUID]``, ``boolean``."""
    if isinstance(type_, str):
        return type_
    if isinstance(type_, list):
        return "[{}]".format(type_name(type_[0]))
    return type_.get("name") or type_.get("type", "?")


# Private helpers

def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _Refusal:
    """Why a checker refused a value: ``reason``, and ``path``, where
    below the checked value (``.data``, ``[2].a``), grown by each
    enclosing checker on the way out.  ``internal``: the schema's own
    fault (a format taking the type and the path), not the value's."""

    __slots__ = ("reason", "path", "internal")

    def __init__(self, reason, path="", internal=None):
        self.reason = reason
        self.path = path
        self.internal = internal

    def under(self, step):
        self.path = step + self.path
        return self

    def error(self, name):
        name += self.path
        if self.internal:
            return errors.InternalError(self.internal.format(self.reason,
                                                             name))
        return errors.InvalidParams(name=name, reason=self.reason)


def _wrong(expected, value):
    return _Refusal("expected {}, got {}".format(expected,
                                                  _json_type(value)))


def _primitive(kind, expected):
    classes, not_bool, unsigned = PRIMITIVES[kind]
    if not (not_bool or unsigned):
        def check_primitive(value):
            if isinstance(value, classes):
                return None
            return _wrong(expected, value)
    else:
        def check_primitive(value):
            if isinstance(value, classes) and not isinstance(value, bool) \
                    and (not unsigned or value >= 0):
                return None
            return _wrong(expected, value)
    return check_primitive


def _enum(values):
    def check_enum(value):
        if value in values:
            return None
        return _Refusal("{!r} is not one of {}".format(
            value, ", ".join(str(v) for v in values)))
    return check_enum


def _unknown(message, what):
    return lambda value: _Refusal(what, internal=message)


def _failing(error):
    def check_failing(value):
        raise error.with_traceback(None)
    return check_failing


def _text(text):
    return " ".join(str(text).split())
