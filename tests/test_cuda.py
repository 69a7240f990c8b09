"""CUDA checks that run where a GPU is and skip cleanly elsewhere (CI has none), and the GPU report's own checks.

On a GPU machine: the prefix-tree scoring against each action scored alone, in fp32 and in bf16 (a CUDA attention
kernel could mishandle the 4D mask); bf16 (frozen weights bf16, autocast) against fp32 log pi and Q; each of the
three scripts runs on CUDA to its updates; a 4-bit nf4 run whose LoRA weights move; a 2-rank NCCL run (two GPUs);
checkpoint/resume on CUDA in fp32, to a tolerance (atomic adds in CUDA kernels such as index_add are not
bit-reproducible); benchmarks/gpu_report.py end to end. Everywhere: benchmarks/gpu_report.py refuses without
CUDA, its code runs end to end in its --cpu-dry-run, and it counts packed 4-bit weights as their parameters and
frees a 4-bit model before its next row. `python -m pytest -q tests/test_cuda.py -rs` lists what each skipped test
would check.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import playground_text as pt
import sac_glam as sg
from conftest import ROOT, nonzero_lora, script_env

SCRIPT = ROOT / "sac_glam.py"


def what_it_checks(test) -> str:
    """The first paragraph of a test's docstring, on one line."""
    return " ".join((test.__doc__ or test.__name__).strip().split("\n\n")[0].split())


def needs_cuda(test):
    """Skip `test` without a CUDA device; the skip reason says what it would check (pytest -rs lists it)."""
    reason = f"needs a CUDA device; would check: {what_it_checks(test)}"
    return pytest.mark.skipif(not torch.cuda.is_available(), reason=reason)(test)


def needs_two_gpus(test):
    """Skip `test` without two CUDA devices; the skip reason says what it would check."""
    reason = f"needs two CUDA devices; would check: {what_it_checks(test)}"
    return pytest.mark.skipif(torch.cuda.device_count() < 2, reason=reason)(test)


# bf16 keeps 8 bits of mantissa: log-probabilities of ~5-token actions and Q values of a random head agree
# with fp32 to a few hundredths. In fp32 the two ways of scoring differ only in the order of their sums.
LOGP_TOL, Q_TOL, FP32_TOL = 0.1, 0.05, 1e-4

SMALL = (
    "--num-envs 8 --update-frequency 16 --batch-size 16 --critic-hidden 64 --learning-starts 64 "
    "--num-objects 3 --goal-types grasp grow --eval-frequency 0 --log-frequency 64 "
    "--critic-warmup-updates 2 --checkpoint-frequency 0 --checkpoint-dir ck"
).split()
# sac_glam_her.py: the simplified env of Appendix B, hindsight goals at almost every grasp.
HER_SMALL = (
    "--num-objects 3 --goal-types grasp grow --num-envs 4 --update-frequency 4 --learning-starts 16 --batch-size 8 "
    "--buffer-size 64 --her-buffer-size 64 --log-frequency 16 --eval-frequency 0 --critic-warmup-updates 4 "
    "--critic-hidden 32 --lora-r 4 --update-chunk-size 4 --checkpoint-frequency 0 --checkpoint-dir ck --total-timesteps 64"
).split()
# ppo_glam.py: 4 envs x 8 steps per rollout, 4 minibatches of 8, 2 epochs; 96 steps = 3 updates.
PPO_SMALL = (
    "--num-envs 4 --num-steps 8 --minibatch-size 8 --update-epochs 2 --value-hidden 64 --lora-r 4 --num-objects 3 "
    "--goal-types grasp --log-frequency 32 --eval-frequency 0 --checkpoint-frequency 0 --checkpoint-dir ck "
    "--total-timesteps 96"
).split()


def states(n: int = 8) -> list[sg.State]:
    vec = pt.SyncVecPlaygroundText(n, seed=5, num_objects=4)
    obs, infos = vec.reset()
    obs, _, _, _, infos = vec.step([info["possible_actions"][0] for info in infos])
    return [sg.State(info["goal"], o, tuple(info["possible_actions"])) for o, info in zip(obs, infos)]


def ragged_states() -> list[sg.State]:
    """States of 5, 4, 2 and 1 actions with shared "Go to" prefixes: rows of different widths in one tree batch."""
    full = states()
    out = [*full[:3], full[3]._replace(actions=full[3].actions[1:])]
    out += [s._replace(actions=s.actions[:2]) for s in full[4:6]]
    return [*out, full[6]._replace(actions=full[6].actions[-1:]), full[7]]


