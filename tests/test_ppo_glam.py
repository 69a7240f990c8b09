"""Tests of ppo_glam.py: GAE and the PPO loss against hand-computed values, scoring and the value head
against a naive computation, the rollout/update agreement (ratio 1), torchrun (identical ranks, and
2 processes == 1 process), checkpoint/resume after SIGTERM, logging and input errors.

Everything runs offline on CPU with the tiny random models of tests/tiny_models.py (saved once per
session by conftest.py). Script runs are subprocesses in temporary directories (conftest.py's runner);
all of them are started together by one module fixture, so they overlap on the two cores.
"""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, nonzero_lora

import playground_text as pt  # noqa: E402
import ppo_glam as pg  # noqa: E402

SCRIPT = ROOT / "ppo_glam.py"
CPU = torch.device("cpu")

# Small runs: 4 envs x 8 steps = 32 transitions per update, 4 minibatches of 8, 2 epochs: 8 Adam steps
# per update; 96 steps = 3 updates. Grasp goals in 3-object scenes: episodes of at most 6 steps, so
# every rollout holds terminations and truncations.
SMALL = {
    "--num-envs": 4,
    "--num-steps": 8,
    "--minibatch-size": 8,
    "--update-epochs": 2,
    "--value-hidden": 64,
    "--lora-r": 4,
    "--num-objects": 3,
    "--goal-types": "grasp",
    "--log-frequency": 32,
    "--eval-frequency": 0,
    "--checkpoint-frequency": 0,
    "--checkpoint-dir": "ck",
    "--total-timesteps": 96,
}


def small(model_dir: str, **overrides) -> list[str]:
    """The script's arguments of a small run; overrides as {"eval_frequency": 32} (underscores for dashes)."""
    opts = dict(SMALL, **{"--" + k.replace("_", "-"): v for k, v in overrides.items()}, **{"--model-id": model_dir})
    return ["--no-cuda", "--no-bf16", *(str(x) for kv in opts.items() for x in kv)]


LOSS_TAGS = ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "explained_variance", "grad_norm")

# Runs the script under runpy (one process, or one per torchrun rank) and saves each rank's trainable
# state. Modes: "-"; "kill:R:N": rank R sends itself SIGTERM during its N-th env step; "record": every
# episode's true last state is recorded, and after the run (give it --learning-rate 0, so that the
# weights that scored the rollout are the final ones) the rollout storage is saved with the values of
# those last states and of the observations after the rollout, recomputed.
WRAPPER = """
import os, runpy, signal, sys, torch
script, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
sys.argv = [script] + sys.argv[4:]
rank = int(os.environ.get("RANK", 0))
import playground_text as pt
step, calls, finals = pt.SyncVecPlaygroundText.step, [0], []
def patched_step(self, actions):
    calls[0] += 1
    if mode.startswith("kill:") and rank == int(mode.split(":")[1]) and calls[0] == int(mode.split(":")[2]):
        os.kill(os.getpid(), signal.SIGTERM)
    result = step(self, actions)
    for i, info in enumerate(result[4]):
        if "final_observation" in info:
            fi = info["final_info"]
            finals.append((calls[0] - 1, i, fi["goal"], info["final_observation"], tuple(fi["possible_actions"])))
    return result
pt.SyncVecPlaygroundText.step = patched_step
g = runpy.run_path(script, run_name="__main__")
saved = {"trainable": g["trainable_state"](g["agent"]), "updates": g["updates"], "global_step": g["global_step"],
         "world": g["world"], "rank": g["rank"], "envs_per_rank": g["envs_per_rank"]}
if mode == "record":
    State, agent = g["State"], g["agent"]
    saved["finals"] = [(t, i, agent.score([State(goal, o, acts)], 64)[1].item()) for t, i, goal, o, acts in finals]
    after = [State(info["goal"], o, tuple(info["possible_actions"])) for o, info in zip(g["obs"], g["infos"])]
    saved["after_values"] = agent.score(after, 64)[1].numpy()
    saved.update({k: g[k].copy() for k in ("values", "next_values", "terminated", "dones")})
torch.save(saved, os.path.join(out, "rank%d.pt" % rank))
"""


