"""refgen moe compress: pruning, low-rank, QAT and the runner on the digits model (numbers are this tiny model's;
the spec's thresholds are checked by the runner's pass flags, not asserted here)."""

import copy
import json

import pytest
import torch
import torch.nn as nn

from refgen.moe import manifest as mf
from refgen.moe.compress import CompressConfig, compress_run
from refgen.moe.export import deployable_from_info
from refgen.moe.lowrank import factorize, factorize_layer, rank_for_energy
from refgen.moe.prune import num_params, prune_iterative
from refgen.moe.qat import fold_batchnorm
from refgen.moe.train import load_model


@pytest.fixture(scope="module")
def deployable(trained_digits):
    model, info = load_model(trained_digits[0])
    return deployable_from_info(model, info)


def test_structured_pruning_removes_channels_in_three_steps_and_keeps_the_interfaces(deployable):
    m = copy.deepcopy(deployable)
    n0 = num_params(m)
    x = torch.rand(5, 1, 8, 8)
    recs = prune_iterative(m, 0.5, 3, x[:2])
    kept = [r["params_kept"] for r in recs]
    assert len(recs) == 3 and kept[0] > kept[1] > kept[2] and kept[2] < 0.6
    assert num_params(m) < n0
    lg, pr = m(x)
    assert lg.shape == (5, 10) and pr.shape == (5, 4)  # classes and experts untouched
    e = m.model.experts[0]
    assert e[-2].out_features == 48 and e[0][0].out_channels < 24  # expert_dim kept, conv channels pruned
    assert m.model.graph.weight.shape == (4, 4)


def test_pruning_maps_a_pooled_channel_to_its_pool_x_pool_inputs_of_the_expert_linear():
    """pool 2 (the MNIST recipes): removing a conv channel removes its 4 flattened inputs of the expert's Linear
    (torch-pruning 1.6 on torch 2.x mapped it to one input: the MNIST-5k prune failed with a shape error)."""
    import torch_pruning as tp

    from refgen.moe.export import Deployable
    from refgen.moe.model import MoEClassifier, MoEModelConfig
    from refgen.moe.prune import _fix_flatten_mappings

    torch.manual_seed(0)
    cfg = MoEModelConfig(num_experts=4, top_k=2, stem_channels=16, expert_channels=24, expert_dim=48, pool=2,
                         expert_stages=2, gate_hidden=0, gate_norm="bn", gate_bias=False)
    x = torch.rand(3, 1, 28, 28)
    m = Deployable(MoEClassifier(cfg, 1, 10), [0.5], [0.25]).eval()
    m2 = copy.deepcopy(m)
    prune_iterative(m2, 0.4, 3, x[:2])  # the whole pipeline runs on pool 2
    assert m2(x)[0].shape == (3, 10)
    assert m2.model.experts[0][-2].in_features == 4 * [c for c in m2.model.experts[0].modules()
                                                         if isinstance(c, nn.Conv2d)][-1].out_channels
    # one chosen group: channels 0 and 5 of expert 0's last conv -> inputs 0-3 and 20-23 of its Linear go
    w0 = m.model.experts[0][-2].weight.detach().clone()
    dg = tp.DependencyGraph().build_dependency(m, x[:2], output_transform=lambda o: o[0].sum() + o[1].sum())
    assert _fix_flatten_mappings(dg) >= 4  # one flatten per expert
    conv = [c for c in m.model.experts[0].modules() if isinstance(c, nn.Conv2d)][-1]
    dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0, 5]).prune()
    gone = {0, 1, 2, 3, 20, 21, 22, 23}
    assert torch.equal(m.model.experts[0][-2].weight, w0[:, [i for i in range(96) if i not in gone]])
    assert m(x)[0].shape == (3, 10)


