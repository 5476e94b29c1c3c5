"""DICOM input: files written by pydicom itself, read by `load_image` / `chexcy predict` / `chexcy prepare`.

Every expected 8-bit picture is computed here from the numbers written into the file with the formula of
DICOM PS3.3 C.11 spelled out in the test, not by calling chexcy's code."""
import csv
import os
import sys

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, HTJ2KLossless,
                         JPEGLosslessSV1, JPEGLSLossless, RLELossless, generate_uid)

from chexcy import cli
from chexcy.data import LABELS, ImageReadError, load_image
from chexcy.data.dicom import DicomSupportMissing, read_dicom
from chexcy.data.prepare import prepare
from chexcy.predict import collect_inputs, predict_files


def make_dataset(pixels, photometric="MONOCHROME2", bits_stored=None, **elements):
    """A DX 'for presentation' object holding `pixels` (rows, cols) or (frames, rows, cols)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    ds.PatientID = "anon"
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for name, value in elements.items():
        setattr(ds, name, value)
    return ds


def write(path, ds):
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def write_csv(path, rows):
    """A CheXpert-schema CSV (Path, Sex, Age, Frontal/Lateral, AP/PA, the 14 labels)."""
    pd.DataFrame(rows, columns=["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS]).to_csv(path, index=False)


def rounded(values):
    """Nearest integer, halves rounded up (chexcy's documented rule), clipped to uint8."""
    return np.clip(np.floor(np.asarray(values, np.float64) + 0.5), 0, 255).astype(np.uint8)


def linear_window(x, center, width):
    """PS3.3 C.11.2.1.2.1, written piecewise as the standard states it, output range 0..255."""
    x = np.asarray(x, np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y[x <= center - 0.5 - (width - 1) / 2] = 0
    y[x > center - 0.5 + (width - 1) / 2] = 255
    return y


@pytest.fixture
def gradient12(rng):
    """12-bit stored values: a ramp plus noise, 0..4095, (20, 26)."""
    ramp = np.linspace(0, 4095, 20 * 26).reshape(20, 26)
    return np.clip(ramp + rng.normal(0, 30, ramp.shape), 0, 4095).astype(np.uint16)


def test_eight_bit_monochrome2_without_window_is_kept_as_stored(tmp_path, rng):
    pixels = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    path = write(tmp_path / "m2.dcm", make_dataset(pixels))
    assert np.array_equal(read_dicom(path), pixels)


def test_monochrome1_is_inverted_so_bone_is_bright(tmp_path, rng):
    pixels = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    path = write(tmp_path / "m1.dcm", make_dataset(pixels, "MONOCHROME1"))
    assert np.array_equal(read_dicom(path), 255 - pixels)


def test_sixteen_bit_without_window_is_stretched_from_its_min_to_its_max(tmp_path, gradient12):
    path = write(tmp_path / "u12.dcm", make_dataset(gradient12, bits_stored=12))
    v = gradient12.astype(np.float64)
    assert np.array_equal(read_dicom(path), rounded((v - v.min()) / (v.max() - v.min()) * 255))
    signed = (gradient12.astype(np.int16) - 2048)                   # PixelRepresentation 1
    path = write(tmp_path / "s16.dcm", make_dataset(signed, "MONOCHROME1", 16))
    s = signed.astype(np.float64)
    assert np.array_equal(read_dicom(path), 255 - rounded((s - s.min()) / (s.max() - s.min()) * 255))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_rescale_then_window(tmp_path, gradient12, photometric):
    """Rescale slope/intercept first (to Hounsfield-like units), then the window, then MONOCHROME1's inversion."""
    ds = make_dataset(gradient12, photometric, 12, RescaleSlope="2", RescaleIntercept="-1024",
                      WindowCenter=["1500.3", "40"], WindowWidth=["3000.7", "400"])   # the first pair counts
    path = write(tmp_path / "w.dcm", ds)
    want = rounded(linear_window(gradient12 * 2.0 - 1024, 1500.3, 3000.7))
    assert 0 < (want == 0).sum() and 0 < (want == 255).sum()          # the window really clips both ends
    assert np.array_equal(read_dicom(path), want if photometric == "MONOCHROME2" else 255 - want)


def test_window_functions_linear_exact_and_sigmoid(tmp_path, gradient12):
    x = gradient12.astype(np.float64)
    ds = make_dataset(gradient12, bits_stored=12, WindowCenter="2000.2", WindowWidth="2500.1",
                      VOILUTFunction="LINEAR_EXACT")
    want = rounded(np.clip(((x - 2000.2) / 2500.1 + 0.5) * 255, 0, 255))
    assert np.array_equal(read_dicom(write(tmp_path / "le.dcm", ds)), want)
    ds.VOILUTFunction = "SIGMOID"
    want = rounded(255 / (1 + np.exp(-4 * (x - 2000.2) / 2500.1)))
    assert np.array_equal(read_dicom(write(tmp_path / "sig.dcm", ds)), want)


def test_voi_lut_sequence_is_used_before_the_window(tmp_path, gradient12):
    entries = np.arange(3000)
    lut = np.round(np.sqrt(entries / 2999) * 4095).astype(np.uint16)   # a 12-bit gamma-like curve
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [3000, 500, 12])                # values < 500 -> lut[0], > 3499 -> lut[-1]
    item.add_new("LUTData", "US", lut.tolist())
    ds = make_dataset(gradient12, bits_stored=12, WindowCenter="100", WindowWidth="50")
    ds.VOILUTSequence = Sequence([item])
    index = np.clip(gradient12.astype(np.int64) - 500, 0, 2999)
    want = rounded(lut[index] * 255.0 / 4095)
    assert np.array_equal(read_dicom(write(tmp_path / "lut.dcm", ds)), want)


def test_rle_compressed_file_decodes_like_the_uncompressed_one(tmp_path, gradient12):
    ds = make_dataset(gradient12, "MONOCHROME1", 12)
    plain = read_dicom(write(tmp_path / "plain.dcm", ds))
    ds.compress(RLELossless)
    assert pydicom.dcmread(write(tmp_path / "rle.dcm", ds)).file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(read_dicom(tmp_path / "rle.dcm"), plain)


def undecodable_syntax():
    """A compressed transfer syntax whose decoder is not installed (JPEG lossless, the common one in DX
    archives, needs pylibjpeg-libjpeg or gdcm, which chexcy's test extra does not install)."""
    for syntax in (JPEGLosslessSV1, JPEGLSLossless, HTJ2KLossless):
        if not get_decoder(syntax).is_available:
            return syntax
    raise AssertionError("every candidate decoder is installed; add a syntax without one to this list")


def broken_files(folder):
    """name -> (path, words the reason must contain) for each kind of DICOM file chexcy refuses."""
    out = {}
    frames = make_dataset(np.zeros((3, 8, 9), np.uint8))
    out["multiframe"] = (write(folder / "multi.dcm", frames), "multi-frame DICOM (3 frames)")
    out["no_pixels"] = (write(folder / "report.dcm", make_dataset(None)), "DICOM file without pixel data")
    syntax = undecodable_syntax()
    ds = make_dataset(np.zeros((8, 9), np.uint8))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3 not really a jpeg \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    out["no_decoder"] = (write(folder / "jpegll.dcm", ds), f"compressed as {syntax.name} ({syntax}) and no "
                                                           f"decoder for it is installed: install ")
    package = "pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1" if syntax != HTJ2KLossless else "pylibjpeg-openjpeg"
    out["no_decoder_package"] = (out["no_decoder"][0], package)
    good = write(folder / "good_for_truncation.dcm", make_dataset(np.arange(400, dtype=np.uint16).reshape(20, 20)))
    with open(good, "rb") as f:
        data = f.read()
    (folder / "truncated.dcm").write_bytes(data[:len(data) - 300])
    out["truncated"] = (str(folder / "truncated.dcm"), "cannot be decoded")
    (folder / "text.dcm").write_bytes(b"this is not DICOM at all" * 10)
    out["not_dicom"] = (str(folder / "text.dcm"), "not a DICOM file")
    return out


def test_files_chexcy_cannot_use_give_reasons(tmp_path):
    for name, (path, words) in broken_files(tmp_path).items():
        with pytest.raises(ImageReadError) as info:
            load_image(path, 8)
        assert words in info.value.reason and info.value.path == path, (name, info.value.reason)


def test_load_image_crops_and_resizes_dicom_exactly_like_a_png(tmp_path, rng):
    """The same 8-bit picture as a PNG and as a DICOM (16-bit + window) gives the same training input."""
    stored = rng.integers(0, 4096, (30, 41)).astype(np.uint16)
    path = write(tmp_path / "x.dcm", make_dataset(stored, bits_stored=12, WindowCenter="2047.5",
                                                  WindowWidth="4096"))
    picture = rounded(linear_window(stored, 2047.5, 4096))
    Image.fromarray(picture, mode="L").save(tmp_path / "x.png")
    for size in (8, 24, 30):
        assert np.array_equal(load_image(path, size), load_image(tmp_path / "x.png", size)), size
    # A DICOM file under another name is recognised by its signature.
    os.rename(path, tmp_path / "x.img")
    assert np.array_equal(load_image(tmp_path / "x.img", 24), load_image(tmp_path / "x.png", 24))


def test_missing_pydicom_says_how_to_install(tmp_path, monkeypatch, capsys, rng):
    path = write(tmp_path / "x.dcm", make_dataset(rng.integers(0, 256, (9, 9), dtype=np.uint8)))
    monkeypatch.setitem(sys.modules, "pydicom", None)                   # import pydicom -> ImportError
    with pytest.raises(DicomSupportMissing, match=r"pip install pydicom \(or pip install '\.\[dicom\]' in a chexcy clone\)"):
        load_image(path, 8)
    assert np.asarray(load_image(_png(tmp_path, rng), 8)).shape == (1, 8, 8)   # other images still load
    assert cli.main(["predict", "--checkpoint", str(_checkpoint(tmp_path)), path]) == 2
    assert "pip install pydicom" in capsys.readouterr().err
    rel = "DCM/train/patient00001/study1/view1_frontal.dcm"
    os.makedirs(tmp_path / "DCM/train/patient00001/study1")
    os.rename(path, tmp_path / rel)
    write_csv(tmp_path / "DCM/t.csv", [[rel, "Male", 40, "Frontal", "AP"] + [1.0] * 14])
    assert cli.main(["prepare", str(tmp_path / "DCM/t.csv"), "--out", str(tmp_path / "out"), "--size", "8"]) == 2
    assert "pip install pydicom" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def _png(folder, rng):
    Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), mode="L").save(folder / "p.png")
    return folder / "p.png"


