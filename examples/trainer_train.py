"""The distopt recipe for ``transformers.Trainer``: a tiny GPT-2, built in code, on the example corpus.

    torchrun --nproc-per-node 2 examples/trainer_train.py --optim lamb --zero 2
    bash launch/trainer.sh --optim adafactor --zero 1 --max-steps 50        # same, via torchrun
    LAUNCHER=accelerate bash launch/trainer.sh --zero 2                      # accelerate launch
    python examples/trainer_train.py --zero 2 --max-steps 20                 # one process

``DistoptTrainer`` (distopt.integrations.transformers) is the Trainer with: a distopt optimizer
named by ``--optim`` (any name of ``distopt.optim.list_optimizers()``), the distopt schedule named
by ``lr_scheduler_type``, distopt ZeRO (``--zero 1|2``; ``--zero 0``: the Trainer's DDP), gradient
accumulation normalised by the global token count, and checkpoints (``--save-steps``) that hold
the complete sharded optimizer state next to the Trainer's ``model.safetensors``.  ``--resume``
continues from the newest checkpoint in ``--output-dir``, at any number of processes.  No
downloads: the model is ``GPT2LMHeadModel(GPT2Config(...))`` and the data are character windows
of examples/data/corpus.txt.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lm import DEFAULT_CORPUS, CharData  # noqa: E402

from distopt.integrations.transformers import DistoptTrainer  # noqa: E402


class Windows(torch.utils.data.Dataset):
    """Fixed, non-overlapping character windows of the corpus, as causal-LM samples.

    Every 7th sample has its last quarter of labels masked (-100), so token counts differ
    between batches: the loss is normalised by the number of real tokens across all ranks.
    """

    def __init__(self, data: CharData, seq_len: int) -> None:
        self.ids, self.seq_len = data.ids, seq_len
        self.n = (len(data) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.ids[i * self.seq_len : (i + 1) * self.seq_len].clone()
        labels = x.clone()
        if i % 7 == 0:
            labels[-(self.seq_len // 4) :] = -100
        return {"input_ids": x, "labels": labels}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optim", default="lamb", help="a distopt optimizer name (list_optimizers())")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--schedule", default="cosine", help="TrainingArguments.lr_scheduler_type")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: max-steps // 10")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=2, help="0: the Trainer's DDP")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="GPT-2's dropouts (0: a run resumed at another world size repeats the numbers)",
    )
    p.add_argument(
        "--output-dir",
        "--save-dir",
        dest="output_dir",
        type=Path,
        default=Path("runs/trainer"),
        help="checkpoints go here (--save-dir: the name launch/train.sh looks for)",
    )
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    data = CharData.from_file(DEFAULT_CORPUS)
    config = transformers.GPT2Config(
        vocab_size=data.vocab_size,
        n_positions=args.seq_len,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=2,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    model = transformers.GPT2LMHeadModel(config)
    targs = transformers.TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accum_steps,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.schedule,
        warmup_steps=args.max_steps // 10 if args.warmup_steps is None else args.warmup_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        logging_steps=args.log_every,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        data_seed=args.seed,  # the shuffling order does not depend on the world size
        disable_tqdm=True,
    )
    trainer = DistoptTrainer(
        model=model,
        args=targs,
        train_dataset=Windows(data, args.seq_len),
        optim=args.optim,
        zero_stage=args.zero or None,
    )
    resume = None
    if args.resume:
        resume = transformers.trainer_utils.get_last_checkpoint(str(args.output_dir))
    out = trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    first = losses[0] if losses else float("nan")
    if trainer.is_world_process_zero():
        print(
            f"final: steps={out.global_step} loss={losses[-1] if losses else float('nan'):.4f} "
            f"first_loss={first:.4f} samples/s={out.metrics.get('train_samples_per_second', 0):.1f} "
            f"time={out.metrics.get('train_runtime', 0):.1f}s optim={args.optim} zero={args.zero} "
            f"world={trainer.args.world_size} resumed_from={resume}",
            flush=True,
        )
    return {"steps": out.global_step, "losses": losses, "resumed_from": resume}


if __name__ == "__main__":
    main()
