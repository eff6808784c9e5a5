"""The `tierserve` command: one entry point for every tool and role.

Roles run as `python -m <role>` so this module (in `shared/`) never imports a role package.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

# Tools implemented in shared/: subcommand -> "module" with a `main(argv) -> int`, or "module:function".
TOOLS = {
    "make-model": "shared.make_model",
    "convert-experts": "shared.expert_cache",
    "up": "shared.launcher",
    "generate": "shared.cli_client:generate_main",
    "chat": "shared.cli_client:chat_main",
    "health": "shared.cli_client:health_main",
    "stats": "shared.cli_client:stats_main",
    "bench": "shared.bench_cmd",
    "demo": "shared.demo",
}
# Roles, each run as its own process: subcommand -> package run with `python -m`.
ROLES = {"coordinator": "coordinator", "gpu-worker": "gpu_worker", "expert-host": "expert_host"}


def usage() -> str:
    names = ", ".join(sorted([*TOOLS, *ROLES]))
    return f"usage: tierserve <command> [options]\ncommands: {names}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in TOOLS:
        module, _, function = TOOLS[command].partition(":")
        try:
            return int(getattr(importlib.import_module(module), function or "main")(rest) or 0)
        except KeyboardInterrupt:  # Ctrl-C: the shell's exit status for SIGINT, without a traceback
            return 130
        except BrokenPipeError:  # the output's reader went away (`| head`): the shell's status for SIGPIPE, quietly
            _drop_stdout()
            return 141
        except OSError as e:  # a full disk (`> /dev/full`, or a file a tool writes): named, not a traceback
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = f"{e.filename}: " if e.filename else ""
            print(f"tierserve {command}: {where}{e.strerror}", file=sys.stderr)
            _drop_stdout()
            return 1
    if command in ROLES:
        exec_role(ROLES[command], rest)
    print(f"tierserve: unknown command {command!r}\n{usage()}", file=sys.stderr)
    return 2


def _drop_stdout() -> None:
    """Point stdout at /dev/null, or the exit's flush of what is left in its buffer fails again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def exec_role(module: str, argv: list[str]) -> None:
    """Replace this process with `python -m module argv...` (how systemd units run a role)."""
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


if __name__ == "__main__":
    sys.exit(main())
