"""Entry point of the `meshcni` CNI plugin executable (`python -m meshcni.cni`, or the PyInstaller bundle).

Kept to the exec wrapper: everything that can fail is inside `plugin.main`, which turns failures into spec
error JSON; the guard here only covers a broken installation (an import that fails), which must also
reach the runtime as JSON and not as a traceback.
"""

import os
import sys


def _run() -> int:
    try:
        from meshcni.cni.plugin import main
    except Exception as exc:  # a broken bundle or install: still answer in the CNI format
        sys.stdout.write(
            '{"cniVersion": "1.1.0", "code": 110, "msg": "meshcni plugin is broken: %s"}\n'
            % str(exc).replace("\\", "\\\\").replace('"', "'")
        )
        return 1
    return main(os.environ, sys.stdin.buffer, sys.stdout.buffer, sys.stderr)


def _exit_now(code: int) -> None:
    # Skip interpreter finalisation (module teardown, GC) — several ms per exec that buy nothing: every
    # output is already flushed and every file the plugin wrote is closed.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    _exit_now(_run())
