"""Shard sets on disk: the manifest, metadata read per sample through its index (format 2)
or by parsing (format 1), one reader over several folders; `verify` finds every kind of
damage, reading never leaves the shard."""

import hashlib
import json
import logging
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from libra_cli.tok import main
from libra_tok import shards as shards_module
from libra_tok.pipeline import encode_to_shards, load_tokenizer
from libra_tok.shards import (
    META_INDEX_DTYPE,
    ShardManifest,
    index_meta_lines,
    open_shards,
    read_manifest,
    sha256_file,
    verify_shards,
)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, assets_dir):
    """The 10 sample images in 3 shards of 4, 4 and 2 (written once, copied by each test)."""
    out = tmp_path_factory.mktemp("encoded") / "shards"
    encode_to_shards([assets_dir], out, load_tokenizer(preset="tiny", device="cpu"), shard_size=4, num_workers=0,
                  progress=False)
    return out


@pytest.fixture
def shards(encoded, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(encoded, copy)
    return copy


def _edit(path, change):
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _verify_cli(folder):
    return CliRunner().invoke(main, ["verify", str(folder)])


def test_a_whole_set_verifies(shards):
    assert verify_shards(shards) == []
    result = _verify_cli(shards)
    assert result.exit_code == 0, result.output
    assert "3 shards, 10 samples: the set is complete" in result.stdout
    manifest = json.loads((shards / "shard-00001" / "manifest.json").read_text())
    assert manifest["inputs"] | {"list_sha256": None} == {"count": 10, "list_sha256": None, "slice": [4, 8],
                                                           "shard_size": 4, "num_shards": 3}


@pytest.mark.parametrize("deleted", ["shard-00001", "shard-00002"])
def test_a_deleted_shard_folder_is_found(shards, deleted):
    shutil.rmtree(shards / deleted)
    assert verify_shards(shards) == [f"{shards / deleted}: missing (the set was planned as 3 shard(s) for 10 inputs)"]
    result = _verify_cli(shards)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"{shards / deleted}: missing (the set was planned as 3 shard(s) for "
                                          "10 inputs)", f"Error: 1 problem(s) in {shards}"]


def test_manifests_without_the_recorded_plan_are_inferred(shards):
    """Sets written before the plan was recorded: the plan follows from each slice and index."""
    for k in range(3):
        def old(m):
            del m["inputs"]["shard_size"], m["inputs"]["num_shards"]
        _edit(shards / f"shard-0000{k}" / "manifest.json", old)
    assert verify_shards(shards) == []
    shutil.rmtree(shards / "shard-00002")  # the last one: only the plan tells that it existed
    assert verify_shards(shards) == [f"{shards / 'shard-00002'}: missing (the set was planned as 3 shard(s) for "
                                     "10 inputs)"]


def test_an_edited_num_samples_is_found(shards):
    manifest = shards / "shard-00000" / "manifest.json"
    _edit(manifest, lambda m: m.update(num_samples=3))
    problems = verify_shards(shards)
    assert f"{manifest}: ids shape [4, 64, 2], but num_samples 3, grid [8, 8] and num_codebooks 2 make [3, 64, 2]" \
        in problems
    assert f"{shards / 'shard-00000' / 'meta.jsonl'}: 4 lines for num_samples 3" in problems
    assert (f"{manifest}: num_samples 3 + 0 failed input(s) do not account for the 4 inputs of its slice [0, 4)"
            in problems)
    with pytest.raises(ValueError, match=r"num_samples is 3 but the ids shape is \[4, 64, 2\].*libra-tok verify"):
        open_shards(shards)
    # Edited together with the shape: the file sizes, the metadata and the slice still disagree.
    _edit(manifest, lambda m: m["ids"].update(shape=[3, 64, 2]))
    problems = verify_shards(shards)
    assert f"{shards / 'shard-00000' / 'ids.u16'}: 1024 bytes, but 3 samples of shape [64, 2] need 768" in problems
    assert f"{shards / 'shard-00000' / 'meta.jsonl'}: 4 lines for num_samples 3" in problems
    result = _verify_cli(shards)
    assert result.exit_code == 1 and result.stderr.splitlines()[-1] == f"Error: {len(problems)} problem(s) in {shards}"
    assert result.stderr.splitlines()[:-1] == problems


def test_an_emptied_files_list_is_found(shards):
    _edit(shards / "shard-00001" / "manifest.json", lambda m: m.update(files={}))
    folder = shards / "shard-00001"
    assert verify_shards(shards) == [
        f"{folder / 'ids.u16'}: the ids file is not listed in the manifest's files (no size and sha256 to check it "
        "against)",
        f"{folder / 'meta.jsonl'}: the meta file is not listed in the manifest's files (no size and sha256 to check it "
        "against)",
        f"{folder / 'meta.idx'}: the meta index file is not listed in the manifest's files (no size and sha256 to "
        "check it against)",
    ]
    _edit(folder / "manifest.json", lambda m: m.pop("files"))
    assert (f"{folder / 'manifest.json'}: no files list (nothing to check the shard's files against)"
            in verify_shards(shards))


