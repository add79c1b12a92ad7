"""engine.kind=fsdp2: torch's fully_shard per encoder block, then the root.

    torchrun --nproc_per_node 8 vitscale/train.py --config configs/vit_h14_jft.yaml engine.kind=fsdp2

Parameters, gradients and optimizer state are sharded over every rank (like ZeRO-3); each block
is gathered for its forward and backward and freed after. bf16 follows a MixedPrecisionPolicy:
bf16 compute, fp32 gradient reduction, fp32 sharded master weights stepped by the fused
optimizer. Within an accumulation window the gradient reduce-scatter runs only after the last
micro-batch. Checkpoints are DCP (vitscale/engine/torch_state.py): resumable on any number of
ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from vitscale.engine.local import TorchEngine

# Methods besides forward that the loop's evaluators and objectives call on the root module;
# FSDP2 must gather the root's own parameters (patch embedding, head) around them too.
FORWARD_METHODS = ("forward_features", "forward_representation")


class FSDP2Engine(TorchEngine):
    kind = "fsdp2"

    def prepare_module(self, model: nn.Module, config) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(self.device.type, (self.comm.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.precision == "bf16" else None,
                                      reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        for name in FORWARD_METHODS:
            if hasattr(model, name):
                register_fsdp_forward_method(model, name)
        return model

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()  # the mixed-precision policy casts parameters and inputs

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        self.module.set_requires_gradient_sync(boundary)
        super().backward(loss, boundary=boundary)
