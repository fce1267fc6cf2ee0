"""sandboxctl freeze: stop every process of a sandbox in place (cgroup freeze)."""
from sandbox.cli.commands._simple import make

HELP = "freeze sandboxes (cgroup freeze; resume continues them)"
add_arguments, run = make("freeze", "frozen")
