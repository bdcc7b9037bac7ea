"""The warm service: trust, fallback to cold runs, isolation, parallelism.

The byte-for-byte equality of cold and warm runs is proven in
engine_client_test.py; here is what is special to the service.
"""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from vdsm_managedvolume.engine import args as argsmod
from vdsm_managedvolume.engine.args import FILE_DRIVER

from .engine_fixtures import ROOT
from .engine_fixtures import Service
from .engine_fixtures import Shim
from .engine_fixtures import children_of
from .engine_fixtures import new_id
from .engine_fixtures import process_cmdlines
from .engine_fixtures import process_state
from .engine_fixtures import start_time
from .engine_fixtures import wait_until_ended

SECRET = "Warm-s3cret-pw"


@pytest.fixture
def own_service(tmp_path):
    """A service of its own, for the tests that stop or tamper with it."""
    shim = Shim(str(tmp_path), str(tmp_path / "run" / "cinderlib.sock"))
    service = Service(shim, str(tmp_path / "service.log"))
    yield service
    service.stop()


def test_socket_is_private_and_no_secret_is_on_any_command_line(
        engine_service, engine_shim, engine_backend):
    st = os.stat(engine_service.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(
        engine_service.socket_path)).st_mode) == 0o700

    be = engine_backend
    driver = dict(be["driver"], san_password=SECRET)
    # Secrets cross the socket: the command itself reads them from stdin.
    proc = engine_shim.popen("create_volume", new_id(), 1, driver="-",
                             db_url=be["db_url"])
    seen = process_cmdlines([engine_service.pid, proc.pid])
    out, err = proc.communicate(json.dumps(driver).encode(), timeout=60)
    assert proc.returncode == 0, err
    for cmdline in seen.values():
        assert SECRET not in cmdline
    assert SECRET not in engine_service.log()


def test_no_service_or_a_stale_socket_means_a_cold_run(engine_shim,
                                                       engine_backend,
                                                       tmp_path):
    be = engine_backend
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()       # the file stays, nobody listens
    os.chmod(stale, 0o600)
    for path in (str(tmp_path / "absent.sock"), stale):
        shim = Shim(engine_shim.run_dir, path)
        r = shim.run("create_volume", new_id(), 1, driver=be["driver"],
                     db_url=be["db_url"])
        assert (r.stdout, r.code) == (b"", 0), r.describe()


def test_a_socket_others_could_use_gets_no_request(own_service,
                                                    engine_backend):
    be = engine_backend
    os.chmod(own_service.socket_path, 0o666)
    cid = "cid-" + new_id()[:8]
    r = own_service.shim.run("create_volume", new_id(), 1, cid=cid,
                             driver=be["driver"], db_url=be["db_url"])
    assert (r.stdout, r.code) == (b"", 0), r.describe()   # ran cold
    assert cid not in own_service.log()
    assert "not private" in r.stderr


def test_one_service_serves_several_databases_without_mixing_them(
        engine_service, engine_shim, tmp_path):
    backends = []
    for name in ("a", "b"):
        backends.append({
            "driver": {"volume_driver": FILE_DRIVER,
                       "volume_backend_name": "file",
                       "file_volume_dir": str(tmp_path / name)},
            "db_url": "sqlite:///{}".format(tmp_path / (name + ".db")),
        })
    vols = {0: new_id(), 1: new_id()}
    for i in (0, 1, 0, 1):
        be = backends[i]
        r = engine_shim.run("create_volume", vols[i], 1, **be)
        assert r.code == 0, r.describe()
    for i, be in enumerate(backends):
        r = engine_shim.run("get_connection_info", vols[1 - i], **be)
        assert r.error() == "Volume {} not found".format(vols[1 - i])
        r = engine_shim.run("delete_volume", vols[i], **be)
        assert (r.stdout, r.code) == (b"", 0), r.describe()


