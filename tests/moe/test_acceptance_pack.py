"""bench/moe_acceptance.py --pack: the acceptance table is reproducible from an archive without weights."""

import json
import tarfile
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def acc(bench_module):
    return bench_module("moe_acceptance")


def _run(folder: Path, acc_: float, graph: bool):
    folder.mkdir(parents=True)
    test = {"acc": acc_, "min_routing_share": 0.2, "gate_entropy_per_sample": 1.0, "gate_entropy_batch_mean": 1.38,
            "active_flops_per_image": 1.5e7}
    info = {"metrics": {"test": test}, "params": 1000, "cost": {"total_bytes": 4000},
            "graph": {"sparsity": 0.5, "dist_from_identity": 0.3} if graph else None}
    (folder / "moe.json").write_text(json.dumps(info))
    (folder / "metrics.jsonl").write_text('{"kind": "start"}\n' * 200)
    (folder / "model.safetensors").write_bytes(b"\0" * 300_000)


def test_pack_leaves_out_weights_and_the_table_reads_the_same(acc, tmp_path, capsys):
    out = tmp_path / "acc"
    _run(out / "digits" / "graph_s0", 0.97, True)
    _run(out / "digits" / "flat_s0", 0.96, False)
    argv = ["--out", str(out), "--datasets", "digits", "--seeds", "0", "--table"]
    assert acc.main(argv + ["--pack", str(tmp_path / "small.tar.gz")]) == 0
    full = (out / "acceptance.md").read_text().splitlines()[2:]
    with tarfile.open(tmp_path / "small.tar.gz") as t:
        names = t.getnames()
        t.extractall(tmp_path / "x", filter="data")
    assert names and not any(n.endswith(".safetensors") for n in names)
    assert "acc/digits/graph_s0/moe.json" in names and "acc/digits/graph_s0/metrics.jsonl" in names
    assert "| digits | 0.50 | 0.300 | 97.00 | 96.00 | +1.00 |" in "\n".join(full)
    assert acc.main(["--out", str(tmp_path / "x" / "acc"), "--datasets", "digits", "--seeds", "0", "--table"]) == 0
    again = (tmp_path / "x" / "acc" / "acceptance.md").read_text().splitlines()[2:]
    assert again == full
    # above the size limit the logs go too, the table's inputs stay
    info = acc.pack(out, tmp_path / "tiny.tar.gz", max_mb=1e-4)
    assert not info["jsonl_kept"] and info["skipped_bytes"] >= 600_000
    with tarfile.open(tmp_path / "tiny.tar.gz") as t:
        assert not any(n.endswith(".jsonl") for n in t.getnames())
    capsys.readouterr()
    with pytest.raises(SystemExit):
        acc.main(["--out", str(out), "--variants", "graph,moe", "--table"])
