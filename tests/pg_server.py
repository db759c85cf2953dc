"""A throwaway PostgreSQL server from the installed binaries, as pytest-postgresql starts
one: ``initdb`` into a temporary folder, ``pg_ctl start`` on a free localhost port,
``pg_ctl stop`` and the folder removed at the end. Used by tests/conftest.py and by
benchmarks/bench_sweep_claims.py.

PostgreSQL refuses to run as root; as root (CI) the server runs as user ``nobody``.
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import tempfile
from typing import Optional

INSTALL = ("`.ci/run` installs it with `apt-get install -y --no-install-recommends "
           "postgresql` (Debian puts the binaries in /usr/lib/postgresql/<version>/bin)")
USER = "metaopt"  # the server's superuser; trust authentication on localhost


def binaries() -> Optional[pathlib.Path]:
  """The folder holding initdb and pg_ctl: Debian's newest version, else PATH."""
  for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                       key=lambda f: [int(x) if x.isdigit() else x
                                      for x in pathlib.Path(f).parent.name.split(".")],
                       reverse=True):
    if os.access(os.path.join(folder, "initdb"), os.X_OK) and \
        os.access(os.path.join(folder, "pg_ctl"), os.X_OK):
      return pathlib.Path(folder)
  initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
  if initdb and pg_ctl and os.path.dirname(initdb) == os.path.dirname(pg_ctl):
    return pathlib.Path(initdb).parent
  return None


def missing() -> Optional[str]:
  """Why a throwaway server cannot be started here, or None."""
  if importlib.util.find_spec("psycopg") is None:
    return ("psycopg is not installed (the `postgres` extra; `make test` installs it with "
            "the `dev` extra: pip install -e '.[dev]')")
  if binaries() is None:
    return f"no PostgreSQL server binaries (initdb, pg_ctl) were found; {INSTALL}"
  if os.geteuid() == 0:
    try:
      pwd.getpwnam("nobody")
    except KeyError:
      return "running as root and there is no user 'nobody' to run PostgreSQL as"
  return None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """A running throwaway server; ``new_database()`` gives the URL of a fresh database."""

  def __init__(self, root: Optional[str] = None):
    self.bin = binaries()
    if self.bin is None:
      raise RuntimeError(missing() or "no PostgreSQL binaries")
    # Not under pytest's tmp_path: its parents are 0700 and the server may run as nobody.
    self.dir = pathlib.Path(tempfile.mkdtemp(prefix="metaopt-pg-", dir=root))
    self._as = {}
    if os.geteuid() == 0:  # initdb and postgres refuse root
      nobody = pwd.getpwnam("nobody")
      os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
      self._as = dict(user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
    os.chmod(self.dir, 0o700)
    self.data = self.dir / "data"
    self._names = itertools.count()
    self._admin = None
    try:
      self._run("initdb", "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8",
                "--locale=C", "--no-sync")
      for attempt in range(3):  # the free port may be taken before the server binds it
        self.port = _free_port()
        # Throwaway data: no fsync. No unix socket: TCP on localhost only.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=200")
        done = self._run("pg_ctl", "start", "-w", "-t", "60", "-D", self.data, "-l",
                         self.dir / "server.log", "-o", options, check=attempt == 2)
        if done.returncode == 0:
          break
    except BaseException:
      self.stop()
      raise
    self.url = f"postgresql://{USER}@127.0.0.1:{self.port}"

  def _run(self, program: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(self.bin / program), *map(str, args)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, **self._as)
    if check and done.returncode != 0:
      log = self.dir / "server.log"
      tail = log.read_text()[-2000:] if log.exists() else ""
      raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip()} {tail}")
    return done

  def new_database(self, prefix: str = "store") -> str:
    """The URL of a new, empty database."""
    import psycopg  # the callers skip without it (missing())
    if self._admin is None:
      self._admin = psycopg.connect(f"{self.url}/postgres", autocommit=True)
    name = f"{prefix}_{os.getpid()}_{next(self._names)}"
    self._admin.execute(f'CREATE DATABASE "{name}"')
    return f"{self.url}/{name}"

  def stop(self) -> None:
    """Stop the server (immediately: the data is thrown away) and remove its folder."""
    if self._admin is not None:
      self._admin.close()
      self._admin = None
    if (self.data / "postmaster.pid").exists():
      self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", self.data, check=False)
    shutil.rmtree(self.dir, ignore_errors=True)
