"""Helpers of the command-line fault tests (tests/test_cli_errors.py, tests/test_faults.py)."""

import contextlib
import hashlib
import io
import os
import re

from tools import convert_torch_weights as conv


def digest(root) -> dict:
    """{relative path: sha256} of every file under ``root``."""
    root = os.fspath(root)
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def convert(*argv):
    """tools/convert_torch_weights.py in-process -> (rc, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = conv.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """The one error line of a failed run's stderr (asserting there is exactly one, and it is the last)."""
    lines = [ln for ln in err.split("\n") if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    assert "Traceback" not in err
    return errors[0]


def converted_any(log: str) -> bool:
    """Whether a converter log says it converted any part."""
    return re.search(r"^converted \w+/ in", log, re.M) is not None
