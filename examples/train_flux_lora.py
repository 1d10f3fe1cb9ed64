"""LoRA fine-tuning of a Flux transformer with accelerate + DeepSpeed ZeRO-2.

Written the way Flux training scripts are usually written (x-flux / FluxKits / diffusers'
train_dreambooth_lora_flux.py): accelerate drives the loop, DeepSpeed comes from the accelerate
environment (`accelerate launch --config_file ...`, or `ACCELERATE_USE_DEEPSPEED=true` +
`ACCELERATE_DEEPSPEED_CONFIG_FILE=...`) or from `--deepspeed_config PATH`, LoRA adapters come from
peft, the loss is rectified-flow matching, checkpoints are `accelerator.save_state` folders named
`checkpoint-<step>` and `--resume_from_checkpoint latest` picks the newest one up.

Checkpoints are crash-safe: every rank saves into `checkpoint-<step>.partial`, and only when all
have finished does the main process write a COMPLETE marker and rename the folder to
`checkpoint-<step>`. A run killed during a save therefore leaves a `.partial` folder (removed by the
next save of that step) and never a `checkpoint-<step>` that looks finished; `latest` is the newest
folder with the marker, and any other `checkpoint-<step>` (e.g. an empty one left by an older
version of this script) is skipped with a message.

So that it runs anywhere without downloads, the model is a random-init *tiny*
`FluxTransformer2DModel` and the data set is a fixed set of random "cached latents" with their
noise and timesteps drawn once: a small, learnable regression problem whose loss falls within a
few steps. Swap in real latents, text embeddings and a real checkpoint for actual training.

    accelerate launch --config_file configs/accelerate_zero2_lora.yaml examples/train_flux_lora.py --output_dir out
    accelerate launch ... examples/train_flux_lora.py --output_dir out --max_train_steps 12 \
        --resume_from_checkpoint latest
"""

import argparse
import json
import os
import re
import shutil
import signal

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from torch.utils.data import DataLoader, Dataset

TINY_FLUX = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LoRA fine-tuning of a (tiny, random-init) Flux transformer.")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_train_steps", type=int, default=6)
    p.add_argument("--checkpointing_steps", type=int, default=3)
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-<step> folder or 'latest'")
    p.add_argument("--learning_rate", type=float, default=1e-2)
    p.add_argument("--train_batch_size", type=int, default=2)
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deepspeed_config", default=None,
                   help="DeepSpeed JSON; default: the accelerate environment (ACCELERATE_DEEPSPEED_CONFIG_FILE)")
    return p.parse_args(argv)


