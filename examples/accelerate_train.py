"""The distopt recipe for Hugging Face Accelerate, on the example char-level LM.

    accelerate launch --config_file launch/accelerate/multi-gpu.yaml examples/accelerate_train.py --zero 2
    ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/accelerate/multi-cpu.yaml \\
        examples/accelerate_train.py --zero 1 --max-steps 50
    accelerate launch --config_file launch/accelerate/deepspeed-zero2.yaml examples/accelerate_train.py

What the recipe does (see docs/integrations.md):
* ``distopt.integrations.accelerate.prepare`` instead of ``accelerator.prepare``: shards with
  distopt ZeRO when ``--zero`` is given (not with a DeepSpeed/FSDP config), and steps the
  schedule once per optimizer step at any number of processes;
* ``accelerator.accumulate`` / ``accelerator.backward`` as usual;
* ``distopt.clip_grad_norm_`` (it knows sharded gradients);
* ``accelerator.save_state`` / ``load_state`` save and restore distopt's sharded state completely.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lm import DEFAULT_CORPUS, CharData, ModelConfig, TinyGPT  # noqa: E402

import distopt  # noqa: E402
from distopt.integrations.accelerate import kwargs_handlers, prepare  # noqa: E402
from distopt.optim import create_optimizer_v2  # noqa: E402
from distopt.schedules import get_scheduler  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optim", default="adamw")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=0, help="distopt ZeRO stage")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--save-dir", type=Path, default=None, help="accelerator.save_state at the end")
    p.add_argument("--resume", type=Path, default=None, help="accelerator.load_state first")
    args = p.parse_args(argv)

    # kwargs_handlers(): a gloo process group when there is no GPU (CPU runs, the tests)
    accelerator = Accelerator(gradient_accumulation_steps=args.accum_steps, kwargs_handlers=kwargs_handlers())
    if accelerator.distributed_type == "DEEPSPEED":  # DeepSpeed's config decides these
        args.zero = 0
        args.accum_steps = accelerator.gradient_accumulation_steps
        args.batch_size = accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"]
    data = CharData.from_file(DEFAULT_CORPUS)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=data.vocab_size, seq_len=args.seq_len, d_model=args.d_model,
                      n_layer=args.n_layer, n_head=2)
    model = TinyGPT(cfg)
    optimizer = create_optimizer_v2(model, opt=args.optim, lr=args.lr, weight_decay=0.1)
    scheduler = get_scheduler(args.schedule, optimizer, num_warmup_steps=args.max_steps // 10,
                              num_training_steps=args.max_steps)
    model, optimizer, scheduler = prepare(accelerator, model, optimizer, scheduler,
                                          zero_stage=args.zero or None)
    start = 0
    if args.resume is not None:
        accelerator.load_state(args.resume)
        start = scheduler.scheduler.last_epoch if hasattr(scheduler, "scheduler") else 0

    rank, world = accelerator.process_index, accelerator.num_processes
    first = last = None
    for step in range(start, args.max_steps):
        for micro in range(args.accum_steps):
            x, y = data.batch(step, args.batch_size, args.seq_len, rank, world, micro_step=micro,
                              device=accelerator.device)
            with accelerator.accumulate(model):
                loss = model(x, y)
                accelerator.backward(loss)
                if accelerator.sync_gradients and accelerator.distributed_type != "DEEPSPEED":
                    distopt.clip_grad_norm_(model, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        last = accelerator.reduce(loss.detach(), reduction="mean").item()
        first = last if first is None else first
    if args.save_dir is not None:
        accelerator.save_state(args.save_dir)
    accelerator.print(f"final: steps={args.max_steps} loss={last:.4f} first_loss={first:.4f} "
                      f"lr={optimizer.param_groups[0]['lr']:.3e} mode={accelerator.distributed_type} "
                      f"zero={args.zero} world={world}")
    accelerator.end_training()
    return {"loss": last, "first_loss": first}


if __name__ == "__main__":
    main()
