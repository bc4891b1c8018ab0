"""`python -m bench`. `--source DIR|git:REV` is read here, before anything imports
Tidal's modules, so the harness and the services it starts use the same tree (others
edit the work tree while a run goes on; `--source git:HEAD` benchmarks the last commit)."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _source(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--source" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--source="):
            return arg.split("=", 1)[1]
    return None


def _prepare(value: str) -> Path:
    root = Path(__file__).resolve().parent.parent
    if not value.startswith("git:"):
        return Path(value).resolve()
    rev = value[4:] or "HEAD"
    dest = Path(tempfile.mkdtemp(prefix="tidal-bench-src-"))
    atexit.register(shutil.rmtree, dest, True)
    archive = subprocess.run(["git", "-C", str(root), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    shutil.rmtree(dest / "bench", ignore_errors=True)  # the harness is this tree's
    return dest


_value = _source(sys.argv[1:])
if _value:
    _src = _prepare(_value)
    os.environ["BENCH_SOURCE"] = str(_src)
    # Tidal's packages from the source tree, ahead of this work tree (which stays on the
    # path for `bench` itself)
    sys.path.insert(0, str(_src))

from bench.cli import main  # noqa: E402

raise SystemExit(main())