class CachedLatents(Dataset):
    """Random packed latents (B, H*W, C), text states, pooled text, noise and timesteps, drawn once."""

    def __init__(self, n, height=4, width=4, txt_len=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        c, d = TINY_FLUX["in_channels"], TINY_FLUX["joint_attention_dim"]
        self.latents = torch.randn(n, height * width, c, generator=g)
        self.noise = torch.randn(n, height * width, c, generator=g)
        self.t = torch.sigmoid(torch.randn(n, generator=g))  # logit-normal timesteps, as in SD3 / Flux
        self.txt = torch.randn(n, txt_len, d, generator=g)
        self.pooled = torch.randn(n, TINY_FLUX["pooled_projection_dim"], generator=g)
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        self.img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
        self.txt_ids = torch.zeros(txt_len, 3)

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return dict(latents=self.latents[i], noise=self.noise[i], t=self.t[i], txt=self.txt[i], pooled=self.pooled[i])


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MARKER = "COMPLETE"  # written last, just before the rename; its presence means every rank saved
# Test hook (tests/test_checkpoint_resume.py): "STEP:RANK" makes that rank SIGKILL itself inside the
# save of that step, after writing its part: a deterministic crash in the middle of a checkpoint.
CRASH_IN_SAVE = "FLUX_NPU_EXAMPLE_CRASH_IN_SAVE"


def save_checkpoint(accelerator, output_dir, step):
    """accelerator.save_state into checkpoint-<step>.partial, then mark complete and rename."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = final + ".partial"
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)  # left by a run killed while saving this step
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)  # every rank: ZeRO shards live on each
    if os.environ.get(CRASH_IN_SAVE) == f"{step}:{accelerator.process_index}":
        os.kill(os.getpid(), signal.SIGKILL)
    accelerator.wait_for_everyone()  # all parts written before the folder counts as complete
    if accelerator.is_main_process:
        # the marker lists every file with its size: a resume checks them before loading anything
        files = {os.path.relpath(os.path.join(d, n), partial): os.path.getsize(os.path.join(d, n))
                 for d, _, names in os.walk(partial) for n in names}
        with open(os.path.join(partial, MARKER), "w") as f:
            json.dump({"step": step, "num_processes": accelerator.num_processes, "files": files}, f)
        if os.path.exists(final):
            shutil.rmtree(final)  # an older save of the same step (a rerun): replaced by this one
        os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


def checkpoint_problem(path):
    """None when `path` is a complete checkpoint: a readable COMPLETE marker naming its step and
    process count, and every file it lists present with its recorded size; else why not."""
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        return f"incomplete (no {MARKER} marker: its save was interrupted, or an older version wrote it)"
    try:
        with open(marker) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        return f"its {MARKER} marker is unreadable ({exc})"
    m = CHECKPOINT.match(os.path.basename(os.path.normpath(path)))
    if not isinstance(info, dict) or not m or info.get("step") != int(m.group(1)) \
            or not isinstance(info.get("num_processes"), int):
        return f"its {MARKER} marker does not describe this checkpoint (step and process count): {str(info)[:80]}"
    for rel, size in (info.get("files") or {}).items():
        f = os.path.join(path, rel)
        if not os.path.isfile(f) or os.path.getsize(f) != size:
            return f"{rel} is missing or not the size it was saved with ({size} bytes): the copy is damaged"
    return None


def find_latest_checkpoint(output_dir, log=print):
    """The newest complete checkpoint-<step> in output_dir, or None; others are skipped with the reason."""
    if not os.path.isdir(output_dir):
        return None
    found = sorted(((int(m.group(1)), d) for d in os.listdir(output_dir) if (m := CHECKPOINT.match(d))), reverse=True)
    for _, name in found:
        path = os.path.join(output_dir, name)
        why = checkpoint_problem(path)
        if why is None:
            return path
        log(f"skipping {path}: {why}")
    return None


def resolve_checkpoint(arg, output_dir, log=print, num_processes=None):
    """--resume_from_checkpoint: 'latest' -> the newest complete one (or None); a folder must be complete.
    num_processes (given for sharded DeepSpeed states): the checkpoint must have been saved by as many."""
    if arg == "latest":
        path = find_latest_checkpoint(output_dir, log)
    else:
        why = checkpoint_problem(arg)
        if why is not None:
            raise SystemExit(f"--resume_from_checkpoint {arg}: not a complete checkpoint: {why}; "
                             "pass 'latest' to take the newest complete one")
        path = arg
    if path is not None and num_processes is not None:
        with open(os.path.join(path, MARKER)) as f:
            saved = json.load(f)["num_processes"]
        if saved != num_processes:
            raise SystemExit(f"{path} was saved by {saved} processes and this run has {num_processes}: DeepSpeed "
                             f"ZeRO states are sharded per process; resume with {saved} processes (e.g. flux-npu run "
                             f"--nproc {saved}), or start a new run")
    return path


def main(argv=None):
    args = parse_args(argv)
    project = ProjectConfiguration(project_dir=args.output_dir)
    plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed_config) if args.deepspeed_config else None
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        project_config=project,
        deepspeed_plugin=plugin,
    )
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    transformer = FluxTransformer2DModel(**TINY_FLUX)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(
        r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    ))
    params = [p for p in transformer.parameters() if p.requires_grad]
    accelerator.print(f"trainable LoRA parameters: {sum(p.numel() for p in params)}")
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)

    data = CachedLatents(args.num_samples, seed=args.seed)
    loader = DataLoader(data, batch_size=args.train_batch_size, shuffle=False)
    transformer, optimizer, loader = accelerator.prepare(transformer, optimizer, loader)

    _log(accelerator, args, {"event": "start", "num_processes": accelerator.num_processes,
                             "distributed_type": str(accelerator.distributed_type)})
    global_step = 0
    if args.resume_from_checkpoint:
        sharded = accelerator.state.deepspeed_plugin is not None  # ZeRO: one shard per process
        path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir, accelerator.print,
                                  accelerator.num_processes if sharded else None)
        if path is None:
            accelerator.print("no complete checkpoint found: starting a new run")
        else:
            accelerator.load_state(path)
            global_step = int(os.path.basename(os.path.normpath(path)).split("-")[1])
            accelerator.print(f"resumed from {path} at step {global_step}")
            _log(accelerator, args, {"event": "resumed", "step": global_step, "checkpoint": path})

    # DeepSpeed bf16/fp16 holds the model in the low-precision dtype: feed it inputs of that dtype
    # (x-flux and FluxKits do the same); the loss is computed in float32.
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    img_ids, txt_ids = data.img_ids.to(accelerator.device), data.txt_ids.to(accelerator.device)
    transformer.train()
    while global_step < args.max_train_steps:
        for batch in loader:
            with accelerator.accumulate(transformer):
                x1, x0, t = batch["latents"], batch["noise"], batch["t"]
                tb = t[:, None, None]
                xt = (1 - tb) * x1 + tb * x0  # rectified flow: data at t=0, noise at t=1
                pred = transformer(
                    hidden_states=xt.to(weight_dtype), encoder_hidden_states=batch["txt"].to(weight_dtype),
                    pooled_projections=batch["pooled"].to(weight_dtype), timestep=t.to(weight_dtype),
                    img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
                )[0]
                loss = F.mse_loss(pred.float(), (x0 - x1).float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            mean_loss = accelerator.gather(loss.detach()[None]).mean().item()
            accelerator.print(f"step {global_step} loss {mean_loss:.6f}")
            _log(accelerator, args, {"event": "step", "step": global_step, "loss": mean_loss})
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                save_path = save_checkpoint(accelerator, args.output_dir, global_step)
                accelerator.print(f"saved {save_path}")
                _log(accelerator, args, {"event": "saved", "step": global_step, "checkpoint": save_path})
            if global_step >= args.max_train_steps:
                break
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _log(accelerator, args, record):
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "train_log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
