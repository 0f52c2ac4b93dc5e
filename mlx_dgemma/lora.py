"""``python -m mlx_dgemma.lora``: LoRA, DoRA, QLoRA or full fine-tuning of DiffusionGemma.

mlx-lm's command line (``mlx_lm.lora``: the same flags, ``-c config.yaml``, data folders
and adapter files) with DiffusionGemma's training objective (see ``mlx_dgemma.tuner``).

Defaults that mlx-lm's CLI fixes are kept (``--optimizer adam``, ``--learning-rate 1e-5``,
``--batch-size 4``, ``--iters 1000``). Where it fixes none, the NeMo AutoModel recipe's
values apply: LoRA on attention and the dense MLP of every layer, rank 16, alpha 32
(``scale`` 2.0); Adam(W) betas (0.95, 0.99), eps 1e-8, AdamW weight decay 1e-4; 25
warm-up steps then a cosine decay to a tenth of the learning rate; gradient norm clipped
at 1.0; encoder loss weight 1.0; self-conditioning probability 0.5.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import types
from pathlib import Path
from typing import List, Optional
from .errors import UsageError  # noqa: F401  (raised here; defined with the others)

CONFIG_DEFAULTS = {
    "model": None,
    "train": False,
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "optimizer_config": {
        "adam": {"betas": [0.95, 0.99], "eps": 1e-8},
        "adamw": {"betas": [0.95, 0.99], "eps": 1e-8, "weight_decay": 1e-4},
        "muon": {},
        "sgd": {},
        "adafactor": {},
    },
    "data": "data",
    "seed": 0,
    "num_layers": -1,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "learning_rate": 1e-5,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "save_every": 100,
    "test": False,
    "test_batches": 500,
    "max_seq_length": 2048,
    "config": None,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "clear_cache_threshold": 0,
    "lr_schedule": "default",  # the recipe's warm-up + cosine; "constant", or mlx-lm's schedule config
    "warmup_steps": 25,
    "lora_parameters": None,  # the recipe's (tuner.utils.DEFAULT_LORA), keys overridable
    "lora_experts": False,
    "encoder_loss_weight": 1.0,
    "self_conditioning_p": 0.5,
    "grad_clip": 1.0,
    "weight_average_decay": 0.0,  # off; e.g. 0.998 keeps a moving average of the weights (tuner.weight_average)
    "plot": True,
    "report_to": None,
    "project_name": None,
}


def build_parser():
    """mlx-lm's parser, plus the diffusion settings."""
    import argparse

    from mlx_lm.lora import build_parser as mlx_lm_parser

    parser = mlx_lm_parser()
    parser.description = "LoRA, DoRA, QLoRA or full fine-tuning of DiffusionGemma with its training objective."
    parser.add_argument("--lora-experts", action="store_true", default=None,
                        help="Also adapt the routed experts (LoRASwitchLinear).")
    parser.add_argument("--encoder-loss-weight", type=float,
                        help="Weight of the encoder's next-token loss (1.0; 0 skips computing it).")
    parser.add_argument("--self-conditioning-p", type=float, help="Per-example self-conditioning probability (0.5).")
    parser.add_argument("--grad-clip", type=float, help="Clip the gradient norm at this value, 0 for off (1.0).")
    parser.add_argument("--warmup-steps", type=int, help="Warm-up steps of the default schedule (25).")
    parser.add_argument("--weight-average-decay", type=float,
                        help="Also keep a moving average of the trained weights with this decay (e.g. 0.998; 0: off), "
                             "saved with every save as the adapter folder ADAPTER_PATH/average: give that folder "
                             "to --adapter-path of generate, fuse or --test to use it.")
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None,
                        help="Write loss.png (and losses.json) beside the adapters (default: on).")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> types.SimpleNamespace:
    """Command line over ``-c`` YAML over the defaults (mlx-lm's precedence)."""
    import yaml
    from mlx_lm.lora import yaml_loader

    args = vars(build_parser().parse_args(argv))
    if args.get("config"):
        path = Path(args["config"])
        try:
            config = yaml.load(path.read_text(), yaml_loader)
        except OSError as e:
            raise UsageError(f"-c {path}: cannot be read ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise UsageError(f"-c {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise UsageError(f"-c {path}: expected a mapping of option names to values")
        unknown = sorted(k for k in config if k not in CONFIG_DEFAULTS and k not in args
                         and k not in ("hf_dataset", "prompt_feature", "completion_feature", "chat_feature",
                                       "text_feature", "fill_token_id", "pad_to"))
        if unknown:
            raise UsageError(f"-c {path}: unknown option {unknown[0]!r}")
        for k, v in config.items():
            if args.get(k) is None:
                args[k] = v
    for k, v in CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = copy.deepcopy(v)
    return types.SimpleNamespace(**args)


def check_args(args) -> None:
    if not args.model:
        raise UsageError("--model is required (a DiffusionGemma folder, converted or Hugging Face)")
    if not (args.train or args.test):
        raise UsageError("nothing to do: give --train, --test or both")
    for name in ("batch_size", "iters", "steps_per_report", "steps_per_eval", "save_every",
                 "grad_accumulation_steps", "max_seq_length"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.self_conditioning_p <= 1:
        raise UsageError(f"--self-conditioning-p must be in [0, 1], got {args.self_conditioning_p}")
    if not 0 <= args.weight_average_decay < 1:
        raise UsageError(f"--weight-average-decay must be in [0, 1) (0: off), got {args.weight_average_decay}")
    if args.fine_tune_type not in ("lora", "dora", "full"):
        raise UsageError(f"--fine-tune-type must be lora, dora or full, got {args.fine_tune_type!r}")
    if args.resume_adapter_file is not None and not Path(args.resume_adapter_file).is_file():
        raise UsageError(f"--resume-adapter-file {args.resume_adapter_file}: no such file")
    if not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: not a folder (expected train.jsonl, valid.jsonl, test.jsonl in it)")


def lora_parameters(args) -> dict:
    from .tuner.utils import DEFAULT_LORA, EXPERT_KEYS

    params = {**copy.deepcopy(DEFAULT_LORA), **(args.lora_parameters or {})}
    if args.lora_experts:
        params["keys"] = list(params["keys"]) + [k for k in EXPERT_KEYS if k not in params["keys"]]
    if "alpha" in params and "scale" not in (args.lora_parameters or {}):
        params["scale"] = params.pop("alpha") / params["rank"]
    checks = (("rank", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("scale", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
              ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)"),
              ("keys", lambda v: isinstance(v, list) and v and all(isinstance(k, str) for k in v),
               "a list of module names such as self_attn.q_proj"))
    for key, ok, what in checks:
        if not ok(params.get(key)):
            raise UsageError(f"lora_parameters.{key}: expected {what}, got {params.get(key)!r}")
    return params


def build_optimizer(args, optimizer_steps: int):
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import build_schedule

    schedule = args.lr_schedule
    if schedule in ("constant", "none"):
        schedule = None
    elif schedule == "default":
        warmup = min(args.warmup_steps, max(optimizer_steps - 1, 0))
        schedule = {"name": "cosine_decay", "warmup": warmup,
                    "arguments": [args.learning_rate, max(optimizer_steps - warmup, 1), args.learning_rate / 10]}
    lr = build_schedule(schedule) if schedule else args.learning_rate
    classes = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
               "adafactor": optim.Adafactor}
    name = args.optimizer.lower()
    if name not in classes:
        raise UsageError(f"--optimizer must be one of {', '.join(classes)}, got {args.optimizer!r}")
    return classes[name](learning_rate=lr, **(args.optimizer_config or {}).get(name, {}))


def training_args(args, adapter_file: Path):
    from .tuner.trainer import TrainingArgs

    extra = {k: getattr(args, k) for k in ("fill_token_id", "pad_to") if getattr(args, k, None) is not None}
    return TrainingArgs(
        batch_size=args.batch_size, iters=args.iters, val_batches=args.val_batches,
        steps_per_report=args.steps_per_report, steps_per_eval=args.steps_per_eval,
        steps_per_save=args.save_every, adapter_file=str(adapter_file), max_seq_length=args.max_seq_length,
        grad_checkpoint=bool(args.grad_checkpoint), grad_accumulation_steps=args.grad_accumulation_steps,
        clear_cache_threshold=args.clear_cache_threshold, encoder_loss_weight=args.encoder_loss_weight,
        self_conditioning_p=args.self_conditioning_p, grad_clip=args.grad_clip, seed=args.seed, **extra,
    )


def write_plot(history: List[dict], folder: Path) -> Optional[Path]:
    """loss.png (train total / diffusion / encoder, validation total) and losses.json."""
    train = [h for h in history if "train_loss" in h]
    val = [h for h in history if "val_loss" in h]
    (folder / "losses.json").write_text(json.dumps(history, indent=1))
    if not train and not val:
        return None
    try:
        import matplotlib
    except ImportError:
        print("loss.png needs matplotlib (pip install 'mlx-dgemma[train]'); wrote losses.json only")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    it = [h["iteration"] for h in train]
    for key, label, style in (("train_loss", "train (total)", "-"), ("diffusion_loss", "train diffusion", "--"),
                              ("encoder_loss", "train encoder", ":")):
        if train:
            ax.plot(it, [h[key] for h in train], style, label=label)
    if val:
        ax.plot([h["iteration"] for h in val], [h["val_loss"] for h in val], "o-", label="validation (total)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("DiffusionGemma fine-tuning")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = folder / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(args) -> int:
    import mlx.core as mx
    import numpy as np

    from .loader import load
    from .tuner.datasets import load_dataset
    from .tuner.trainer import evaluate, train
    from .tuner.utils import (check_adapter_weights, load_adapters, read_adapter_weights, save_adapter_config,
                              setup_fine_tuning)

    check_args(args)
    world = mx.distributed.init()
    rank = world.rank()
    say = print if rank == 0 else (lambda *a, **k: None)
    np.random.seed(args.seed)
    mx.random.seed(args.seed)  # the same LoRA initialisation on every process

    say("Loading pretrained model", flush=True)
    model, tokenizer = load(args.model)
    say("Loading datasets", flush=True)
    train_set, valid_set, test_set = load_dataset(args, tokenizer)
    if getattr(args, "fill_token_id", None) is None and tokenizer.eos_token_id is not None:
        args.fill_token_id = int(tokenizer.eos_token_id)
    adapter_path = Path(args.adapter_path)
    adapter_file = adapter_path / "adapters.safetensors"
    targs = training_args(args, adapter_file)

    if args.train:
        args.lora_parameters = None if args.fine_tune_type == "full" else lora_parameters(args)
        try:
            setup_fine_tuning(model, args.fine_tune_type, args.num_layers, args.lora_parameters)
        except (ValueError, KeyError) as e:  # --num-layers out of range, DoRA on experts
            raise UsageError(str(e).strip("'")) from None
        if args.resume_adapter_file is not None:
            weights = read_adapter_weights(args.resume_adapter_file)
            check_adapter_weights(model, weights, args.resume_adapter_file, full=args.fine_tune_type == "full")
            say(f"Loading fine-tuned weights from {args.resume_adapter_file}", flush=True)
            model.load_weights(list(weights.items()), strict=False)
        if rank == 0:
            from mlx_lm.tuner.utils import print_trainable_parameters

            print_trainable_parameters(model)  # counts quantized weights as the floats they stand for
        if rank == 0:
            save_adapter_config(vars(args), model, adapter_path / "adapter_config.json")
        optimizer = build_optimizer(args, math.ceil(args.iters / args.grad_accumulation_steps))
        average, on_save = _weight_average(args, model, adapter_path, rank)
        say("Training", flush=True)
        history: List[dict] = []
        try:
            train(model, optimizer, train_set, valid_set or None, targs, _callback(args, history), on_save=on_save,
                  weight_average=average)
        except KeyboardInterrupt:
            if args.plot and rank == 0:
                write_plot(history, adapter_path)
            return 130
        if args.plot and rank == 0:
            png = write_plot(history, adapter_path)
            if png:
                say(f"Loss curves: {png}")
    elif args.test:
        if args.adapter_path:
            load_adapters(model, adapter_path)

    if args.test:
        say("Testing", flush=True)
        r = evaluate(model, test_set, args.batch_size, args.test_batches, targs)
        say(f"Test loss {r['loss']:.3f} (diffusion {r['diffusion']:.3f}, encoder {r['encoder']:.3f}), "
            f"Test ppl {math.exp(min(r['loss'], 50)):.3f}.")
    return 0


def _weight_average(args, model, adapter_path: Path, rank: int):
    """The moving average of the weights (``--weight-average-decay``) and the save hook that
    writes it, with every save of the weights, as an adapter folder of its own
    (ADAPTER_PATH/average: the run's adapter_config.json and the averaged tensors), so that
    everything that reads adapters reads it. A resumed run starts a new average."""
    if not args.weight_average_decay:
        return None, None
    from .tuner import WeightAverage
    from .tuner.utils import ADAPTER_FILE, CONFIG_FILE, atomic_write

    average = WeightAverage(model, args.weight_average_decay)
    folder = adapter_path / "average"

    def save(total: int) -> None:
        if rank != 0:
            return
        folder.mkdir(parents=True, exist_ok=True)
        config = (adapter_path / CONFIG_FILE).read_text()
        atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config))
        average.save(folder / ADAPTER_FILE, iteration=total)

    return average, save


def _callback(args, history: List[dict]):
    """Keeps the reports for the plot; forwards them to --report-to services."""
    from mlx_lm.tuner.callbacks import TrainingCallback, get_reporting_callbacks

    inner = None
    if args.report_to:
        inner = get_reporting_callbacks(args.report_to, project_name=args.project_name,
                                        log_dir=args.adapter_path, config=vars(args))

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            history.append(dict(info))
            if inner is not None:
                inner.on_train_loss_report(info)

        def on_val_loss_report(self, info):
            history.append(dict(info))
            if inner is not None:
                inner.on_val_loss_report(info)

    return Record()


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import ConfigError, WeightsError
    from .tuner.datasets import DataError
    from .tuner.utils import AdapterError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        return run(parse_args(argv))
    except (UsageError, DataError, AdapterError, ConfigError, WeightsError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
