"""Typed job configuration: the schema.

The dataclasses below are the truth; YAML is only how a config is stored. Precedence (lowest to highest):
dataclass defaults < model preset < YAML file < command-line overrides (``section.key=value``).

This module imports nothing of the packages it describes: it reads YAML and overrides (`read_config`), builds the
dataclasses (`build_config`, `build_section` for a registered part's own section) and finds what the schema alone
shows is wrong (`schema_problems`). Presets, registries (objectives, callbacks, synthetic tasks) and files are
checked in the job layer, every problem reported at once, before any process group starts::

    from mmscale.job.preflight import load_config
    cfg = load_config("configs/demo.yaml", ["train.lr=3e-4", "deepspeed.zero_stage=2"])
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """All problems found in a config, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s) in the config:\n" + "\n".join(f"  - {p}" for p in problems)
        )


# ----------------------------------------------------------------------------------------------- sections


@dataclass
class SourceSpec:
    """One source of a training mixture (`data.sources`): its own shards, drawn from with its weight."""

    name: str = ""
    """Unique name; it seeds the source's own shard shuffle, so renaming a source changes its order."""
    shards: str = ""
    """The source's shards (same forms as `data.train_shards`)."""
    weight: float = 1.0
    """Relative share of the samples (> 0): a source gets weight / (sum of the weights) of them, e.g. 0.7 and 0.3."""


@dataclass
class DataConfig:
    train_shards: str = ""
    """Training shards: a brace pattern (`data/train-{000000..000031}.tar`), a directory of .tar files, or a
    text file listing one shard path per line. Empty with `synthetic_train_samples > 0` = the demo dataset."""
    val_shards: str = ""
    """Held-out shards for periodic validation (same forms as `train_shards`). Empty = no validation."""
    synthetic_train_samples: int = 0
    """If > 0 and `train_shards` is empty: generate this many coloured-shape samples under
    `{output_dir}/data` (once, on rank 0) and train on them. Needs no download."""
    synthetic_val_samples: int = 0
    """Held-out synthetic samples (used when `val_shards` is empty)."""
    synthetic_task: str = "shapes"
    """What the synthetic dataset shows and says (mmscale.data.synthetic): `shapes` (two coloured shapes and their
    relation: the demo's pretraining) or `counts` (one to four shapes of one colour and kind: "three red circles",
    a task for fine-tuning the demo's run)."""
    samples_per_shard: int = 500
    """Samples per shard when generating the synthetic dataset."""
    tokenizer: str = ""
    """A sentencepiece `.model` file or a Hugging Face tokenizer directory. Empty with the synthetic dataset =
    train a sentencepiece model on its captions."""
    tokenizer_vocab_size: int = 64
    """Vocabulary size when mmscale trains the sentencepiece tokenizer itself."""
    num_samples: int = 0
    """Training samples per epoch. 0 = read the shards' `sizes.json` written by the shard writer."""
    image_size: int = 64
    """Images are resized (shorter side) and centre-cropped to this many pixels square."""
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    max_text_len: int = 32
    """Tokens per sample after the image token, including end-of-sequence; longer captions are truncated."""
    max_images: int = 1
    """Image slots per sample (the collate pads with masked slots)."""
    shuffle_buffer: int = 1000
    """Samples in the shuffle buffer of each data-loader worker (0 = no sample shuffling)."""
    num_workers: int = 2
    """Data-loader worker processes per rank."""
    warn_every: int = 100
    """Corrupt-sample warnings are logged once per this many skipped samples (the first is always logged)."""
    resampled: bool = False
    """Draw shards with replacement, forever (webdataset's ResampledShards): each data-loader worker draws its own
    seeded sequence of shards, so there are no epochs beyond the nominal `num_samples` (or sizes.json) one used to
    count steps_per_epoch for logging. With `sources`, every source is drawn from this way."""
    sources: list[SourceSpec] = field(default_factory=list)
    """A mixture instead of `train_shards`: several sources, each `{name, shards, weight}`, e.g. captions with weight
    0.7 and interleaved documents with 0.3. Which source each sample comes from is drawn from the seed; each source
    runs through its own epochs. Samples per epoch: `num_samples`, or else the sum of every source's sizes.json."""
    max_image_pixels: int = 50_000_000
    """Images with more pixels (width x height, read from the file's header before any pixel is decoded) are
    skipped and counted as `image_too_large`: a decompression bomb (a small file declaring a huge image) cannot
    exhaust a worker's memory. 50 M is a 50-megapixel photo (~150 MB decoded as RGB)."""
    max_member_bytes: int = 256 << 20
    """A sample with a tar member larger than this many bytes (from the tar header, local or streamed over http) is
    skipped and counted as `member_too_large`; the member is passed over, never read into memory, so one multi-GB
    member cannot exhaust a worker's memory. 256 MiB is far above any image or caption a sample needs."""
    max_bad_fraction: float = 0.05
    """The run stops (BadDataError, naming the kinds of bad input) when more than this fraction of the last
    `bad_window` samples were skipped as bad (corrupt, undecodable, missing members...). 1 = never stop."""
    bad_window: int = 1000
    """Samples over which `max_bad_fraction` is measured."""
    http_retries: int = 5
    """Retries of an http(s) shard after a network failure (connection refused or dropped, timeout, HTTP error)
    before the run stops with a RemoteShardError naming the URL and the last error. A shard that breaks off
    part-way is reopened and read on after the samples already used."""
    http_backoff_s: float = 1.0
    """Wait before the first retry of an http(s) shard; it doubles with each further retry of the same shard (up
    to a minute)."""
    text_only: bool = False
    """Accept samples with a caption and no media member (no image, and none of `media`'s kinds) as text-only
    samples: they pass no encoder and see no media, which keeps the LM's language in a mixture (Flamingo, IDEFICS).
    False: such a sample is skipped and counted as `missing_image`."""
    allow_pipe: bool = False
    """Accept `pipe:COMMAND` shards (in `train_shards`, `val_shards` and shard list files): each one runs a shell
    command. Off by default, so that a shard list cannot run commands unasked."""


