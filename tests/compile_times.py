"""How much of each test is JAX compilation: a pytest plugin.

JAX reports the seconds it spends tracing, lowering and compiling each
program (`jax.monitoring` events under /jax/core/compile/); this plugin sums
them per test, in the process that runs the test (subprocesses a test starts
are not seen). `pytest --compile_times=FILE` writes one JSON line per test,
`{"test", "seconds", "compile_seconds"}`; every run ends with the 15 slowest
tests, each with its wall and compile seconds, and the suite's totals, so a
test that grows the suite shows (docs/performance.md § The test suite's time).
"""

import collections
import json

import pytest

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_spent = collections.Counter()


def _listen(event: str, seconds: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    _spent["compile"] += seconds


def pytest_addoption(parser):
  parser.addoption("--compile_times", metavar="FILE", default="",
                   help="write each test's wall and compile seconds to FILE (JSON lines)")


def pytest_configure(config):
  import jax.monitoring
  jax.monitoring.register_event_duration_secs_listener(_listen)
  config._compile_times = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  _spent.clear()
  yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  if call.when == "teardown":
    outcome.get_result().user_properties.append(("compile_seconds", _spent["compile"]))


SHOWN = 15
_reports = []
_durations = collections.defaultdict(float)


def pytest_runtest_logreport(report):
  # Runs in the controller too: xdist forwards each report with its properties.
  _durations[report.nodeid] += report.duration
  if report.when == "teardown" and "compile_seconds" in dict(report.user_properties):
    _reports.append(report)


def pytest_terminal_summary(terminalreporter, config):
  rows = [(report.nodeid, _durations[report.nodeid], dict(report.user_properties)["compile_seconds"])
          for report in _reports]
  if not rows:
    return
  path = config.getoption("compile_times")
  if path:
    with open(path, "w") as f:
      for test, seconds, compiling in rows:
        f.write(json.dumps({"test": test, "seconds": round(seconds, 2),
                            "compile_seconds": round(compiling, 2)}) + "\n")
  total = sum(r[1] for r in rows)
  compiling = sum(r[2] for r in rows)
  terminalreporter.write_sep("=", f"the {SHOWN} slowest tests: wall and compile seconds "
                                  "(in the test's own process)")
  for test, seconds, spent in sorted(rows, key=lambda r: -r[1])[:SHOWN]:
    terminalreporter.write_line(f"{seconds:7.1f} s wall {spent:7.1f} s compiling  {test}")
  terminalreporter.write_line(f"{len(rows)} tests: {total:.0f} s of test time, {compiling:.0f} s "
                              "of it compiling (the budget: docs/performance.md § The test "
                              "suite's time)")
