import colorsys
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

import refgen.images as images
from refgen.cli import main
from refgen.images import BACKGROUND, check_image, load_rgb, resolve_refs, scan, to_rgb


def _img(path, color=(200, 10, 10)):
    Image.new("RGB", (16, 12), color).save(path)


def test_scan_reports_good_and_bad_folders(tmp_path, capsys):
    good = tmp_path / "seed_1"
    good.mkdir()
    _img(good / "a.PNG")
    _img(good / "weird name.JpEg")
    (good / "notes.txt").write_text("not an image")
    few = tmp_path / "seed_2"
    few.mkdir()
    _img(few / "only.png")
    corrupt = tmp_path / "seed_3"
    corrupt.mkdir()
    _img(corrupt / "x.webp")
    _img(corrupt / "y.bmp")
    (corrupt / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (corrupt / "truncated.png").write_bytes(open(good / "a.PNG", "rb").read()[:40])
    broken = tmp_path / "seed_4"
    broken.mkdir()
    _img(broken / "ok.png")
    (broken / "bad.png").write_bytes(b"nope")
    (tmp_path / "other").mkdir()

    res = scan(tmp_path)
    assert [i.id for i in res.identities] == ["seed_1", "seed_3"]
    assert [p.name for p in res.identities[1].images] == ["x.webp", "y.bmp"]
    assert len(res.identities[0].images) == 2
    by = {s["folder"].split("/")[-1]: s for s in res.skipped}
    assert "too few" in by["seed_2"]["reason"]
    assert "too few" in by["seed_4"]["reason"] and by["seed_4"]["bad_files"][0]["file"].endswith("bad.png")
    bad3 = sorted(b["file"].split("/")[-1] for b in by["seed_3"]["bad_files"])
    assert bad3 == ["broken.jpg", "truncated.png"] and by["seed_3"]["kept"]
    assert res.ignored == ["other/"]

    assert main(["scan", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [i["id"] for i in out["identities"]] == ["seed_1", "seed_3"] and out["ignored"] == ["other/"]
    assert main(["scan", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "2 identities, 2 folders skipped, 1 ignored" in text and "other/: not a seed_* folder" in text


def _no_identity_root(tmp_path):
    root = tmp_path / "people"
    (root / "anna").mkdir(parents=True)           # wrong name
    _img(root / "anna" / "1.png")
    _img(root / "anna" / "2.png")
    (root / "seed_1").mkdir()                     # one good image and a corrupt one
    _img(root / "seed_1" / "a.png")
    (root / "seed_1" / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root


def test_scan_and_invert_with_no_usable_identity_say_why_and_exit_1(tmp_path, capsys):
    root = _no_identity_root(tmp_path)
    assert main(["scan", str(root)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    for part in ("no usable identity", "seed_1: too few readable images: 1", "b.jpg", "anna/", "seed_"):
        assert part in err, part
    # invert refuses the same root before it loads any model (the model path is never looked at)
    assert main(["invert", str(root), "--model", str(tmp_path / "no-model"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no usable identity" in err and "anna/" in err, err
    # a seed_* folder passed as ROOT: the message says to pass its parent
    assert main(["scan", str(root / "seed_1")]) == 1
    assert "pass the folder above it" in capsys.readouterr().err


def test_resolve_refs_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no readable image"):
        resolve_refs(empty)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        resolve_refs(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="bad.png"):
        resolve_refs([tmp_path / "bad.png"])
    # a corrupt photo inside a --ref folder is named, not dropped
    folder = tmp_path / "anna"
    folder.mkdir()
    _img(folder / "1.png")
    _img(folder / "2.png")
    assert [p.name for p in resolve_refs(folder)] == ["1.png", "2.png"]
    (folder / "3.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match=r"3\.jpg \(in --ref folder .*anna\).*unreadable or corrupt"):
        resolve_refs(folder)


# --------------------------------------------------------------------------- every PIL mode, against a reference

def _png(path, arr, color_type, bit_depth=16, trns=None):
    """A PNG written chunk by chunk (PIL cannot write 16-bit colour PNGs): what cameras and editors export."""
    h, w = arr.shape[:2]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    dt = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + arr[y].astype(dt).tobytes() for y in range(h))
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
    if trns is not None:
        data += chunk(b"tRNS", trns)
    path.write_bytes(data + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _over_white(rgb, alpha):
    """Reference alpha compositing in floats: colour * a + background * (1 - a)."""
    a = np.asarray(alpha, dtype=np.float64)[..., None]
    return np.asarray(rgb, dtype=np.float64) * a + np.asarray(BACKGROUND, dtype=np.float64) * (1 - a)


G16 = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
RGB16 = np.array([[[65535, 0, 30000], [1000, 40000, 257]], [[12345, 54321, 0], [257, 514, 65535]]], np.uint16)
A16 = np.array([[[65535], [0]], [[32896], [20000]]], dtype=np.uint16)
RGB8 = np.array([[[250, 10, 10], [10, 200, 30]], [[0, 0, 255], [90, 90, 90]]], dtype=np.uint8)
A8 = np.array([[255, 0], [128, 30]], dtype=np.uint8)


def _grey(v):
    return np.repeat(np.asarray(v, dtype=np.float64)[..., None], 3, axis=-1)


def _case_16bit_grey(p):
    return _png(p / "g16.png", G16, 0), _grey(G16 / 257), 0.5


def _case_16bit_grey_big_endian_tiff(p):
    Image.fromarray(G16.astype(">u2")).save(p / "g16b.tif")
    assert Image.open(p / "g16b.tif").mode == "I;16B"
    return p / "g16b.tif", _grey(G16 / 257), 0.5


def _case_32bit_int_tiff(p):
    Image.fromarray(G16.astype(np.int32)).save(p / "i32.tif")
    assert Image.open(p / "i32.tif").mode == "I"
    return p / "i32.tif", _grey(G16 / 257), 0.5


def _case_16bit_grey_transparent(p):   # tRNS key 1000: that pixel is transparent
    path = _png(p / "g16t.png", G16, 0, trns=struct.pack(">H", 1000))
    ref = _grey(G16 / 257)
    ref[0, 1] = BACKGROUND
    return path, ref, 0.5


def _case_16bit_rgb(p):                # PIL keeps each sample's high byte: within 1 of v / 257
    return _png(p / "rgb16.png", RGB16, 2), RGB16 / 257, 1


def _case_16bit_rgb_transparent(p):
    path = _png(p / "rgb16t.png", RGB16, 2, trns=struct.pack(">HHH", 1000, 40000, 257))
    ref = RGB16 / 257
    ref[0, 1] = BACKGROUND
    return path, ref, 1


def _case_16bit_rgba(p):
    path = _png(p / "rgba16.png", np.concatenate([RGB16, A16], -1), 6)
    return path, _over_white(RGB16 / 257, A16[..., 0] / 65535), 2


def _case_16bit_grey_alpha(p):
    path = _png(p / "la16.png", np.concatenate([G16[..., None], A16[..., 0][..., None]], -1), 4)
    return path, _over_white(_grey(G16 / 257), A16[..., 0] / 65535), 2


def _case_rgba(p):
    Image.fromarray(np.concatenate([RGB8, A8[..., None]], -1), "RGBA").save(p / "rgba.png")
    return p / "rgba.png", _over_white(RGB8, A8 / 255), 1


def _case_rgba_webp(p):
    Image.fromarray(np.concatenate([RGB8, A8[..., None]], -1), "RGBA").save(p / "rgba.webp", lossless=True)
    return p / "rgba.webp", _over_white(RGB8, A8 / 255), 1


def _case_grey_alpha(p):
    g = RGB8[..., 1]
    Image.fromarray(np.stack([g, A8], -1), "LA").save(p / "la.png")
    return p / "la.png", _over_white(_grey(g), A8 / 255), 1


def _case_palette(p):
    im = Image.fromarray(RGB8).quantize(colors=4, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    im.save(p / "p.png")
    pal = np.array(im.getpalette()[:12]).reshape(4, 3)
    return p / "p.png", pal[np.asarray(im)].astype(np.float64), 0


def _case_palette_transparent_index(p):
    im = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "P")
    im.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    im.save(p / "pt.png", transparency=1)
    ref = np.array([[[255, 0, 0], BACKGROUND], [[0, 255, 0], BACKGROUND]], np.float64)
    return p / "pt.png", ref, 0


def _case_palette_alpha_per_index(p):
    im = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "P")
    im.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    im.save(p / "pa.png", transparency=bytes([255, 64, 0]))
    pal = np.array([[255, 0, 0], [0, 0, 255], [0, 255, 0]], np.float64)
    idx = np.array([[0, 1], [2, 1]])
    return p / "pa.png", _over_white(pal[idx], np.array([255, 64, 0])[idx] / 255), 1


def _case_grey_transparent(p):
    g = RGB8[..., 0]
    Image.fromarray(g, "L").save(p / "lt.png", transparency=int(g[1, 0]))
    ref = _grey(g)
    ref[1, 0] = BACKGROUND
    return p / "lt.png", ref, 0


def _case_rgb_transparent(p):
    Image.fromarray(RGB8).save(p / "rgbt.png", transparency=tuple(int(v) for v in RGB8[0, 1]))
    ref = RGB8.astype(np.float64)
    ref[0, 1] = BACKGROUND
    return p / "rgbt.png", ref, 0


def _case_bilevel(p):
    b = np.array([[True, False], [False, True]])
    Image.fromarray(b).save(p / "b.png")
    assert Image.open(p / "b.png").mode == "1"
    return p / "b.png", _grey(b * 255.0), 0


def _case_cmyk_tiff(p):
    c = np.array([[[0, 255, 255, 0], [0, 0, 0, 128]], [[200, 10, 60, 30], [255, 255, 255, 255]]], np.uint8)
    Image.fromarray(c, "CMYK").save(p / "cmyk.tif")
    cf = c.astype(np.float64)
    return p / "cmyk.tif", (255 - cf[..., :3]) * (255 - cf[..., 3:]) / 255, 0.5


def _case_lab_tiff(p):
    # a*, b* are signed bytes in TIFF's CIELab and PIL's LAB: 0 is neutral
    lab = np.array([[[255, 0, 0], [0, 0, 0]], [[128, 0, 0], [255, 0, 0]]], np.uint8)
    Image.fromarray(lab, "LAB").save(p / "lab.tif")
    # L* 100 -> white, 0 -> black, 50.2 -> sRGB grey 119.5 (Y = ((L* + 16) / 116)^3, then the sRGB curve)
    y = ((128 / 255 * 100 + 16) / 116) ** 3
    grey = (1.055 * y ** (1 / 2.4) - 0.055) * 255
    return p / "lab.tif", np.array([[[255] * 3, [0] * 3], [[grey] * 3, [255] * 3]], np.float64), 2


def _case_rgb_jpeg_exif(p):    # EXIF orientation 6: stored 4 wide x 2 high, shown 2 wide x 4 high
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (4, 2), (0, 0, 255)).save(p / "r.jpg", exif=exif, quality=100)
    return p / "r.jpg", np.full((4, 2, 3), (0, 0, 255), np.float64), 3


CASES = {name[6:]: f for name, f in list(globals().items()) if name.startswith("_case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_mode_matches_its_reference_conversion(tmp_path, name):
    path, ref, atol = CASES[name](tmp_path)
    assert check_image(path) is None
    im = load_rgb(path)
    assert im.mode == "RGB"
    got = np.asarray(im, dtype=np.float64)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert err <= atol, f"{name}: max error {err} > {atol}\n{got}\n{ref}"


def test_in_memory_modes_against_reference():
    """Modes PIL does not write to files (or not to refgen's formats) still convert by the same rules."""
    hsv = np.array([[[0, 255, 255], [85, 255, 128]]], np.uint8)
    ref = np.array([[colorsys.hsv_to_rgb(h / 255, s / 255, v / 255) for h, s, v in row] for row in hsv]) * 255
    assert np.abs(np.asarray(to_rgb(Image.fromarray(hsv, "HSV")), float) - ref).max() <= 1
    ycc = np.array([[[128, 128, 128], [81, 90, 240]]], np.uint8)       # grey, and JFIF's red
    yf, cb, cr = (ycc[..., i].astype(float) for i in range(3))
    ref = np.stack([yf + 1.402 * (cr - 128), yf - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    yf + 1.772 * (cb - 128)], -1).clip(0, 255)
    assert np.abs(np.asarray(to_rgb(Image.fromarray(ycc, "YCbCr")), float) - ref).max() <= 2
    rgba = Image.fromarray(np.concatenate([RGB8, A8[..., None]], -1), "RGBA")
    assert np.abs(np.asarray(to_rgb(rgba.convert("RGBa")), float) - _over_white(RGB8, A8 / 255)).max() <= 2
    pa = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "P")
    pa.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    pa = pa.convert("PA")
    pa.putalpha(Image.fromarray(A8))
    pal = np.array([[255, 0, 0], [0, 0, 255], [0, 255, 0]], float)
    want = _over_white(pal[np.array([[0, 1], [2, 1]])], A8 / 255)
    assert np.abs(np.asarray(to_rgb(pa), float) - want).max() <= 1
    la = Image.fromarray(np.stack([RGB8[..., 1], A8], -1), "LA").convert("La")
    assert np.abs(np.asarray(to_rgb(la), float) - _over_white(_grey(RGB8[..., 1]), A8 / 255)).max() <= 2


def test_unusable_pixel_formats_are_refused_with_the_reason(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5]], np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"f\.tif: 32-bit float pixels have no defined range"):
        load_rgb(tmp_path / "f.tif")
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "i.tif")
    assert "outside the 16-bit range" in check_image(tmp_path / "i.tif")


def test_sixteen_bit_png_is_a_usable_identity_photo(tmp_path):
    """The silent failure this guards: a 16-bit photo used to load as almost white for features and inversion."""
    (tmp_path / "seed_1").mkdir()
    _png(tmp_path / "seed_1" / "a.png", np.full((8, 8), 20000, np.uint16), 0)
    _png(tmp_path / "seed_1" / "b.png", np.full((8, 8, 3), 10000, np.uint16), 2)
    ident = scan(tmp_path).identities[0]
    means = [np.asarray(load_rgb(p)).mean() for p in ident.images]
    assert means == pytest.approx([20000 / 257, 10000 / 256], abs=1)   # dark grey, not white


def test_very_large_images_get_refgens_limit_not_pils_warning(tmp_path, monkeypatch):
    """Thresholds lowered so a small file stands for a 100+ MP photo; the code paths are the real ones."""
    Image.new("RGB", (30, 20), (1, 2, 3)).save(tmp_path / "big.png")      # 600 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)                   # PIL warns above 400, errors above 800
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                    # any PIL warning fails the test
        assert load_rgb(tmp_path / "big.png").size == (30, 20)
        monkeypatch.setattr(images, "MAX_PIXELS", 500)
        assert check_image(tmp_path / "big.png") == ("30x20 px (0.0 MP) is more than refgen's limit of 0.0005 "
                                                     "megapixels (refgen.images.MAX_PIXELS); downscale it")
        with pytest.raises(ValueError, match=r"big\.png: 30x20 px .*more than refgen's limit"):
            load_rgb(tmp_path / "big.png")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)               # PIL's own hard stop (> 400 px)
        with pytest.raises(ValueError, match=r"big\.png: is more than refgen's limit"):
            load_rgb(tmp_path / "big.png")
