"""Applied once, in this order, before an engine wraps the model (torchtitan's order):

    1. activation checkpointing per encoder block (engine.activation_checkpointing)
    2. torch.compile per encoder block (engine.compile)
    3. sharding: the engine's own (DeepSpeed ZeRO, FSDP2 fully_shard)

Both keep every parameter's name, so checkpoints and exports are the same with or without them.
Per block, not the whole model: recompute and compiled graphs stay block-sized, and FSDP2 then
shards the same units.
"""

from __future__ import annotations

from torch import nn


def parallelize(model: nn.Module, config) -> nn.Module:
    engine = config.engine
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return model
    if engine.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in blocks:
            checkpoint(block)  # recompute in backward; hooks, not a wrapper: names unchanged
    if engine.compile:
        for block in blocks:
            block.compile()
    return model