def load_agent(model_dir: str, bf16: bool, device: torch.device):
    """An Agent as the scripts build it (LoRA B matrices made nonzero); None where bf16 is asked but not native."""
    args = sg.Args(model_id=model_dir, bf16=bf16)
    if bf16 and not sg.use_bf16(args, device):
        return None
    torch.manual_seed(0)
    llm, tok = sg.load_llm(args, device, torch.bfloat16 if bf16 else torch.float32)
    nonzero_lora(llm)
    return sg.Agent(llm, tok, args, max_actions=5, device=device)


def logp_one_action_at_a_time(llm, tok, state: sg.State, device: torch.device, bf16: bool) -> torch.Tensor:
    """Eq. 1-2 without the prefix tree: each action scored alone, as one ordinary sequence through the model's own
    forward (decoder-only: prompt + " " + action, causal; T5: the prompt into the encoder, the action as labels),
    the sum of its tokens' log-probs, then a softmax over the state's actions."""
    prompt = tok(pt.format_prompt(state.goal, state.observation), add_special_tokens=True).input_ids
    sums = []
    for action in state.actions:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if llm.config.is_encoder_decoder:
                ids = tok(action, add_special_tokens=True).input_ids  # T5's tokenizer ends the action with </s>
                labels = torch.tensor([ids], device=device)
                logits = llm(input_ids=torch.tensor([prompt], device=device), labels=labels).logits[0]
                rows = torch.arange(len(ids))
            else:
                ids = tok(" " + action, add_special_tokens=False).input_ids
                logits = llm(input_ids=torch.tensor([prompt + ids], device=device)).logits[0]
                rows = torch.arange(len(prompt) - 1, len(prompt) + len(ids) - 1)
        sums.append(logits.float().log_softmax(-1)[rows.to(device), torch.tensor(ids, device=device)].sum())
    return torch.stack(sums).log_softmax(-1).cpu()


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_tree_scoring_equals_each_action_scored_alone_on_cuda(family, precision, tiny_dirs):
    """The Agent's log pi of every action of a ragged batch of states (one pass, the prefix tree under its 4D
    attention mask) equals each action scored alone as an ordinary sequence, on cuda:0: within 1e-4 in fp32 and
    LOGP_TOL in bf16 (a CUDA attention kernel that mishandled the mask would break both precisions alike, which
    the bf16-vs-fp32 test cannot see)."""
    device = torch.device("cuda:0")
    agent = load_agent(tiny_dirs[family], precision == "bf16", device)
    if agent is None:
        pytest.skip("bf16 is not native on this GPU: the scripts run it in fp32")
    batch = ragged_states()
    with torch.no_grad():
        logp, _, _, valid = agent(batch)
    logp, valid = logp.cpu(), valid.cpu()
    assert logp.shape == (len(batch), max(len(s.actions) for s in batch))
    spread = 0.0
    for b, s in enumerate(batch):
        k = len(s.actions)
        alone = logp_one_action_at_a_time(agent.llm, agent.tokenizer, s, device, precision == "bf16")
        assert valid[b].tolist() == [True] * k + [False] * (logp.shape[1] - k)
        assert torch.all(logp[b, k:] == -math.inf)
        diff = (logp[b, :k] - alone).abs().max().item()
        assert diff < (FP32_TOL if precision == "fp32" else LOGP_TOL), f"state {b} ({k} actions): |tree - alone| = {diff}"
        spread = max(spread, (alone.max() - alone.min()).item())
    assert spread > 1.0, "every action scored alike: the comparison would prove nothing"


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_bf16_log_pi_and_q_match_fp32(family, tiny_dirs):
    """On cuda:0, bf16 (frozen weights bf16, autocast) gives the fp32 log pi to LOGP_TOL and Q to Q_TOL."""
    device = torch.device("cuda:0")
    out = {}
    for bf16 in (False, True):
        agent = load_agent(tiny_dirs[family], bf16, device)
        if agent is None:
            pytest.skip("bf16 is not native on this GPU: the scripts run it in fp32")
        assert agent.autocast == bf16
        with torch.no_grad():
            logp, q, _, valid = agent(states())
        out[bf16] = (logp.cpu(), q.cpu(), valid.cpu())
    (lp32, q32, valid), (lp16, q16, _) = out[False], out[True]
    assert (lp32 - lp16)[valid].abs().max() < LOGP_TOL
    assert (q32 - q16)[:, valid].abs().max() < Q_TOL


def assert_started_on_cuda(run, model_dir: str):
    """The run's start line (the first stdout line naming its model) says it runs on a CUDA device."""
    lines = [line for line in run.stdout.splitlines() if model_dir in line]
    assert lines and re.search(r"\bon cuda(:\d+)?\b", lines[0]), run.describe()