def test_rank_for_energy_and_factor_reconstruction():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(s, 9 / 14) == 1 and rank_for_energy(s, 13 / 14) == 2 and rank_for_energy(s, 1.0) == 3
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    lin.weight.data = torch.randn(64, 4) @ torch.randn(4, 64) + 1e-3 * torch.randn(64, 64)  # rank 4 + noise
    new, r = factorize_layer(lin, 0.999)
    assert r == 4
    x = torch.randn(8, 64)
    assert (new(x) - lin(x)).abs().max() < 0.05
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    assert factorize_layer(conv, 1.0) is None  # full rank 32: 32 x (144 + 32) > 144 x 32, no saving
    new, r = factorize_layer(conv, 0.5)
    x = torch.randn(2, 16, 8, 8)
    assert new(x).shape == conv(x).shape and r < 16


def test_factorize_skips_the_gate_and_saves_parameters(deployable):
    new, ranks = factorize(deployable, 0.7, skip=("model.gate", "model.graph"))
    assert ranks and not any(k.startswith(("model.gate", "model.graph")) for k in ranks)
    assert num_params(new) < num_params(deployable)
    assert num_params(deployable) == sum(p.numel() for p in deployable.parameters())  # the original is untouched


def test_fold_batchnorm_keeps_the_function(deployable):
    m = fold_batchnorm(copy.deepcopy(deployable).eval())
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert (m(x)[0] - deployable(x)[0]).abs().max() < 1e-4


