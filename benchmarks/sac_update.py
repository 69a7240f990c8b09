"""SAC-GLAM's update, variant by variant: which of the authors' choices stop the collapse after the critic warm-up,
and how long must the actor wait?

    python benchmarks/sac_update.py                                    # the table (docs/sac_update.md) from the logs
    python benchmarks/sac_update.py --variants long_wait --seeds 2     # run (or resume) pieces, one run at a time
    python benchmarks/learning_curves.py --actor smollm2 --algos sac_glam --seeds 3   # a short_wait run (see below)

sac_glam.py on the pretrained SmolLM2 actor with benchmarks/learning_curves.py's --actor smollm2 settings (the
simplified env of Appendix B, batch 64, 1 gradient update per 32 env steps, Table 2's alpha 0.005, the collapse
case), to --steps env steps, one run at a time on every core, in resumable pieces of --max-minutes (SIGTERM: the
script saves; the next call resumes). Each variant adds flags on top of those settings. Every variant but
short_wait has the long wait (LONG_WAIT: learning starts 2,048, 125 critic-only updates, the actor from 6,048 env
steps); short_wait has the scripts' own (learning starts 256, 10 critic-only updates at this update frequency, the
actor from 576 env steps: the first author's code waits for one batch of 256 and 10 update rounds).
warmup_llm, separate and target_llm ran at commit 4e1401e (RUN_COMMIT), where their flags exist: from 2d6d2a3 on
the scripts have target_llm's update as their only one, without flags, so running those needs a worktree of that
commit (long_wait runs from this one):

    git worktree add ../sac_update_wt 4e1401e && cd ../sac_update_wt
    python benchmarks/sac_update.py --variants separate --seeds 3 --work-dir <this checkout>/benchmarks/sac_update_runs

"heads_only" is 2f9516f's update (its warm-up trained the Q heads only): its runs are learning_curves.py's SmolLM2
SAC-GLAM seeds at 2f9516f (benchmarks/learning_curves_smollm2_runs_2f9516f), cut at --steps. "short_wait" is the
scripts as they ship, so its runs are learning_curves.py's SmolLM2 SAC-GLAM runs (benchmarks/learning_curves_smollm2_runs,
the same command): run them there, and both studies read them. The variants run in
bf16 where the CPU has it, as those did and as learning_curves.py's SmolLM2 runs do. The table (docs/sac_update.md)
gives per run: the env step where the actor starts, area under the rolling success curve, success at the end and
its lowest value after the actor starts, the policy's lowest entropy after it, Q of the taken actions when the actor
starts and at the end, qf_loss over the last 2,048 env steps, and seconds per gradient update (median, warm-up and
after).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_curves as lc  # noqa: E402

# variant -> (what it changes, flags added to learning_curves.py's SmolLM2 command at RUN_COMMIT). Cumulative, in this
# order; None: the long wait with no flag (heads_only). LONG_WAIT: the wait of every variant before short_wait.
LONG_WAIT = ["--learning-starts", "2048", "--critic-warmup-updates", "125"]
VARIANTS = {
    "heads_only": (
        "2f9516f's update: warm-up trains the critic heads only; one summed step; target heads on the live LLM",
        None,
    ),
    "warmup_llm": ("+ the warm-up trains the critic through the LLM (Section 2.2, Appendix B)", LONG_WAIT),
    "separate": ("+ separate critic and actor steps, each its own Adam", ["--separate-steps", *LONG_WAIT]),
    "target_llm": ("+ the target critic lags the LLM too (target adapters)", ["--separate-steps", "--target-llm", *LONG_WAIT]),
    "long_wait": ("target_llm's update without flags (the scripts' default from 2d6d2a3 on), the long wait", LONG_WAIT),
    "short_wait": ("the scripts as they ship: long_wait's update, learning starts 256, 10 warm-up updates", []),
}
RUN_COMMIT = "4e1401e"
AT_RUN_COMMIT = ("warmup_llm", "separate", "target_llm")  # their flags exist at RUN_COMMIT only; the others' after it
# Variants whose runs are learning_curves.py's SmolLM2 SAC-GLAM runs: read from there, never run here.
RUNS_OF = {
    "heads_only": lc.ROOT / "benchmarks" / "learning_curves_smollm2_runs_2f9516f",
    "short_wait": lc.ROOT / "benchmarks" / "learning_curves_smollm2_runs",
}


@dataclasses.dataclass
class Args:
    variants: tuple[str, ...] = ()
    """variants to run in this call (none: the table only; it shows every variant with logs)"""
    seeds: tuple[int, ...] = (2,)
    """seeds to run in this call"""
    steps: int = 10_240
    """env steps per run (the collapse is at 7-9k env steps)"""
    max_minutes: float = 110.0
    """wall clock of this call: then the running run is stopped with SIGTERM (checkpoint) and resumes next call"""
    work_dir: str = str(lc.ROOT / "benchmarks" / "sac_update_runs")
    """logs/, runs/ (TensorBoard), checkpoints/, done/"""
    table: str = str(lc.ROOT / "docs" / "sac_update.md")
    """output Markdown table"""
    plot_only: bool = False
    """skip the runs: write the table from the logs in --work-dir"""


ROW_KEYS = (
    "reached",
    "actor from",
    "lowest after learning starts",
    "area",
    "end",
    "lowest after warm-up",
    "lowest entropy after warm-up",
    "Q warm-up end",
    "Q end",
    "qf_loss last 2k",
    "s/update warm-up",
    "s/update after",
)


def run(args: Args, work: Path):
    """Each selected (variant, seed) not done yet, one at a time, resumed from its checkpoint if it has one."""
    old = "separate_steps:" in (lc.ROOT / "sac_glam.py").read_text()
    wrong = [name for name in args.variants if VARIANTS[name][1] is not None and (name in AT_RUN_COMMIT) != old]
    if wrong:
        where = "a commit after" if old else "a worktree of commit"
        sys.exit(f"error: --variants {' '.join(wrong)} run from {where} {RUN_COMMIT} (see --help)")
    for sub in ("logs", "done"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    threads = str(os.cpu_count() or 1)
    env = dict(os.environ, OMP_NUM_THREADS=threads, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    deadline = time.time() + args.max_minutes * 60
    for seed in args.seeds:
        for name in args.variants:
            if name in RUNS_OF or (work / "done" / f"{name}_{seed}").exists():
                continue
            cmd = lc.command("sac_glam", seed, args.steps, "", lc.Args(actor="smollm2")) + VARIANTS[name][1]
            cmd[cmd.index("--exp-name") + 1] = f"sac_glam_{name}"
            found = sorted(glob.glob(str(work / "checkpoints" / f"PlaygroundText__sac_glam_{name}__{seed}__*")))
            cmd += ["--resume", found[-1]] if found else []
            with open(work / "logs" / f"{name}_{seed}.log", "a") as out:
                out.write(f"# {'resume' if found else 'start'} at commit {lc.COMMIT}, {threads} threads, {lc.cpu_name()}\n")
                out.flush()
                lc.log(f"{'resumed' if found else 'started'} {name} seed {seed}")
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
                while proc.poll() is None:
                    time.sleep(2)
                    if time.time() > deadline:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait()
                        lc.log(f"--max-minutes reached: paused {name} seed {seed} (run again to resume)")
                        return
            if proc.returncode != 0:
                sys.exit(f"error: {name} seed {seed} failed (exit {proc.returncode}); see {work}/logs/")
            (work / "done" / f"{name}_{seed}").touch()
            lc.log(f"done {name} seed {seed}")


def summary(run_dir: str, steps: int, wait: tuple[int, int]) -> dict[str, str]:
    """One run's row, from its TensorBoard events cut at `steps` env steps; wait: (learning starts, actor from)."""
    learning_starts, warmup_end = wait

    def cut(tag: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = lc.scalars(run_dir, tag)
        return x[x <= steps], y[x <= steps]

    x, success = cut("charts/success_rate")
    grid = np.linspace(0, steps, 200)
    after = x > warmup_end
    ex, entropy = cut("losses/entropy")
    qx, q = cut("losses/qf1_values")
    lx, qf_loss = cut("losses/qf_loss")
    sx, sec = cut("charts/seconds_per_update")

    def q_at(step: float) -> str:
        return f"{q[np.searchsorted(qx, step)]:.3f}" if len(q) and qx[-1] >= step else "-"

    def median(mask) -> str:
        return f"{np.median(sec[mask]):.1f}" if len(sec) and mask.any() else "not logged"

    return {
        "reached": f"{int(x[-1]):,}",
        "actor from": f"{warmup_end:,}",
        "area": f"{np.interp(grid, x, success).mean():.3f}" if x[-1] >= steps else "-",
        "end": f"{success[-1]:.2f}",
        "lowest after learning starts": f"{success[x > learning_starts].min():.2f}",
        "lowest after warm-up": f"{success[after].min():.2f}" if after.any() else "-",
        "lowest entropy after warm-up": f"{entropy[ex > warmup_end].min():.2f}" if (ex > warmup_end).any() else "-",
        "Q warm-up end": q_at(warmup_end),
        "Q end": f"{q[-1]:.3f}" if len(q) else "-",
        "qf_loss last 2k": f"{qf_loss[lx > x[-1] - 2048].mean():.4f}" if len(qf_loss) else "-",
        "s/update warm-up": median(sx <= warmup_end) if len(sx) else "not logged",
        "s/update after": median(sx > warmup_end) if len(sx) else "not logged",
    }


def wait(flags: list[str]) -> tuple[int, int]:
    """The env steps where the variant's updates start and its actor starts (warm-up updates: one per 32 env steps)."""
    value = {"--learning-starts": 256, "--critic-warmup-updates": 10}  # learning_curves.py's SmolLM2 settings
    value |= {flag: int(flags[flags.index(flag) + 1]) for flag in value if flag in flags}
    return value["--learning-starts"], value["--learning-starts"] + value["--critic-warmup-updates"] * 32


def write_table(args: Args, work: Path):
    lines = [
        f"| variant | seed | {' | '.join(ROW_KEYS)} | precision | commit | machine |",
        "|---|---|" + "---|" * len(ROW_KEYS) + "---|---|---|",
    ]
    for name, (what, _) in VARIANTS.items():
        base, algo = (RUNS_OF[name], "sac_glam") if name in RUNS_OF else (work, f"sac_glam_{name}")
        for run_dir in sorted(glob.glob(str(base / "runs" / f"PlaygroundText__{algo}__*"))):
            seed = Path(run_dir).name.split("__")[2]
            flags = VARIANTS[name][1]
            row = summary(run_dir, args.steps, wait(LONG_WAIT if flags is None else flags))
            info = lc.run_log(base, "sac_glam" if name in RUNS_OF else name, seed)
            lines.append(
                f"| {name} | {seed} | {' | '.join(row[k] for k in ROW_KEYS)} | {info['precision']} | {info['commit']} | "
                f"{info['machine']} |"
            )
    legend = "\n".join(f"- **{name}**: {what}" for name, (what, _) in VARIANTS.items())
    text = (
        f"SAC-GLAM's update, variant by variant (benchmarks/sac_update.py): SmolLM2, simplified env, alpha 0.005, "
        f"batch 64, 1 gradient update per 32 env steps, cut at {args.steps:,} env steps; the actor starts after "
        f"the variant's wait (learning starts + critic-only updates: the 'actor from' column).\n\n"
        f"{legend}\n\n" + "\n".join(lines) + "\n"
    )
    Path(args.table).write_text(text)
    print(text)


if __name__ == "__main__":
    args = tyro.cli(Args)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"error: unknown --variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    elsewhere = [name for name in args.variants if name in RUNS_OF]
    if elsewhere and not args.plot_only:
        sys.exit(
            f"error: --variants {' '.join(elsewhere)} are learning_curves.py's SmolLM2 SAC-GLAM runs: run them with "
            f"`python benchmarks/learning_curves.py --actor smollm2 --algos sac_glam --seeds ...` (heads_only: at 2f9516f)"
        )
    work = Path(args.work_dir)
    if not args.plot_only:
        run(args, work)
    write_table(args, work)
