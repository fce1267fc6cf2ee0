"""Entry point of sandboxctl. Imports only the subcommand it runs, so `sandboxctl ps` starts fast.

Errors print one clear line on stderr (never a traceback) and exit 2 for usage and
sandboxd errors; a command's own exit status is passed through by the commands that run one.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import sandbox.cli.commands as _commands


def _command_names() -> list[str]:
    """The modules of sandbox/cli/commands (a listdir: pkgutil alone cost ~3 ms to import)."""
    names = set()
    for path in _commands.__path__:
        for f in os.listdir(path):
            stem, dot, ext = f.rpartition(".")
            if dot and ext in ("py", "pyc") and stem.isidentifier() and not stem.startswith("_"):
                names.add(stem.replace("_", "-"))
    return sorted(names)


def _load(name: str):
    return importlib.import_module(f"sandbox.cli.commands.{name.replace('-', '_')}")


def _usage() -> str:
    lines = ["usage: sandboxctl COMMAND [ARGS...]", "", "commands:"]
    for name in _command_names():
        try:
            lines.append(f"  {name:<12} {_load(name).HELP}")
        except Exception as e:  # noqa: BLE001 - a broken command must not hide the others
            lines.append(f"  {name:<12} (unavailable: {e})")
    lines.append("")
    lines.append("Run 'sandboxctl COMMAND --help' for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name = argv[0]
    if name not in _command_names():
        print(f"sandboxctl: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = _load(name)
    parser = argparse.ArgumentParser(prog=f"sandboxctl {name}", description=module.HELP)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141
    except Exception as e:  # noqa: BLE001 - the one place errors become one line for a human
        from sandbox.errors import SandboxError
        if isinstance(e, SandboxError):
            print(f"sandboxctl {name}: {e}", file=sys.stderr)
        else:
            print(f"sandboxctl {name}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
