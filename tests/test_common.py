"""Tests of what the three scripts share (copied on purpose): each test runs against sac_glam.py,
sac_glam_her.py and ppo_glam.py alike. Model loading in bf16 (fp32 trainable parameters), bf16 autocast on
the CPU against fp32, 4-bit adapters' gradients after acting, the gradient
all-reduce with a parameter unused on one rank (2 gloo ranks), the stop-signal handling, the
tokenization check, cache-free forward passes, and a quiet start without --load-in-4bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import playground_text as pt
import ppo_glam
import sac_glam
import sac_glam_her
from conftest import nonzero_lora, script_env

CPU = torch.device("cpu")
MODULES = {"sac_glam": sac_glam, "sac_glam_her": sac_glam_her, "ppo_glam": ppo_glam}


def make_agent(mod, args, llm, tok):
    """The script's agent, its tokenization checked as the script checks it (on an env state: here one with every
    kind of Playground-Text action)."""
    if mod is ppo_glam:
        agent = mod.Agent(llm, tok, args, device=CPU)
    else:
        agent = mod.Agent(llm, tok, args, max_actions=args.env.num_objects + 1, device=CPU)
    obs, info = pt.PlaygroundText(num_objects=3, seed=0).reset()
    agent.check_tokenization([mod.State(info["goal"], obs, tuple(info["possible_actions"]) + ("Grasp", "Release"))])
    return agent


# --------------------------------------------------------------------------------------------------
# 1. bf16: frozen weights may be bf16, trainable parameters are fp32 (no lost Adam updates)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("lora_r", [0, 4])
def test_trainable_parameters_are_fp32_when_loading_in_bf16(name, family, lora_r, tiny_dirs, one_thread):
    mod = MODULES[name]
    args = mod.Args(model_id=tiny_dirs[family], lora_r=lora_r, cuda=False, bf16=False)
    llm, tok = mod.load_llm(args, CPU, torch.bfloat16)
    trainable = {n: p.dtype for n, p in llm.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in llm.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, {n: d for n, d in trainable.items() if d != torch.float32}
    if lora_r:  # LoRA: the frozen base stays bf16 (the memory saving); the adapters are fp32
        assert all("lora_" in n for n in trainable) and set(frozen.values()) == {torch.bfloat16}
    else:  # full fine-tuning: every weight is trainable, hence fp32
        assert not frozen
    agent = make_agent(mod, args, llm, tok)
    heads = agent.value_head if mod is ppo_glam else agent.qf
    assert {p.dtype for p in heads.parameters()} == {torch.float32}


# bf16 keeps 8 bits of mantissa: log-probabilities of few-token actions and values of a random head agree with
# fp32 to a few hundredths (as in tests/test_cuda.py, here on the CPU).
LOGP_TOL, VALUE_TOL = 0.1, 0.05


def bf16_states(n: int = 6):
    vec = pt.SyncVecPlaygroundText(n, seed=5, num_objects=4)
    obs, infos = vec.reset()
    obs, _, _, _, infos = vec.step([info["possible_actions"][0] for info in infos])
    return [sac_glam.State(info["goal"], o, tuple(info["possible_actions"])) for o, info in zip(obs, infos)]


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_cpu_bf16_autocast_matches_fp32_and_trains_fp32_parameters(name, family, tiny_dirs, one_thread):
    """--bf16 on a CPU (frozen weights bf16, bf16 autocast): log pi and Q / V within bf16's precision of fp32, and a
    backward pass leaves fp32 gradients, finite and non-zero, on every trainable parameter (LoRA and heads).
    The autocast is forced on, so that this runs on CPUs without native bf16 too (emulated there)."""
    mod = MODULES[name]
    states = [mod.State(*s) for s in bf16_states()]
    out = {}
    for bf16 in (False, True):
        args = mod.Args(model_id=tiny_dirs[family], lora_r=4, cuda=False, bf16=bf16)
        torch.manual_seed(0)
        llm, tok = mod.load_llm(args, CPU, torch.bfloat16 if bf16 else torch.float32)
        nonzero_lora(llm)
        agent = make_agent(mod, args, llm, tok)
        agent.autocast = bf16
        if mod is ppo_glam:
            logp, value, valid = agent(states)
            values = value
        else:
            logp, q, _, valid = agent(states)
            values = q[:, valid]
        out[bf16] = (logp.detach(), values.detach(), valid)
        assert logp.dtype == torch.float32 and values.dtype == torch.float32  # losses are computed in fp32
        if bf16:
            (logp.masked_fill(~valid, 0).exp() * logp.masked_fill(~valid, 0)).sum().add(values.sum()).backward()
            trainable = [(n, p) for n, p in agent.named_parameters() if p.requires_grad and not n.startswith("qf_target")]
            assert any("lora_" in n for n, _ in trainable)
            for n, p in trainable:
                assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, n
                assert torch.isfinite(p.grad).all(), n
            lora_grads = [p.grad.abs().sum().item() for n, p in trainable if "lora_" in n]
            assert sum(g > 0 for g in lora_grads) > len(lora_grads) // 2  # the gradient reaches the adapters
    (lp32, v32, valid), (lp16, v16, _) = out[False], out[True]
    assert (lp32 - lp16)[valid].abs().max() < LOGP_TOL
    assert (v32 - v16).abs().max() < VALUE_TOL
    assert (lp32 - lp16)[valid].abs().max() > 0  # bf16 did run


@pytest.mark.parametrize("name", MODULES)
def test_4bit_adapters_get_the_same_gradient_after_an_acting_pass(name, tiny_dirs, one_thread):
    """--load-in-4bit on a CPU: acting (a no-grad pass) leaves the gradient of the next update unchanged, and it
    reaches the adapters of the first layer. On a CPU with avx512_bf16, bitsandbytes repacks 4-bit weights on a
    no-grad pass for a kernel without a backward, which would zero the gradient below each 4-bit layer."""
    mod = MODULES[name]
    args = mod.Args(model_id=tiny_dirs["llama"], lora_r=4, cuda=False, bf16=False, load_in_4bit=True)
    states = [mod.State(*s) for s in bf16_states()]
    grads = []
    for act_first in (False, True):
        torch.manual_seed(0)
        llm, tok = mod.load_llm(args, CPU)
        nonzero_lora(llm)
        agent = make_agent(mod, args, llm, tok)
        if act_first:
            agent.policy_logp(states, 8)
        agent(states)[0][:, 0].sum().backward()  # slot 0 holds an action in every state
        grads.append({n: p.grad for n, p in llm.named_parameters() if "lora_" in n})
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert all(g.abs().sum() > 0 for n, g in grads[1].items() if "layers.0." in n)


@pytest.mark.parametrize("name", MODULES)
def test_bf16_applies_where_the_hardware_has_it(name, monkeypatch):
    """--bf16 (default) means bf16 on a GPU or on a CPU with avx512_bf16 / AMX, fp32 elsewhere; --no-bf16: fp32."""
    mod = MODULES[name]
    on, off = mod.Args(), mod.Args(bf16=False)
    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert mod.use_bf16(on, CPU) is expected
        assert mod.use_bf16(off, CPU) is False
    # A GPU: only where bf16 is native (a V100 or T4 only emulates it, slower than fp32 there).
    for native in (True, False):
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda including_emulation=True, v=native: v or including_emulation
        )
        assert mod.use_bf16(on, torch.device("cuda")) is native and mod.use_bf16(off, torch.device("cuda")) is False


# --------------------------------------------------------------------------------------------------
# 2. Gradient all-reduce: a parameter without data on one rank must not make ranks reduce different sizes
# --------------------------------------------------------------------------------------------------
ALL_REDUCE = """
import datetime, json, os, sys, torch, torch.distributed as dist
import importlib
mod = importlib.import_module(sys.argv[1])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rank = dist.get_rank()
a, b = (torch.zeros(3, requires_grad=True) for _ in range(2))
# a: a gradient on both ranks; b: on rank 0 only (rank 1 had no data for it, as a PPO rank with no share of a minibatch).
a.grad = torch.full((3,), 1.0 + rank)
if rank == 0:
    b.grad = torch.tensor([4.0, 6.0, 8.0])
