"""Models by Hugging Face Hub id (libra_tok.hub) and pushing with model cards (libra_tok.hub_push),
fully offline: each test lays out the Hub cache itself (models--org--name/ with blobs/,
snapshots/<commit>/, refs/ and the tree listing trees/<commit>.json) under HF_HUB_CACHE, with
HF_HUB_OFFLINE=1. Hub errors come from a loopback stand-in for the Hub's API; pushing is checked
at its single call site (HfApi.create_repo / create_branch / create_commit)."""

import fnmatch
import hashlib
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file

from builders import (
    ROOT,
    TINY,
    cli_error,
    free_port,
    hf_llama,
    hf_tiny_clip,
    official_layout,
    randomize_,
    write_official_folder,
    write_official_tokenizer_files,
)
from libra_cli.lm import main as lm_main
from libra_cli.tok import main as tok_main
from libra_lm import LibraForCausalLM
from libra_lm.checkpoint import image_tokenizer_for, recorded_image_tokenizer
from libra_tok import ImageTokenizer, load_official
from libra_tok import hub as hub_module
from libra_tok.encoder import pretrained_clip_state_dict
from libra_tok.hub import (
    CLIP_ARCHITECTURE,
    CLIP_WEIGHTS,
    IMAGE_TOKENIZER,
    LM,
    HubError,
    HubId,
    lm_files,
    offline_mode,
    parse_hub_id,
    resolve,
)
from libra_tok.hub_push import plan_push, push_to_hub
from libra_tok.model_card import eval_rows
from libra_tok.pipeline import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- a Hub cache laid out by hand ------------------------------------------------------------------
def publish(cache: Path, repo_id: str, source: Path, *, refs=("main",), leave_out=(), also_listed=()) -> str:
    """Put the files of `source` in the Hub cache as huggingface_hub stores a snapshot of `repo_id`:
    content-addressed blobs, snapshots/<commit>/ of symlinks to them, refs/<ref> naming the commit,
    and the commit's tree listing (every file of the repo). Files matching `leave_out` are in the
    listing but not in the snapshot, and so are `also_listed`: a cache that lacks files the repo
    has. Returns the commit."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    files = {p.relative_to(source).as_posix(): p for p in sorted(source.rglob("*")) if p.is_file()}
    digest = hashlib.sha1(repo_id.encode())
    for name, path in files.items():
        digest.update(name.encode() + path.read_bytes())
    commit = digest.hexdigest()
    snapshot = root / "snapshots" / commit
    listing = {name: {"size": 1, "blob_id": "0" * 40} for name in also_listed}
    for name, path in files.items():
        data = path.read_bytes()
        listing[name] = {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest()}
        if any(fnmatch.fnmatch(name, pattern) for pattern in leave_out):
            continue
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "trees").mkdir(exist_ok=True)
    (root / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return path


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_weights(a, b) -> bool:
    a, b = (x if isinstance(x, dict) else state(x) for x in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, sp):
    """Local model folders in every layout the loaders read."""
    root = tmp_path_factory.mktemp("folders")
    torch.manual_seed(0)
    tok_a = ImageTokenizer("tiny").save_pretrained(root / "tok-a")
    torch.manual_seed(1)
    tok_b = ImageTokenizer("tiny").save_pretrained(root / "tok-b")
    preset_tok = load_tokenizer(preset="tiny", device="cpu").save_pretrained(root / "preset-tok")  # of the shards
    clip = root / "clip"
    hf_tiny_clip().save_pretrained(clip)  # config.json + model.safetensors, as HF CLIP repos
    torch.manual_seed(7)
    official_tok = write_official_tokenizer_files(root / "official-tok",
                                                  official_layout(hf_tiny_clip(), ImageTokenizer("tiny")))
    official_lm = root / "official-lm"  # libra-11b-chat: the LM, its text tokenizer and the image tokenizer
    write_official_folder(official_lm)
    shutil.copy(sp, official_lm / "tokenizer.model")
    shutil.copytree(official_tok, official_lm, dirs_exist_ok=True)
    torch.manual_seed(0)
    lm = randomize_(LibraForCausalLM(TINY), seed=0, scale=0.3).save_pretrained(root / "lm")
    shutil.copy(sp, lm / "tokenizer.model")
    shutil.copytree(tok_a, lm / "image_tokenizer")
    return SimpleNamespace(root=root, tok_a=tok_a, tok_b=tok_b, preset_tok=preset_tok, clip=clip,
                           official_tok=official_tok, official_lm=official_lm, lm=lm, sp=Path(sp))


# ---- names -------------------------------------------------------------------------------------------
def test_what_is_a_hub_id():
    assert parse_hub_id("YifanXu/libra-11b-chat") == HubId("YifanXu/libra-11b-chat", None)
    assert parse_hub_id("acme/tok@v1.0") == HubId("acme/tok", "v1.0")
    assert parse_hub_id("acme/tok@refs/pr/3") == HubId("acme/tok", "refs/pr/3")
    assert str(parse_hub_id("acme/tok@0123abc")) == "acme/tok@0123abc"
    for not_an_id in ("tok", "runs/tok/final", "./acme/tok", "/acme/tok", "~/acme/tok", "acme\\tok", "acme--x/tok",
                      "acme/to..k", "acme/tok@", "ViT-L-14-336", "openai", Path("acme/tok")):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_the_files_each_loader_asks_for():
    """allow_patterns against the file lists of the released repos (docs/official-formats.md)."""
    chat = ["config.json", "generation_config.json", *(f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)),
            "model.safetensors.index.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vision_tokenizer_config.yaml", "vqgan.ckpt", "README.md", ".gitattributes"]
    llama = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
             "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "LICENSE.txt", "README.md", "USE_POLICY.md"]
    clip = ["config.json", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "preprocessor_config.json",
            "merges.txt", "vocab.json", "tokenizer.json", "README.md"]
    vision_tokenizer = ["vqgan.ckpt", "vision_tokenizer_config.yaml", "README.md", ".gitattributes"]

    def chosen(files, patterns):
        return set(filter_repo_objects(files, allow_patterns=patterns))

    shards = {f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)}
    assert chosen(chat, LM.groups()[0]) == {"config.json", "model.safetensors.index.json", *shards}
    assert chosen(chat, lm_files(text_tokenizer=True, image_tokenizer=True).groups()[0]) == {
        "config.json", "model.safetensors.index.json", *shards, "tokenizer.model", "vqgan.ckpt",
        "vision_tokenizer_config.yaml"}
    assert chosen(llama, LM.groups()[0]) == {"config.json", "model.safetensors.index.json",
                                             "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert chosen(chat, IMAGE_TOKENIZER.patterns) == {"config.json", "vqgan.ckpt", "vision_tokenizer_config.yaml"}
    assert chosen(vision_tokenizer, IMAGE_TOKENIZER.patterns) == {"vqgan.ckpt", "vision_tokenizer_config.yaml"}
    assert chosen(clip, CLIP_ARCHITECTURE.patterns) == {"config.json"}
    # The first weights group the repo has: the CLIP repo has no safetensors, so pytorch_model.bin.
    first = next(group for group in CLIP_WEIGHTS.groups() if len(chosen(clip, group)) > 1)
    assert chosen(clip, first) == {"config.json", "pytorch_model.bin"}


# ---- resolving ---------------------------------------------------------------------------------------
def test_a_revision_pin_picks_its_snapshot(cache, folders):
    main_commit = publish(cache, "acme/tiny-tok", folders.tok_a)
    v1_commit = publish(cache, "acme/tiny-tok", folders.tok_b, refs=("v1",))
    a, b = ImageTokenizer.from_pretrained(folders.tok_a), ImageTokenizer.from_pretrained(folders.tok_b)
    assert not same_weights(a, b)
    for ref, expected in (("acme/tiny-tok", a), ("acme/tiny-tok@main", a), (f"acme/tiny-tok@{main_commit}", a),
                          ("acme/tiny-tok@v1", b), (f"acme/tiny-tok@{v1_commit}", b)):
        assert same_weights(ImageTokenizer.from_pretrained(ref), expected), ref
    assert resolve("acme/tiny-tok@v1", IMAGE_TOKENIZER).name == v1_commit
    assert hub_module.pinned("acme/tiny-tok@v1") == f"acme/tiny-tok@{v1_commit}"


def test_a_local_path_wins(cache, folders, tmp_path, monkeypatch):
    publish(cache, "acme/tiny-tok", folders.tok_a)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folders.tok_b, tmp_path / "acme" / "tiny-tok")
    assert same_weights(ImageTokenizer.from_pretrained("acme/tiny-tok"), ImageTokenizer.from_pretrained(folders.tok_b))
    assert resolve("acme/tiny-tok", IMAGE_TOKENIZER) == Path("acme/tiny-tok")
    # A path that exists nowhere and is no id is left to the loader's own message.
    with pytest.raises(FileNotFoundError, match="runs/tok/final is not a tokenizer"):
        ImageTokenizer.from_pretrained("runs/tok/final")


def test_official_layouts_resolve_by_id_as_by_folder(cache, folders):
    publish(cache, "yifan/libra-vision-tokenizer", folders.official_tok)
    publish(cache, "yifan/libra-11b-chat", folders.official_lm)
    expected_tok = load_official(folders.official_tok)
    assert same_weights(load_official("yifan/libra-vision-tokenizer"), expected_tok)
    assert same_weights(ImageTokenizer.from_pretrained("yifan/libra-vision-tokenizer"), expected_tok)
    # The LM folder: the LM, and the image tokenizer inside it (vqgan.ckpt + its CLIP folder's config).
    assert same_weights(LibraForCausalLM.from_pretrained("yifan/libra-11b-chat"),
                        LibraForCausalLM.from_pretrained(folders.official_lm))
    assert same_weights(image_tokenizer_for("yifan/libra-11b-chat"), load_official(folders.official_lm))
    assert same_weights(ImageTokenizer.from_pretrained("yifan/libra-11b-chat"), load_official(folders.official_lm))
    # CLIP by id: the architecture (convert-official --clip) and the weights (--clip-weights).
    publish(cache, "acme/tiny-clip", folders.clip)
    expected_clip = pretrained_clip_state_dict("libra-tiny-vit", str(folders.clip))
    assert same_weights(pretrained_clip_state_dict("libra-tiny-vit", "acme/tiny-clip"), expected_clip)
    assert same_weights(load_official("yifan/libra-vision-tokenizer", clip="acme/tiny-clip"), expected_tok)


def test_our_lm_folder_resolves_by_id(cache, folders):
    publish(cache, "acme/tiny-lm", folders.lm)
    assert same_weights(LibraForCausalLM.from_pretrained("acme/tiny-lm"), LibraForCausalLM.from_pretrained(folders.lm))
    assert same_weights(image_tokenizer_for("acme/tiny-lm"), ImageTokenizer.from_pretrained(folders.tok_a))
    assert recorded_image_tokenizer("acme/tiny-lm") is None


def test_allow_patterns_keep_unneeded_files_out(cache, folders, tmp_path):
    """The cache lacks files the repo lists (the tree listing has them): loading the LM alone
    needs none of them; asking for all the files, or for the image tokenizer, fails."""
    unneeded = ("vqgan.ckpt", "tokenizer.model", "*/config.json", "vision_tokenizer_config.yaml")
    publish(cache, "yifan/libra-11b-chat", folders.official_lm, leave_out=unneeded,
            also_listed=("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                         "pytorch_model.bin.index.json", "tf_model.h5", "optimizer.pt", "data/train-0000.tar"))
    model = LibraForCausalLM.from_pretrained("yifan/libra-11b-chat")
    assert same_weights(model, LibraForCausalLM.from_pretrained(folders.official_lm))
    # The control: the cache really lacks those files, and huggingface_hub checks.
    incomplete = getattr(huggingface_hub.errors, "IncompleteSnapshotError", None)
    if incomplete is not None:
        with pytest.raises(incomplete):
            huggingface_hub.snapshot_download("yifan/libra-11b-chat", cache_dir=cache, local_files_only=True)
        with pytest.raises(HubError, match=r"yifan/libra-11b-chat \(revision main\) in the Hugging Face cache .* lacks "
                                           r"files this loader needs \(.*vqgan.ckpt.*\) while offline mode is on"):
            image_tokenizer_for("yifan/libra-11b-chat")

    # Weights as .bin only (no safetensors in the repo): the second weights group is fetched.
    llama = tmp_path / "llama-bin"
    llama.mkdir()
    hf = hf_llama(seed=2)
    hf.config.to_json_file(llama / "config.json")
    torch.save(hf.state_dict(), llama / "pytorch_model.bin")
    publish(cache, "meta/tiny-llama", llama, also_listed=("tf_model.h5",))
    loaded = []
    for ref in ("meta/tiny-llama", llama):
        torch.manual_seed(0)  # the vision half of an HF LLaMA is freshly initialised
        loaded.append(LibraForCausalLM.from_pretrained(ref))
    assert same_weights(*loaded)


def test_a_missing_id_names_itself_the_revision_and_the_fix(cache, folders):
    publish(cache, "acme/tiny-tok", folders.tok_a)
    with pytest.raises(HubError) as info:
        ImageTokenizer.from_pretrained("acme/nothing")
    message = str(info.value)
    assert message.startswith(f"acme/nothing is no local path, and acme/nothing (revision main) is not in the Hugging "
                              f"Face cache {cache} while offline mode is on (--offline or HF_HUB_OFFLINE=1): ")
    assert "`hf download acme/nothing --revision main`" in message and "copy the model folder" in message
    with pytest.raises(HubError, match=r"acme/tiny-tok \(revision v2\) is not in the Hugging Face cache"):
        LibraForCausalLM.from_pretrained("acme/tiny-tok@v2")
    # On the command line: one line, no traceback.
    error = cli_error(CliRunner().invoke(tok_main, ["info", "acme/nothing"]))
    assert error == f"Error: {message}"
    error = cli_error(CliRunner().invoke(lm_main, ["generate", "--model", "acme/nothing", "--prompt", "hi"]))
    assert "acme/nothing (revision main) is not in the Hugging Face cache" in error
    res = CliRunner().invoke(tok_main, ["info", "no-such-folder"])
    assert res.exit_code == 2 and "is neither an existing path nor a Hugging Face Hub id" in res.output


class FakeHub(BaseHTTPRequestHandler):
    """The Hub's API answers for a gated repo, a missing repo and a missing revision."""

    def do_GET(self):
        if self.path.startswith("/api/models/acme/gated"):
            status, code = 403, "GatedRepo"
        elif self.path.startswith("/api/models/acme/tiny-tok/revision/v9"):
            status, code = 404, "RevisionNotFound"
        else:
            status, code = 404, "RepoNotFound"
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def online(cache, monkeypatch):
    """Online mode against a loopback stand-in for the Hub API; yields a function that points the
    client at another endpoint."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield lambda endpoint: monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    server.shutdown()
    server.server_close()


def test_hub_errors_say_what_to_do(online, folders):
    with pytest.raises(HubError) as info:
        ImageTokenizer.from_pretrained("acme/gated")
    assert str(info.value) == ("acme/gated (revision main) is a gated model on the Hugging Face Hub: accept its "
                               "licence at https://huggingface.co/acme/gated with your account, then log in with `hf "
                               "auth login` (or set HF_TOKEN); or copy the model folder to this machine and pass its "
                               "path")
    with pytest.raises(HubError, match=r"^acme/missing is neither a local path nor a model on the Hugging Face Hub "
                                       r"\(no repository https://huggingface.co/acme/missing\); check the name, or if "
                                       r"it is private log in"):
        LibraForCausalLM.from_pretrained("acme/missing")
    with pytest.raises(HubError, match=r"^acme/tiny-tok has no revision 'v9' on the Hugging Face Hub"):
        ImageTokenizer.from_pretrained("acme/tiny-tok@v9")
    online(f"http://127.0.0.1:{free_port()}")  # nothing listens: no network
    with pytest.raises(HubError) as info:
        ImageTokenizer.from_pretrained("acme/tiny-tok")
    assert "acme/tiny-tok (revision main) is not in the Hugging Face cache" in str(info.value)
    assert "the Hugging Face Hub cannot be reached" in str(info.value)
    assert "`hf download acme/tiny-tok --revision main`" in str(info.value)


def test_offline_option_and_environment(cache, folders, monkeypatch):
    publish(cache, "acme/tiny-tok", folders.tok_a)
    calls = []
    real = huggingface_hub.snapshot_download

    def recording(*args, **kwargs):
        calls.append(kwargs["local_files_only"])
        return real(*args, **{**kwargs, "local_files_only": True})  # never the network in tests

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert CliRunner().invoke(tok_main, ["info", "--offline", "acme/tiny-tok"]).exit_code == 0
    assert CliRunner().invoke(tok_main, ["info", "acme/tiny-tok"]).exit_code == 0
    with offline_mode():
        resolve("acme/tiny-tok", IMAGE_TOKENIZER)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve("acme/tiny-tok", IMAGE_TOKENIZER)
    assert calls == [True, False, True, True]


# ---- every command that takes a model ----------------------------------------------------------------
def test_tokenizer_commands_resolve_ids(cache, folders, tmp_path, asset_images, monkeypatch):
    commit = publish(cache, "acme/tiny-tok", folders.tok_a)
    publish(cache, "yifan/libra-vision-tokenizer", folders.official_tok)
    run = CliRunner().invoke
    images = tmp_path / "images"
    images.mkdir()
    for p in asset_images[:3]:
        shutil.copy(p, images / p.name)

    res = run(tok_main, ["info", "acme/tiny-tok"])
    assert res.exit_code == 0 and "tokenizer      acme/tiny-tok" in res.output
    res = run(tok_main, ["convert-official", "yifan/libra-vision-tokenizer", str(tmp_path / "converted")])
    assert res.exit_code == 0, res.output
    assert same_weights(ImageTokenizer.from_pretrained(tmp_path / "converted"), load_official(folders.official_tok))

    res = run(tok_main, ["encode", str(images), "--out", str(tmp_path / "shards"), "--checkpoint", "acme/tiny-tok",
                         "--device", "cpu", "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    manifest = json.loads(next((tmp_path / "shards").rglob("manifest.json")).read_text())
    assert json.dumps(manifest).count(f'"acme/tiny-tok@{commit}"') >= 1  # pinned to the snapshot it used
    # decode without --checkpoint: the tokenizer the shards name, by id, from the cache.
    res = run(tok_main, ["decode", str(tmp_path / "shards"), "--out", str(tmp_path / "decoded"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "decoded").rglob("*.png"))) == 3
    res = run(tok_main, ["reconstruct", str(images), "--out", str(tmp_path / "recon"), "--checkpoint",
                         "acme/tiny-tok", "--device", "cpu", "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    res = run(tok_main, ["eval", str(images), "-c", "acme/tiny-tok", "--no-lpips", "--no-fid", "--num-workers", "0",
                         "--device", "cpu", "-q"])
    assert res.exit_code == 0 and "psnr" in res.output, res.output

    served = {}
    import libra_tok.serve

    monkeypatch.setattr(libra_tok.serve, "serve", lambda tok, *a, **k: served.setdefault("tok", tok))
    res = run(tok_main, ["serve", "--checkpoint", "acme/tiny-tok", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert same_weights(served["tok"], ImageTokenizer.from_pretrained(folders.tok_a))


def test_tokenizer_training_from_ids(cache, folders, tmp_path):
    publish(cache, "acme/tiny-tok", folders.tok_a)
    publish(cache, "acme/tiny-clip", folders.clip)
    common = ["--steps", "1", "--batch-size", "2", "--perceptual-weight", "0", "--disc-start", "-1", "--holdout", "0",
              "--num-workers", "0", "--device", "cpu", "--sample-every", "100", "--save-every", "100"]
    assets = str(ROOT / "assets")
    res = CliRunner().invoke(tok_main, ["train", assets, "--out-dir", str(tmp_path / "init"), "--init-from",
                                        "acme/tiny-tok", "--lr", "0", "--offline", *common])
    assert res.exit_code == 0, res.output
    start = ImageTokenizer.from_pretrained(folders.tok_a)
    final = ImageTokenizer.from_pretrained(tmp_path / "init" / "final")
    assert same_weights(final.encoder, start.encoder) and same_weights(final.decoder, start.decoder)
    res = CliRunner().invoke(tok_main, ["train", assets, "--out-dir", str(tmp_path / "clip"), "--clip-weights",
                                        "acme/tiny-clip", *common])
    assert res.exit_code == 0, res.output
    tower = ImageTokenizer.from_pretrained(tmp_path / "clip" / "final").encoder.tower.state_dict()
    expected = pretrained_clip_state_dict("libra-tiny-vit", str(folders.clip))
    assert all(torch.equal(tower[k], expected[k]) for k in tower)


def test_lm_commands_resolve_ids(cache, folders, tmp_path, asset_images, shard_dirs):
    publish(cache, "acme/tiny-lm", folders.lm)
    publish(cache, "acme/tiny-tok", folders.tok_a)
    publish(cache, "acme/preset-tok", folders.preset_tok)
    publish(cache, "yifan/libra-11b-chat", folders.official_lm)
    run = CliRunner().invoke

    def generate(model, *extra):
        res = run(lm_main, ["generate", "--model", str(model), "--image", str(asset_images[2]), "--prompt",
                            "What is in the image?", "--max-new-tokens", "5", "--device", "cpu", *extra])
        assert res.exit_code == 0, res.output
        return res.stdout

    assert generate("acme/tiny-lm") == generate(folders.lm)
    assert generate("yifan/libra-11b-chat") == generate(folders.official_lm)
    assert generate(folders.lm, "--tokenizer", "acme/tiny-tok", "--text-tokenizer", "acme/tiny-lm") == \
        generate(folders.lm)

    # The visual commands load through the same resolver: the same drawn ids by id as by folder.
    def complete(model, out):
        res = run(lm_main, ["complete-image", "--model", str(model), "--image", str(asset_images[2]), "--keep-rows",
                            "4", "--samples", "1", "--out", str(tmp_path / out), "--device", "cpu", "--offline"])
        assert res.exit_code == 0, res.output
        return load_file(tmp_path / out / "ids.safetensors")

    by_id, by_folder = complete("acme/tiny-lm", "c-id"), complete(folders.lm, "c-folder")
    assert by_id.keys() == by_folder.keys() and all(torch.equal(by_id[k], by_folder[k]) for k in by_id)

    # Training from an id, with the text and image tokenizers by id (the shards store no features).
    res = run(lm_main, ["train", str(shard_dirs[1]), "--init-from", "acme/tiny-lm", "--image-tokenizer",
                        "acme/preset-tok", "--out-dir", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
                        "--grad-accum", "1", "--num-workers", "0", "--device", "cpu", "--val-every", "100",
                        "--save-every", "100", "--no-gradient-checkpointing", "--offline"])
    assert res.exit_code == 0, res.output
    final = tmp_path / "run" / "final"
    assert (final / "tokenizer.model").read_bytes() == folders.sp.read_bytes()
    start, trained = load_file(folders.lm / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.equal(start[k], trained[k]) for k in start if "vision" not in k)  # frozen LLM from the id
    res = run(lm_main, ["train", str(shard_dirs[1]), "--text-tokenizer", "acme/tiny-lm", "--input", "discrete",
                        "--out-dir", str(tmp_path / "run2"), "--steps", "1", "--batch-size", "2", "--num-workers", "0",
                        "--device", "cpu", "--no-gradient-checkpointing"])
    assert res.exit_code == 0, res.output


# ---- pushing -------------------------------------------------------------------------------------------
class FakeApi:
    """HfApi's calls of a push, recorded: the single call site of the upload."""

    def __init__(self, monkeypatch, fail_with=None):
        self.calls, self.commits = [], []
        api = self

        def create_repo(self_, repo_id, **kw):
            if fail_with is not None:
                raise fail_with
            api.calls.append(("create_repo", repo_id, kw))

        def create_branch(self_, repo_id, **kw):
            api.calls.append(("create_branch", repo_id, kw))

        def create_commit(self_, repo_id, operations, **kw):
            files = {}
            for op in operations:
                source = op.path_or_fileobj
                files[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
            api.commits.append({"repo_id": repo_id, "files": files, **kw})
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", pr_url=None)

        for name, fn in (("create_repo", create_repo), ("create_branch", create_branch),
                         ("create_commit", create_commit)):
            monkeypatch.setattr(huggingface_hub.HfApi, name, fn)

    def card(self, i=-1) -> ModelCard:
        return ModelCard(self.commits[i]["files"]["README.md"].decode())


@pytest.fixture
def hub_api(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return FakeApi(monkeypatch)


def tokenizer_run(out: Path) -> Path:
    """A real tokenizer run (CLIP weights by id): final/, init_tokenizer/, checkpoints with
    optimizer state, samples, metrics, loss.png."""
    from libra_tok.train import TrainConfig, train

    with offline_mode():
        train(TrainConfig(data=[str(ROOT / "assets")], out_dir=str(out), preset="tiny", steps=2, batch_size=2,
                          lr=2e-3, warmup_steps=1, perceptual_weight=0.0, disc_start=-1, holdout=2, num_workers=0,
                          cache_images=True, log_every=1, save_every=1, sample_every=2, seed=0, device="cpu",
                          tokenizer={"clip_pretrained": "acme/tiny-clip"}), progress=False)
    return out


def test_push_a_tokenizer_run(cache, hub_api, folders, tmp_path):
    publish(cache, "acme/tiny-clip", folders.clip)
    tok_run = tokenizer_run(tmp_path / "run")
    assert (tok_run / "checkpoints" / "step-00000002.pt").is_file()  # what must stay behind
    assert (tok_run / "init_tokenizer" / "model.safetensors").is_file()
    res = CliRunner().invoke(tok_main, ["push", str(tok_run), "me/tiny-tok", "--dataset", "acme/captions",
                                        "--license", "apache-2.0", "--private"])
    assert res.exit_code == 0, res.output
    assert "pushed 5 files to me/tiny-tok: https://huggingface.co/me/tiny-tok/commit/abc" in res.output
    assert hub_api.calls == [("create_repo", "me/tiny-tok", {"private": True, "exist_ok": True})]
    commit = hub_api.commits[0]
    assert set(commit["files"]) == {"config.json", "model.safetensors", "train_config.json", "loss.png", "README.md"}
    assert commit["files"]["model.safetensors"] == (tok_run / "final" / "model.safetensors").read_bytes()
    assert commit["revision"] is None and commit["create_pr"] is False

    card = hub_api.card()
    assert card.data.library_name == "libra" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["acme/captions"] and card.data.base_model == ["acme/tiny-clip"]
    assert {"libra", "image-tokenizer"} <= set(card.data.tags)
    block = card.text.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(block) == json.loads((tok_run / "train_config.json").read_text())
    assert "steps: 2, last loss:" in card.text and "![training loss](loss.png)" in card.text
    assert 'ImageTokenizer.from_pretrained("me/tiny-tok")' in card.text

    # What was pushed loads by its id (the commit laid out as a snapshot in the cache).
    repo = tmp_path / "pushed"
    for name, data in commit["files"].items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
    publish(cache, "me/tiny-tok", repo)
    with offline_mode():
        assert same_weights(ImageTokenizer.from_pretrained("me/tiny-tok"),
                            ImageTokenizer.from_pretrained(tok_run / "final"))


def test_push_an_lm_with_its_image_tokenizer_and_eval_results(hub_api, folders, tmp_path):
    run = tmp_path / "lm-run"
    shutil.copytree(folders.lm, run / "final", ignore=shutil.ignore_patterns("image_tokenizer"))
    (run / "train_config.json").write_text(json.dumps({"stage": "sft", "init_from": "meta-llama/Llama-2-7b-chat-hf",
                                                       "steps": 3}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 3.0 - s}) for s in (1, 2, 3)))
    (run / "checkpoints").mkdir()
    torch.save({"optimizer": {"state": {}}}, run / "checkpoints" / "step-00000003.pt")
    results = {  # as `libra-lm eval` writes results.json
        "model": {"path": "lm", "sha256": "ab" * 32}, "protocol": {"template": "vicuna_v1", "limit_per_split": None},
        "versions": {"torch": "2.14"}, "images": {"encoded": 9, "from_shards": 0}, "table": "POPE ...",
        "tasks": {"pope": {"benchmark": "POPE", "split": "adversarial", "questions": 9, "answers": "answers/pope.jsonl",
                           "metrics": {"f1": 85.31, "accuracy": 86.0, "random": {"f1": 87.1}}},
                  "mme": {"benchmark": "MME", "split": "test", "questions": 4, "metrics": {"perception": 1494.2}},
                  "vqav2": {"benchmark": "VQAv2", "split": "test-dev", "questions": 5,
                            "files": ["submissions/vqav2.json"]}}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results))
    res = CliRunner().invoke(lm_main, ["push", str(run), "me/tiny-libra", "--eval-results", str(tmp_path / "eval"),
                                       "--image-tokenizer", str(folders.tok_a), "--revision", "dev"])
    assert res.exit_code == 0, res.output
    assert ("create_branch", "me/tiny-libra", {"branch": "dev", "exist_ok": True}) in hub_api.calls
    commit = hub_api.commits[0]
    assert commit["revision"] == "dev"
    assert set(commit["files"]) == {"config.json", "model.safetensors", "tokenizer.model", "train_config.json",
                                    "image_tokenizer/config.json", "image_tokenizer/model.safetensors",
                                    "eval_results.json", "README.md"}
    card = hub_api.card()
    assert card.data.base_model == ["meta-llama/Llama-2-7b-chat-hf"] and card.data.license == "llama2"
    assert card.data.pipeline_tag == "image-text-to-text"
    table = card.text.split("## Evaluation")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| benchmark | metric | value |", "| pope | f1 | 85.31 |", "| pope | accuracy | 86 |",
                    "| pope/random | f1 | 87.1 |", "| mme | perception | 1494 |"]  # no counts, digests, versions
    assert "steps: 3, last loss: 0" in card.text

    assert json.loads(commit["files"]["eval_results.json"]) == results
    assert eval_rows({"mode": "tokenizer", "metrics": {"336": {"psnr": 21.5, "ssim": 0.61}}, "bits_per_pixel": 0.16,
                      "num_images": 50, "protocol": {}}) == [
        ("reconstruction at 336 px", "psnr", 21.5), ("reconstruction at 336 px", "ssim", 0.61),
        ("codes", "bits_per_pixel", 0.16)]


