"""sandboxctl destroy: kill a sandbox and remove everything it had."""
from sandbox.cli.commands._simple import make

HELP = "destroy sandboxes (kill, remove, verify nothing is left)"
add_arguments, run = make("destroy", "destroyed")
