"""Run under `torch.distributed.run --nproc_per_node=2` by tests/test_lm_sharding.py: every
multi-process part of those tests in one launch (starting processes costs more than the runs).

    python -m torch.distributed.run --nproc_per_node=2 tests/sharded_driver.py SPEC.json

SPEC: {"out": folder, "big_model": sharded model folder, "train": TrainConfig fields shared by
the runs}. Writes to `out`: memory-<rank>.json (peak anonymous memory while loading big_model),
runs full/ (uninterrupted), part/ (stopped at step 2, then resumed), part-at-2/ (a copy taken at
step 2, for a resume on one process) and bf16/ (one step in bf16), and bf16-<rank>.json (the
dtypes of the parameters and those the optimizer holds)."""

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist


def rss_anon() -> int:
    """Anonymous resident memory of this process in bytes (mapped file pages are page cache,
    shared and reclaimable: not memory the process holds)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def peak_while(fn):
    """(fn(), peak anonymous memory above the start while it ran), sampled every millisecond."""
    start, peak, done = rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(peak[0], rss_anon()) - start


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    from torch.distributed.device_mesh import init_device_mesh

    from libra_lm.checkpoint import open_folder
    from libra_lm.sharding import build_sharded
    from libra_lm.train import TrainConfig, Trainer, train

    # 1. Host memory while each process loads its half of a sharded folder.
    config, source = open_folder(spec["big_model"])
    mesh = init_device_mesh("cpu", (2,))
    model, peak = peak_while(lambda: build_sharded(config, source.kind, source, seed=0, frozen_llm=False, mesh=mesh,
                                                   param_dtype=torch.float32, device=torch.device("cpu")))
    local = sum(p.to_local().numel() * 4 for p in model.parameters())
    (out / f"memory-{rank}.json").write_text(json.dumps({"peak": peak, "local": local}))
    source.close()
    del model
    dist.barrier()

    # 2. Training: uninterrupted, and stopped at step 2 then resumed.
    base = dict(spec["train"], parallel="fsdp")
    train(TrainConfig(**base, out_dir=str(out / "full")), progress=False)
    part = TrainConfig(**base, out_dir=str(out / "part"))
    train(part, progress=False, stop_at=2)
    if rank == 0:
        shutil.copytree(out / "part", out / "part-at-2")
    dist.barrier()
    train(part, resume=True, progress=False)

    # 3. bf16: frozen parameters stored in bf16, trainable ones fp32 and alone in the optimizer.
    trainer = Trainer(TrainConfig(**{**base, "steps": 1, "precision": "bf16"}, out_dir=str(out / "bf16")),
                      progress=False)
    trainer.run()
    in_opt = {id(p) for group in trainer.opt.param_groups for p in group["params"]}
    params = {name: {"dtype": str(p.dtype), "trains": p.requires_grad, "in_optimizer": id(p) in in_opt,
                     "optimizer_state": sorted(trainer.opt.state.get(p, {}))}
              for name, p in trainer.model.named_parameters()}
    (out / f"bf16-{rank}.json").write_text(json.dumps(params))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
