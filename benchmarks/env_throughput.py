"""Playground-Text throughput: env steps per second in one process, random valid actions, resets included.

    python benchmarks/env_throughput.py [--steps 200000] [--seed 0]

Two settings: N=6 objects with every goal type, and N=3 objects with grasp and grow goals. Each figure
is compared with LittleZoo's 1,650 steps/s; the bar is 30x that (49,500 steps/s).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from playground_text import GOAL_TYPES, PlaygroundText  # noqa: E402

LITTLEZOO_STEPS_PER_S = 1650.0
BAR = 30.0


def steps_per_second(num_objects: int, goal_types, steps: int, seed: int) -> tuple[float, int]:
    """Run `steps` env steps with a random valid policy (resets inside the timed loop); return (steps/s, episodes)."""
    env = PlaygroundText(num_objects=num_objects, goal_types=goal_types, seed=seed)
    rng = random.Random(seed)
    choice = rng.choice
    start = time.perf_counter()
    _, info = env.reset()
    actions = info["possible_actions"]
    episodes = 1
    for _ in range(steps):
        _, _, terminated, truncated, info = env.step(choice(actions))
        if terminated or truncated:
            _, info = env.reset()
            episodes += 1
        actions = info["possible_actions"]
    return steps / (time.perf_counter() - start), episodes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200_000, help="env steps per setting (default 200000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be positive")

    settings = (("N=6, all goal types", 6, GOAL_TYPES), ("N=3, grasp+grow", 3, ("grasp", "grow")))
    bar = BAR * LITTLEZOO_STEPS_PER_S
    print(f"Playground-Text, single process, random valid actions, resets included, {args.steps} steps per setting")
    print(f"reference: LittleZoo {LITTLEZOO_STEPS_PER_S:,.0f} steps/s; bar {BAR:.0f}x = {bar:,.0f} steps/s")
    all_pass = True
    for name, n, goal_types in settings:
        rate, episodes = steps_per_second(n, goal_types, args.steps, args.seed)
        ratio = rate / LITTLEZOO_STEPS_PER_S
        ok = ratio >= BAR
        all_pass &= ok
        print(
            f"{name:22s} {rate:12,.0f} steps/s  {episodes:7d} episodes  "
            f"{ratio:7.1f}x LittleZoo  {'PASS' if ok else 'FAIL'} (bar {BAR:.0f}x)"
        )
    print("overall:", "PASS" if all_pass else "FAIL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