mod.all_reduce_gradients([a, b], average=sys.argv[2] == "average")
with open("rank%d.json" % rank, "w") as f:  # one file per rank: their stdout lines may interleave
    json.dump({"rank": rank, "a": a.grad.tolist(), "b": b.grad.tolist()}, f)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("mode", ["average", "sum"])
def test_gradient_all_reduce_sums_or_averages_with_zeros_from_a_rank_without_data(name, mode, tmp_path):
    (tmp_path / "reduce.py").write_text(ALL_REDUCE)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(tmp_path / "reduce.py"),
        name,
        mode,
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    k = 2.0 if mode == "average" else 1.0
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:  # the same on both ranks: (1 + 2) / k for a; (g + 0) / k for b
        assert r["a"] == [3.0 / k] * 3 and r["b"] == [4.0 / k, 6.0 / k, 8.0 / k]


# --------------------------------------------------------------------------------------------------
# 3. Stop signals: repeated SIGTERMs and any signal during a save only request the stop
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODULES)
def test_stop_signal_absorbs_repeats_and_protects_a_save(name):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stopper = MODULES[name].StopSignal()
        assert not stopper.requested
        for _ in range(3):  # a scheduler and torchrun may both send SIGTERM: never a kill
            os.kill(os.getpid(), signal.SIGTERM)
        assert stopper.requested
        stopper.saving = True
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while saving does not interrupt the save
        os.kill(os.getpid(), signal.SIGTERM)
        stopper.saving = False
        with pytest.raises(KeyboardInterrupt):  # ... outside a save it stops at once
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        assert MODULES[name].any_rank(True, CPU) is True and MODULES[name].any_rank(False, CPU) is False
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


