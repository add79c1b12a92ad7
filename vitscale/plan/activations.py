"""Activation memory of one micro-batch's forward + backward, from the model's shapes.

    activation_bytes(config.model, micro_batch=32, element_bytes=2, checkpointing=False)

Counted: every tensor autograd saves for backward, per encoder block (B images, N tokens, width D,
MLP width M, H heads; `a` bytes per element of the compute dtype):

    block input x, LN1 output (qkv's input), the qkv output (q, k, v),
    the attention output (the projection's input), the second residual x2, LN2 output,
    fc1 output (GELU's input), GELU output (fc2's input)        8 BND + 2 BNM elements
    LayerNorm mean and rstd (fp32)                              16 BN bytes
    fused attention (sdpa, triton, flash): logsumexp (fp32)     4 BHN bytes
    math attention, or a relative-position bias: the softmax    BHN^2 elements
    dropout > 0: each mask (bool on CUDA, the compute dtype on
    CPU, where ATen has no fused dropout)                       2 BND + BNM masks

plus the input batch (and the embedding dropout's mask), the final LayerNorm's input, the head
and the logits (the loss in fp32), and a backward working set: the gradient of the MLP hidden
layer (BNM elements; the attention matrix's gradient for math attention, if larger), live while
the tensors it was computed from are. With activation checkpointing (per block,
engine.activation_checkpointing) a block keeps only its input; backward recomputes one block at
a time, so one block's tensors come on top.

The peak of a forward + backward is the saved tensors plus the working set: backward frees a
block's tensors as it goes, so nothing else is live at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitscale.model.config import ModelConfig

FP32_BYTES = 4
FUSED_BACKENDS = ("auto", "sdpa", "triton", "flash")


@dataclass(frozen=True)
class ActivationBytes:
    per_block: float          # one encoder block's saved tensors
    outside_blocks: float     # input batch, final norm, head, logits and loss
    working_set: float        # backward's transient gradient tensors
    checkpointed_block: float  # what a checkpointed block keeps (its input)
    depth: int

    def peak(self, checkpointing: bool) -> float:
        if checkpointing:
            return self.depth * self.checkpointed_block + self.per_block + self.outside_blocks + self.working_set
        return self.depth * self.per_block + self.outside_blocks + self.working_set


def quadratic_attention(config: ModelConfig) -> bool:
    """Whether the attention matrix is materialised: the math backend always; a relative-position
    bias or attention dropout moves SDPA onto a kernel that keeps it (conservatively)."""
    return (config.attention_backend == "math" or config.pos_embed == "relative"
            or config.attention_dropout > 0)


def activation_breakdown(config: ModelConfig, micro_batch: int, element_bytes: int,
                         device: str = "cuda") -> ActivationBytes:
    shape = config.shape()
    b, a = micro_batch, element_bytes
    mask = 1 if device == "cuda" else a
    n = shape.num_patches + config.extra_tokens
    d, m, h = shape.width, shape.mlp_dim, shape.heads
    bnd, bnm = b * n * d, b * n * m
    block = (8 * bnd + 2 * bnm) * a + 2 * 2 * b * n * FP32_BYTES
    attention_matrix = b * h * n * n
    if quadratic_attention(config):
        block += attention_matrix * a
        if config.attention_dropout > 0:
            block += attention_matrix * (mask + a)  # the mask and the dropped probabilities
    else:
        block += b * h * n * FP32_BYTES
    if config.dropout > 0:
        block += (2 * bnd + bnm) * mask
    classes = config.num_classes
    representation = config.representation_size if config.head == "pretrain" and config.representation_size else 0
    image = b * config.in_channels * shape.image_size ** 2 * a
    head = b * (d + 2 * representation) * a       # pooled features, pre-logits input and tanh output
    logits = b * classes * (a + 2 * FP32_BYTES)   # logits, their fp32 copy, log-softmax output
    pool = 3 * bnd * a if config.classifier == "map" else 0  # the probe's keys, values and MLP input
    embedding_mask = bnd * mask if config.dropout > 0 else 0
    outside = image + embedding_mask + bnd * a + head + logits + pool  # bnd: the final LayerNorm's input
    working = max(bnm, attention_matrix if quadratic_attention(config) else 0) * a
    return ActivationBytes(per_block=float(block), outside_blocks=float(outside), working_set=float(working),
                           checkpointed_block=float(bnd * a), depth=shape.depth)


def activation_bytes(config: ModelConfig, micro_batch: int, element_bytes: int, checkpointing: bool,
                     device: str = "cuda") -> float:
    """Peak bytes of activations (and backward temporaries) of one micro-batch."""
    return activation_breakdown(config, micro_batch, element_bytes, device).peak(checkpointing)
