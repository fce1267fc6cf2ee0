"""A stand-in daemon for the crash-recovery tests: builds sandboxes through the engine, then
stops at a chosen point of the lifecycle and waits there to be SIGKILLed by the test.

    python -m tests.integration.crash_worker CONFIG_JSON

CONFIG: state_dir, id_prefix, cgroup_parent, host_netns, netns_dir, count, scenario:
  create   count-1 sandboxes built; the last stops right after its `pause_step` setup step
  exec     every sandbox built and running `sleep 300`
  destroy  every sandbox built, the last stops in its destroy after `pause_step` undos
Prints "PAUSED" on stdout when it is at the point, then sleeps.
"""
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

from sandbox.audit.sink import MemorySink
from sandbox.kernel import network
from sandbox.policy import load_policy
from sandbox.runtime.sandbox import Sandbox


class PausingSink(MemorySink):
    """Stops the process on the n-th record of an action: a pause point inside the engine
    without touching its code (the lifecycle records after every step and every undo)."""

    def __init__(self):
        super().__init__()
        self.armed = None

    def record(self, action, **kw):
        rec = super().record(action, **kw)
        if self.armed and action == self.armed[0]:
            self.armed[1] -= 1
            if self.armed[1] == 0:
                print("PAUSED", kw.get("resource"), flush=True)
                while True:
                    time.sleep(3600)
        return rec


def main():
    cfg = json.loads(sys.argv[1])
    network.configure(host_netns=cfg["host_netns"], netns_dir=cfg["netns_dir"], prefix="sbxt")
    pol_net = load_policy("default", overrides={
        "limits": {"memory": "256MiB", "disk": "64MiB", "pids": 64},
        "network": {"mode": "egress", "allow": ["api.example.test:443"], "rate": "10mbit",
                    "dns_upstream": ["10.250.3.2"]}})
    pol_plain = load_policy("default", overrides={"limits": {"memory": "128MiB", "disk": 0}})
    sink = PausingSink()
    made = []

    def create(i):
        return Sandbox.create(pol_net if i % 2 == 0 else pol_plain, audit=sink,
                              state_dir=Path(cfg["state_dir"]), sandbox_id=f"{cfg['id_prefix']}{i}",
                              cgroup_parent=cfg["cgroup_parent"],
                              disk_base=Path(cfg["state_dir"]) / "disks")

    n, scenario = cfg["count"], cfg["scenario"]
    for i in range(n - 1 if scenario == "create" else n):
        made.append(create(i))
    if scenario == "create":
        sink.armed = ["setup_step", cfg["pause_step"]]
        create(n - 1)
    loop = asyncio.new_event_loop()
    if scenario == "exec":
        for sb in made:
            loop.create_task(sb.exec(["sleep", "300"]))
        loop.run_until_complete(asyncio.sleep(0.5))
        print("PAUSED exec", flush=True)
        threading.Event().wait()
    if scenario == "destroy":
        loop.run_until_complete(made[-1].exec(["true"]))
        sink.armed = ["teardown_step", cfg["pause_step"]]
        made[-1].destroy()
    print("NOT PAUSED", flush=True)


if __name__ == "__main__":
    main()