VISION_TYPES: tuple[str, ...] = ("clip", "siglip", "dinov2", "resnet", "convnext")
"""`model.vision.type` values (mmscale.model.vision's tower table)."""


@dataclass
class VisionConfig:
    type: str = "clip"
    """Hugging Face vision tower: the ViTs `clip` (CLIPVisionModel), `siglip` (SiglipVisionModel), `dinov2`
    (Dinov2Model), or the convolutional `resnet` (ResNetModel) and `convnext` (ConvNextModel), whose last feature map
    (N, C, h, w) becomes h*w tokens of width `hidden_sizes[-1]` (they take any image size)."""
    path: str = ""
    """Local directory with a saved vision tower (`save_pretrained`). Empty = build from `config` with random weights."""
    config: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the tower's Hugging Face config class when `path` is empty."""
    train_top_layers: int = 0
    """With `model.train_vision`: train only the top N layers of the tower (a ViT's encoder layers, a conv tower's
    stages) and what sits above them (the final norm); its embeddings and lower layers stay frozen. 0 = all."""


@dataclass
class LMConfig:
    path: str = ""
    """Local directory with a saved causal LM. Empty = build a LlamaForCausalLM from `config` with random weights."""
    config: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for LlamaConfig when `path` is empty. `vocab_size` is set from the tokenizer."""
    train_top_layers: int = 0
    """With `model.train_lm`: train only the top N decoder layers and what sits above them (the final norm, an
    untied head); the embeddings and lower layers stay frozen. 0 = all."""
    dropout: float = 0.0
    """Dropout in the LM, set through its Hugging Face config: every dropout probability the config has (a Llama's
    `attention_dropout`; `hidden_dropout`, `resid_pdrop`, ... where an architecture has them). Off at evaluation."""


@dataclass
class ResamplerConfig:
    num_latents: int = 64
    """Visual tokens per image after resampling."""
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    dropout: float = 0.0
    """Dropout on each attention and feed-forward output before its residual add. Off at evaluation."""


@dataclass
class CrossAttentionConfig:
    every_n_layers: int = 4
    """A gated cross-attention block is inserted before every N-th decoder layer (layers 0, N, 2N, ...)."""
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    media_mode: str = "previous"
    """`previous`: a text token sees only the latest image before it (Flamingo); `all`: every image before it."""
    backend: str = "auto"
    """Cross-attention kernel: `auto`, `triton`, `flash` or `sdpa` (see mmscale.kernels)."""
    dropout: float = 0.0
    """Dropout on the cross-attention's and the feed-forward's outputs before their gates. Off at evaluation."""
    gate_init: float = 0.0
    """Initial value of the tanh gates. 0 (Flamingo) leaves a pretrained LM unchanged at step 0, but also passes no
    gradient to the visual side until the gates move; a model trained from scratch learns faster from e.g. 1.0."""


TRAIN_MODES: tuple[str, ...] = ("full", "lora", "frozen")
"""`model.train_xattn` / `model.train_resampler` values: trained in full, through LoRA adapters, or not at all."""


@dataclass
class ModelConfig:
    preset: str = ""
    """Named preset (`tiny`, `demo`, `flamingo-3b`, `flamingo-9b`) whose values the other keys here override."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    xattn: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    init_from: str = ""
    """Start from another run's weights: a run directory (its newest good checkpoint, any ZeRO stage and world
    size), a checkpoint directory, or a folder with `model.safetensors`. Weights only: not the optimizer, the
    schedule or the data position. Empty = the weights `vision`/`lm` give (random or `path`)."""
    train_vision: bool = False
    """Train the vision tower (False = frozen)."""
    train_lm: bool = False
    """Train the language model's own weights (False = frozen; the LM's input embeddings and head included)."""
    train_resampler: str = field(default="full", metadata={"aliases": {True: "full", False: "frozen"}})
    """How the perceiver resampler trains: `full`, `lora` (LoRA on its linear layers, from the `lora`/`qlora`
    callback's r and alpha; its latents and norms frozen) or `frozen`. `true`/`false` read as full/frozen."""
    train_xattn: str = field(default="full", metadata={"aliases": {True: "full", False: "frozen"}})
    """How the gated cross-attention blocks train: `full`, `lora` (LoRA on their linear layers, from the
    `lora`/`qlora` callback's r and alpha; the tanh gates stay trainable scalars, the norms frozen) or `frozen`.
    `true`/`false` read as full/frozen."""
    activation_checkpointing: bool = False
    """Recompute decoder layers in the backward pass to save memory."""
    num_classes: int = 0
    """Classes in the shards' `.cls` labels: the size of the classification objective's head (on the LM's last
    hidden states averaged over the text positions) and the bound the data pipeline checks labels against. > 0
    also measures classification when `objectives` does not list it. 0 = no head."""


