"""JSON text the way ``json.JSONEncoder(**options).encode`` writes it,
without building the encoder's C half at every call, and JSON read the
way ``json.loads`` and ``JSONDecoder.decode`` read it, calling the
decoder's C scanner directly.

``JSONEncoder.encode`` runs ``iterencode``, which makes a new
``_json.make_encoder`` (and its circular-reference dict) for each
object it encodes.  An attach+detach encodes six (the journal's
connection_info, attachment and identity, the validated
connection_info, the answers): ``Encoder`` keeps one C encoder per
thread instead (its dict of the objects being encoded is the thread's
own: two threads encoding one object must not take it for a circular
reference), made again after a failed call (the C encoder leaves the
objects it was inside in that dict when it raises).  The text and the
errors are the C encoder's, as encode's are: checked at start against
``JSONEncoder.encode`` on a sample, and any other interpreter (no C
encoder, another signature, other text) uses ``JSONEncoder.encode``.
"""

import json
import json.encoder
import threading


class Encoder:
    """``json.JSONEncoder(**options)``'s ``encode``: the same text and
    errors.  Options with an ``indent`` take JSONEncoder's own path."""

    def __init__(self, **options):
        self._json = json.JSONEncoder(**options)
        self._local = threading.local()
        self._fast = self._json.indent is None and self._works()

    def encode(self, obj):
        if not self._fast or isinstance(obj, str):
            # A string alone: encode's own branch (no C encoder either).
            return self._json.encode(obj)
        local = self._local
        encoder = getattr(local, "encoder", None)
        if encoder is None:
            encoder = local.encoder = self._make()
        try:
            return "".join(encoder(obj, 0))
        except BaseException:
            # The objects it was inside stay marked: a new one next time.
            local.encoder = None
            raise

    # Private helpers

    def _make(self):
        j = self._json
        return json.encoder.c_make_encoder(
            {} if j.check_circular else None, j.default,
            json.encoder.encode_basestring_ascii if j.ensure_ascii
            else json.encoder.encode_basestring,
            j.indent, j.key_separator, j.item_separator, j.sort_keys,
            j.skipkeys, j.allow_nan)

    def _works(self):
        """Whether this interpreter's C encoder takes ``_make``'s
        arguments and writes what encode writes."""
        if json.encoder.c_make_encoder is None:
            return False
        sample = {"b": [1, -2.5, None, True, False, "\u00e9\u2028\"\\"],
                  "a": {"c": 10 ** 20, "": []}, "d": 1e300}
        try:
            return "".join(self._make()(sample, 0)) == \
                self._json.encode(sample)
        except Exception:
            return False


class Decoder:
    """``json.JSONDecoder(**options)``'s ``decode``: the same values and
    errors, its scanner called directly (decode and raw_decode are two
    Python calls more per document)."""

    def __init__(self, **options):
        self._scan = json.JSONDecoder(**options).scan_once

    def decode(self, s, _w=json.decoder.WHITESPACE.match):
        # JSONDecoder.decode and raw_decode, in one.  The whitespace
        # around the value is looked for with WHITESPACE (each match a
        # call into the regular expression engine, ~1.7k instructions)
        # only when there is some: a document our encoders wrote has
        # none (two matches less per document, seven documents per
        # attach+detach).
        if type(s) is str and s and s[0] not in _WHITESPACE:
            start = 0
        else:
            start = _w(s, 0).end()      # and its error for a non-str
        try:
            obj, end = self._scan(s, start)
        except StopIteration as err:
            raise json.JSONDecodeError("Expecting value", s,
                                       err.value) from None
        if end != len(s):
            end = _w(s, end).end()
            if end != len(s):
                raise json.JSONDecodeError("Extra data", s, end)
        return obj


# What json.decoder.WHITESPACE matches: the characters JSON allows
# around a value.
_WHITESPACE = " \t\n\r"


_DECODER = Decoder()


def loads(s):
    """``json.loads(s)``: the same values and errors (a str starts at
    ``Decoder.decode``; a BOM, bytes and anything else take json.loads)."""
    if type(s) is not str or s.startswith("\ufeff"):
        return json.loads(s)
    return _DECODER.decode(s)
