"""Run under torchrun (2 gloo processes) or alone: a few DDP steps on fixed per-rank batches.

Usage: ddp_worker.py OUT.json [--single WORLD]. With --single the one process plays all WORLD
ranks by accumulating the per-rank gradients (each scaled by 1/WORLD), which is what DDP's
gradient averaging computes.
"""
import json
import sys

import torch

from alr_fast.distributed import DistEnv, all_reduce_mean, init_distributed, shutdown
from alr_fast.model import ReidNet
from alr_fast.regularizer import AdaptiveL2
from alr_fast.task import ReidTask
from alr_fast.trainer import Trainer, build_optimizer

STEPS, P, K = 3, 2, 2
FACTORS = dict(kernel=0.005, bias=0.005, gamma=0.005, beta=0.005)


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    images = torch.randn(P * K, 3, 64, 32, generator=g)
    labels = torch.arange(P).repeat_interleave(K) + 2 * rank
    return images, labels, torch.zeros_like(labels)


def build():
    torch.manual_seed(0)
    net = ReidNet(6, "resnet18")
    task = ReidTask(net, AdaptiveL2(net, FACTORS))
    return task, build_optimizer(task, type("O", (), dict(lr_base=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-7))(), torch.device("cpu"))


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    if "--single" in sys.argv:
        world = int(sys.argv[sys.argv.index("--single") + 1])
        task, opt = build()
        task.train()
        losses = []
        for step in range(STEPS):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for rank in range(world):
                images, labels, _ = batch(step, rank)
                loss = task(images, labels)["total"] / world
                loss.backward()
                total += loss.item()
            opt.step()
            losses.append(total)
        env = DistEnv()
    else:
        env = init_distributed("cpu")
        task, opt = build()
        trainer = Trainer(task, opt, device=torch.device("cpu"), dist_env=env)
        trainer.set_backbone_frozen(False)
        task.train()
        losses = [all_reduce_mean(trainer.train_step(batch(step, env.rank))["total"], env).item() for step in range(STEPS)]
    if env.is_main:
        checksum = float(sum(p.double().sum() for p in task.parameters()))
        json.dump({"losses": losses, "checksum": checksum}, open(out, "w"))
    shutdown(env)


if __name__ == "__main__":
    main()
