"""Using a trained adapter: evaluate it on data, merge it into a plain model directory, describe it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters import load_adapter, read_config, unload
from lorakit.adapters.io import CONFIG_NAME, are_label_names, read_tensors
from lorakit.errors import AdapterFileError, ConfigError, DataError, LorakitError
from lorakit.files import OutputError, check_output_dir, entries, write_directory
from lorakit.options import is_int
from lorakit.train import checkpoint as ckpt
from lorakit.train.data import BUILTIN_DATA, load_data
from lorakit.train.generate import adapter_chat_template, use_template
from lorakit.train.models import check_model_exists, gguf_identity, load_model, load_tokenizer, max_positions, model_dir
from lorakit.train.config import task_defaults
from lorakit.train.evaluation import evaluate
from lorakit.train.describe import describe  # noqa: F401 (its old home)

_TASK_OF_PEFT = {"SEQ_CLS": "classify", "CAUSAL_LM": "causal-lm"}


def adapter_task(adapter: str | os.PathLike) -> tuple[str, list[str] | None, str | None]:
    """(task, label names or None, base model spec or None) recorded with an adapter."""
    cfg = read_config(adapter)
    _, meta = read_tensors(adapter)
    task = meta.get("lorakit_task") or _TASK_OF_PEFT.get(cfg.task_type or "")
    if task is None:
        raise AdapterFileError(f"{adapter}: task_type={cfg.task_type!r}; lorakit evaluates SEQ_CLS and CAUSAL_LM adapters")
    if task not in _TASK_OF_PEFT.values():
        raise AdapterFileError(f"{adapter}: lorakit_task={task!r} in the weights' metadata; expected one of "
                               f"{sorted(_TASK_OF_PEFT.values())}. The file is damaged or was not written by lorakit")
    labels = None
    if "lorakit_labels" in meta:
        try:
            labels = json.loads(meta["lorakit_labels"])
        except (ValueError, RecursionError):
            labels = None
        if not are_label_names(labels):
            raise AdapterFileError(f"{adapter}: lorakit_labels={meta['lorakit_labels'][:80]!r} in the weights' metadata "
                                   "is not a list of two or more distinct label names; the file is damaged, train or "
                                   "save the adapter again")
    return task, labels, cfg.base_model


def load_with_adapter(adapter: str | os.PathLike, model: str | None = None, *, labels: list[str] | None = None,
                      base_dtype: str | torch.dtype = "auto", device: str | torch.device | None = None):
    """(LoadedModel with the adapter loaded, task, label names). ``labels``: the classifier's label names, for an
    adapter that does not record them (one saved by PEFT or by ``save_adapter`` without ``labels``); ``base_dtype``:
    the base's storage (--base-dtype, ``models.load_model``); ``device``: where the model runs (None: the CPU)."""
    task, recorded, base = adapter_task(adapter)
    if labels is not None and task != "classify":
        raise ConfigError(f"--labels {','.join(map(str, labels))}: label names are a classifier's, and {adapter} is a "
                          f"{task} adapter; drop --labels")
    spec = model or base
    if not spec:
        raise LorakitError(f"{adapter} does not name its base model; pass --model")
    if labels is not None and recorded is not None and list(labels) != recorded:
        raise AdapterFileError(f"{adapter} was trained on the labels {recorded}, not {list(labels)}; drop --labels")
    labels = recorded if recorded is not None else (list(labels) if labels is not None else None)
    if task == "classify" and labels is None:
        raise AdapterFileError(f"{adapter}: a classification adapter without label names (lorakit_labels metadata); "
                               "pass them in the order of the classifier's outputs: --labels neg,pos")
    if model is None:
        check_model_exists(spec, recorded_in=str(Path(adapter) / CONFIG_NAME))
        check_base_file(adapter, spec)
    loaded = load_model(spec, task, label_names=labels, tokenizer=load_tokenizer(spec), dtype=base_dtype, device=device,
                        quant=recorded_quant(adapter, base_dtype))
    load_adapter(loaded.model, adapter)
    return loaded, task, labels


