"""Optional download of MVTec-AD and VisA from the URLs their publishers state.

    python -m clipsam_jax.data.download mvtec --out data/mvtec
    python -m clipsam_jax.data.download visa --out data/visa

Downloads resume from a `.part` file after an interruption, then the archive is extracted
(members that would land outside `--out` are refused) and the result is checked with the
dataset's loader. `--archive FILE` extracts an archive you downloaded yourself instead.

Checksums: the publishers state none that this tool knows of, so none is verified; the SHA-256
of the archive is printed for your records.

VisA: the tar holds `<class>/Data/{Images,Masks}/...`. The loader also needs the 1-class split
file `split_csv/1cls.csv` of the VisA repository (https://github.com/amazon-science/spot-diff).
If the tar does not contain it, this tool fetches it from that repository; if that fails, copy
`split_csv/1cls.csv` from a clone of the repository to `<out>/split_csv/1cls.csv` (or pass
`--split-csv FILE`). Do not run the repository's `prepare_data.py`: this project reads the raw
layout, as APRIL-GAN and AnomalyCLIP do.

Licenses: MVTec-AD CC BY-NC-SA 4.0 (non-commercial), VisA CC BY 4.0; read the publishers' terms.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from tqdm import tqdm

from clipsam_jax import cli
from clipsam_jax.data.types import subfolders, summarize
from clipsam_jax.errors import DatasetError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    name: str
    url: str
    page: str
    license: str
    is_root: Callable[[Path], bool]  # does this folder hold the dataset's classes?


SOURCES = {
    "mvtec": Source(
        "MVTec-AD",
        "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
        "420938113-1629952094/mvtec_anomaly_detection.tar.xz",
        "https://www.mvtec.com/company/research/datasets/mvtec-ad",
        "CC BY-NC-SA 4.0 (non-commercial use)",
        lambda folder: any(
            (d / "test").is_dir() and (d / "train").is_dir() for d in subfolders(folder)
        ),
    ),
    "visa": Source(
        "VisA",
        "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        "https://github.com/amazon-science/spot-diff",
        "CC BY 4.0",
        lambda folder: any((d / "Data" / "Images").is_dir() for d in subfolders(folder)),
    ),
}
VISA_SPLIT_CSV_URL = (
    "https://raw.githubusercontent.com/amazon-science/spot-diff/main/split_csv/1cls.csv"
)


def fetch(url: str, dest: str | PathLike, progress: bool = True) -> Path:
    """Download `url` to `dest` with a progress bar, resuming a previous `dest.part`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    start = partial.stat().st_size if partial.exists() else 0
    try:
        request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
        with urllib.request.urlopen(request, timeout=60) as response:
            if start and response.status != 206:  # the server ignored the range: start over
                start = 0
            _append(response, partial, start, dest.name if progress else None)
    except urllib.error.HTTPError as error:
        if not (start and error.code == 416):
            raise _failed(url, partial, error) from error
        # Range Not Satisfiable: nothing after byte `start`. "bytes */<size>" names the size:
        # the partial file is the whole file (interrupted before the rename), or it is stale.
        size = (error.headers.get("Content-Range") or "").rpartition("/")[2].strip()
        if size != str(start):
            partial.unlink()
            return fetch(url, dest, progress)
    except (urllib.error.URLError, OSError) as error:
        raise _failed(url, partial, error) from error
    partial.replace(dest)
    return dest


def _failed(url: str, partial: Path, error: Exception) -> DatasetError:
    return DatasetError(
        f"download of {url} failed ({error}). Rerun to resume from {partial}, or download "
        "the file yourself and pass --archive FILE."
    )


def _append(response, partial: Path, start: int, label: str | None) -> None:
    """Write the response body to `partial` from byte `start`, with a progress bar."""
    length = response.headers.get("Content-Length")
    total = int(length) + start if length else None
    bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=label, disable=not label)
    with partial.open("ab" if start else "wb") as handle, bar:
        while chunk := response.read(CHUNK):
            handle.write(chunk)
            bar.update(len(chunk))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def extract(archive: str | PathLike, out_dir: str | PathLike) -> Path:
    """Extract a tar archive (any compression) into `out_dir`, refusing unsafe members."""
    archive, out_dir = Path(archive), Path(out_dir)
    if not archive.is_file():
        raise DatasetError(f"{archive}: no such archive")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            _check_members(members, out_dir)
            # Python < 3.10.12 has no extraction filters: the members were checked above
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            for member in tqdm(members, desc=f"extracting {archive.name}", unit="file"):
                tar.extract(member, out_dir, **safe)
    except tarfile.TarError as error:
        raise DatasetError(f"{archive}: not a readable tar archive ({error})") from error
    return out_dir


