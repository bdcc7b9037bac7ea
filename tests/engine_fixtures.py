"""Fixtures for the engine shim tests (see conftest.py).

The shim is tested the way ovirt-engine uses it: as a command, in real
processes, against a real database (SQLite in tmp_path, and a private
PostgreSQL cluster started by ``scripts/pgcluster.sh``), with the embedded
FileDriver writing real sparse files.  Nothing of cinder is imported into
the pytest process (its import has process-wide side effects).

Processes are the expensive part (a cold run imports cinderlib: ~1 s on an
idle machine, several under load), so:

- ``engine_service`` (session) is ONE warm service shared by every test;
  each test uses its own database, volume directory and ids;
- cold runs are kept to the tests that are about cold runs.
"""

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import quote

import pytest

from vdsm_managedvolume.engine import warm as warm_service

from . import leftovers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.path.dirname(sys.executable),
                   "managedvolume-cinderlib-client")
PGCLUSTER = os.path.join(ROOT, "scripts", "pgcluster.sh")


def client_argv():
    if os.path.exists(BIN):
        return [BIN]
    return [sys.executable, "-m", "vdsm_managedvolume.engine.client"]


class Result:
    """A finished command: stdout bytes, stderr text, exit code."""

    def __init__(self, argv, proc):
        self.argv = argv
        self.stdout = proc.stdout
        self.stderr = proc.stderr.decode("utf-8", "replace")
        self.code = proc.returncode

    def payload(self, cid):
        """The text after ``<cid>:`` on the first matching line."""
        line = self.stdout.decode("utf-8")
        assert line.startswith(cid + ":"), self.describe()
        assert line.endswith("\n") and line.count("\n") == 1, self.describe()
        return line[len(cid) + 1:-1]

    def json(self, cid):
        return json.loads(self.payload(cid))

    def error(self):
        line = self.stdout.decode("utf-8")
        assert line.startswith("error:"), self.describe()
        assert line.endswith("\n") and line.count("\n") == 1, self.describe()
        return line[len("error:"):-1]

    def describe(self):
        return "exit {}\nstdout: {!r}\nstderr:\n{}".format(
            self.code, self.stdout, self.stderr[-3000:])


class Shim:
    """Runs managedvolume-cinderlib-client the way the engine does."""

    def __init__(self, run_dir, socket_path):
        self.run_dir = run_dir
        self.socket_path = socket_path
        self.env = dict(os.environ)
        self.env["MANAGEDVOLUME_ENGINE_LOCKS_DIR"] = os.path.join(run_dir,
                                                                  "locks")
        # tests.* test drivers must be importable by the shim's processes.
        self.env["PYTHONPATH"] = ROOT + os.pathsep + self.env.get(
            "PYTHONPATH", "")
        for name in ("MANAGEDVOLUME_ENGINE_SOCKET", "MANAGEDVOLUME_DB_URL",
                     "MANAGEDVOLUME_DRIVER_JSON", "MANAGEDVOLUME_ENGINE_COLD",
                     "MANAGEDVOLUME_ENGINE_TIMEOUT",
                     "MANAGEDVOLUME_DB_PASSWORD", "PGPASSWORD",
                     "ENGINE_TMP", "ENGINE_LOG"):
            self.env.pop(name, None)
        # The tests read the log on stderr (asked for: the default is the
        # engine's log directory, see engine_logging_test.py).
        self.env["MANAGEDVOLUME_ENGINE_LOG_FILE"] = "-"

    def command(self, command, *args, driver, db_url, cid="cid-test",
                warm=True, options=(), env=None):
        """(argv, environment) of one run of the client."""
        argv = client_argv() + list(options)
        argv += ["--socket", self.socket_path] if warm else ["--cold"]
        if isinstance(driver, dict):
            driver = json.dumps(driver)
        argv += [command, driver, db_url, cid] + [str(a) for a in args]
        full_env = dict(self.env)
        full_env.update(env or {})
        return argv, full_env

    def run(self, command, *args, driver, db_url, cid="cid-test",
            warm=True, options=(), env=None, stdin=None, timeout=120):
        argv, full_env = self.command(
            command, *args, driver=driver, db_url=db_url, cid=cid,
            warm=warm, options=options, env=env)
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=full_env,
                                cwd=ROOT)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(self._hung(proc, argv, timeout, warm))
        return Result(argv, subprocess.CompletedProcess(
            argv, proc.returncode, out, err))

    def _hung(self, proc, argv, timeout, warm):
        """What a command that did not end in ``timeout`` seconds was
        doing: the stacks of every thread of the command (cold) or of the
        warm service and its children, which log them on SIGUSR1."""
        pids = [proc.pid] if not warm else [
            pid for pid, cmdline in process_cmdlines(_all_pids()).items()
            if "--serve" in cmdline and self.socket_path in cmdline]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        time.sleep(2)
        proc.kill()
        out, err = proc.communicate()
        text = err.decode("utf-8", "replace")
        if warm:
            log_files = {c.split(" --log-file ", 1)[1].split(" ", 1)[0]
                         for c in process_cmdlines(pids).values()
                         if " --log-file " in c}
            for name in log_files - {"-"}:     # "-": stderr
                with open(name, errors="replace") as f:
                    text += "\n--- {} (end)\n{}".format(name,
                                                        f.read()[-20000:])
        return "{} did not end within {} s; stacks (SIGUSR1) of {}:\n" \
               "{}".format(argv[len(client_argv()):][:4], timeout,
                           pids, text)

    def popen(self, command, *args, driver, db_url, cid="cid-test",
              warm=True, options=(), env=None):
        argv, full_env = self.command(
            command, *args, driver=driver, db_url=db_url, cid=cid,
            warm=warm, options=options, env=env)
        return subprocess.Popen(argv, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=full_env,
                                cwd=ROOT)


