"""sandboxd's own settings: where its socket and state live, who may talk to it, input bounds.

Everything has a default for a systemd install (docs in systemd/sandboxd.service); the
`sandboxd --foreground` flags override them for development and tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DaemonConfig:
    socket_path: Path = Path("/run/sandboxd/sandboxd.sock")
    state_dir: Path = Path("/var/lib/sandboxd")
    run_dir: Path = Path("/run/sandboxd")          # the engine's per-sandbox runtime state
    policy_dir: Path | None = None                 # extra policy directory, searched first
    client_group: str = "sandboxd"                 # members need a capability token
    admin_group: str = "sandboxd-admin"            # members administer (like root)
    max_body: int = 64 * 1024**2                   # largest request body (file uploads included)
    max_json_body: int = 1024**2                   # largest JSON request body
    max_connections: int = 1024                    # open connections at once; more are closed
    idle_timeout: float = 30.0                     # keep-alive connections idle this long are closed
    header_timeout: float = 10.0                   # a request's headers must arrive within this
    body_timeout: float = 60.0                     # ... and its body within this
    token_default_ttl: float = 4 * 3600.0          # default lifetime of a granted token
    watchdog_interval: float | None = None         # from $WATCHDOG_USEC when systemd sets it
    max_file_read: int = 256 * 1024**2             # largest file read out of a workspace
    net: dict = field(default_factory=dict)        # sandbox.kernel.network.configure(**net)
    network_sweep: bool = True                     # recovery sweeps our netns/veth/nft names
    warm_pool: int = 2                             # warm sandboxes of the default policy kept
                                                   # ready (sandbox/runtime/pool.py); 0 = none
    extra: dict = field(default_factory=dict)

    @property
    def tokens_path(self) -> Path:
        return self.state_dir / "tokens.json"