@dataclass
class TrainConfig:
    global_batch_size: int = 32
    """Samples per optimizer step over all ranks: micro_batch_size * grad_accum * world_size."""
    micro_batch_size: int = 8
    """Samples per rank per forward pass."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 100
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    precision: str = "fp32"
    """`fp32` or `bf16` (bf16 keeps fp32 master weights in DeepSpeed)."""
    checkpoint_every: int = 500
    """Save a checkpoint every N steps (and always at the end). 0 = only at the end."""
    keep_checkpoints: int = 2
    """The newest N checkpoints are kept; older ones are deleted after a newer one is complete."""
    keep_best: str = ""
    """Also keep the checkpoint with the best value of this validation metric (e.g. `val_loss`); empty = off."""
    keep_best_mode: str = "min"
    """`min` or `max`: which way `keep_best` is better."""
    max_nonfinite_steps: int = 3
    """A step whose loss or gradient norm is not finite is skipped on every rank and counted; this many in a row
    trigger `on_nonfinite`."""
    on_nonfinite: str = "rollback"
    """`rollback`: reload the last checkpoint's weights and optimizer, multiply the learning rate by
    `rollback_lr_factor`, and go on with the data after the bad batches; `stop`: end the run with an error."""
    rollback_lr_factor: float = 0.5
    eval_every: int = 0
    """Validate every N steps (0 = only at the end, if validation shards exist)."""
    eval_at_start: bool = False
    """Also validate before the first step (logged at step 0): the "before" of a fine-tuning run."""
    eval_batches: int = 20
    """Micro batches per validation run on each rank."""
    seed: int = 1234


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    """ZeRO stage 0-3."""
    offload_optimizer: str = "none"
    """`none` or `cpu`: where ZeRO keeps optimizer state."""
    offload_params: str = "none"
    """`none` or `cpu` (stage 3 only): where ZeRO keeps parameters."""
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    collective_timeout_s: float = 600.0
    """How long a collective (all-reduce, gather...) waits for the other ranks before it fails. When a rank dies or
    hangs, the others stop within about this time, naming the rank and the step, instead of waiting forever."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw keys merged last into the generated DeepSpeed config (for options mmscale does not model). Keys that
    mmscale sets from its own fields (batch sizes, accumulation, clipping, precision, ZeRO stage, optimizer and
    schedule) are refused here: DeepSpeed would then disagree with the trainer's loss scaling and logging."""


# deepspeed.extra keys mmscale derives from its own fields: the field to set instead
DS_OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size * world size)",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "optimizer": "train.lr, train.beta1/beta2, train.weight_decay",
    "scheduler": "train.warmup_steps, train.min_lr_ratio",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_params",
}


@dataclass
class CallbackSpec:
    name: str = ""
    """Registered callback name (see mmscale.callbacks.CALLBACKS)."""
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskSpec:
    """One task of a continual-learning sequence: its own shards and step budget."""

    name: str = ""
    train_shards: str = ""
    val_shards: str = ""
    max_steps: int = 0
    classes: list[int] = field(default_factory=list)
    """The classes this task brings (class-incremental): the head predicts only the classes of the tasks so far.
    Empty = no change to the active classes."""


@dataclass
class ContinualConfig:
    tasks: list[TaskSpec] = field(default_factory=list)
    """Tasks trained in order in one job (empty = an ordinary run on data.train_shards). After each task every
    task is evaluated: R[i][j] = `metric` on task j after task i, written to {output_dir}/continual.json and
    continual.png. train.max_steps must be the sum of the tasks' max_steps."""
    metric: str = "val_loss"
    """What R holds: val_loss or val_acc (classification)."""
    schedule: str = "restart"
    """restart: warmup and decay again for each task; continue: one schedule over the whole sequence."""


@dataclass
class LoggingConfig:
    log_every: int = 10
    """Write metrics every N optimizer steps."""
    tensorboard: bool = True
    progress_bar: bool = True
    plot: bool = True
    """Write `{output_dir}/loss.png` at the end of training."""