# --------------------------------------------------------------------------------------------------
# 4. Start-up checks: tokenization of prompt + action, no KV cache, no alarming output
# --------------------------------------------------------------------------------------------------
def lone_space_tokenizer():
    """A Llama-2-like SentencePiece BPE ("▁" prepended, spaces as "▁"): " Go to" becomes ["▁", "▁Go", "▁to"],
    while "Action: Go to" has no lone "▁": prompt + action is not the prompt's tokens then the action's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    env, texts = pt.PlaygroundText(seed=0), []
    for _ in range(200):
        obs, info = env.reset()
        texts.append(pt.format_prompt(info["goal"], obs) + " " + " ".join(info["possible_actions"] + ["Grasp", "Release"]))
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>", "<s>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"
    )


@pytest.fixture(scope="module")
def lone_space_model(tmp_path_factory):
    import tiny_models

    return tiny_models.save_tiny_causal(tmp_path_factory.mktemp("lone_space"), tokenizer=lone_space_tokenizer())


@pytest.mark.parametrize("name", MODULES)
def test_a_tokenizer_that_splits_prompt_and_action_differently_is_refused(
    name, lone_space_model, tiny_dirs, capsys, one_thread
):
    mod = MODULES[name]
    tok = lone_space_tokenizer()
    assert tok(" Go to red cat", add_special_tokens=False).input_ids[0] == tok.convert_tokens_to_ids("▁")
    args = (
        mod.Args(model_id=lone_space_model, cuda=False, bf16=False, critic_hidden=32)
        if mod is not ppo_glam
        else mod.Args(model_id=lone_space_model, cuda=False, bf16=False, value_hidden=32)
    )
    llm, tok = mod.load_llm(args, CPU)
    with pytest.raises(SystemExit) as exit_info:
        make_agent(mod, args, llm, tok)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: the tokenizer splits prompt + action differently" in err and "'▁'" in err and "Eq. 1" in err
    for family in ("llama", "llama_actions", "t5"):  # the test models pass the check
        args = mod.Args(model_id=tiny_dirs[family], cuda=False, bf16=False)
        make_agent(mod, args, *mod.load_llm(args, CPU))


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_forward_passes_keep_no_cache(name, family, tiny_dirs, one_thread):
    mod = MODULES[name]
    args = mod.Args(model_id=tiny_dirs[family], cuda=False, bf16=False)
    agent = make_agent(mod, args, *mod.load_llm(args, CPU))
    calls = []
    decoder = agent.base().get_decoder()
    handle = decoder.register_forward_hook(
        lambda m, a, kw, out: calls.append((kw.get("use_cache"), out.past_key_values)), with_kwargs=True
    )
    try:
        obs, info = pt.PlaygroundText(num_objects=3, seed=1).reset()
        agent.policy_logp([mod.State(info["goal"], obs, tuple(info["possible_actions"]))], 8)
    finally:
        handle.remove()
    assert calls == [(False, None)]


@pytest.mark.parametrize("name", MODULES)
def test_loading_prints_nothing_alarming_without_4bit(name, tiny_dirs, tmp_path):
    code = (
        f"import torch, {name} as m; a = m.Args(model_id={tiny_dirs['llama']!r}, cuda=False, bf16=False); "
        "m.load_llm(a, torch.device('cpu')); print('loaded')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "loaded", out.stderr
    for alarming in ("kernels", "Failed", "Error", "error", "Warning"):
        assert alarming not in out.stderr, out.stderr


@pytest.mark.parametrize("name", MODULES)
def test_the_model_loads_straight_onto_the_rank_device(name, tiny_dirs, monkeypatch, one_thread):
    """Every rank loads with device_map={"": its device}: no full copy of a large model in host memory per rank."""
    from transformers import AutoModelForCausalLM

    mod = MODULES[name]
    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *a, **kw):
        seen.append(kw.get("device_map"))
        return real(cls, *a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    llm, _ = mod.load_llm(mod.Args(model_id=tiny_dirs["llama"], cuda=False, bf16=False, lora_r=4), CPU)
    assert seen == [{"": CPU}] and {p.device for p in llm.parameters()} == {CPU}


@pytest.mark.parametrize("name", MODULES)
def test_a_checkpoint_never_touches_the_network(name, tiny_dirs, tmp_path, monkeypatch, one_thread):
    """An offline compute node: saving the LoRA adapter of a model given by hub id must not look it up on the hub
    (peft does, unless told the embeddings are not trained), or the other ranks wait in a collective meanwhile."""
    import socket

    mod = MODULES[name]
    args = mod.Args(model_id=tiny_dirs["llama"], cuda=False, bf16=False, lora_r=4)
    llm, _ = mod.load_llm(args, CPU)
    llm.peft_config["default"].base_model_name_or_path = "some-org/some-model"  # as a hub id reads
    calls = []

    def no_network(*a, **kw):
        calls.append(a)
        raise OSError("no network on this node")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    mod.save_checkpoint(str(tmp_path / "run"), {"global_step": 0, "updates": 0}, llm)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists() and not calls


# --------------------------------------------------------------------------------------------------
# 5. Host-side layout: cached token ids give the very layout of a cold start; the caches stay bounded
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_layout_from_warm_caches_equals_cold_and_caches_are_bounded(name, family, tiny_dirs, monkeypatch, one_thread):
    mod = MODULES[name]
    args = mod.Args(model_id=tiny_dirs[family], cuda=False, bf16=False)
    agent = make_agent(mod, args, *mod.load_llm(args, CPU))
    vec = pt.SyncVecPlaygroundText(6, seed=3, num_objects=4)
    obs, infos = vec.reset()
    states = []
    for _ in range(5):
        states += [mod.State(info["goal"], o, tuple(info["possible_actions"])) for o, info in zip(obs, infos)]
        obs, _, _, _, infos = vec.step([info["possible_actions"][-1] for info in infos])
    states += states[:4]  # repeated states in one batch
    cold = agent.layout(states)
    warm = agent.layout(states)
    assert same_layout(cold, warm)
    fresh = make_agent(mod, args, agent.llm, agent.tokenizer)
    for part in (states[:7], states[7:]):  # a batch's layout does not depend on what else is in the batch
        got, alone = agent.layout(part), fresh.layout(part)
        assert same_layout(got, alone)
    monkeypatch.setattr(mod, "TOKEN_CACHE_SIZE", 5)
    small = make_agent(mod, args, agent.llm, agent.tokenizer)
    small.layout(states)  # more distinct prompts and action sets than the caches keep
    assert small.prompt_ids.cache_info().currsize == 5 and small.action_block.cache_info().currsize == 5
    assert same_layout(cold, small.layout(states))


def same_layout(a, b) -> bool:
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------
# 6. Scoring options of decoder-only models: what ends an action, the chat template (Eq. 1 exact for each)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    import tiny_models

    return tiny_models.save_tiny_causal(tmp_path_factory.mktemp("bpe"), tokenizer=tiny_models.make_bpe_tokenizer())


def ragged_states(mod) -> list:
    vec = pt.SyncVecPlaygroundText(4, seed=2, num_objects=4, goal_types=("grasp", "grow"))
    obs, infos = vec.reset()
    out = []
    for step in range(3):
        out += [mod.State(info["goal"], o, tuple(info["possible_actions"])) for o, info in zip(obs, infos)]
        obs, _, _, _, infos = vec.step([info["possible_actions"][step % len(info["possible_actions"])] for info in infos])
    return out


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("action_end", ["eos", "newline", "none"])
@pytest.mark.parametrize("chat", [False, True])
def test_scoring_options_match_naive_one_sequence_computation(name, action_end, chat, bpe_model, one_thread):
    mod = MODULES[name]
    args = mod.Args(model_id=bpe_model, cuda=False, bf16=False, action_end=action_end, chat_template=chat)
    torch.manual_seed(0)
    llm, tok = mod.load_llm(args, CPU)
    nonzero_lora(llm)
    agent = make_agent(mod, args, llm, tok)
    last = tok.convert_ids_to_tokens(agent.action_ids("Grasp"))[-1]  # what ends an action
    assert (
        last == {"eos": "<|im_end|>", "newline": "Ċ"}[action_end] if action_end != "none" else last not in ("<|im_end|>", "Ċ")
    )
    states = ragged_states(mod)
    with torch.no_grad():
        logp = agent.policy_logp(states, 5)
    spread = 0.0
    for b, s in enumerate(states):
        # Naive: the whole text (prompt, action, terminator) tokenized as one string, one sequence per action.
        prompt_text = pt.format_prompt(s.goal, s.observation)
        if chat:
            prompt_text = tok.apply_chat_template(
                [{"role": "user", "content": prompt_text}], tokenize=False, add_generation_prompt=True
            )
        prompt = tok(prompt_text, add_special_tokens=not chat).input_ids
        sums = []
        for action in s.actions:
            text = (action if chat else " " + action) + ("\n" if action_end == "newline" else "")
            seq = tok(prompt_text + text, add_special_tokens=not chat).input_ids + (
                [tok.eos_token_id] if action_end == "eos" else []
            )
            assert seq[: len(prompt)] == prompt
            with torch.no_grad():
                logits = llm(input_ids=torch.tensor([seq])).logits[0]
            sums.append(
                logits.log_softmax(-1)[torch.arange(len(prompt) - 1, len(seq) - 1), torch.tensor(seq[len(prompt) :])].sum()
            )
        naive = torch.stack(sums).log_softmax(-1)
        k = len(s.actions)
        assert (logp[b, :k] - naive).abs().max().item() < 1e-5, (b, action_end, chat)
        spread = max(spread, (naive.max() - naive.min()).item())
    assert spread > 0.1


def test_scoring_options_refuse_what_they_cannot_score(tiny_dirs, bpe_model, capsys, one_thread):
    mod = sac_glam
    cases = [
        (dict(model_id=tiny_dirs["llama"], chat_template=True), "has no chat template"),  # word-level: no template
        (dict(model_id=tiny_dirs["llama"], action_end="newline"), "no token for the newline"),  # whitespace is dropped
    ]
    for kwargs, needle in cases:
        args = mod.Args(cuda=False, bf16=False, **kwargs)
        with pytest.raises(SystemExit):
            make_agent(mod, args, *mod.load_llm(args, CPU))
        assert needle in capsys.readouterr().err
    # Nothing ends an action: an action whose tokens continue into another's cannot be told apart.
    args = mod.Args(model_id=tiny_dirs["llama"], cuda=False, bf16=False, action_end="none")
    agent = make_agent(mod, args, *mod.load_llm(args, CPU))
    obs, info = pt.PlaygroundText(num_objects=3, seed=0).reset()
    agent.policy_logp([mod.State(info["goal"], obs, tuple(info["possible_actions"]))], 8)  # the env's own actions: fine
    with pytest.raises(SystemExit):
        agent.policy_logp([mod.State(info["goal"], obs, ("Grasp", "Grasp red"))], 8)
    assert "prefix of another's" in capsys.readouterr().err
