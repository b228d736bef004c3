"""Loaders, registry, meta.json and download on synthetic data in every layout, and broken trees."""

from __future__ import annotations

import hashlib
import http.server
import io
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsam_jax.data import download, meta
from clipsam_jax.data.image_io import read_image, read_mask
from clipsam_jax.data.meta import read_meta, write_meta
from clipsam_jax.data.mtd import CLASS_NAME as MTD_CLASS
from clipsam_jax.data.pipeline import BatchLoader, load_sample
from clipsam_jax.data.registry import load_dataset
from clipsam_jax.data.synthetic import generate
from clipsam_jax.data.types import GOOD
from clipsam_jax.errors import DatasetError, ImageReadError

N = 3  # images per class (per folder for MTD)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """All four synthetic layouts, generated once for this module (read-only for tests)."""
    return generate("all", tmp_path_factory.mktemp("synthetic"), images_per_class=N, image_size=64)


@pytest.fixture
def mvtec(data, tmp_path) -> Path:
    """A private, writable copy of the MVTec-layout data (for tests that break it)."""
    return Path(shutil.copytree(data / "mvtec", tmp_path / "mvtec"))


def _check_convention(dataset):
    for name, samples in dataset.items():
        assert samples, name
        assert [str(s.image_path) for s in samples] == sorted(str(s.image_path) for s in samples)
        for s in samples:
            assert s.class_name == name
            assert s.label in (0, 1)
            assert (s.label == 1) == (s.mask_path is not None) == (s.defect_type != GOOD)
            assert s.image_path.is_file()


# --------------------------------------------------------------------------- loaders


def test_mvtec(data):
    dataset = load_dataset("mvtec", data / "mvtec")
    _check_convention(dataset)
    assert list(dataset) == ["bottle", "carpet", "grid", "screw"]
    assert [len(v) for v in dataset.values()] == [2 * N, N, 2 * N, 2 * N]
    assert all(s.label == 1 for s in dataset["carpet"]), "carpet has no test/good folder"
    assert {s.defect_type for s in dataset["bottle"]} == {"good", "crack", "stain", "missing"}
    for s in dataset["bottle"]:
        if s.label:
            assert s.mask_path.name == f"{s.image_path.stem}_mask.png"
            assert s.mask_path.parent.name == s.defect_type
    train = load_dataset("mvtec", data / "mvtec", split="train")
    assert all(s.label == 0 and s.defect_type == GOOD for v in train.values() for s in v)
    assert [len(v) for v in train.values()] == [N] * 4