def test_save_pretrained_pushes(hub_api, folders, tmp_path):
    tok = ImageTokenizer.from_pretrained(folders.tok_a)
    tok.save_pretrained(tmp_path / "tok", push_to_hub=True, repo_id="me/tok", datasets=["acme/imgs"])
    model = LibraForCausalLM.from_pretrained(folders.lm)
    model.save_pretrained(tmp_path / "lm", push_to_hub=True, repo_id="me/lm", commit_message="first")
    first, second = hub_api.commits
    assert set(first["files"]) == {"config.json", "model.safetensors", "README.md"}
    assert hub_api.card(0).data.datasets == ["acme/imgs"]
    assert set(second["files"]) == {"config.json", "model.safetensors", "README.md"}
    assert second["commit_message"] == "first"
    assert "pass the text tokenizer with `--text-tokenizer`" in hub_api.card(1).text
    with pytest.raises(ValueError, match="repo_id must be a Hub repo id 'org/name'"):
        tok.save_pretrained(tmp_path / "tok", push_to_hub=True)


def test_push_refusals(folders, tmp_path, monkeypatch):
    run = CliRunner().invoke
    error = cli_error(run(tok_main, ["push", str(folders.lm), "me/x", "--dry-run"]))
    assert error == f"Error: {folders.lm} holds a libra-lm model folder, not an image tokenizer (libra-tok) folder: " \
                    f"push it with `libra-lm push`"
    error = cli_error(run(lm_main, ["push", str(folders.official_lm), "me/x"]))
    assert "is not a libra-tok or libra-lm config (found 'libra')" in error
    error = cli_error(run(tok_main, ["push", str(folders.tok_a), "me/x@v1"]))
    assert "repo_id must be a Hub repo id 'org/name'" in error
    error = cli_error(run(tok_main, ["push", str(folders.tok_a), "me/x"]))  # HF_HUB_OFFLINE=1
    assert error == "Error: pushing to me/x needs the network, but offline mode is on (--offline or HF_HUB_OFFLINE=1)"

    # Not logged in: the Hub's 401, as one line.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    response = SimpleNamespace(status_code=401, headers={}, request=None, url="https://huggingface.co/api/repos/create")
    FakeApi(monkeypatch, fail_with=huggingface_hub.errors.HfHubHTTPError("401 Unauthorized", response=response))
    error = cli_error(run(tok_main, ["push", str(folders.tok_a), "me/x"]))
    assert error == "Error: cannot push to me/x: not logged in to the Hugging Face Hub; log in with `hf auth login` " \
                    "(a token with write access) or set HF_TOKEN"


def test_dry_run_lists_and_prints_without_uploading(hub_api, folders, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(folders.tok_a, folder)
    (folder / "optimizer.pt").write_bytes(b"x")
    res = CliRunner().invoke(tok_main, ["push", str(folder), "me/tiny-tok", "--dry-run", "--tag", "tiny"])
    assert res.exit_code == 0, res.output
    assert hub_api.calls == [] and hub_api.commits == []
    assert "not pushed (1 file(s)): optimizer.pt" in res.output
    assert "library_name: libra" in res.output and "- tiny" in res.output
    plan = plan_push(folder, "me/tiny-tok")
    assert set(plan.files) == {"config.json", "model.safetensors"} and plan.left_out == ["optimizer.pt"]
    with pytest.raises(HubError, match="needs the network"):
        with offline_mode():
            push_to_hub(folder, "me/tiny-tok")