def _checkpoint(folder, size=16):
    from chexcy.checkpoint import save_checkpoint
    from chexcy.nn import build_model
    return save_checkpoint(folder / "m.npz", build_model("simple", widths=[4, 8]), config={"image_size": size})


def test_predict_labels_dicom_files_and_finds_them_in_folders(tmp_path, rng):
    stored = rng.integers(0, 4096, (30, 41)).astype(np.uint16)
    (tmp_path / "in").mkdir()
    dcm = write(tmp_path / "in" / "a.dcm", make_dataset(stored, "MONOCHROME1", 12))
    s = stored.astype(np.float64)
    Image.fromarray(255 - rounded((s - s.min()) / (s.max() - s.min()) * 255), mode="L").save(tmp_path / "a.png")
    files, problems, _ = collect_inputs([str(tmp_path / "in")])
    assert files == [dcm] and problems == []
    errors = []
    got = predict_files(_checkpoint(tmp_path), [dcm, str(tmp_path / "a.png")], errors=errors)
    assert errors == [] and np.array_equal(got[0][1], got[1][1])
    broken = broken_files(tmp_path)
    got = predict_files(_checkpoint(tmp_path), [broken["multiframe"][0]], errors=errors)
    assert got == [] and "multi-frame" in errors[0][1]