def recorded_quant(adapter: str | os.PathLike, base_dtype: str | torch.dtype):
    """The packed format (``precision.QuantSpec``) the run that wrote ``adapter`` trained on, for --base-dtype int8 /
    int4 when that run used the same one (eval and generate then run on the base it trained on: its --quant-format,
    --group-size, --double-quant, --quantize-head); None otherwise (``load_model``'s default: int8, nf4 g64)."""
    from types import SimpleNamespace

    from lorakit.train.precision import QUANTIZED, quant_spec

    if not isinstance(base_dtype, str) or base_dtype not in QUANTIZED:
        return None
    try:
        run = recorded_run(adapter)
        if run.get("base_dtype") != base_dtype:
            return None
        return quant_spec(SimpleNamespace(base_dtype=base_dtype, quant_format=run.get("quant_format"),
                                          group_size=run.get("group_size") if base_dtype == "int4" else None,
                                          double_quant=bool(run.get("double_quant")),
                                          quantize_head=bool(run.get("quantize_head"))))
    except LorakitError:  # a damaged run.json or a format this lorakit does not know: the default format
        return None


def check_base_file(adapter: str | os.PathLike, spec: str) -> None:
    """Refuse a recorded .gguf base that is no longer the file the adapter was trained on (its size and sha256 are in
    the adapter's metadata): the adapter would load without a word and compute something else."""
    _, meta = read_tensors(adapter)
    if "lorakit_base_sha256" not in meta:
        return
    now = gguf_identity(spec)
    if now is None:
        return
    if now["sha256"] != meta["lorakit_base_sha256"]:
        raise AdapterFileError(f"{spec} is not the file {adapter} was trained on: sha256 {now['sha256'][:12]}, "
                               f"{now['size']:,} bytes now; {meta['lorakit_base_sha256'][:12]}, "
                               f"{int(meta.get('lorakit_base_size', 0)):,} bytes then. Restore that file, or pass "
                               "--model to use this one anyway")


def load_for_generation(adapter: str | None, model: str | None = None, *, chat_template: str | None = None,
                        base_dtype: str | torch.dtype = "auto", device: str | torch.device | None = None):
    """A causal LM with ``adapter`` loaded (or ``model`` alone), its tokenizer set to the chat template to talk
    with (``chat_template`` FILE, else the adapter's chat_template.jinja, else the tokenizer's)."""
    template, source = adapter_chat_template(adapter, chat_template)  # a bad file fails before the model loads
    if adapter is not None:
        task, _, _ = adapter_task(adapter)
        if task != "causal-lm":
            raise LorakitError(f"{adapter} is a {task} adapter; lorakit generate needs a causal-LM one "
                               "(lorakit eval measures a classifier)")
        loaded, _, _ = load_with_adapter(adapter, model, base_dtype=base_dtype, device=device)
    elif model is None:
        raise LorakitError("give --adapter, --model, or both")
    else:
        loaded = load_model(model, "causal-lm", dtype=base_dtype, device=device)
    if template is not None:
        use_template(loaded.tokenizer, template, source)
    return loaded


RUN_FILE = "run.json"
# The run.json "config" fields lorakit eval reads, with the JSON types each may have (None: not recorded).
_RUN_FIELDS: dict[str, tuple[type, ...]] = {"data": (str,), "eval_data": (str,), "task": (str,), "text_column": (str,),
                                            "label_column": (str,), "max_length": (int,), "loss_on": (str,),
                                            "skip_bad_rows": (bool,)}


