"""`merge_checkpoints`: MoD weight select from checkpoint folder to checkpoint folder,
streaming tensor by tensor and reading the other model only where it is selected.

For each tensor of BASE, in file order: read it whole (one positioned read), and run the
select pipeline (modkern/ops/select_pipeline.py) on it: min and max, the exact threshold
v of select_reference.select_threshold, the elements that come from OTHER (exactly those
with `t1 >= v`), read from OTHER's file at just those elements (at alpha 0.9 about 2% of
OTHER's pages on N(0, 0.02) weights), checked and written. On a CUDA device (or with
backend="triton") the pipeline's engine is the Triton kernels'. The patched tensor is
appended to the output shard being written; the shards' layout is planned from the headers
beforehand, so memory stays at about the largest tensor. Everything that can be checked
without tensor data (options, folders, shards, headers, keys, shapes, dtypes, alpha rules,
output path, disk space) is checked before anything is written; the output is built in a
temporary folder beside OUT and renamed into place when complete. The result equals
`merge_state_dicts` on the two loaded state dicts, bit for bit.
"""

from __future__ import annotations

import os
import shutil
import time

from ..merging.patterns import AlphaRule
from . import publish
from .job import open_merge
from .options import MergeOptions
from .out_folder import make_parent
from .report import MergeReport, Progress
from .shard_writer import BackgroundWriter, ShardWriter


def merge_checkpoints(base: str | os.PathLike, other: str | os.PathLike,
                      out: str | os.PathLike, alpha: AlphaRule, **options) -> MergeReport:
    """Merge two Hugging Face checkpoint folders by MoD weight select into a new folder.

    Args:
        base: model 1's folder (model.safetensors or shards + model.safetensors.index.json);
            its config, generation config and tokenizer are copied to the output.
        other: model 2's folder; only the pages holding selected elements are read.
        out: the output folder; must not exist (unless `force`) nor be or contain an input.
        alpha: a float in [0, 1], a mapping name pattern -> float (first match wins), or a
            function of the tensor name (None: carry that tensor over), as in
            merge_state_dicts.

    Options (keywords; see MergeOptions):
        include, exclude: name patterns selecting the tensors to merge (e.g. "mlp").
        strict (True): raise if the models' tensor names differ; if False, BASE's extra
            tensors are carried over and OTHER's ignored.
        precision ("exact"): or "reference" (the released code's arithmetic, bit for bit).
        vocab ("strict"): or "common": tensors whose first dimension differs (embed_tokens
            and lm_head of vocabularies padded to different sizes) are merged over the rows
            both have, BASE's further rows kept; config.json's vocab_size may differ (OUT
            keeps BASE's). The recipe records it, and the rows merged per tensor.
        backend ("auto"): the select's engine: "auto" (Triton on a CUDA device, torch on the
            CPU), "torch" or "triton" (on the CPU only under TRITON_INTERPRET=1). Every
            backend writes the same bits.
        device ("cpu"): or "cuda"/"cuda:N" to run the selects on that GPU.
        dtype (None): cast floating-point output tensors to this dtype (after the merge).
        max_shard_size ("5GB"): largest output shard, e.g. "5GB" (decimal) or "4GiB".
        force (False): replace an existing `out` (the previous folder stays intact until
            the new one is complete, then is swapped out at once).
        progress (None): show a progress bar; None shows one only when stderr is a terminal.
        full_hash (False): record the sha256 of every input weight file in the recipe
            (reads all of OTHER); by default the sha256 of each file's header and its size.
        extra_recipe (None): extra entries for the recipe file (e.g. the config it came
            from).
        hooks (none): a checkpoint.hooks.MergeHooks the merge calls after each tensor.

    Returns a MergeReport. Raises a ModkernError subclass, naming the file, tensor and what
    was expected, for bad input; in that case nothing is left at `out` (or the previous
    folder is untouched).
    """
    return merge_with_options(base, other, out, MergeOptions(alpha, **options))


def merge_with_options(base: str | os.PathLike, other: str | os.PathLike,
                       out: str | os.PathLike, options: MergeOptions) -> MergeReport:
    """`merge_checkpoints` with its options already made."""
    start = time.perf_counter()
    with open_merge(base, other, out, options) as job:
        report = job.new_report()
        make_parent(job.out)
        tmp = publish.temp_folder(job.out)
        writer = BackgroundWriter(ShardWriter(tmp, job.shards))
        progress = Progress(options.progress, sum(s.nbytes for s in job.shards),
                            len(job.planned), options.hooks)
        try:
            for name, t1 in job.base_tensors():
                writer.write(name, job.merge_one(name, t1, report))
                del t1
                progress.tick(writer.bytes_written)
            writer.finish()
            report.bytes_written = writer.bytes_written
            report.bytes_read_base = job.ck1.bytes_read
            report.bytes_read_other = job.ck2.bytes_read
            report.seconds = time.perf_counter() - start
            job.finish_folder(tmp, report)
            publish.publish(tmp, job.out, replace=options.force)
        except BaseException:
            writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            progress.close()
    report.seconds = time.perf_counter() - start
    return report
