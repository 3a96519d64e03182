"""nnunet-ima-eval over several processes: the units and their assignment, shards computed one
after the other and merged, torchrun with the gloo backend, and what a merge refuses.

The fast tests run the sharding engine on a tiny network (tests/core_models.py) against
:func:`iter_ensemble`, the one-process computation; the slow ones run nnunet-ima-eval on the
session's trained nnU-Net model and compare the merged files with a one-process run's.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from nnunet_ima.evaluation import cli
from nnunet_ima.evaluation.cli import main
from nnunet_ima.evaluation.ensemble import iter_ensemble
from nnunet_ima.evaluation.provenance import PartRecords
from nnunet_ima.evaluation.robustness import AttackSettings
from nnunet_ima.evaluation.sharding import (MissingUnits, Shard, Unit, UnitPlan, assign,
                                            parse_shard, rank_device, run_shard, shard_folder,
                                            torchrun_launch, unit_path)

from core_models import tiny_segmentation_problem

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- small pieces

def test_parse_shard():
    assert parse_shard("1/4") == Shard(1, 4) and str(Shard(1, 4)) == "1/4"
    assert Shard(1, 4).name == "1-of-4"
    for bad in ("4/4", "-1/2", "1/0", "1", "a/b", "1/2/3"):
        with pytest.raises(ValueError, match="0 <= I < N"):
            parse_shard(bad)


def test_torchrun_environment_and_rank_devices():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    launch = torchrun_launch(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 4, 1)
    assert launch.shard == Shard(3, 4)
    assert torchrun_launch({**env, "WORLD_SIZE": "1", "RANK": "0"}) is None  # one process
    assert torchrun_launch({"RANK": "0", "WORLD_SIZE": "2"}) is None  # not torchrun's
    assert torchrun_launch({}) is None
    assert rank_device("cuda", 2) == "cuda:2"
    assert rank_device("cuda:0", 2) == "cuda:0"  # named explicitly: kept
    assert rank_device("cpu", 2) == "cpu"


def test_nproc_relaunches_the_command_through_torchrun(monkeypatch, capsys):
    argv = ["-d", "2", "--nproc", "4", "-o", "out", "--noise", "0", "--device", "cpu"]
    launched = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command: launched.append(command) or 0)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert main(argv) == 0
    assert launched == [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nnodes", "1", "--nproc_per_node", "4", "-m",
                         "nnunet_ima.evaluation.cli", "-d", "2", "-o", "out", "--noise", "0",
                         "--device", "cpu"]]
    assert cli._without_nproc(["--nproc=2", "-o", "x"]) == ["-o", "x"]
    with pytest.raises(SystemExit):  # --nproc makes the shards itself
        main(argv + ["--shard", "0/2"])
    assert "--nproc and --shard" in capsys.readouterr().err
    # Under torchrun each rank is a shard: a --shard of its own is refused before any work.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["-d", "2", "--device", "cpu", "-o", "out", "--shard", "0/2"]) == 2
    assert "torchrun already makes each rank a shard" in capsys.readouterr().err


def _unit(cost, k):
    return Unit("m", 1.0, None, 0, k, (k,), cost)


def test_assignment_gives_every_unit_one_shard_and_balances_the_load():
    rng = np.random.default_rng(0)
    for count in (1, 2, 3, 7):
        units = [_unit(int(c), k) for k, c in enumerate(rng.integers(1, 100, 40))]
        owners = assign(units, count)
        assert len(owners) == len(units) and set(owners) <= set(range(count))
        loads = [sum(u.cost for u, o in zip(units, owners) if o == s) for s in range(count)]
        # Longest first to the least loaded: no shard ends more than one unit above another.
        assert max(loads) - min(loads) <= max(u.cost for u in units)
        assert owners == assign(units, count)  # the same answer on every shard
    # Equal units: counts differ by at most one; longer units go first, then by order.
    owners = assign([_unit(5, k) for k in range(7)], 3)
    assert sorted(owners.count(s) for s in range(3)) == [2, 2, 3]
    assert owners == [0, 1, 2, 0, 1, 2, 0]
    # A clean pass (cost 1 per voxel) weighs less than an attack (3 x steps per voxel): three
    # clean units and one attack unit on two shards -> the attack alone on one shard.
    owners = assign([_unit(1, 0), _unit(1, 1), _unit(1, 2), _unit(30, 3)], 2)
    assert owners == [1, 1, 1, 0]


# ---------------------------------------------------- the engine against one process's answer

MEMBERS = ("pgd", "segpgd")
NOISE = (0.0, 1.0, 20.0)


def _plan(tmp_path, count, model, samples, base):
    records = PartRecords({"models": {model.name: {"n_slices": len(samples)}}, "steps": base.steps},
                          {model.name: "samples"}, {model.name: {"path": "", "sha256": ""}})
    return UnitPlan(str(tmp_path), count, [model], {model.name: samples}, NOISE, base, MEMBERS,
                    records)


def _same(a, b):
    assert a.cases == b.cases and a.slices == b.slices
    for name in ("tp", "fp", "fn", "objects"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.objects is not None  # the size breakdown's counts travel through the units
    assert a.example.keys() == b.example.keys()
    for key in a.example:
        assert np.array_equal(a.example[key], b.example[key]), key


@pytest.mark.usefixtures("one_thread")
def test_shards_run_one_after_the_other_assemble_what_one_process_computes(tmp_path):
    model, samples = tiny_segmentation_problem()
    base = AttackSettings(steps=3, batch_size=2, seed=1)
    one = dict(iter_ensemble(model, samples, NOISE, base, MEMBERS, CPU))

    def no_wait(phase):
        pass

    # Shard 0 alone: the first member's share, then segpgd's samples depend on shard 1.
    first = run_shard(_plan(tmp_path, 2, model, samples, base), Shard(0, 2), CPU, no_wait)
    assert not first.done and first.computed > 0
    assert first.waiting.phase == 0 and first.waiting.owners() == [1]
    # Shard 1 finds shard 0's units of pgd and does its whole share; shard 0 again finishes.
    second = run_shard(_plan(tmp_path, 2, model, samples, base), Shard(1, 2), CPU, no_wait)
    assert second.done
    again = run_shard(_plan(tmp_path, 2, model, samples, base), Shard(0, 2), CPU, no_wait)
    assert again.done and again.reused == first.computed and again.computed > 0

    plan = _plan(tmp_path, 2, model, samples, base)
    parts = plan.finished_parts()[model.name]
    for noise in NOISE:
        members = MEMBERS if noise > 0 else MEMBERS[:1]
        assert list(parts[noise]) == list(members)
        for member in members:
            result, attacked, _ = parts[noise][member]
            _same(result, one[noise].members[member])
            assert attacked == one[noise].attacked[member]
    # segpgd attacks only what pgd left unbroken: at 20 five of the six samples, in batches of
    # those five (other batches, other random starts than pgd's).
    assert one[20.0].attacked["segpgd"] == len(samples) - 1
    # Every unit of every phase was computed exactly once, by its shard.
    files = {s: set(os.listdir(os.path.join(shard_folder(str(tmp_path), Shard(s, 2)), "units")))
             for s in (0, 1)}
    assert not files[0] & files[1]
    expected = {os.path.basename(unit_path("", u)) for p in range(2) for u in plan.units(p)}
    assert files[0] | files[1] == expected
    assert 0 < len(files[0]) and 0 < len(files[1])
    # Three batches of two at each level (the clean pass at 0), then segpgd's: 3 at noise 1,
    # 3 (2 + 2 + 1) at noise 20.
    assert len(plan.units(0)) == 3 * 3 and len(plan.units(1)) == 3 + 3
    assert [u.rows for u in plan.units(1) if u.noise == 20.0] == [(0, 1), (2, 3), (4,)]


@pytest.mark.usefixtures("one_thread")
def test_volumes_are_units_of_their_own(tmp_path):
    from test_eval_3d import tiny_3d_problem  # the 3D evaluator's tiny model and cases
    model, samples = tiny_3d_problem(cases=4)
    base = AttackSettings(steps=2, batch_size=16, seed=0)
    noise = (0.0, 0.5, 3.0)
    one = dict(iter_ensemble(model, samples, noise, base, MEMBERS, CPU))
    records = PartRecords({"models": {model.name: {}}}, {model.name: "volumes"},
                          {model.name: {"path": "", "sha256": ""}})

    def plan():
        return UnitPlan(str(tmp_path), 3, [model], {model.name: samples}, noise, base, MEMBERS,
                        records)
    # A volume is attacked alone (a batch of one): 3 levels x 4 volumes are 12 units, so the
    # shards share even one model at few noise levels. Of 6 x 10 x 10 voxels each, an attack
    # unit costs 600 x 3 x 2 steps = 3600, a clean one 600: two shards take three attacks,
    # the third two attacks and the four clean passes.
    loads = [sorted(u.cost for u in plan().share(0, s)) for s in range(3)]
    assert loads == [[3600] * 3, [3600] * 3, [600] * 4 + [3600] * 2]
    for shard in (0, 1, 2, 0, 1, 2):  # one after the other, each continuing where it stopped
        run_shard(plan(), Shard(shard, 3), CPU, lambda phase: None)
    parts = plan().finished_parts()[model.name]
    for n in noise:
        for member in (MEMBERS if n > 0 else MEMBERS[:1]):
            _same(parts[n][member][0], one[n].members[member])
            assert parts[n][member][1] == one[n].attacked[member]
    assert "plane" in parts[3.0]["pgd"][0].example  # the example is a slice of its volume


@pytest.mark.usefixtures("one_thread")
def test_a_unit_of_other_settings_is_not_taken(tmp_path):
    model, samples = tiny_segmentation_problem()
    base = AttackSettings(steps=2, batch_size=3, seed=0)
    plan = _plan(tmp_path, 1, model, samples, base)
    assert run_shard(plan, Shard(0, 1), CPU, lambda phase: None).done
    # The same files read by a plan of 3 steps: every unit's record differs.
    other = _plan(tmp_path, 1, model, samples, AttackSettings(steps=3, batch_size=3, seed=0))
    with pytest.raises(MissingUnits) as e:
        other.finished_parts()
    assert all("made with other settings" in reason and "steps" in reason
               for _, _, reason in e.value.missing)
    assert len(e.value.missing) == len(other.units(0))


# ------------------------------------------------- nnunet-ima-eval on a trained nnU-Net model

MODEL = "nnUNetTrainerClean"


def _args(ws, out, *extra):
    return ["-d", str(ws.dataset_id), "-c", "2d", "-f", "0", "-tr", MODEL, "--device", "cpu",
            "--no-progress", "-o", str(out), *extra]


def _results(out):
    """summary.json without its measurements, which two runs of one evaluation do not share:
    ``peak_memory`` (each process's own) and, under an ensemble, ``ensemble.seconds`` (wall
    time); then per_slice.csv, tvdi.md and adi.md as text."""
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("peak_memory")
    summary.get("ensemble", {}).pop("seconds", None)
    return summary, (out / "per_slice.csv").read_text()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outputs(out):
    return {f for f in ("summary.json", "per_slice.csv", "tvdi.md", "adi.md", "curves.png",
                        "examples.png", "parts", "config.json") if (out / f).exists()}


@pytest.mark.usefixtures("one_thread")
def test_two_torchrun_processes_write_what_one_process_writes(nnunet_workspace,
                                                              trained_clean_model, tmp_path):
    ws = nnunet_workspace
    # An ensemble of two: the second member's samples depend on both ranks' first-member
    # results, so the ranks meet at a barrier between the members.
    common = ("--attack", "ensemble", "--ensemble", "pgd", "segpgd", "--noise", "0", "8", "40",
              "--max-slices", "6", "--steps", "2", "--batch-size", "2", "--masking-checks", "off")
    assert main(_args(ws, tmp_path / "one", *common)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("NNUNET_IMA_CONFIG", None)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
         "--master_port", str(_free_port()), "-m", "nnunet_ima.evaluation.cli",
         *_args(ws, tmp_path / "two", *common)],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert _results(tmp_path / "two") == _results(tmp_path / "one")
    for table in ("tvdi.md", "adi.md"):  # but for the seconds column of the per-attack table
        strip = lambda text: [line.rsplit("|", 2)[0] for line in text.splitlines()]
        assert strip((tmp_path / "two" / table).read_text()) == \
            strip((tmp_path / "one" / table).read_text())
    # Both ranks worked, each in its own folder, and rank 0 merged; the tables came once.
    for rank in (0, 1):
        assert f"shard {rank}/2: " in run.stdout
        assert os.listdir(tmp_path / "two" / "shards" / f"{rank}-of-2" / "units")
    assert run.stdout.count("results in ") == 1 and "merged 2 shards" in run.stdout
    assert run.stdout.count(f"{MODEL}: 6 slices of") == 1  # rank 0 names the samples
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["peak_memory"][MODEL]["shards"] == 2
    # The parts are those one process writes (their records differ in time and host only).
    assert sorted(os.listdir(tmp_path / "two" / "parts")) == \
        sorted(os.listdir(tmp_path / "one" / "parts"))
    # At 40 pgd breaks some slices and segpgd attacks the others only, in batches of those:
    # the units it needs from both ranks' pgd results.
    attacked = summary["ensemble"]["attacked"][MODEL]
    assert attacked["40"]["segpgd"] < attacked["40"]["pgd"] == 6


@pytest.mark.usefixtures("one_thread")
def test_shards_one_after_the_other_then_merge(nnunet_workspace, trained_clean_model, tmp_path,
                                              capsys):
    ws = nnunet_workspace
    common = ("--noise", "0", "4", "--max-slices", "5", "--steps", "2", "--batch-size", "2")
    out = tmp_path / "sharded"
    assert main(_args(ws, tmp_path / "one", *common)) == 0
    capsys.readouterr()

    assert main(_args(ws, out, *common, "--shard", "0/2")) == 0
    said = capsys.readouterr().out
    assert "shard 0/2: " in said and f"nnunet-ima-eval merge {out}" in said
    assert "TVDI" not in said and not _outputs(out)  # a shard writes no table

    # (c) A missing shard: the merge names it and writes nothing.
    assert main(["merge", str(out), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"shard 1/2 has not run (no {out / 'shards' / '1-of-2'})" in err, err
    assert not _outputs(out)

    # (d) Shard 1 run with other settings: refused at the merge, naming the setting.
    assert main(_args(ws, out, *common, "--steps", "3", "--shard", "1/2")) == 0
    capsys.readouterr()
    assert main(["merge", str(out), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "shard 1/2 ran with other settings than shard 0/2 (differences in: steps)" in err, err
    assert not _outputs(out)
    # Its folder is not silently replaced either: that takes --overwrite.
    assert main(_args(ws, out, *common, "--shard", "1/2")) == 2
    assert "holds results made with other settings (differences in: steps)" in \
        capsys.readouterr().err
    assert main(_args(ws, out, *common, "--shard", "1/2", "--overwrite")) == 0
    capsys.readouterr()

    # (b) The merge writes what one process writes.
    assert main(["merge", str(out), "--device", "cpu", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "merged 2 shards" in said and "TVDI (%)" in said
    assert _results(out) == _results(tmp_path / "one")
    for name in ("tvdi.md", "adi.md", "config.json"):
        assert (out / name).read_text() == (tmp_path / "one" / name).read_text()
    assert sorted(os.listdir(out / "parts")) == sorted(os.listdir(tmp_path / "one" / "parts"))
    # A plain rerun in the merged folder resumes from every part, as in any finished folder.
    assert main(_args(ws, out, *common)) == 0
    assert "resuming: reused 2 of 2 (model, noise) results" in capsys.readouterr().out
    assert _results(out) == _results(tmp_path / "one")