def _run_document(adapter: str | os.PathLike) -> dict[str, Any]:
    """``adapter``'s run.json as written by `lorakit train`, {} when there is none; a file that does not parse, or
    whose fields lorakit eval reads have the wrong type, is an AdapterFileError naming it (never skipped: without it
    the held-out rows would silently be other ones)."""
    path = Path(adapter) / RUN_FILE
    if not path.exists() and not path.is_symlink():
        return {}
    fix = ("restore it from the training run, or move it away and pass --data FILE (a file given there is evaluated "
           "whole)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        said = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [""])[0][:120]
        raise AdapterFileError(f"{path} could not be read ({type(exc).__name__}: {said}); it records the training "
                               f"run's data and held-out split: {fix}") from None
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} holds no \"config\" object (the options of the training run); the file is "
                               f"damaged or was not written by lorakit train: {fix}")
    for key, types in _RUN_FIELDS.items():
        value = config.get(key)
        if value is None:
            continue
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if ok and key == "max_length":
            ok = value > 0
        if not ok:
            wanted = {"max_length": "a positive integer", "skip_bad_rows": "true/false"}.get(key, "a string")
            raise AdapterFileError(f"{path}: config.{key}={value!r} must be {wanted}; the file is damaged: {fix}")
    return doc


def recorded_run(adapter: str | os.PathLike) -> dict[str, Any]:
    """The options of the `lorakit train` run that wrote ``adapter`` (its run.json's "config"), or {} when there is no
    run.json; a damaged one is refused (``_run_document``)."""
    return _run_document(adapter).get("config", {})


def recorded_data_fingerprint(adapter: str | os.PathLike, doc: dict[str, Any] | None = None) -> str | None:
    """The SHA-256 of the training rows (``checkpoint.fingerprint_rows``) the run that wrote ``adapter`` trained on:
    from its run.json ("fingerprint": {"data": ...}), else from the newest complete checkpoint's state; None when
    neither records it."""
    doc = _run_document(adapter) if doc is None else doc
    recorded = doc.get("fingerprint")
    if isinstance(recorded, dict) and isinstance(recorded.get("data"), str):
        return recorded["data"]
    try:
        found = ckpt.latest(Path(adapter) / "checkpoints")
        state = ckpt.load_state(found.path) if found is not None else {}
    except LorakitError:  # only damaged checkpoints: nothing to compare with
        return None
    recorded = state.get("fingerprint") if isinstance(state, dict) else None
    return recorded.get("data") if isinstance(recorded, dict) and isinstance(recorded.get("data"), str) else None


def _check_positive(name: str, value: Any) -> None:
    if not is_int(value, 1):
        raise ConfigError(f"{name}={value!r} must be a positive integer")


# many parameters: `lorakit eval`'s options, each a keyword (the CLI passes them by name)
def evaluate_adapter(adapter: str, data: str | None = None, *, model: str | None = None, max_length: int | None = None,
                     batch_size: int = 64, text_column: str | None = None, label_column: str | None = None,
                     labels: list[str] | None = None, base_dtype: str | torch.dtype = "auto",
                     device: str | torch.device | None = None) -> dict[str, Any]:
    """Held-out metrics of an adapter (its base stored in ``base_dtype``, ``models.load_model``, on ``device``).

    Without ``data``: the held-out rows of the training run that wrote it (its run.json: data, --eval-data,
    max length, columns), else the built-in set's held-out split. With ``data``: every row of that file (or
    the built-in set's held-out split). Options not given default to what run.json recorded.
    """
    _check_positive("batch_size", batch_size)
    if max_length is not None:
        _check_positive("max_length", max_length)
    doc = _run_document(adapter)
    run = doc.get("config", {})
    task_now, _, _ = adapter_task(adapter)
    if task_now != "classify" and label_column is not None:
        raise ConfigError(f"--label-column {label_column}: {adapter} is a {task_now} adapter, whose data has no labels; "
                          "drop --label-column")
    loaded, task, labels = load_with_adapter(adapter, model, labels=labels, base_dtype=base_dtype, device=device)
    trained = dict(max_length=run.get("max_length") or task_defaults(task)["max_length"], text_column=run.get("text_column")
                   or "text", label_column=run.get("label_column") or "label")  # how the run read its rows
    given = dict(max_length=max_length, text_column=text_column, label_column=label_column)
    now = {k: given[k] or trained[k] for k in trained}
    limit = max_positions(loaded.model.config)
    if limit is not None and now["max_length"] > limit:
        raise ConfigError(f"--max-length {now['max_length']} is longer than {loaded.name} can read ({limit} positions); "
                          f"use --max-length {limit} or less")
    options = dict(label_names=labels, skip_bad_rows=bool(run.get("skip_bad_rows")),
                   loss_on=run.get("loss_on") or "assistant")
    template, _ = adapter_chat_template(str(adapter), None)
    if template is not None:
        options["chat_template"] = template
    eval_spec = None
    from_run = data is None and isinstance(run.get("data"), str) and run.get("task") == task
    if from_run:
        data, eval_spec = run["data"], run.get("eval_data")
        for name, spec in (("data", data), ("eval_data", eval_spec)):
            if isinstance(spec, str) and not spec.startswith("builtin:") and not Path(spec).exists():
                raise DataError(f"{adapter}/run.json names the training {name} {spec}, which is not found from here; "
                                "pass --data FILE")
        split = True  # the same held-out rows as in training
    else:
        data = data or next(f"builtin:{k}" for k, t in BUILTIN_DATA.items() if t == task)
        split = data.startswith("builtin:")
    ds = load_data(data, task, loaded.tokenizer, split=split, eval_spec=eval_spec, **now, **options)
    if from_run and eval_spec is None and not data.startswith("builtin:"):
        rows = ds.train if now == trained else load_data(data, task, loaded.tokenizer, split=True, **trained,
                                                         **options).train
        _check_same_training_rows(adapter, doc, data, rows)
    metrics = evaluate(loaded.model, ds.eval, task, loaded.tokenizer.pad_token_id, batch_size=batch_size)
    return {"adapter": str(adapter), "model": loaded.name, "data": data, "rows": len(ds.eval), **metrics}