@dataclass
class JobConfig:
    output_dir: str = "runs/demo"
    """Checkpoints, metrics.jsonl, TensorBoard events and generated data go here."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    callbacks: list[CallbackSpec] = field(default_factory=list)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    """What training minimises: registered objectives (mmscale.objectives), each `NAME: {weight: W, ...its own
    keys}`, summed with their weights; weight 0 = measured, not trained. Empty = `captioning` alone, weight 1. E.g.
    `{captioning: {weight: 0}, classification: {weight: 1}}` trains a classifier and still reports the caption
    loss; `{contrastive: {weight: 1}}` trains image-text retrieval alone."""
    media: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Media besides images (mmscale.media), each `NAME: {max_items: N, ...its own keys}`: `video` (frames through
    the image tower, with time embeddings) and `audio` (a conv or Whisper encoder). They feed the same resampler and
    cross-attention as images. Empty = images alone."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


INVALID: Any = object()
"""What `_coerce` returns for a value that does not match its annotation: the caller keeps the value it had (the
default, the preset's or the YAML's), so that validation never compares a wrong type."""

_KINDS = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
_PLURAL = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


def _kind(tp: Any) -> str:
    """How a report names what an annotation expects: `an integer`, `a list of numbers`, `an integer or null`."""
    origin = typing.get_origin(tp)
    if tp in _KINDS:
        return _KINDS[tp]
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin is list:
        item = typing.get_args(tp)[0]
        return f"a list of {_PLURAL[item]}" if item in _PLURAL else "a list"
    if origin is dict:
        return "a mapping"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _kind(a) for a in typing.get_args(tp))
    return _type_name(tp)


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`, recursing into lists, dicts, Optional/unions and dataclasses
    (built here): the checked value, or INVALID after appending one problem per mismatch (field, value, what was
    expected). A list or dict with one bad element is INVALID as a whole; so is a dataclass in a list with a bad
    field (the surrounding section keeps the fields that checked)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping of {tp.__name__}'s keys, got {value!r}")
            return INVALID
        before = len(problems)
        built = _build(tp, value, where, problems)
        return built if len(problems) == before else INVALID
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms:
            trial: list[str] = []
            out = _coerce(value, arm, where, trial)
            if not trial:
                return out
        if len(arms) == 1:  # Optional[X]: X's own problems say more (e.g. which element of a list)
            problems += trial
        else:
            problems.append(f"{where}: expected {_kind(tp)}, got {value!r}")
        return INVALID
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{where}: expected {_kind(tp)}, got {value!r}")
            return INVALID
        items = [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return INVALID if any(v is INVALID for v in items) else items
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return INVALID
        out = {_coerce(k, key_tp, f"{where} (key {k!r})", problems): _coerce(v, value_tp, f"{where}.{k}", problems)
               for k, v in value.items()}
        return INVALID if any(k is INVALID or v is INVALID for k, v in out.items()) else out
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # (bool is an int in Python, but `true` is no integer, number or string here)
    if isinstance(tp, type) and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        problems.append(f"{where}: expected {_kind(tp)}, got {value!r}")
        return INVALID
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str], base: Any = None) -> Any:
    """Build dataclass `cls` from `data` on top of `base` (or the defaults), rejecting unknown keys."""
    obj = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            close = [n for n in names if n.startswith(key[:3])] or names
            problems.append(f"{where}: unknown key. Valid keys here: {', '.join(close)} (see --print-config)")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            setattr(obj, key, _build(hints[key], value, where, problems, base=current))
            continue
        if typing.get_origin(hints[key]) is dict and isinstance(current, dict) and isinstance(value, dict):
            # A dict field (model.lm.config, model.vision.config, deepspeed.extra) merges key by key into what the
            # preset or the YAML gave: `model.lm.config.num_hidden_layers=8` changes one key of the preset's LM,
            # it does not replace the preset's whole LM config with one key.
            value = _merge_dict_field(current, value)
        aliases = next(f.metadata.get("aliases", {}) for f in dataclasses.fields(cls) if f.name == key)
        if aliases and isinstance(value, bool):  # e.g. model.train_xattn: true, as before it took a mode
            value = aliases[value]
        checked = _coerce(value, hints[key], where, problems)
        if checked is not INVALID:  # a value of the wrong type leaves the field as it was (named in the report)
            setattr(obj, key, checked)
    return obj


def _merge_dict_field(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(out.get(k), dict) and isinstance(v, dict):
            out[k] = _merge_dict_field(out[k], v)
        else:
            out[k] = v
    return out


def _yaml_error(e: yaml.YAMLError) -> str:
    """PyYAML's own words, on one line, with where it happened (1-based line and column)."""
    words = ": ".join(w for w in (getattr(e, "context", None), getattr(e, "problem", None)) if w) or str(e)
    mark = getattr(e, "problem_mark", None)
    return words + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "")


