"""Prometheus text exposition (version 0.0.4) of the daemon's counters, without a library.

Sandboxes by state are read live from the registry; the rest are counters and one
histogram of create latency.
"""
from __future__ import annotations

import bisect
from collections import Counter

CREATE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    def __init__(self, buckets=CREATE_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float):
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


def _label(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        self.create_latency = Histogram()
        self.created = 0
        self.destroyed = 0
        self.execs = 0
        self.findings: Counter = Counter()       # (rule, action) -> count
        self.denials: Counter = Counter()        # reason -> count (auth, bounds, ...)
        self.requests: Counter = Counter()       # status class -> count
        self.held = 0

    def render(self, states: dict[str, int]) -> str:
        lines = ["# HELP sandboxd_sandboxes Sandboxes by state.", "# TYPE sandboxd_sandboxes gauge"]
        for state in sorted(set(states) | {"running", "frozen", "held"}):
            lines.append(f'sandboxd_sandboxes{{state="{_label(state)}"}} {states.get(state, 0)}')
        lines += ["# HELP sandboxd_create_seconds Time to create a sandbox.",
                  "# TYPE sandboxd_create_seconds histogram"]
        lines += self.create_latency.lines("sandboxd_create_seconds")
        for name, value, text in (("sandboxd_created_total", self.created, "Sandboxes created."),
                                  ("sandboxd_destroyed_total", self.destroyed, "Sandboxes destroyed."),
                                  ("sandboxd_execs_total", self.execs, "Commands run."),
                                  ("sandboxd_held_total", self.held, "Sandboxes held by a block finding.")):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {value}"]
        lines += ["# HELP sandboxd_findings_total Scanner findings in released output.",
                  "# TYPE sandboxd_findings_total counter"]
        for (rule, action), n in sorted(self.findings.items()):
            lines.append(f'sandboxd_findings_total{{rule="{_label(rule)}",action="{_label(action)}"}} {n}')
        lines += ["# HELP sandboxd_denials_total Requests refused, by reason.",
                  "# TYPE sandboxd_denials_total counter"]
        for reason, n in sorted(self.denials.items()):
            lines.append(f'sandboxd_denials_total{{reason="{_label(reason)}"}} {n}')
        lines += ["# HELP sandboxd_requests_total Requests answered, by status class.",
                  "# TYPE sandboxd_requests_total counter"]
        for cls, n in sorted(self.requests.items()):
            lines.append(f'sandboxd_requests_total{{code="{_label(cls)}"}} {n}')
        return "\n".join(lines) + "\n"
