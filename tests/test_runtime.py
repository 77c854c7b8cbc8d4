import pytest
import torch

from refgen.runtime import (DeviceMismatchError, PolicyError, check_cpu_size, check_dtype_for_model, check_tensors,
                            parse_dtype, resolve_device)


def test_check_tensors_names_the_culprit():
    good = torch.zeros(2, 3, dtype=torch.bfloat16)
    bad = torch.zeros(4, 5, dtype=torch.float32)
    check_tensors({"a": good, "mask": torch.ones(2, dtype=torch.long), "opt": None}, "cpu", torch.bfloat16)
    with pytest.raises(DeviceMismatchError) as e:
        check_tensors({"a": good, "residual": bad}, "cpu", torch.bfloat16)
    msg = str(e.value)
    assert "residual" in msg and "(4, 5)" in msg and "float32" in msg and "cpu" in msg


def test_check_tensors_device_mismatch():
    t = torch.zeros(1, device="meta")
    with pytest.raises(DeviceMismatchError, match="'x'.*meta"):
        check_tensors({"x": t}, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA abort")
def test_cuda_required_unless_cpu_asked_for():
    with pytest.raises(PolicyError, match="CUDA is not available"):
        resolve_device(None)
    with pytest.raises(PolicyError):
        resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_fp16_refused_for_qwen_image_and_dtype_names():
    with pytest.raises(PolicyError, match="fp16 is refused"):
        check_dtype_for_model(torch.float16, "qwen-image")
    check_dtype_for_model(torch.bfloat16, "qwen-image")
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int8")


def test_cpu_refuses_large_models():
    check_cpu_size(10_000_000, torch.device("cpu"))
    with pytest.raises(PolicyError, match="tiny/toy"):
        check_cpu_size(20_000_000_000, torch.device("cpu"), what="Qwen-Image")
    check_cpu_size(20_000_000_000, torch.device("cuda"))  # the limit is for the CPU only
