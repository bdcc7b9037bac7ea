"""The one place secrets are hidden before data leaves the process.

Connection info carries credentials: iSCSI CHAP (``auth_password``,
``discovery_auth_password``), RBD keyrings (``keyring``), backend passwords
(``san_password``), DB URLs (``postgresql://user:pw@host/db``).  vdsm logged
them at INFO.  Here every log record passes a filter that calls ``mask``
(see ``log.py``) and every response that may hold connection data calls it
explicitly, so no caller has to remember.  Connection data logged as an
argument is wrapped in ``Masked``: masked once, and only when the line is
written, also by handlers without that filter (vdsm's).

A key is secret when its case-folded name (``_fold``: as the text
patterns fold it, "\u017fecret" is "secret") contains ``password``,
``secret``, ``keyring``, ``token``, ``credential``, ``private_key``,
``access_key`` or ``one_time_pass``, or starts with ``auth_`` /
``discovery_auth_`` and is not the auth method or user name.

Free text (exception messages, command lines, reprs) is scanned for the
shapes in which such a key meets its value::

    auth_password=s3cret            'auth_password': 's3cret'
    "auth_password" : "s3cret"      b'auth_password': b's3cret'
    {\\"auth_password\\": \\"s3cret\\"}   (JSON inside a JSON string)
    password%3Ds3cret               (URL-encoded)
    iscsiadm ... -n node.session.auth.password -v s3cret
    ('-n', 'discovery.sendtargets.auth.password', '-v', 's3cret')
    ('auth_password', 's3cret')     (a pair's repr: dict.items(), a trace)
    password=SecretStr('s3cret')    ('password', <Secret 's3cret'>)
                                    (an object's repr as the value)
    postgresql://user:s3cret@host/db
    admin:s3cret@10.0.0.1:3260      (user:password@host, no scheme)
    key = AQB...==  /  AQ<38 base64 chars>==      (a Ceph keyring)

Only the values are replaced: every other word of the text stays, and
so does a sentence's full stop, semicolon or colon glued to a bare value
(``password=s3cret.`` becomes ``password=********.``).  In an
error naming a parameter, ``Invalid parameter <name>: <reason>``
(``errors.InvalidParams``), the name is a parameter's path, which may end
in a secret's key (``connection_info.data.auth_password``), and the colon
after it introduces the reason, not the parameter's value: ``validate``
never shows a secret's value there.  Such a reason is scanned as any text
and keeps its first word (masked as the "value" until 2026-12-02:
"auth_password: ******** is outside the signed 64-bit range") when that
word is one this package's reasons start with (``_REASON_WORDS``); in
other text of that shape (a storage array's "Invalid parameter
chap_secret: <secret> must be ...") it is masked.

The text scan runs in linear time: the agent masks every request it logs,
and a regular expression that backtracks quadratically on a 1 MB string of
letters froze the whole agent for hours (the ``re`` module holds the GIL).
Key names are therefore bounded (``_NAME_MAX`` characters around the
secret word) and values are found by a forward scan, never by
backtracking.
"""

import functools
import re

from . import errors

MASK = "********"

# (access_key, one_time_pass: cinder options marked secret=True that hold
# no other word, zadara_access_key and synology_one_time_pass.)
_SECRET_WORDS = ("password", "passwd", "secret", "keyring", "token",
                 "private_key", "credential", "access_key", "one_time_pass")
# Auth fields that are not credentials themselves, RBD's names of a
# libvirt secret (its type, "ceph", and its UUID: masking "ceph" garbled
# every RBD error), and volumes_info's flag asking for secrets (a flag,
# whatever value a user typed).
_NOT_SECRET = frozenset(("auth_method", "auth_username",
                         "discovery_auth_method", "discovery_auth_username",
                         "auth_enabled", "discovery_auth_enabled",
                         "secret_type", "secret_uuid", "include_secrets"))

# Beyond this depth ``mask`` stops walking (a crafted, deeply nested value
# must not turn masking into a RecursionError).
MAX_DEPTH = 100
TOO_DEEP = "<nested too deeply>"

# Characters of a key name around the secret word, at most.
_NAME_MAX = 100

