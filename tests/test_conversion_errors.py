"""The converter CLI under bad input, as a new user meets it: every class of broken file,
unwritable or full output, bad argument value and foreign config ends with exit code 2 and ONE
line naming the file (or option) and the cause, no traceback, the source byte-identical, nothing
at the output; leftovers of a killed run are reported and removed by the rerun; under torchrun
the line is printed once."""

import hashlib
import importlib.util
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from megatron_papo.models.qwen2_5_vl.tiny import write_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, nproc=None, file_size_limit=None):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), TOOL]
           if nproc else [sys.executable, TOOL]) + [str(a) for a in args]

    def limit():  # a full disk, as a process sees it: writes past N bytes fail
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          preexec_fn=limit if file_size_limit else None)


class _Done:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli_here(capfd):
    """The CLI's ``main`` in this process (its error paths stop before any model-parallel
    state: the same code and output as a fresh process, without 5 s of imports per case)."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def run(*args):
        capfd.readouterr()
        environ = dict(os.environ)  # a world of one sets RANK, MASTER_PORT, ... for its engine
        try:
            code = tool.main([str(a) for a in args])
        finally:
            os.environ.clear()
            os.environ.update(environ)
        out, err = capfd.readouterr()
        return _Done(code, out, err)
    return run


def _digest(folder):
    h = hashlib.sha256()
    for base, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(base, name)
            h.update(os.path.relpath(path, folder).encode())
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def _one_line_error(done, *expected):
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr[-3000:]
    for text in expected:
        assert text in errors[0], (text, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    hf = str(root / "hf")
    write_tiny_checkpoint(hf, max_shard_size="200KB")
    mc = str(root / "mc")
    done = _cli("hf-to-mcore", "--hf", hf, "--out", mc)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, hf, mc


def _damaged(sources, name, kind, damage):
    """A copy of the HF folder or the Megatron checkpoint with ``damage`` applied."""
    root, hf, mc = sources
    copy = str(root / name)
    shutil.copytree(hf if kind == "hf" else mc, copy)
    damage(copy)
    return copy


def _truncate(path, size=None):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if size is None else size)


def _first_shard(folder):
    return os.path.join(folder, sorted(f for f in os.listdir(folder)
                                       if f.endswith(".safetensors"))[0])


def _first_distcp(folder):
    weights = os.path.join(folder, "weights")
    return os.path.join(weights, sorted(f for f in os.listdir(weights)
                                        if f.endswith(".distcp"))[0])


def _edit_config(key_path, value):
    def edit(folder):
        path = os.path.join(folder, "config.json")
        config = json.load(open(path))
        section = config
        for key in key_path[:-1]:
            section = section[key]
        section[key_path[-1]] = value
        json.dump(config, open(path, "w"))
    return edit


def _replace_with_folder(path):
    os.remove(path)
    os.makedirs(path)


HF_CASES = {
    "truncated_shard": (lambda d: _truncate(_first_shard(d)),
                        ["model-00001-of-", "not a readable safetensors file", "truncated"]),
    "malformed_config": (lambda d: open(os.path.join(d, "config.json"), "a").write("}{"),
                         ["config.json is not valid JSON", "line"]),
    "malformed_index": (lambda d: open(os.path.join(d, "model.safetensors.index.json"),
                                       "w").write("{oops"),
                        ["model.safetensors.index.json is not valid JSON"]),
    "unreadable_shard": (lambda d: _replace_with_folder(_first_shard(d)),
                         ["model-00001-of-", "Is a directory"]),
    "other_architecture": (_edit_config(["model_type"], "llama"),
                           ["model_type='llama'", "Qwen2.5-VL"]),
    "heads_not_dividing": (_edit_config(["text_config", "num_attention_heads"], 3),
                           ["hidden_size=128 is not divisible by num_attention_heads=3"]),
}


MCORE_CASES = {
    "truncated_data_file": (lambda d: _truncate(_first_distcp(d)),
                            ["__0_0.distcp is truncated", "metadata needs"]),
    "missing_data_file": (lambda d: os.remove(_first_distcp(d)), ["__0_0.distcp is missing"]),
    "truncated_metadata": (lambda d: _truncate(os.path.join(d, "weights", ".metadata")),
                           ["weights/.metadata cannot be read"]),
    "missing_metadata": (lambda d: os.remove(os.path.join(d, "weights", ".metadata")),
                         ["weights/.metadata is missing"]),
    "malformed_meta": (lambda d: open(os.path.join(d, "megatron_papo.json"), "w").write("{"),
                       ["megatron_papo.json is not valid JSON"]),
}


@pytest.mark.parametrize("kind,case", [("hf", c) for c in sorted(HF_CASES)]
                         + [("mcore", c) for c in sorted(MCORE_CASES)])
def test_bad_input_is_one_line_and_the_source_stays(sources, kind, case, tmp_path, cli_here):
    damage, expected = (HF_CASES if kind == "hf" else MCORE_CASES)[case]
    source = _damaged(sources, f"{kind}_{case}", kind, damage)
    before = _digest(source)
    out = tmp_path / "out"
    command = ["hf-to-mcore", "--hf"] if kind == "hf" else ["mcore-to-hf", "--ckpt"]
    _one_line_error(cli_here(*command, source, "--out", out), *expected)
    assert _digest(source) == before and not out.exists() and os.listdir(tmp_path) == []


def test_full_disk_and_unwritable_output_are_one_line(sources, tmp_path, cli_here):
    """A full disk (writes past a limit fail: torch's 'unexpected pos' in dist_checkpointing,
    EFBIG in safetensors) and an output path that cannot be created: one line naming the
    output, nothing left there or beside it, the source intact."""
    _, hf, mc = sources
    before = _digest(hf), _digest(mc)
    for command, source in (("hf-to-mcore", ["--hf", hf]), ("mcore-to-hf", ["--ckpt", mc])):
        out = tmp_path / command
        line = _one_line_error(_cli(command, *source, "--out", out, file_size_limit=20_000),
                               f"writing {out} failed", "free on the disk", "intact")
        assert "stopped short" in line or "File too large" in line
        assert os.listdir(tmp_path) == []
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _one_line_error(cli_here("hf-to-mcore", "--hf", hf, "--out", blocker / "sub"),
                    "is a file, not a folder")
    if os.geteuid() != 0:  # root writes anywhere; the case above is the same check
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        _one_line_error(cli_here("hf-to-mcore", "--hf", hf, "--out", locked / "x"), "Permission")
    assert (_digest(hf), _digest(mc)) == before


def test_output_overlapping_the_input_is_refused_even_with_force(sources, cli_here):
    """--out equal to the input, inside it or containing it deleted the source with --force
    (both directions): refused with one line, the source intact."""
    _, hf, mc = sources
    before = {hf: _digest(hf), mc: _digest(mc)}
    for out in (hf, os.path.join(hf, "sub"), os.path.dirname(hf)):
        done = cli_here("hf-to-mcore", "--hf", hf, "--out", out, "--force")
        assert done.returncode == 2, (out, done.stderr[-2000:])
        assert "overlaps the input" in done.stderr and "Traceback" not in done.stderr
    done = cli_here("mcore-to-hf", "--ckpt", mc, "--out", mc, "--force")
    assert done.returncode == 2 and "overlaps the input" in done.stderr
    assert before == {hf: _digest(hf), mc: _digest(mc)}


def test_missing_paths_and_bad_argument_values(sources, tmp_path, cli_here):
    _, hf, mc = sources
    _one_line_error(cli_here("verify", "--hf", tmp_path / "nothing", "--ckpt", mc),
                    f"no config.json at {tmp_path / 'nothing'}")
    _one_line_error(cli_here("mcore-to-hf", "--ckpt", tmp_path / "nothing", "--out",
                             tmp_path / "o"), "is not a folder: give an HF folder, a Megatron")
    for value in ("5G", "5XB", "0", "-1", "0.1B"):
        _one_line_error(_cli("mcore-to-hf", "--ckpt", mc, "--out", tmp_path / "o",
                             "--max-shard-size", value), "--max-shard-size", repr(value))
    for value in ("0", "-1", "two"):
        _one_line_error(_cli("hf-to-mcore", "--hf", hf, "--out", tmp_path / "o", "--tp", value),
                        "--tp", repr(value))
    assert os.listdir(tmp_path) == []
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool._size("5GB") == 5 * 10**9 and tool._size("5GiB") == 5 * 2**30
    assert tool._size("500MB") == 5 * 10**8 and tool._size("2KiB") == 2048
    assert tool._size("1Gb") == 10**9 // 8 and tool._size("1234") == 1234  # transformers' bits


def test_leftovers_of_a_killed_run_are_reported_and_removed(sources, tmp_path):
    """A run killed while writing leaves ``<out>.incomplete-*`` (and, with --force,
    ``<out>.replaced-*``); the rerun names and removes those whose writer is gone and leaves
    one that a live process is writing."""
    _, hf, _ = sources
    out = tmp_path / "mc"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    dead = tmp_path / "mc.incomplete-0badf00d"
    dead.mkdir()
    (dead / ".megatron_papo_writer").write_text(f"{socket.gethostname()} {gone}\n")
    (dead / "__0_0.distcp").write_bytes(b"\0" * 2**20)
    replaced = tmp_path / "mc.replaced-1234abcd"
    replaced.mkdir()
    live = tmp_path / "mc.incomplete-a11ve000"
    live.mkdir()
    (live / ".megatron_papo_writer").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    done = _cli("hf-to-mcore", "--hf", hf, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"removed {dead} (1.0 MiB), left behind by an interrupted" in done.stdout
    assert f"removed {replaced}" in done.stdout
    assert f"{live} is being written by process {os.getpid()}" in done.stdout
    assert sorted(os.listdir(tmp_path)) == ["mc", live.name]
    assert ".megatron_papo_writer" not in os.listdir(out)


def test_under_torchrun_the_error_is_printed_once(sources, tmp_path):
    source = _damaged(sources, "hf_torchrun", "hf", _edit_config(["model_type"], "llama"))
    done = _cli("hf-to-mcore", "--hf", source, "--out", tmp_path / "o", "--tp", "2", nproc=2)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: config.json has model_type='llama', not Qwen2.5-VL ('qwen2_5_vl'): "
                      "this project converts and trains Qwen2.5-VL checkpoints only"], \
        done.stderr[-3000:]


def test_an_output_another_job_is_writing_is_refused(sources, tmp_path, cli_here, capfd):
    """The converter's and publish's --out while another live job holds its lock: one line
    naming --out and the holder, exit 2, nothing written there."""
    from megatron_papo.runlock import output_lock

    _, hf, mc = sources
    out = tmp_path / "out"
    holder = output_lock(str(out), "--out", "pass --force-unlock")
    holder.acquire()
    try:
        for args in (("hf-to-mcore", "--hf", hf), ("mcore-to-hf", "--ckpt", mc)):
            done = cli_here(*args, "--out", out)
            assert done.returncode == 2, done.stderr[-2000:]
            line = done.stderr.strip().splitlines()[-1]
            assert f"--out {out} is in use by another job (pid {os.getpid()}" in line, line
            assert line.endswith("pass --force-unlock") and not out.exists()
        spec = importlib.util.spec_from_file_location(
            "publish_cli", os.path.join(ROOT, "tools", "publish.py"))
        publish = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(publish)
        capfd.readouterr()
        environ = dict(os.environ)
        try:
            with pytest.raises(SystemExit) as exit_:
                publish.main([str(mc), "--out", str(out)])
        finally:
            os.environ.clear()
            os.environ.update(environ)
        err = capfd.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        assert f"--out {out} is in use by another job" in err
        assert not out.exists()
    finally:
        holder.release()
