"""lit-distill: distill a softmax DiT teacher into a LiT / EDiT / MM-EDiT student.

    lit-distill --teacher pixart-sigma/ --family lit --data images/ --out runs/lit --steps 10000
    torchrun --nproc_per_node 8 -m litedge.cli.distill ...   # several GPUs

Thin: arguments -> DistillConfig -> litedge.distill.distill().
"""

from __future__ import annotations

import argparse
import sys

from litedge.cli import THIRD_PARTY, HelpFormatter, add_common_args, parse_args, run_command
from litedge.extras import DISTILL, require


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-distill", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher pipeline directory (or transformer directory / checkpoint)")
    p.add_argument("--family", required=True, choices=["lit", "edit", "mmedit"],
                   help="student family: lit or edit (PixArt / DiT teachers), mmedit (SD3 teachers)")
    p.add_argument("--data", required=True, help="image folder with .txt captions, a .jsonl, class folders, or a feature cache")
    p.add_argument("--out", required=True, help="run directory (checkpoints, losses, student/)")
    p.add_argument("--resolution", type=int, default=256, help="training image size in pixels")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps; --resume continues up to this count")
    p.add_argument("--batch", type=int, default=4, help="images per step and process (the global batch is this x processes)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant over the run")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--task-weight", type=float, default=1.0, help="weight of the task loss (eps MSE + VLB, or flow MSE)")
    p.add_argument("--lambda-noise", type=float, default=0.5, help="weight of MSE(student eps, teacher eps)")
    p.add_argument("--lambda-var", type=float, default=0.05, help="weight of MSE(student var, teacher var)")
    p.add_argument("--feature-weight", type=float, default=0.0, help="weight of attention-output distillation")
    p.add_argument("--ema", type=float, default=0.9999,
                   help="EMA decay of the student weights, ramped up as min(ema, (1+step)/(10+step)); 0 disables")
    p.add_argument("--save-every", type=int, default=500, help="write a checkpoint every this many steps (and at the end)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new attention weights, data order and noise")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--freeze-inherited-steps", type=int, default=0,
                   help="train only the new attention weights for this many first steps")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="training compute precision")
    p.add_argument("--init", choices=["inherit", "scratch"], default="inherit",
                   help="inherit: the teacher's weights except the new attention; scratch: every weight random")
    p.add_argument("--allow-missing-captions", action="store_true", help="an image without a caption gets an empty one")
    p.add_argument("--heads", type=int, default=None, help="linear attention heads (default: the family's)")
    p.add_argument("--text-max-length", type=int, default=300, help="caption tokens kept (PixArt-Sigma trains with 300)")
    p.add_argument("--student-weights", choices=["ema", "raw"], default="ema", help="weights written to OUT/student/")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (-q implies it)")
    return add_common_args(p)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)

    def body() -> int:
        require("lit-distill", DISTILL, "distill")  # before torch is imported: one line naming the extra
        from litedge.distill import DistillConfig, distill

        config = DistillConfig(
            teacher=args.teacher, family=args.family, data=args.data, out=args.out, resolution=args.resolution,
            steps=args.steps, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay, task_weight=args.task_weight,
            lambda_noise=args.lambda_noise, lambda_var=args.lambda_var, feature_weight=args.feature_weight,
            ema=args.ema, save_every=args.save_every, seed=args.seed, resume=args.resume,
            freeze_inherited_steps=args.freeze_inherited_steps, grad_checkpointing=args.grad_checkpointing,
            precision=args.precision, init=args.init, allow_missing_captions=args.allow_missing_captions,
            heads=args.heads, text_max_length=args.text_max_length, student_weights=args.student_weights,
            deterministic=args.deterministic, device=args.device, progress=not (args.no_progress or args.quiet),
        )
        result = distill(config)
        if result.student_dir is not None:  # rank 0
            losses = ", ".join(f"{k} {v:.4g}" for k, v in result.losses.items())
            print(f"lit-distill: step {result.step}; {losses or 'no new steps'}")
            if result.skipped_images:
                print(f"lit-distill: {len(result.skipped_images)} image(s) skipped (failed to decode)")
            print(f"lit-distill: student written to {result.student_dir}")
        return 0

    return run_command("lit-distill", body, args, THIRD_PARTY)


if __name__ == "__main__":
    sys.exit(main())
