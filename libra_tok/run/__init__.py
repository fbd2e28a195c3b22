"""Run machinery shared by the tokenizer trainer (`libra_tok.train`) and the LM trainer
(`libra_lm.train`): everything about a training run that is not its model or its losses.

    options       config files, saved and per-command options (train_config.json)
    distributed   processes under torchrun: Dist, setup, all-reduce, barrier
    schedule      warm-up + cosine learning-rate schedule
    data_order    resumable sample order (KeyedBatches), held-out samples
    rng           RNG states in checkpoints
    checkpoints   atomic step-*.pt with rotation and latest.json, read with weights_only=True
    dcp           sharded checkpoints (torch.distributed.checkpoint): every process writes its shards
    resume        where a run continues from; the refusal to write over a run
    metrics_log   metrics.jsonl and TensorBoard, cut back to the step a run resumes from
    loss_plot     loss.png (matplotlib)
    loop          TrainingLoop: the loop, its cadence and the end of a run

It lives in libra_tok because libra_lm may import libra_tok, never the reverse.
"""

from .checkpoints import (
    CHECKPOINT_DIR,
    LATEST,
    UnusableCheckpoint,
    checkpoint_files,
    checkpoint_name,
    missing_keys,
    read_checkpoint,
    write_checkpoint,
)
from .data_order import KeyedBatches, holdout_indices
from .dcp import load_sharded, read_rank_rng, sharded_checkpoint_name, sharded_tensor_keys, write_sharded_checkpoint
from .distributed import (
    Dist,
    all_reduce_sum,
    barrier,
    process_device,
    setup_distributed,
)
from .loop import Cadence, Throughput, TrainingDiverged, TrainingLoop
from .loss_plot import plot_losses
from .metrics_log import METRICS, MetricsLog, read_metrics, trim_metrics
from .options import (
    PER_COMMAND_OPTIONS,
    TRAIN_CONFIG,
    TRUST_PICKLE_HELP,
    RunOptions,
    load_config_file,
    option,
    saved_options,
)
from .resume import resume_state
from .rng import rng_state, set_rng_state
from .schedule import lr_lambda, warmup_cosine

__all__ = [
    "CHECKPOINT_DIR", "LATEST", "METRICS", "TRAIN_CONFIG", "PER_COMMAND_OPTIONS", "TRUST_PICKLE_HELP",
    "Cadence", "Dist", "KeyedBatches", "MetricsLog", "RunOptions", "Throughput", "TrainingDiverged", "TrainingLoop",
    "UnusableCheckpoint", "all_reduce_sum", "barrier", "checkpoint_files", "checkpoint_name", "holdout_indices",
    "load_config_file", "load_sharded", "lr_lambda", "missing_keys", "option", "plot_losses", "process_device",
    "read_checkpoint", "read_metrics", "read_rank_rng", "resume_state", "rng_state", "saved_options", "set_rng_state",
    "setup_distributed", "sharded_checkpoint_name", "sharded_tensor_keys", "trim_metrics", "warmup_cosine",
    "write_checkpoint", "write_sharded_checkpoint",
]
