"""The test run fails when a process it started outlives it (tests/conftest.py): checked on a
nested pytest run whose test leaves a detached child behind."""

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

LEAKY = '''
import subprocess, sys

def test_leaves_a_process_behind():
    subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"],
                     start_new_session=True)

def test_cleans_up():
    child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    child.kill()
    child.wait()
'''


def _nested(tmp_path, body):
    shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_nested.py").write_text(body)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path / "test_nested.py")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)


def test_a_surviving_process_fails_the_run_and_is_killed(tmp_path):
    done = _nested(tmp_path, LEAKY)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "2 passed" in done.stdout
    assert "1 process(es) started by the tests outlived them" in done.stdout
    assert "signal.pause()" in done.stdout


def test_a_clean_run_passes(tmp_path):
    done = _nested(tmp_path, LEAKY.split("def test_leaves")[0] + "def test_cleans_up" +
                   LEAKY.split("def test_cleans_up")[1])
    assert done.returncode == 0, done.stdout[-2000:]
