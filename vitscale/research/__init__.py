"""Research and transfer on top of the engine: fine-tuning at a new resolution, masked patch
prediction (the paper's self-supervised objective), and SAM/GSAM sharpness-aware updates.

Import the submodules directly (`vitscale.research.masked`, `.sam`, `.finetune`); this package
stays light so that `vitscale.config` can import its config sections without pulling in torch.
"""
