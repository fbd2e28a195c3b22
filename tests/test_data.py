"""Listing and reading image inputs: damaged tars, links, duplicates, non-regular and huge files."""

import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from libra_tok.data import (
    DEFAULT_MAX_FILE_BYTES,
    ImageReadError,
    ImageRecord,
    InputScan,
    TrainImages,
    decode_image_bytes,
    list_images,
    load_image,
    read_image,
    scan_inputs,
)


def png_bytes(colour=(200, 10, 10), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> list[tarfile.TarInfo]:
    infos = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            infos.append(info)
    return infos


def names(records):
    return [r.member or Path(r.source).name for r in records]


def reasons(scan: InputScan) -> dict[str, str]:
    return {(f"{Path(s['source']).name}::{s['member']}" if "member" in s else Path(s["source"]).name): s["reason"]
            for s in scan.skipped}


# -- tars ------------------------------------------------------------------------------------------

@pytest.fixture
def tar_and_folder(tmp_path):
    members = [(f"{k:04d}.png", png_bytes((k * 40, 0, 0))) for k in range(4)]
    members.insert(2, ("0001.txt", b"one"))
    tar_path = tmp_path / "data.tar"
    write_tar(tar_path, members)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes())
    return tar_path, folder


def test_intact_tar_is_listed_as_before(tar_and_folder):
    tar_path, folder = tar_and_folder
    scan = scan_inputs([tar_path, folder])
    assert names(scan.records) == ["0000.png", "0001.png", "0002.png", "0003.png", "a.png"]
    assert scan.records[1].caption == "one" and scan.skipped == []
    assert list_images([tar_path, folder]) == scan.records


def test_truncated_tar_keeps_intact_members(tar_and_folder):
    tar_path, folder = tar_and_folder
    data = tar_path.read_bytes()
    with tarfile.open(tar_path) as tar:
        third = tar.getmember("0002.png")
    # Cut inside the third image's data: the first two members are intact.
    tar_path.write_bytes(data[: third.offset_data + 10])
    scan = scan_inputs([tar_path, folder])
    assert names(scan.records) == ["0000.png", "0001.png", "a.png"]  # the other input is unaffected
    assert scan.records[1].caption == "one"
    assert reasons(scan) == {
        "data.tar::0002.png": f"data runs past the end of the file (byte {third.offset_data + 10})",
        "data.tar": f"truncated tar: members after byte {third.offset} lost",
    }
    for record in scan.records[:2]:
        assert read_image(record).size == (8, 6)


def test_tar_cut_inside_a_header_and_corrupt_header(tar_and_folder):
    tar_path, _ = tar_and_folder
    data = tar_path.read_bytes()
    with tarfile.open(tar_path) as tar:
        third = tar.getmember("0002.png")
    tar_path.write_bytes(data[: third.offset + 100])  # half a header
    scan = scan_inputs([tar_path])
    assert names(scan.records) == ["0000.png", "0001.png"]
    assert reasons(scan) == {"data.tar": f"truncated tar: members after byte {third.offset} lost"}
    garbage = data[: third.offset] + b"\x01" * 512 + data[third.offset + 512:]  # a header that is noise
    tar_path.write_bytes(garbage)
    scan = scan_inputs([tar_path])
    assert names(scan.records) == ["0000.png", "0001.png"]
    assert reasons(scan) == {"data.tar": f"corrupt tar (unreadable header at byte {third.offset}): "
                                         f"members after byte {third.offset} lost"}


def test_tar_that_cannot_be_opened_is_one_skipped_entry(tmp_path, tar_and_folder):
    _, folder = tar_and_folder
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "noise.tar").write_bytes(b"\x07" * 2048)
    shutil.copy(tmp_path / "noise.tar", folder / "inner.tar")
    scan = scan_inputs([tmp_path / "empty.tar", tmp_path / "noise.tar", folder])
    assert names(scan.records) == ["a.png"]
    assert reasons(scan) == {"empty.tar": "cannot open tar: empty file", "noise.tar": "cannot open tar: invalid header",
                             "inner.tar": "cannot open tar: invalid header"}