# Runs first in a service the tests start: SIGTERM when the process that
# started it dies (prctl PR_SET_PDEATHSIG, kept across exec), then the
# service itself, same pid.  A killed test run leaves no service behind
# (the service's own children die with it).  Not preexec_fn: the test
# process may have threads.
DIE_WITH_STARTER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def dying_with_us(argv):
    """``argv`` run so that it gets SIGTERM when this thread's process
    dies (PR_SET_PDEATHSIG is about the thread that started it: start it
    from a thread that lives as long as it should)."""
    return [sys.executable, "-c", DIE_WITH_STARTER, str(os.getpid())] + argv


class Drain:
    """Reads a pipe to its end in a thread of its own and keeps what
    came.  A process whose stderr is a pipe nobody reads blocks once it
    has written what the pipe holds (64 KiB): the warm service in the
    middle of a request, or of a stack dump in its signal handler."""

    def __init__(self, pipe):
        self._pipe = pipe
        self._chunks = []
        self._thread = threading.Thread(target=self._read, daemon=True,
                                        name="drain-{}".format(
                                            pipe.fileno()))
        self._thread.start()

    def text(self, wait=0):
        """What was read so far, after waiting up to ``wait`` seconds
        for the end (every writer gone)."""
        if wait:
            self._thread.join(wait)
        return b"".join(list(self._chunks)).decode("utf-8", "replace")

    def _read(self):
        # The pipe is closed here, at its end, never under a read.
        with self._pipe:
            fd = self._pipe.fileno()
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                self._chunks.append(chunk)


