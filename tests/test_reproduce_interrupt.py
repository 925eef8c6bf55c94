"""scripts/reproduce.py: where each command's output goes, progress and a time estimate up
front, and Ctrl-C: the running command checkpoints, then one line and exit 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A stand-in for a training command: on SIGINT it takes a moment to "checkpoint", then stops.
CHILD = """
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def stop(*a):
    time.sleep(1.0)  # longer than subprocess.run's 0.25 s grace before it kills
    out.write_text("checkpointed")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
out.with_suffix(".started").write_text("")
while True:
    time.sleep(0.05)
"""

DRIVER = """
import sys
sys.path.insert(0, {scripts!r})
import reproduce
from pathlib import Path
runs = Path({runs!r})

def experiments(runs_dir, scale, data_dir, only):
    exps = reproduce.scr_experiments(runs_dir, scale)[:2]
    for e in exps:
        e.command = ["python", "-c", {child!r}, str(runs / (e.name + ".mark"))]
    return exps

reproduce.small_experiments = experiments
sys.exit(reproduce.main(["--budget", "small", "--only", "scr", "--runs-dir", str(runs)]))
"""


def test_ctrl_c_lets_the_command_checkpoint_then_exits_130(tmp_path):
    runs = tmp_path / "runs"
    driver = DRIVER.format(scripts=str(ROOT / "scripts"), runs=str(runs), child=CHILD)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(driver)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: Ctrl-C reaches it and its command
    )
    started = runs / "scr_bp.started"
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), proc.stderr.read() if proc.poll() is not None else "not started"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), err
    assert "checkpointed" in lines[0] and "resumes" in lines[0]
    assert "Traceback" not in err
    assert (runs / "scr_bp.mark").read_text() == "checkpointed"  # not killed mid-checkpoint
    assert not (runs / "scr_l2.started").exists()  # nothing more started
    head = out.splitlines()
    assert head[0] == f"each command's output goes to {runs}/<name>.log"
    assert head[1].startswith("2 commands, about 0:") and "2-core CPU" in head[1]
    assert (runs / "scr_bp.log").is_file()


def test_progress_after_each_command(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce

    exps = reproduce.scr_experiments(tmp_path, 0.1)[:2]
    monkeypatch.setattr(reproduce, "_execute", lambda e, argv, log: (0, 1.0))
    reproduce.run_all(exps, jobs=1, dry_run=False)
    out = capsys.readouterr().out.splitlines()
    done = [line for line in out if line.startswith("[done]")]
    assert done[0].endswith("ran (1/2 done, 0:00:00 elapsed, about 0:01:36 left)"), done
    assert done[1].endswith("ran (2/2 done, 0:00:00 elapsed, about 0:00:00 left)"), done