def test_encode_keeps_going_past_a_truncated_tar(tmp_path, tar_and_folder):
    """End to end: the intact members and the other inputs are encoded."""
    from libra_tok import ImageTokenizer
    from libra_tok.pipeline import encode_to_shards
    from libra_tok.shards import open_shards

    tar_path, folder = tar_and_folder
    data = tar_path.read_bytes()
    with tarfile.open(tar_path) as tar:
        third = tar.getmember("0002.png")
    tar_path.write_bytes(data[: third.offset_data + 10])
    tok = ImageTokenizer("tiny").eval()
    summary = encode_to_shards([tar_path, folder], tmp_path / "out", tok, num_workers=0, progress=False)
    assert summary.samples == len(open_shards(tmp_path / "out")) == 3


# -- folders: links, loops, unreadable sub-folders, non-regular files ---------------------------

@pytest.fixture
def linked_tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(png_bytes())
    (root / "sub" / "b.png").write_bytes(png_bytes())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "c.png").write_bytes(png_bytes())
    (elsewhere / "d.png").write_bytes(png_bytes())
    os.symlink(elsewhere, root / "linked")  # a linked dataset
    os.symlink(elsewhere / "d.png", root / "e.png")  # a linked file
    os.symlink(root, root / "sub" / "up")  # a loop
    os.symlink(tmp_path / "missing.png", root / "gone.png")  # dangling
    os.symlink("self", root / "self")  # a link to itself
    return root


def test_symlinks_are_followed_and_loops_listed(linked_tree):
    root = linked_tree
    scan = scan_inputs([root])
    rel = [Path(r.source).relative_to(root).as_posix() for r in scan.records]
    assert rel == ["a.png", "e.png", "linked/c.png", "sub/b.png"]  # logical paths, in Path order
    assert reasons(scan) == {"gone.png": "dangling symlink", "self": "symlink loop", "up": "symlink loop",
                             "d.png": f"duplicate of {root / 'e.png'}"}
    assert next(s for s in scan.skipped if s["reason"] == "duplicate of " + str(root / "e.png"))["source"] == \
        str(root / "linked" / "d.png")


def test_non_recursive_listing(linked_tree):
    scan = scan_inputs([linked_tree], recursive=False)
    assert names(scan.records) == ["a.png", "e.png"]


def test_unlistable_sub_folder_is_skipped_with_reason(linked_tree, monkeypatch):
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    scan = scan_inputs([linked_tree])
    assert "sub/b.png" not in [Path(r.source).relative_to(linked_tree).as_posix() for r in scan.records]
    assert {"source": str(linked_tree / "sub"), "reason": "cannot list folder: permission denied"} in scan.skipped


def test_fifo_and_devices_are_skipped_not_opened(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png_bytes())
    os.mkfifo(folder / "pipe.png")
    os.symlink("/dev/zero", folder / "zero.png")
    os.mkfifo(folder / "pipe.tar")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'ok.png'}\n{folder / 'pipe.png'}\n/dev/zero\n")
    os.mkfifo(tmp_path / "top.png")
    started = time.monotonic()
    scan = scan_inputs([folder, listing, tmp_path / "top.png"])
    assert time.monotonic() - started < 5
    assert names(scan.records) == ["ok.png"]
    assert sorted((Path(s["source"]).name, s["reason"]) for s in scan.skipped) == [
        ("ok.png", f"duplicate of {folder / 'ok.png'}"), ("pipe.png", "not a regular file"),
        ("pipe.png", "not a regular file"), ("pipe.tar", "not a regular file"), ("top.png", "not a regular file"),
        ("zero", "not a regular file"), ("zero.png", "not a regular file")]