# --------------------------------------------------------------------------------------------------
# 1. GAE on a hand-computed example
# --------------------------------------------------------------------------------------------------
def test_gae_hand_computed_termination_and_truncation():
    # T = 4 steps of N = 2 envs, gamma = lambda = 0.5 (gamma * lambda = 0.25).
    # env 0: terminated at t=1 (reward 1); its next_values[1] = 100 must be ignored.
    # env 1: truncated at t=2, bootstraps from V(final observation) = 10 (not from V(s_3) = 2, the new
    #        episode's first state); terminated at t=3 (reward 1).
    rewards = np.array([[0, 0.5], [1, 0], [0, 0], [0, 1]])
    values = np.array([[1, 1], [2, 2], [0.5, 4], [1, 2]])
    next_values = np.array([[2, 2], [100, 4], [1, 10], [4, 100]])  # env 0 at t=3: V after the rollout = 4
    terminated = np.array([[0, 0], [1, 0], [0, 0], [0, 1]], dtype=bool)
    dones = np.array([[0, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    adv, ret = pg.compute_gae(rewards, values, next_values, terminated, dones, gamma=0.5, lam=0.5)
    # env 0, backwards:
    #   t=3: delta = 0 + 0.5*4 - 1 = 1                      A = 1
    #   t=2: delta = 0 + 0.5*1 - 0.5 = 0                    A = 0 + 0.25*1 = 0.25
    #   t=1: delta = 1 + 0 (terminated) - 2 = -1            A = -1 (episode end: nothing flows back)
    #   t=0: delta = 0 + 0.5*2 - 1 = 0                      A = 0 + 0.25*(-1) = -0.25
    # env 1:
    #   t=3: delta = 1 + 0 (terminated) - 2 = -1            A = -1
    #   t=2: delta = 0 + 0.5*10 - 4 = 1 (truncated)         A = 1 (episode end)
    #   t=1: delta = 0 + 0.5*4 - 2 = 0                      A = 0 + 0.25*1 = 0.25
    #   t=0: delta = 0.5 + 0.5*2 - 1 = 0.5                  A = 0.5 + 0.25*0.25 = 0.5625
    expected_adv = np.array([[-0.25, 0.5625], [-1, 0.25], [0.25, 1], [1, -1]])
    np.testing.assert_array_equal(adv, expected_adv)
    np.testing.assert_array_equal(ret, expected_adv + values)
    np.testing.assert_array_equal(ret, [[0.75, 1.5625], [1, 2.25], [0.75, 5], [2, 1]])
    assert adv.shape == (4, 2) and adv.dtype == np.float64


def test_gae_lambda_one_is_the_discounted_return_and_lambda_zero_is_td():
    rng = np.random.default_rng(0)
    r, v, nv = rng.normal(size=(3, 6, 1))
    none = np.zeros((6, 1), dtype=bool)
    adv, _ = pg.compute_gae(r, v, nv, none, none, gamma=0.9, lam=0.0)
    np.testing.assert_allclose(adv, r + 0.9 * nv - v, atol=1e-12)
    # lambda = 1 with consistent next values (next_values[t] = values[t+1]): A_t = sum_k 0.9^k r_{t+k} + 0.9^(T-t) V_T - V_t.
    nv = np.concatenate([v[1:], [[3.0]]])
    adv, ret = pg.compute_gae(r, v, nv, none, none, gamma=0.9, lam=1.0)
    for t in range(6):
        mc = sum(0.9**k * r[t + k, 0] for k in range(6 - t)) + 0.9 ** (6 - t) * 3.0
        assert ret[t, 0] == pytest.approx(mc, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# 2. The PPO loss on a hand-made batch
# --------------------------------------------------------------------------------------------------
# Six states, 3 action slots, padded slots probability 0. pi over each state's actions:
PROBS = [[0.5, 0.5, 0], [0.25, 0.25, 0.5], [1, 0, 0], [0.5, 0.25, 0.25], [0.5, 0.5, 0], [0.25, 0.25, 0.5]]
ACTIONS = [0, 2, 0, 1, 1, 0]  # pi(a|s) = 0.5, 0.5, 1, 0.25, 0.5, 0.25
RATIOS = [1.5, 1.5, 1.1, 0.5, 0.5, 0.9]  # pi / pi_old: outside, outside, inside, outside, outside, inside [0.8, 1.2]
ADV = [1.0, -1.0, 1.0, 2.0, -2.0, -1.0]
VALUES = [1.0, 2.0, 0.0, -1.0, 0.5, 3.0]
RETURNS = [2.0, 2.0, 1.0, -1.0, 0.0, 1.0]
OLD_VALUES = [0.0, 2.0, 0.0, -1.0, 0.5, 4.0]


def _loss_inputs():
    probs = torch.tensor(PROBS, dtype=torch.float64)
    logp = probs.log().float().requires_grad_()  # -inf on padded slots
    valid = probs > 0
    actions = torch.tensor(ACTIONS)
    taken = probs[torch.arange(6), actions]
    old_logp = (taken / torch.tensor(RATIOS, dtype=torch.float64)).log().float()
    values = torch.tensor(VALUES, requires_grad=True)
    return logp, valid, actions, values, old_logp, torch.tensor(ADV), torch.tensor(RETURNS), torch.tensor(OLD_VALUES)


def test_ppo_loss_hand_computed():
    logp, valid, actions, values, old_logp, adv, returns, old_values = _loss_inputs()
    loss, stats = pg.ppo_loss(
        logp,
        valid,
        actions,
        values,
        old_logp,
        adv,
        returns,
        old_values,
        clip_coef=0.2,
        ent_coef=0.01,
        vf_coef=0.5,
        clip_vloss=False,
    )
    # max(-A r, -A clip(r, 0.8, 1.2)) per sample:
    #   A=+1 r=1.5: max(-1.5, -1.2) = -1.2   A=-1 r=1.5: max(1.5, 1.2) = 1.5   A=+1 r=1.1: -1.1
    #   A=+2 r=0.5: max(-1.0, -1.6) = -1.0   A=-2 r=0.5: max(1.0, 1.6) = 1.6   A=-1 r=0.9: 0.9
    policy = (-1.2 + 1.5 - 1.1 - 1.0 + 1.6 + 0.9) / 6  # = 0.7 / 6
    # (V - R)^2, no 1/2 (GLAM): diffs -1, 0, -1, 0, 0.5, 2 -> squares sum 6.25
    value = 6.25 / 6
    # Entropies: ln2, 1.5 ln2, 0 (one action), 1.5 ln2, ln2, 1.5 ln2 -> 6.5 ln2
    entropy = 6.5 * math.log(2) / 6
    kl = sum((r - 1) - math.log(r) for r in RATIOS) / 6
    assert stats["policy_loss"] == pytest.approx(policy, abs=1e-6)
    assert stats["value_loss"] == pytest.approx(value, abs=1e-6)
    assert stats["entropy"] == pytest.approx(entropy, abs=1e-6)
    assert stats["approx_kl"] == pytest.approx(kl, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(4 / 6, abs=1e-7)
    assert stats["max_ratio_error"] == pytest.approx(0.5, abs=1e-6)
    assert loss.item() == pytest.approx(policy - 0.01 * entropy + 0.5 * value, abs=1e-6)

    # Gradients: finite everywhere (padded slots: 0, no 0 * -inf NaN); dL/dV = 2 vf_coef (V - R) / B.
    loss.backward()
    assert torch.isfinite(logp.grad).all() and torch.all(logp.grad[~valid] == 0)
    expected_dv = 2 * 0.5 * (torch.tensor(VALUES) - torch.tensor(RETURNS)) / 6
    assert torch.allclose(values.grad, expected_dv, atol=1e-7)
    # Entropy bonus on a slot not taken: d(-0.01 H)/d log pi_j = 0.01 pi_j (log pi_j + 1) / B.
    assert logp.grad[0, 1].item() == pytest.approx(0.01 * 0.5 * (math.log(0.5) + 1) / 6, abs=1e-8)


def test_ppo_loss_policy_gradient_is_zero_where_clipped():
    logp, valid, actions, values, old_logp, adv, returns, old_values = _loss_inputs()
    loss, _ = pg.ppo_loss(
        logp, valid, actions, values, old_logp, adv, returns, old_values, clip_coef=0.2, ent_coef=0.0, vf_coef=0.0
    )
    loss.backward()
    # d/d log pi(a|s) of max(-A r, -A clip(r)) = -A r where the unclipped term is the max, else 0.
    expected = [0.0, 1.5 / 6, -1.1 / 6, -1.0 / 6, 0.0, 0.9 / 6]
    got = logp.grad[torch.arange(6), actions]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6), got
    mask = torch.ones_like(logp.grad, dtype=torch.bool)
    mask[torch.arange(6), actions] = False
    assert torch.all(logp.grad[mask] == 0)


def test_ppo_loss_clipped_value_as_glam_and_global_denominator():
    logp, valid, actions, values, old_logp, adv, returns, old_values = _loss_inputs()
    loss, stats = pg.ppo_loss(
        logp, valid, actions, values, old_logp, adv, returns, old_values, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5
    )  # GLAM's default: value clipped, no 1/2
    # V_clip = V_old + clip(V - V_old, -0.2, 0.2); max((V - R)^2, (V_clip - R)^2):
    #   s0: V_clip 0.2, (0.2-2)^2 = 3.24 > 1     s1: 0     s2: V_clip 0, 1 = 1     s3: 0
    #   s4: 0.25                                  s5: V_clip 3.8, (3.8-1)^2 = 7.84 > 4
    assert stats["value_loss"] == pytest.approx((3.24 + 1 + 0.25 + 7.84) / 6, abs=1e-6)
    loss.backward()
    # Where the clipped term wins (s0, s5) V gets no gradient; s3 (V = R) none either.
    assert values.grad[[0, 3, 5]].tolist() == [0.0, 0.0, 0.0]
    assert pg.Args().clip_vloss and pg.Args().adam_eps == 1e-5
    # total = 12 (this batch is half of a global minibatch): every term is its sum / 12.
    _, half = pg.ppo_loss(
        logp, valid, actions, values, old_logp, adv, returns, old_values, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, total=12
    )
    _, full = pg.ppo_loss(
        logp, valid, actions, values, old_logp, adv, returns, old_values, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5
    )
    for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac"):
        assert float(half[k]) == pytest.approx(float(full[k]) / 2, abs=1e-7), k


def test_advantage_normalisation_and_explained_variance():
    adv = torch.tensor([1.0, 2.0, 4.0, 9.0])
    out = pg.normalize_advantages(adv, CPU)
    # mean 4, unbiased std sqrt(((-3)^2 + (-2)^2 + 0 + 5^2) / 3) = sqrt(38 / 3)
    std = math.sqrt(38 / 3)
    assert torch.allclose(out, (adv - 4) / (std + 1e-8), atol=1e-6)
    # 1 - Var(R - V) / Var(R): R = 0, 2, 4, 6 (Var 5), R - V = 1, -1, 1, -1 (Var 1) -> 0.8
    returns = np.array([[0.0, 2.0], [4.0, 6.0]])
    values = returns - np.array([[1.0, -1.0], [1.0, -1.0]])
    assert pg.explained_variance(values, returns, CPU) == pytest.approx(0.8, abs=1e-12)
    assert math.isnan(pg.explained_variance(values, np.ones((2, 2)), CPU))


# --------------------------------------------------------------------------------------------------
# 3-4. Scoring and value head against a naive computation; rollout and update passes agree
# --------------------------------------------------------------------------------------------------
def _agent(model_dir: str):
    args = pg.Args(model_id=model_dir, cuda=False, bf16=False, value_hidden=64, lora_r=4)
    torch.manual_seed(0)
    llm, tok = pg.load_llm(args, CPU)
    nonzero_lora(llm)
    return pg.Agent(llm, tok, args, device=CPU)


def _states() -> list[pg.State]:
    """Ragged states: 7 actions, 7 go-to + Grasp, 6 go-to + Release, 2 actions, a single action."""
    env = pt.PlaygroundText()
    goal = pt.all_goals("train", "grow_then_grasp")[3]
    obs, info = env.reset(
        goal=goal, objects=["red cat", "blue water", "green desk", "red food", "blue tree", "green lion", "red sofa"]
    )
    out = [pg.State(goal, obs, tuple(info["possible_actions"]))]
    obs, _, _, _, info = env.step("Go to blue water")
    out.append(pg.State(goal, obs, tuple(info["possible_actions"])))
    obs, _, _, _, info = env.step("Grasp")
    out.append(pg.State(goal, obs, tuple(info["possible_actions"])))
    assert out[-1].actions[-1] == "Release"
    obs, info = env.reset(goal="Grasp any dog", objects=["red dog", "green food"])
    out.append(pg.State("Grasp any dog", obs, tuple(info["possible_actions"])))
    out.append(pg.State("Grasp any dog", obs, ("Go to red dog",)))
    return out


def _naive(agent, state: pg.State) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log pi one action at a time (Eq. 1-2), and V from the prompt alone with the hidden state it reads,
    each from its own plain HF call."""
    tok, base = agent.tokenizer, agent.llm.get_base_model()
    prompt = tok(pt.format_prompt(state.goal, state.observation), add_special_tokens=True).input_ids
    sums = []
    with torch.no_grad():
        for action in state.actions:
            if agent.encoder_decoder:
                ids = tok(action, add_special_tokens=True).input_ids  # ends with </s>
                start = base.config.decoder_start_token_id
                logits = agent.llm(
                    input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[start] + ids[:-1]])
                ).logits[0]
                sums.append(logits.log_softmax(-1)[torch.arange(len(ids)), torch.tensor(ids)].sum())
            else:
                ids = tok(" " + action, add_special_tokens=False).input_ids + (
                    [tok.eos_token_id] if agent.action_end == "eos" else []
                )
                logits = agent.llm(input_ids=torch.tensor([prompt + ids])).logits[0]
                sums.append(
                    logits.log_softmax(-1)[torch.arange(len(prompt) - 1, len(prompt) + len(ids) - 1), torch.tensor(ids)].sum()
                )
        # V: the hidden state that predicts the first action token, from the prompt alone.
        if agent.encoder_decoder:
            enc = base.get_encoder()(input_ids=torch.tensor([prompt])).last_hidden_state
            start = torch.tensor([[base.config.decoder_start_token_id]])
            h = base.get_decoder()(input_ids=start, encoder_hidden_states=enc).last_hidden_state[0, 0]
        else:
            h = base.get_decoder()(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
        value = agent.value_head(h)[0]
    return torch.stack(sums).log_softmax(-1), value, h


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_scoring_and_value_match_naive_and_do_not_depend_on_the_batch(family, tiny_dirs, one_thread):
    agent = _agent(tiny_dirs[family])
    assert agent.encoder_decoder == (family == "t5")
    states = _states()
    k_max = max(len(s.actions) for s in states)
    features = []  # what the value head reads
    hook = agent.value_head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0].detach()))
    with torch.no_grad():
        logp, values, valid = agent(states)
    hook.remove()
    assert logp.shape == (len(states), k_max) and values.shape == (len(states),)
    naive_h = []
    for b, s in enumerate(states):
        k = len(s.actions)
        naive_logp, naive_value, h = _naive(agent, s)
        naive_h.append(h)
        assert (logp[b, :k] - naive_logp).abs().max().item() < 1e-5, (b, logp[b, :k], naive_logp)
        assert torch.allclose(features[0][b], h, rtol=1e-4, atol=1e-6), (b, (features[0][b] - h).abs().max())
        assert abs(values[b].item() - naive_value.item()) < 1e-5, (b, values[b], naive_value)
        assert valid[b].tolist() == [True] * k + [False] * (k_max - k) and torch.all(logp[b, k:] == -math.inf)
        # V depends on the prompt only: alone, or with other candidate actions, it is the same.
        with torch.no_grad():
            _, v_alone, _ = agent([s])
            _, v_other, _ = agent([s._replace(actions=s.actions[::-1][:2])])
        assert abs(v_alone.item() - values[b].item()) < 1e-5 and abs(v_other.item() - values[b].item()) < 1e-5
    # The value head reads each state's own prompt: the features of two different prompts differ (the
    # last two states share their prompt and differ in their actions only).
    for b in range(len(states) - 1):
        for c in range(len(states) - 1):
            assert (b == c) == torch.allclose(features[0][b], naive_h[c], rtol=1e-4, atol=1e-6), (b, c)
    assert torch.equal(naive_h[-1], naive_h[-2])
    # Acting in chunks (rollout: inference mode, chunks of 2) gives the same log pi and V.
    chunked_logp, chunked_values = agent.score(states, chunk=2)
    fin = torch.isfinite(logp)
    assert torch.equal(fin, torch.isfinite(chunked_logp))
    assert (chunked_logp[fin] - logp[fin]).abs().max().item() < 1e-5
    assert (chunked_values - values).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_update_pass_reproduces_rollout_logprobs(family, tiny_dirs, one_thread):
    """Log pi stored at rollout time (inference mode, one chunk per step) == the update's grad pass on a
    shuffled minibatch: the importance ratio of the first minibatch of an update is 1."""
    agent = _agent(tiny_dirs[family])
    envs = pt.SyncVecPlaygroundText(4, seed=3, num_objects=3, goal_types=("grasp", "grow"))
    obs, infos = envs.reset()
    rng = np.random.default_rng(0)
    states, actions, old_logp, old_values = [], [], [], []
    for _ in range(6):
        step_states = [pg.State(i["goal"], o, tuple(i["possible_actions"])) for o, i in zip(obs, infos)]
        logp, value = agent.score(step_states, chunk=64)
        a = pg.sample_actions(logp, rng)
        states += step_states
        actions += a.tolist()
        old_logp += logp[torch.arange(4), torch.as_tensor(a)].tolist()
        old_values += value.tolist()
        obs, _, _, _, infos = envs.step([s.actions[i] for s, i in zip(step_states, a)])
    order = rng.permutation(len(states))[:10]
    new_logp, new_values, valid = agent([states[i] for i in order])

    def t(xs):
        return torch.tensor([xs[i] for i in order])

    loss, stats = pg.ppo_loss(
        new_logp,
        valid,
        t(actions),
        new_values,
        t(old_logp),
        torch.ones(10),
        t(old_values),
        t(old_values),
        clip_coef=0.2,
        ent_coef=0.01,
        vf_coef=0.5,
    )
    assert stats["max_ratio_error"] < 1e-6 and abs(stats["approx_kl"]) < 1e-9 and stats["clipfrac"] == 0
    assert stats["value_loss"] < 1e-10  # returns = old values: the value is reproduced too
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in agent.value_head.parameters())


# --------------------------------------------------------------------------------------------------
# Script runs: end to end, torchrun, SIGTERM + resume
# --------------------------------------------------------------------------------------------------
def torchrun_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]


@pytest.fixture(scope="module")
def ppo_runs(runner, tiny_dirs, tmp_path_factory):
    """All script runs of this module, started together (they overlap on the cores)."""
    llama = tiny_dirs["llama"]
    runs, cwds = {}, {}
    for key in ("one", "two", "sig", "wiring"):
        cwds[key] = tmp_path_factory.mktemp(f"ppo_{key}")
        (cwds[key] / "wrapper.py").write_text(WRAPPER)

    def wrap(key, mode="-"):
        return [str(cwds[key] / "wrapper.py"), str(SCRIPT), str(cwds[key]), mode]

    # One process, with evaluation and a checkpoint every 2 updates: the end-to-end run and the reference.
    runs["one"] = runner.start(
        "ppo_one",
        [],
        cwd=cwds["one"],
        cmd=[sys.executable, *wrap("one"), *small(llama, eval_frequency=32, eval_episodes=2, checkpoint_frequency=2)],
    )
    runs["two"] = runner.start("ppo_two", [], cwd=cwds["two"], cmd=torchrun_cmd(*wrap("two"), *small(llama)))
    # Rank 1 gets SIGTERM in its 3rd env step: both ranks stop right after it, mid-rollout, and checkpoint.
    runs["sig"] = runner.start("ppo_sig", [], cwd=cwds["sig"], cmd=torchrun_cmd(*wrap("sig", "kill:1:3"), *small(llama)))
    runs["wiring"] = runner.start(
        "ppo_wiring",
        [],
        cwd=cwds["wiring"],
        cmd=[sys.executable, *wrap("wiring", "record"), *small(llama, total_timesteps=32, learning_rate=0)],
    )
    runs["t5"] = runner.start(
        "ppo_t5",
        [],
        cmd=[sys.executable, str(SCRIPT), *small(tiny_dirs["t5"], total_timesteps=64, eval_frequency=64, eval_episodes=2)],
    )
    runs["err"] = runner.start("ppo_err", [], cmd=[sys.executable, str(SCRIPT), *small(llama, minibatch_size=12)])
    runs["cwd"] = cwds
    return runs


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _rank_states(cwd) -> list[dict]:
    return [torch.load(cwd / f"rank{r}.pt", weights_only=False) for r in range(2) if (cwd / f"rank{r}.pt").exists()]


def test_end_to_end_logs_every_tag_and_ratio_is_one(ppo_runs):
    run = ppo_runs["one"].check()
    assert "decoder-only" in run.stdout
    # Checkpoints every 2 updates and at the end.
    assert re.findall(r"checkpoint: .* \(step (\d+), update (\d+)\)", run.stdout) == [("64", "2"), ("96", "3")], run.stdout
    tags = _scalars(run.run_dir())
    required = [
        "charts/success_rate",
        "charts/success_rate_grasp",
        "charts/episodic_length",
        "charts/SPS",
        "charts/success_rate_vs_seconds",
        *(f"losses/{k}" for k in LOSS_TAGS),
        *(
            f"eval/{m}_{s}_{g}"
            for m in ("success_rate", "episodic_length")
            for s in ("train", "test")
            for g in ("greedy", "sampled")
        ),
    ]
    missing = [t for t in required if t not in tags]
    assert not missing, f"missing tags {missing}; have {sorted(tags)}"
    for t in required:
        assert all(math.isfinite(v) for _, v in tags[t]), (t, tags[t])
    for k in LOSS_TAGS:
        assert [s for s, _ in tags[f"losses/{k}"]] == [32, 64, 96], k  # once per update
    assert [s for s, _ in tags["eval/success_rate_train_greedy"]] == [32, 64, 96]
    assert all(0 <= v <= 1 for t in required if "success" in t for _, v in tags[t])
    assert all(v > 0 for _, v in tags["losses/entropy"]) and all(v >= 0 for _, v in tags["losses/value_loss"])
    # Test 3: the first minibatch of every update recomputes exactly the rollout's log pi (ratio 1).
    errors = tags["debug/first_minibatch_ratio_error"]
    assert [s for s, _ in errors] == [32, 64, 96] and all(v < 1e-6 for _, v in errors), errors
    # ... and later minibatches do move the policy (the check is not vacuous).
    assert all(v > 0 for _, v in tags["losses/approx_kl"])


def test_t5_end_to_end(ppo_runs):
    run = ppo_runs["t5"].check()
    assert "encoder-decoder" in run.stdout
    tags = _scalars(run.run_dir())
    assert [s for s, _ in tags["losses/value_loss"]] == [32, 64]
    assert all(v < 1e-6 for _, v in tags["debug/first_minibatch_ratio_error"])
    assert all(math.isfinite(v) for k in LOSS_TAGS for _, v in tags[f"losses/{k}"])
    assert "eval/success_rate_test_sampled" in tags


def test_torchrun_ranks_identical_and_equal_to_one_process(ppo_runs):
    two = ppo_runs["two"].check()
    one = ppo_runs["one"].check()
    r0, r1 = _rank_states(ppo_runs["cwd"]["two"])
    (single,) = _rank_states(ppo_runs["cwd"]["one"])
    assert (r0["world"], r1["world"], r0["envs_per_rank"], single["world"], single["envs_per_rank"]) == (2, 2, 2, 1, 4)
    assert r0["updates"] == r1["updates"] == single["updates"] == 3 and r0["global_step"] == 96
    assert r0["trainable"].keys() == r1["trainable"].keys() == single["trainable"].keys()
    for k in r0["trainable"]:
        assert torch.equal(r0["trainable"][k], r1["trainable"][k]), f"{k} differs between ranks"
    # The same data (env j seeded from (seed, j), one sampling rng for all envs) and the same global minibatches:
    # the 2-process updates equal the 1-process ones.
    assert any(single["trainable"][k].abs().max() > 1e-3 for k in single["trainable"] if "lora_B" in k)  # it trained
    for k in single["trainable"]:
        diff = (single["trainable"][k] - r0["trainable"][k]).abs().max().item()
        assert diff < 1e-5, f"{k}: 1 vs 2 processes differ by {diff}"
    # Same losses, statistics and (summed, not averaged) gradient norms, update by update.
    t1, t2 = _scalars(one.run_dir()), _scalars(two.run_dir())
    for k in LOSS_TAGS:
        a, b = t1[f"losses/{k}"], t2[f"losses/{k}"]
        assert [s for s, _ in a] == [s for s, _ in b]
        assert np.allclose([v for _, v in a], [v for _, v in b], rtol=1e-4, atol=1e-6), (k, a, b)
    assert t1["charts/success_rate"] == t2["charts/success_rate"]


def test_sigterm_checkpoints_mid_rollout_and_resume_is_exact(ppo_runs, runner):
    sig = ppo_runs["sig"].check()
    assert "stopped by signal" in sig.stdout and "Traceback" not in sig.stderr, sig.describe()
    ck = sig.checkpoint()
    # Right after the 3rd env step (3 x 4 envs), before the rollout of 8 steps is complete: no waiting for it.
    assert (ck["global_step"], ck["updates"], ck["world_size"]) == (12, 0, 2)
    assert len(ck["ranks"]) == 2  # both ranks' envs, observations and the rollout collected so far
    cwd = ppo_runs["cwd"]["sig"]
    resumed = runner.start(
        "ppo_sig_resume", [], cwd=cwd, cmd=torchrun_cmd(cwd / "wrapper.py", SCRIPT, cwd, "-", "--resume", sig.checkpoint_dir())
    ).check()
    final = resumed.checkpoint()
    reference = ppo_runs["two"].check().checkpoint()
    assert (final["global_step"], final["updates"]) == (reference["global_step"], reference["updates"]) == (96, 3)
    for k in reference["trainable"]:
        assert torch.equal(final["trainable"][k], reference["trainable"][k]), f"{k} differs from the uninterrupted run"
    sa, sb = reference["optimizer"]["state"], final["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key])), (i, key)
    assert reference["rng"] == final["rng"]
    r0, r1 = _rank_states(cwd)  # the resumed ranks, identical
    for k in r0["trainable"]:
        assert torch.equal(r0["trainable"][k], r1["trainable"][k]) and torch.equal(r0["trainable"][k], final["trainable"][k])


def test_bad_minibatch_size_gives_one_clear_message(ppo_runs):
    run = ppo_runs["err"].wait()
    assert run.rc == 2, run.describe()
    assert "Traceback" not in run.stderr
    assert run.stderr.count("--minibatch-size 12 must divide the 32 transitions of a rollout") == 1, run.describe()
    assert not (run.cwd / "runs").exists()


def test_rollout_bootstraps_from_the_true_next_states(ppo_runs):
    """The storage that compute_gae receives: next_values[t] is V(s_{t+1}) while the episode goes on, V of
    the episode's true last observation after a truncation, and after the rollout V of the next observation."""
    ppo_runs["wiring"].check()
    (rec,) = _rank_states(ppo_runs["cwd"]["wiring"])
    values, next_values, terminated, dones = rec["values"], rec["next_values"], rec["terminated"], rec["dones"]
    T, N = values.shape
    assert (T, N) == (8, 4)
    truncated = dones & ~terminated
    assert truncated.any() and terminated.any(), "the rollout has no truncation or no termination: nothing is checked"
    finals = {(t, i): v for t, i, v in rec["finals"]}
    assert set(finals) == set(zip(*np.nonzero(dones)))  # every ended episode was recorded
    for t in range(T):
        for i in range(N):
            if truncated[t, i]:
                assert abs(next_values[t, i] - finals[t, i]) < 1e-6, (t, i)
                if t + 1 < T:  # the next state is the new episode's first one, with another value
                    assert abs(next_values[t, i] - values[t + 1, i]) > 1e-6, (t, i)
            elif not dones[t, i]:
                expected = values[t + 1, i] if t + 1 < T else rec["after_values"][i]
                assert abs(next_values[t, i] - expected) < 1e-6, (t, i)