def test_prepare_over_200_dicom_files_lists_every_broken_one_in_skipped_csv(tmp_path, rng):
    root = tmp_path / "root"
    study_dir = root / "DCM" / "train"
    broken = broken_files(tmp_path)
    kinds = ["multiframe", "no_pixels", "no_decoder", "truncated", "not_dicom"]
    rows, want_skipped, good = [], {}, {}
    for i in range(200):
        rel = f"DCM/train/patient{i:05d}/study1/view1_frontal.dcm"
        path = root / rel
        path.parent.mkdir(parents=True)
        if i % 10 == 3:                                    # 20 broken files of five kinds, plus one missing
            kind = kinds[(i // 10) % len(kinds)]
            path.write_bytes(open(broken[kind][0], "rb").read())
            want_skipped[rel] = broken[kind][1]
        elif i == 199:
            want_skipped[rel] = "missing file"
        else:
            bits = 8 if i % 2 else 12
            pixels = rng.integers(0, 2 ** bits, (10 + i % 5, 12), dtype=np.uint16 if bits > 8 else np.uint8)
            write(path, make_dataset(pixels, "MONOCHROME1" if i % 3 == 0 else "MONOCHROME2", bits))
            good[rel] = str(path)
        rows.append([rel, "Female", 50, "Frontal", "PA"] + [1.0 if (i + k) % 4 == 0 else 0.0 for k in range(14)])
    assert study_dir.is_dir() and len(want_skipped) == 21
    csv_path = root / "DCM" / "train.csv"
    write_csv(csv_path, rows)
    manifest = prepare(csv_path, tmp_path / "prepared", size=8, quiet=True)
    assert manifest["count"] == 179 and manifest["skipped"] == 21
    with open(tmp_path / "prepared" / "skipped.csv") as f:
        skipped = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert set(skipped) == set(want_skipped)
    for rel, words in want_skipped.items():
        assert words in skipped[rel], (rel, skipped[rel])
    images = np.load(tmp_path / "prepared" / "images.npy", mmap_mode="r")
    meta = pd.read_csv(tmp_path / "prepared" / "meta.csv")
    for k, rel in enumerate(meta["path"]):
        assert np.array_equal(images[k], load_image(good[rel], 8)), rel


def test_prepare_reads_mimic_cxr_style_paths(tmp_path, rng):
    """A CSV in chexcy's schema whose Path column uses MIMIC-CXR's layout
    (files/pNN/pNNNNNNNN/sNNNNNNNN/<id>.dcm): patients and studies come from the p... and s... folders."""
    rels = ["files/p10/p10000032/s50414267/02aa804e.dcm", "files/p10/p10000032/s50414267/174413ec.dcm",
            "files/p10/p10000032/s53189527/2a2277a9.dcm", "files/p11/p11000011/s51029426/3e2d2b5b.dcm"]
    rows = []
    for i, rel in enumerate(rels):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write(tmp_path / rel, make_dataset(rng.integers(0, 256, (12, 10), dtype=np.uint8)))
        rows.append([rel, "Male", 60, "Lateral" if i == 1 else "Frontal", "" if i == 1 else "AP"] + [0.0] * 14)
    write_csv(tmp_path / "mimic.csv", rows)
    manifest = prepare(tmp_path / "mimic.csv", tmp_path / "prepared", size=8, quiet=True)
    assert manifest["count"] == 4 and manifest["skipped"] == 0
    meta = pd.read_csv(tmp_path / "prepared" / "meta.csv")
    assert list(meta["patient"]) == ["p10000032", "p10000032", "p10000032", "p11000011"]
    assert list(meta["study"]) == ["p10000032/s50414267", "p10000032/s50414267", "p10000032/s53189527",
                                   "p11000011/s51029426"]
    images = np.load(tmp_path / "prepared" / "images.npy")
    for k, rel in enumerate(rels):
        assert np.array_equal(images[k], load_image(str(tmp_path / rel), 8)), rel