def test_duplicates_are_listed_once(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    for name in ("x.png", "y.png", "sub/z.png"):
        (a / name).write_bytes(png_bytes())
    listing = tmp_path / "list.txt"
    listing.write_text("a/y.png\n./a/y.png\n")
    scan = scan_inputs([a, a / "x.png", a, a / "sub", listing])
    assert [Path(r.source).relative_to(a).as_posix() for r in scan.records] == ["sub/z.png", "x.png", "y.png"]
    assert [(s["source"], s["reason"]) for s in scan.skipped] == [
        (str(a / "x.png"), f"duplicate of {a / 'x.png'}"),
        (str(a), f"duplicate of {a}"),
        (str(a / "sub"), f"duplicate of {a / 'sub'}"),
        (str(tmp_path / "a/y.png"), f"duplicate of {a / 'y.png'}"),
        (str(tmp_path / "a/y.png"), f"duplicate of {a / 'y.png'}"),
    ]
    # The folder given after its sub-folder: the sub-folder is not searched twice.
    scan = scan_inputs([a / "sub", a])
    assert [Path(r.source).relative_to(a).as_posix() for r in scan.records] == ["sub/z.png", "x.png", "y.png"]
    assert scan.skipped == [{"source": str(a / "sub"), "reason": f"duplicate of {a / 'sub'}"}]


def test_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        scan_inputs([tmp_path / "nope"])
    os.symlink(tmp_path / "nope", tmp_path / "link")
    with pytest.raises(FileNotFoundError, match="link is a dangling symlink"):
        scan_inputs([tmp_path / "link"])
    # A missing entry of a file list stays a record: reading it gives the reason.
    listing = tmp_path / "list.txt"
    listing.write_text("gone.png\n")
    (record,) = scan_inputs([listing]).records
    with pytest.raises(ImageReadError, match="cannot read: No such file or directory"):
        read_image(record)


# -- bounded reading ------------------------------------------------------------------------------

# Run in a child with a timeout and an address-space limit: reading a FIFO blocks forever,
# reading /dev/zero never ends.
CHILD_PRELUDE = (
    "import os, resource, sys\n"
    "from libra_tok.data import EvalImages, ImageRecord, ImageReadError, TrainImages, read_image\n"
    "vm = int(open('/proc/self/statm').read().split()[0]) * os.sysconf('SC_PAGE_SIZE')\n"
    "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))\n"
)


def run_child(script: str, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + script, *args], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.splitlines()


def test_read_refuses_fifo_and_devices_at_once(tmp_path):
    os.mkfifo(tmp_path / "x.png")
    script = (
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        read_image(ImageRecord(path))\n"
        "    except ImageReadError as err:\n"
        "        print(path, err)\n"
    )
    lines = run_child(script, str(tmp_path / "x.png"), "/dev/zero")
    assert lines == [f"{tmp_path / 'x.png'} not a regular file", "/dev/zero not a regular file"]


def test_image_paths_are_read_with_bounds(tmp_path):
    """Image paths (libra_tok.data.load_image, which ImageTokenizer.preprocess reads paths with): a
    FIFO or a device is refused at once, not read; errors name the file."""
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "text.png").write_text("not a png")
    script = ("import os, resource, sys\nfrom libra_tok.data import load_image\n"
              "vm = int(open('/proc/self/statm').read().split()[0]) * os.sysconf('SC_PAGE_SIZE')\n"
              "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))\n"
              "for p in sys.argv[1:]:\n"
              "    try:\n        load_image(p)\n    except ValueError as err:\n        print(err)\n")
    paths = [str(tmp_path / "pipe.png"), "/dev/zero", str(tmp_path / "text.png")]
    result = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [f"cannot read image {paths[0]}: not a regular file",
                                          "cannot read image /dev/zero: not a regular file",
                                          f"cannot read image {paths[2]}: not an image"]
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        load_image(tmp_path / "missing.png")