def test_names_outside_the_shard_are_refused(shards, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not part of any shard")
    folder = shards / "shard-00000"
    escape = "../../secret.txt"  # the hash and size are right: only the name gives it away

    def point_outside(m):
        m["files"][escape] = {"sha256": hashlib.sha256(secret.read_bytes()).hexdigest(), "bytes": 21}
    _edit(folder / "manifest.json", point_outside)
    assert verify_shards(shards) == [f"{folder / 'manifest.json'}: the files list names '../../secret.txt', which is "
                                     "not a plain file name inside the shard (refused, not read)"]
    with pytest.raises(ValueError, match=r"files list names '\.\./\.\./secret\.txt', which is not a plain file name"):
        open_shards(shards)

    def read_ids_elsewhere(m):
        del m["files"][escape]
        m["ids"]["file"] = "../shard-00001/ids.u16"
    _edit(folder / "manifest.json", read_ids_elsewhere)
    problems = verify_shards(shards)
    assert (f"{folder / 'manifest.json'}: its ids file '../shard-00001/ids.u16' is not a plain file name inside the "
            "shard (refused, not read)") in problems
    with pytest.raises(ValueError, match=r"its ids file '\.\./shard-00001/ids\.u16' is not a plain file name"):
        open_shards(shards)
    assert _verify_cli(shards).exit_code == 1


def test_damaged_manifests_are_listed_not_raised(shards):
    (shards / "shard-00000" / "manifest.json").write_text("{ truncated")
    (shards / "shard-00002" / "manifest.json").unlink()
    problems = verify_shards(shards)
    assert len(problems) == 2
    assert problems[0].startswith(f"{shards / 'shard-00000' / 'manifest.json'}: unreadable shard manifest")
    assert problems[1].startswith(f"{shards / 'shard-00002' / 'manifest.json'}: unreadable shard manifest")
    result = _verify_cli(shards)
    assert result.exit_code == 1 and "Traceback" not in result.output and "2 problem(s)" in result.stderr


# ---- the manifest and the metadata index ------------------------------------------------------------------
def test_manifests_round_trip_through_the_dataclass(shards):
    for k in range(3):
        raw = read_manifest(shards / f"shard-0000{k}")
        manifest = ShardManifest.from_dict(raw)
        assert manifest.to_dict() == raw
        assert (manifest.format_version, manifest.shard, manifest.meta.index) == (2, k, "meta.idx")
        assert manifest.num_tokens == 64 and manifest.tokenizer_key == (raw["tokenizer"]["architecture_hash"],
                                                                        raw["tokenizer"]["weights_sha256"])
    with pytest.raises(ValueError, match=r"a field is missing or malformed \(KeyError: 'num_codebooks'\)"):
        ShardManifest.from_dict({k: v for k, v in raw.items() if k != "num_codebooks"})


def test_metadata_index_is_built_by_parsing(tmp_path):
    rows = [{"caption": "", "source": "a"}, {"caption": 'say "caption": "" here', "source": "b"}, {"source": "c"},
            {"caption": "ünïcode ok", "source": "d"}]
    path = tmp_path / "meta.jsonl"
    # As libra_tok.shards writes it, with an empty line at the end.
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows) + "\n")
    index = index_meta_lines(path)
    assert index["captioned"].tolist() == [0, 1, 0, 1]
    with open(path, "rb") as fh:
        for start, row in zip(index["offset"], rows, strict=True):
            fh.seek(int(start))
            assert json.loads(fh.readline()) == row
    # Keys in another order, ASCII escapes, spaces: parsed, not matched as bytes.
    path.write_text('{"source": "e",  "caption" : "x"}\n{"caption":"\\u00fc"}\n{"caption": null}\n')
    assert index_meta_lines(path)["captioned"].tolist() == [1, 1, 0]
    path.write_text('{"source": "e"}\nnot json\n')
    with pytest.raises(ValueError, match=r"meta.jsonl:2: not a JSON object"):
        index_meta_lines(path)


def test_the_writer_indexes_metadata_and_reading_uses_the_index(shards, monkeypatch):
    for k in range(3):
        folder = shards / f"shard-0000{k}"
        stored = np.fromfile(folder / "meta.idx", dtype=META_INDEX_DTYPE)
        assert np.array_equal(stored, index_meta_lines(folder / "meta.jsonl"))
    expected = [json.loads(line) for k in range(3)
                for line in (shards / f"shard-0000{k}" / "meta.jsonl").read_text().splitlines()]

    def no_parsing(path):
        raise AssertionError(f"{path} parsed although it has an index")
    monkeypatch.setattr(shards_module, "index_meta_lines", no_parsing)
    data = open_shards(shards)
    assert [data.meta(i) for i in range(len(data))] == expected == list(data.iter_meta())
    assert data[7].meta == expected[7] and data.captioned.tolist() == [False] * 10  # the assets have no captions
    assert np.array_equal(data.ids(3), data[3].ids)