_WORDS = "|".join(_SECRET_WORDS)
# A key: starts where a name starts (the look-behind keeps this linear: a
# run of name characters is tried once, not at each of its characters),
# optionally quoted (b'...', '...', "...", \"...\"), then a separator: ':',
# '=', URL-encoded '=' or '":"', or iscsiadm's "-v" (plain or as the items
# of a list repr), or, for a quoted key opening a tuple or list, the comma
# before a value: a (key, value) pair's repr (``pair`` is set when the key
# follows "(" or "[", white space allowed between; ``pairsep`` when the
# comma matched: _mask_keys then wants the value to close the pair).  The
# value of a pair may come after a line break and up to _PAIR_INDENT
# spaces: pprint aligns it under the key, as deep as the pair is nested.
_PAIR_INDENT = 256
_KEY_RE = re.compile(
    r"(?<![\w.-])(?:(?<=[(\[])(?P<pair>)[ \t\r\n]{0,16})?(?:b?\\?['\"])?"
    r"(?!(?:include_secrets|secret_type|secret_uuid)(?![\w.-]))"
    r"(?:[\w.-]{0,%(n)d}?(?:%(words)s)[\w.-]{0,%(n)d}"
    r"|(?:discovery_)?auth_(?!(?:method|username|enabled)(?![\w-]))"
    r"[\w-]{1,%(n)d})"
    r"(?:\\?['\"])?"
    r"(?:[ \t]{0,16}[:=][ \t\r\n]{0,16}"
    r"|%%3[dD]|%%22%%3[aA](?:%%20){0,4}(?:%%22)?|%%3[aA]"
    r"|[ \t]{0,16},?[ \t]{0,16}['\"]?(?:-v|--value)['\"]?"
    r"(?:[ \t]{0,16},[ \t]{0,16}|[ \t]{1,16}|=)"
    r"|(?(pair)(?<=['\"])[ \t]{0,16},(?P<pairsep>)[ \t\r\n]{0,%(indent)d}"
    r"(?=b?\\?['\"]|[-+]?[0-9]|[\[({<]|[A-Za-z_][\w.]{0,%(n)d}\()|(?!)))"
    % {"n": _NAME_MAX, "words": _WORDS, "indent": _PAIR_INDENT},
    re.IGNORECASE)

# A quoted value: up to the closing quote, backslash escapes skipped.
# (The two alternatives never match the same character: linear.)
_QUOTED = {
    "'": re.compile(r"(?:\\.|[^\\'])*'", re.DOTALL),
    '"': re.compile(r'(?:\\.|[^\\"])*"', re.DOTALL),
}
# A bare value: up to white space or a delimiter.
_BARE = re.compile(r"""[^'",\s}\])]+""")

# Where a user:password@host without a scheme may start and what its
# password may not hold: white space, the URL delimiters, quotes, brackets
# and the separators of a list or a key=value.  A password holding one
# (a URL would percent-encode it) is not seen as one.
_USERINFO_END = r"""\s/@'"<>()\[\]{},;="""

_OTHER_PATTERNS = (
    # URLs with credentials: scheme://user:password@host
    re.compile(r"(?<![\w+.-])(?P<key>[a-zA-Z][\w+.-]{0,32}://"
               r"[^:/@\s]{0,256}:)(?P<value>[^/@\s]{1,256})(?=@)"),
    # The same without a scheme: admin:s3cret@10.0.0.1:3260.  The user
    # name starts with a letter (not 12:30@noon) and the match only
    # right after one of _USERINFO_END, which neither part holds: each
    # character is scanned for one candidate at most (linear).
    re.compile(r"(?<![^%(end)s])(?P<key>[a-zA-Z][\w.+-]{0,255}:)"
               r"(?P<value>[^%(end)s]{1,256})(?=@[\w\[])"
               % {"end": _USERINFO_END}),
    # A Ceph keyring's "key = <base64>" line, and a Ceph secret anywhere.
    re.compile(r"(?<![\w.-])(?P<key>key[ \t]{0,16}=[ \t]{0,16})"
               r"(?P<value>[A-Za-z0-9+/]{8,1024}={0,2})"),
    re.compile(r"(?<![A-Za-z0-9+/])(?P<key>)"
               r"(?P<value>AQ[A-Za-z0-9+/]{36}==)"),
)


def is_secret_key(key):
    """Whether a mapping key names a credential."""
    if not isinstance(key, str):
        return False
    if len(key) > _CACHED_NAME_MAX:
        return _is_secret_name(key)
    return _is_secret_name_cached(key)