def test_read_refuses_oversized_files_without_reading(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    with open(big, "wb") as fh:  # sparse: 2 GiB on paper, nothing on disk
        fh.truncate(2 << 30)
    read = []
    real_fdopen = os.fdopen

    class Spy:  # records every read of the opened file
        def __init__(self, *args):
            self.fh = real_fdopen(*args)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def read(self, *args):
            read.append(args)
            return self.fh.read(*args)

    monkeypatch.setattr(os, "fdopen", Spy)
    too_large = rf"file too large \({2 << 30} bytes > limit of {DEFAULT_MAX_FILE_BYTES} bytes\)"
    with pytest.raises(ImageReadError, match=too_large):
        read_image(ImageRecord(str(big)))
    assert read == []
    small = tmp_path / "small.png"
    small.write_bytes(png_bytes())
    with pytest.raises(ImageReadError, match=r"file too large \(\d+ bytes > limit of 20 bytes\)"):
        read_image(ImageRecord(str(small)), max_bytes=20)
    assert read_image(ImageRecord(str(small))).size == (8, 6)
    assert read == [(small.stat().st_size,)]  # what stat said, no more
    # A tar member claiming more bytes than the limit.
    with pytest.raises(ImageReadError, match=r"file too large \(5000 bytes > limit of 100 bytes\)"):
        read_image(ImageRecord(str(small), "m.png", 0, 5000), max_bytes=100)


def test_datasets_get_the_same_protections(tmp_path):
    os.mkfifo(tmp_path / "x.png")
    script = (
        "records = [ImageRecord(sys.argv[1]), ImageRecord('/dev/zero')]\n"
        "print(EvalImages(records, 32)[0], EvalImages(records, 32)[1])\n"
        "print(TrainImages(records, 32)[(0, 7)], TrainImages(records, 32)[(1, 7)])\n"
    )
    assert run_child(script, str(tmp_path / "x.png")) == ["(0, 'not a regular file') (1, 'not a regular file')"] * 2


# -- decoding -----------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_max_pixels_above_pillows_limit_is_honoured(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses > 2000 pixels
    data = png_bytes(size=(100, 60))  # 6000 pixels
    image = decode_image_bytes(data, max_pixels=10_000)
    assert image.size == (100, 60) and image.getpixel((0, 0)) == (200, 10, 10)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    with pytest.raises(ImageReadError, match=r"too many pixels \(100x60 > 5000\)"):
        decode_image_bytes(data, max_pixels=5000)
    with pytest.raises(ImageReadError, match="too many pixels"):
        decode_image_bytes(data, max_pixels=1500)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_sixteen_bit_values_convert_the_same_in_every_image():
    dim = Image.fromarray(np.array([[200, 100]], dtype=np.uint16))
    bright = Image.fromarray(np.array([[200, 65535]], dtype=np.uint16))
    assert dim.mode.startswith("I;16")
    got = [decode_image_bytes(_encode_png(im)).getpixel((0, 0)) for im in (dim, bright)]
    assert got == [(1, 1, 1), (1, 1, 1)]  # round(200 / 257), whatever the image's maximum


def _encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_training_views_of_images_above_pillows_limit(tmp_path, monkeypatch):
    """An image that max_pixels allows but Pillow's own limit does not is decoded and cropped."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (tmp_path / "a.png").write_bytes(png_bytes(size=(100, 60)))
    records = [ImageRecord(str(tmp_path / "a.png"))]
    index, view = TrainImages(records, 16, crop_scale=(0.9, 1.0))[(0, 3)]
    assert index == 0 and view.shape == (3, 16, 16)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_running_out_of_memory_is_not_a_corrupt_image(monkeypatch):
    """Out of memory while decoding is the machine's limit: it propagates (the server answers
    503, a run stops) instead of being reported as a corrupt file."""
    from PIL import Image

    from libra_tok import data

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(Image, "open", no_memory)
    with pytest.raises(MemoryError):
        data.decode_image_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