def test_format_1_sets_are_read_by_parsing(shards):
    """A set written before the metadata index existed: no meta.idx, format_version 1."""
    before = open_shards(shards)
    expected = [before[i] for i in range(len(before))]
    for k in range(3):
        folder = shards / f"shard-0000{k}"
        (folder / "meta.idx").unlink()

        def version_1(m):
            m["format_version"] = 1
            m["meta"] = {"file": "meta.jsonl"}
            del m["files"]["meta.idx"]
        _edit(folder / "manifest.json", version_1)
    assert verify_shards(shards) == []
    old = open_shards(shards)
    assert old.manifest.format_version == 1 and old.manifest.meta.index is None
    for i, sample in enumerate(expected):
        assert old[i].meta == sample.meta and old.meta(i) == sample.meta
        assert np.array_equal(old[i].ids, sample.ids) and np.array_equal(old[i].features, sample.features)
    assert np.array_equal(old.captioned, before.captioned)
    lines = (shards / "shard-00001" / "meta.jsonl").read_text().splitlines()
    (shards / "shard-00001" / "meta.jsonl").write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(ValueError, match=r"meta.jsonl has 3 lines for 4 samples \(damaged shard; `libra-tok verify"):
        open_shards(shards).meta(5)
    with pytest.raises(ValueError, match=r"meta.jsonl has 3 lines for 4 samples"):
        list(open_shards(shards).iter_meta())  # streamed metadata would no longer match the sample numbers


def test_an_edited_metadata_file_is_read_by_parsing(shards, caplog):
    """meta.jsonl rewritten by hand (its size changed): its index no longer applies."""
    path = shards / "shard-00000" / "meta.jsonl"
    rows = [{**json.loads(line), "caption": f"caption {n}"} for n, line in enumerate(path.read_text().splitlines())]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="libra_tok.shards"):
        data = open_shards(shards)
        assert [data.meta(i)["caption"] for i in range(4)] == [f"caption {n}" for n in range(4)]
    assert "is not the file its index meta.idx was written for" in caplog.text
    assert data.captioned.tolist() == [True] * 4 + [False] * 6
    recorded = data.shards[0].manifest.files["meta.jsonl"]["bytes"]
    assert f"{path}: {path.stat().st_size} bytes, manifest says {recorded}" in verify_shards(shards)


def test_a_damaged_index_is_found(shards):
    folder = shards / "shard-00001"
    index = np.fromfile(folder / "meta.idx", dtype=META_INDEX_DTYPE)
    index["offset"][2] += 1
    index["captioned"][0] = 1
    index.tofile(folder / "meta.idx")

    def rehash(m):  # a consistent manifest: only the comparison with meta.jsonl finds it
        m["files"]["meta.idx"]["sha256"] = sha256_file(folder / "meta.idx")
    _edit(folder / "manifest.json", rehash)
    assert verify_shards(shards) == [f"{folder / 'meta.idx'}: does not index {folder / 'meta.jsonl'} (line offsets or "
                                     "caption flags differ)"]
    with pytest.raises(ValueError, match=r"its index says sample 2 starts at byte \d+, which does not start a line"):
        open_shards(shards).meta(6)
    (folder / "meta.idx").write_bytes(b"\0" * 9)
    assert f"{folder / 'meta.idx'}: 9 bytes, but 4 samples need 36" in verify_shards(shards)


# ---- one reader over several folders ----------------------------------------------------------------------
def test_several_folders_read_as_one_set(shards, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    both = open_shards([shards, other])
    assert len(both) == 20 and both.roots == [shards, other] and both.root == shards
    assert [both.meta(i) for i in range(10)] == [both.meta(10 + i) for i in range(10)]
    assert np.array_equal(both[12].ids, both[2].ids) and both.verify() == []
    # Another tokenizer (same architecture, other weights) in the second folder is refused.
    for k in range(3):
        _edit(other / f"shard-0000{k}" / "manifest.json",
              lambda m: m["tokenizer"].update(weights_sha256="0" * 64))
    with pytest.raises(ValueError, match=rf"{other} was encoded by another image tokenizer than {shards}; all shard "
                                         "folders read together must come from one tokenizer"):
        open_shards([shards, other])
    _edit(shards / "shard-00002" / "manifest.json", lambda m: m["tokenizer"].update(weights_sha256="0" * 64))
    with pytest.raises(ValueError, match=r"shard-00002 was written by another tokenizer than .*shard-00000"):
        open_shards(shards)
    with pytest.raises(ValueError, match="no shard folder given"):
        open_shards([])


def test_a_shard_set_pickles_without_its_memory_maps(shards):
    import pickle

    data = open_shards(shards)
    data.meta(5), data.ids(5)  # maps and the index are open now
    copy = pickle.loads(pickle.dumps(data))
    assert all(s._ids is None and s._index is None for s in copy.shards)
    assert copy.meta(5) == data.meta(5) and np.array_equal(copy.ids(5), data.ids(5))
