"""The `evaluate` command and the metrics table.

Scoring lives in `coco_metrics` (BLEU, METEOR, ROUGE-L, CIDEr; the COCO results JSON) and
`shapes_metrics` (scene accuracy, attention grounding); neither needs TensorFlow.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from caption_attn.coco_metrics import COCO_METRICS, coco_metrics, write_results
from caption_attn.fileio import write_json_atomic
from caption_attn.shapes_metrics import SHAPES_METRICS, shapes_metrics

DISPLAY_NAMES = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
                 "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr",
                 "scene_accuracy": "scene accuracy", "grounding": "grounding",
                 "images": "images", "grounded_words": "grounded words",
                 "matched_words": "matched words"}


# --------------------------------------------------------------------------- printing
def _format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.4f}"


def format_metrics(metrics: dict) -> str:
    """Aligned table: the coco metrics (missing ones as n/a), then the shapes metrics present
    (merge `coco_metrics` and `shapes_metrics` results into one flat dict)."""
    rows = [(DISPLAY_NAMES[k], _format_value(metrics.get(k))) for k in COCO_METRICS]
    rows += [(DISPLAY_NAMES[k], _format_value(metrics[k])) for k in SHAPES_METRICS
             if k in metrics]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>8}" for name, value in rows)


# --------------------------------------------------------------------------- a run's split
def evaluate_run(run_dir: str, split: str = "test", cfg=None, out: Optional[str] = None,
                 progress: bool = True, use_java: Optional[bool] = None) -> dict:
    """Decode a split of a trained run from its feature cache, score it, write the files.

    Writes the COCO results JSON (`[{"image_id", "caption"}]`) and the metrics JSON (`out`,
    default `<run>/eval/<split>_metrics.json`; results next to it as `*_results.json`).
    Returns the metrics dict (also holding the paths written).
    """
    import keras

    from caption_attn import data, pipeline
    from caption_attn.captioner import Captioner
    from caption_attn.config import DecodeConfig
    from caption_attn.fileio import read_json
    from caption_attn.errors import UserError
    from caption_attn.features import feature_path, read_manifest

    captioner = Captioner.from_run(run_dir, cfg or DecodeConfig())
    run_cfg = captioner.run_cfg
    splits = read_json(os.path.join(run_dir, "split.json"))["splits"]
    if split not in splits:
        raise UserError(f"--split must be one of {sorted(splits)}, got {split!r}")
    records = {r.image: r for r in data.load_dataset(run_cfg.captions, run_cfg.data).records}
    manifest = read_manifest(run_cfg.cache)
    reader = pipeline.NpyReader.from_manifest(manifest)
    keys = [k for k in splits[split] if k in records]
    valid = {k: reader.has_file(feature_path(run_cfg.cache, k)) for k in keys}
    without = [k for k in keys if not valid[k]]
    keys = [k for k in keys if valid[k]]
    if not keys:
        raise UserError(f"no images of the {split} split have features in {run_cfg.cache}")
    bar = keras.utils.Progbar(len(keys), verbose=1 if progress else 0, unit_name="image")
    batches = pipeline.image_dataset([feature_path(run_cfg.cache, k) for k in keys],
                                     captioner.cfg.batch_size, reader)
    decoded = captioner.decode_batches((b.numpy() for b in batches), bar)
    best = {k: c[0] for k, c in zip(keys, decoded)}
    hypotheses = {k: c.text for k, c in best.items()}
    references = {k: records[k].captions for k in keys}
    metrics, notes = coco_metrics(references, hypotheses, use_java=use_java)
    if without:
        notes.append(f"{len(without)} images of the {split} split were left out: their feature "
                     f"file in {run_cfg.cache} is missing or has the wrong size (e.g. "
                     f"{without[0]}); run extract-features --verify to repair the cache")
    result = {"run": run_dir, "split": split, "images": len(keys),
              "images_without_features": len(without),
              "decode": {"method": captioner.cfg.method, "beam": captioner.cfg.beam,
                         "length_penalty": captioner.cfg.length_penalty},
              **metrics, "notes": notes}
    objects = {k: records[k].objects for k in keys if records[k].objects is not None}
    if objects:
        sizes = {k: records[k].size or (manifest["image_size"],) * 2 for k in objects}
        result.update(shapes_metrics({k: hypotheses[k] for k in objects},
                                     {k: best[k].words for k in objects},
                                     {k: best[k].attention for k in objects}, objects, sizes))
    out = out or os.path.join(run_dir, "eval", f"{split}_metrics.json")
    results_path = os.path.splitext(out)[0].removesuffix("_metrics") + "_results.json"
    write_results(results_path, hypotheses, {k: records[k].image_id for k in keys})
    result.update(metrics_file=out, results_file=results_path)
    write_json_atomic(out, result)
    return result
