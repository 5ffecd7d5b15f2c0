"""Checkpoint import (HF safetensors, GGUF) and HF export for the Llama model.

    from icm_jax.checkpoints import load_model, locate, save_hf_checkpoint
    model = load_model(locate("owner/name"), param_shardings=...)
    # or "path/to/hf_dir_or_file.gguf", "gs://bucket/hf_dir"
    save_hf_checkpoint(model.params, model.config, "out_dir",
                       tokenizer=model.tokenizer)
"""

from icm_jax.checkpoints.common import CheckpointError, TensorSource
from icm_jax.checkpoints.gguf import load_gguf
from icm_jax.checkpoints.hf import (load_hf_config, load_hf_params,
                                    save_hf_checkpoint)
from icm_jax.checkpoints.installed import smollm2_gguf_path
from icm_jax.checkpoints.hub import HubError
from icm_jax.checkpoints.loader import (LoadedModel, checkpoint_format,
                                        load_model, load_model_config,
                                        load_tokenizer, locate)

__all__ = ["CheckpointError", "HubError", "TensorSource", "LoadedModel",
           "load_model", "locate",
           "load_model_config", "load_tokenizer", "checkpoint_format", "load_gguf", "load_hf_config",
           "load_hf_params", "save_hf_checkpoint", "smollm2_gguf_path"]
