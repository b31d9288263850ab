"""`sparsecl report --table dst`: the continual-DST study's ACC/BWT/FWT table per (init, growth) x sparsity."""
import json

import pytest

from sparsecl import SparseCLError
from sparsecl.cli import main
from sparsecl.report import collect_results, render_dst_table


def fake_run(root, name, init, grow, sparsity, seed, acc, method="continual-dst"):
    d = root / name
    d.mkdir(parents=True)
    result = {"config": {"method": method, "benchmark": "seq-mnist", "seed": seed,
                         "method_options": {"init": init, "grow": grow, "sparsity": sparsity}},
              "accuracy": {"task_il": {"acc": acc, "bwt": 0.0, "fwt": acc - 50.0}}}
    (d / "result.json").write_text(json.dumps(result))


def test_dst_table_groups_by_init_growth_and_sparsity(tmp_path, capsys):
    fake_run(tmp_path, "a", "erk", "random", 0.8, 0, 90.0)
    fake_run(tmp_path, "b", "erk", "random", 0.8, 1, 92.0)
    fake_run(tmp_path, "c", "erk", "random", 0.95, 0, 80.0)
    fake_run(tmp_path, "d", "uniform", "random:2,gradient:3", 0.8, 0, 70.0)
    text = render_dst_table(collect_results([tmp_path]))
    lines = text.splitlines()
    assert lines[0].startswith("| benchmark | init | growth | ACC s=0.8 | BWT s=0.8 | FWT s=0.8 | ACC s=0.95")
    erk = next(line for line in lines if "| erk | random |" in line)
    assert "91.00 ± 1.41" in erk and "41.00 ± 1.41" in erk and "80.00 ± 0.00" in erk and erk.endswith("| 2,1 |")
    uni = next(line for line in lines if "| uniform | random:2,gradient:3 |" in line)
    assert "70.00 ± 0.00" in uni and "| - | - | - |" in uni  # no run at 0.95
    assert main(["report", str(tmp_path), "--table", "dst", "--format", "csv"]) == 0
    assert "erk,random,91.00 ± 1.41" in capsys.readouterr().out


def test_dst_table_needs_continual_dst_runs(tmp_path):
    fake_run(tmp_path, "a", "erk", "random", 0.8, 0, 90.0, method="der++")
    with pytest.raises(SparseCLError, match="no continual-dst runs"):
        render_dst_table(collect_results([tmp_path]))
