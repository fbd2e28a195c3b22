"""Shard sets on disk: `verify` finds every kind of damage, reading never leaves the shard."""

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner

from cli.tok import main
from libra_tok.pipeline import encode_images, load_tokenizer
from libra_tok.shards import open_shards, verify_shards


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, assets_dir):
    """The 10 sample images in 3 shards of 4, 4 and 2 (written once, copied by each test)."""
    out = tmp_path_factory.mktemp("encoded") / "shards"
    encode_images([assets_dir], out, load_tokenizer(preset="tiny", device="cpu"), shard_size=4, num_workers=0,
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
        f"{folder / 'ids.u16'}: the ids file is not listed in the manifest's files (no size and sha256 to check it against)",
        f"{folder / 'meta.jsonl'}: the meta file is not listed in the manifest's files (no size and sha256 to check it "
        "against)",
    ]
    _edit(folder / "manifest.json", lambda m: m.pop("files"))
    assert f"{folder / 'manifest.json'}: no files list (nothing to check the shard's files against)" in verify_shards(shards)


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