def test_requests_run_in_parallel(engine_service, engine_shim,
                                  engine_backend):
    be = engine_backend
    vols = [new_id() for _ in range(4)]
    results = {}

    def create(vol):
        results[vol] = engine_shim.run("create_volume", vol, 1,
                                       driver=be["driver"],
                                       db_url=be["db_url"])

    # The database exists before the burst (a fresh schema is created once).
    engine_shim.run("storage_stats", "false", driver=be["driver"],
                    db_url=be["db_url"])
    threads = [threading.Thread(target=create, args=(v,)) for v in vols]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for vol in vols:
        assert (results[vol].stdout, results[vol].code) == (b"", 0), \
            results[vol].describe()
    assert sorted(os.listdir(be["dir"])) == sorted("volume-" + v
                                                   for v in vols)


def test_sigterm_stops_the_service_and_removes_its_socket(own_service):
    own_service.proc.send_signal(signal.SIGTERM)
    assert own_service.proc.wait(30) == 0
    assert not os.path.exists(own_service.socket_path)


def test_a_second_service_on_the_same_socket_refuses_to_start(own_service):
    import subprocess
    from .engine_fixtures import client_argv
    proc = subprocess.run(
        client_argv() + ["--serve", "--socket", own_service.socket_path],
        env=own_service.shim.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "a service already listens on" in proc.stderr
    # The first one still serves.
    base = own_service.shim.run_dir
    r = own_service.shim.run("storage_stats", "false", cid="c",
                             driver={"volume_driver": FILE_DRIVER,
                                     "file_volume_dir": base + "/vols"},
                             db_url="sqlite:///{}/db".format(base))
    assert r.code == 0, r.describe()
    assert "[flow=c] Child " in own_service.log()


def test_a_service_that_wrote_more_than_a_pipe_holds_to_stderr_serves(
        tmp_path, engine_backend):
    # The fixture's service writes to a pipe: unread, its 65 KiB'th byte
    # of stack dumps (SIGUSR1) or log lines blocked the service for good.
    shim = Shim(str(tmp_path), str(tmp_path / "run" / "cinderlib.sock"))
    service = Service(shim, "-")            # logs and dumps to stderr
    try:
        for _ in range(400):                # ~370 bytes each
            os.kill(service.pid, signal.SIGUSR1)
            time.sleep(0.002)
        be = engine_backend
        r = shim.run("storage_stats", "false", cid="after-dumps",
                     driver=be["driver"], db_url=be["db_url"], timeout=30)
        assert r.code == 0, r.describe()
    finally:
        service.stop()
    text = service.stderr()
    assert len(text) > 2 * 65536, text[-3000:]
    assert "[flow=after-dumps] Child " in text


def test_a_spare_child_serves_one_request_and_is_replaced(own_service,
                                                          engine_backend):
    be = engine_backend
    shim = own_service.shim
    # The first request of a DB URL gets a child of its own; then the
    # service forks a spare for that URL, which warms up while nobody waits.
    r = shim.run("create_volume", new_id(), 1, driver=be["driver"],
                 db_url=be["db_url"])
    assert r.code == 0, r.describe()
    served = []
    for attempt in range(5):
        time.sleep(0.5)     # the spare warms up in ~15 ms on an idle host
        cid = "spare-{}".format(attempt)
        r = shim.run("storage_stats", "false", cid=cid, driver=be["driver"],
                     db_url=be["db_url"])
        assert r.code == 0, r.describe()
        m = re.search(r"\[flow={}\] Child (\d+) runs storage_stats "
                      r"\(pre-forked\)".format(cid), own_service.log())
        if m:
            served.append(int(m.group(1)))
        if len(served) == 2:
            break
    # Two requests, two processes: a spare serves once and exits.
    assert len(served) == 2 and served[0] != served[1], own_service.log()
    deadline = time.monotonic() + 10
    while process_state(served[0]) not in (None, "Z"):
        assert time.monotonic() < deadline, "spare child did not exit"
        time.sleep(0.05)


def test_a_spare_child_exits_with_its_service(own_service, engine_backend):
    be = engine_backend
    r = own_service.shim.run("storage_stats", "false", driver=be["driver"],
                             db_url=be["db_url"])
    assert r.code == 0, r.describe()
    deadline = time.monotonic() + 10
    while not children_of(own_service.pid):
        assert time.monotonic() < deadline, "no spare child was forked"
        time.sleep(0.05)
    spares = children_of(own_service.pid)
    # Killed without a chance to clean up: the spare reads EOF and exits
    # instead of lingering with the service's state.
    own_service.proc.kill()
    own_service.proc.wait()
    deadline = time.monotonic() + 10
    while any(process_state(pid) not in (None, "Z") for pid in spares):
        assert time.monotonic() < deadline, "spare child outlived the service"
        time.sleep(0.05)


SLOW_DRIVER = "tests.engine_client_test.SlowDriver"


def start_slow_request(service, tmp_path):
    """A warm create_volume that runs (120 s) in a child of ``service``:
    (the command's Popen, the child's pid and start time)."""
    vols = tmp_path / "slow-vols"
    vol = new_id()
    proc = service.shim.popen(
        "create_volume", vol, 1,
        driver={"volume_driver": SLOW_DRIVER, "file_volume_dir": str(vols)},
        db_url="sqlite:///{}".format(tmp_path / "slow.sqlite"))
    pid_file = vols / "slow-{}.pid".format(vol)
    deadline = time.monotonic() + 60
    while not pid_file.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    pid, started = (int(v) for v in pid_file.read_text().split())
    return proc, pid, started


def test_a_service_killed_with_sigkill_takes_its_children_with_it(
        own_service, tmp_path):
    proc, pid, started = start_slow_request(own_service, tmp_path)
    try:
        # The request's child, and the spare forked after it.
        deadline = time.monotonic() + 30
        while len(children_of(own_service.pid)) < 2:
            assert time.monotonic() < deadline, "no spare child was forked"
            time.sleep(0.05)
        children = [(p, start_time(p)) for p in children_of(own_service.pid)]
        assert pid in dict(children)
        own_service.proc.kill()
        own_service.proc.wait()
        # No orphan left to PID 1: the one running a request ends too.
        for child, child_started in children:
            wait_until_ended(child, child_started)
        out, _ = proc.communicate(timeout=60)
        assert out.startswith(b"error:warm service at "), out
        assert b"lost the request" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_sigterm_ends_the_requests_still_running_after_the_grace(
        own_service, tmp_path):
    proc, pid, started = start_slow_request(own_service, tmp_path)
    try:
        own_service.stop()
        assert own_service.proc.returncode == 0
        # Ended (and reaped) by the service itself, not left behind.
        assert start_time(pid) is None
        log = own_service.log()
        assert "Child {} still running at stop, killing it".format(pid) \
            in log
        out, _ = proc.communicate(timeout=60)
        assert out.startswith(b"error:warm service at "), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_killed_test_run_leaves_no_service_behind(tmp_path):
    # A stand-in for the test session: it starts a service as the
    # fixtures do, then is killed with SIGKILL (no fixture teardown).
    session = subprocess.Popen(
        [sys.executable, "-c", KILLED_SESSION, str(tmp_path)],
        stdout=subprocess.PIPE, cwd=ROOT)
    pid = started = None
    try:
        pid = int(session.stdout.readline())
        started = start_time(pid)
        session.kill()
        session.wait()
        wait_until_ended(pid, started)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
        session.stdout.close()
        if pid is not None and start_time(pid) == started:
            os.kill(pid, signal.SIGKILL)


KILLED_SESSION = """\
import sys, time
from tests.engine_fixtures import Service, Shim
base = sys.argv[1]
service = Service(Shim(base, base + "/run/s.sock"), base + "/service.log")
print(service.pid, flush=True)
time.sleep(300)
"""


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A stand-in for the default run directory (/run/... for root)."""
    path = tmp_path / "default-run"
    monkeypatch.setattr(argsmod, "default_run_dir", lambda: str(path))
    return path


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _listen(socket_path):
    from vdsm_managedvolume.engine import warm
    server = warm.Server(str(socket_path))
    server._listen()
    return server


def test_the_service_creates_its_socket_directories_private(tmp_path,
                                                            run_dir):
    sock = tmp_path / "a" / "b" / "cinderlib.sock"
    server = _listen(sock)
    try:
        assert _mode(sock) == 0o600
        assert _mode(sock.parent) == 0o700
        assert _mode(sock.parent.parent) == 0o700
    finally:
        server._close()
    assert not sock.exists()


def test_a_default_run_dir_a_cold_run_made_0755_is_made_private(run_dir):
    # What an older cold run left: the run dir 0755, its locks/ 0700.
    (run_dir / "locks").mkdir(parents=True)
    run_dir.chmod(0o755)
    server = _listen(run_dir / "cinderlib.sock")
    try:
        assert _mode(run_dir) == 0o700
        assert _mode(run_dir / "cinderlib.sock") == 0o600
    finally:
        server._close()
    # A cold run's locks dir under it does the same.
    run_dir.chmod(0o755)
    assert argsmod.private_dirs(str(run_dir / "locks")) == [str(run_dir)]
    assert _mode(run_dir) == 0o700


def test_an_existing_directory_the_admin_named_is_left_alone(tmp_path,
                                                             run_dir):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    server = _listen(shared / "cinderlib.sock")
    try:
        assert _mode(shared) == 0o755
        assert _mode(shared / "cinderlib.sock") == 0o600
    finally:
        server._close()


@pytest.mark.root
def test_a_default_run_dir_of_another_uid_is_refused(run_dir):
    from vdsm_managedvolume import errors
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, 4242, 4242)
    with pytest.raises(errors.EngineError, match="owned by uid 0"):
        _listen(run_dir / "cinderlib.sock")
    assert not (run_dir / "cinderlib.sock").exists()


def test_every_command_on_a_machine_locks_in_one_place(tmp_path,
                                                      monkeypatch):
    """ENGINE_TMP is only in the environment of the engine's own
    commands (and ovirt-engine empties it at every start and stop): an
    admin's command, or one run by hand, locked a volume somewhere else
    than the engine's concurrent command on it."""
    from vdsm_managedvolume.engine import volumelock
    monkeypatch.delenv("ENGINE_TMP", raising=False)
    by_hand = argsmod.default_locks_dir()
    monkeypatch.setenv("ENGINE_TMP", str(tmp_path / "engine-tmp"))
    assert argsmod.default_locks_dir() == by_hand
    assert not by_hand.startswith(str(tmp_path))

    # On an engine machine: in ovirt-engine's state directory.
    state = tmp_path / "var-lib-ovirt-engine"
    state.mkdir()
    monkeypatch.setattr(argsmod, "ENGINE_STATE_DIR", str(state))
    locks = argsmod.default_locks_dir()
    assert locks == str(state / "managedvolume-engine" / "locks")
    monkeypatch.delenv("ENGINE_TMP")
    assert argsmod.default_locks_dir() == locks
    vol = "9f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10"
    with volumelock.held(locks, [vol], "test", timeout=1):
        assert os.path.exists(volumelock.path(locks, vol))
    assert _mode(state / "managedvolume-engine") == 0o700


@pytest.mark.root
def test_root_makes_no_lock_file_in_another_users_locks_directory(
        tmp_path):
    """Lock files are 0600: one root made in the engine's (ovirt's)
    locks directory, by an admin's command run as root, locked the
    engine's commands out of that volume."""
    from vdsm_managedvolume import errors
    from vdsm_managedvolume.engine import volumelock
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    theirs = tmp_path / "ovirt-engine"
    theirs.mkdir(mode=0o750)
    os.chown(theirs, 4242, 4242)
    vol = "9f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10"
    # Not made yet: root would make it, root's, in their directory.
    missing = theirs / "managedvolume-engine" / "locks"
    with pytest.raises(errors.EngineError, match=(
            "The locks directory {} would be made in {}, which belongs to "
            "4242 \\(uid 4242\\), not to uid 0: run this command as "
            "4242".format(missing, theirs))):
        with volumelock.held(str(missing), [vol], "test", timeout=1):
            pass
    assert os.listdir(theirs) == []
    # Made by them: root makes no file in it.
    locks = theirs / "locks"
    locks.mkdir(mode=0o700)
    os.chown(locks, 4242, 4242)
    with pytest.raises(errors.EngineError, match="belongs to 4242"):
        with volumelock.held(str(locks), [vol], "test", timeout=1):
            pass
    assert os.listdir(locks) == []


def test_the_parent_forks_only_once_its_setup_thread_has_ended(
        monkeypatch, tmp_path):
    # The setup thread says "done" and then lingers (here on a gate; in
    # life in libpq's thread-exit destructors, under OpenSSL's or
    # Kerberos' locks): a child forked then inherits those locks held and
    # hangs in its first connect.  The parent must see the thread end, or
    # take the setup for hung (stop; commands run cold).
    from vdsm_managedvolume.engine import runner
    from vdsm_managedvolume.engine import warm

    gate = threading.Event()
    lingering = threading.Event()

    def setup(db_url, locks_dir):
        runner._state["db_url"] = db_url
        return None

    def release():
        # Trace the return of the thread's work (after its "done").
        def tracer(frame, event, arg):
            if event == "return" and frame.f_code.co_name == "work":
                lingering.set()
                gate.wait(60)
            return tracer
        sys._getframe(1).f_trace = tracer
        sys.settrace(tracer)

    monkeypatch.setattr(runner, "setup_cinderlib", setup)
    monkeypatch.setattr(runner, "configure_logging", lambda *a, **k: None)
    monkeypatch.setattr(runner, "_state", {"db_url": None,
                                           "locks_dir": None})
    monkeypatch.setattr(warm, "_warm_up_queries", lambda cl: None)
    monkeypatch.setattr(warm, "_release_parent_resources", release)
    server = warm.Server(str(tmp_path / "s.sock"))
    request = argsmod.Request("storage_stats", {}, "sqlite://", "cid",
                              {"refresh": False}, timeout=1)
    try:
        prepared = server._prepare(request)
        assert lingering.wait(60)
        assert prepared is False
        assert server.stopping
    finally:
        gate.set()


def test_a_command_that_does_not_end_shows_the_stacks_of_the_service(
        engine_service, engine_shim, tmp_path):
    # The test harness's side of a hang: the warm service and its children
    # log every thread's stack on SIGUSR1 (faulthandler), and Shim.run's
    # failure quotes them.  PausingDriver outlasts the 1 s given here.
    pausing = {"volume_driver": "tests.engine_client_test.PausingDriver",
               "volume_backend_name": "slow",
               "file_volume_dir": str(tmp_path / "vols")}
    with pytest.raises(AssertionError) as e:
        engine_shim.run("create_volume", new_id(), 1, driver=pausing,
                        db_url="sqlite:///{}".format(tmp_path / "db.sqlite"),
                        timeout=1)
    text = str(e.value)
    assert "did not end within 1 s" in text
    assert "(most recent call first)" in text
    assert "vdsm_managedvolume/engine/warm.py" in text


def wait_for(what, check, timeout=30):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_service_log_and_its_stack_dumps_follow_a_moved_log_file(
        own_service, engine_backend):
    # logrotate without copytruncate: the file is renamed (then
    # compressed and deleted); the service went on writing to it.
    log_file = own_service.log_file
    moved = log_file + ".1"
    os.rename(log_file, moved)
    wait_for("a new log file", lambda: os.path.exists(log_file))
    os.kill(own_service.pid, signal.SIGUSR1)
    wait_for("the parent's stacks in the new log file",
             lambda: "most recent call first" in own_service.log())
    be = engine_backend
    r = own_service.shim.run("storage_stats", "false", cid="moved",
                             driver=be["driver"], db_url=be["db_url"])
    assert r.code == 0, r.describe()
    assert "was moved: writing to the new one" in own_service.log()
    with open(moved) as f:
        assert "most recent call first" not in f.read()


def open_on(pid, path):
    """Whether process ``pid`` has a descriptor open on ``path``."""
    fds = "/proc/{}/fd".format(pid)
    for name in os.listdir(fds):
        try:
            if os.readlink(os.path.join(fds, name)) == path:
                return True
        except OSError:
            pass
    return False


def test_a_spare_forked_before_the_log_file_moved_writes_to_the_new_one(
        own_service, tmp_path):
    # Its stack dump descriptor is a copy of the parent's at fork: the
    # spare follows the move itself before it runs a request.
    shim = own_service.shim
    pausing = {"volume_driver": "tests.engine_client_test.PausingDriver",
               "volume_backend_name": "slow",
               "file_volume_dir": str(tmp_path / "vols")}
    db_url = "sqlite:///{}".format(tmp_path / "db.sqlite")
    r = shim.run("storage_stats", "false", driver=pausing, db_url=db_url)
    assert r.code == 0, r.describe()
    time.sleep(2)       # a spare for db_url forks and warms up (~20 ms)
    log_file = own_service.log_file
    moved = log_file + ".1"
    os.rename(log_file, moved)
    wait_for("the service on the new log file",
             lambda: os.path.exists(log_file) and
             "was moved" in own_service.log())
    proc = shim.popen("create_volume", new_id(), 1, cid="after-move",
                      driver=pausing, db_url=db_url)
    try:
        found = []
        wait_for("the spare running the request", lambda: found.extend(
            re.findall(r"\[flow=after-move\] Child (\d+) runs "
                       r"create_volume \((.*?)\)", own_service.log()))
            or found)
        pid, how = int(found[0][0]), found[0][1]
        assert how == "pre-forked"
        # PausingDriver holds the request for 2 s.
        wait_for("no descriptor of the spare on the moved file",
                 lambda: not open_on(pid, moved) or
                 process_state(pid) in (None, "Z"), timeout=10)
        assert process_state(pid) not in (None, "Z")
        assert open_on(pid, log_file)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_the_parent_waits_for_the_threads_kernel_task_not_only_join():
    # join() returns once Python is done with a thread; its kernel task
    # then still runs the C libraries' thread-exit destructors (OpenSSL's
    # under a process-wide lock).  The parent forks only once the task
    # has left /proc/self/task.  Here a thread Python calls ended whose
    # task still runs: a real thread held on a gate.
    from vdsm_managedvolume.engine import warm

    gate = threading.Event()
    running = threading.Event()

    def hold():
        running.set()
        gate.wait(60)

    real = threading.Thread(target=hold, daemon=True)
    real.start()
    running.wait(60)

    class Joined:
        native_id = real.native_id

        def join(self, timeout=None):
            pass

        def is_alive(self):
            return False

    try:
        assert not warm._wait_ended(Joined(), time.monotonic() + 0.3)
    finally:
        gate.set()
    real.join(60)
    assert warm._wait_ended(Joined(), time.monotonic() + 60)


@pytest.mark.parametrize("dump_to", ["unopenable-log", "no-stderr"])
def test_sigusr1_never_kills_the_service_whatever_its_log(tmp_path, dump_to):
    # The service's stack dumps go to its log file; one it cannot open
    # sends them to stderr, and without stderr the signal is ignored: the
    # signal's default action would kill the service and, through
    # PR_SET_PDEATHSIG, every request running.
    log_file = str(tmp_path / "missing-dir" / "service.log")
    code = (
        "import os, signal, sys\n"
        "from vdsm_managedvolume.engine import warm\n"
        "if sys.argv[2] == 'no-stderr':\n"
        "    os.close(2)\n"
        "warm._dump_stacks_on_signal(sys.argv[1])\n"
        "os.kill(os.getpid(), warm.DUMP_SIGNAL)\n"
        "print('alive', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code, log_file, dump_to],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          cwd=ROOT, timeout=120)
    assert (proc.returncode, proc.stdout) == (0, b"alive\n"), proc
    if dump_to == "unopenable-log":
        assert b"most recent call first" in proc.stderr, proc.stderr


def test_a_second_setup_disposes_the_engines_the_first_one_froze(tmp_path):
    # The first setup's _release_parent_resources froze the heap (an
    # engine holding a pooled connection among it); the next one must
    # still find that engine.  In a process of its own: the walk disposes
    # every engine of the process.
    code = (
        "import gc, sys, sqlalchemy\n"
        "from sqlalchemy.pool import QueuePool\n"
        "from vdsm_managedvolume.engine import warm\n"
        "engine = sqlalchemy.create_engine('sqlite:///' + sys.argv[1],\n"
        "                                  poolclass=QueuePool)\n"
        "engine.connect().close()\n"
        "assert engine.pool.checkedin() == 1\n"
        "gc.freeze()\n"
        "warm._dispose_other_engines()\n"
        "print(engine.pool.checkedin(), flush=True)\n")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "db.sqlite")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        timeout=120)
    assert (proc.returncode, proc.stdout) == (0, b"0\n"), proc