def test_mvtec_grayscale_images_become_rgb(data):
    sample = load_dataset("mvtec", data / "mvtec", classes=["grid"])["grid"][0]
    assert Image.open(sample.image_path).mode == "L"
    rgb = read_image(sample.image_path)
    assert rgb.shape[-1] == 3 and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_mvtec_masks_pair_by_stem_not_by_sorted_position(mvtec):
    """Renamed so that sorted images and sorted masks are in different orders."""
    images = mvtec / "screw/test/scratch"
    masks = mvtec / "screw/ground_truth/scratch"
    shutil.move(mvtec / "screw/test/stain/000.png", images / "001.png")  # a second pair
    shutil.move(mvtec / "screw/ground_truth/stain/000_mask.png", masks / "001_mask.png")
    pairs = {}
    for old, new in (("000", "a"), ("001", "a_b")):  # a.png < a_b.png but a_b_mask < a_mask
        (images / f"{old}.png").rename(images / f"{new}.png")
        (masks / f"{old}_mask.png").rename(masks / f"{new}_mask.png")
        pairs[_sha(images / f"{new}.png")] = _sha(masks / f"{new}_mask.png")
    assert len(set(pairs.values())) == 2
    assert [p.name for p in sorted(images.iterdir())] == ["a.png", "a_b.png"]
    assert [p.name for p in sorted(masks.iterdir())] == ["a_b_mask.png", "a_mask.png"]
    samples = [s for s in load_dataset("mvtec", mvtec)["screw"] if s.defect_type == "scratch"]
    assert len(samples) == 2
    for s in samples:
        assert pairs[_sha(s.image_path)] == _sha(s.mask_path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_visa(data):
    dataset = load_dataset("visa", data / "visa")
    _check_convention(dataset)
    assert list(dataset) == ["candle", "cashew", "pcb1"]
    assert all(len(v) == 2 * N for v in dataset.values())
    assert {s.defect_type for v in dataset.values() for s in v} == {"good", "anomaly"}
    assert all(s.image_path.suffix == ".JPG" for v in dataset.values() for s in v)
    train = load_dataset("visa", data / "visa", split="train")
    assert all(len(v) == N and not any(s.label for s in v) for v in train.values())


def test_visa_mask_ids_are_binarized(data):
    dataset = load_dataset("visa", data / "visa")
    multi = 0
    for s in (s for v in dataset.values() for s in v if s.label):
        raw = np.asarray(Image.open(s.mask_path))
        multi += raw.max() > 1
        item = load_sample(s, 32)
        assert np.array_equal(read_mask(s.mask_path), raw > 0)
        assert item["mask"].dtype == bool and item["mask"].any()
    assert multi, "the synthetic VisA masks should include several region ids"


def test_mtd_label_is_mask_non_emptiness(data):
    dataset = load_dataset("mtd", data / "mtd")
    _check_convention(dataset)
    samples = dataset[MTD_CLASS]
    assert list(dataset) == [MTD_CLASS]
    assert len(samples) == 5 * N + 2 * N  # five defect folders, MT_Free twice as many
    by_folder = {}
    for s in samples:
        by_folder.setdefault(s.image_path.parent.parent.name, []).append(s)
    assert not any(s.label for s in by_folder["MT_Free"])
    for folder in ("MT_Fray", "MT_Uneven"):  # one image each with an empty mask
        assert sum(s.label == 0 for s in by_folder[folder]) == 1
    assert all(s.label for s in by_folder["MT_Crack"])
    assert {s.defect_type for s in by_folder["MT_Crack"]} == {"crack"}
    assert len({read_image(s.image_path).shape for s in samples}) > 1, "sizes vary"
    assert load_dataset("mtd", data / "mtd", split="test") == dataset


def test_ksdd2(data):
    dataset = load_dataset("ksdd2", data / "ksdd2")
    _check_convention(dataset)
    samples = dataset["ksdd2"]
    assert len(samples) == 2 * N
    assert sum(s.label for s in samples) == 2  # images 0 and 3 of 6
    assert all(s.image_path.parent.name == "test" for s in samples)
    assert all(s.mask_path.name == f"{s.image_path.stem}_GT.png" for s in samples if s.label)
    assert len(load_dataset("ksdd2", data / "ksdd2", split="train")["ksdd2"]) == 2 * N


def test_classes_filter_and_unknown_class(data):
    dataset = load_dataset("visa", data / "visa", classes="pcb1,candle")
    assert list(dataset) == ["candle", "pcb1"]
    for name in ("mvtec", "visa", "mtd", "ksdd2", "meta"):
        root = data / ("visa" if name == "meta" else name)
        with pytest.raises(DatasetError, match="available classes") as info:
            load_dataset(name, root, classes=["no_such_class"])
        assert "no_such_class" in str(info.value)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet", data)


# --------------------------------------------------------------------------- meta.json


@pytest.mark.parametrize("layout", ["mvtec", "visa", "mtd", "ksdd2"])
def test_generated_meta_json_matches_the_loader(data, layout):
    assert read_meta(data / layout, "test") == load_dataset(layout, data / layout)


def test_meta_round_trip(data, tmp_path):
    root = Path(shutil.copytree(data / "mvtec", tmp_path / "m"))
    (root / "meta.json").unlink()
    splits = {s: load_dataset("mvtec", root, split=s) for s in ("train", "test")}
    path = write_meta(root, splits)
    text = path.read_text()
    assert str(root) not in text, "paths are relative to the root"
    assert '"mask_path": ""' in text
    for split, dataset in splits.items():
        assert read_meta(root, split) == dataset
    assert load_dataset("meta", root) == splits["test"]


def test_meta_command_line(data, tmp_path, capsys):
    root = Path(shutil.copytree(data / "ksdd2", tmp_path / "k"))
    (root / "meta.json").unlink()
    assert meta.main(["--layout", "ksdd2", "--root", str(root)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert read_meta(root, "train") == load_dataset("ksdd2", root, split="train")
    assert meta.main(["--layout", "mvtec", "--root", str(tmp_path / "none")]) == 2
    assert "MVTec-AD not found" in capsys.readouterr().err


def test_meta_errors(data, tmp_path):
    with pytest.raises(DatasetError, match=r"meta\.json"):
        read_meta(tmp_path)
    root = Path(shutil.copytree(data / "ksdd2", tmp_path / "k"))
    with pytest.raises(DatasetError, match="'validation'"):
        read_meta(root, "validation")
    sample = load_dataset("ksdd2", root)["ksdd2"][0]
    with pytest.raises(DatasetError, match="not under the dataset root"):
        write_meta(tmp_path / "elsewhere", {"test": {"ksdd2": [sample]}})


# --------------------------------------------------------------------------- broken trees


def test_missing_root_explains_layout_and_source(tmp_path):
    cases = {
        "mvtec": "mvtec.com/company/research/datasets/mvtec-ad",
        "visa": "spot-diff",
        "mtd": "Magnetic-tile-defect-datasets",
        "ksdd2": "kolektorsdd2",
        "meta": "python -m clipsam_jax.data.meta",
    }
    for name, source in cases.items():
        with pytest.raises(DatasetError) as info:
            load_dataset(name, tmp_path / "absent")
        message = str(info.value)
        assert str(tmp_path / "absent") in message
        assert "Expected layout" in message and "--data-root" in message
        assert source in message, name


def test_mvtec_missing_ground_truth(mvtec):
    shutil.rmtree(mvtec / "bottle/ground_truth")
    with pytest.raises(DatasetError, match="ground_truth") as info:
        load_dataset("mvtec", mvtec)
    assert "missing folder" in str(info.value) and "_mask.png" in str(info.value)
    assert load_dataset("mvtec", mvtec, classes=["grid"]), "other classes still load"


def test_mvtec_anomalous_image_without_mask(mvtec):
    (mvtec / "grid/ground_truth/hole/000_mask.png").unlink()
    with pytest.raises(DatasetError, match="without a mask") as info:
        load_dataset("mvtec", mvtec)
    assert str(mvtec / "grid/test/hole/000.png") in str(info.value)


def test_mvtec_mask_without_image(mvtec):
    (mvtec / "grid/test/hole/000.png").unlink()
    with pytest.raises(DatasetError, match="mask without an image") as info:
        load_dataset("mvtec", mvtec)
    assert str(mvtec / "grid/ground_truth/hole/000_mask.png") in str(info.value)
    shutil.rmtree(mvtec / "grid/test/hole")
    with pytest.raises(DatasetError, match="masks without images"):
        load_dataset("mvtec", mvtec)


def test_mvtec_empty_class_and_class_without_test(mvtec):
    (mvtec / "empty/test/good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="'empty' has no images"):
        load_dataset("mvtec", mvtec)
    shutil.rmtree(mvtec / "empty/test")
    with pytest.raises(DatasetError, match="missing folder") as info:
        load_dataset("mvtec", mvtec)
    assert str(mvtec / "empty/test") in str(info.value)


def test_unreadable_image_fails_in_the_pipeline_naming_it(mvtec):
    broken = mvtec / "bottle/test/good/001.png"
    broken.write_bytes(b"not a png at all")
    samples = load_dataset("mvtec", mvtec)["bottle"]  # listing does not decode
    with pytest.raises(ImageReadError, match="cannot decode") as info:
        for _ in BatchLoader(samples, image_size=32, batch_size=2, num_workers=2):
            pass
    assert str(broken) in str(info.value)


def test_mask_of_the_wrong_size_names_both_sizes(mvtec):
    mask_path = mvtec / "bottle/ground_truth/crack/000_mask.png"
    mask = Image.open(mask_path)
    mask.resize((mask.width + 5, mask.height)).save(mask_path)
    sample = next(s for s in load_dataset("mvtec", mvtec)["bottle"] if s.mask_path == mask_path)
    with pytest.raises(ImageReadError) as info:
        load_sample(sample, 32)
    message = str(info.value)
    assert str(mask_path) in message
    assert f"{mask.width + 5}x{mask.height}" in message and f"{mask.width}x{mask.height}" in message


def test_visa_missing_csv_and_missing_files(data, tmp_path):
    root = Path(shutil.copytree(data / "visa", tmp_path / "v"))
    (root / "candle/Data/Masks/Anomaly/001.png").unlink()
    with pytest.raises(DatasetError, match="mask listed in") as info:
        load_dataset("visa", root)
    assert "candle/Data/Masks/Anomaly/001.png" in str(info.value)
    (root / "split_csv/1cls.csv").unlink()
    with pytest.raises(DatasetError, match="spot-diff") as info:
        load_dataset("visa", root)
    assert "split_csv" in str(info.value) and "Expected layout" in str(info.value)


def test_mtd_and_ksdd2_pairing_errors(data, tmp_path):
    mtd = Path(shutil.copytree(data / "mtd", tmp_path / "mtd"))
    mask = sorted((mtd / "MT_Crack/Imgs").glob("*.png"))[0]
    mask.unlink()
    with pytest.raises(DatasetError, match="image without a mask") as info:
        load_dataset("mtd", mtd)
    assert mask.stem in str(info.value)
    ksdd2 = Path(shutil.copytree(data / "ksdd2", tmp_path / "ksdd2"))
    (ksdd2 / "test/20001.png").unlink()
    with pytest.raises(DatasetError, match="mask without an image") as info:
        load_dataset("ksdd2", ksdd2)
    assert "20001_GT.png" in str(info.value)


# --------------------------------------------------------------------------- download


def _tar(source: Path, archive: Path, prefix: str = "") -> Path:
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname=prefix or ".")
    return archive


def test_download_extracts_a_local_mvtec_archive(data, tmp_path, capsys):
    archive = _tar(data / "mvtec", tmp_path / "mvtec.tar", prefix="mvtec_anomaly_detection")
    out = tmp_path / "out"
    assert download.main(["mvtec", "--out", str(out), "--archive", str(archive)]) == 0
    printed = capsys.readouterr().out
    assert "not verified" in printed and "CC BY-NC-SA" in printed
    assert f"--data-root {out / 'mvtec_anomaly_detection'}" in printed
    assert archive.is_file(), "a given archive is never deleted"
    assert load_dataset("mvtec", out / "mvtec_anomaly_detection")


def test_download_visa_archive_with_a_local_split_csv(data, tmp_path, capsys):
    staged = Path(shutil.copytree(data / "visa", tmp_path / "staged"))
    csv_copy = tmp_path / "1cls.csv"
    shutil.move(staged / "split_csv/1cls.csv", csv_copy)
    archive = _tar(staged, tmp_path / "VisA.tar")
    out = tmp_path / "visa"
    args = ["visa", "--out", str(out), "--archive", str(archive), "--split-csv", str(csv_copy)]
    assert download.main(args) == 0
    assert (out / "split_csv/1cls.csv").is_file()
    assert load_dataset("visa", out)


def test_download_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        download.main(["imagenet"])
    assert info.value.code == 2
    missing = tmp_path / "nowhere.tar"
    assert download.main(["mvtec", "--out", str(tmp_path / "o"), "--archive", str(missing)]) == 2
    assert f"{missing}: no such archive" in capsys.readouterr().err


def test_extract_refuses_members_outside_the_target(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DatasetError, match="outside"):
        download.extract(archive, tmp_path / "target")
    assert not (tmp_path / "escaped.txt").exists()


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` ({path: bytes}); honours `Range: bytes=N-` with 206 and
    Content-Range when `server.honour_range`, else answers 200 with the whole file (as Python's
    SimpleHTTPRequestHandler does). Records (path, Range header, status, body bytes sent)
    before answering."""

    def do_GET(self) -> None:
        server = self.server
        payload = server.files.get(self.path)
        requested = self.headers.get("Range")
        if payload is None:
            server.requests.append((self.path, requested, 404, 0))
            self.send_error(404)
            return
        status, start = 200, 0
        if requested and server.honour_range:
            unit, _, spec = requested.partition("=")
            first, _, last = spec.partition("-")
            assert unit == "bytes" and first.isdigit() and not last, requested
            start = int(first)
            if start >= len(payload):
                server.requests.append((self.path, requested, 416, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(payload)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = payload[start:]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        self.send_header("Content-Length", str(len(body)))
        server.requests.append((self.path, requested, status, len(body)))  # before the client
        self.end_headers()  # can see the answer and the test read `requests`
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def file_server():
    """A loopback HTTP server (no internet needed); `.url(path)`, `.files`, `.requests`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.files, server.requests, server.honour_range = {}, [], True
    server.url = lambda path: f"http://127.0.0.1:{server.server_port}{path}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


PAYLOAD = np.random.default_rng(0).bytes(128_000)  # aperiodic: a wrong offset shows


def test_fetch_resumes_a_partial_download_with_a_range_request(file_server, tmp_path):
    file_server.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "out/f.bin"
    dest.parent.mkdir()
    partial = tmp_path / "out/f.bin.part"
    done = 50_001  # an interrupted earlier run left this much
    partial.write_bytes(PAYLOAD[:done])
    assert download.fetch(file_server.url("/f.bin"), dest, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not partial.exists()
    # One request, for the rest only, answered with the rest only.
    assert file_server.requests == [("/f.bin", f"bytes={done}-", 206, len(PAYLOAD) - done)]


def test_fetch_without_a_partial_file_asks_for_everything(file_server, tmp_path):
    file_server.files["/f.bin"] = PAYLOAD
    dest = download.fetch(file_server.url("/f.bin"), tmp_path / "new/f.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert file_server.requests == [("/f.bin", None, 200, len(PAYLOAD))]


def test_fetch_restarts_when_the_server_ignores_range(file_server, tmp_path):
    """A server without Range support answers 200 with the whole file: the stale partial file
    is overwritten, not appended to."""
    file_server.honour_range = False
    file_server.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "out/f.bin"
    dest.parent.mkdir()
    stale = b"stale bytes, not a prefix of the payload"
    (tmp_path / "out/f.bin.part").write_bytes(stale)
    assert download.fetch(file_server.url("/f.bin"), dest, progress=False).read_bytes() == PAYLOAD
    assert not (tmp_path / "out/f.bin.part").exists()
    assert file_server.requests == [("/f.bin", f"bytes={len(stale)}-", 200, len(PAYLOAD))]


@pytest.mark.parametrize("extra", [0, 7])
def test_fetch_of_a_partial_file_the_server_cannot_extend(file_server, tmp_path, extra):
    """416 Range Not Satisfiable: a partial file holding the whole payload (interrupted before
    the rename) becomes the download; a longer one (the file changed) is fetched afresh."""
    file_server.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    partial = tmp_path / "f.bin.part"
    partial.write_bytes(PAYLOAD + b"x" * extra)
    assert download.fetch(file_server.url("/f.bin"), dest, progress=False).read_bytes() == PAYLOAD
    assert not partial.exists()
    first = ("/f.bin", f"bytes={len(PAYLOAD) + extra}-", 416, 0)
    assert file_server.requests == (
        [first] if not extra else [first, ("/f.bin", None, 200, len(PAYLOAD))]
    )


def test_fetch_failure_keeps_the_partial_file_and_says_how_to_resume(file_server, tmp_path):
    partial = tmp_path / "g.bin.part"
    partial.write_bytes(b"partial")
    with pytest.raises(DatasetError, match="Rerun to resume"):
        download.fetch(file_server.url("/missing.bin"), tmp_path / "g.bin", progress=False)
    assert partial.read_bytes() == b"partial"
    assert not (tmp_path / "g.bin").exists()
