"""Verify one audit database in a process of its own and report time and peak memory.

    python -m bench.verify_child AUDIT_URL [--batch N] [--count]

Prints one JSON object on stdout. ``maxrss_kb`` is ``getrusage(RUSAGE_SELF).ru_maxrss``
at the end (the peak of the whole process, verify included; KiB on Linux) and
``maxrss_baseline_kb`` the same before verifying (imports and connection only).

On Linux a child inherits its parent's peak RSS: the kernel carries the high-water mark
of the memory it had at fork over ``execve``, so a verify started from the (large)
benchmark process would report the benchmark's memory, not its own. This module
therefore first re-launches itself from a small stdlib-only process and does the work in
that grandchild, whose ``ru_maxrss`` starts from a few MB. ``vmhwm_kb`` (``VmHWM`` from
``/proc/self/status``, which belongs to the new address space only) is reported as a
cross-check.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_INNER = "ECHO_BENCH_VERIFY_CHILD_INNER"


def _maxrss_kb() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _vmhwm_kb() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _verify(url: str, batch: int | None, count: bool) -> dict[str, Any]:
    from sqlalchemy import text

    from echo_auth.audit.verify import count_events, verify_chain
    from echo_auth.config import Settings
    from echo_auth.db.engines import transaction
    from echo_auth.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="echo-bench-verify-") as tmp:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            env="test",
            data_dir=Path(tmp),
            identity_db_url=url,
            audit_db_url=url,
        )
        runtime = Runtime(settings, pool_size=1)
        try:
            with transaction(runtime.audit_reader, write=False) as conn:
                conn.execute(text("SELECT 1"))
                rows = count_events(conn) if count else None
            baseline, baseline_hwm = _maxrss_kb(), _vmhwm_kb()
            kwargs = {} if batch is None else {"batch": batch}
            with transaction(runtime.audit_reader, write=False) as conn:
                started = time.perf_counter()
                report = verify_chain(conn, **kwargs)
                seconds = time.perf_counter() - started
            peak, peak_hwm = _maxrss_kb(), _vmhwm_kb()
        finally:
            runtime.close()
    return {
        "intact": report.intact,
        "events_checked": report.events_checked,
        "head_seq": report.head_seq,
        "rows_counted": rows,
        "problems_total": report.problems_total,
        "summary": report.summary(),
        "seconds": seconds,
        "events_per_s": report.events_checked / seconds if seconds > 0 else 0.0,
        "maxrss_baseline_kb": baseline,
        "maxrss_kb": peak,
        "vmhwm_baseline_kb": baseline_hwm,
        "vmhwm_kb": peak_hwm,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.verify_child")
    parser.add_argument("url", help="the audit database URL")
    parser.add_argument("--batch", type=int, default=None, help="verify_chain's batch size")
    parser.add_argument("--count", action="store_true", help="also count the rows (untimed)")
    args = parser.parse_args(argv)
    if os.environ.get(_INNER) != "1":
        # The launcher: small, so the grandchild's ru_maxrss starts near zero.
        env = {**os.environ, _INNER: "1"}
        return subprocess.run(
            [sys.executable, "-m", "bench.verify_child", *argv], env=env
        ).returncode
    json.dump(_verify(args.url, args.batch, args.count), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
