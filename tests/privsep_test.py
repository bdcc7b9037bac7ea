"""What the privsep client and daemon agree on (privsep.py)."""

import ast
import os
import re

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


# The entrypoints of each privsep protocol, as brick.py declares them
# (name: parameters).  A change to one of them (or to what its arguments
# or result mean) is a new protocol: bump privsep.PROTOCOL and add its
# table here; the daemon of one and the client of another refuse each
# other (privsep.py, "Versions").
ENTRYPOINTS = {
    2: {
        "getpid": [],
        "handshake": ["client"],
        "hello": ["flow_id"],
        "connector_properties": ["my_ip", "deadline", "flow_id"],
        "connect_volume": ["connection_info", "deadline", "flow_id"],
        "disconnect_volume": ["connection_info", "attachment",
                              "connecting", "deadline", "flow_id"],
        "extend_volume": ["connection_info", "deadline", "flow_id"],
        "add_udev_rule": ["sd_id", "vol_id", "path", "deadline",
                          "flow_id"],
        "remove_udev_rule": ["sd_id", "vol_id", "temp", "deadline",
                             "flow_id"],
        "delete_rbd_conf": ["path", "holding", "deadline", "flow_id"],
    },
}


def declared_entrypoints():
    # Read from the source: importing brick would drag oslo.privsep's
    # daemon side into the test process.
    with open(os.path.join(PACKAGE, "brick.py")) as f:
        tree = ast.parse(f.read())
    return {node.name: [a.arg for a in node.args.args]
            for node in tree.body if isinstance(node, ast.FunctionDef)
            and any(ast.unparse(d) == "context.entrypoint"
                    for d in node.decorator_list)}


def brick_protocol():
    with open(os.path.join(PACKAGE, "brick.py")) as f:
        tree = ast.parse(f.read())
    [value] = [node.value.value for node in tree.body
               if isinstance(node, ast.Assign)
               and [ast.unparse(t) for t in node.targets] == ["PROTOCOL"]]
    return value


def test_entrypoints_are_those_of_the_protocol_they_state():
    assert privsep.PROTOCOL in ENTRYPOINTS, (
        "no entrypoint table for privsep.PROTOCOL {}".format(
            privsep.PROTOCOL))
    assert declared_entrypoints() == ENTRYPOINTS[privsep.PROTOCOL], (
        "an entrypoint changed: bump privsep.PROTOCOL (and brick.PROTOCOL)"
        " and add its table")
    # The daemon refuses to start when the two differ (brick.start_problem).
    assert brick_protocol() == privsep.PROTOCOL


def module_build(name):
    with open(os.path.join(PACKAGE, name)) as f:
        tree = ast.parse(f.read())
    [value] = [node.value.value for node in tree.body
               if isinstance(node, ast.Assign)
               and [ast.unparse(t) for t in node.targets] == ["BUILD"]]
    return value


def test_a_source_tree_is_one_build_in_every_stamped_file():
    # scripts/stamp-build writes the RPM build's id into these; the
    # daemon compares them (brick.file_builds, start_problem).
    with open(os.path.join(os.path.dirname(PACKAGE), "scripts",
                           "stamp-build")) as f:
        script = f.read()
    stamped = re.search(r"^stamped=\((.*)\)$", script, re.M).group(1)
    names = [os.path.basename(n.strip('"')) for n in stamped.split()]
    assert names == ["__init__.py", "privsep.py", "brick.py"]
    assert {name: module_build(name) for name in names} == dict.fromkeys(
        names, "source")
    assert privsep.BUILD == "source"


def test_identity_tells_protocol_version_build_and_directory():
    from vdsm_managedvolume import __version__
    assert privsep.identity() == {"protocol": privsep.PROTOCOL,
                                  "version": __version__,
                                  "build": privsep.BUILD, "path": PACKAGE}
    assert privsep.describe(privsep.identity()) == (
        "privsep protocol {} (vdsm-managedvolume {}, build source in {})"
        .format(privsep.PROTOCOL, __version__, PACKAGE))
    # A daemon of a version from before the stamp tells no build.
    assert privsep.describe({"protocol": 2, "version": "0.1.0",
                             "path": "/x"}) == (
        "privsep protocol 2 (vdsm-managedvolume 0.1.0 in /x)")


def test_a_side_that_tells_no_protocol_is_from_before_the_handshake():
    for info in (None, {}, {"version": "0.1.0"}, "2"):
        assert privsep.describe(info) == (
            "no privsep protocol (a version from before the handshake)")
