"""Running a command with stderr (and optionally stdout) on a pseudo-terminal, for the tests of
what the command lines show only on a terminal (progress bars, coloured help)."""

import fcntl
import os
import pty
import struct
import subprocess
import termios


def run_on_terminal(
    cmd: list[str], cwd, columns: int, stdout_too: bool = False, env=None, timeout: float = 300
) -> tuple[int, str, str]:
    """(exit code, what reached the terminal, stdout when it is not the terminal) of ``cmd``
    with stderr on a ``columns``-wide pseudo-terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    stdout = slave if stdout_too else subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=stdout, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    out = proc.communicate(timeout=timeout)[0]
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(), (out or b"").decode()
