"""Worker processes of the A/B micro-benchmarks (bench.masked_linear, bench.small_chain): one process per
branch, each with its own command-line arguments and environment (the variables that choose a path are read
once per process), answering one JSON line per JSON request line. The drivers alternate between them round
by round, so machine noise hits every branch alike."""
import json
import os
import subprocess
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Workers:
    """`python -m <module> --worker *arguments[name]` for each name, with environments[name]; a context
    manager that closes them all."""

    def __init__(self, module: str, arguments: Dict[str, List[str]], environments: Dict[str, Dict[str, str]]):
        self.names = list(arguments)
        self._processes = {
            name: subprocess.Popen([sys.executable, "-m", module, "--worker", *arguments[name]], cwd=ROOT, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environments[name])
            for name in self.names
        }

    def ask(self, name: str, request: dict):
        """The worker's answer to one request; RuntimeError if it exited (its traceback is on stderr)."""
        process = self._processes[name]
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {name} exited on request {request} (its error is above)")
        return json.loads(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for process in self._processes.values():
            process.stdin.close()
            process.wait()
