import numpy as np
import pytest

from refgen.moe import corruptions as C
from refgen.moe.data import render_toyworld27, sha256_array


@pytest.fixture(scope="module")
def images():
    x, _ = render_toyworld27(7_000_000_000, 6, size=32)
    return x


def test_every_type_and_severity_gives_a_changed_uint8_image(images):
    grey = images[:2].mean(-1, keepdims=True).astype(np.uint8)[:, 2:30, 2:30]  # 28x28x1, not a power of two
    for name in C.CORRUPTIONS:
        for sev in (1, 3, 5):
            for im in (images[0], grey[0]):
                out = C.corrupt(im, name, sev, np.random.default_rng(0))
                assert out.dtype == np.uint8 and out.shape == im.shape, (name, sev)
                assert not np.array_equal(out, im), (name, sev)


def test_same_seed_bit_identical_set_other_seed_differs(images):
    for name in C.CORRUPTIONS:
        a = sha256_array(C.corrupt_set(images, name, 3, seed=11))
        assert a == sha256_array(C.corrupt_set(images, name, 3, seed=11)), name
        if name not in ("defocus_blur", "contrast", "jpeg_compression"):  # these draw no random numbers
            assert a != sha256_array(C.corrupt_set(images, name, 3, seed=12)), name


def test_severity_constants_are_cifar10c_not_imagenetc():
    assert C.SEVERITY["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert C.SEVERITY["jpeg_compression"] == (80, 65, 58, 50, 40)
    assert len(C.CORRUPTIONS) == 7 and set(C.CORRUPTIONS) == set(C.SEVERITY)


def test_parameters_do_what_they_say():
    grey = np.full((64, 64, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    d = C.corrupt(grey, "gaussian_noise", 3, rng).astype(float) - 128
    assert abs(d.std() / 255 - 0.08) < 0.004
    out = C.corrupt(grey, "impulse_noise", 5, rng)
    assert abs(np.mean((out == 0) | (out == 255)) - 0.07) < 0.01
    pattern = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    c = C.corrupt(pattern, "contrast", 3, rng).astype(float)
    assert np.allclose(c.mean((0, 1)), pattern.mean((0, 1)), atol=0.6)
    assert np.allclose(c.std((0, 1)), 0.4 * pattern.astype(float).std((0, 1)), rtol=0.02)
    err = [np.abs(C.corrupt(pattern, "jpeg_compression", s, rng).astype(float) - pattern).mean() for s in (1, 5)]
    assert err[0] < err[1]


def test_blur_kernels_are_normalised_and_shaped():
    for r, a in C.SEVERITY["defocus_blur"]:
        k = C.disk_kernel(r, a)
        assert k.shape == (17, 17) and abs(k.sum() - 1) < 1e-12 and k[8, 8] == k.max()
    k = C.motion_kernel(6, 2.0, 0.0)  # one-sided: all weight right of the centre row's centre
    assert abs(k.sum() - 1) < 1e-12 and k[6, 6] == k.max() and k[:, :6].sum() == 0 and k[6, 12] > 0
    p = C.plasma_fractal(32, 2.5, np.random.default_rng(0))
    assert p.min() == 0 and p.max() == 1
    with pytest.raises(ValueError, match="power of two"):
        C.plasma_fractal(28, 2.5, np.random.default_rng(0))


def test_bad_inputs_are_named(images):
    with pytest.raises(ValueError, match="unknown corruption 'frost'"):
        C.corrupt(images[0], "frost", 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity must be 1..5, got 6"):
        C.corrupt_set(images, "fog", 6, 0)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        C.corrupt(images[0], "fog", 3, np.random.RandomState(0))
    with pytest.raises(ValueError, match=r"uint8 image \[H, W, 1\|3\]"):
        C.corrupt(images[0].astype(np.float32), "fog", 3, np.random.default_rng(0))
