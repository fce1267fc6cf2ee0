"""sandboxctl resume: thaw a frozen sandbox, or release a held one (operators only).

Resuming a held sandbox releases nothing that was withheld: that output is gone.
"""
from sandbox.cli.commands._simple import make

HELP = "resume frozen or held sandboxes (withheld output stays withheld)"
add_arguments, run = make("resume", "resumed")
