"""A sharded training checkpoint (DCP, `--parallel fsdp`) -> a model folder in our layout.

    export_checkpoint("runs/pretrain/checkpoints/step-00040000", "libra-pretrained")
    export_run("runs/pretrain", "libra-pretrained")        # the checkpoint latest.json names

The folder is what `save_pretrained` writes, sharded: config.json (format libra-lm, the image
tokenizer of the run recorded), `model-XXXXX-of-YYYYY.safetensors` and
`model.safetensors.index.json` (the HF index layout, which `from_pretrained` reads), and the
run's tokenizer.model. Trained parameters come from the checkpoint; the frozen ones, which
checkpoints do not hold, are rebuilt from the run's starting point (its --init-from folder, or
its seeded preset) and checked against the digest the run recorded. Tensors are read one at a
time and written in output shards of at most `max_shard_bytes`, so memory holds one output
shard and one tensor, whatever the size of the model. The folder is written under a temporary
name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from libra_tok.fileio import atomic_save_safetensors, atomic_write_bytes, atomic_write_json
from libra_tok.run import CHECKPOINT_DIR, load_sharded, read_checkpoint, sharded_tensor_keys
from libra_tok.run.checkpoints import latest_name

from .checkpoint import CONFIG_FILE, folder_meta, open_folder
from .config import LibraConfig
from .sharding import bits_sum, fingerprint_digest, initial_tensors
from .text import MODEL_FILE

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 2**30


def checkpoint_of_run(run_dir: str | Path, step: int | None = None) -> Path:
    """The sharded checkpoint of `step` in a run folder, or the one latest.json names."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a training run folder: no {CHECKPOINT_DIR}/ in it")
    if step is not None:
        path = ckpt_dir / f"step-{step:08d}"
        if not path.is_dir():
            kept = sorted(p.name for p in ckpt_dir.glob("step-*"))
            raise FileNotFoundError(f"{path} does not exist; kept checkpoints: {', '.join(kept) or 'none'}")
        return path
    name = latest_name(ckpt_dir)
    if name is None or not (ckpt_dir / name).exists():
        raise FileNotFoundError(f"{ckpt_dir} has no usable latest.json; pass --step N to choose a checkpoint")
    return ckpt_dir / name


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None, **kw: Any) -> Path:
    """export_checkpoint of a run's latest (or `step`) checkpoint, with its tokenizer.model."""
    run_dir = Path(run_dir)
    saved = json.loads((run_dir / "train_config.json").read_text()) if (run_dir / "train_config.json").is_file() \
        else {}
    kw.setdefault("text_tokenizer", _run_text_tokenizer(saved))
    return export_checkpoint(checkpoint_of_run(run_dir, step), out, **kw)


def _run_text_tokenizer(saved: dict[str, Any]) -> str | None:
    from libra_tok.hub import TEXT_TOKENIZER, resolve

    for option in ("text_tokenizer", "init_from"):
        if saved.get(option):
            try:
                path = resolve(saved[option], TEXT_TOKENIZER)
            except (OSError, ValueError):
                continue
            path = path / MODEL_FILE if path.is_dir() else path
            if path.is_file():
                return str(path)
    return None


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, text_tokenizer: str | None = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, trust_pickle: bool = False,
                      replace: bool = False, progress: bool = True) -> Path:
    """Write the model of a sharded checkpoint to `out` (module docstring). `replace`: an
    existing `out` is replaced (training's final/); otherwise it must not exist."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise ValueError(f"{checkpoint} is not a sharded checkpoint folder: runs without --parallel fsdp write their "
                         "model to final/ themselves (single-file checkpoints are not exported)")
    meta = read_checkpoint(checkpoint)
    if out.exists() and not replace:
        raise FileExistsError(f"{out} already exists; choose another output folder or delete it")
    config = LibraConfig.from_dict(meta["lm_config"])
    options = meta["config"]
    kind = meta["init_kind"]
    trained = {k.removeprefix("model."): v for k, v in sharded_tensor_keys(checkpoint).items()
               if k.startswith("model.")}
    source = None
    if kind != "preset":
        _, source = open_folder(options["init_from"], trust_pickle=trust_pickle, **meta.get("lm_overrides", {}))
    frozen_dtype = getattr(torch, meta.get("frozen_dtype", "torch.float32").removeprefix("torch."))

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    files: list[Path] = []
    shard: dict[str, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}  # trained tensors of `shard`, read from the checkpoint in one call
    shard_bytes = 0
    frozen: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []

    def flush() -> None:
        nonlocal shard, pending, shard_bytes
        if pending:
            load_sharded(checkpoint, {"model": pending}, collective=False)
        if shard:
            file = staging / f"model-{len(files) + 1:05d}.safetensors"
            atomic_save_safetensors(shard, file, metadata={"format": "pt"})
            files.append(file)
            weight_map.update({k: file.name for k in shard})
            shard, pending, shard_bytes = {}, {}, 0

    torch.manual_seed(int(options.get("seed", 0)))  # fresh weights are drawn as the run drew them
    names = initial_tensors(config, kind, source)
    total = sum(1 for _ in config_parameter_names(config))
    for name, read in tqdm(names, total=total, desc="export", unit="tensor", disable=not progress):
        if name in trained:
            shape, dtype = trained[name]
            tensor = torch.empty(shape, dtype=dtype)
        else:
            tensor = read(None, None).to(torch.float32)
            frozen.append((name, tuple(tensor.shape), frozen_dtype, bits_sum(tensor.to(frozen_dtype))))
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        if name in trained:
            pending[name] = shard[name]
        shard_bytes += size
    flush()
    if source is not None:
        source.close()
    if fingerprint_digest(frozen) != meta["frozen_fingerprint"]:
        shutil.rmtree(staging, ignore_errors=True)
        start = options.get("init_from") or f"preset {options.get('preset')} with seed {options.get('seed')}"
        raise ValueError(f"the frozen weights rebuilt from the run's starting point ({start}) are not those the "
                         f"run in {checkpoint.parent.parent} trained with: has that folder changed?")

    count = len(files)
    renamed = {}
    for i, file in enumerate(files, 1):
        target = file.with_name(f"model-{i:05d}-of-{count:05d}.safetensors")
        file.rename(target)
        renamed[file.name] = target.name
    atomic_write_json(staging / INDEX_FILE, {
        "metadata": {"total_size": sum((staging / n).stat().st_size for n in renamed.values())},
        "weight_map": {k: renamed[v] for k, v in weight_map.items()}})
    atomic_write_json(staging / CONFIG_FILE, folder_meta(config, meta.get("image_tokenizer")))
    if text_tokenizer:
        atomic_write_bytes(staging / MODEL_FILE, Path(text_tokenizer).read_bytes())
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def config_parameter_names(config: LibraConfig):
    """Parameter names of a model of `config` (a meta-device model: no memory)."""
    from .model import LibraForCausalLM

    with torch.device("meta"):
        model = LibraForCausalLM(config)
    return (name for name, _ in model.named_parameters())


__all__ = ["export_checkpoint", "export_run", "checkpoint_of_run", "INDEX_FILE", "DEFAULT_SHARD_BYTES"]