def _check_members(members: list[tarfile.TarInfo], out_dir: Path) -> None:
    base = out_dir.resolve()
    for member in members:
        target = (out_dir / member.name).resolve()
        if target != base and base not in target.parents:
            raise DatasetError(f"archive member {member.name!r} would be written outside {out_dir}")
        if member.issym() or member.islnk() or member.isdev():
            raise DatasetError(f"archive member {member.name!r} is a link or device; refused")


def find_root(out_dir: Path, source: Source) -> Path:
    """The folder holding the classes: `out_dir` or a single wrapping folder below it."""
    for folder in [out_dir, *subfolders(out_dir)]:
        if source.is_root(folder):
            return folder
    raise DatasetError(f"{out_dir}: no {source.name} classes found after extraction")


def ensure_visa_split_csv(root: Path, split_csv: Path | None = None) -> Path:
    """Make sure `<root>/split_csv/1cls.csv` exists: copy `split_csv`, or fetch it."""
    target = root / "split_csv" / "1cls.csv"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if split_csv is not None:
        if not split_csv.is_file():
            raise DatasetError(f"{split_csv}: no such file (given as the VisA split csv)")
        shutil.copyfile(split_csv, target)
        return target
    try:
        return fetch(VISA_SPLIT_CSV_URL, target, progress=False)
    except DatasetError as error:
        raise DatasetError(
            f"{target} is missing and could not be fetched ({error}). Copy split_csv/1cls.csv "
            "from https://github.com/amazon-science/spot-diff to that path, or rerun with "
            "--split-csv FILE."
        ) from error


def download(
    name: str, out_dir: str | PathLike, archive: str | PathLike | None = None,
    keep_archive: bool = False, split_csv: str | PathLike | None = None,
) -> Path:  # fmt: skip
    """Download (or take `archive`), extract and check dataset `name`; returns its root."""
    from clipsam_jax.data.registry import load_dataset  # registry imports every loader

    source = SOURCES[name]
    out_dir = Path(out_dir)
    print(f"{source.name}: license {source.license}; see {source.page}")
    downloaded = archive is None
    if not downloaded and not Path(archive).is_file():
        raise DatasetError(f"{archive}: no such archive")
    file_name = source.url.rsplit("/", 1)[-1]
    path = fetch(source.url, out_dir / file_name) if downloaded else Path(archive)
    print(f"{path.name}: sha256 {sha256(path)} (no publisher checksum known; not verified)")
    root = find_root(extract(path, out_dir), source)
    if name == "visa":
        ensure_visa_split_csv(root, Path(split_csv) if split_csv else None)
    if downloaded and not keep_archive:
        path.unlink()
    print(summarize(load_dataset(name, root)))
    print(f"{source.name} is ready: use --data-root {root}")
    return root


def download_mvtec(out_dir: str | PathLike, **kwargs) -> Path:
    return download("mvtec", out_dir, **kwargs)


def download_visa(out_dir: str | PathLike, **kwargs) -> Path:
    return download("visa", out_dir, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clipsam_jax.data.download",
        description="Download and extract MVTec-AD or VisA (see the module docstring).",
    )
    parser.add_argument("dataset", choices=sorted(SOURCES))
    parser.add_argument("--out", default=None, help="target folder (default data/<dataset>)")
    parser.add_argument("--archive", default=None, help="extract this archive; no download")
    parser.add_argument("--keep-archive", action="store_true", help="keep the downloaded file")
    parser.add_argument("--split-csv", default=None, help="VisA: a local split_csv/1cls.csv")
    return parser


def _main(argv: Sequence[str] | None) -> None:
    args = _parser().parse_args(argv)
    download(args.dataset, args.out or Path("data") / args.dataset, archive=args.archive,
             keep_archive=args.keep_archive, split_csv=args.split_csv)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
