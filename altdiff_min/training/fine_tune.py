"""`altdiff-min train MODEL DATA OUT_DIR`: a model folder and data → a run folder (run.json, the loss
log and curve, checkpoints, samples, the model), and `--resume`: the same sums or a reason.
"""
from __future__ import annotations

import dataclasses
import os
from contextlib import ExitStack

import torch

from ..errors import BadValue
from ..storage.files import locked, make_folder
from . import run_folder, words
from .config import PRECISION, SAME_ON_RESUME, TrainConfig, flag, recorded_settings
from .distributed import World, barrier, join_world, leave_world, on_rank0
from .lora import check_targets
from .train import train


def check_batch(cfg: TrainConfig, processes: int, examples: int) -> None:
    """`altdiff-min train`: a global batch holds each example at most once, no larger than the data
    (the loop itself reads the data stream epoch after epoch; the toy recipe's small worlds rely on it)."""
    if cfg.global_batch(processes) > examples:
        raise BadValue(f"the global batch {describe_batch(cfg, processes)} is larger than the data's {examples} "
                       f"example(s): lower --batch-size or --grad-accum")


def describe_batch(cfg: TrainConfig, processes: int) -> str:
    return (f"{cfg.global_batch(processes)} (batch {cfg.batch_size} × {processes} process(es) "
            f"× {cfg.grad_accum} accumulation)")


def check_resume(recorded: dict, cfg: TrainConfig, world: World, run: dict) -> None:
    """A resumed run must do the same sums: same base model and data, the same settings, the same global batch."""
    settings = recorded_settings(recorded["config"])
    old = {n: settings.get(n, getattr(TrainConfig, n)) for n in SAME_ON_RESUME}  # one added since: its default
    if changed := [f"{flag(n)} {old[n]} → {getattr(cfg, n)}" for n in SAME_ON_RESUME if old[n] != getattr(cfg, n)]:
        raise BadValue(f"--resume: the run was started with other settings ({'; '.join(changed)}); resume with the "
                       f"same ones, or start a new run")

    def but_content(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "content"}

    for key in ("model", "data"):
        was, now = recorded[key], run[key]
        if key == "data" and "content" not in was:  # recorded before the content's hash was kept
            now = but_content(now)
        if key == "model":  # a run recorded before a hash was kept (weights_sha256) compares what it kept
            now = {k: now.get(k) for k in was}
        if was != now:
            why = " (the same folder, but other captions or files)" if key == "data" and but_content(was) == \
                but_content(now) else ""
            raise BadValue(f"--resume: the run's {key} was {was}, now {now}{why}; a resumed run must read the same")
    if recorded["global_batch"] != cfg.global_batch(world.size):
        raise BadValue(f"--resume: the run's global batch is {recorded.get('batch', recorded['global_batch'])}, this one "
                       f"would be {describe_batch(cfg, world.size)}: with {world.size} process(es) choose --batch-size "
                       f"and --grad-accum whose product is {recorded['global_batch'] / world.size:g}, or the sums change")


