"""What the privsep client and daemon agree on (privsep.py)."""

import ast
import os

from vdsm_managedvolume import faults
from vdsm_managedvolume import privsep

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "vdsm_managedvolume")


def imported_modules(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update(alias.name for alias in node.names)
    return names


def test_privsep_crash_points_are_registered():
    assert set(privsep.CRASH_POINTS) <= faults.POINTS


def test_plain_turns_msgpack_tuples_and_sets_into_lists():
    value = {"a": (1, (2, 3)), "b": {"c": ({"d": (4,)},)}, 5: {"x"},
             "e": b"bytes"}
    assert privsep.plain(value) == {
        "a": [1, [2, 3]], "b": {"c": [{"d": [4]}]}, "5": ["x"],
        "e": "bytes"}


def test_remote_error_crosses_by_the_name_oslo_privsep_sends():
    # oslo_privsep.daemon sends an exception as "<module>.<class>".
    e = privsep.RemoteError("failed", "x")
    assert privsep.REMOTE_ERROR == "{}.{}".format(
        type(e).__module__, type(e).__name__)


def test_client_and_daemon_never_import_each_other():
    assert "privileged" not in imported_modules(
        os.path.join(PACKAGE, "brick.py"))
    assert "brick" not in imported_modules(
        os.path.join(PACKAGE, "privileged.py"))


def test_helper_args_give_each_helper_option_once_in_order():
    args = privsep.helper_args("/etc/x.conf", "/run/x.sock")
    assert args[::2] == list(privsep.HELPER_OPTIONS)
    assert args[1::2] == ["/etc/x.conf", privsep.CONTEXT, "/run/x.sock"]
    # A helper command names its configuration file itself.
    assert privsep.helper_args(None, "/run/x.sock") == [
        "--privsep_context", privsep.CONTEXT,
        "--privsep_sock_path", "/run/x.sock"]
