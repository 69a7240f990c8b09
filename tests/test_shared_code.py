"""The three scripts are self-contained on purpose (each reads alone, as in CleanRL), so they carry copies of
the code they share: model loading, the token layout and scoring of Eq. 1-2, the torchrun helpers, evaluation,
checkpoints, signals, logging, replay and the SAC losses (the two SAC scripts). A fix made in one copy must be made in all: every
top-level function, class, class method and constant defined in more than one script is identical in each,
except the few below that differ by design."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("sac_glam.py", "sac_glam_her.py", "ppo_glam.py")

# name -> why its copies differ. Everything else defined in two or three scripts must be identical.
DIFFERS = {
    "Args": "each algorithm's hyperparameters (Tables 1-3)",
    "Agent": "SAC: Q heads on prompt + action (Appendix B); PPO: a value head on the prompt",
    "Agent.__init__": "the critic heads (SAC) or the value head (PPO)",
    "Agent.forward": "returns Q values (SAC) or V (PPO) next to log pi",
    "Agent.policy_logp": "PPO also returns the values of the acting pass",
    "CHECKPOINT_RECORDS": "the named tuples each script's checkpoints hold",
    "sample_actions": "PPO can take its uniforms from outside (one global draw per rollout step under torchrun)",
    "trainable_state": "SAC saves the target Q heads too",
    "check_args": "each algorithm's settings to check",
    "transcript": "SAC shows each action's Q, PPO the state's V",
}


def definitions(path: Path) -> dict[str, str]:
    """Top-level functions, classes (and their methods, as Class.method) and constants, by name: their source."""
    src = path.read_text()
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = ast.get_source_segment(src, node)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        out[f"{node.name}.{item.name}"] = ast.get_source_segment(src, item)
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            for target in node.targets:
                out[target.id] = ast.get_source_segment(src, node)
    return out


def shared() -> dict[str, dict[str, str]]:
    defs = {name: definitions(ROOT / name) for name in SCRIPTS}
    names = {n for d in defs.values() for n in d}
    return {n: {s: defs[s][n] for s in SCRIPTS if n in defs[s]} for n in names if sum(n in d for d in defs.values()) > 1}


def test_shared_blocks_are_identical_in_every_script():
    drifted = [f"{name} ({', '.join(copies)})" for name, copies in sorted(shared().items())
               if name not in DIFFERS and len(set(copies.values())) > 1]  # fmt: skip
    assert not drifted, "copies drifted apart; make the same change in every script: " + "; ".join(drifted)


def test_the_shared_blocks_cover_the_common_machinery():
    """The check above guards these by name: were one renamed in one script only, it would silently stop."""
    both = shared()
    everywhere = {n for n, copies in both.items() if len(copies) == 3}
    expected = {"resolve_model", "use_bf16", "load_llm", "State", "ActionBlock", "Layout", "Agent.base", "Agent.action_ids",
                "Agent.render", "Agent.check_tokenization", "Agent.prompt_ids", "Agent.action_block", "Agent.layout",
                "Agent.attention_mask", "setup_torchrun", "gather", "all_reduce_gradients", "any_rank", "make_envs",
                "evaluate", "fail", "load_checkpoint", "load_trainable", "save_checkpoint", "StopSignal", "make_writer",
                "log_progress"}  # fmt: skip
    assert expected <= everywhere, expected - everywhere
    assert {
        "NStep",
        "Transition",
        "td_target",
        "critic_backward",
        "actor_backward",
        "soft_state_value",
        "ReplayBuffer.sample",
        "ReplayBuffer.add",
    } <= set(both)


def test_every_listed_difference_is_real():
    both = shared()
    stale = [n for n in DIFFERS if n not in both or len(set(both[n].values())) == 1]
    assert not stale, f"identical (or no longer shared): remove from DIFFERS: {stale}"
