#!/usr/bin/env python3
"""Audit log throughput: durable records per second, and records per fdatasync (group commit).

    .venv/bin/python scripts/bench_audit.py [--records 4000] [--dir /var/tmp]

Each caller waits for its own record to be on disk (record() returns after fdatasync), so a
single thread pays one flush per record; with many concurrent callers the writer thread
commits whatever queued up during the previous flush in one write and one fdatasync.
"""
import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.audit.log import AuditLog  # noqa: E402
from sandbox.audit.verify import verify  # noqa: E402


def run(base: Path, threads: int, total: int) -> None:
    d = Path(tempfile.mkdtemp(prefix="bench-audit-", dir=base))
    log = AuditLog(d, mirror=None)
    per = total // threads
    f0 = log.fsyncs

    def work(i):
        for j in range(per):
            log.record("exec", sandbox=f"sb{i}", details={"argv": ["make", "test"], "n": j})
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    n, flushes = per * threads, log.fsyncs - f0
    log.close()
    ok = verify(d).ok
    print(f"{threads:>3} threads: {n / dt:9.0f} records/s  {n / flushes:6.1f} records per fdatasync  "
          f"chain {'ok' if ok else 'BAD'}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=4000)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    a = ap.parse_args()
    for threads in (1, 4, 16, 64):
        run(a.dir, threads, a.records if threads > 1 else a.records // 4)


if __name__ == "__main__":
    main()
