"""benchmarks/learning_curves.py: its statement of the paper's claims on hand-computed cases, and its runner."""

import importlib.util
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location(
    "learning_curves", Path(__file__).parents[1] / "benchmarks" / "learning_curves.py"
)
learning_curves = sys.modules["learning_curves"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(learning_curves)


def runs_of(**aucs: list[float]) -> dict:
    """Runs whose success curve is flat at each given value: its area under the curve."""
    return {algo: [{"steps": (np.array([0.0, 100.0]), np.array([v, v]))} for v in values] for algo, values in aucs.items()}


def test_two_seeds_each_get_the_seed_range_interval_and_cannot_be_significant():
    # Pooled AUCs 0.6 0.7 | 0.4 0.5: of the 6 splits into two pairs, 2 give |difference| >= 0.2, so p = 1/3, the
    # smallest 2 vs 2 seeds allow. Each bootstrap mean is one seed's AUC (1/4 each) or both's: the interval spans
    # the extreme seed pairs, 0.6 - 0.5 and 0.7 - 0.4.
    text = learning_curves.claim(runs_of(sac_glam_her=[0.6, 0.7], sac_glam=[0.4, 0.5]), "sac_glam_her", "sac_glam")
    assert text.startswith("- SAC-GLAM + HER - SAC-GLAM: +0.200 (2 vs 2 seeds)")
    assert "interval [+0.100, +0.300]" in text
    assert "p = 0.33 (the smallest 2 vs 2 seeds allow: 0.33): not significant" in text


@pytest.mark.parametrize("sign, verdict", [(1, "significant: the claim holds"), (-1, "significant: reversed")])
def test_four_seeds_each_fully_apart_are_significant_either_way(sign, verdict):
    # 4 vs 4 with every AUC of one side above the other's: 2 of the C(8, 4) = 70 splits are as extreme, p = 0.029.
    high, low = [0.6, 0.65, 0.7, 0.75], [0.3, 0.35, 0.4, 0.45]
    runs = runs_of(sac_glam=high if sign > 0 else low, ppo_glam=low if sign > 0 else high)
    text = learning_curves.claim(runs, "sac_glam", "ppo_glam")
    assert f"{0.3 * sign:+.3f} (4 vs 4 seeds)" in text
    assert f"p = 0.03 (the smallest 4 vs 4 seeds allow: 0.03): {verdict}" in text


def test_five_seeds_each_fully_apart_reach_the_studys_smallest_p_printed_with_three_decimals():
    # 2 of the C(10, 5) = 252 splits are as extreme: p = 0.0079, printed with three decimals (0.01 would overstate it).
    runs = runs_of(sac_glam=[0.1, 0.15, 0.2, 0.25, 0.3], ppo_glam=[0.5, 0.55, 0.6, 0.65, 0.7])
    text = learning_curves.claim(runs, "sac_glam", "ppo_glam")
    assert "-0.400 (5 vs 5 seeds)" in text
    assert "p = 0.008 (the smallest 5 vs 5 seeds allow: 0.008): significant: reversed" in text


def test_overlapping_seeds_are_a_tie_and_one_seed_gets_no_interval():
    # 0.5 0.7 | 0.6 0.8: the observed difference (-0.1) is matched or exceeded by 4 of the 6 splits.
    text = learning_curves.claim(runs_of(sac_glam=[0.5, 0.7], ppo_glam=[0.6, 0.8]), "sac_glam", "ppo_glam")
    assert "p = 0.67" in text and text.endswith("not significant at this budget.")
    text = learning_curves.claim(runs_of(sac_glam=[0.5, 0.7], ppo_glam=[0.6]), "sac_glam", "ppo_glam")
    assert text.endswith("(2 vs 1 seeds): no interval with a single seed, so nothing can be called significant.")


def test_a_paused_run_without_its_checkpoint_is_set_aside_and_not_read_as_a_second_seed(tmp_path, monkeypatch):
    # A piece paused on another machine left its events and log but no checkpoint: it restarts, so they move out
    # of runs/ and logs/ (other seeds and algorithms stay), and a second set-aside does not overwrite the first.
    stamps = iter(["20261202T190000", "20261202T200000", "20261202T210000"])
    monkeypatch.setattr(learning_curves.time, "strftime", lambda fmt: next(stamps) if fmt == "%Y%m%dT%H%M%S" else "")
    for run in ("PlaygroundText__sac_glam__3__111", "PlaygroundText__sac_glam__2__222", "PlaygroundText__ppo_glam__3__333"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "events").write_text(run)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "sac_glam_3.log").write_text("piece 1")
    moved = learning_curves.set_aside(tmp_path, "sac_glam", 3)
    first = tmp_path / "superseded" / "20261202T190000"
    assert sorted(moved) == [first / "logs" / "sac_glam_3.log", first / "runs" / "PlaygroundText__sac_glam__3__111"]
    assert (first / "runs" / "PlaygroundText__sac_glam__3__111" / "events").read_text() == "PlaygroundText__sac_glam__3__111"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "PlaygroundText__ppo_glam__3__333",
        "PlaygroundText__sac_glam__2__222",
    ]
    assert not (tmp_path / "logs" / "sac_glam_3.log").exists()
    (tmp_path / "logs" / "sac_glam_3.log").write_text("piece 2")
    learning_curves.set_aside(tmp_path, "sac_glam", 3)
    assert (first / "logs" / "sac_glam_3.log").read_text() == "piece 1"
    assert (tmp_path / "superseded" / "20261202T200000" / "logs" / "sac_glam_3.log").read_text() == "piece 2"
    assert learning_curves.set_aside(tmp_path, "sac_glam", 4) == []


