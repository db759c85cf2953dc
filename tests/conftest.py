"""One XLA compilation cache for the whole test session, shared by the xdist workers and
the subprocesses tests start: many tests compile the same small programs, and compiling
is most of a test's time on the CPU. The cache starts empty with every session."""

import os
import tempfile

import jax

SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
XLA_CACHE = os.path.join(tempfile.gettempdir(), f"metaopt-test-xla-{SESSION}")
os.environ["METAOPT_XLA_CACHE"] = XLA_CACHE   # subprocesses and the CLI read it
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
