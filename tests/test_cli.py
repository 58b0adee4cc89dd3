"""The snp-fx command: prune/inspect, budgets, and one-line errors with exit code 2."""
import json

import pytest

from snp_fx.cli import main


def test_prune_prints_report_and_writes_plan(tmp_path, capsys):
    rc = main(["prune", "deit_tiny_patch16_224", "--ratios", "qk=0.5,v=0.25,ffn=0.3,residual=0.2",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| blocks.0.attn | 3/3 | 32/64 | 48/64 |" in out
    assert "| residual | residual | 154/192 |" in out and "params" in out and "MACs" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["format"] == "snp_fx.plan/1"
    assert len(plan["groups"]["residual"]["keep"]) == 154


def test_prune_to_a_macs_target(capsys):
    assert main(["prune", "deit_tiny_patch16_224", "--target-macs", "0.5", "--round-to", "8"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("MACs"))
    assert "(49." in line or "(50." in line


def test_inspect(capsys):
    assert main(["inspect", "deit_tiny_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "Attention sites" in out and "blocks.11.attn" in out


@pytest.mark.parametrize("argv, message", [
    (["prune", "no_such_model"], "unknown timm model"),
    (["prune", "deit_tiny_patch16_224", "--ratios", "qk:0.5"], "bad ratio"),
    (["prune", "deit_tiny_patch16_224", "--ratios", "qk=1.5"], "must be a number in [0, 1)"),
    (["prune", "deit_tiny_patch16_224", "--target-macs", "lots"], "bad target"),
    (["prune", "deit_tiny_patch16_224", "--target-macs", "1k"], "below what one channel"),
    (["prune", "deit_tiny_patch16_224", "--config", "/no/such/file.json"], "cannot read ratio file"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("snp-fx: error:") and message in err[0]