def test_last_step_reads_the_last_progress_line(tmp_path):
    log = tmp_path / "sac_glam_1.log"
    assert learning_curves.last_step(log) == "no progress line yet"
    log.write_text(
        "# start at commit abc, 1 threads, CPU\n"
        "step       512/10,240 | 6 SPS | 1.4 min | updates 9\n"
        "step     1,024/10,240 | 6 SPS | 3.0 min | updates 25\n"
        "stopped by signal; resume with --resume checkpoints/x\n"
    )
    assert learning_curves.last_step(log) == "env step 1,024 of 10,240"


def test_the_study_on_one_cuda_device_keeps_the_gpu_and_bf16():
    # On the CPU the SmolLM2 runs are told --no-cuda; on one CUDA device every run uses it, in bf16 (native there).
    cpu = learning_curves.command("sac_glam", 2, 10_240, "", learning_curves.Args(actor="smollm2"))
    cuda = learning_curves.command("sac_glam", 2, 10_240, "", learning_curves.Args(actor="smollm2", device="cuda"))
    assert "--no-cuda" in cpu and "--no-bf16" not in cpu
    assert [a for a in cpu if a != "--no-cuda"] == cuda
    fp32 = learning_curves.command("ppo_glam", 2, 10_240, "", learning_curves.Args(actor="smollm2", bf16=False))
    assert "--no-bf16" in fp32 and "--no-cuda" in fp32
    assert "--no-cuda" not in learning_curves.tiny_settings("sac_glam", "m", learning_curves.Args(device="cuda"))


def test_a_run_at_its_last_step_when_stopped_is_done_and_one_short_of_it_is_paused(tmp_path, capsys):
    # Stand-ins for two runs still going when --max-minutes' SIGTERM comes: one has logged its last env step (it was
    # saving its final checkpoint), the other is midway; both save and exit 0 on the signal.
    stand_in = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
        "print('step {}/320 | 1 SPS', flush=True); time.sleep(60)"
    )
    args = learning_curves.Args(algos=("sac_glam", "ppo_glam"), jobs=2, max_minutes=0.25)

    def command_of(algo, seed):
        return [sys.executable, "-c", stand_in.format(320 if algo == "sac_glam" else 64)]

    learning_curves.run_all(args, tmp_path, [1], command_of)
    out = capsys.readouterr().out
    assert "done sac_glam seed 1 in " in out and "paused ppo_glam seed 1 at env step 64 of 320 after " in out, out
    assert (tmp_path / "done" / "sac_glam_1").exists() and not (tmp_path / "done" / "ppo_glam_1").exists()


