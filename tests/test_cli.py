"""The CLI's own behaviour: fast --help, seeds and alphas, one-line errors, no library noise refgen causes."""

import subprocess
import sys
import warnings

import pytest
import torch

from refgen.cli import main, parse_seed, parse_seeds


def test_help_imports_no_torch():
    """`refgen --help` (and every parser) builds without torch, diffusers or transformers: 0.1-0.2 s instead of
    1.7 s idle (11 s on a loaded 2-core machine) when every command module came in eagerly."""
    code = ("import sys\nfrom refgen.cli import main\n"
            "for argv in (['--help'], ['dit', '--help'], ['toyworld', '--help'], ['dit', 'prepare', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'PIL') if m in sys.modules]\n"
            "print(','.join(heavy) or 'none')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "none"


def test_seeds_are_non_negative():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10] and parse_seed(str(2**64 - 1)) == 2**64 - 1
    for bad in ("-1", "3,-2", str(2**64)):
        with pytest.raises(Exception, match="seeds are 0..2\\*\\*64-1"):
            parse_seeds(bad)
    with pytest.raises(Exception, match="would not be the seed you wrote"):
        parse_seed("-5")
    # a negative seed is what torch would silently turn into another one
    assert torch.Generator().manual_seed(-1).initial_seed() == 2**64 - 1
    from refgen.identity.render import RenderConfig

    with pytest.raises(ValueError, match="seeds must be in 0..2\\*\\*64-1, got -1"):
        RenderConfig(prompt="x", seeds=[-1])
    with pytest.raises(ValueError, match="finite"):
        RenderConfig(prompt="x", alphas=[float("nan")])


def test_bad_seed_or_alpha_is_a_usage_error(tmp_path, capsys):
    base = ["render", "--model", str(tmp_path), "--prompt", "~ID~", "--out", str(tmp_path / "o")]
    for extra in (["--seeds", "-1"], ["--alphas", "1,nan"], ["--alphas", "inf"]):
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2, extra
        assert "error: argument" in capsys.readouterr().err


def test_negative_alpha_warns(tmp_path, capsys):
    # the warning comes first; the missing model then ends the command (exit 1) before anything loads
    assert main(["render", "--model", str(tmp_path / "none"), "--prompt", "~ID~", "--alphas=-0.5,1",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("refgen render: warning: --alphas -0.5 < 0 subtracts the identity residual")
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "~ID~", "--residual", "r.safetensors",
                 "--alpha", "-2", "--out", str(tmp_path / "g")]) == 1
    assert "refgen generate: warning: --alpha -2 < 0" in capsys.readouterr().err


def test_loading_the_tiny_models_prints_no_library_warnings(tiny_models, capfd):
    """The deprecated `torch_dtype` keyword and out-of-vocabulary bos/eos ids were refgen's own doing."""
    from refgen.identity.features import VisionFeatures
    from refgen.identity.render import load_pipeline, load_tokenizer_only

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline(tiny_models["qwen_image"], device="cpu", dtype="fp32")
        load_tokenizer_only(tiny_models["qwen_image"])
        VisionFeatures(tiny_models["qwen3_vl"], device="cpu", dtype="fp32")
    texts = [str(w.message) for w in caught]
    assert not [t for t in texts if "torch_dtype" in t or "token_id" in t], texts
    err = capfd.readouterr().err
    for noise in ("torch_dtype", "bos_token_id", "eos_token_id", "requires torchvision"):
        assert noise not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_toyworld_eval_recognizer_on_cuda_without_cuda_is_the_policy_message(capsys):
    assert main(["toyworld", "eval-recognizer", "--device", "cuda", "--n", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("refgen toyworld eval-recognizer: error: CUDA is not available") and "\n" not in err


def test_render_and_generate_flags_are_made_from_one_sampling_config():
    import dataclasses

    from refgen.cli import build_parser
    from refgen.identity.generate import GenerateConfig
    from refgen.identity.render import RenderConfig
    from refgen.identity.sampling import SamplingConfig

    p = build_parser()
    render = p.parse_args(["render", "--model", "m", "--prompt", "x", "--out", "o"])
    gen = p.parse_args(["generate", "--model", "m", "--prompt", "x", "--out", "o"])
    r, g = RenderConfig(prompt="x"), GenerateConfig(prompt="x", people=[])
    for f in dataclasses.fields(SamplingConfig):  # each command's defaults are its config's
        if f.name != "cfg_batch":
            assert getattr(render, f.name) == getattr(r, f.name) and getattr(gen, f.name) == getattr(g, f.name), f.name
    for cls, kw in ((RenderConfig, {}), (GenerateConfig, {"people": []})):  # and the same checks
        with pytest.raises(ValueError, match="steps must be >= 2"):
            cls(prompt="x", steps=1, **kw)
        with pytest.raises(ValueError, match="multiples of 16"):
            cls(prompt="x", height=100, **kw)
