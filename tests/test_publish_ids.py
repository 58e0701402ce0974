"""Message ids stay unique across `fork()` (issue #20, finding 3).

A pre-fork server (gunicorn, uWSGI) imports aio-workq, often creates a `SyncProducer`, then forks:
every child inherits the parent's id prefix and counter. If they are not re-seeded, parent and
children hand out the same ids, and `idempotent()` (keyed on the message id) skips a different
message: a silent loss.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import os
    from aio_workq._publish.message import new_message_id

    before = new_message_id()  # the counter has moved before the fork, as in a real server
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child sends its ids to the parent through the pipe
        os.close(read)
        ids = [new_message_id() for _ in range(1000)]
        os.write(write, "\\n".join(ids).encode())
        os._exit(0)
    os.close(write)
    parent = [new_message_id() for _ in range(1000)]
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    child = b"".join(chunks).decode().split("\\n")
    print(os.waitstatus_to_exitcode(status), len(child), len(set(parent) & set(child)), before)
    print(parent[0], child[0])
    """
)


def test_ids_of_a_forked_child_and_its_parent_are_disjoint() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    status, child_count, common, before = done.stdout.split("\n")[0].split()
    assert (status, child_count) == ("0", "1000"), done.stdout
    assert common == "0", f"{common} ids were handed out by both parent and child: {done.stdout}"
    parent_first, child_first = done.stdout.split("\n")[1].split()
    # Each process has its own prefix: the child's ids share nothing with the parent's.
    assert parent_first[:16] == before[:16] != child_first[:16]