def test_two_concurrent_tiny_runs_end_within_the_wall_clock_and_say_where_they_stopped(tmp_path, capsys):
    # Two real runs at once (the GPU study's one process per run, here on the CPU): the short one finishes and is
    # marked done; the endless one gets SIGTERM before --max-minutes, saves its checkpoint and its line says how far
    # it got; the call ends within the limit.
    model = learning_curves.build_model(tmp_path / "model")
    args = learning_curves.Args(algos=("sac_glam", "sac_glam_her"), jobs=2, max_minutes=0.75)

    def command_of(algo, seed):
        short = algo == "sac_glam"
        return learning_curves.command(algo, seed, 320 if short else 10**6, model, args) + ["--log-frequency", "64"] * short

    t0 = time.time()
    learning_curves.run_all(args, tmp_path, [1], command_of)
    assert time.time() - t0 < 0.75 * 60 + 15
    out = capsys.readouterr().out
    assert re.search(r"done sac_glam seed 1 in ", out), out
    assert re.search(r"paused sac_glam_her seed 1 at (env step [\d,]+ of 1,000,000|no progress line yet) after", out), out
    assert (tmp_path / "done" / "sac_glam_1").exists() and not (tmp_path / "done" / "sac_glam_her_1").exists()
    assert learning_curves.checkpoint_of(tmp_path, "sac_glam_her", 1) is not None
    # The finished run learned: updates at env steps 256, 288 and 320 (learning starts 256), 2 gradient updates each.
    last = re.findall(r"^step\s+([\d,]+)/320 .*\| updates (\d+) ", (tmp_path / "logs" / "sac_glam_1.log").read_text(), re.M)[
        -1
    ]
    assert last == ("320", "6")


def test_the_scripts_wait_in_sac_update_reads_the_smollm2_studys_sac_runs():
    # short_wait adds no flag to learning_curves.py's SmolLM2 command, so its runs are that study's SAC-GLAM runs:
    # sac_update.py reads them from there and refuses to run them a second time.
    spec = importlib.util.spec_from_file_location("sac_update", Path(__file__).parents[1] / "benchmarks" / "sac_update.py")
    sac_update = sys.modules["sac_update"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(sac_update)
    assert sac_update.VARIANTS["short_wait"][1] == []
    assert sac_update.RUNS_OF["short_wait"] == learning_curves.ROOT / "benchmarks" / "learning_curves_smollm2_runs"
    assert sac_update.wait([]) == (256, 576)  # learning starts 256, then 10 updates at one per 32 env steps


def test_a_runs_log_gives_where_its_actor_starts_learning(tmp_path):
    # The per-run table's entropy is read after the last progress line whose phase says the actor does not learn yet.
    (tmp_path / "logs").mkdir()
    lines = ["# start at commit abc1234, 2 threads, AMD EPYC", "PlaygroundText__sac_glam__1__1: m (decoder-only, bf16) on"]
    phases = [(512, "collecting"), (1024, "critic warm-up"), (1536, "critic warm-up"), (2048, "training")]
    lines += [f"step {s:>9,}/10,240 | 2 SPS | 1.0 min | updates 3 | success 0.300 | {p} | qf_loss 0.1" for s, p in phases]
    (tmp_path / "logs" / "sac_glam_1.log").write_text("\n".join(lines) + "\n")
    info = learning_curves.run_log(tmp_path, "sac_glam", "1")
    assert info["actor_from"] == 1536 and info["commit"] == "abc1234" and info["precision"] == "bf16"
    assert learning_curves.run_log(tmp_path, "ppo_glam", "1")["actor_from"] == 0  # no log: every logged point counts