def _is_secret_name(key):
    k = _fold(key)
    if k in _NOT_SECRET:
        return False
    for word in _SECRET_WORDS:
        if word in k:
            return True
    return k.startswith(("auth_", "discovery_auth_"))


def _fold(name):
    """``name`` case-folded as the text patterns fold it (re.IGNORECASE):
    a key spelled with a long s ("\u017fecret"), a Kelvin sign or
    "\u0130"/"\u0131" for an i names the same secret as in ASCII, in a
    mapping as in text.  str.casefold, which also folds "\u00df" to
    "ss", and the two Turkish i's, which casefold leaves apart."""
    return name.casefold().replace("i\u0307", "i").replace("\u0131", "i")


# Every response and logged value is walked key by key, and its keys are
# few (connection_info's, an attachment's): remembered, up to a bound (keys
# come from the wire).
_CACHED_NAME_MAX = 64
_is_secret_name_cached = functools.lru_cache(maxsize=1024)(_is_secret_name)


def mask(obj, _depth=0):
    """Return a copy of ``obj`` with every secret value replaced.

    Walks dicts, lists and tuples at any depth: a secret key's value is
    masked whole (a string, a list of passwords, a mapping), and so is
    the value a list names by key (a ``(key, value)`` pair, an argv's
    ``KEY -v VALUE``); strings are scanned for ``key=value`` shapes
    (bracketed values included) and URL credentials.  Other values are
    returned as they are.
    Structures nested deeper than MAX_DEPTH are replaced by TOO_DEEP.
    """
    if type(obj) is str:
        return obj if plainly_clean(obj) else mask_text(obj)
    if _depth > MAX_DEPTH and isinstance(obj, (dict, list, tuple)):
        return TOO_DEEP
    if isinstance(obj, dict):
        # Strings, the most common values, without a call of their own.
        return {k: (MASK if is_secret_key(k) and _is_value(v)
                    else v if type(v) is str and plainly_clean(v)
                    else mask(v, _depth + 1))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [mask(v, _depth + 1) for v in obj]
        for i in secret_items(obj):
            items[i] = MASK
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, str):
        return mask_text(obj)
    return obj


