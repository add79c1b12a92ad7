"""Weight interop: timm `vit_*`, Hugging Face `ViTModel` / `ViTForImageClassification`, and the
`.npz` checkpoints of google-research/vision_transformer and big_vision, to and from vitscale's
weights file. `vitscale convert` is the command line; each format has its own module.

Every importer returns an `Imported`: the state_dict in VisionTransformer's names plus the model
config fields it could read off the source. What a source cannot tell (timm and bare Hugging
Face state dicts do not record the head count) comes from the user's `model.KEY=VALUE` flags.
"""

from vitscale.interop.common import Imported, resolve_config
from vitscale.interop.huggingface import hf_to_vitscale, load_hf, save_hf, vitscale_to_hf
from vitscale.interop.npz import npz_to_vitscale, read_npz, vitscale_to_npz, write_npz
from vitscale.interop.timm import timm_to_vitscale

__all__ = ["Imported", "hf_to_vitscale", "load_hf", "npz_to_vitscale", "read_npz", "resolve_config",
           "save_hf", "timm_to_vitscale", "vitscale_to_hf", "vitscale_to_npz", "write_npz"]
