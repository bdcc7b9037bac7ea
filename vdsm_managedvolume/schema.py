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

PRIMITIVES = {
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "int": lambda v: _is_int(v),
    "long": lambda v: _is_int(v),
    "uint": lambda v: _is_int(v) and v >= 0,
    "ulong": lambda v: _is_int(v) and v >= 0,
    # JSON does not tell 1 from 1.0.
    "float": lambda v: _is_int(v) or isinstance(v, float),
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
        # id(object type) -> (the type, its properties, their names):
        # made on first use, not on every request.  The entry holds the
        # type, so its id is never reused for another while it is there.
        self._objects = {}
        # id(type) -> (the type, its predicate): see _predicate.
        self._predicates = {}
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
        bound = {}
        for p in method.params:
            value = params.get(p.name)
            if value is None:
                if p.required:
                    raise errors.InvalidParams(name=p.name,
                                               reason="missing")
                value = p.default
            else:
                valid = self._predicate(p.type)
                if valid is None or not valid(value):
                    # Names what is wrong, as it always did.
                    self.check(p.type, value, p.name)
            bound[p.name] = value
        return bound

    def args(self, name, params, shallow=False):
        """``bind``, as a positional list in schema order (vdsm's call)."""
        return list(self.bind(name, params, shallow).values())

    def check(self, type_, value, name):
        """Check that ``value`` is of ``type_``; InvalidParams naming it."""
        if isinstance(type_, str):
            check = PRIMITIVES.get(type_)
            if check is None:
                raise errors.InternalError(
                    "schema: unknown type {!r} of {}".format(type_, name))
            if not check(value):
                _wrong(name, type_, value)
            return
        if isinstance(type_, list):
            if not isinstance(value, list):
                _wrong(name, type_name(type_), value)
            for i, item in enumerate(value):
                self.check(type_[0], item, "{}[{}]".format(name, i))
            return
        kind = type_.get("type")
        if kind == "alias":
            if not PRIMITIVES[type_["sourcetype"]](value):
                _wrong(name, "{} ({})".format(type_name(type_),
                                              type_["sourcetype"]), value)
        elif kind == "enum":
            if value not in type_["values"]:
                raise errors.InvalidParams(
                    name=name, reason="{!r} is not one of {}".format(
                        value, ", ".join(str(v) for v in type_["values"])))
        elif kind == "map":
            if not isinstance(value, dict):
                _wrong(name, type_name(type_), value)
            for k, v in value.items():
                self.check(type_.get("key-type", "string"), k, name)
                if "value-type" in type_:
                    self.check(type_["value-type"], v,
                               "{}.{}".format(name, k))
        elif kind == "union":
            self._check_union(type_, value, name)
        elif kind == "object":
            self._check_object(type_, value, name)
        else:
            raise errors.InternalError(
                "schema: unknown type kind {!r} of {}".format(kind, name))

    # Private helpers

    def _predicate(self, type_):
        """A function telling whether a value is of ``type_`` (True only
        where ``check`` accepts it), made once per type: the bound params
        of every request are tested by it, and only a value it refuses
        is walked by ``check``, which names what is wrong.  None for a
        type it does not know (``check`` decides)."""
        entry = self._predicates.get(id(type_))
        if entry is None:
            cell = []
            # Placed first: a type nesting itself (a YAML anchor used
            # inside its own definition) finds its own entry.
            entry = (type_, lambda v: cell[0](v) if cell[0] else False)
            self._predicates[id(type_)] = entry
            try:
                made = self._make_predicate(type_)
            except (KeyError, TypeError, AttributeError, IndexError):
                made = None
            cell.append(made)
            entry = (type_, made)
            self._predicates[id(type_)] = entry
        return entry[1]

    def _make_predicate(self, type_):
        if isinstance(type_, str):
            return PRIMITIVES.get(type_)
        if isinstance(type_, list):
            item = self._predicate(type_[0])
            if item is None:
                return None
            return lambda v: isinstance(v, list) and all(map(item, v))
        kind = type_.get("type")
        if kind == "alias":
            return PRIMITIVES.get(type_["sourcetype"])
        if kind == "enum":
            values = type_["values"]
            return lambda v: v in values
        if kind == "map":
            key = self._predicate(type_.get("key-type", "string"))
            value = self._predicate(type_["value-type"]) \
                if "value-type" in type_ else (lambda v: True)
            if key is None or value is None:
                return None
            return lambda v: isinstance(v, dict) and all(map(key, v)) \
                and all(map(value, v.values()))
        if kind == "union":
            members = [self._predicate(m) for m in type_.get("values") or ()]
            if not members or any(m is None for m in members):
                return None
            return lambda v: any(m(v) for m in members)
        if kind == "object":
            props, known = self._properties(type_)
            fields = []
            for p in props:
                if p.name == ANY_KEY:
                    continue
                valid = self._predicate(p.type)
                if valid is None:
                    return None
                fields.append((p.name, p.required, valid))
            open_ = ANY_KEY in known

            def valid_object(v):
                if not isinstance(v, dict):
                    return False
                if not open_:
                    for k in v:
                        if k not in known:
                            return False
                for name, required, valid in fields:
                    x = v.get(name)
                    if x is None:
                        if required:
                            return False
                    elif not valid(x):
                        return False
                return True
            return valid_object
        return None

    def _check_object(self, type_, value, name):
        if not isinstance(value, dict):
            _wrong(name, type_name(type_), value)
        props, known = self._properties(type_)
        if ANY_KEY not in known:
            for key in value:
                if key not in known:
                    raise errors.InvalidParams(
                        name="{}.{}".format(name, key),
                        reason="unknown property of {} (known: {})".format(
                            type_name(type_), ", ".join(sorted(known))))
        for p in props:
            if p.name == ANY_KEY:
                continue
            path = "{}.{}".format(name, p.name)
            v = value.get(p.name)
            if v is None:
                if p.required:
                    raise errors.InvalidParams(name=path, reason="missing")
                continue
            self.check(p.type, v, path)

    def _properties(self, type_):
        """The properties of the object type ``type_`` ([Param]) and the
        set of their names."""
        entry = self._objects.get(id(type_))
        if entry is None:
            props = [Param(p) for p in type_.get("properties") or ()]
            entry = (type_, props, frozenset(p.name for p in props))
            self._objects[id(type_)] = entry
        return entry[1], entry[2]

    def _check_union(self, type_, value, name):
        first = None
        for member in type_.get("values") or ():
            try:
                self.check(member, value, name)
                return
            except errors.InvalidParams as e:
                first = first or e
        raise errors.InvalidParams(
            name=name, reason="matches none of {} ({})".format(
                type_name(type_), first.reason if first else "no members"))


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

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


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


def _wrong(name, expected, value):
    expected = type_name(expected)
    raise errors.InvalidParams(
        name=name, reason="expected {}, got {}".format(
            expected, _json_type(value)))


def _text(text):
    return " ".join(str(text).split())
