"""procs: the host's processes that run a given command."""

import os
import subprocess
import sys
import time

from vdsm_managedvolume import procs


def test_a_running_process_is_found_by_its_argv_with_its_age():
    marker = "procs-test-%d" % time.monotonic_ns()
    child = subprocess.Popen([sys.executable, "-c",
                              "import time; time.sleep(60)", marker])
    try:
        def match(argv):
            return "sleeper" if marker in argv else None

        deadline = time.monotonic() + 30
        while True:
            found = procs.matching(match)
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        [(pid, name, age)] = found
        assert (pid, name) == (child.pid, "sleeper")
        assert age >= 0
        # Not as a child of its parent (the daemon's own calls'):
        assert procs.matching(match, parent=os.getpid()) == []
    finally:
        child.kill()
        child.wait()
    assert procs.matching(match) == []


def test_a_command_name_with_spaces_and_parentheses_is_read(tmp_path):
    # /proc/PID/stat's second field is the command's name in
    # parentheses; it may hold both.
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cmdline").write_bytes(b"iscsiadm\0-T\0x\0")
    (proc / "42" / "status").write_bytes(b"Name:\ta\nUid:\t0\t0\t0\t0\n")
    fields = ["S", "1"] + ["0"] * 17 + ["500"] + ["0"] * 10
    (proc / "42" / "stat").write_text(
        "42 (a) b (c) " + " ".join(fields) + "\n")
    (proc / "uptime").write_text("100.00 50.00\n")
    (proc / "7").mkdir()        # a kernel thread: no argv
    (proc / "7" / "cmdline").write_bytes(b"")
    [(pid, name, age)] = procs.matching(
        lambda argv: "it" if argv[0] == "iscsiadm" else None, str(proc))
    assert (pid, name) == (42, "it")
    assert abs(age - (100 - 500 / procs._TICKS)) < 1e-6
    assert procs.matching(lambda argv: "it", str(proc), parent=1) == []


def _fake_proc(tmp_path, uids, pid=42, comm="iscsiadm"):
    proc = tmp_path / "proc"
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cmdline").write_bytes(
        b"iscsiadm\0-T\0x\0--login\0")
    (proc / str(pid) / "comm").write_text(comm + "\n")
    (proc / str(pid) / "status").write_text(
        "Name:\t{}\nUmask:\t0022\nUid:\t{}\nGid:\t0\t0\t0\t0\n"
        .format(comm, "\t".join(uids)))
    fields = ["S", "1"] + ["0"] * 17 + ["500"] + ["0"] * 10
    (proc / str(pid) / "stat").write_text(
        "{} ({}) ".format(pid, comm) + " ".join(fields) + "\n")
    (proc / "uptime").write_text("100.00 50.00\n")
    return str(proc)


def test_only_the_argv_of_a_command_the_matcher_names_is_read(
        tmp_path, monkeypatch):
    # Reading /proc/PID/cmdline takes the process's memory map lock: a
    # process faulting on a hung mount would hold the scan (and the
    # disconnect) past its deadline.  comm takes no such lock: only the
    # processes named as the matcher's programs have their argv read
    # (review-safety10 L-1).
    proc = _fake_proc(tmp_path, ["0"] * 4, pid=42, comm="iscsiadm")
    _fake_proc(tmp_path, ["0"] * 4, pid=43, comm="qemu-kvm")
    read = []
    argv = procs._argv
    monkeypatch.setattr(procs, "_argv",
                        lambda proc, pid: read.append(pid) or argv(proc, pid))

    def match(argv):
        return "login" if "--login" in argv else None

    match.programs = frozenset(["iscsiadm"])
    assert [pid for pid, _, _ in procs.matching(match, proc)] == [42]
    assert read == [42]
    # Without programs, every root process's argv is read.
    read.clear()
    assert sorted(pid for pid, _, _ in procs.matching(
        lambda argv: match(argv), proc)) == [42, 43]
    assert sorted(read) == [42, 43]


def test_the_transports_matchers_name_their_programs():
    from vdsm_managedvolume import transports
    from tests.host_fixtures import hung_iscsi_info
    iscsi = transports.get("iscsi").connect_command(hung_iscsi_info())
    assert iscsi.programs == {"iscsiadm"}
    rbd = transports.get("rbd").connect_command(
        {"driver_volume_type": "rbd", "data": {"name": "pool/image"}})
    assert rbd.programs == {"rbd"}
    nvme = transports.get("nvmeof").connect_command(
        {"driver_volume_type": "nvmeof", "data": {"target_nqn": "nqn.x"}})
    assert nvme.programs == {"nvme"}


def test_only_a_process_of_real_and_effective_uid_root_counts(tmp_path):
    # Any user may run a program named iscsiadm with a volume's target
    # on its command line; counted, it would hold that volume's
    # disconnects off (review-safety10 M-1).  /proc/PID of a process
    # that made itself non-dumpable shows root as its owner (as this
    # fake directory does): its status's Uid line tells.
    def match(argv):
        return "login" if "--login" in argv else None

    assert procs.matching(match, _fake_proc(tmp_path / "a", ["0"] * 4))
    for uids in (["65534"] * 4, ["65534", "0", "0", "0"],
                 ["0", "65534", "0", "0"]):
        assert procs.matching(
            match, _fake_proc(tmp_path / uids[0] / uids[1], uids)) == []


def test_another_users_process_with_a_matching_argv_is_not_found(tmp_path):
    marker = "procs-test-user-%d" % time.monotonic_ns()
    child = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        def match(argv):
            return "it" if marker in argv else None

        # Until setpriv (root, the marker on its own argv too) has
        # dropped to that user and run Python.
        deadline = time.monotonic() + 30
        while (procs._argv(procs.PROC, child.pid) or [None])[0] != \
                sys.executable:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert procs.matching(match) == []
    finally:
        child.kill()
        child.wait()
