"""One XLA compilation cache for the whole test session, shared by the xdist workers and
the subprocesses tests start: many tests compile the same small programs, and compiling
is most of a test's time on the CPU. The cache starts empty with every session.

Run-store fixtures: store tests run against SQLite and a throwaway PostgreSQL server."""

import itertools
import os
import tempfile

# Tests are compile-bound on the CPU: LLVM's optimization level 0 compiles faster and the
# small programs run about as fast. Set before jax starts its backend; subprocesses inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                   "--xla_backend_optimization_level=0"]))

import jax  # noqa: E402
import pytest  # noqa: E402

import pg_server  # tests/pg_server.py: a throwaway PostgreSQL server

SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
XLA_CACHE = os.path.join(tempfile.gettempdir(), f"metaopt-test-xla-{SESSION}")
os.environ["METAOPT_XLA_CACHE"] = XLA_CACHE   # subprocesses and the CLI read it
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# ----------------------------------------------------------------------------- run stores
# Store tests run against both databases: `store_url` is a fresh store's path (SQLite) or
# the URL of a fresh database on a throwaway PostgreSQL server (one per test session and
# xdist worker, started only when a test asks for it).

@pytest.fixture(scope="session")
def postgres_server():
  """A throwaway PostgreSQL server; the test is skipped, saying why, where none can start."""
  reason = pg_server.missing()
  if reason is not None:
    pytest.skip(f"PostgreSQL tests skipped: {reason}")
  server = pg_server.Server()
  yield server
  server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request):
  return request.param


@pytest.fixture
def new_store_url(request, store_backend, tmp_path):
  """A factory of fresh, empty stores on the test's backend: new_store_url() -> path or URL."""
  if store_backend == "postgresql":
    return request.getfixturevalue("postgres_server").new_database
  count = itertools.count()
  return lambda: str(tmp_path / f"store{next(count)}.db")


@pytest.fixture
def store_url(new_store_url):
  """A fresh, empty store on the test's backend: an SQLite path or a postgresql:// URL."""
  return new_store_url()

