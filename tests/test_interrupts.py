"""Ctrl-C or SIGTERM while the command writes leaves the old file or the new one, whole.

Each test runs the real command (or the benchmark reports' writer) in a child
process that stops itself at its first write into the output folder: a
profile hook (``sys.setprofile``, no change to the code under test) sees the
``write`` call on a file in that folder, says so on stdout and waits for a
signal. The test sends the signal only then, so the signal always lands in
the middle of a write; nothing depends on timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="the hook finds a file's path in /proc/self/fd"
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Run CODE with a hook that stops at the first write into FOLDER.
HARNESS = textwrap.dedent(
    """
    import json, os, signal, sys

    config = json.loads(sys.argv[1])
    folder = os.path.realpath(config["folder"])

    def stop_at_first_write(frame, event, function):
        if event != "c_call" or getattr(function, "__name__", None) != "write":
            return
        try:
            name = os.readlink(f"/proc/self/fd/{function.__self__.fileno()}")
        except (AttributeError, OSError, ValueError):
            return
        if os.path.dirname(name) == folder:
            sys.setprofile(None)
            print("writing", os.path.basename(name), flush=True)
            signal.pause()  # the test's signal arrives here, in the middle of the write

    sys.setprofile(stop_at_first_write)
    exec(config["code"])
    """
)


def interrupt_first_write(folder: Path, code: str, signum: int) -> subprocess.CompletedProcess:
    """Run ``code`` in a child, send ``signum`` at its first write into ``folder``."""
    errors = folder.parent / f"stderr-{folder.name}.txt"  # a file: a full pipe would block
    with errors.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", HARNESS, json.dumps({"folder": str(folder), "code": code})],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert child.stdout is not None
        printed = []
        # What the command prints before its first write comes first.
        for line in child.stdout:
            printed.append(line)
            if line.startswith("writing "):
                break
        else:
            child.wait()
            pytest.fail(f"no write into {folder}: {''.join(printed)}{errors.read_text()}")
        child.send_signal(signum)
        out, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    err = errors.read_text()
    errors.unlink()
    return subprocess.CompletedProcess(child.args, child.returncode, "".join(printed) + out, err)


def command(*arguments: str) -> str:
    return f"from gpu_patching.cli import main; raise SystemExit(main({list(arguments)!r}))"


SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]


@pytest.mark.parametrize("signum", SIGNALS)
@pytest.mark.parametrize("old", [True, False], ids=["over-an-old-file", "new-file"])
def test_an_interrupted_sample_leaves_the_old_output_and_no_temporary_file(
    tmp_path: Path, signum: int, old: bool
) -> None:
    stack = tmp_path / "stack.npy"
    np.save(stack, np.zeros((2, 64, 64), dtype=np.uint8))
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "epoch.npy"
    if old:
        output.write_bytes(b"the old epoch")
    code = command("sample", str(stack), "--axes", "SYX", "--patch", "8", "8",
                   "--backend", "numpy", "--overwrite", "-o", str(output))  # fmt: skip
    result = interrupt_first_write(folder, code, signum)
    assert result.returncode == 128 + signum, result.stderr
    assert result.stderr.strip() == f"gpu-patching sample: interrupted by {signum.name}"
    assert sorted(p.name for p in folder.iterdir()) == (["epoch.npy"] if old else [])
    if old:
        assert output.read_bytes() == b"the old epoch"


@pytest.mark.parametrize("signum", SIGNALS)
def test_an_interrupted_demo_leaves_every_old_picture_whole_and_no_temporary_file(
    tmp_path: Path, signum: int
) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("skimage")
    from gpu_patching.demo import PICTURE_NAMES

    image = tmp_path / "image.npy"
    rng = np.random.default_rng(0)
    np.save(image, rng.normal(100, 20, (96, 128)).astype(np.float32))
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name in PICTURE_NAMES:
        (folder / name).write_bytes(b"old " + name.encode())
    code = command("demo", "--image", str(image), "--patch", "16", "16", "--epochs", "1",
                   "--backend", "numpy", "--no-careamics", "--no-progress", "--overwrite",
                   "--output", str(folder))  # fmt: skip
    result = interrupt_first_write(folder, code, signum)
    assert result.returncode == 128 + signum, result.stderr
    assert result.stderr.strip().endswith(f"gpu-patching demo: interrupted by {signum.name}")
    assert sorted(p.name for p in folder.iterdir()) == sorted(PICTURE_NAMES)
    for name in PICTURE_NAMES:
        assert (folder / name).read_bytes() == b"old " + name.encode()


@pytest.mark.parametrize("signum", SIGNALS)
def test_an_interrupted_benchmark_report_leaves_the_old_report_and_no_temporary_file(
    tmp_path: Path, signum: int
) -> None:
    report = tmp_path / "cpu.md"
    report.write_text("# the old report\n")
    code = (
        f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); from pathlib import Path; "
        f"import _report; _report.write_markdown(Path({str(report)!r}), '# new\\n' * 1000)"
    )
    result = interrupt_first_write(tmp_path, code, signum)
    assert result.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.md"]
    assert report.read_text() == "# the old report\n"


def test_bench_passes_sigterm_on_to_the_running_script_and_waits_for_it(tmp_path: Path) -> None:
    # A sitecustomize stops the benchmark script (not the command) at its start,
    # after saying which process it is.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import os, signal, sys
            if sys.argv and sys.argv[0].endswith("bench_cpu.py"):
                print("script", os.getpid(), flush=True)
                signal.pause()
            """
        )
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])
    )
    parent = subprocess.Popen(
        [sys.executable, "-m", "gpu_patching", "bench", "cpu", "--quick"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    script = None
    try:
        assert parent.stdout.readline().startswith("== bench_cpu ==")
        line = parent.stdout.readline()
        assert line.startswith("script "), line
        script = int(line.split()[1])
        parent.send_signal(signal.SIGTERM)
        _, err = parent.communicate(timeout=120)
        assert parent.returncode == 128 + signal.SIGTERM, err
        assert "interrupted by SIGTERM" in err
        # The command waited for (and reaped) the script before it exited.
        assert not Path(f"/proc/{script}").exists()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if script is not None and Path(f"/proc/{script}").exists():
            os.kill(script, signal.SIGKILL)


def test_a_write_in_another_thread_holds_back_no_signal_of_the_main_thread() -> None:
    import threading

    from gpu_patching import _atomic

    # A worker thread inside the step that creates a temporary file ...
    inside, release = threading.Event(), threading.Event()

    def create_a_temporary_file() -> None:
        with _atomic._Deferred():
            inside.set()
            release.wait()

    worker = threading.Thread(target=create_a_temporary_file)
    worker.start()
    inside.wait()
    try:
        # ... does not stop SIGTERM from interrupting the main thread's write
        # (raise_signal runs the handler before it returns).
        with pytest.raises(_atomic.Interrupted), _atomic.interruptible():
            signal.raise_signal(signal.SIGTERM)
    finally:
        release.set()
        worker.join()