def _check_same_training_rows(adapter, doc: dict[str, Any], data: str, train_rows: list[dict[str, Any]]) -> None:
    """Refuse to draw the held-out split again from a data file that has changed since training: the split would hold
    other rows, some of them trained on. The training rows' fingerprint recorded by the run (run.json, else the newest
    checkpoint) is compared with that of ``train_rows``, drawn now with the training's --max-length and columns."""
    recorded = recorded_data_fingerprint(adapter, doc)
    if recorded is None:
        return
    now = ckpt.fingerprint_rows(train_rows)
    if now != recorded:
        raise DataError(f"{data} has changed since {adapter} was trained on it (its training rows' fingerprint is "
                        f"{now[:12]} now, {recorded[:12]} then): its held-out split would be drawn again and hold other "
                        f"rows, some of them trained on. Restore {data} as it was, or pass --data FILE to evaluate a "
                        "file whole (one of held-out rows only)")


def merge_adapter(adapter: str, out: str, *, model: str | None = None, overwrite: bool = False,
                  device: str | torch.device | None = None) -> Path:
    """Write base + adapter, merged, as a plain Hugging Face model directory (loads without lorakit).

    ``out`` may not be, contain or lie inside the adapter or the model directory; an existing non-empty
    ``out`` is replaced whole only with ``overwrite``, once the new one is complete.

    A base stored as safetensors is merged tensor by tensor (``merge_stream``: W' = W + s B A, DoRA
    m (W + s B A) / ||W + s B A||_row, in float32, stored at the base's dtype), never whole in memory; what the
    stream cannot map exactly (no safetensors, renamed or fused tensors, an adapter on a tied head) is merged in
    memory, the base loaded at its stored dtype (on ``device``), with a note saying why.
    """
    check_output_dir(out)  # a path that cannot be a directory is refused before anything else is read
    spec = model or _recorded_base(adapter)
    if spec and not model:
        check_model_exists(spec, recorded_in=str(Path(adapter) / CONFIG_NAME))
    inputs: dict[str, Any] = {"--adapter": adapter}
    if spec:
        given = Path(spec).expanduser()
        inputs["--model"] = given if given.is_file() else model_dir(spec)  # a .gguf: the file, not its cached copy
    out_path = check_output_dir(out, inputs=inputs)
    if entries(out_path) and not overwrite:
        raise OutputError(f"--out {out_path} exists and is not empty; choose another directory or pass --overwrite "
                          "(it then replaces the whole directory)")
    import sys

    from lorakit.train import merge_stream
    from lorakit.train.stored_checkpoint import stored_dtype

    # Streamed (merge_stream: the base read tensor by tensor, never whole in memory) where it maps exactly; else
    # in memory, the base loaded at its stored dtype. A missing base or label names: load_with_adapter says so.
    task, labels, _ = adapter_task(adapter)
    plan = reason = tokenizer = None
    if spec and (task != "classify" or labels is not None):
        if not model:
            check_base_file(adapter, spec)
        tokenizer = load_tokenizer(spec)
        try:
            plan = merge_stream.plan_merge(adapter, model_dir(spec), task, labels, tokenizer)
        except merge_stream.NotStreamable as exc:
            reason = str(exc)
    if plan is not None:
        return write_directory(out_path, lambda tmp: merge_stream.write_merged(plan, tmp, tokenizer), replace=True)
    dtype = stored_dtype(model_dir(spec)) if reason else None
    loaded, _, _ = load_with_adapter(adapter, model, device=device, **({"base_dtype": dtype} if dtype is not None else {}))
    if reason:  # after the load, which refuses a damaged base in one error line of its own
        stored = f" in {str(dtype).removeprefix('torch.')}" if dtype is not None else ""
        print(f"lorakit: the merge is not streamed: {reason}; merging in memory instead (the whole base loaded{stored})",
              file=sys.stderr, flush=True)
    plain = unload(loaded.model, merge=True)

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)

    return write_directory(out_path, fill, replace=True)


