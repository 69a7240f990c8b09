"""A learning result on an env nobody here wrote: BabyAI as text (examples/babyai_text.py over minigrid).

    pip install matplotlib                       # benchmark-only requirement (the training scripts never plot)
    python benchmarks/babyai_learning.py         # 3 algorithms x 2 seeds, 2 runs at a time on 2 cores
    python benchmarks/babyai_learning.py --quick      # smoke check, one seed, short runs, into --work-dir
    python benchmarks/babyai_learning.py --plot-only  # figure and table from the logs in --work-dir

sac_glam_her.py, sac_glam.py and ppo_glam.py are copied with only their env import line changed (to
`import babyai_text as textenv`, as a researcher would) and train a tiny random decoder-only transformer
(hidden 64, 2 layers, tests/tiny_models.py) on a word-level tokenizer of the level's words, with
learning_curves.py's tiny-actor settings (its docstring says why each differs from Tables 1-3), on one BabyAI
level (default GoToLocal: one room, 8 objects, "go to the <color> <type>", 64 steps per episode). The runs are
resumable pieces as in learning_curves.py. Each ends with an evaluation on training and held-out test missions
(greedy and sampled). References: a uniformly random policy over GLAM's six actions, and a random policy over
the three moves only (turn left, turn right, go forward), which never wastes a step on pick up / drop / toggle.
Writes docs/babyai_learning.{png,md} from benchmarks/babyai_learning_runs.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

import learning_curves as lc

sys.path.insert(0, str(lc.ROOT / "examples"))
import babyai_text  # noqa: E402

MOVES = ("turn left", "turn right", "go forward")
EVAL_EPISODES = 128  # per split x greedy/sampled, at the end of each run
# Curves start where each of the 32 envs has ended two episodes (64 steps at most each): before, the rolling window
# holds mostly the episodes that ended early, which are successes.
FIRST_STEP = 2 * 64 * 32


@dataclasses.dataclass
class Args:
    level: str = "BabyAI-GoToLocal-v0"
    """the BabyAI level (examples/babyai_text.py's LEVELS)"""
    algos: tuple[Literal["sac_glam_her", "sac_glam", "ppo_glam"], ...] = tuple(lc.ALGOS)
    """algorithms to run in this call (the figure shows every algorithm with logs)"""
    seeds: tuple[int, ...] = (1, 2)
    """seeds to run in this call"""
    steps: int = 40_960
    """env steps per run"""
    jobs: int = 2
    """runs at a time, sharing the cores evenly"""
    max_minutes: float = 110.0
    """wall clock of this call's runs: then they are stopped with SIGTERM (checkpoint) and resume on the next call"""
    random_episodes: int = 2000
    """episodes of each random reference policy"""
    quick: bool = False
    """smoke check: seed 1, 8,192 env steps per run, into --work-dir"""
    fresh: bool = False
    """wipe --work-dir first"""
    work_dir: str = str(lc.ROOT / "benchmarks" / "babyai_learning_runs")
    """runs/ (TensorBoard), checkpoints/, logs/, scripts/ (the copies), model/"""
    plot_only: bool = False
    """skip the runs: redraw the figure and table from the logs in --work-dir"""


def copy_scripts(directory: Path) -> dict[str, Path]:
    """Each script with its env import pointed at babyai_text, nothing else changed."""
    directory.mkdir(parents=True, exist_ok=True)
    copies = {}
    for algo in lc.ALGOS:
        source = (lc.ROOT / f"{algo}.py").read_text()
        line = next(line for line in source.splitlines() if line.startswith("import playground_text as textenv"))
        copies[algo] = directory / f"{algo}.py"
        copies[algo].write_text(source.replace(line, "import babyai_text as textenv"))
    return copies


def build_model(path: Path, level: str) -> str:
    from transformers.utils import logging as hf_logging

    from tests.tiny_models import make_env_tokenizer, save_tiny_causal, words_of_env

    hf_logging.disable_progress_bar()
    tokenizer = make_env_tokenizer(words=words_of_env(babyai_text, episodes=200, level=level))
    return save_tiny_causal(path, hidden_size=64, num_layers=2, num_heads=4, tokenizer=tokenizer, seed=0)


def random_policy(level: str, actions: tuple[str, ...], episodes: int, seed: int = 0) -> float:
    """Success rate of a policy that picks uniformly among `actions`, on training missions."""
    env, rng = babyai_text.BabyAIText(level, seed=seed), np.random.default_rng(seed)
    wins = 0
    for _ in range(episodes):
        env.reset()
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(str(rng.choice(actions)))
            done = terminated or truncated
        wins += info["success"]
    return wins / episodes


def report(args: Args, runs: dict[str, list[dict]], references: dict[str, float], figure: Path, table: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    head = ["algorithm", "seeds", "env steps to 50%", "env steps to 80%", "area", "final success"]
    head += [f"eval {e}" for e in lc.EVALS] + ["precision", "commit", "machine"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    end = min(r["steps"][0][-1] for seeds in runs.values() for r in seeds)
    if end <= FIRST_STEP:
        sys.exit(f"error: the runs reach {end:,.0f} env steps; the curves start at {FIRST_STEP:,}")

    def pm(values):
        if not values:
            return "-"
        return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    for algo, seeds in runs.items():
        label, color = lc.ALGOS[algo]
        g, m, s = lc.mean_curve([r["steps"] for r in seeds], start=FIRST_STEP)
        n = len(seeds)
        ax.plot(g, m, color=color, label=f"{label} ({n} seed{'s' * (n > 1)}{', mean +- std' * (n > 1)})")
        if n > 1:
            ax.fill_between(g, m - s, m + s, color=color, alpha=0.2)
        grid = np.linspace(FIRST_STEP, end, 200)
        reach = [lc.first_reach(g, m, t) for t in lc.THRESHOLDS]
        cells = [label, n, *("not reached" if x is None else f"{x:,.0f}" for x in reach)]
        cells += [pm([np.interp(grid, *r["steps"]).mean() for r in seeds]), pm([r["steps"][1][-1] for r in seeds])]
        cells += [pm([r[e][1][-1] for r in seeds if len(r[e][1])]) for e in lc.EVALS]
        cells += [", ".join(sorted({r[k] for r in seeds})) for k in ("precision", "commit", "machine")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    for (name, value), style in zip(references.items(), ((0, (6, 4)), (0, (1, 2)))):
        ax.axhline(value, color="black", linestyle=style, linewidth=1.2, label=f"{name} ({value:.2f})")
        lines.append(f"| {name} | {args.random_episodes:,} episodes | - | - | {value:.2f} | {value:.2f} |" + " |" * 7)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_xlabel(f"env steps (from {FIRST_STEP:,}: each env has ended two episodes)")
    ax.set_ylabel("success rate (last 100 training episodes)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{args.level} as text (examples/babyai_text.py); tiny random transformer actor", fontsize=10)
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    import torch

    lines += [
        "",
        f"Env steps per run: {args.steps:,} (a run still going shows as far as it got). Area = the mean rolling success",
        f"over env steps {FIRST_STEP:,} (each env has ended two episodes) to {end:,.0f} (the shortest run's end); reaching",
        "= the first point from there where the seed mean of the rolling success (last 100 training episodes, sampled",
        "actions) is at or above the threshold; final = its",
        f"last logged value; eval = {EVAL_EPISODES} episodes at the end of each run, on training and held-out test",
        "missions (examples/babyai_text.py's HELD_OUT pairs), greedy or sampled actions; mean ± std over seeds.",
        f"Drawn on: {lc.cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}.",
    ]
    table.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.level not in babyai_text.LEVELS:
        sys.exit(f"error: --level {args.level}: choose from {', '.join(babyai_text.LEVELS)}")
    if args.quick:
        args.seeds, args.steps = (1,), 8192
    work = Path(args.work_dir).resolve()
    out_dir = work if args.quick else lc.ROOT / "docs"  # a smoke check never overwrites the committed results
    if not args.plot_only:
        if args.fresh:
            shutil.rmtree(work, ignore_errors=True)
        copies = copy_scripts(work / "scripts")
        model = build_model(work / "model", args.level)
        settings = lc.Args()  # the tiny actor's settings of learning_curves.py

        def command_of(algo: str, seed: int) -> list[str]:
            last = args.steps // lc.PPO_ROLLOUT * lc.PPO_ROLLOUT if algo == "ppo_glam" else args.steps
            cmd = [sys.executable, str(copies[algo]), "--seed", str(seed), "--total-timesteps", str(args.steps)]
            cmd += ["--exp-name", algo, "--level", args.level, "--eval-frequency", str(last)]
            return cmd + ["--eval-episodes", str(EVAL_EPISODES), *lc.tiny_settings(algo, model, settings)]

        # The copies import babyai_text from examples/, which imports playground_text from the root.
        os.environ["PYTHONPATH"] = os.pathsep.join([str(lc.ROOT / "examples"), str(lc.ROOT)])
        t0 = time.time()
        lc.run_all(args, work, list(args.seeds), command_of, babyai_text.NAME)
        lc.log(f"runs took {(time.time() - t0) / 60:.0f} min")
    runs = lc.load_runs(work, babyai_text.GOAL_TYPES, babyai_text.NAME)
    if not runs:
        sys.exit(f"error: no TensorBoard logs under {work}/runs: run without --plot-only first")
    lc.log(f"random policies over {args.random_episodes:,} episodes each")
    references = {
        "uniform random policy (6 actions)": random_policy(args.level, babyai_text.ACTIONS, args.random_episodes),
        "random moves only (3 actions)": random_policy(args.level, MOVES, args.random_episodes),
    }
    report(args, runs, references, out_dir / "babyai_learning.png", out_dir / "babyai_learning.md")
    lc.log(f"wrote {out_dir}/babyai_learning.png and .md")
