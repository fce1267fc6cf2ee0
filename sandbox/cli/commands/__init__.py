"""One module per sandboxctl subcommand: `sandboxctl NAME` imports only commands/NAME.py.

Each module defines HELP (one line), `add_arguments(parser)` and `run(args) -> int`.
Adding a command is adding a file; nothing else changes.
"""