def _recorded_base(adapter: str | os.PathLike) -> str | None:
    base = read_config(adapter).base_model
    return base if isinstance(base, str) and base else None


# many parameters: `lorakit norms`'s options, each a keyword (the CLI passes them by name)
def model_norms(model: str | None = None, adapter: str | None = None, data: str | None = None, *, rows: int = 8,
                max_length: int | None = None, attention: str | None = None, tolerance: float = 1e-3,
                text_column: str = "text", label_column: str = "label", base_dtype: str | torch.dtype = "auto"):
    """``lorakit.limits.measure_norms`` on ``rows`` rows of data for a model (with an adapter, optionally).

    model defaults to the adapter's base model; data to the training run's (its run.json), else the built-in set
    of the task.
    """
    from lorakit.limits import measure_norms, use_attention
    from lorakit.train.data import collate, infer_task
    from lorakit.train.models import builtin_default_task

    if rows <= 0:
        raise LorakitError(f"rows={rows} must be positive")
    if adapter is not None:
        loaded, task, labels = load_with_adapter(adapter, model, base_dtype=base_dtype)
        tokenizer = loaded.tokenizer
    elif model is None:
        raise LorakitError("give --model, --adapter, or both")
    else:
        loaded, labels = None, None
        task = infer_task(data) if data else (builtin_default_task(model) or "causal-lm")
        tokenizer = load_tokenizer(model)
    run = recorded_run(adapter) if adapter is not None and data is None else {}
    if isinstance(run.get("data"), str):  # the rows the adapter was trained on, read as the run read them
        data = run["data"]
        text_column = run.get("text_column") or text_column  # (types checked by _run_document)
        label_column = run.get("label_column") or label_column
    if data is None:
        data = next(f"builtin:{k}" for k, t in BUILTIN_DATA.items() if t == task)
    ds = load_data(data, task, tokenizer, max_length or task_defaults(task)["max_length"], text_column=text_column,
                   label_column=label_column, label_names=labels, split=data.startswith("builtin:"))
    if loaded is None:
        loaded = load_model(model, task, label_names=ds.label_names, tokenizer=tokenizer, dtype=base_dtype)
    picked = (ds.eval or ds.train)[:rows]
    if not picked:
        raise LorakitError(f"{data} has no rows to measure on")
    batch = {k: v for k, v in collate(picked, loaded.tokenizer.pad_token_id).items() if k in ("input_ids", "attention_mask")}
    if attention is not None:
        use_attention(loaded.model, attention, tolerance)
    report = measure_norms(loaded.model, batch)
    report.model = loaded.name + (f" + {adapter}" if adapter else "")
    return report
