"""How much of each test is JAX compilation: a pytest plugin.

JAX reports the seconds it spends tracing, lowering and compiling each
program (`jax.monitoring` events under /jax/core/compile/); this plugin sums
them per test, in the process that runs the test (subprocesses a test starts
are not seen). CPU seconds count the test's process and the subprocesses it
waited for: on a machine whose cores the suite keeps busy, they are what a
test costs the run. `pytest --compile_times=FILE` writes one JSON line per test,
`{"test", "seconds", "compile_seconds", "cpu_seconds"}`; every run ends with
the 15 slowest tests, each with its wall, compile and CPU seconds, and the
suite's totals, so a test that grows the suite shows (docs/performance.md § The test suite's time).
"""

import collections
import json
import resource

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
  _spent["cpu"] = -_cpu_seconds()
  yield


def _cpu_seconds() -> float:
  """CPU seconds of this process and of the subprocesses it has waited for."""
  return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                               resource.getrusage(resource.RUSAGE_CHILDREN)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  if call.when == "teardown":
    outcome.get_result().user_properties += [("compile_seconds", _spent["compile"]),
                                             ("cpu_seconds", _spent["cpu"] + _cpu_seconds())]


SHOWN = 15
_reports = []
_durations = collections.defaultdict(float)


def pytest_runtest_logreport(report):
  # Runs in the controller too: xdist forwards each report with its properties.
  _durations[report.nodeid] += report.duration
  if report.when == "teardown" and "compile_seconds" in dict(report.user_properties):
    _reports.append(report)


def pytest_terminal_summary(terminalreporter, config):
  rows = [(report.nodeid, _durations[report.nodeid], dict(report.user_properties))
          for report in _reports]
  if not rows:
    return
  path = config.getoption("compile_times")
  if path:
    with open(path, "w") as f:
      for test, seconds, spent in rows:
        f.write(json.dumps({"test": test, "seconds": round(seconds, 2),
                            "compile_seconds": round(spent["compile_seconds"], 2),
                            "cpu_seconds": round(spent["cpu_seconds"], 2)}) + "\n")
  total = sum(r[1] for r in rows)
  compiling = sum(r[2]["compile_seconds"] for r in rows)
  cpu = sum(r[2]["cpu_seconds"] for r in rows)
  terminalreporter.write_sep("=", f"the {SHOWN} slowest tests: wall, compile and CPU seconds "
                                  "(compile: in the test's own process; CPU: with its subprocesses)")
  for test, seconds, spent in sorted(rows, key=lambda r: -r[1])[:SHOWN]:
    terminalreporter.write_line(f"{seconds:7.1f} s wall {spent['compile_seconds']:7.1f} s compiling "
                                f"{spent['cpu_seconds']:7.1f} s CPU  {test}")
  terminalreporter.write_line(f"{len(rows)} tests: {total:.0f} s of test time, {compiling:.0f} s "
                              f"of it compiling, {cpu:.0f} CPU seconds (the budget: "
                              "docs/performance.md § The test suite's time)")
