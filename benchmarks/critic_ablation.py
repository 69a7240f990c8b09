"""Figure 5 (Appendix B) with the pretrained actor: the critic's input (obs-action or obs) x its gradient path (through
the shared LLM or the MLP head only), sac_glam.py on SmolLM2 at the SmolLM2 study's settings.

    python benchmarks/critic_ablation.py --seeds 2 3 --max-minutes 150   # CPU: one run at a time (~1-1.5 h), resumable
    python benchmarks/critic_ablation.py --device cuda                    # all 3 configurations x 2 seeds at once, one GPU
    python benchmarks/critic_ablation.py --plot-only                      # figure and table from the runs so far

A run is learning_curves.py's SmolLM2 sac_glam.py command (Appendix B's simplified env, 10,240 env steps, bf16, batch
64, 1 update per 32 env steps, 10 critic warm-up updates) plus its configuration's flags. The shipped configuration
(obs-action, through the LLM) adds none: its runs are that study's SAC-GLAM runs, read from there, never run here.
The other three run as learning_curves.py's runs do (resumable pieces of --max-minutes; on the CPU one at a time on
every core, only where bf16 is native). Writes docs/critic_ablation.png (Figure 5's panels) and .md (per configuration,
and Figure 5's comparisons as differences in area under the success curve, tested as learning_curves.py's claims).
--device cuda keeps its machine apart, as learning_curves.py does: its runs go to benchmarks/critic_ablation_cuda_runs,
its shipped configuration is the study's CUDA runs (learning_curves_smollm2_cuda_runs), its outputs docs/critic_ablation_cuda.*.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_curves as lc  # noqa: E402

# configuration -> (critic input, gradient path, flags added to the study's command). Appendix B: "obs-action" is one
# Q per prompt + action (the scripts' default), "obs" one Q per action slot from the prompt; "llm" back-propagates the
# critic loss into the shared LLM (the default), "head" into the MLP head only.
CONFIGS = {
    "obsaction_llm": ("obs-action", "llm", []),
    "obs_llm": ("obs", "llm", ["--critic-input", "obs"]),
    "obsaction_head": ("obs-action", "head", ["--no-critic-grad-llm"]),
    "obs_head": ("obs", "head", ["--critic-input", "obs", "--no-critic-grad-llm"]),
}
SHIPPED = "obsaction_llm"
INPUTS = {
    "obs-action": ("obs-action input (one Q per prompt + action)", "tab:blue"),
    "obs": ("obs input (one Q per action)", "tab:orange"),
}
PATHS = {"head": "gradients into the MLP head only", "llm": "gradients through the LLM (shared weights)"}
STEPS, WARMUP_END = lc.STEPS["smollm2"][0], 256 + 10 * 32  # the actor's first step: learning starts + 10 rounds of 32
RANDOM_EPISODES = 4000  # of the uniformly random policy, as learning_curves.py's
TAGS = {"success": "charts/success_rate", "grasp": "charts/success_rate_grasp", "grow": "charts/success_rate_grow"}
TAGS |= {"entropy": "losses/entropy", "q": "losses/qf1_values", "sec": "charts/seconds_per_update"}
# Figure 5's comparisons: obs-action vs obs within each panel, then through the LLM vs head only within each input.
COMPARISONS = [("obsaction_head", "obs_head"), ("obsaction_llm", "obs_llm"), ("obsaction_llm", "obsaction_head")]
COMPARISONS += [("obs_llm", "obs_head")]
INTRO = (
    f"Critic architectures (Figure 5, Appendix B), benchmarks/critic_ablation.py: sac_glam.py on SmolLM2 at the SmolLM2 "
    f"study's settings ({STEPS:,} env steps, bf16, batch 64, 1 update per 32 env steps, the actor from {WARMUP_END}). Area:"
    " the mean rolling success (last 100 training episodes) from env step 0 to the shortest run's end; 50%: on the seed-"
    "mean curve; other cells: the mean over seeds (each seed's); Q end: Q of the taken actions, last logged; s/update: "
    "median of the logged seconds per gradient update.\n\n"
)
Config = Literal["obsaction_llm", "obs_llm", "obsaction_head", "obs_head"]


@dataclasses.dataclass
class Args:
    configs: tuple[Config, ...] = ("obs_llm", "obsaction_head", "obs_head")
    """configurations to run in this call (obsaction_llm is the SmolLM2 study's: run it with learning_curves.py)"""
    seeds: tuple[int, ...] = (2, 3)
    """seeds to run in this call (Figure 5 has two)"""
    device: Literal["cpu", "cuda"] = "cpu"
    """cpu: one run at a time on every core; cuda: every selected run at once on one CUDA device"""
    max_minutes: float = 110.0
    """wall clock of this call: then the runs get SIGTERM (they checkpoint) and resume next call"""
    work_dir: str | None = None
    """logs/, runs/ (TensorBoard), checkpoints/, done/ of the three configurations run here (default:
    benchmarks/critic_ablation[_cuda]_runs)"""
    figure: str | None = None
    """output figure (default: docs/critic_ablation[_cuda].png)"""
    table: str | None = None
    """output Markdown table (default: docs/critic_ablation[_cuda].md)"""
    plot_only: bool = False
    """skip the runs: figure and table from the logs"""


def exp_name(config: str) -> str:
    return "sac_glam" if config == SHIPPED else f"sac_glam_{config}"


def command(exp: str, seed: int, device: str = "cpu") -> list[str]:
    """The study's sac_glam.py command with the configuration's flags and exp-name (run_all calls it with exp-names)."""
    cmd = lc.command("sac_glam", seed, STEPS, "", lc.Args(actor="smollm2", device=device))
    cmd[cmd.index("--exp-name") + 1] = exp
    return cmd + CONFIGS[exp.removeprefix("sac_glam_")][2]


def load_runs(work: Path, shipped: Path, seeds: tuple[int, ...]) -> dict[str, list[dict]]:
    """Every run with a logged success, per configuration: its curves (success under "steps", as lc.claim reads it)."""
    runs: dict[str, list[dict]] = {}
    for config in CONFIGS:
        base = shipped if config == SHIPPED else work
        for run_dir in sorted(base.glob(f"runs/PlaygroundText__{exp_name(config)}__*")):
            seed = run_dir.name.split("__")[2]
            if int(seed) not in seeds:  # the study has more seeds of the shipped configuration than Figure 5's
                continue
            run = {key: lc.scalars(str(run_dir), tag) for key, tag in TAGS.items()}
            run |= {"seed": seed, "steps": run.pop("success"), **lc.run_log(base, exp_name(config), seed)}
            if len(run["steps"][0]):
                runs.setdefault(config, []).append(run)
    return runs


def label(config: str) -> str:
    critic_input, path, _ = CONFIGS[config]
    return f"{critic_input}, {'through the LLM' if path == 'llm' else 'head only'}"


def cell(values: list[float], digits: int = 2) -> str:
    """The mean over seeds, then each seed's value."""
    if not values:
        return "-"
    each = ", ".join(f"{v:.{digits}f}" for v in values)
    return each if len(values) == 1 else f"{np.mean(values):.{digits}f} ({each})"


def seconds(run: dict, warmup: bool) -> np.ndarray:
    x, y = run["sec"]
    return y[(x <= WARMUP_END) == warmup]


def figure(path: str, runs: dict[str, list[dict]], chance: float):
    """Figure 5's layout: left the head-only critic, right through the LLM; obs-action blue, obs orange; the mean and
    std over seeds (Figure 5: two seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, grad in zip(axes, ("head", "llm")):
        for config in [c for c, (_, g, _) in CONFIGS.items() if g == grad and c in runs]:
            seeds, (name, color) = runs[config], INPUTS[CONFIGS[config][0]]
            g, m, s = lc.mean_curve([r["steps"] for r in seeds])
            n = len(seeds)
            ax.plot(g, m, color=color, label=f"{name} ({n} seed{'s' * (n > 1)}{', mean +- std' * (n > 1)})")
            if n > 1:
                ax.fill_between(g, m - s, m + s, color=color, alpha=0.2)
        if not any(CONFIGS[c][1] == grad for c in runs):
            ax.text(0.5, 0.5, "no run yet", transform=ax.transAxes, ha="center", color="gray")
        ax.axhline(chance, color="black", linestyle=(0, (6, 4)), linewidth=1.2, label=f"random policy ({chance:.2f})")
        ax.set(title=PATHS[grad], xlabel="env steps", xlim=(0, STEPS), ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("success rate (last 100 training episodes)")
    every = [r for seeds in runs.values() for r in seeds]
    commits = ", ".join(sorted({c for r in every for c in r["commit"].split(", ")})) or "none"
    precision = ", ".join(sorted({r["precision"] for r in every}))
    fig.suptitle(f"Critic architectures (Figure 5), SmolLM2-135M-Instruct actor (LoRA), {precision}; runs at commit {commits}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def table(path: str, runs: dict[str, list[dict]], random: dict[str, float]) -> str:
    end = min((r["steps"][0][-1] for seeds in runs.values() for r in seeds), default=STEPS)
    grid = np.linspace(0, end, 200)  # lc.claim's area: the mean rolling success over env steps 0 to `end`
    head = ["critic", "seeds", "env steps reached", f"area 0-{end:,.0f}", "env steps to 50%", "final success"]
    head += ["final grasp", "final grow", f"lowest entropy after {WARMUP_END}", "Q end", "s/update warm-up"]
    head += ["s/update training", "precision", "commit", "machine"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, seeds in runs.items():
        g, m, _ = lc.mean_curve([r["steps"] for r in seeds])  # the seed-mean curve, to the shortest run's end
        reach = lc.first_reach(g, m, 0.5)
        after = [r["entropy"][1][r["entropy"][0] > WARMUP_END] for r in seeds]  # once the actor learns (Section 2.2)
        cells = [label(config), ", ".join(r["seed"] for r in seeds), ", ".join(f"{r['steps'][0][-1]:,.0f}" for r in seeds)]
        cells += [cell([np.interp(grid, *r["steps"]).mean() for r in seeds], 3)]
        cells += ["not reached" if reach is None else f"{reach:,.0f}"]
        cells += [cell([r[k][1][-1] for r in seeds if len(r[k][1])]) for k in ("steps", "grasp", "grow")]
        cells += [cell([h.min() for h in after if len(h)]), cell([r["q"][1][-1] for r in seeds if len(r["q"][1])], 3)]
        cells += [cell([np.median(seconds(r, w)) for r in seeds if len(seconds(r, w))], 1) for w in (True, False)]
        cells += [", ".join(sorted({r[k] for r in seeds})) for k in ("precision", "commit", "machine")]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["random policy", f"{RANDOM_EPISODES:,} episodes", "-", f"{random['all']:.3f}", "not reached"]
    cells += [f"{random[k]:.2f}" for k in ("all", "grasp", "grow")] + ["-"] * 7
    lines += ["| " + " | ".join(cells) + " |", "", "Figure 5's comparisons, as differences in area over seeds:", ""]
    labels = {config: label(config) for config in CONFIGS}
    for a, b in COMPARISONS:
        missing = f"- {labels[a]} - {labels[b]}: no runs of both yet."
        lines.append(lc.claim(runs, a, b, labels=labels) if a in runs and b in runs else missing)
    lines += ["", "With 2 seeds per configuration no difference can be significant (2 vs 2 seeds allow p >= 0.33).", ""]
    lines += ["Cost: the head-only critic skips the backward pass through the LLM in the critic step. Median seconds per"]
    lines += [f"training update (env step > {WARMUP_END}, all seeds), head only / through the LLM:", ""]
    for llm, head_only in COMPARISONS[2:]:
        both = [runs.get(head_only, []), runs.get(llm, [])]
        sec = [np.concatenate([seconds(r, False) for r in seeds] or [np.zeros(0)]) for seeds in both]
        if not all(len(s) for s in sec):
            lines.append(f"- {CONFIGS[llm][0]}: no runs of both yet.")
            continue
        machines = {r["machine"] for seeds in both for r in seeds}
        where = "" if len(machines) == 1 else " (the runs ran on different machines: not a like-for-like cost)"
        ratio = np.median(sec[0]) / np.median(sec[1])
        lines.append(f"- {CONFIGS[llm][0]}: {np.median(sec[0]):.1f} / {np.median(sec[1]):.1f} s = {ratio:.2f}{where}.")
    text = INTRO + "\n".join(lines) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return text


def main(args: Args):
    cuda = "_cuda" * (args.device == "cuda")
    shipped = lc.ROOT / "benchmarks" / f"learning_curves_smollm2{cuda}_runs"  # the shipped configuration's runs
    if SHIPPED in args.configs and not args.plot_only:
        sys.exit(
            f"error: {SHIPPED} is the scripts' critic, so its runs are the SmolLM2 study's SAC-GLAM runs ({shipped}): run "
            f"them with `python benchmarks/learning_curves.py --actor smollm2 --algos sac_glam --seeds ...{' --device cuda' * bool(cuda)}`"
        )
    work = Path(args.work_dir or lc.ROOT / "benchmarks" / f"critic_ablation{cuda}_runs").resolve()
    args.figure = args.figure or str(lc.ROOT / "docs" / f"critic_ablation{cuda}.png")
    args.table = args.table or str(lc.ROOT / "docs" / f"critic_ablation{cuda}.md")
    if not args.plot_only:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("error: --device cuda, but torch finds no CUDA device here: drop --device to run on the CPU")
        if args.device == "cpu" and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
            sys.exit("error: this CPU has no native bf16 (avx512_bf16 or AMX), and the SmolLM2 study's runs are bf16")
        exps = tuple(exp_name(config) for config in args.configs)
        study = lc.Args(actor="smollm2", algos=exps, jobs=1, steps=STEPS, max_minutes=args.max_minutes, device=args.device)
        work.mkdir(parents=True, exist_ok=True)
        lc.run_all(study, work, list(args.seeds), functools.partial(command, device=args.device), device=args.device)
    runs = load_runs(work, shipped, args.seeds)
    random = lc.random_policy(RANDOM_EPISODES, "simple")
    figure(args.figure, runs, random["all"])
    print(table(args.table, runs, random))
    lc.log(f"wrote {args.figure} and {args.table}")


if __name__ == "__main__":
    main(tyro.cli(Args))