def fine_tune(model_path: str, data: str, out_dir: str, cfg: TrainConfig, resolution: int | None = None,
              device: str | torch.device = "cpu", resume: bool = False, force: bool = False,
              progress: bool = True) -> str:
    """`altdiff-min train MODEL DATA OUT_DIR`: fine-tune a model folder ("toy" or a converted m9) on
    DATA (a captioned folder, or "toy") into the run folder OUT_DIR; returns OUT_DIR/model, the result;
    with cfg.lora, OUT_DIR/lora/pytorch_lora_weights.safetensors instead (the LoRA alone, its metadata
    naming the base model); with --train embeddings, OUT_DIR/learned_embeds.safetensors (training/words.py),
    and the LoRA file beside it when cfg.lora too. Under torchrun every process calls this; rank 0
    checks and writes, the others follow.
    Everything is checked before the model is loaded: the settings, the model folder, OUT_DIR, the data."""
    from safetensors import SafetensorError

    from ..arguments import check_device, check_size
    from ..pipeline import load
    from ..storage.folder import fingerprint, read_config
    from ..storage.provenance import environment
    from . import mixing, objectives, prior
    from .dataset import NAMED, CaptionedFolder

    world = join_world(check_device(device))
    try:
        with ExitStack() as stack:
            sources = mixing.parse(data)  # a bad DATA list is one line before anything is read
            config = read_config(model_path)
            native = mixing.native_resolution(sources, NAMED, config.get("image_size", 512))  # the toy world: 64 px
            resolution = native if resolution is None else resolution
            try:
                check_size(resolution, resolution, config["vae"], config["unet"])
            except BadValue as e:
                raise BadValue(f"--resolution {resolution} does not fit {model_path}: {e}") from None
            if cfg.lora:
                check_targets(config, cfg)
            objectives.check_prediction(cfg, config["schedule"])
            words.check(model_path, config, cfg)
            out_dir = os.path.abspath(out_dir)

            def claim() -> dict | None:
                make_folder(os.path.dirname(out_dir), "OUT_DIR")
                stack.enter_context(locked(out_dir))  # held until the run ends
                return run_folder.prepare(out_dir, force, resume)

            dataset = on_rank0(world, lambda: mixing.open_sources(data, resolution, progress))  # before OUT_DIR is touched
            check_batch(cfg, world.size, len(dataset))
            words.check_captions(cfg, dataset)
            recorded = on_rank0(world, claim)
            model_record = fingerprint(model_path)
            run = {"format": run_folder.FORMAT, "model": model_record, "data": dataset.describe(),
                   "config": dataclasses.asdict(cfg), "world_size": world.size,
                   "global_batch": cfg.global_batch(world.size), "batch": describe_batch(cfg, world.size),
                   **({"class_images": prior.record(cfg, resolution)} if cfg.class_images else {})}

            # What made the run: altdiff-min's version and git commit, torch's, the device and its name,
            # the dtype the forward pass computes in (the weights and the optimizer are fp32), the threads.
            env = environment(world.device, PRECISION[cfg.mixed_precision] or torch.float32)
            run["environment"] = env

            def record() -> None:
                if recorded:
                    check_resume(recorded, cfg, world, run)
                    # the start's environment stays; each resume adds the one it runs in
                    run["environment"] = recorded.get("environment") or env
                    run["resumed"] = [*recorded.get("resumed", []), {"environment": env}]
                run_folder.write_json(os.path.join(out_dir, run_folder.RUN), run)
                if getattr(dataset, "skipped", None):  # (record runs on rank 0)
                    print(f"data: {len(dataset)} examples; skipped {dataset.report()}")

            on_rank0(world, record)
            model = load(model_path, device=world.device, dtype=torch.float32)
            if cfg.class_images:  # DreamBooth: the base model draws the class pictures (those missing) first
                folder = on_rank0(world, lambda: prior.class_folder(out_dir))
                prior.draw_class_images(model, out_dir, cfg, resolution, model_record, progress, world.rank, world.size)
                barrier(world)
                on_rank0(world, lambda: prior.write_metadata(folder, cfg))
                dataset = prior.WithClasses(dataset, on_rank0(world, lambda: CaptionedFolder(folder, resolution)))
            words.start(model, cfg)
            losses = train(model, dataset, cfg, out_dir, world, resume=recorded is not None, progress=progress)
            made = {"base": model_record, "data": run["data"], "config": run["config"], "global_batch": run["global_batch"],
                    "steps": cfg.max_steps, "weights": "ema" if cfg.ema else "last",
                    "final_loss": losses[-1] if losses else None, "environment": env}
            if cfg.lora:  # the LoRA alone, atomically (a failed write keeps the previous file)
                from weights_convert.lora import FILE, save_lora

                folder = os.path.join(out_dir, run_folder.LORA)
                text = model.text_encoder if "text_encoder" in cfg.lora_modules else None  # `text_encoder.` keys too
                lora = save_lora(model.unet, folder, record={"train": made}, text_encoder=text) if world.rank == 0 \
                    else os.path.join(folder, FILE)
            if cfg.train == "embeddings":  # new words (a LoRA beside them): their file is the result
                return words.save(model, cfg, out_dir, world.rank)
            if cfg.lora:
                return lora
            result = os.path.join(out_dir, run_folder.MODEL)
            if world.rank == 0:
                try:  # a failed write (a full disk) leaves the previous OUT_DIR/model as it was (folder.write_folder)
                    model.save(result, force=True, train=made)
                except (RuntimeError, SafetensorError) as e:  # safetensors' and torch's write errors are not OSErrors
                    raise run_folder.write_failed(os.path.join(result, "model.safetensors"), e) from None
            return result
    finally:
        leave_world(world)