def assert_lora_moved(checkpoint: dict):
    """Training moved the adapters: every LoRA B matrix starts at zero, and none is zero in the checkpoint."""
    lora_b = {k: t for k, t in checkpoint["trainable"].items() if "lora_B" in k}
    assert lora_b, sorted(checkpoint["trainable"])
    assert all(t.abs().max() > 0 for t in lora_b.values()), [k for k, t in lora_b.items() if not t.any()]
    assert all(torch.isfinite(t).all() for t in checkpoint["trainable"].values())


@needs_cuda
def test_4bit_nf4_run_on_cuda_moves_its_lora_weights(runner, tiny_dirs):
    """sac_glam.py --load-in-4bit on cuda:0 (nf4 with bitsandbytes, QLoRA) says cuda in its start line, reaches
    updates past the critic warm-up, and its LoRA weights move (every lora_B, zero at init, is nonzero)."""
    model = tiny_dirs["llama"]
    run = runner.start("cuda_q4", [*SMALL, "--model-id", model, "--total-timesteps", 128, "--load-in-4bit"]).check()
    assert_started_on_cuda(run, model)
    ck = run.checkpoint()
    assert ck["args"]["load_in_4bit"] and ck["updates"] > ck["args"]["critic_warmup_updates"]
    assert_lora_moved(ck)


@needs_cuda
@pytest.mark.parametrize("script", ["sac_glam_her.py", "ppo_glam.py"])
def test_her_and_ppo_run_on_cuda(script, runner, tiny_dirs):
    """sac_glam_her.py and ppo_glam.py (not only sac_glam.py) run on cuda:0 in their default precision: the start
    line says cuda, the run reaches its updates, and its LoRA weights move."""
    model = tiny_dirs["llama"]
    small = HER_SMALL if script == "sac_glam_her.py" else PPO_SMALL
    cmd = [sys.executable, str(ROOT / script), *small, "--model-id", model]
    run = runner.start(f"cuda_{script[:-3]}", [], cmd=cmd).check()
    assert_started_on_cuda(run, model)
    ck = run.checkpoint()
    assert ck["updates"] > ck["args"].get("critic_warmup_updates", 0), ck["updates"]
    assert_lora_moved(ck)


WRAPPER = """
import os, runpy, sys, torch
script, out = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
g = runpy.run_path(script, run_name="__main__")
torch.save({"trainable": g["trainable_state"](g["agent"]), "device": str(g["device"])}, os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
"""


@needs_two_gpus
def test_two_rank_nccl_run_keeps_ranks_identical(runner, tiny_dirs, tmp_path_factory):
    """sac_glam.py under torchrun with 2 NCCL ranks: rank r runs on cuda:r, and both end with identical weights."""
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
    """On cuda:0 in fp32 (--no-bf16), a run stopped at 128 steps and resumed to 192 ends where the uninterrupted
    run does: same step and update counts, trainable weights within rtol 1e-3, atol 1e-5 (CUDA's atomic adds are
    not bit-reproducible; bf16 would add its own rounding to that)."""
    args = [*SMALL, "--model-id", tiny_dirs["llama"], "--no-bf16"]
    full = runner.start("cuda_full", [*args, "--total-timesteps", 192])
    half = runner.start("cuda_half", [*args, "--total-timesteps", 128]).check()
    resumed = runner.start("cuda_resumed", ["--resume", half.checkpoint_dir(), "--total-timesteps", 192], cwd=half.cwd).check()
    a, b = full.check().checkpoint(), resumed.checkpoint()
    assert not a["args"]["bf16"] and not b["args"]["bf16"]
    assert (a["global_step"], a["updates"]) == (b["global_step"], b["updates"])
    for k in a["trainable"]:
        assert torch.allclose(a["trainable"][k], b["trainable"][k], rtol=1e-3, atol=1e-5), k


# --------------------------------------------------------------------------------------------------
# The GPU report: a clean refusal without CUDA, its code path end to end on the CPU and on CUDA, its
# parameter count of a 4-bit model and the freeing of that model between rows
# --------------------------------------------------------------------------------------------------
GPU_REPORT = ROOT / "benchmarks" / "gpu_report.py"