def holds_secret(obj, _depth=0):
    """Whether ``mask(obj)`` would hide anything in ``obj``: a value
    under a secret key, a secret named by a ``[key, value]`` pair or an
    argv's ``-v``, a secret's shape in a string, or nesting deeper than
    MAX_DEPTH (which mask replaces unseen).  ``mask``'s walk, stopping
    at the first secret, copying nothing.  The journal asks it of what
    a record held (``store``): a record that held a secret is scrubbed
    from the journal's files once deleted."""
    if isinstance(obj, str):
        return not plainly_clean(obj) and mask_text(obj) != obj
    if isinstance(obj, (dict, list, tuple)) and _depth > MAX_DEPTH:
        return True
    if isinstance(obj, dict):
        return any((is_secret_key(k) and _is_value(v))
                   or holds_secret(v, _depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return bool(secret_items(obj)) or any(
            holds_secret(v, _depth + 1) for v in obj)
    return False


def secret_items(seq):
    """Indexes of the items of a list or tuple that are secrets named by
    a key before them: a (key, value) pair, or an argv naming the key
    and giving the value after ``-v`` (iscsiadm's ``-n
    node.session.auth.password -v s3cret``)."""
    found = []
    for i, item in enumerate(seq):
        if not (isinstance(item, str) and is_secret_key(
                item.rsplit(".", 1)[-1])):
            continue
        if (i + 2 < len(seq) and seq[i + 1] in ("-v", "--value")
                and _is_value(seq[i + 2])):
            found.append(i + 2)
        elif len(seq) == 2 and i == 0 and _is_value(seq[1]):
            found.append(1)
    return found


def mask_text(text):
    """Mask ``password=...``-like shapes and URL passwords in free text."""
    if not text or not isinstance(text, str):
        return text
    if plainly_clean(text):
        return text
    text = _mask_keys(text)
    for pattern in _OTHER_PATTERNS:
        text = pattern.sub(_replace, text)
    return text


def masked_json(obj, encode, key):
    """``encode(obj)`` with ``obj[key]`` masked (``mask``): the JSON text
    of a response whose result may hold secrets.

    The result is masked only when the text encoded as it is might show
    one (``json_plainly_clean``): otherwise it is the text of the masked
    result too.  So nearly every result is encoded once and never walked
    for masking.  ``obj`` is changed when the result is masked.
    """
    try:
        text = encode(obj)
    except (TypeError, ValueError, RecursionError):
        text = None     # encoded masked below: raises as it did before
    if text is not None and json_plainly_clean(text):
        return text
    obj[key] = mask(obj[key])
    return encode(obj)


def json_plainly_clean(text):
    """Whether the JSON ``text`` surely shows no secret as ``mask`` sees
    one, so that its value needs no decoding or masking (False says
    nothing: it may).

    Text plainly clean as written (``plainly_clean``: ASCII, none of
    the markers) and without a backslash (no escape to hide a marker
    in: ``"pass\\u0077ord"``, a non-ASCII character the patterns' case
    folding knows) holds each key and string of its value as written,
    so none holds a marker, which every secret's key, every string of a
    secret's shape and every secret named in a list does; and it nests
    no deeper than MAX_DEPTH (where mask cuts) when it has no more
    brackets than that.  Shared by the journal's scrub (store.py) and
    the responses (``masked_json``)."""
    return isinstance(text, str) and "\\" not in text \
        and text.count("{") + text.count("[") <= MAX_DEPTH \
        and plainly_clean(text)


def mask_params(params):
    """``params`` of a call for a log line or an error: values masked,
    param names kept (no param is a secret by its name)."""
    if isinstance(params, dict):
        return {k: mask(v) for k, v in params.items()}
    return mask(params)


# A log line shows this much of an argument (masked first, then cut).
MAX_LOGGED_ARG = 2000


def shorten(text):
    """``text`` cut to MAX_LOGGED_ARG characters for a log line."""
    if len(text) <= MAX_LOGGED_ARG:
        return text
    return "{}... ({} characters)".format(text[:MAX_LOGGED_ARG], len(text))


class Masked:
    """``value`` as a log line shows it: masked when the line is written.

    ``log.info("... %s", mask.Masked(connection_info))`` costs nothing
    when the line is not logged, masks the value once when it is (through
    any handler: vdsm's have no filter of ours), and log.py's filter does
    not scan that text again.  ``params``: the value is a call's
    parameters (``mask_params``); ``short``: the text is cut to
    MAX_LOGGED_ARG characters.  For JSON values (connection_info, a
    call's parameters): inside a dict or a list only strings are scanned,
    so the text of another object there would not be.
    """

    __slots__ = ("value", "params", "short", "_text")

    def __init__(self, value, params=False, short=False):
        self.value = value
        self.params = params
        self.short = short
        self._text = None

    def __str__(self):
        # Kept: every handler formats the record on its own.
        if self._text is None:
            self._text = self._format()
        return self._text

    __repr__ = __str__

    def _format(self):
        value = mask_params(self.value) if self.params else mask(self.value)
        text = str(value)
        if not isinstance(value, (dict, list, tuple, str)):
            # mask() returns other objects (an exception) as they are.
            text = mask_text(text)
        return shorten(text) if self.short else text


# Private helpers

# Every shape above holds one of these (lower-cased), or a Ceph secret's
# "AQ"; text holding none of them has nothing to mask.  Every log line is
# masked, and most (ids, paths, timings) hold none: one lower() and a few
# substring searches instead of the regular expressions.  (A word holding
# another marker, "keyring" holding "key", needs no search of its own.)
# (Every user:password@host, with a scheme or not, holds its "@".)
_MARKERS = _SECRET_WORDS + ("auth_", "@", "key")
_MARKERS = tuple(m for m in _MARKERS
                 if not any(o != m and o in m for o in _MARKERS))


def plainly_clean(text):
    """Whether the string ``text`` surely holds no secret shape: then
    ``mask_text`` returns it unchanged (False says nothing: it may).

    ASCII only: the patterns ignore case the Unicode way ("\u017f"
    matches "s"), which a plain lower() does not follow."""
    if not text.isascii() or "AQ" in text:
        return False
    lowered = text.lower()
    for marker in _MARKERS:
        if marker in lowered:
            return False
    return True


def _is_value(v):
    # Flags such as include_secrets=True or auth_enabled=False are no
    # credentials; empty values hide nothing.
    return v not in (None, "") and not isinstance(v, bool)


def _mask_keys(text):
    out = []
    pos = 0
    brackets = _Brackets(text)
    while True:
        m = _KEY_RE.search(text, pos)
        if m is None:
            break
        start = m.end()
        if _names_parameter(text, m):
            # The reason follows: scanned from there, as any text.
            out.append(text[pos:start])
            pos = start
            continue
        end, quote = _value_end(text, start, brackets)
        pair = m.group("pairsep") is not None
        if not pair and quote == ("", ""):
            # A bare value (or a bracketed one: ends with its bracket).
            # Not in a pair: it is masked whole only when it closes it.
            end = _without_end_punctuation(text, start, end)
        if end == start or (pair and not _closes_pair(text, start, end,
                                                      quote)):
            # A key without a value (or a quoted name and the item after
            # it, not a pair: more follow, or no value): keep it, look
            # further.
            out.append(text[pos:start])
            pos = start
            continue
        out.append(text[pos:start])
        out.append(quote[0] + MASK + quote[1])
        pos = end
    out.append(text[pos:])
    return "".join(out)


# What errors.InvalidParams' message puts before a parameter's name.
_PARAM_PREFIX = errors.InvalidParams.msg.partition("{")[0]


def _names_parameter(text, m):
    """Whether the key ``m`` matched is the name of an InvalidParams
    message (``Invalid parameter <name>: <reason>``), its colon the one
    before the reason.  The name as validate writes it: a bare path
    (``connection_info.data.auth_password``), never quoted; the reason
    as this package writes one: starting with one of ``_REASON_WORDS``.
    Anything else after the colon (a quoted text, a number, another
    word: a storage array's "Invalid parameter chap_secret: <secret>
    must be ...") is taken for a value, as anywhere else."""
    at = m.start() - len(_PARAM_PREFIX)
    return (at >= 0 and text.startswith(_PARAM_PREFIX, at)
            and (at == 0 or not (text[at - 1].isalnum()
                                 or text[at - 1] == "_"))
            and (text[m.start()].isalnum() or text[m.start()] == "_")
            and text[m.start():m.end()].rstrip().endswith(":")
            and _reason_starts(text, m.end()))


# The words the reasons of this package's InvalidParams start with
# (validate, schema, the transports): "expected a string, got number",
# "integer is outside the signed 64-bit range", "value holds a NUL
# character", "key (not shown) is not a string", "missing", "unknown
# property of ...", "must be an object ...", "matches none of ...",
# "nested deeper than ...", "not a UUID".
_REASON_WORDS = frozenset(("expected", "integer", "value", "key", "missing",
                           "unknown", "must", "matches", "nested", "not"))
_REASON_WORD = re.compile(r"[a-z]{1,16}(?![\w])")


def _reason_starts(text, at):
    m = _REASON_WORD.match(text, at)
    return m is not None and m.group() in _REASON_WORDS


def _closes_pair(text, start, end, quote):
    """Whether the value of a ``(key, value)`` match ending at ``end`` is
    the pair's last item: then it is masked, as mask() masks a pair's.
    Not when another item follows (``('token', 'a', 'b')``, an argv
    ``['password-reset', '--user', 'admin']``) nor when it is empty
    (``environ.get('PGPASSWORD', '')``: nothing to hide).  A text that ends
    there (cut) or white space longer than any indent: masked."""
    if quote[1] and end - start == len(quote[0]) + len(quote[1]):
        return False
    m = _PAIR_END.match(text, end)
    return m.end() == len(text) or m.end() - end >= _PAIR_INDENT or \
        text[m.end()] in ")]"


_PAIR_END = re.compile(r"[ \t\r\n]{0,%d}" % _PAIR_INDENT)


def _value_end(text, start, brackets):
    """(end of the value at ``start``, (opening, closing) quote text);
    ``brackets``: the text's ``_Brackets``."""
    n = len(text)
    if start >= n:
        return start, ("", "")
    c = text[start]
    prefix = ""
    if c in "bB" and start + 1 < n and (
            text[start + 1] in "'\"" or (text[start + 1] == "\\" and
                                         text[start + 2:start + 3] in
                                         ("'", '"'))):
        # A bytes value: b'...', or b\"...\" inside a JSON string.
        prefix, c = c, text[start + 1]
    at = start + len(prefix)
    if c == "\\" and at + 1 < n and text[at + 1] in "'\"":
        # An escaped quote (JSON inside a string): the value ends at the
        # same escaped quote.
        q = text[at:at + 2]
        close = text.find(q, at + 2)
        if close == -1:
            return n, (prefix + q, "")
        return close + 2, (prefix + q, q)
    if c in _OPENERS and not prefix or c == "<":
        # A list, tuple or mapping of secrets ('extra_passwords':
        # ['pw1', 'pw2']), or an object's <...> repr: the whole
        # bracketed value.
        return brackets.end(start), ("", "")
    if c in "'\"":
        m = _QUOTED[c].match(text, at + 1)
        while m is not None:
            # pprint writes a long string as adjacent pieces ('a b '
            # <line break, indent> 'c d'): one value, all of it hidden.
            piece = _NEXT_PIECE.match(text, m.end())
            if piece is None:
                return m.end(), (prefix + text[at], text[m.end() - 1])
            m = _QUOTED[text[piece.end() - 1]].match(text, piece.end())
        # Unclosed (a truncated message): hide everything after it.
        return n, (prefix + text[at], "")
    m = _CALL.match(text, start)
    if m is not None:
        # An object's repr written as a call (SecretStr('s3cret')): its
        # name and the whole bracketed arguments.
        return brackets.end(m.end()), ("", "")
    m = _BARE.match(text, start)
    if m is None:
        return start, ("", "")
    return m.end(), ("", "")


# Sentence punctuation that may end a bare value: the text's, not the
# secret's ("login failed: password=s3cret." "password=s3cret; retrying"
# "password=s3cret: access denied").  Not "!" nor "?": passwords end
# with them far more often than error messages put them there.
_END_PUNCTUATION = ".;:"
_END_PUNCTUATION_MAX = 3


def _without_end_punctuation(text, start, end):
    """The end of the bare value ``text[start:end]`` before the sentence
    punctuation glued to it (at most _END_PUNCTUATION_MAX characters, and
    never all of it): kept in the text, the secret masked without it.
    (A secret that does end so shows that character: "s3cret." and
    "s3cret" followed by a full stop read the same.)"""
    stop = max(start + 1, end - _END_PUNCTUATION_MAX)
    while end > stop and text[end - 1] in _END_PUNCTUATION:
        end -= 1
    return end


_CALL = re.compile(r"[A-Za-z_][\w.]{0,%d}(?=\()" % _NAME_MAX)


# White space, then the next adjacent piece of a string value.
_NEXT_PIECE = re.compile(r"[ \t\r\n]{1,%d}[bB]?['\"]" % _PAIR_INDENT)


_OPENERS = {"[": "]", "(": ")", "{": "}"}


class _Brackets:
    """Where the bracketed values of one text end.

    A pair's bracketed value that does not close its pair is searched
    again from inside (it may hold pairs of its own), so the same
    brackets are asked for again and again: each scan records the end of
    every bracket it passes, later questions are lookups, and the scans
    of one text may read at most a few times its length in all; past
    that (only a text made to defeat the lookups gets there) a value
    runs to the end of the text: masked, never left out.  Without this a
    nested ``('password', [('password', [...`` took quadratic time: a
    1 MB method name held the agent for minutes.
    """

    def __init__(self, text):
        self._text = text
        self._ends = {}
        self._budget = 4 * len(text) + 4096

    def end(self, start):
        """The end of the bracketed value opening at ``start`` (nested
        brackets and quoted strings skipped; unclosed: the end of the
        text).  A ``<`` opens a value there only (an object's repr:
        ``<`` inside any value is no bracket, as in ``a < b``)."""
        ends = self._ends
        if start in ends:
            return ends[start]
        text = self._text
        n = len(text)
        if self._budget <= 0:
            return n
        opened = []         # (position, closing character)
        quote = None
        i = start
        if text[start] == "<":
            opened.append((start, ">"))
            i += 1
        while i < n:
            c = text[i]
            if quote:
                if c == "\\":
                    i += 1
                elif c == quote:
                    quote = None
            elif c in "'\"":
                quote = c
            elif c in _OPENERS:
                opened.append((i, _OPENERS[c]))
            elif opened and c == opened[-1][1]:
                ends[opened.pop()[0]] = i + 1
                if not opened:
                    break
            i += 1
        self._budget -= i - start + 1
        for position, _ in opened:
            ends[position] = n
        return ends[start]


def _replace(m):
    if not m.group("value"):
        return m.group(0)
    return m.group("key") + MASK
