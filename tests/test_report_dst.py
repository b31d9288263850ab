"""`sparsecl report --table dst`: the continual-DST study's ACC/BWT/FWT table per (init, growth, BN) x
sparsity, and the per-task capacity table (backbone usage, share of each mask reused)."""
import json

import pytest

from sparsecl import SparseCLError
from sparsecl.cli import main
from sparsecl.report import collect_results, render_dst_table


def fake_run(root, name, init, grow, sparsity, seed, acc, method="continual-dst", per_task_bn=False, tasks=None,
             complete=True):
    d = root / name
    d.mkdir(parents=True)
    result = {"complete": complete, "config": {"method": method, "benchmark": "seq-mnist", "seed": seed,
                         "method_options": {"init": init, "grow": grow, "sparsity": sparsity,
                                            "per_task_bn": per_task_bn}},
              "accuracy": {"task_il": {"acc": acc, "bwt": 0.0, "fwt": acc - 50.0}},
              "method": {"tasks": tasks or []}}
    (d / "result.json").write_text(json.dumps(result))


def test_dst_table_groups_by_init_growth_bn_and_sparsity(tmp_path, capsys):
    fake_run(tmp_path, "a", "erk", "random", 0.8, 0, 90.0)
    fake_run(tmp_path, "b", "erk", "random", 0.8, 1, 92.0)
    fake_run(tmp_path, "c", "erk", "random", 0.95, 0, 80.0)
    fake_run(tmp_path, "d", "uniform", "random:2,gradient:3", 0.8, 0, 70.0)
    fake_run(tmp_path, "e", "erk", "random", 0.8, 0, 50.0, per_task_bn=True)
    fake_run(tmp_path, "f", "erk", "random", 0.8, 2, 10.0, complete=False)  # unfinished: left out
    text = render_dst_table(collect_results([tmp_path]))
    lines = text.splitlines()
    assert lines[0].startswith("| benchmark | init | growth | BN | ACC s=0.8 | BWT s=0.8 | FWT s=0.8 | ACC s=0.95")
    erk = next(line for line in lines if "| erk | random | shared |" in line)
    assert "91.00 ± 1.41" in erk and "41.00 ± 1.41" in erk and "80.00 ± 0.00" in erk and erk.endswith("| 2,1 |")
    per_task = next(line for line in lines if "| erk | random | per-task |" in line)
    assert "50.00 ± 0.00" in per_task  # not mixed into the shared-BN row
    uni = next(line for line in lines if "| uniform | random:2,gradient:3 | shared |" in line)
    assert "70.00 ± 0.00" in uni and "| - | - | - |" in uni  # no run at 0.95
    assert "Backbone used" not in text  # no capacity records in these runs
    assert main(["report", str(tmp_path), "--table", "dst", "--format", "csv"]) == 0
    assert "erk,random,shared,91.00 ± 1.41" in capsys.readouterr().out


def test_dst_capacity_table_per_task_usage_and_reuse(tmp_path):
    def tasks(used, reused):
        return [{"task": i + 1, "used_fraction": u, "reused_fraction": r} for i, (u, r) in enumerate(zip(used, reused))]

    fake_run(tmp_path, "a", "uniform", "gradient", 0.8, 0, 90.0, tasks=tasks([0.2, 0.36], [0.0, 0.2]))
    fake_run(tmp_path, "b", "uniform", "gradient", 0.8, 1, 92.0, tasks=tasks([0.2, 0.38], [0.0, 0.1]))
    text = render_dst_table(collect_results([tmp_path]))
    table = text.split("Backbone used after each task")[1].splitlines()
    assert "| benchmark | init | growth | BN | sparsity | task 1 | task 2 |" in table
    assert "| seq-mnist | uniform | gradient | shared | 0.8 | 20.0 (0.0) | 37.0 (15.0) |" in table


def test_dst_table_needs_continual_dst_runs(tmp_path):
    fake_run(tmp_path, "a", "erk", "random", 0.8, 0, 90.0, method="der++")
    with pytest.raises(SparseCLError, match="no continual-dst runs"):
        render_dst_table(collect_results([tmp_path]))