def run_gpu_report(cwd, *args: str) -> str:
    """benchmarks/gpu_report.py with these arguments, in cwd: its stdout and stderr (it must exit 0)."""
    out = subprocess.run(
        [sys.executable, str(GPU_REPORT), *map(str, args)],
        cwd=cwd,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def report_rows(table: str) -> list[list[str]]:
    """The cells of the table's model rows (models are given as paths here)."""
    rows = [line for line in table.splitlines() if line.startswith(("| /", "| tiny"))]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_report_refuses_without_cuda(tmp_path):
    out = subprocess.run(
        [sys.executable, str(GPU_REPORT)], cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and out.stderr == ""
    assert out.stdout.count("\n") == 1 and "no CUDA device" in out.stdout
    assert not (tmp_path / "gpu_report.md").exists()


def test_gpu_report_dry_run_writes_its_table(tiny_dirs, tmp_path):
    run_gpu_report(tmp_path, "--cpu-dry-run", "--model-id", tiny_dirs["llama"], tiny_dirs["t5"], "--modes", "bf16")
    table = (tmp_path / "gpu_report.md").read_text()
    rows = report_rows(table)
    assert len(rows) == 2 and all(cells[1] == "bf16" for cells in rows), table
    for cells in rows:  # env steps/s, s/update and GPU-hours are positive numbers (memory: nan on the CPU)
        assert float(cells[3]) > 0 and float(cells[4]) > 0 and float(cells[6]) > 0, cells


@pytest.fixture(scope="module")
def gpu_report():
    """benchmarks/gpu_report.py as a module; the environment variables it sets on import are put back."""
    environ = dict(os.environ)
    sys.path.insert(0, str(GPU_REPORT.parent))
    try:
        import gpu_report
    finally:
        sys.path.remove(str(GPU_REPORT.parent))
        os.environ.clear()
        os.environ.update(environ)
    return gpu_report


def test_gpu_report_counts_4bit_weights_and_frees_the_model_before_its_next_row(gpu_report, tiny_dirs, one_thread):
    """A 4-bit row of the report counts the parameters of the fp32 model (bitsandbytes packs two 4-bit values per
    byte), and when the row is done no 4-bit weight or module of its model is left for the next row's peak."""
    import bitsandbytes as bnb

    cpu = torch.device("cpu")
    model = tiny_dirs["llama"]
    fp32, _ = sg.load_llm(sg.Args(model_id=model, cuda=False, bf16=False), cpu)
    q4, _ = sg.load_llm(sg.Args(model_id=model, cuda=False, bf16=False, load_in_4bit=True), cpu)
    n_fp32 = sum(p.numel() for p in fp32.parameters())
    assert sum(isinstance(p, bnb.nn.Params4bit) for p in q4.parameters()) == 2 * 7  # q k v o gate up down, 2 layers
    assert sum(p.numel() for p in q4.parameters()) < n_fp32  # what a plain count of the packed weights gives
    assert gpu_report.parameter_count(q4) == gpu_report.parameter_count(fp32) == n_fp32
    del fp32, q4
    gc.collect()

    def live_4bit() -> int:
        return sum(isinstance(o, (bnb.nn.Params4bit, bnb.nn.Linear4bit)) for o in gc.get_objects())

    assert live_4bit() == 0
    opts = argparse.Namespace(
        num_envs=4, batch_size=8, update_chunk_size=8, score_chunk_size=8, acting_steps=1, updates=1, warmup=1
    )
    batch = gpu_report.replay_batch(opts.batch_size, seed=0, num_envs=opts.num_envs)
    gc.disable()  # only the report's own collection may free the model's reference cycles
    try:
        row = gpu_report.measure(model, "4bit", opts, cpu, batch)
        left = live_4bit()
    finally:
        gc.enable()
    assert row["params"] == n_fp32 and row["sps"] > 0 and row["update"] > 0
    assert left == 0, f"{left} 4-bit weights or modules outlive their row"


@needs_cuda
def test_gpu_report_runs_on_cuda(tmp_path):
    """benchmarks/gpu_report.py end to end on cuda:0 with a small random Llama (2.6M parameters, LoRA included) in 4-bit and bf16:
    its header names the GPU, both rows show the fp32 model's parameter count (packed 4-bit weights counted as their
    values), and speeds, seconds per update and peak memory are positive numbers."""
    import tiny_models

    model = tiny_models.save_tiny_causal(tmp_path / "llama256", hidden_size=256, num_layers=4)
    fp32, _ = sg.load_llm(sg.Args(model_id=model, cuda=False, bf16=False), torch.device("cpu"))
    params = f"{sum(p.numel() for p in fp32.parameters()) / 1e6:.1f}M"
    small = "--num-envs 4 --batch-size 16 --update-chunk-size 8 --acting-steps 2 --updates 2 --warmup 1".split()
    run_gpu_report(tmp_path, "--model-id", model, "--modes", "4bit", "bf16", *small, "--out", "report.md")
    table = (tmp_path / "report.md").read_text()
    assert table.startswith("GPU report: ") and "CPU" not in table.splitlines()[0], table
    rows = report_rows(table)
    assert [cells[1] for cells in rows] == ["4bit", "bf16"], table
    assert [cells[2] for cells in rows] == [params, params], table
    for cells in rows:
        sps, per_update, peak, hours = (float(cells[i]) for i in (3, 4, 5, 6))
        assert sps > 0 and per_update > 0 and 0 < peak < 100 and hours > 0, cells
