"""A stand-in for ``flwr-clientapp`` run by the warm pool in tests/test_prefork.py.

argv: OUT_JSON EXIT_CODE [sleep]: records what the task saw, prints a line, then exits.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    out, code = sys.argv[1], int(sys.argv[2])
    with open(out, "w") as handle:
        json.dump({"argv0": sys.argv[0], "pid": os.getpid(), "ppid": os.getppid(),
                   "cwd": os.getcwd(), "marker": os.environ.get("PREFORK_MARKER")}, handle)
    print(f"task says hello {code}", flush=True)
    if sys.argv[3:] == ["sleep"]:
        time.sleep(60)
    sys.exit(code)
