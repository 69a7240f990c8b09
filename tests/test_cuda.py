"""CUDA checks that run where a GPU is and skip cleanly elsewhere (CI has none), and the GPU report's refusal.

On a GPU machine: bf16 (frozen weights bf16, autocast) against fp32 log pi and Q; a 4-bit nf4 load and a
run that reaches its updates; a 2-rank NCCL run (two GPUs); checkpoint/resume on CUDA, to a tolerance
(atomic adds in CUDA kernels such as index_add are not bit-reproducible). Everywhere:
benchmarks/gpu_report.py refuses without CUDA, and its code runs end to end in its --cpu-dry-run.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import playground_text as pt
import sac_glam as sg
from conftest import ROOT, nonzero_lora, script_env

SCRIPT = ROOT / "sac_glam.py"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")

# bf16 keeps 8 bits of mantissa: log-probabilities of ~5-token actions and Q values of a random head agree
# with fp32 to a few hundredths.
LOGP_TOL, Q_TOL = 0.1, 0.05

SMALL = (
    "--num-envs 8 --update-frequency 16 --batch-size 16 --critic-hidden 64 --learning-starts 64 "
    "--num-objects 3 --goal-types grasp grow --eval-frequency 0 --log-frequency 64 "
    "--critic-warmup-updates 2 --checkpoint-frequency 0 --checkpoint-dir ck"
).split()


def states(n: int = 8) -> list[sg.State]:
    vec = pt.SyncVecPlaygroundText(n, seed=5, num_objects=4)
    obs, infos = vec.reset()
    obs, _, _, _, infos = vec.step([info["possible_actions"][0] for info in infos])
    return [sg.State(info["goal"], o, tuple(info["possible_actions"])) for o, info in zip(obs, infos)]


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_bf16_log_pi_and_q_match_fp32(family, tiny_dirs):
    device = torch.device("cuda:0")
    out = {}
    for bf16 in (False, True):
        args = sg.Args(model_id=tiny_dirs[family], bf16=bf16)
        torch.manual_seed(0)
        llm, tok = sg.load_llm(args, device, torch.bfloat16 if bf16 else torch.float32)
        nonzero_lora(llm)
        agent = sg.Agent(llm, tok, args, max_actions=5, device=device)
        assert agent.autocast == bf16
        with torch.no_grad():
            logp, q, _, valid = agent(states())
        out[bf16] = (logp.cpu(), q.cpu(), valid.cpu())
    (lp32, q32, valid), (lp16, q16, _) = out[False], out[True]
    assert (lp32 - lp16)[valid].abs().max() < LOGP_TOL
    assert (q32 - q16)[:, valid].abs().max() < Q_TOL


@needs_cuda
def test_4bit_nf4_load_and_updates_on_cuda(runner, tiny_dirs):
    run = runner.start(
        "cuda_q4", [*SMALL, "--model-id", tiny_dirs["llama"], "--total-timesteps", 128, "--load-in-4bit"]
    ).check()
    ck = run.checkpoint()
    assert ck["args"]["load_in_4bit"] and ck["updates"] > 0
    assert all(torch.isfinite(t).all() for t in ck["trainable"].values())


WRAPPER = """
import os, runpy, sys, torch
script, out = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
g = runpy.run_path(script, run_name="__main__")
torch.save({"trainable": g["trainable_state"](g["agent"]), "device": str(g["device"])}, os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
"""


@needs_two_gpus
def test_two_rank_nccl_run_keeps_ranks_identical(runner, tiny_dirs, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("nccl")
    (cwd / "wrapper.py").write_text(WRAPPER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(cwd / "wrapper.py"),
        str(SCRIPT),
        str(cwd),
        *map(str, SMALL),
        "--model-id",
        tiny_dirs["llama"],
        "--total-timesteps",
        "128",
    ]
    runner.start("cuda_nccl", [], cwd=cwd, cmd=cmd).check()
    r0, r1 = (torch.load(cwd / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (r0["device"], r1["device"]) == ("cuda:0", "cuda:1")
    for k in r0["trainable"]:
        assert torch.equal(r0["trainable"][k], r1["trainable"][k]), k


@needs_cuda
def test_resume_on_cuda_matches_the_uninterrupted_run_to_a_tolerance(runner, tiny_dirs):
    args = [*SMALL, "--model-id", tiny_dirs["llama"]]
    full = runner.start("cuda_full", [*args, "--total-timesteps", 192])
    half = runner.start("cuda_half", [*args, "--total-timesteps", 128]).check()
    resumed = runner.start("cuda_resumed", ["--resume", half.checkpoint_dir(), "--total-timesteps", 192], cwd=half.cwd).check()
    a, b = full.check().checkpoint(), resumed.checkpoint()
    assert (a["global_step"], a["updates"]) == (b["global_step"], b["updates"])
    for k in a["trainable"]:
        assert torch.allclose(a["trainable"][k], b["trainable"][k], rtol=1e-3, atol=1e-5), k


# --------------------------------------------------------------------------------------------------
# The GPU report: a clean refusal without CUDA, and its code path end to end on the CPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_report_refuses_without_cuda(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_report.py")],
        cwd=tmp_path,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr == ""
    assert out.stdout.count("\n") == 1 and "no CUDA device" in out.stdout
    assert not (tmp_path / "gpu_report.md").exists()


def test_gpu_report_dry_run_writes_its_table(tiny_dirs, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_report.py"),
            "--cpu-dry-run",
            "--model-id",
            tiny_dirs["llama"],
            tiny_dirs["t5"],
            "--modes",
            "bf16",
        ],
        cwd=tmp_path,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    table = (tmp_path / "gpu_report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| /", "| tiny"))]
    assert len(rows) == 2 and all(" bf16 " in row for row in rows), table
    for row in rows:  # env steps/s, s/update and GPU-hours are positive numbers (memory: nan on the CPU)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[4]) > 0 and float(cells[6]) > 0, row