def _parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], the value read as YAML). Raises ConfigError for one item."""
    key, eq, raw = item.partition("=")
    path = key.strip().split(".")
    if not eq or not all(part.strip() for part in path):
        raise ConfigError([f"override {item!r}: expected section.key=value, e.g. train.lr=3e-4"])
    try:
        return [part.strip() for part in path], yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError([f"override {item!r}: the value {raw!r} is not valid YAML ({_yaml_error(e)}); if you "
                           f"mean a string, quote it: {key}='\"{raw}\"'"]) from None


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(path):
        out = {part: out}
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def read_config(path: str | Path | None = None, overrides: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The raw config of a YAML file with `section.key=value` overrides merged over it, and the problems found on the
    way (overrides that do not parse). Raises ConfigError when the file cannot be used at all. Presets, building
    the dataclasses and every check: mmscale.job.preflight.load_config."""
    raw: dict[str, Any] = {}
    problems: list[str] = []  # every override that does not parse, with the rest of the report
    for item in overrides or []:
        try:
            key_path, value = _parse_override(item)
        except ConfigError as e:
            problems += e.problems
            continue
        raw = _merge(raw, _nest(key_path, value))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"--config {path}: no such file"] + problems)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"{path}: not valid YAML: {_yaml_error(e)}"] + problems) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError([f"{path}: cannot be read as a UTF-8 text file ({e})"] + problems) from None
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}"]
                              + problems)
        raw = _merge(loaded, raw)  # the overrides beat the file
    return raw, problems


MOVED_KEYS = {"train.lm_loss_weight": "objectives.captioning.weight",
              "train.cls_loss_weight": "objectives.classification.weight"}
"""Keys of earlier versions and where they went. A run's recorded config is read in the new form
(`migrate_recorded`); a config given now that uses one is refused, naming the new key."""


