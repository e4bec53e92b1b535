"""Actors' local scratch folders (both sides): each actor works in its own temp folder, named by its
process id, so that a later actor or a takedown can find and remove what a crashed one left behind."""

from __future__ import annotations

import os
import shutil
import tempfile
import time


TEMP_PREFIX = "corpus-anon-"  # + "{pid}-" + mkdtemp's suffix: an actor's own temp folder


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


STALE_TEMP_DIR_S = 3600.0  # a folder this old whose pid is gone is a dead actor's, even across PID namespaces


def sweep_dead_temp_dirs(tmp: str | None = None, min_age_s: float = STALE_TEMP_DIR_S) -> int:
    """Remove the temp folders of actors on this machine whose process is gone (a crash or a kill
    leaves downloaded sources and encodes behind) and that were last touched `min_age_s` ago (a
    container in another PID namespace sharing /tmp may hold a live one). Returns the folders removed."""
    tmp = tmp or tempfile.gettempdir()
    n = 0
    try:
        names = os.listdir(tmp)
    except OSError:
        return 0
    for name in names:
        pid = name[len(TEMP_PREFIX):].split("-", 1)[0]
        path = os.path.join(tmp, name)
        if name.startswith(TEMP_PREFIX) and pid.isdigit() and not pid_alive(int(pid)):
            try:
                if time.time() - os.path.getmtime(path) < min_age_s:
                    continue
            except OSError:
                continue
            shutil.rmtree(path, ignore_errors=True)
            n += 1
    return n
