import json
import random
import threading

import pytest

from vdsm_managedvolume import jsontext

OPTIONS = [{}, {"allow_nan": False}, {"sort_keys": True},
           {"ensure_ascii": False}, {"check_circular": False}]


def _outcome(encode, value):
    try:
        return "text", encode(value)
    except (ValueError, TypeError, RecursionError) as e:
        return type(e), str(e)


def _values():
    circular = []
    circular.append(circular)
    return ["x", "\u00e9\u2028", 1, -1.5, None, True, 10 ** 30,
            [1, (2, 3)], {"b": 1, "a": {"z": [float("nan")]}},
            {1: 2, 2.5: "x", None: 1, False: 2}, {"k": object()},
            {"x": float("inf")}, {(1,): 2}, [{"\u00e9": "\ud800"}],
            circular]


@pytest.mark.parametrize("options", OPTIONS)
def test_same_text_and_errors_as_json_encoder(options):
    ours = jsontext.Encoder(**options)
    theirs = json.JSONEncoder(**options)
    if options.get("check_circular") is False:
        values = _values()[:-1]     # json recurses until RecursionError
    else:
        values = _values()
    # Twice: a failed call leaves the next one unharmed.
    for value in values + values:
        assert _outcome(ours.encode, value) == \
            _outcome(theirs.encode, value), value
    rnd = random.Random(7)

    def make(depth=0):
        r = rnd.random()
        if depth > 3 or r < 0.3:
            return rnd.choice([1, -2, 3.25, "s\"", "\u00e9", None, True,
                               1e300, "k\n"])
        if r < 0.65:
            return [make(depth + 1) for _ in range(rnd.randint(0, 4))]
        return {rnd.choice("abc\u00e9"): make(depth + 1)
                for _ in range(rnd.randint(0, 4))}

    for _ in range(500):
        value = make()
        assert ours.encode(value) == theirs.encode(value)


def test_this_interpreter_takes_the_fast_path():
    assert jsontext.Encoder(sort_keys=True)._fast
    assert not jsontext.Encoder(indent=2)._fast


def test_threads_encoding_one_object_at_once():
    # One encoder per thread: the objects another thread is inside are
    # no circular reference of this one's.
    enc = jsontext.Encoder()
    value = {"a": [list(range(50)) for _ in range(50)]}
    want = json.dumps(value)
    failed = []

    def run():
        for _ in range(200):
            try:
                assert enc.encode(value) == want
            except Exception as e:     # pragma: no cover - the failure
                failed.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed == []


DOCUMENTS = ['{"a": 1}', ' [1, 2.5, "x", null, true] \n', '', ' ', '{',
             '{"a": 1} x', '\ufeff{}', 'NaN', '[-Infinity]', '"\\ud800"',
             '1e400', '{"a":1,}', "'x'", '01', '-', '"\x00"',
             '[' * 100000 + ']' * 100000, b'{"a": 1}', b'\xef\xbb\xbf{}',
             bytearray(b'[1]'), None, 5,
             # Whitespace around a value, and what is not JSON's.
             '\t{"a": 1}', '{"a": 1}\r\n', '\n[1]\t ', '[1]  x', ' x',
             '\n', '1 2', '\u00a0{}', '{}\u00a0', '\x0b1', '"a" ']


def _read(decode, document):
    try:
        return "value", decode(document)
    except (ValueError, TypeError, RecursionError) as e:
        return type(e), str(e)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_loads_reads_as_json_loads(document):
    assert _read(jsontext.loads, document) == _read(json.loads, document)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_decoder_reads_as_json_decoder(document):
    def refuse(name):
        raise ValueError("no " + name)

    ours = jsontext.Decoder(parse_constant=refuse)
    theirs = json.JSONDecoder(parse_constant=refuse)
    assert _read(ours.decode, document) == _read(theirs.decode, document)