def test_compress_runner_writes_every_variant_with_bytes_and_drops(trained_digits, digits, tmp_path):
    cfg = CompressConfig(qat_epochs=1, prune_ratio=0.3, lowrank_energies=(0.8, 0.95))
    res = compress_run(trained_digits[0], tmp_path, cfg, data=digits, progress=False)
    by = {v["method"]: v for v in res["variants"]}
    ablations = {"int8-experts", "int8-experts+gate", "int4-experts", "int4-experts+gate", "prune-experts",
                 "prune-experts+ptq"}
    assert set(by) - {"lowrank", "lowrank+ptq", "lowrank+int4"} == {"ptq", "qat", "prune", "prune+ptq", "prune+int4",
                                                                     "int4"} | ablations
    assert {"lowrank", "lowrank+ptq", "lowrank+int4"} <= set(by) or "error" in by.get("lowrank", {})
    ref = res["reference"]
    for name, v in by.items():
        if "error" in v:
            continue
        f = tmp_path / v["artifact"]  # every file, measured (int4 storage is one file)
        assert v["bytes"] == (f.stat().st_size if f.suffix == ".safetensors" else mf.artifact_bytes(f)["total"])
        assert v["drop_pp"] == pytest.approx(100 * (v["acc"] - ref["acc"]))
        assert v["pass"] in (True, False, None)
    assert by["ptq"]["bytes"] < ref["bytes_fp32"] and by["qat"]["bytes"] < ref["bytes_fp32"]
    assert by["prune"]["bytes"] < ref["bytes_fp32"]       # structured pruning really shrinks the files
    assert by["qat"]["gate_topk_agreement"] >= 0.98        # stem and gate stayed float and frozen
    for d in ("baseline", "qat", "prune", "int4", "ablate/int8-experts+gate", "ablate/int4-experts",
              "ablate/prune-experts"):
        mf.verify(tmp_path / d)
    for name in ablations | {"int4"}:
        assert 0 <= by[name]["gate_topk_agreement"] <= 1
    assert by["int4-experts"]["gate_topk_agreement"] == 1.0  # a float gate on the float stem: the same teams
    assert by["int4"]["bytes"] < by["ptq"]["bytes"]
    _check_combined_int4(by, tmp_path, digits, "prune")
    if "lowrank+int4" in by:  # vs the float model's int4: test_lowrank_int4_... (here low-rank may save ~nothing)
        assert by["lowrank+int4"]["bytes"] < min(by["lowrank"]["bytes"], by["lowrank+ptq"]["bytes"])
    assert (tmp_path / "compress_acc_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| int4-experts+gate |" in (tmp_path / "compress.md").read_text()
    steps = [json.loads(ln) for ln in (tmp_path / "compress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "prune_step"] == [1, 2, 3]
    for r in steps:  # a method's log line is its own row, not the `+int4` row appended after it
        if r["kind"] == "method" and r["method"] in by and "error" not in by[r["method"]]:
            assert (r["bytes"], r["acc"], r["pass"]) == tuple(by[r["method"]][k_] for k_ in ("bytes", "acc", "pass"))
    assert "| ptq |" in (tmp_path / "compress.md").read_text()


def _check_combined_int4(by, out, digits, parent):
    """PARENT's `+int4` row: smaller than each artifact of its parent and than the float model's int4, its bytes
    are every file the artifact has, and that file alone loads into a model that gives the row's accuracy."""
    import shutil

    from refgen.moe import int4
    from refgen.moe.export import torch_outputs
    from refgen.moe.onnxrun import to_input

    v = by[parent + "+int4"]
    assert "error" not in v and v["precision"] == "int4" and v["parent"] == parent
    assert v["bytes"] < min(by[parent]["bytes"], by[parent + "+ptq"]["bytes"], by["int4"]["bytes"])
    d = out / (parent + "+int4")
    man = mf.verify(d)
    assert man["deployable_files"] == [int4.FILE]  # one file, and the folder holds nothing else it needs
    assert {p.name for p in d.iterdir()} == {int4.FILE, mf.MANIFEST}
    assert v["bytes"] == man["deployable_bytes"] == (d / int4.FILE).stat().st_size
    assert 0 <= v["gate_topk_agreement"] <= 1 and 0 <= v["gate_topk_agreement_vs_float"] <= 1
    alone = out / "alone" / parent
    alone.mkdir(parents=True)
    shutil.copy(d / int4.FILE, alone)
    lg, pr = torch_outputs(int4.load(alone / int4.FILE), to_input(digits.x_test))
    assert float((lg.argmax(1) == digits.y_test).mean()) == v["acc"] and pr.shape == (len(digits.y_test), 4)


def test_lowrank_int4_is_smaller_than_low_rank_and_than_int4_alone(trained_digits, digits, tmp_path):
    """Energy 0.7 forced (any drop accepted: this tests the storage, not the rank rule)."""
    cfg = CompressConfig(methods=("lowrank", "int4"), lowrank_energies=(0.7,), lowrank_max_drop_pp=100.0)
    res = compress_run(trained_digits[0], tmp_path, cfg, data=digits, progress=False)
    by = {v["method"]: v for v in res["variants"]}
    assert [v["method"] for v in res["variants"]] == ["lowrank", "lowrank+ptq", "lowrank+int4", "int4"]
    assert by["lowrank+int4"]["parent_bytes"] == {"lowrank": by["lowrank"]["bytes"],
                                                  "lowrank+ptq": by["lowrank+ptq"]["bytes"]}
    _check_combined_int4(by, tmp_path, digits, "lowrank")
    assert "| lowrank+int4 | lowrank+int4/model_int4.safetensors |" in (tmp_path / "compress.md").read_text()


def test_int4_storage_rebuilds_a_pruned_and_factorised_model(deployable, tmp_path):
    """Stored all fp32, a pruned then factorised model comes back with its architecture and its outputs."""
    from refgen.moe import int4

    m = copy.deepcopy(deployable)
    x = torch.rand(6, 1, 8, 8)
    prune_iterative(m, 0.4, 1, x[:2])
    m, ranks = factorize(m, 0.7, skip=("model.gate", "model.graph"))
    assert ranks
    st = int4.save(m.eval(), tmp_path / "a.safetensors", {"model.experts": "fp32"})
    assert st["layers"] > len(ranks)  # the factors and the pruned layers
    r = int4.load(tmp_path / "a.safetensors")
    assert [(n, type(c).__name__) for n, c in r.named_modules()] == [(n, type(c).__name__)
                                                                      for n, c in m.named_modules()]
    with torch.no_grad():
        for a, b in zip(r(x), m(x)):
            assert torch.allclose(a, b, atol=1e-5)  # the factors' memory layout changes float rounding only
    plain = int4.save(deployable, tmp_path / "b.safetensors", {"model.experts": "int4"})
    assert plain["layers"] == 0
    with pytest.raises(ValueError, match="cannot store layer 'model.head'"):
        m.model.head = nn.Identity()
        int4.save(m, tmp_path / "c.safetensors", {"model.experts": "int4"})
    assert not (tmp_path / "c.safetensors").exists()


def test_experts_only_pruning_keeps_the_stem(deployable):
    m = copy.deepcopy(deployable)
    stem = [c.out_channels for c in m.model.stem.modules() if isinstance(c, nn.Conv2d)]
    convs0 = sum(c.out_channels for c in m.model.experts.modules() if isinstance(c, nn.Conv2d))
    prune_iterative(m, 0.5, 2, torch.rand(2, 1, 8, 8), experts_only=True)
    assert [c.out_channels for c in m.model.stem.modules() if isinstance(c, nn.Conv2d)] == stem
    assert sum(c.out_channels for c in m.model.experts.modules() if isinstance(c, nn.Conv2d)) < convs0
    assert m(torch.rand(3, 1, 8, 8))[0].shape == (3, 10)


def test_int4_pack_unpack_is_exact_and_dequantised_error_is_at_most_half_a_step():
    from refgen.moe import int4

    v = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(v, v).reshape(-1)  # every value in the low and in the high nibble
    packed = int4.pack_int4(pairs)
    assert packed.dtype == torch.uint8 and packed.numel() == pairs.numel() // 2
    assert torch.equal(int4.unpack_int4(packed, pairs.numel()), pairs)
    odd = v[:15]
    assert int4.pack_int4(odd).numel() == 8 and torch.equal(int4.unpack_int4(int4.pack_int4(odd), 15), odd)
    with pytest.raises(ValueError, match="int4 values"):
        int4.pack_int4(torch.tensor([8]))
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 0.0, 2.0]).view(6, 1, 1, 1)
    for prec, qmax in (("int4", 7), ("int8", 127)):
        q, scale = int4.quantize(w, prec)
        assert scale.shape == (6,) and int(q.abs().max()) <= qmax
        err = (int4.dequantize(q, scale) - w).abs()
        assert (err <= scale.view(-1, 1, 1, 1) / 2 + 1e-6 * scale.view(-1, 1, 1, 1)).all()
    assert torch.equal(int4.dequantize(*int4.quantize(w, "int4"))[4], torch.zeros(5, 3, 3))  # an all-zero channel


def test_int4_artifact_is_smaller_than_int8_and_loads_into_a_runnable_model(trained_digits, digits, tmp_path):
    from safetensors.torch import load_file

    from refgen.moe import int4

    res = compress_run(trained_digits[0], tmp_path, CompressConfig(methods=("ptq", "int4")), data=digits,
                       progress=False)
    by = {v["method"]: v for v in res["variants"]}
    f = tmp_path / "int4" / int4.FILE
    assert by["int4"]["bytes"] == f.stat().st_size < by["ptq"]["bytes"] == res["reference"]["bytes_int8"]
    man = mf.verify(tmp_path / "int4")
    assert man["deployable"] == int4.FILE and man["deployable_bytes"] == f.stat().st_size
    stored = load_file(str(f))
    w = "model.experts.0.0.0.weight"
    assert stored[w].dtype == torch.uint8 and stored["model.gate.1.weight"].dtype == torch.int8
    assert stored["model.head.weight"].dtype == torch.float32  # int4_other: fp32
    m = int4.load(f)
    model, info = load_model(trained_digits[0])
    ref = deployable_from_info(model, info)
    assert m.model.experts[0][0][0].weight.shape == ref.model.experts[0][0][0].weight.shape
    x = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        lg, pr = m(x)
        assert lg.shape == (7, 10) and pr.shape == (7, 4)
        assert torch.equal(m.model.head.weight, ref.model.head.weight)  # fp32 tensors unchanged
        assert not torch.equal(m.model.experts[0][0][0].weight, ref.model.experts[0][0][0].weight)
    assert by["int4"]["drop_pp"] >= -5 and by["int4"]["values"]["int4"] > 0


def test_config_yaml_mirror_and_checks():
    cfg = CompressConfig.from_yaml("configs/moe_compress.yaml")
    assert cfg == CompressConfig()
    with pytest.raises(ValueError, match="unknown compression method"):
        CompressConfig(methods=("ptq", "magic"))
    with pytest.raises(ValueError, match="prune_ratio"):
        CompressConfig(prune_ratio=1.5)
    with pytest.raises(ValueError, match="int4_gate"):
        CompressConfig(int4_gate="int4")
    with pytest.raises(ValueError, match="int4_other"):
        CompressConfig(int4_other="fp16")
    with pytest.raises(ValueError, match="must not contain the gate"):
        CompressConfig(int4_modules=("model.experts", "model.gate"))
    with pytest.raises(ValueError, match="at least one module"):
        CompressConfig(int4_modules=())


def test_int4_save_refuses_an_unknown_precision(deployable, tmp_path):
    from refgen.moe import int4

    with pytest.raises(ValueError, match="unknown storage precision"):
        int4.save(deployable, tmp_path / "x.safetensors", {"model.experts": "int2"})
    assert not (tmp_path / "x.safetensors").exists()


def test_finetune_does_not_depend_on_what_the_process_drew_before(trained_digits, digits):
    """Dropout and the gate's training noise use torch's global generator; fine-tuning seeds it for the call only,
    so the compress runner's later methods give the same model whatever ran before them."""
    from refgen.moe.finetune import finetune

    def tuned(draws: int):
        model, info = load_model(trained_digits[0])
        model.drop.p = 0.3  # make the global-generator draws matter
        module = deployable_from_info(model, info)
        torch.rand(draws)  # another history of the global generator
        finetune(module, digits.x_train[:256], digits.y_train[:256], epochs=1, lr=1e-3, seed=5)
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    assert torch.equal(tuned(0), tuned(1000))
    model, info = load_model(trained_digits[0])  # (building a model draws from the global generator itself)
    module = deployable_from_info(model, info)
    before = torch.random.get_rng_state()
    finetune(module, digits.x_train[:64], digits.y_train[:64], epochs=1, lr=1e-3, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's generator is left as it was


def test_a_drop_of_exactly_the_bound_is_within_it_despite_float_rounding():
    """100 * (0.975 - 0.985) is -1.0000000000000009: 8 of 800 validation images (exactly 1 pp) must still pass a
    <= 1 pp bound, in the low-rank energy sweep and in the report's pass flag."""
    from refgen.moe.compress import _row
    from refgen.moe.lowrank import auto_rank

    assert 100 * (0.975 - 0.985) < -1.0
    assert _row("lowrank", 600_000, 895_820, 0.975, 0.985, 1.0, 0.15)["pass"] is True
    assert _row("lowrank", 600_000, 895_820, 0.97375, 0.985, 1.0, 0.15)["pass"] is False  # 9 images: outside
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 64))
    accs = iter([0.985, 0.97375, 0.975, 0.98])  # reference, then energies 0.7 (-1.125 pp), 0.8 (-1.00 pp), 0.9
    res = auto_rank(module, [0.7, 0.8, 0.9], lambda m: next(accs), 1.0)
    assert res["energy"] == 0.8 and [r["energy"] for r in res["sweep"]] == [0.7, 0.8]
