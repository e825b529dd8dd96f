"""A stage: one U-Net of the cascade as its config describes it, below both training and sampling.

  config.py      every config field with its default (`base_config(kind)`), completion of old configs, checks
  model.py       model kinds, dtypes, SR geometry; the U-Net's structure, abstract parameters and shardings
  checkpoint.py  orbax checkpoints of the train state, the EMA weights, the config and the data position
  export.py      a stage as plain files (config.json + ema.safetensors + export.json)
  sampling.py    sampling one stage (sample.py's cascade and the training loop's sample grids)
  stage.py       a trained stage loaded from a workdir or an export, ready to sample

Imports run downward: the stage layer uses models, diffusion, parallel and the config loader, never train,
the cascade or tools.
"""