def moved_key_problems(raw: dict[str, Any]) -> list[str]:
    """A problem for each key of MOVED_KEYS that `raw` (a config given now) still uses."""
    out = []
    for old, new in MOVED_KEYS.items():
        section, _, key = old.partition(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            out.append(f"{old}: {raw[section][key]!r}; this key is now {new} (objectives: NAME: {{weight: W}}, see "
                       f"mmscale.objectives): write {new}={raw[section][key]!r}")
    return out


def migrate_recorded(raw: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded config (a checkpoint manifest's, a run's config.yaml) written before objectives existed, in
    today's form: train.lm_loss_weight / cls_loss_weight become `objectives` with the same meaning (the caption
    loss always measured; classification trained when its weight was > 0). Other configs come back unchanged."""
    train = raw.get("train")
    if not isinstance(train, dict) or not ({"lm_loss_weight", "cls_loss_weight"} & set(train)):
        return raw
    train = dict(train)
    lm, cls = train.pop("lm_loss_weight", 1.0), train.pop("cls_loss_weight", 0.0)
    out = {**raw, "train": train}
    if not raw.get("objectives") and (lm != 1.0 or cls):
        out["objectives"] = {"captioning": {"weight": lm}, **({"classification": {"weight": cls}} if cls else {})}
    return out


def build_config(raw: dict[str, Any], model: ModelConfig | None = None) -> tuple[JobConfig, list[str]]:
    """The JobConfig of `raw` over the defaults (and `model`, a preset's values, under the model section), unknown
    keys and values of the wrong type reported (the field then keeps the value it had)."""
    problems: list[str] = []
    cfg = JobConfig()
    if model is not None:
        cfg.model = model
    return _build(JobConfig, raw, "", problems, base=cfg), problems


def build_section(cls: type, data: dict[str, Any], prefix: str) -> tuple[Any, list[str]]:
    """A section dataclass that a registered part declares (an objective's), built from `data` as the config's own
    sections are: unknown keys and values of the wrong type reported, named under `prefix`."""
    problems: list[str] = []
    return _build(cls, data, prefix, problems), problems


def registered_sections(entries: dict[str, Any], registry: dict[str, Any], prefix: str, what: str,
                        example: str) -> tuple[dict[str, Any], list[str]]:
    """The sections of registered parts named in `entries` (`{name: {its keys}}`, e.g. `objectives` or `media`):
    each built from its `registry[name].Section` under `{prefix}.{name}`; unknown names, a non-mapping and the
    sections' own problems reported (`what`: the part's kind, `example`: a mapping to show)."""
    sections, problems = {}, []
    for name, raw in entries.items():
        where = f"{prefix}.{name}"
        if name not in registry:
            problems.append(f"{where}: unknown {what} {name!r}. Registered: {', '.join(sorted(registry))}")
            continue
        if raw is not None and not isinstance(raw, dict):
            problems.append(f"{where}: expected a mapping of its keys (e.g. {example}), got {raw!r}")
            continue
        section, found = build_section(registry[name].Section, raw or {}, where)
        problems += found
        sections[name] = section
    return sections, problems


def refused_fields(problems: list[str]) -> list[re.Pattern[str]]:
    """Patterns matching the fields `problems` refused a value of: what validation says about such a field would be
    about a value nobody gave, and is left out of the report (which names the field already)."""
    return [re.compile(re.escape(p.split(":", 1)[0].split("[", 1)[0]) + r"(?!\w)") for p in problems]


# ----------------------------------------------------------------------------------------------- validation


def _choice(problems: list[str], where: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        problems.append(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")


def _conv_stage_problems(kind: str, kw: dict[str, Any]) -> list[str]:
    """A conv tower's stages must agree: one width (`hidden_sizes`) and one depth (`depths`) per stage, and for ConvNeXt
    `num_stages` of them. Transformers reads `num_hidden_layers` as ConvNeXt's `num_stages`: a ViT preset's key
    merged into a ConvNeXt config (`model.vision.type=convnext` over the `tiny` preset) changes the stage count."""
    where = "model.vision.config"
    widths, depths = kw.get("hidden_sizes"), kw.get("depths")
    if widths is not None and depths is not None and len(widths) != len(depths):
        return [f"{where}: hidden_sizes {widths} and depths {depths} must have one entry per stage each"]
    given = widths if widths is not None else depths
    if kind == "convnext" and given is not None:
        stages = kw.get("num_hidden_layers", kw.get("num_stages", 4))  # the former wins in transformers
        if stages != len(given):
            key = "num_hidden_layers" if "num_hidden_layers" in kw else "num_stages"
            return [f"{where}.{key}: {stages} stages, but {len(given)} in hidden_sizes/depths; a ConvNeXt config "
                    f"takes num_hidden_layers as its num_stages (a ViT preset's num_hidden_layers may have merged in): "
                    f"set model.vision.config.num_hidden_layers={len(given)}"]
    return []


def _positive(problems: list[str], where: str, value: Any, minimum: float = 1) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum:
        problems.append(f"{where}: {value!r} must be >= {minimum}")


def _continual_problems(cfg: JobConfig) -> list[str]:
    c, p = cfg.continual, []
    _choice(p, "continual.schedule", c.schedule, ("restart", "continue"))
    if not c.tasks:
        return p
    names = [t.name for t in c.tasks]
    for i, t in enumerate(c.tasks):
        where = f"continual.tasks[{i}]"
        if not t.name or names.count(t.name) > 1:
            p.append(f"{where}.name: {t.name!r}: every task needs a name of its own")
        for field_name in ("train_shards", "val_shards"):
            if not getattr(t, field_name):
                p.append(f"{where}.{field_name}: empty; every task needs its own shards (R is measured on val_shards)")
        if t.max_steps < 1:
            p.append(f"{where}.max_steps: {t.max_steps} must be >= 1")
        bad = [k for k in t.classes if not 0 <= k < max(cfg.model.num_classes, 0)]
        if bad:
            p.append(f"{where}.classes: {bad} outside 0..model.num_classes-1 ({cfg.model.num_classes})")
    total = sum(t.max_steps for t in c.tasks)
    if cfg.train.max_steps != total:
        p.append(f"train.max_steps: {cfg.train.max_steps}, but the tasks' max_steps add up to {total}; set "
                 f"train.max_steps={total}")
    if not cfg.data.tokenizer:
        p.append("data.tokenizer: empty; a task sequence reads your own shards and needs a tokenizer")
    for field_name in ("train_shards", "val_shards"):
        if getattr(cfg.data, field_name):
            p.append(f"data.{field_name}: {getattr(cfg.data, field_name)!r}, but continual.tasks gives every task "
                     f"its own shards; drop data.{field_name}")
    return p


def _bad_input_problems(d: DataConfig) -> list[str]:
    """The limits of mmscale.data.reading/decode: image size, the bad-input threshold, http retries."""
    from PIL import Image

    p: list[str] = []
    _positive(p, "data.max_image_pixels", d.max_image_pixels)
    _positive(p, "data.max_member_bytes", d.max_member_bytes)
    # PIL refuses to open images over twice its own limit whatever ours says (DecompressionBombError)
    pil_cap = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    if pil_cap and d.max_image_pixels > pil_cap:
        p.append(f"data.max_image_pixels: {d.max_image_pixels} is above what PIL opens at all ({pil_cap} pixels, "
                 f"2 x PIL.Image.MAX_IMAGE_PIXELS); give at most {pil_cap}")
    if not 0 <= d.max_bad_fraction <= 1:
        p.append(f"data.max_bad_fraction: {d.max_bad_fraction!r} must be in [0, 1] (e.g. 0.05; 1 = never stop "
                 f"for bad input)")
    _positive(p, "data.bad_window", d.bad_window)
    _positive(p, "data.http_retries", d.http_retries, 0)
    _positive(p, "data.http_backoff_s", d.http_backoff_s, 0)
    return p


def _source_problems(cfg: JobConfig) -> list[str]:
    """A mixture (`data.sources`): named, weighted sources with shards, instead of `data.train_shards`."""
    d, p = cfg.data, []
    if not d.sources:
        return p
    if d.train_shards:
        p.append(f"data.sources: given with data.train_shards ({d.train_shards!r}); train on one or the other: "
                 f"drop data.train_shards, or add it to data.sources as one more source")
    if cfg.continual.tasks:
        p.append("data.sources: given with continual.tasks, which gives every task its own shards; drop data.sources")
    names = [s.name for s in d.sources]
    for i, s in enumerate(d.sources):
        where = f"data.sources[{i}]"
        if not s.name or s.name in names[:i]:
            p.append(f"{where}.name: {s.name!r}: every source needs a name of its own (it seeds the source's order)")
        if not (isinstance(s.weight, (int, float)) and s.weight > 0):
            p.append(f"{where}.weight: {s.weight!r} must be > 0 (a source gets weight / sum of the weights of the "
                     f"samples); drop the source to leave it out")
        if not s.shards:
            p.append(f"{where}.shards: empty; give the source's shards (a brace pattern, a directory or a list file)")
    return p


def schema_problems(cfg: JobConfig, world_size: int | None = None) -> list[str]:
    """Every problem of `cfg` that the schema alone shows (an empty list when there is none): ranges, choices, fields
    that exclude each other. `world_size` adds the batch arithmetic checks. What needs the packages the config
    describes (registries, files, the tokenizer): mmscale.job.preflight."""
    p: list[str] = []
    d, m, t, ds = cfg.data, cfg.model, cfg.train, cfg.deepspeed
    if not cfg.output_dir:
        p.append("output_dir: must be set, e.g. output_dir=runs/my_job")
    p += _continual_problems(cfg)
    p += _source_problems(cfg)
    if not d.train_shards and not d.sources and d.synthetic_train_samples <= 0 and not cfg.continual.tasks:
        p.append(
            "data.train_shards: empty and data.synthetic_train_samples is 0; give shards "
            "(data.train_shards=path/{000000..000009}.tar) or use the demo data (data.synthetic_train_samples=2000)"
        )
    for name in ("image_size", "max_text_len", "max_images", "samples_per_shard", "warn_every"):
        _positive(p, f"data.{name}", getattr(d, name))
    for name in ("num_workers", "shuffle_buffer", "num_samples", "synthetic_train_samples", "synthetic_val_samples"):
        _positive(p, f"data.{name}", getattr(d, name), 0)
    if len(d.image_mean) != 3 or len(d.image_std) != 3:
        p.append(f"data.image_mean/image_std: need 3 values each (RGB), got {d.image_mean} and {d.image_std}")
    elif any(s <= 0 for s in d.image_std):
        p.append(f"data.image_std: {d.image_std} must all be > 0")
    _positive(p, "data.tokenizer_vocab_size", d.tokenizer_vocab_size, 16)
    p += _bad_input_problems(d)
    # (a run's resolved config names the shards it generated, with synthetic_train_samples still > 0)
    if d.train_shards and d.synthetic_train_samples <= 0 and d.synthetic_task != "shapes":
        p.append(f"data.synthetic_task: {d.synthetic_task!r} applies only to generated data, but data.train_shards "
                 f"({d.train_shards!r}) names your own shards; drop one of the two")

    _choice(p, "model.vision.type", m.vision.type, VISION_TYPES)
    tower_size = m.vision.config.get("image_size")
    fixed_size = m.vision.type in ("clip", "siglip")  # (DINOv2 interpolates its positions; conv towers have none)
    if not m.vision.path and tower_size is not None and fixed_size and tower_size != d.image_size:
        p.append(
            f"data.image_size: {d.image_size} differs from model.vision.config.image_size ({tower_size}), which a "
            f"{m.vision.type} tower requires; set data.image_size={tower_size}"
        )
    if m.vision.type in ("resnet", "convnext") and not m.vision.path:
        p += _conv_stage_problems(m.vision.type, m.vision.config)
    if m.vision.path and not Path(m.vision.path).is_dir():
        p.append(f"model.vision.path: {m.vision.path!r} is not a directory (expected a save_pretrained folder)")
    if m.lm.path and not Path(m.lm.path).is_dir():
        p.append(f"model.lm.path: {m.lm.path!r} is not a directory (expected a save_pretrained folder)")
    for name in ("num_latents", "depth", "heads", "dim_head", "ff_mult"):
        _positive(p, f"model.resampler.{name}", getattr(m.resampler, name))
    for name in ("every_n_layers", "heads", "dim_head", "ff_mult"):
        _positive(p, f"model.xattn.{name}", getattr(m.xattn, name))
    _choice(p, "model.xattn.media_mode", m.xattn.media_mode, ("previous", "all"))
    _choice(p, "model.xattn.backend", m.xattn.backend, ("auto", "triton", "flash", "sdpa"))
    if isinstance(m.xattn.gate_init, (int, float)) and not -10 <= m.xattn.gate_init <= 10:
        p.append(f"model.xattn.gate_init: {m.xattn.gate_init!r} saturates tanh (gradient ~0); use a value in "
                 "[-10, 10], e.g. 0 (Flamingo) or 1")
    for where, value in (("model.lm.dropout", m.lm.dropout), ("model.resampler.dropout", m.resampler.dropout),
                         ("model.xattn.dropout", m.xattn.dropout)):
        if isinstance(value, (int, float)) and not 0 <= value < 1:
            p.append(f"{where}: {value!r} must be in [0, 1), e.g. 0.1 (0 = none)")
    for where, value, flag, on in (("model.lm.train_top_layers", m.lm.train_top_layers, "model.train_lm", m.train_lm),
                                   ("model.vision.train_top_layers", m.vision.train_top_layers, "model.train_vision",
                                    m.train_vision)):
        _positive(p, where, value, 0)
        section = m.lm if where.startswith("model.lm") else m.vision
        known = None if section.path else (section.config.get("num_hidden_layers") if "depths" not in section.config
                                           else len(section.config["depths"]))
        if isinstance(value, int) and isinstance(known, int) and value > known:
            p.append(f"{where}: {value}, but the configured model has {known} layers there; give at most {known}")
        if isinstance(value, int) and value > 0 and not on:
            p.append(f"{where}: {value} trains the top layers of a component {flag}=false freezes; set {flag}=true, "
                     f"or drop {where}")
    for name in ("train_resampler", "train_xattn"):
        _choice(p, f"model.{name}", getattr(m, name), TRAIN_MODES)
    if not (m.train_vision or m.train_lm or m.train_resampler != "frozen" or m.train_xattn != "frozen"):
        p.append("model.train_*: every component is frozen, nothing would train; set e.g. model.train_xattn=full")

    for name in ("global_batch_size", "micro_batch_size", "max_steps", "eval_batches", "keep_checkpoints"):
        _positive(p, f"train.{name}", getattr(t, name))
    for name in ("warmup_steps", "checkpoint_every", "eval_every", "grad_clip", "weight_decay"):
        _positive(p, f"train.{name}", getattr(t, name), 0)
    if isinstance(t.lr, (int, float)) and not t.lr > 0:
        p.append(f"train.lr: {t.lr!r} must be > 0")
    if isinstance(t.min_lr_ratio, (int, float)) and not 0 <= t.min_lr_ratio <= 1:
        p.append(f"train.min_lr_ratio: {t.min_lr_ratio!r} must be in [0, 1]")
    _choice(p, "train.precision", t.precision, ("fp32", "bf16"))
    _choice(p, "train.keep_best_mode", t.keep_best_mode, ("min", "max"))
    _choice(p, "train.on_nonfinite", t.on_nonfinite, ("rollback", "stop"))
    _positive(p, "train.max_nonfinite_steps", t.max_nonfinite_steps)
    if m.num_classes < 0:
        p.append(f"model.num_classes: {m.num_classes} must be >= 0 (0 = no classification head)")
    if isinstance(t.rollback_lr_factor, (int, float)) and not 0 < t.rollback_lr_factor <= 1:
        p.append(f"train.rollback_lr_factor: {t.rollback_lr_factor!r} must be in (0, 1], e.g. 0.5")
    if t.keep_best and not (d.val_shards or d.synthetic_val_samples > 0):
        p.append(f"train.keep_best: {t.keep_best!r} needs validation data (data.val_shards or "
                 "data.synthetic_val_samples) to rank checkpoints by")
    if isinstance(t.global_batch_size, int) and isinstance(t.micro_batch_size, int) and t.micro_batch_size > 0:
        if t.global_batch_size % t.micro_batch_size:
            p.append(
                f"train.global_batch_size: {t.global_batch_size} is not divisible by train.micro_batch_size "
                f"({t.micro_batch_size}); use a multiple of it"
            )
        elif world_size is not None and t.global_batch_size % (t.micro_batch_size * world_size):
            p.append(
                f"train.global_batch_size: {t.global_batch_size} is not divisible by micro_batch_size "
                f"({t.micro_batch_size}) * world_size ({world_size}) = {t.micro_batch_size * world_size}; "
                f"use a multiple of {t.micro_batch_size * world_size}"
            )

    _choice(p, "deepspeed.zero_stage", ds.zero_stage, (0, 1, 2, 3))
    if not ds.collective_timeout_s >= 5:
        p.append(f"deepspeed.collective_timeout_s: {ds.collective_timeout_s} is too short for a collective to "
                 f"complete under load; give at least 5 (seconds; default 600)")
    _choice(p, "deepspeed.offload_optimizer", ds.offload_optimizer, ("none", "cpu"))
    _choice(p, "deepspeed.offload_params", ds.offload_params, ("none", "cpu"))
    if ds.offload_params != "none" and ds.zero_stage != 3:
        p.append(f"deepspeed.offload_params: {ds.offload_params!r} needs deepspeed.zero_stage=3 (got {ds.zero_stage})")
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        p.append("deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1")
    for key, instead in DS_OWNED_KEYS.items():
        section, _, sub = key.partition(".")
        if section in ds.extra and (not sub or (isinstance(ds.extra[section], dict) and sub in ds.extra[section])):
            value = ds.extra[section][sub] if sub else ds.extra[section]
            p.append(f"deepspeed.extra.{key}: {value!r} would put DeepSpeed out of step with the trainer, which "
                     f"derives it from {instead}; set that instead and remove deepspeed.extra.{key}")
    _positive(p, "logging.log_every", cfg.logging.log_every)
    return p


def format_config(cfg: JobConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)
