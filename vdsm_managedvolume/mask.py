"""The one place secrets are hidden before data leaves the process.

Connection info carries credentials: iSCSI CHAP (``auth_password``,
``discovery_auth_password``), RBD keyrings (``keyring``), backend passwords
(``san_password``), DB URLs (``postgresql://user:pw@host/db``).  vdsm logged
them at INFO.  Here every log record passes a filter that calls ``mask``
(see ``log.py``) and every response that may hold connection data calls it
explicitly, so no caller has to remember.

A key is secret when its lower-cased name contains ``password``, ``secret``,
``keyring`` or ``token``, or starts with ``auth_`` / ``discovery_auth_`` and
is not the auth method or user name.
"""

import re

MASK = "********"

_SECRET_WORDS = ("password", "passwd", "secret", "keyring", "token",
                 "private_key", "credential")
# Auth fields that are not credentials themselves.
_NOT_SECRET = frozenset(("auth_method", "auth_username",
                         "discovery_auth_method", "discovery_auth_username",
                         "auth_enabled", "discovery_auth_enabled"))

# "key": "value" / 'key': 'value' / key=value / key: value in free text.
_KEY = r"""['"]?[\w-]*(?:password|passwd|secret|keyring|token)[\w-]*['"]?"""
_TEXT_PATTERNS = (
    # Quoted values: everything up to the closing quote (keyrings hold
    # spaces and newlines).
    re.compile(r"(?P<key>" + _KEY + r"\s*[:=]\s*)(?P<q>['\"])"
               r"(?P<value>(?:\\.|(?!(?P=q)).)*)(?P=q)",
               re.IGNORECASE | re.DOTALL),
    # Bare values: up to white space or a delimiter.
    re.compile(r"(?P<key>" + _KEY + r"\s*[:=]\s*)(?P<q>)"
               r"(?P<value>[^'\",\s}\])]+)",
               re.IGNORECASE),
    # URLs with credentials: scheme://user:password@host
    re.compile(r"(?P<key>\w+(?:\+\w+)?://[^:/@\s]+:)(?P<q>)"
               r"(?P<value>[^@\s]+)(?=@)"),
)


def is_secret_key(key):
    """Whether a mapping key names a credential."""
    if not isinstance(key, str):
        return False
    k = key.lower()
    if k in _NOT_SECRET:
        return False
    if any(word in k for word in _SECRET_WORDS):
        return True
    return k.startswith("auth_") or k.startswith("discovery_auth_")


def mask(obj):
    """Return a copy of ``obj`` with every secret value replaced.

    Walks dicts, lists and tuples; strings are scanned for ``key=value``
    shapes and URL credentials.  Other values are returned as they are.
    """
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_key(k) and _is_value(v) else mask(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [mask(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(mask(v) for v in obj)
    if isinstance(obj, str):
        return mask_text(obj)
    return obj


def _is_value(v):
    # Flags such as include_secrets=True or auth_enabled=False are no
    # credentials; empty values hide nothing.
    return v not in (None, "") and not isinstance(v, bool)


def mask_text(text):
    """Mask ``password=...``-like shapes and URL passwords in free text."""
    if not text:
        return text
    for pattern in _TEXT_PATTERNS:
        text = pattern.sub(_replace, text)
    return text


def _replace(m):
    if not m.group("value"):
        return m.group(0)
    return "{}{q}{}{q}".format(m.group("key"), MASK, q=m.group("q"))