class Service:
    """A running warm service (``--serve``); ``log_file`` "-": it logs
    to its stderr (``stderr()``)."""

    def __init__(self, shim, log_file):
        self.shim = shim
        self.socket_path = shim.socket_path
        self.log_file = log_file
        self.proc = subprocess.Popen(
            dying_with_us(client_argv() + [
                "--serve", "--socket", self.socket_path,
                "--log-file", log_file]),
            env=shim.env, cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        self._stderr = Drain(self.proc.stderr)
        deadline = time.monotonic() + 90
        while not warm_service._connectable(self.socket_path):
            if self.proc.poll() is not None:
                raise RuntimeError("warm service died: {}".format(
                    self._stderr.text(wait=10)))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("warm service did not start")
            time.sleep(0.05)

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        with open(self.log_file) as f:
            return f.read()

    def stderr(self, wait=0):
        """What the service wrote to its stderr so far (see
        ``Drain.text``)."""
        return self._stderr.text(wait)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Its children, which share that stderr, end with it.
        self._stderr.text(wait=15)


class PgCluster:
    """The private PostgreSQL cluster: URLs with and without password."""

    def __init__(self, env_lines, password):
        info = dict(line.split("=", 1) for line in env_lines.splitlines()
                    if "=" in line)
        self.dir = info["PGCLUSTER_DIR"]
        self.port = int(info["PGCLUSTER_PORT"])
        self.user = info["PGCLUSTER_USER"]
        self.db = info["PGCLUSTER_DB"]
        self.password = password

    def url(self, password=True, db=None):
        creds = self.user
        if password:
            creds += ":" + quote(self.password, safe="")
        return "postgresql+psycopg2://{}@127.0.0.1:{}/{}".format(
            creds, self.port, db or self.db)

    def psql(self, sql, db=None):
        """Run ``sql`` as the cluster's user (password through env)."""
        bindir = subprocess.run(["bash", PGCLUSTER, "bindir"],
                                capture_output=True, text=True,
                                check=True).stdout.strip()
        env = dict(os.environ, PGPASSWORD=self.password)
        return subprocess.run(
            [os.path.join(bindir, "psql"), "-h", "127.0.0.1", "-p",
             str(self.port), "-U", self.user, "-d", db or self.db, "-At", "-c",
             sql], env=env, capture_output=True, text=True,
            check=True).stdout

    def new_database(self):
        """A fresh database of our user, so that tests do not share data."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql("CREATE DATABASE {}".format(name))
        return name


@pytest.fixture(scope="session")
def engine_run_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("engine-run"))


@pytest.fixture(scope="session")
def engine_shim(engine_run_dir):
    return Shim(engine_run_dir, os.path.join(engine_run_dir, "s",
                                             "cinderlib.sock"))


@pytest.fixture(scope="session")
def engine_service(engine_shim, engine_run_dir):
    service = Service(engine_shim, os.path.join(engine_run_dir,
                                                "service.log"))
    yield service
    service.stop()


@pytest.fixture
def engine_backend(tmp_path):
    """A FileDriver backend of its own and a SQLite DB of its own."""
    vols = tmp_path / "vols"
    return {
        "driver": {
            "volume_driver":
                "vdsm_managedvolume.engine.filedriver.FileDriver",
            "volume_backend_name": "file",
            "file_volume_dir": str(vols),
        },
        "db_url": "sqlite:///{}".format(tmp_path / "cinderlib.db"),
        "dir": str(vols),
    }


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory):
    if subprocess.run(["bash", PGCLUSTER, "bindir"],
                      capture_output=True).returncode != 0:
        pytest.skip("postgresql binaries not installed "
                    "(scripts/install-sysdeps.sh installs them)")
    # Characters that need quoting in a URL and in SQL, to prove both.
    password = "pw'{}@:/% x".format(secrets.token_hex(6))
    # Those of runs killed together with their watchdog.
    for stale in leftovers.stale_pg_clusters():
        subprocess.run(["bash", PGCLUSTER, "stop", stale], timeout=60)
    # The cluster lives in /tmp/pgcluster.*: user postgres cannot enter
    # pytest's 0700 temp dirs.  It lasts while we hold run's stdin: a
    # session killed with SIGKILL does not leave it running (pgcluster.sh,
    # "run").
    env = dict(os.environ, PGCLUSTER_PASSWORD=password)
    env.pop("TMPDIR", None)
    proc = subprocess.Popen(["bash", PGCLUSTER, "run"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, ready = _read_until(proc.stdout, "PGCLUSTER_READY", 120)
        if not ready:
            proc.stdin.close()
            pytest.fail("pgcluster.sh run failed:\n" + out
                        + proc.stderr.read())
        proc.stderr.close()
        cluster = PgCluster(out, password)
        yield cluster
    finally:
        proc.stdin.close()      # run stops the cluster
        proc.wait(60)


def _read_until(stream, last, timeout):
    """The lines of ``stream`` before ``last``, and whether ``last``
    came (False: end of stream or ``timeout`` seconds)."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [],
                                    deadline - time.monotonic())
        if not ready:
            break
        line = stream.readline()
        if not line:
            break
        if line.strip() == last:
            return "".join(lines), True
        lines.append(line)
    return "".join(lines), False


def new_id():
    return str(uuid.uuid4())


def files_in(directory):
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []


def loop_devices_under(directory):
    """Loop devices whose backing file is under ``directory``."""
    prefix = os.path.realpath(directory) + os.sep
    found = []
    for name in os.listdir("/sys/block"):
        backing = os.path.join("/sys/block", name, "loop", "backing_file")
        try:
            with open(backing) as f:
                if f.read().strip().startswith(prefix):
                    found.append("/dev/" + name)
        except OSError:
            pass
    return found


def process_cmdlines(pids):
    """The command lines (NUL separated) of ``pids`` and their children."""
    seen = {}
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        try:
            with open("/proc/{}/cmdline".format(pid), "rb") as f:
                seen[pid] = f.read().replace(b"\0", b" ").decode(
                    "utf-8", "replace")
        except OSError:
            continue
        try:
            with open("/proc/{0}/task/{0}/children".format(pid)) as f:
                todo.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return seen


def _all_pids():
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def children_of(pid):
    """The pids of ``pid``'s live (not zombie) children."""
    try:
        with open("/proc/{0}/task/{0}/children".format(pid)) as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return [p for p in pids if process_state(p) not in (None, "Z")]


# The start time of a process (clock ticks after boot), None when gone.
start_time = leftovers.start_ticks


def wait_until_ended(pid, started):
    """Wait (bounded) until process ``pid`` started at ``started`` has
    ended (a reused pid is another process)."""
    deadline = time.monotonic() + 30
    while start_time(pid) == started:
        assert time.monotonic() < deadline, \
            "process {} still runs".format(pid)
        time.sleep(0.05)


def process_state(pid):
    """The state letter of ``pid`` (R, S, Z...), None when it is gone."""
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return None
