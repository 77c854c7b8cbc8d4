"""refgen moe export: the exported files (the byte-budget CI test), parity, pt2 reload, gate agreement, manifest."""

import json
import shutil

import numpy as np
import pytest
import torch

from refgen.moe import manifest as mf
from refgen.moe import onnxrun
from refgen.moe.export import FP32, INT8, PT2, ExportConfig, calibration_images, quantize_int8


def test_the_deployable_int8_artifact_fits_the_budget_counting_every_file(exported_digits):
    """B1, on the exported files themselves: every file the int8 model needs, counted from the graph's own
    external-data references."""
    out, man = exported_digits
    files = mf.onnx_files(out / INT8)
    total = sum(p.stat().st_size for p in files)
    assert total <= 1_000_000
    assert man["deployable"] == INT8 and man["deployable_bytes"] == total
    assert set(man["deployable_files"]) == {p.name for p in files}


def test_fp32_bytes_include_the_external_data_file(exported_digits):
    out, man = exported_digits
    files = mf.onnx_files(out / FP32)
    assert [p.name for p in files] == [FP32, FP32 + ".data"]  # the dynamo exporter's external data
    data = (out / (FP32 + ".data")).stat().st_size
    assert data > (out / FP32).stat().st_size / 2          # the weights are there, not in the graph file
    assert mf.artifact_bytes(out / FP32)["total"] == (out / FP32).stat().st_size + data == man["models"]["fp32"]["bytes"]


def test_budget_gate_names_every_file_when_over(exported_digits):
    out, man = exported_digits
    fp32 = man["models"]["fp32"]["bytes"]
    with pytest.raises(mf.BudgetError, match=r"model\.onnx [\d,]+ B \+ model\.onnx\.data [\d,]+ B"):
        mf.check_budget(out / FP32, budget=fp32 - 1)
    assert mf.check_budget(out / FP32, budget=fp32)["total"] == fp32


def test_onnx_matches_pytorch_at_batch_1_7_32_on_the_whole_test_split(exported_digits, digits):
    out, man = exported_digits
    par = man["checks"]["parity_fp32"]
    assert [r["batch"] for r in par["rows"]] == [1, 7, 32]
    for r in par["rows"]:
        assert r["n"] == len(digits.y_test)
        assert abs(r["acc_diff_pp"]) <= 0.1 and r["top1_agreement"] == 1.0 and r["max_abs_logit_diff"] < 1e-4
    sess = onnxrun.session(out / FP32)
    for b in (1, 7, 32):   # the dynamic batch dimension really is dynamic
        lg, pr = onnxrun.run(sess, onnxrun.to_input(digits.x_test[:b]), b)
        assert lg.shape == (b, 10) and pr.shape == (b, 4)
        np.testing.assert_allclose(pr.sum(1), 1, atol=1e-5)


def test_pt2_reloads_and_matches(exported_digits, digits):
    out, man = exported_digits
    prog = torch.export.load(str(out / PT2)).module()
    x = torch.from_numpy(onnxrun.to_input(digits.x_test[:7]))
    lg, _ = prog(x)
    ref, _ = onnxrun.run(onnxrun.session(out / FP32), x.numpy())
    np.testing.assert_allclose(lg.detach().numpy(), ref, atol=1e-4)
    assert man["checks"]["pt2_max_abs_logit_diff"] < 1e-4


def test_int8_keeps_the_gates_decisions_and_the_accuracy(exported_digits):
    out, man = exported_digits
    q = man["checks"]["int8"]
    assert q["gate_topk_agreement"] >= 0.98
    assert q["acc_drop_pp"] >= -2.0
    assert man["models"]["int8"]["bytes"] < man["models"]["fp32"]["bytes"]


def test_quantising_the_gate_too_flips_its_top_k(exported_digits, digits, tmp_path):
    """Why int8_modules leaves stem and gate float: this model's gate decides its top-2 by small margins."""
    out, _ = exported_digits
    xt = onnxrun.to_input(digits.x_test)
    _, ref = onnxrun.run(onnxrun.session(out / FP32), xt)
    quantize_int8(out / FP32, tmp_path / "all.onnx", calibration_images(digits.x_train, 512, 0), modules=None)
    _, p8 = onnxrun.run(onnxrun.session(tmp_path / "all.onnx"), xt)
    assert onnxrun.topk_agreement(ref, p8, 2) < 0.98


def test_manifest_lists_every_file_with_sha256_and_semver(exported_digits):
    out, man = exported_digits
    assert mf.SEMVER.match(man["version"]) and man["git_commit"] is not None
    assert set(man["files"]) == {FP32, FP32 + ".data", INT8, PT2}
    for name, e in man["files"].items():
        assert e["sha256"] == mf.sha256_file(out / name) and e["bytes"] == (out / name).stat().st_size
    assert mf.verify(out, INT8)["version"] == man["version"]
    assert man["input"]["shape"] == [1, 8, 8] and man["classes"] == [str(i) for i in range(10)]


def test_verify_refuses_a_changed_a_missing_and_an_unlisted_file(exported_digits, tmp_path):
    out, _ = exported_digits
    for case in ("flip", "missing", "unlisted", "semver"):
        d = tmp_path / case
        shutil.copytree(out, d)
        if case == "flip":
            b = bytearray((d / "model.onnx.data").read_bytes())
            b[100] ^= 1
            (d / "model.onnx.data").write_bytes(bytes(b))
            with pytest.raises(mf.TamperedArtifactError, match=r"model\.onnx\.data: SHA-256"):
                mf.verify(d, INT8)
        elif case == "missing":
            (d / INT8).unlink()
            with pytest.raises(mf.TamperedArtifactError, match="model_int8.onnx is listed in the manifest but missing"):
                mf.verify(d, INT8)
        elif case == "unlisted":
            m = json.loads((d / mf.MANIFEST).read_text())
            del m["files"]["model.onnx.data"]
            (d / mf.MANIFEST).write_text(json.dumps(m))
            with pytest.raises(mf.TamperedArtifactError, match=r"model\.onnx\.data \(needed by model\.onnx\) is not listed"):
                mf.verify(d, FP32)
        else:
            m = json.loads((d / mf.MANIFEST).read_text())
            m["version"] = "1.0"
            (d / mf.MANIFEST).write_text(json.dumps(m))
            with pytest.raises(ValueError, match="not SemVer"):
                mf.verify(d)


def test_config_checks_and_yaml_mirror():
    cfg = ExportConfig.from_yaml("configs/moe_export.yaml")
    assert cfg == ExportConfig()
    with pytest.raises(ValueError, match="SemVer"):
        ExportConfig(version="v1")
    with pytest.raises(ValueError, match="parity_batches"):
        ExportConfig(parity_batches=(1, 64))


def test_cli_export_error_is_one_line(tmp_path, capsys):
    from refgen.cli import main

    assert main(["moe", "export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refgen moe export: error:" in err[0] and "nope" in err[0]
